// Index math of the tensor-core (WMMA) Gram kernel, as __host__ __device__ functions so the C++
// unit tests replay the kernel's block / warp / fragment tiling on the CPU and check that every
// (i <= j) element of a tile is stored by exactly one fragment element. No CUDA headers here.
#pragma once

#include <cstdint>

#include "../common.h"

namespace regmean_fast {
namespace kernels {
namespace wmma_layout {

constexpr int kTile = 64;           // block tile: 64 x 64 outputs of G
constexpr int kK = 32;              // rows of X staged in shared memory per step
constexpr int kWarps = 4;           // 2 x 2 warps, each a 32 x 32 quadrant
constexpr int kThreads = kWarps * 32;
constexpr int kWarpTile = 32;
constexpr int kFrag = 16;           // WMMA m = n = k = 16
constexpr int kFragsPerWarp = kWarpTile / kFrag;  // 2 x 2 fragments per warp
constexpr int kLd = kTile + 8;      // shared-memory row stride (16-bit elements): a multiple of 8,
                                    // and 16 * kLd * 2 bytes is a multiple of 32 (WMMA alignment)
constexpr int kStageElems = kK * kLd;  // one staged operand: kK rows x kTile columns (padded)

// Row / column offset of warp w's 32 x 32 quadrant inside the block tile.
RF_HOST_DEVICE void warp_origin(int w, int* r, int* c) {
  *r = (w / 2) * kWarpTile;
  *c = (w % 2) * kWarpTile;
}

// Offset (elements) of staged element (row k of X, column m of the block) in shared memory.
// The staged operand is X[r0:r0+kK, c0:c0+kTile] row-major with stride kLd: as a WMMA operand it
// is A = X^T (col_major, ld kLd) for the left factor and B = X (row_major, ld kLd) for the right.
RF_HOST_DEVICE int stage_offset(int k, int m) { return k * kLd + m; }

// Staging: element e (0 <= e < kK * kTile) loaded by thread `tid` in iteration `it` is
// e = it * kThreads + tid; row e / kTile, column e % kTile (consecutive threads read consecutive
// columns of one row: coalesced).
constexpr int kStageIters = kK * kTile / kThreads;
RF_HOST_DEVICE void stage_element(int tid, int it, int* k, int* m) {
  const int e = it * kThreads + tid;
  *k = e / kTile;
  *m = e % kTile;
}

// A 16 x 16 fragment whose first element is (gi, gj) in G lies strictly below the diagonal (all
// i > j) exactly when gi >= gj + 16: it is neither computed nor stored.
RF_HOST_DEVICE bool fragment_strictly_lower(int64_t gi, int64_t gj) { return gi >= gj + kFrag; }

// Store of one fragment through a 16 x 16 fp32 scratch: lane `lane` handles element
// e = t * 32 + lane (t = 0..7), i.e. row e / 16 and column e % 16 of the fragment.
constexpr int kStoreIters = kFrag * kFrag / 32;
RF_HOST_DEVICE void store_element(int lane, int t, int* r, int* c) {
  const int e = t * 32 + lane;
  *r = e / kFrag;
  *c = e % kFrag;
}

// Whether G[i, j] is written: in bounds and on or above the diagonal.
RF_HOST_DEVICE bool store_mask(int64_t i, int64_t j, int64_t d) { return i < d && j < d && j >= i; }

}  // namespace wmma_layout
}  // namespace kernels
}  // namespace regmean_fast
