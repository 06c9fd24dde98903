#include "products_cuda.h"

#include <climits>

#include "../common.h"

namespace regmean_fast {
namespace kernels {

namespace {

__global__ void split_bf16x3_kernel(const float* __restrict__ x, int64_t n, uint16_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    split_bf16x3(x[i], out + i, n);
  }
}

}  // namespace

cudaError_t split_bf16x3_cuda(const float* x, int64_t n, uint16_t* out, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  split_bf16x3_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), threads, 0, stream>>>(x, n, out);
  return cudaGetLastError();
}

std::string gemm_bf16x3_accumulate_cuda(cublasHandle_t handle, int64_t m, int64_t n, int64_t k, float alpha,
                                        const uint16_t* A, int64_t lda, bool trans_a, const uint16_t* Bs,
                                        int64_t ldb, int64_t slice_stride, float* C, int64_t ldc) {
  if (m <= 0 || n <= 0 || k <= 0) return "";
  if (m > INT_MAX || n > INT_MAX || k > INT_MAX || lda > INT_MAX || ldb > INT_MAX || ldc > INT_MAX) {
    return "gemm_bf16x3: dimensions beyond the 32-bit cuBLAS API";
  }
  // cuBLAS is column-major: row-major C = A B is column-major C^T = B^T A^T, where the row-major
  // B [k, n] read column-major is B^T as stored (op N) and A is A^T as stored (op N), or needs op T
  // when A itself is column-major (trans_a).
  const float one = 1.0f;
  for (int p = 0; p < 3; ++p) {
    const cublasStatus_t s = cublasGemmEx(
        handle, CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
        static_cast<int>(k), &alpha, Bs + p * slice_stride, CUDA_R_16BF, static_cast<int>(ldb), A, CUDA_R_16BF,
        static_cast<int>(lda), &one, C, CUDA_R_32F, static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) {
      return "cublasGemmEx failed with status " + std::to_string(static_cast<int>(s));
    }
  }
  return "";
}

}  // namespace kernels
}  // namespace regmean_fast
