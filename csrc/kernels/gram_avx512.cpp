// triu(G) += X^T X on AVX-512 CPUs, by our own micro-kernels: vdpbf16ps for bf16 X (AVX512-BF16),
// FMA for fp32 and fp16 X (AVX-512F).
//
// Columns of X are packed into one buffer that serves both operands of X^T X, one 32-bit word per
// column and step of the reduction:
//   P[b][s][c] = the word of column b * kPanel + c at step s  (panel-major, zero past d)
// bf16: a step is a pair of rows, 2s and 2s+1, packed interleaved (low half row 2s, high half row 2s+1;
// an odd last row is paired with zeros), because vdpbf16ps multiplies 16 pairs of bf16 values and adds
// each pair's two products to one fp32 lane. fp32/fp16: a step is one row, widened to fp32 (exact).
// A micro-tile of kMR rows i x kNV * 16 columns j of G keeps its sums in kMR * kNV registers over all
// kSubSteps steps: per step, kNV vector loads (columns j), kMR broadcasts (the word of column i) and
// kMR * kNV vdpbf16ps / FMAs. Tiles of kPanel x kPanel on or above the diagonal are shared out over the
// threads; in the diagonal tiles micro-tiles wholly below the diagonal are skipped, and stores are
// masked to j >= i and j < d.
#include "gram_avx512.h"

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "tiling.h"

#if defined(__x86_64__) && ((defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10) || \
                            (defined(__clang__) && __clang_major__ >= 9))
#define RF_AVX512_KERNELS 1
#include <immintrin.h>
#define RF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define RF_TARGET_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define RF_AVX512_KERNELS 0
#endif

namespace regmean_fast {
namespace kernels {

#if RF_AVX512_KERNELS

namespace {

constexpr int kMR = 8;                // rows of G per micro-tile (broadcast operand)
constexpr int kNV = 3;                // 16-column vectors per micro-tile
constexpr int kNR = 16 * kNV;         // columns of G per micro-tile
constexpr int64_t kPanel = 96;        // panel width = tile side; a multiple of kMR and kNR
constexpr int64_t kSubSteps = 256;    // steps a micro-tile sums in registers before adding into G
static_assert(kPanel % kMR == 0 && kPanel % kNR == 0 && kPanel % 16 == 0, "panel must hold whole micro-tiles");

template <typename T>
inline T* panel(T* P, int64_t b, int64_t ns) { return P + b * ns * kPanel; }

// The lanes of columns [col, col + 16) inside the matrix.
inline __mmask16 column_mask(int64_t col, int64_t d) { return static_cast<__mmask16>(triangle_lane_mask(0, col, d)); }

// Panel b of the block starting at X, nr rows (ns steps), packed. Kind: 0 bf16 pairs, 1 fp32, 2 fp16.
RF_TARGET_AVX512 void pack_panel(const void* X, int kind, int64_t ldx, int64_t nr, int64_t d, int64_t ns,
                                 int64_t b, uint32_t* P) {
  for (int64_t s = 0; s < ns; ++s) {
    uint32_t* dst = panel(P, b, ns) + s * kPanel;
    for (int64_t c = 0; c < kPanel; c += 16) {
      const int64_t col = b * kPanel + c;
      const __mmask16 m = column_mask(col, d);
      __m512i word;
      if (kind == 1) {
        word = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, static_cast<const float*>(X) + s * ldx + col));
      } else if (kind == 2) {
        const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(X) + s * ldx + col);
        word = _mm512_castps_si512(_mm512_maskz_cvtph_ps(0xffff, h));  // exact
      } else {
        // The maskz forms with every lane set: the plain ones trip GCC 12's -Wmaybe-uninitialized.
        const uint16_t* r0 = static_cast<const uint16_t*>(X) + 2 * s * ldx + col;
        word = _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_maskz_loadu_epi16(m, r0));
        if (2 * s + 1 < nr) {
          const __m512i hi = _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_maskz_loadu_epi16(m, r0 + ldx));
          word = _mm512_or_si512(word, _mm512_maskz_slli_epi32(0xffff, hi, 16));
        }
      }
      _mm512_storeu_si512(dst + c, word);
    }
  }
}

