// The merge-side reduction over K Grams and triangle packing, CUDA (the twins of reduce_cpu.h).
// Raw device pointers and a stream; no torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common.h"

namespace regmean_fast {
namespace kernels {

// Grams handed to one kernel launch by value (kernel parameters, no device allocation); larger K
// is reduced in chunks of this size, each chunk adding onto the previous one in order.
constexpr int kReduceChunk = 32;

// A = sum_k factors[k] * (alpha * G_k + (1 - alpha) * diag(G_k)), full symmetric d x d row-major
// of type Out (float or double), accumulated in Out with k in order (the CPU op's contract).
// grams: K host-side array of device pointers to full d x d (packed = false) or packed upper
// triangles (packed = true); only upper triangles are read. factors: K host doubles.
template <typename Out>
cudaError_t gram_reduce_cuda(Out* A, int64_t d, const float* const* grams, int64_t K, const double* factors,
                             double alpha, bool packed, cudaStream_t stream);

// packed[offset(i) + j - i] = G[i, j] for i <= j.
cudaError_t pack_upper_cuda(const float* G, int64_t d, float* packed, cudaStream_t stream);

// G = the full symmetric matrix whose upper triangle is `packed`.
cudaError_t unpack_upper_cuda(const float* packed, int64_t d, float* G, cudaStream_t stream);

}  // namespace kernels
}  // namespace regmean_fast
