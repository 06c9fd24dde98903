// Exact bf16x3 products on the GPU, no torch: W G for a bf16 W and an fp32 G as three bf16 tensor-core
// GEMMs with fp32 accumulation (cublasGemmEx, CUBLAS_COMPUTE_32F), as accurate as an fp32 GEMM and
// far faster. The split is split_bf16x3 (common.h), shared with the CPU ops.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace regmean_fast {
namespace kernels {

// out[p * n + i] = slice p of x[i] (p = 0, 1, 2), on `stream`.
cudaError_t split_bf16x3_cuda(const float* x, int64_t n, uint16_t* out, cudaStream_t stream);

// Row-major C[m, n] += alpha * A[m, k] (Bs[0] + Bs[1] + Bs[2]) with A bf16 (row-major with leading
// dimension lda, or column-major when trans_a: A^T stored row-major [k, m]), Bs three row-major
// [k, n] bf16 slices (leading dimension ldb) at Bs + p * slice_stride, C fp32 with leading
// dimension ldc. `handle` must already be bound to the caller's stream. Returns "" or an error.
std::string gemm_bf16x3_accumulate_cuda(cublasHandle_t handle, int64_t m, int64_t n, int64_t k, float alpha,
                                        const uint16_t* A, int64_t lda, bool trans_a, const uint16_t* Bs,
                                        int64_t ldb, int64_t slice_stride, float* C, int64_t ldc);

}  // namespace kernels
}  // namespace regmean_fast