// G[i0 + r, j0 + 16 v + k] += acc[r][v][k] for the entries the upper triangle owns inside the matrix.
RF_TARGET_AVX512 inline void store_tile(const __m512 (&acc)[kMR][kNV], float* G, int64_t d, int64_t i0, int64_t j0) {
  for (int r = 0; r < kMR; ++r) {
    const int64_t i = i0 + r;
    if (i >= d) break;
    float* g = G + i * d;
    for (int v = 0; v < kNV; ++v) {
      const int64_t j = j0 + 16 * v;
      const __mmask16 m = static_cast<__mmask16>(triangle_lane_mask(i, j, d));
      if (m) _mm512_mask_storeu_ps(g + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, g + j), acc[r][v]));
    }
  }
}

// The micro-tile whose rows are the words at a (column i0 of its panel) and whose columns are the words
// at b, over ns steps, added into G. bf16 pairs through vdpbf16ps:
RF_TARGET_AVX512BF16 void micro_tile_bf16(const uint32_t* a, const uint32_t* b, int64_t ns, float* G, int64_t d,
                                          int64_t i0, int64_t j0) {
  __m512 acc[kMR][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t s = 0; s < ns; ++s) {
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
  store_tile(acc, G, d, i0, j0);
}

// ... and fp32 words through FMA.
RF_TARGET_AVX512 void micro_tile_f32(const uint32_t* a, const uint32_t* b, int64_t ns, float* G, int64_t d,
                                     int64_t i0, int64_t j0) {
  const float* af = reinterpret_cast<const float*>(a);
  const float* bf = reinterpret_cast<const float*>(b);
  __m512 acc[kMR][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t s = 0; s < ns; ++s) {
    __m512 bv[kNV];
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) bv[v] = _mm512_loadu_ps(bf + v * 16);
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const __m512 av = _mm512_set1_ps(af[r]);
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
    af += kPanel;
    bf += kPanel;
  }
  store_tile(acc, G, d, i0, j0);
}

using MicroTile = void (*)(const uint32_t*, const uint32_t*, int64_t, float*, int64_t, int64_t, int64_t);

// Tile (bi, bj), bi <= bj, over the ns steps of the packed block, kSubSteps at a time (so that the
// tile's two panels of those steps stay in L2 while its micro-tiles take turns).
void tile_update(MicroTile micro, float* G, int64_t d, const uint32_t* P, int64_t ns, int64_t bi, int64_t bj) {
  for (int64_t s0 = 0; s0 < ns; s0 += kSubSteps) {
    const int64_t n = std::min(kSubSteps, ns - s0);
    const uint32_t* pi = panel(P, bi, ns) + s0 * kPanel;
    const uint32_t* pj = panel(P, bj, ns) + s0 * kPanel;
    for (int64_t jc = 0; jc < kPanel; jc += kNR) {
      const int64_t j0 = bj * kPanel + jc;
      if (j0 >= d) break;
      for (int64_t ic = 0; ic < kPanel; ic += kMR) {
        const int64_t i0 = bi * kPanel + ic;
        if (i0 >= d || i0 >= j0 + kNR) break;  // past the edge, or wholly below the diagonal from here on
        micro(pi + ic, pj + jc, n, G, d, i0, j0);
      }
    }
  }
}

