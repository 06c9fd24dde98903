// Index math shared by the CPU and CUDA kernels: triangular tile scheduling and row splitting.
// Everything is __host__ __device__ so the CPU unit tests check exactly what the GPU runs.
#pragma once

#include <cstdint>

#include "common.h"

namespace regmean_fast {
namespace kernels {

RF_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

RF_HOST_DEVICE int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Number of tiles on and above the diagonal of an nb x nb tile grid.
RF_HOST_DEVICE int64_t triangle_tile_count(int64_t nb) { return nb * (nb + 1) / 2; }

// Row-major enumeration of the upper triangle of an nb x nb grid:
// t = 0 -> (0,0), 1 -> (0,1), ..., nb-1 -> (0,nb-1), nb -> (1,1), ...
// Row bi starts at offset(bi) = bi*nb - bi*(bi-1)/2.
RF_HOST_DEVICE int64_t triangle_row_offset(int64_t bi, int64_t nb) { return bi * nb - bi * (bi - 1) / 2; }

// Inverse of the enumeration above. An integer search over rows keeps it exact for any nb (a
// closed form through sqrt loses exactness past 2^26 tiles); O(log nb) per call.
RF_HOST_DEVICE void triangle_tile_coords(int64_t t, int64_t nb, int64_t* bi, int64_t* bj) {
  int64_t lo = 0, hi = nb - 1;  // find the largest row whose offset is <= t
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (triangle_row_offset(mid, nb) <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  *bi = lo;
  *bj = lo + (t - triangle_row_offset(lo, nb));
}

// Extent of block b of size `tile` in a dimension of length n (the last block may be short).
RF_HOST_DEVICE int64_t block_extent(int64_t b, int64_t tile, int64_t n) {
  const int64_t rest = n - b * tile;
  return rest < tile ? (rest > 0 ? rest : 0) : tile;
}

// The lanes of a 16-wide vector holding columns [j, j + 16) of row i that the upper triangle of a
// d x d matrix owns: bit k set when i <= j + k < d. (With i = 0: the columns inside the matrix.)
RF_HOST_DEVICE uint32_t triangle_lane_mask(int64_t i, int64_t j, int64_t d) {
  const int64_t lo = i > j ? i - j : 0;
  const int64_t hi = d - j < 16 ? d - j : 16;
  if (hi <= lo) return 0;
  return ((uint32_t(1) << hi) - 1u) & ~((uint32_t(1) << lo) - 1u);
}

// Split n rows into `parts` near-equal contiguous ranges; range p is [*begin, *end).
RF_HOST_DEVICE void split_range(int64_t n, int64_t parts, int64_t p, int64_t* begin, int64_t* end) {
  const int64_t base = n / parts, extra = n % parts;
  *begin = p * base + (p < extra ? p : extra);
  *end = *begin + base + (p < extra ? 1 : 0);
}

// Row splits for a Gram launch with `tiles` blocks per split: enough blocks to cover about twice
// `sm_count` SMs, never fewer than `min_rows` rows per split, at most `max_splits`.
RF_HOST_DEVICE int64_t gram_row_splits(int64_t tiles, int64_t rows, int64_t sm_count, int64_t min_rows,
                                       int64_t max_splits) {
  int64_t want = (2 * sm_count + tiles - 1) / tiles;
  if (want < 1) want = 1;
  int64_t cap = rows / min_rows;
  if (cap < 1) cap = 1;
  if (want > cap) want = cap;
  return want < max_splits ? want : max_splits;
}

}  // namespace kernels
}  // namespace regmean_fast
