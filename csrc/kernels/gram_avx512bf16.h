// The Gram update on AVX512-BF16 (vdpbf16ps) for CPUs that have it without AMX (AMD Zen 4 and later,
// Intel Cooper Lake): a micro-kernel of our own, because MKL's bf16 GEMM is slower there than torch's
// own (oneDNN) bf16 GEMM and torch exports neither oneDNN nor its bf16 cpublas::gemm.
//
// The file that implements it is compiled for the build's target like every other file; only its
// kernel functions carry the AVX-512 target attributes, so the library stays portable and the
// dispatcher (cpu_path.h) calls it only on a CPU that has the instructions.
#pragma once

#include <cstdint>

#include "gram_cpu.h"

namespace regmean_fast {
namespace kernels {

// True when this build contains the kernel (an x86-64 GCC >= 10 or Clang build). Whether the CPU can
// run it is a separate question (cpu_features().avx512bf16).
bool avx512bf16_kernel_compiled();

// G[i, j] += sum_r X[r, i] * X[r, j] for every i <= j (the strict lower triangle is not touched).
//   G: d x d fp32, row-major; X: rows x d bfloat16 bits, row stride ldx elements, unit column stride.
// Every product of two bf16 values is exact in fp32 and the sums accumulate in fp32 (vdpbf16ps adds
// two products at a time); bf16 subnormal inputs (|x| < 1.2e-38) count as zero, as vdpbf16ps
// treats them. Requires avx512bf16_kernel_compiled() and a CPU with AVX512-BF16.
void gram_update_avx512bf16(float* G, int64_t d, const uint16_t* X, int64_t rows, int64_t ldx,
                            const TaskRunner& runner);

}  // namespace kernels
}  // namespace regmean_fast
