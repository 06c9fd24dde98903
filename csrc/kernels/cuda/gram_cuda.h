// Host-callable launchers of the CUDA kernels. Raw device pointers and a stream; no torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common.h"

namespace regmean_fast {
namespace kernels {

// Tile side of the CUDA Gram kernel (shared with the CPU-tested scheduler math).
constexpr int kCudaGramTile = 64;

// Which kernel gram_update_cuda runs.
enum class GramCudaPath : int { Fma = 0, TensorCore = 1 };

// The tensor-core (WMMA bf16/fp16 -> fp32) kernel needs sm_80 or newer and 16-bit inputs; fp32 X
// and older GPUs take the fp32-FMA kernel. `compute_capability` is major * 10 + minor.
inline GramCudaPath gram_cuda_path(DType dt, int compute_capability, bool allow_tensor_cores) {
  return (allow_tensor_cores && dt != DType::F32 && compute_capability >= 80) ? GramCudaPath::TensorCore
                                                                             : GramCudaPath::Fma;
}

inline const char* gram_cuda_path_name(GramCudaPath p) { return p == GramCudaPath::TensorCore ? "wmma" : "fma"; }

// triu(G) += X[rows]^T X[rows] on `stream`. G: d x d fp32 row-major (device). X: device, row
// stride ldx elements, type dt. row_index: nullptr (all rows 0..n_rows-1) or n_rows device
// int64 indices of the rows to use. `path` picks the kernel (see gram_cuda_path). Returns the
// launch error, if any.
cudaError_t gram_update_cuda(float* G, int64_t d, const void* X, DType dt, int64_t ldx,
                             const int64_t* row_index, int64_t n_rows, int sm_count, GramCudaPath path,
                             cudaStream_t stream);

// Copy the upper triangle of G into the lower one on `stream`.
cudaError_t symmetrize_cuda(float* G, int64_t d, cudaStream_t stream);

}  // namespace kernels
}  // namespace regmean_fast
