// CUDA Gram accumulation, the simple and trustworthy version: a triangular tile scheduler (only
// tiles on and above the diagonal are launched), shared-memory staging that widens bf16/fp16 to
// fp32, fp32 FMA accumulation, and an optional split of the rows across blocks (atomicAdd into G
// only when split). The tensor-core path is its own piece of work; this one is the baseline it
// must match.
#include "gram_cuda.h"

#include "../tiling.h"

namespace regmean_fast {
namespace kernels {

namespace {

constexpr int kTile = kCudaGramTile;  // 64 x 64 outputs per block
constexpr int kThreads = 16;          // 16 x 16 threads, 4 x 4 outputs each
constexpr int kPer = kTile / kThreads;
constexpr int kK = 16;                // rows staged per step

__global__ void gram_tile_kernel(float* __restrict__ G, int64_t d, const void* __restrict__ X,
                                 DType dt, int64_t ldx, const int64_t* __restrict__ row_index,
                                 int64_t n_rows, int64_t nb, int64_t splits) {
  __shared__ float xi[kK][kTile];
  __shared__ float xj[kK][kTile];
  int64_t bi, bj;
  triangle_tile_coords(blockIdx.x, nb, &bi, &bj);
  int64_t r_begin, r_end;
  split_range(n_rows, splits, blockIdx.y, &r_begin, &r_end);
  const int64_t i0 = bi * kTile, j0 = bj * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kThreads + tx;
  float acc[kPer][kPer] = {};
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kK) {
    // 256 threads stage kK x 64 values of each of the two column blocks.
    for (int e = tid; e < kK * kTile; e += kThreads * kThreads) {
      const int rr = e / kTile, c = e % kTile;
      const int64_t r = r0 + rr;
      float vi = 0.f, vj = 0.f;
      if (r < r_end) {
        const int64_t row = row_index ? row_index[r] : r;
        const int64_t base = row * ldx;
        if (i0 + c < d) vi = load_as_float(X, dt, base + i0 + c);
        if (j0 + c < d) vj = load_as_float(X, dt, base + j0 + c);
      }
      xi[rr][c] = vi;
      xj[rr][c] = vj;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kK; ++k) {
      float a[kPer], b[kPer];
#pragma unroll
      for (int p = 0; p < kPer; ++p) {
        a[p] = xi[k][ty + p * kThreads];
        b[p] = xj[k][tx + p * kThreads];
      }
#pragma unroll
      for (int p = 0; p < kPer; ++p)
#pragma unroll
        for (int q = 0; q < kPer; ++q) acc[p][q] = fmaf(a[p], b[q], acc[p][q]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int p = 0; p < kPer; ++p) {
    const int64_t i = i0 + ty + p * kThreads;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int64_t j = j0 + tx + q * kThreads;
      if (i < d && j < d && j >= i) {
        if (splits > 1) {
          atomicAdd(G + i * d + j, acc[p][q]);
        } else {
          G[i * d + j] += acc[p][q];
        }
      }
    }
  }
}

__global__ void symmetrize_kernel(float* __restrict__ G, int64_t d, int64_t nb) {
  // One 32 x 32 tile pair per block, through shared memory so both sides are coalesced.
  __shared__ float tile[32][33];
  int64_t bi, bj;
  triangle_tile_coords(blockIdx.x, nb, &bi, &bj);
  const int64_t i0 = bi * 32, j0 = bj * 32;
  const int tx = threadIdx.x;
  for (int ty = threadIdx.y; ty < 32; ty += blockDim.y) {
    const int64_t i = i0 + ty, j = j0 + tx;
    tile[ty][tx] = (i < d && j < d) ? G[i * d + j] : 0.f;
  }
  __syncthreads();
  for (int ty = threadIdx.y; ty < 32; ty += blockDim.y) {
    // Write G[j0 + ty, i0 + tx] = G[i0 + tx, j0 + ty] where that element is strictly lower.
    const int64_t row = j0 + ty, col = i0 + tx;
    if (row < d && col < d && row > col) G[row * d + col] = tile[tx][ty];
  }
}

}  // namespace

cudaError_t gram_update_cuda(float* G, int64_t d, const void* X, DType dt, int64_t ldx,
                             const int64_t* row_index, int64_t n_rows, int sm_count,
                             cudaStream_t stream) {
  if (d <= 0 || n_rows <= 0) return cudaSuccess;
  const int64_t nb = ceil_div(d, kTile);
  const int64_t splits = gram_row_splits(triangle_tile_count(nb), n_rows, sm_count, kTile, 65535);
  dim3 grid(static_cast<unsigned>(triangle_tile_count(nb)), static_cast<unsigned>(splits));
  dim3 block(kThreads, kThreads);
  gram_tile_kernel<<<grid, block, 0, stream>>>(G, d, X, dt, ldx, row_index, n_rows, nb, splits);
  return cudaGetLastError();
}

cudaError_t symmetrize_cuda(float* G, int64_t d, cudaStream_t stream) {
  if (d <= 1) return cudaSuccess;
  const int64_t nb = ceil_div(d, 32);
  symmetrize_kernel<<<static_cast<unsigned>(triangle_tile_count(nb)), dim3(32, 8), 0, stream>>>(G, d, nb);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace regmean_fast
