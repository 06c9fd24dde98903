#include "check_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>

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

SymmetryStats symmetry_stats_cpu(const float* G, int64_t d, const TaskRunner& runner) {
  constexpr int64_t kTile = 64;
  const int64_t nb = ceil_div(d, kTile);
  SymmetryStats total{true, 0.0f, 0.0f, std::numeric_limits<float>::infinity()};
  std::mutex mu;
  runner.parallel_for(triangle_tile_count(nb), [&](int64_t tb, int64_t te) {
    SymmetryStats s{true, 0.0f, 0.0f, std::numeric_limits<float>::infinity()};
    for (int64_t t = tb; t < te; ++t) {
      int64_t bi, bj;
      triangle_tile_coords(t, nb, &bi, &bj);
      const int64_t i0 = bi * kTile, iend = std::min(i0 + kTile, d);
      const int64_t j0 = bj * kTile, jend = std::min(j0 + kTile, d);
      for (int64_t i = i0; i < iend; ++i) {
        for (int64_t j = std::max(j0, i); j < jend; ++j) {
          const float a = G[i * d + j], b = G[j * d + i];
          if (!std::isfinite(a) || !std::isfinite(b)) {
            s.finite = false;
            continue;
          }
          s.max_abs = std::max(s.max_abs, std::max(std::fabs(a), std::fabs(b)));
          s.max_asym = std::max(s.max_asym, std::fabs(a - b));
          if (i == j) s.min_diag = std::min(s.min_diag, a);
        }
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    total.finite = total.finite && s.finite;
    total.max_abs = std::max(total.max_abs, s.max_abs);
    total.max_asym = std::max(total.max_asym, s.max_asym);
    total.min_diag = std::min(total.min_diag, s.min_diag);
  });
  return total;
}

}  // namespace kernels
}  // namespace regmean_fast
