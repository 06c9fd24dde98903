#!/usr/bin/env bash
# One command for a lent GPU machine (no network; Python 3.12, torch 2.11, nvcc): build the
# extension from source in place, run the CUDA tests, benchmark against pure PyTorch, print a
# short table, and write everything into OUT_DIR (default: $OUT or ./gpu_check_out).
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Budget: under 8 minutes on an H200 (build ~2-3 min with MAX_JOBS=16, tests <= 200 s, benchmarks <= 150 s).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
py="${PYTHON:-python}"
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch ($("$py" -c 'import torch; print(torch.__version__)' 2>&1)); nothing to check" >&2
  exit 2
fi
# Only the GPU's own arch: a quicker build than the four default archs.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$("$py" -c 'import torch; p=torch.cuda.get_device_capability(); print(f"{p[0]}.{p[1]}")')"
  export TORCH_CUDA_ARCH_LIST
fi
start=$(date +%s)
echo "== build (archs $TORCH_CUDA_ARCH_LIST)"
REGMEAN_FAST_CUDA=1 "$py" setup.py -q build_ext --inplace > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
"$py" -m regmean_fast info | tee "$out/info.txt"
echo "== CUDA tests"
set +e
# tests/test_cuda_ops.py: every CUDA kernel against fp64 (poisoned outputs, sizes off the tiles,
# both Gram kernels); the time limits keep the whole script under 8 minutes.
timeout 200 "$py" -m pytest -q -p no:cacheprovider -m cuda tests/ --junitxml="$out/cuda_tests.xml" 2>&1 | tail -40 | tee "$out/cuda_tests.txt"
tests_rc=${PIPESTATUS[0]}
set -e
echo "== benchmarks"
set +e
timeout 150 "$py" -m benchmarks.gpu "$out" 2>&1 | tee "$out/bench.txt"
bench_rc=${PIPESTATUS[0]}
set -e
[ "$bench_rc" -eq 0 ] || echo "benchmarks exit $bench_rc (see $out/bench.txt, $out/gpu_bench.json)"
echo "== done in $(( $(date +%s) - start )) s; CUDA tests exit $tests_rc; results in $out"
exit "$tests_rc"
