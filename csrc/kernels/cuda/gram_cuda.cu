// CUDA Gram accumulation. Two kernels share one launch shape: a triangular tile scheduler (only
// tiles on and above the diagonal are launched, blockIdx.x) and an optional split of the rows
// across blocks (blockIdx.y; atomicAdd into G only when split).
//  * gram_tile_kernel: the simple baseline. bf16/fp16 widened to fp32 in shared memory, fp32 FMA.
//    Used for fp32 X and GPUs older than sm_80.
//  * gram_wmma_kernel: tensor cores through nvcuda::wmma (bf16/fp16 16x16x16, fp32 accumulators),
//    sm_80 and newer. Its index math is in gram_wmma_layout.h, replayed by the C++ unit tests.
#include "gram_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "../tiling.h"
#include "gram_wmma_layout.h"

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

// 64 x 64 block tile, 4 warps of 32 x 32 (2 x 2 WMMA fragments each), 32 rows of X staged per
// step as raw 16-bit values (zero past the rows' end and past column d). Fragments strictly below
// the diagonal (in diagonal tiles) are neither computed nor stored; stores go through a per-warp
// 16 x 16 fp32 scratch so only in-bounds elements with j >= i are written.
template <typename T>
__global__ void __launch_bounds__(wmma_layout::kThreads)
    gram_wmma_kernel(float* __restrict__ G, int64_t d, const uint16_t* __restrict__ X, int64_t ldx,
                     const int64_t* __restrict__ row_index, int64_t n_rows, int64_t nb, int64_t splits) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using namespace wmma_layout;
  __shared__ __align__(32) uint16_t si[kStageElems];
  __shared__ __align__(32) uint16_t sj[kStageElems];
  __shared__ __align__(32) float scratch[kWarps][kFrag * kFrag];
  int64_t bi, bj;
  triangle_tile_coords(blockIdx.x, nb, &bi, &bj);
  const bool diag = bi == bj;
  int64_t r_begin, r_end;
  split_range(n_rows, splits, blockIdx.y, &r_begin, &r_end);
  const int64_t i0 = bi * kTile, j0 = bj * kTile;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  int wr, wc;
  warp_origin(warp, &wr, &wc);
  bool live[kFragsPerWarp][kFragsPerWarp];
#pragma unroll
  for (int p = 0; p < kFragsPerWarp; ++p)
#pragma unroll
    for (int q = 0; q < kFragsPerWarp; ++q)
      live[p][q] = !fragment_strictly_lower(i0 + wr + p * kFrag, j0 + wc + q * kFrag);
  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[kFragsPerWarp][kFragsPerWarp];
#pragma unroll
  for (int p = 0; p < kFragsPerWarp; ++p)
#pragma unroll
    for (int q = 0; q < kFragsPerWarp; ++q) wmma::fill_fragment(acc[p][q], 0.f);
  const uint16_t* sb_bits = diag ? si : sj;
  const T* sa = reinterpret_cast<const T*>(si);
  const T* sb = reinterpret_cast<const T*>(sb_bits);
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kK) {
#pragma unroll 4
    for (int it = 0; it < kStageIters; ++it) {
      int k, m;
      stage_element(tid, it, &k, &m);
      const int64_t r = r0 + k;
      uint16_t vi = 0, vj = 0;
      if (r < r_end) {
        const uint16_t* x = X + (row_index ? row_index[r] : r) * ldx;
        if (i0 + m < d) vi = x[i0 + m];
        if (!diag && j0 + m < d) vj = x[j0 + m];
      }
      si[stage_offset(k, m)] = vi;
      if (!diag) sj[stage_offset(k, m)] = vj;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kK; kk += kFrag) {
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::col_major> a[kFragsPerWarp];
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major> b[kFragsPerWarp];
#pragma unroll
      for (int p = 0; p < kFragsPerWarp; ++p) wmma::load_matrix_sync(a[p], sa + stage_offset(kk, wr + p * kFrag), kLd);
#pragma unroll
      for (int q = 0; q < kFragsPerWarp; ++q) wmma::load_matrix_sync(b[q], sb + stage_offset(kk, wc + q * kFrag), kLd);
#pragma unroll
      for (int p = 0; p < kFragsPerWarp; ++p)
#pragma unroll
        for (int q = 0; q < kFragsPerWarp; ++q)
          if (live[p][q]) wmma::mma_sync(acc[p][q], a[p], b[q], acc[p][q]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int p = 0; p < kFragsPerWarp; ++p) {
#pragma unroll
    for (int q = 0; q < kFragsPerWarp; ++q) {
      if (!live[p][q]) continue;  // warp-uniform
      wmma::store_matrix_sync(scratch[warp], acc[p][q], kFrag, wmma::mem_row_major);
      __syncwarp();
      const int64_t gi = i0 + wr + p * kFrag, gj = j0 + wc + q * kFrag;
#pragma unroll
      for (int t = 0; t < kStoreIters; ++t) {
        int r, c;
        store_element(lane, t, &r, &c);
        const int64_t i = gi + r, j = gj + c;
        if (store_mask(i, j, d)) {
          const float v = scratch[warp][r * kFrag + c];
          if (splits > 1) {
            atomicAdd(G + i * d + j, v);
          } else {
            G[i * d + j] += v;
          }
        }
      }
      __syncwarp();
    }
  }
#endif
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
                             const int64_t* row_index, int64_t n_rows, int sm_count, GramCudaPath path,
                             cudaStream_t stream) {
  if (d <= 0 || n_rows <= 0) return cudaSuccess;
  if (path == GramCudaPath::TensorCore && dt != DType::F32) {
    namespace wl = wmma_layout;
    const int64_t nb = ceil_div(d, wl::kTile);
    const int64_t tiles = triangle_tile_count(nb);
    const int64_t splits = gram_row_splits(tiles, n_rows, sm_count, 2 * wl::kK, 65535);
    if (tiles > 0x7fffffffLL) return cudaErrorInvalidValue;
    dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
    const uint16_t* x = static_cast<const uint16_t*>(X);
    if (dt == DType::BF16) {
      gram_wmma_kernel<__nv_bfloat16><<<grid, wl::kThreads, 0, stream>>>(G, d, x, ldx, row_index, n_rows, nb, splits);
    } else {
      gram_wmma_kernel<__half><<<grid, wl::kThreads, 0, stream>>>(G, d, x, ldx, row_index, n_rows, nb, splits);
    }
    return cudaGetLastError();
  }
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
