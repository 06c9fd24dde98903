#include "axpy_cpu.h"

#include <algorithm>

#include "tiling.h"

namespace regmean_fast {
namespace kernels {

namespace {

// The widening as a template parameter, so that each loop is branch-free and vectorises.
struct WidenF32 {
  static float at(const void* x, int64_t j) { return static_cast<const float*>(x)[j]; }
};
struct WidenBF16 {
  static float at(const void* x, int64_t j) { return bf16_bits_to_float(static_cast<const uint16_t*>(x)[j]); }
};
struct WidenF16 {
  static float at(const void* x, int64_t j) { return f16_bits_to_float(static_cast<const uint16_t*>(x)[j]); }
};

// GCC contracts c * x + acc into an FMA across statements under -std=gnu++17 (CMake) but not -std=c++17
// (setup.py): off here, so that both builds round the same way. (Clang contracts within an expression only.)
#if defined(__GNUC__) && !defined(__clang__)
#define RF_NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define RF_NO_FP_CONTRACT
#endif

template <typename Widen>
RF_NO_FP_CONTRACT void scaled_add_range(float* acc, const void* x, int64_t b, int64_t e, float c, bool assign) {
  if (assign) {
    for (int64_t j = b; j < e; ++j) acc[j] = c * Widen::at(x, j);
  } else {
    for (int64_t j = b; j < e; ++j) {
      const float p = c * Widen::at(x, j);
      acc[j] = acc[j] + p;
    }
  }
}

}  // namespace

void scaled_add_cpu(float* acc, const void* x, DType dt, int64_t n, float c, bool assign, const TaskRunner& runner) {
  constexpr int64_t kChunk = int64_t(1) << 16;
  runner.parallel_for(ceil_div(n, kChunk), [&](int64_t cb, int64_t ce) {
    const int64_t b = cb * kChunk, e = std::min(n, ce * kChunk);
    switch (dt) {
      case DType::BF16: scaled_add_range<WidenBF16>(acc, x, b, e, c, assign); break;
      case DType::F16: scaled_add_range<WidenF16>(acc, x, b, e, c, assign); break;
      default: scaled_add_range<WidenF32>(acc, x, b, e, c, assign); break;
    }
  });
}

}  // namespace kernels
}  // namespace regmean_fast
