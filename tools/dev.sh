#!/usr/bin/env bash
# One entry point for a fresh clone:
#   bash tools/dev.sh demo   set up, then run the main job (python -m regmean_fast demo)
#   bash tools/dev.sh test   set up, then build the kernels with CMake, run ctest and pytest
#   bash tools/dev.sh setup  only set up
# Setup = a virtualenv outside the clone (REGMEAN_FAST_VENV, default ~/.cache/regmean_fast/venv),
# reused when present, with torch and the project installed from this clone (extension built).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="${REGMEAN_FAST_VENV:-$HOME/.cache/regmean_fast/venv}"
torch_spec="${REGMEAN_FAST_TORCH:-torch==2.14.1}"   # a CUDA build: CUDA code compiles here too
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

log() { printf '\n== %s\n' "$*"; }

# Where this runs, first in the log: a result that differs between CPUs then says which CPU it came from.
machine() {
  local model flags f have=""
  model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1)
  flags=" $(sed -n 's/^flags[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1) "
  for f in amx_bf16 amx_tile avx512_bf16 avx512f avx2 fma; do
    case "$flags" in *" $f "*) have="$have $f" ;; esac
  done
  log "machine: ${model:-unknown CPU} ($(nproc) CPUs; ${have# }), $(uname -m)"
}

setup() {
  if [ ! -x "$venv/bin/python" ]; then
    log "creating virtualenv $venv"
    python3 -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  source "$venv/bin/activate"
  if ! python -c "import torch" 2>/dev/null; then
    log "installing $torch_spec (first run only; about a minute)"
    python -m pip install -q "$torch_spec"
  fi
  # Rebuild only when the sources of the extension or the package metadata changed (or another
  # clone was installed last): a cached demo then starts in seconds.
  local stamp_file="$venv/.regmean_fast_build_stamp"
  local stamp
  stamp="$here $(find csrc setup.py pyproject.toml -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' \
            -o -name '*.py' -o -name '*.toml' \) -print0 | sort -z | xargs -0 sha1sum | sha1sum | cut -c1-40)"
  if [ "${CI:-}" = "true" ] || [ ! -f "$stamp_file" ] || [ "$(cat "$stamp_file")" != "$stamp" ] \
      || ! python -c "import regmean_fast._C" 2>/dev/null; then
    log "installing regmean_fast from $here (builds the extension)"
    rm -f "$stamp_file"
    python -m pip install -q --no-build-isolation -e ".[test]"
    echo "$stamp" > "$stamp_file"
  fi
  python -m regmean_fast info
}

run_tests() {
  local build="${REGMEAN_FAST_CMAKE_BUILD:-$here/build/cmake}"
  local blog="$build/build-output.log"
  log "C++ kernels: cmake + ctest ($build)"
  mkdir -p "$build"
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release > "$blog" 2>&1 || { cat "$blog"; exit 1; }
  cmake --build "$build" >> "$blog" 2>&1 || { cat "$blog"; exit 1; }
  ctest --test-dir "$build" --output-on-failure
  # The statistics against fp64 through every other CPU path this machine has, before the whole suite on the
  # default ones: a test that holds on one path only fails here, not on a user's CPU (the ops' own tests
  # force each path too).
  local path default
  default=$(python -c "import regmean_fast as rf; print(rf.build_info().get('cpu_gemm_path', {}).get('float32', ''))")
  for path in $(python -c "import regmean_fast as rf; print(rf.build_info().get('cpu_paths', '').replace(',', ' '))"); do
    [ "$path" = "$default" ] && continue
    log "pytest: the statistics through REGMEAN_FAST_CPU_PATH=$path"
    REGMEAN_FAST_CPU_PATH="$path" python -m pytest -q -p no:cacheprovider tests/test_grams_cli.py -k fp64_oracle
  done
  log "pytest"
  # pytest exits 5 when it collected nothing: that is a failure here, not a pass.
  set +e
  python -m pytest -q -p no:cacheprovider tests "$@"
  local rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then echo "pytest ran no tests"; exit 1; fi
  exit "$rc"
}

cmd="${1:-test}"
shift || true
machine
case "$cmd" in
  setup) setup ;;
  test) setup; run_tests "$@" ;;
  demo) setup; python -m regmean_fast demo "$@" ;;
  *) echo "usage: bash tools/dev.sh {demo|test|setup}" >&2; exit 2 ;;
esac