// kind: 0 bf16 pairs, 1 fp32, 2 fp16 (see pack_panel).
// Rows are packed in blocks of up to block_bytes of packed words (at least kSubSteps steps), each packed
// and computed in one parallel region.
void gram_update_avx512_impl(float* G, int64_t d, const void* X, int kind, int64_t rows, int64_t ldx,
                             const TaskRunner& runner, int64_t block_bytes) {
  if (d <= 0 || rows <= 0) return;
  const int64_t rows_per_step = kind == 0 ? 2 : 1;
  const int64_t es = kind == 1 ? 4 : 2;
  const MicroTile micro = kind == 0 ? micro_tile_bf16 : micro_tile_f32;
  const int64_t nb = ceil_div(d, kPanel);
  const int64_t block_steps = std::max(kSubSteps, block_bytes / (nb * kPanel * 4));
  const int64_t block_rows = block_steps * rows_per_step;
  const int64_t max_steps = ceil_div(std::min(block_rows, rows), rows_per_step);
  // Kept per calling thread: a fresh buffer costs its page faults on every call (~1 ms at d = 3072),
  // which is a tenth of an update at the statistics' few hundred rows.
  thread_local std::vector<uint32_t> buf;
  const size_t need = static_cast<size_t>(nb * kPanel * max_steps);
  if (buf.size() < need) buf.resize(need);
  uint32_t* P = buf.data();
  for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
    const int64_t nr = std::min(block_rows, rows - r0);
    const int64_t ns = ceil_div(nr, rows_per_step);
    const void* x = static_cast<const char*>(X) + r0 * ldx * es;
    // One parallel region per block, its work handed out one piece at a time rather than in the
    // runner's fixed ranges: first the panels to pack, then the tiles, each tile waiting for its two
    // panels. On a machine whose cores are shared every region waits for its slowest thread to be
    // scheduled, and fixed ranges would leave a slowed thread's share to it (measured: 2x slower than
    // one thread alone on a loaded 2-core machine; a separate packing region cost 2x at d = 768).
    const int64_t ntiles = triangle_tile_count(nb);
    std::vector<std::atomic<bool>> packed(static_cast<size_t>(nb));
    for (auto& p : packed) p.store(false, std::memory_order_relaxed);
    std::atomic<int64_t> next_panel{0}, next_tile{0};
    runner.parallel_for(ntiles, [&](int64_t, int64_t) {
      for (int64_t b; (b = next_panel.fetch_add(1, std::memory_order_relaxed)) < nb;) {
        pack_panel(x, kind, ldx, nr, d, ns, b, P);
        packed[static_cast<size_t>(b)].store(true, std::memory_order_release);
      }
      for (int64_t t; (t = next_tile.fetch_add(1, std::memory_order_relaxed)) < ntiles;) {
        int64_t bi, bj;
        triangle_tile_coords(t, nb, &bi, &bj);
        // Another thread is packing them (every panel is claimed before any tile is).
        while (!packed[static_cast<size_t>(bi)].load(std::memory_order_acquire) ||
               !packed[static_cast<size_t>(bj)].load(std::memory_order_acquire))
          std::this_thread::yield();
        tile_update(micro, G, d, P, ns, bi, bj);
      }
    });
  }
}

}  // namespace

bool avx512_kernels_compiled() { return true; }

void gram_update_avx512bf16(float* G, int64_t d, const uint16_t* X, int64_t rows, int64_t ldx,
                            const TaskRunner& runner, int64_t block_bytes) {
  gram_update_avx512_impl(G, d, X, 0, rows, ldx, runner, block_bytes);
}

void gram_update_avx512f32(float* G, int64_t d, const void* X, DType dt, int64_t rows, int64_t ldx,
                           const TaskRunner& runner, int64_t block_bytes) {
  gram_update_avx512_impl(G, d, X, dt == DType::F16 ? 2 : 1, rows, ldx, runner, block_bytes);
}

#else  // no compiler support: the dispatcher never selects these paths

bool avx512_kernels_compiled() { return false; }

void gram_update_avx512bf16(float*, int64_t, const uint16_t*, int64_t, int64_t, const TaskRunner&, int64_t) {}

void gram_update_avx512f32(float*, int64_t, const void*, DType, int64_t, int64_t, const TaskRunner&, int64_t) {}

#endif

}  // namespace kernels
}  // namespace regmean_fast
