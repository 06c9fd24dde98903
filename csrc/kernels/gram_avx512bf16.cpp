// triu(G) += X^T X for bf16 X on AVX512-BF16, without AMX.
//
// vdpbf16ps multiplies 16 pairs of bf16 values and adds each pair's two products to one fp32 lane, so
// two rows of X are consumed at once: rows 2p and 2p+1 are packed interleaved, one 32-bit word per
// column (low half row 2p, high half row 2p+1; an odd last row is paired with zeros). One packed
// buffer serves both operands of X^T X:
//   P[b][p][c] = the word of column b * kPanel + c for the pair p  (panel-major, zero past d)
// A micro-tile of kMR rows i x kNV * 16 columns j of G keeps its sums in kMR * kNV registers over all
// pairs of a chunk: per pair, kNV vector loads (columns j), kMR broadcasts (the word of column i) and
// kMR * kNV vdpbf16ps. Tiles of kPanel x kPanel on or above the diagonal are shared out over the
// threads; in the diagonal tiles micro-tiles wholly below the diagonal are skipped, and stores are
// masked to j >= i and j < d.
#include "gram_avx512bf16.h"

#include <algorithm>
#include <atomic>
#include <vector>

#include "tiling.h"

#if defined(__x86_64__) && ((defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10) || \
                            (defined(__clang__) && __clang_major__ >= 9))
#define RF_AVX512BF16_KERNEL 1
#include <immintrin.h>
#define RF_TARGET_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define RF_AVX512BF16_KERNEL 0
#endif

namespace regmean_fast {
namespace kernels {

#if RF_AVX512BF16_KERNEL

namespace {

constexpr int kMR = 8;                 // rows of G per micro-tile (broadcast operand)
constexpr int kNV = 3;                 // 16-column vectors per micro-tile
constexpr int kNR = 16 * kNV;          // columns of G per micro-tile
constexpr int64_t kPanel = 96;         // panel width = tile side; a multiple of kMR and kNR
constexpr int64_t kChunkPairs = 256;   // row pairs packed at a time (512 rows of X)
static_assert(kPanel % kMR == 0 && kPanel % kNR == 0 && kPanel % 16 == 0, "panel must hold whole micro-tiles");

inline uint32_t* panel(uint32_t* P, int64_t b, int64_t np) { return P + b * np * kPanel; }

// Pairs [pb, pe) of the chunk of nr rows starting at X, into the packed panels.
RF_TARGET_AVX512BF16 void pack_pairs(const uint16_t* X, int64_t ldx, int64_t nr, int64_t d, int64_t nb,
                                     int64_t np, int64_t pb, int64_t pe, uint32_t* P) {
  for (int64_t p = pb; p < pe; ++p) {
    const uint16_t* r0 = X + 2 * p * ldx;
    const uint16_t* r1 = 2 * p + 1 < nr ? r0 + ldx : nullptr;
    for (int64_t b = 0; b < nb; ++b) {
      uint32_t* dst = panel(P, b, np) + p * kPanel;
      for (int64_t c = 0; c < kPanel; c += 16) {
        const int64_t col = b * kPanel + c;
        const __mmask16 m = static_cast<__mmask16>(triangle_lane_mask(0, col, d));
        // The maskz forms with every lane set: the plain ones trip GCC 12's -Wmaybe-uninitialized.
        __m512i word = _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_maskz_loadu_epi16(m, r0 + col));
        if (r1) {
          const __m512i hi = _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_maskz_loadu_epi16(m, r1 + col));
          word = _mm512_or_si512(word, _mm512_maskz_slli_epi32(0xffff, hi, 16));
        }
        _mm512_storeu_si512(dst + c, word);
      }
    }
  }
}

// The kMR x kNR sums of the micro-tile whose rows are the words at a (column i0 of its panel) and
// whose columns are the words at b, over np pairs; added into G under the triangle/edge mask.
RF_TARGET_AVX512BF16 void micro_tile(const uint32_t* a, const uint32_t* b, int64_t np, float* G, int64_t d,
                                     int64_t i0, int64_t j0) {
  __m512 acc[kMR][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < np; ++p) {
    __m512bh bv[kNV];
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + v * 16);
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r]));
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
    a += kPanel;
    b += kPanel;
  }
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) {
    const int64_t i = i0 + r;
    if (i >= d) break;
    float* g = G + i * d;
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) {
      const int64_t j = j0 + 16 * v;
      const __mmask16 m = static_cast<__mmask16>(triangle_lane_mask(i, j, d));
      if (m) _mm512_mask_storeu_ps(g + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, g + j), acc[r][v]));
    }
  }
}

// Tile (bi, bj), bi <= bj, over the np pairs of the packed chunk.
RF_TARGET_AVX512BF16 void tile_update(float* G, int64_t d, uint32_t* P, int64_t np, int64_t bi, int64_t bj) {
  const uint32_t* pi = panel(P, bi, np);
  const uint32_t* pj = panel(P, bj, np);
  for (int64_t jc = 0; jc < kPanel; jc += kNR) {
    const int64_t j0 = bj * kPanel + jc;
    if (j0 >= d) break;
    for (int64_t ic = 0; ic < kPanel; ic += kMR) {
      const int64_t i0 = bi * kPanel + ic;
      if (i0 >= d || i0 >= j0 + kNR) break;  // past the edge, or wholly below the diagonal from here on
      micro_tile(pi + ic, pj + jc, np, G, d, i0, j0);
    }
  }
}

}  // namespace

bool avx512bf16_kernel_compiled() { return true; }

void gram_update_avx512bf16(float* G, int64_t d, const uint16_t* X, int64_t rows, int64_t ldx,
                            const TaskRunner& runner) {
  if (d <= 0 || rows <= 0) return;
  const int64_t nb = ceil_div(d, kPanel);
  const int64_t max_pairs = std::min(kChunkPairs, ceil_div(rows, 2));
  // Kept per calling thread: a fresh buffer costs its page faults on every call (~1 ms at d = 3072),
  // which is a tenth of an update at the statistics' few hundred rows.
  thread_local std::vector<uint32_t> buf;
  const size_t need = static_cast<size_t>(nb * kPanel * max_pairs);
  if (buf.size() < need) buf.resize(need);
  uint32_t* P = buf.data();
  for (int64_t r0 = 0; r0 < rows; r0 += 2 * kChunkPairs) {
    const int64_t nr = std::min(2 * kChunkPairs, rows - r0);
    const int64_t np = ceil_div(nr, 2);
    const uint16_t* x = X + r0 * ldx;
    runner.parallel_for(np, [&](int64_t pb, int64_t pe) { pack_pairs(x, ldx, nr, d, nb, np, pb, pe, P); });
    // Tiles are handed out one at a time rather than in the runner's fixed ranges: on a machine whose
    // cores are shared, one slowed thread would otherwise hold every other one at the end of the chunk
    // (measured 2x slower than one thread alone on a loaded 2-core machine).
    const int64_t ntiles = triangle_tile_count(nb);
    std::atomic<int64_t> next{0};
    runner.parallel_for(ntiles, [&](int64_t, int64_t) {
      for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < ntiles;) {
        int64_t bi, bj;
        triangle_tile_coords(t, nb, &bi, &bj);
        tile_update(G, d, P, np, bi, bj);
      }
    });
  }
}

#else  // no compiler support: the dispatcher never selects the path

bool avx512bf16_kernel_compiled() { return false; }

void gram_update_avx512bf16(float*, int64_t, const uint16_t*, int64_t, int64_t, const TaskRunner&) {}

#endif

}  // namespace kernels
}  // namespace regmean_fast
