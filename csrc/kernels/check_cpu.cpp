#include "check_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "tiling.h"

namespace regmean_fast {
namespace kernels {

namespace {

template <typename Bits, Bits kExpMask>
bool range_finite(const Bits* x, int64_t b, int64_t e) {
  // Branch-free inner loop over blocks (vectorises); early exit between blocks.
  constexpr int64_t kBlock = 4096;
  for (int64_t s = b; s < e; s += kBlock) {
    const int64_t t = std::min(e, s + kBlock);
    Bits bad = 0;
    for (int64_t i = s; i < t; ++i) bad |= static_cast<Bits>((x[i] & kExpMask) == kExpMask);
    if (bad) return false;
  }
  return true;
}

}  // namespace

bool all_finite_cpu(const void* x, DType dt, int64_t n, const TaskRunner& runner) {
  // Whole chunks per task: a small tensor (a norm, a bias) stays on one thread, where waking the pool
  // would cost more than the scan (and far more when another process holds a core).
  constexpr int64_t kChunk = int64_t(1) << 16;
  std::atomic<bool> ok{true};
  runner.parallel_for(ceil_div(n, kChunk), [&](int64_t cb, int64_t ce) {
    const int64_t b = cb * kChunk, e = std::min(n, ce * kChunk);
    bool r;
    switch (dt) {
      case DType::F32: r = range_finite<uint32_t, 0x7f800000u>(static_cast<const uint32_t*>(x), b, e); break;
      case DType::BF16: r = range_finite<uint16_t, 0x7f80u>(static_cast<const uint16_t*>(x), b, e); break;
      default: r = range_finite<uint16_t, 0x7c00u>(static_cast<const uint16_t*>(x), b, e); break;
    }
    if (!r) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

namespace {

constexpr int64_t kPairTile = 64;

inline bool finite_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & 0x7f800000u) != 0x7f800000u;
}

}  // namespace

// Per tile pair (bi <= bj): the lower tile is transposed into a local buffer (so the comparison runs
// with unit stride, cache-resident) and compared with the upper tile read straight from G.
SymmetryStats symmetry_stats_cpu(const float* G, int64_t d, const TaskRunner& runner) {
  constexpr int64_t T = kPairTile;
  const int64_t nb = ceil_div(d, T);
  SymmetryStats total{true, 0.0f, 0.0f, std::numeric_limits<float>::infinity()};
  std::mutex mu;
  runner.parallel_for(triangle_tile_count(nb), [&](int64_t tb, int64_t te) {
    std::vector<float> lo(static_cast<size_t>(T * T));  // lo[a * T + b] = G[j0 + b, i0 + a]
    bool finite = true;
    float max_abs = 0.0f, max_asym = 0.0f, min_diag = std::numeric_limits<float>::infinity();
    for (int64_t t = tb; t < te; ++t) {
      int64_t bi, bj;
      triangle_tile_coords(t, nb, &bi, &bj);
      const int64_t i0 = bi * T, wi = block_extent(bi, T, d);
      const int64_t j0 = bj * T, wj = block_extent(bj, T, d);
      for (int64_t b = 0; b < wj; ++b) {
        const float* row = G + (j0 + b) * d + i0;
        for (int64_t a = 0; a < wi; ++a) lo[a * T + b] = row[a];
      }
      // Branch-free, so it vectorises (the max reductions need the simd pragma: -fopenmp-simd); a pair
      // with a non-finite member is left out of the numbers.
      uint32_t bad = 0;
      for (int64_t a = 0; a < wi; ++a) {
        const float* u = G + (i0 + a) * d + j0;
        const float* l = lo.data() + a * T;
#pragma omp simd reduction(| : bad) reduction(max : max_abs, max_asym)
        for (int64_t b = 0; b < wj; ++b) {
          const bool ok = finite_bits(u[b]) && finite_bits(l[b]);
          bad |= !ok;
          const float au = ok ? std::fabs(u[b]) : 0.0f, al = ok ? std::fabs(l[b]) : 0.0f;
          const float df = ok ? std::fabs(u[b] - l[b]) : 0.0f;
          max_abs = std::max(max_abs, std::max(au, al));
          max_asym = std::max(max_asym, df);
        }
      }
      finite = finite && !bad;
      if (bi == bj) {
        for (int64_t a = 0; a < wi; ++a) {
          const float g = G[(i0 + a) * d + i0 + a];
          if (finite_bits(g)) min_diag = std::min(min_diag, g);
        }
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    total.finite = total.finite && finite;
    total.max_abs = std::max(total.max_abs, max_abs);
    total.max_asym = std::max(total.max_asym, max_asym);
    total.min_diag = std::min(total.min_diag, min_diag);
  });
  return total;
}

// The stats need G against G^T (tile pairs, read only); the outputs are written row by row, straight
// from G's rows, so every write streams (writing S's lower half as the transpose of its upper half
// made each row segment of A and of the three slices a separate page: latency-bound, 3x slower).
SymmetryStats gram_term_cpu(const float* G, int64_t d, double factor, double alpha, float* A, float* s_f32,
                            uint16_t* s_bf16, const TaskRunner& runner) {
  const SymmetryStats stats = symmetry_stats_cpu(G, d, runner);
  if (!A && !s_f32 && !s_bf16) return stats;
  const float off = static_cast<float>(factor * alpha);
  const float on = static_cast<float>(factor);  // diagonal: alpha + (1 - alpha) = 1
  runner.parallel_for(d, [&](int64_t rb, int64_t re) {
    std::vector<float> row(static_cast<size_t>(d));
    for (int64_t i = rb; i < re; ++i) {
      const float* g = G + i * d;
      for (int64_t j = 0; j < d; ++j) row[j] = off * g[j];
      row[i] = on * g[i];
      if (A) {
        float* a = A + i * d;
        for (int64_t j = i; j < d; ++j) a[j] += row[j];
      }
      if (s_f32) std::memcpy(s_f32 + i * d, row.data(), static_cast<size_t>(d) * sizeof(float));
      if (s_bf16) {
        uint16_t* p = s_bf16 + i * d;
        for (int64_t j = 0; j < d; ++j) split_bf16x3(row[j], p + j, d * d);
      }
    }
  });
  return stats;
}

}  // namespace kernels
}  // namespace regmean_fast
