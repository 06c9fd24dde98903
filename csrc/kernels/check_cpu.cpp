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
  std::atomic<bool> ok{true};
  runner.parallel_for(n, [&](int64_t b, int64_t e) {
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

struct TermOutputs {
  float* A;
  float* s_f32;
  uint16_t* s_bf16;
  int64_t plane;  // d * d: the distance between the bf16 slices
};

// w values of S starting at (r, c) into every requested output.
inline void put_row(const TermOutputs& o, int64_t d, int64_t r, int64_t c, const float* s, int64_t w) {
  const int64_t base = r * d + c;
  if (o.A) {
    float* a = o.A + base;
    for (int64_t j = 0; j < w; ++j) a[j] += s[j];
  }
  if (o.s_f32) std::memcpy(o.s_f32 + base, s, static_cast<size_t>(w) * sizeof(float));
  if (o.s_bf16) {
    uint16_t* p = o.s_bf16 + base;
    for (int64_t j = 0; j < w; ++j) split_bf16x3(s[j], p + j, o.plane);
  }
}

}  // namespace

SymmetryStats symmetry_stats_cpu(const float* G, int64_t d, const TaskRunner& runner) {
  return gram_term_cpu(G, d, 1.0, 1.0, nullptr, nullptr, nullptr, runner);
}

// Per tile pair (bi <= bj): the upper tile and the transposed lower tile are copied into local
// buffers (so the comparison and everything after it run with unit stride, cache-resident), the
// stats are updated, and S's upper tile is written to both halves of the outputs.
SymmetryStats gram_term_cpu(const float* G, int64_t d, double factor, double alpha, float* A, float* s_f32,
                            uint16_t* s_bf16, const TaskRunner& runner) {
  constexpr int64_t T = kPairTile;
  const int64_t nb = ceil_div(d, T);
  const float off = static_cast<float>(factor * alpha);
  const float on = static_cast<float>(factor);  // diagonal: alpha + (1 - alpha) = 1
  const TermOutputs out{A, s_f32, s_bf16, d * d};
  const bool want = A || s_f32 || s_bf16;
  SymmetryStats total{true, 0.0f, 0.0f, std::numeric_limits<float>::infinity()};
  std::mutex mu;
  runner.parallel_for(triangle_tile_count(nb), [&](int64_t tb, int64_t te) {
    std::vector<float> buf(static_cast<size_t>(3 * T * T));
    float* up = buf.data();  // up[a * T + b] = G[i0 + a, j0 + b]
    float* lo = up + T * T;  // lo[a * T + b] = G[j0 + b, i0 + a]; later S's lower tile
    float* st = lo + T * T;  // st[a * T + b] = S[i0 + a, j0 + b]
    bool finite = true;
    float max_abs = 0.0f, max_asym = 0.0f, min_diag = std::numeric_limits<float>::infinity();
    for (int64_t t = tb; t < te; ++t) {
      int64_t bi, bj;
      triangle_tile_coords(t, nb, &bi, &bj);
      const int64_t i0 = bi * T, wi = block_extent(bi, T, d);
      const int64_t j0 = bj * T, wj = block_extent(bj, T, d);
      for (int64_t a = 0; a < wi; ++a) std::memcpy(up + a * T, G + (i0 + a) * d + j0, static_cast<size_t>(wj) * sizeof(float));
      for (int64_t b = 0; b < wj; ++b) {
        const float* row = G + (j0 + b) * d + i0;
        for (int64_t a = 0; a < wi; ++a) lo[a * T + b] = row[a];
      }
      // Branch-free, so it vectorises (the max reductions need the simd pragma: -fopenmp-simd); a pair
      // with a non-finite member is left out of the numbers.
      uint32_t bad = 0;
      for (int64_t a = 0; a < wi; ++a) {
        const float* u = up + a * T;
        const float* l = lo + a * T;
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
        for (int64_t a = 0; a < wi; ++a)
          if (finite_bits(up[a * T + a])) min_diag = std::min(min_diag, up[a * T + a]);
      }
      if (!want) continue;
      for (int64_t a = 0; a < wi; ++a)
        for (int64_t b = 0; b < wj; ++b) st[a * T + b] = off * up[a * T + b];
      if (bi == bj) {
        for (int64_t a = 0; a < wi; ++a) {
          st[a * T + a] = on * up[a * T + a];
          for (int64_t b = 0; b < a; ++b) st[a * T + b] = st[b * T + a];  // S from G's upper triangle only
        }
      }
      for (int64_t a = 0; a < wi; ++a) put_row(out, d, i0 + a, j0, st + a * T, wj);
      if (bi != bj) {
        for (int64_t b = 0; b < wj; ++b)
          for (int64_t a = 0; a < wi; ++a) lo[b * T + a] = st[a * T + b];
        for (int64_t b = 0; b < wj; ++b) put_row(out, d, j0 + b, i0, lo + b * T, wi);
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

}  // namespace kernels
}  // namespace regmean_fast
