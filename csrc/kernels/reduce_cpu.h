// The merge-side reduction over K Grams and triangle packing, CPU. Raw pointers; no torch.
#pragma once

#include <cstdint>

#include "gram_cpu.h"

namespace regmean_fast {
namespace kernels {

// Number of elements of a packed upper triangle (row-major, diagonal included) of order d.
inline int64_t packed_size(int64_t d) { return d * (d + 1) / 2; }

// A = sum_k factors[k] * (alpha * G_k + (1 - alpha) * diag(G_k)), written as a full symmetric
// d x d row-major matrix of type Out (float or double), accumulated in Out, k in order (so the
// result is deterministic). Only the upper triangle of each G_k is read: grams[k] points at a
// full row-major d x d matrix (packed = false) or at a packed upper triangle (packed = true).
template <typename Out>
void gram_reduce_cpu(Out* A, int64_t d, const float* const* grams, int64_t K, const double* factors, double alpha,
                     bool packed, const TaskRunner& runner);

// packed[offset(i) + j - i] = G[i, j] for i <= j (the upper triangle, row-major).
void pack_upper_cpu(const float* G, int64_t d, float* packed, const TaskRunner& runner);

// G = the full symmetric matrix whose upper triangle is `packed`.
void unpack_upper_cpu(const float* packed, int64_t d, float* G, const TaskRunner& runner);

}  // namespace kernels
}  // namespace regmean_fast
