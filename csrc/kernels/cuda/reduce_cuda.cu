// One pass over the K Grams on the GPU: each 32 x 32 tile of the upper triangle is read once per
// Gram (coalesced along rows, for full and packed layouts alike), reduced in registers, written to
// the upper half directly and to the lower half through a shared-memory transpose, so both stores
// are coalesced. Memory traffic: K d^2 / 2 reads + d^2 writes (memory-bound by design).
#include "reduce_cuda.h"

#include "../tiling.h"
#include "gram_cuda.h"

namespace regmean_fast {
namespace kernels {

namespace {

constexpr int kRT = 32;    // tile side
constexpr int kRows = 8;   // blockDim.y; each thread holds kRT / kRows rows
constexpr int kPerT = kRT / kRows;

struct ReduceChunk {
  const float* grams[kReduceChunk];
  double factors[kReduceChunk];
  int count;
};

RF_HOST_DEVICE int64_t src_index(int64_t i, int64_t j, int64_t d, bool packed) {
  return packed ? triangle_row_offset(i, d) + (j - i) : i * d + j;
}

template <typename Out>
__global__ void gram_reduce_kernel(Out* __restrict__ A, int64_t d, ReduceChunk chunk, double alpha, bool packed,
                                   bool accumulate, int64_t nb) {
  __shared__ Out tile[kRT][kRT + 1];
  int64_t bi, bj;
  triangle_tile_coords(blockIdx.x, nb, &bi, &bj);
  const int64_t i0 = bi * kRT, j0 = bj * kRT;
  const int tx = threadIdx.x;
  const int64_t j = j0 + tx;
  Out acc[kPerT];
#pragma unroll
  for (int p = 0; p < kPerT; ++p) {
    const int64_t i = i0 + threadIdx.y + p * kRows;
    acc[p] = (accumulate && i < d && j < d && j >= i) ? A[i * d + j] : Out(0);
  }
  for (int k = 0; k < chunk.count; ++k) {
    const float* G = chunk.grams[k];
    const Out off = static_cast<Out>(chunk.factors[k] * alpha);
    const Out on = static_cast<Out>(chunk.factors[k]);  // diagonal: alpha + (1 - alpha) = 1
#pragma unroll
    for (int p = 0; p < kPerT; ++p) {
      const int64_t i = i0 + threadIdx.y + p * kRows;
      if (i < d && j < d && j >= i) acc[p] += (j == i ? on : off) * static_cast<Out>(G[src_index(i, j, d, packed)]);
    }
  }
#pragma unroll
  for (int p = 0; p < kPerT; ++p) {
    const int ty = threadIdx.y + p * kRows;
    const int64_t i = i0 + ty;
    tile[ty][tx] = acc[p];
    if (i < d && j < d && j >= i) A[i * d + j] = acc[p];
  }
  __syncthreads();
#pragma unroll
  for (int p = 0; p < kPerT; ++p) {
    // A[j0 + ty, i0 + tx] = tile[tx][ty] where that element is strictly lower.
    const int ty = threadIdx.y + p * kRows;
    const int64_t row = j0 + ty, col = i0 + tx;
    if (row < d && col < d && row > col) A[row * d + col] = tile[tx][ty];
  }
}

// One block per row i: copy G[i, i:d] to its packed row (to_packed) or back (coalesced both sides).
__global__ void pack_rows_kernel(const float* __restrict__ src, int64_t d, float* __restrict__ dst, bool to_packed) {
  const int64_t i = blockIdx.x;
  const int64_t off = triangle_row_offset(i, d);
  for (int64_t j = i + threadIdx.x; j < d; j += blockDim.x) {
    const int64_t full = i * d + j, pk = off + (j - i);
    if (to_packed) {
      dst[pk] = src[full];
    } else {
      dst[full] = src[pk];
    }
  }
}

}  // namespace

template <typename Out>
cudaError_t gram_reduce_cuda(Out* A, int64_t d, const float* const* grams, int64_t K, const double* factors,
                             double alpha, bool packed, cudaStream_t stream) {
  if (d <= 0) return cudaSuccess;
  const int64_t nb = ceil_div(d, kRT);
  const int64_t tiles = triangle_tile_count(nb);
  if (tiles > 0x7fffffffLL) return cudaErrorInvalidValue;
  int64_t k0 = 0;
  do {  // K == 0 still writes A = 0
    ReduceChunk chunk{};
    chunk.count = static_cast<int>(K - k0 < kReduceChunk ? K - k0 : kReduceChunk);
    for (int c = 0; c < chunk.count; ++c) {
      chunk.grams[c] = grams[k0 + c];
      chunk.factors[c] = factors[k0 + c];
    }
    gram_reduce_kernel<Out><<<static_cast<unsigned>(tiles), dim3(kRT, kRows), 0, stream>>>(A, d, chunk, alpha, packed,
                                                                                         k0 > 0, nb);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    k0 += chunk.count;
  } while (k0 < K);
  return cudaSuccess;
}

template cudaError_t gram_reduce_cuda<float>(float*, int64_t, const float* const*, int64_t, const double*, double,
                                             bool, cudaStream_t);
template cudaError_t gram_reduce_cuda<double>(double*, int64_t, const float* const*, int64_t, const double*, double,
                                              bool, cudaStream_t);

cudaError_t pack_upper_cuda(const float* G, int64_t d, float* packed, cudaStream_t stream) {
  if (d <= 0) return cudaSuccess;
  if (d > 0x7fffffffLL) return cudaErrorInvalidValue;
  pack_rows_kernel<<<static_cast<unsigned>(d), 256, 0, stream>>>(G, d, packed, true);
  return cudaGetLastError();
}

cudaError_t unpack_upper_cuda(const float* packed, int64_t d, float* G, cudaStream_t stream) {
  if (d <= 0) return cudaSuccess;
  if (d > 0x7fffffffLL) return cudaErrorInvalidValue;
  pack_rows_kernel<<<static_cast<unsigned>(d), 256, 0, stream>>>(packed, d, G, false);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return symmetrize_cuda(G, d, stream);
}

}  // namespace kernels
}  // namespace regmean_fast
