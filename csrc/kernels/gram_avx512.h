// The Gram update by micro-kernels of our own on AVX-512 CPUs: vdpbf16ps for bf16 X where the CPU has
// AVX512-BF16 but no AMX (AMD Zen 4 and later, Intel Cooper Lake), where MKL's bf16 GEMM is slower than
// torch's own (oneDNN) bf16 GEMM and torch exports neither oneDNN nor its bf16 cpublas::gemm; FMA for
// fp32 and fp16 X, computing only the triangle's tiles.
//
// The file that implements them is compiled for the build's target like every other file; only its
// kernel functions carry the AVX-512 target attributes, so the library stays portable and the
// dispatcher (cpu_path.h) calls them only on a CPU that has the instructions.
#pragma once

#include <cstdint>

#include "gram_cpu.h"

namespace regmean_fast {
namespace kernels {

// True when this build contains the kernels (an x86-64 GCC >= 10 or Clang build). Whether the CPU can
// run them is a separate question (cpu_features()).
bool avx512_kernels_compiled();

// G[i, j] += sum_r X[r, i] * X[r, j] for every i <= j (the strict lower triangle is not touched).
//   G: d x d fp32, row-major; X: rows x d, row stride ldx elements, unit column stride.
// bf16 (needs AVX512-BF16): every product of two bf16 values is exact in fp32 and the sums accumulate in
// fp32 (vdpbf16ps adds two products at a time); bf16 subnormal inputs (|x| < 1.2e-38) count as zero, as
// vdpbf16ps treats them.
// block_bytes: how much packed data one parallel pass covers (tests shrink it to cross block boundaries).
constexpr int64_t kAvx512BlockBytes = int64_t(16) << 20;
void gram_update_avx512bf16(float* G, int64_t d, const uint16_t* X, int64_t rows, int64_t ldx,
                            const TaskRunner& runner, int64_t block_bytes = kAvx512BlockBytes);
// fp32 or fp16 (dt; needs AVX-512 F/BW/VL): fp16 widened exactly, fp32 FMAs.
void gram_update_avx512f32(float* G, int64_t d, const void* X, DType dt, int64_t rows, int64_t ldx,
                           const TaskRunner& runner, int64_t block_bytes = kAvx512BlockBytes);

}  // namespace kernels
}  // namespace regmean_fast
