#include "task_vectors_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_path.h"
#include "philox.h"
#include "tiling.h"

#if defined(__x86_64__) && ((defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10) || \
                            (defined(__clang__) && __clang_major__ >= 9))
#define RF_TV_AVX512 1
#include <immintrin.h>
// BMI2 (pdep) comes with every AVX-512 CPU (Intel Skylake-X and later, AMD Zen 4 and later).
#define RF_TARGET_AVX512_BMI2 __attribute__((target("avx512f,avx512bw,avx512vl,bmi2")))
#else
#define RF_TV_AVX512 0
#endif

namespace regmean_fast {
namespace kernels {

namespace {

constexpr int64_t kLanes = 64;             // Philox blocks drawn together (one block per SIMD lane)
constexpr int64_t kGroup = 4 * kLanes;     // entries per group of blocks
constexpr int64_t kDropChunk = 1 << 16;    // entries per task and per partial sum (a multiple of kGroup)
constexpr int kAcc = 8;                    // partial sums per chunk (vertical adds vectorise; fixed order)

// The keep factors (1 kept, 0 dropped: v * 1 is v, v * 0 is torch's drop) of entries [4 * first_block,
// 4 * first_block + kGroup) into keep: philox4x32_10 (philox.h, the one-block definition) written lane by
// lane so that the lanes vectorise.
void draw_group(uint64_t first_block, const uint32_t key[2], uint64_t threshold, float* keep) {
  // The words live in 64-bit lanes (always < 2^32): a product of two values masked to 32 bits is the idiom
  // compilers turn into the vector 32x32->64-bit multiply (pmuludq), where uint32 lanes widened for the
  // product become a full 64-bit multiply (several times slower).
  constexpr uint64_t kLow = 0xFFFFFFFFull;
  uint64_t w0[kLanes], w1[kLanes], w2[kLanes], w3[kLanes];
  const uint64_t key0 = key[0], key1 = key[1];
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) {
    const uint64_t b = first_block + static_cast<uint64_t>(l);
    uint64_t c0 = b & kLow, c1 = b >> 32, c2 = 0, c3 = 0;
    uint64_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = (c0 & kLow) * kPhiloxM0;
      const uint64_t p1 = (c2 & kLow) * kPhiloxM1;
      const uint64_t n0 = (p1 >> 32) ^ c1 ^ k0;
      const uint64_t n2 = (p0 >> 32) ^ c3 ^ k1;
      c1 = p1 & kLow;
      c3 = p0 & kLow;
      c0 = n0;
      c2 = n2;
      k0 = (k0 + kPhiloxW0) & kLow;  // (bumped after the last round too: unused then)
      k1 = (k1 + kPhiloxW1) & kLow;
    }
    w0[l] = c0;
    w1[l] = c1;
    w2[l] = c2;
    w3[l] = c3;
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    keep[4 * l + 0] = w0[l] < threshold ? 1.0f : 0.0f;
    keep[4 * l + 1] = w1[l] < threshold ? 1.0f : 0.0f;
    keep[4 * l + 2] = w2[l] < threshold ? 1.0f : 0.0f;
    keep[4 * l + 3] = w3[l] < threshold ? 1.0f : 0.0f;
  }
}

#if RF_TV_AVX512
// GCC 12's intrinsics pass an undefined vector through their masked builtins and then warn that it "may be
// used uninitialized" (GCC bug 105593, fixed in 13): not a defect of this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// (hi, lo) 32-bit halves of the 16 products a * m (m: the multiplier in the low half of each 64-bit lane):
// vpmuludq multiplies the even 32-bit lanes, so the odd ones are shifted down first.
RF_TARGET_AVX512_BMI2 inline void mulhilo16(__m512i a, __m512i m, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// The 8 floats of each half (AVX-512F only: _mm512_extractf32x8_ps would need AVX512DQ).
RF_TARGET_AVX512_BMI2 inline __m256 low_half(__m512 v) { return _mm512_castps512_ps256(v); }
RF_TARGET_AVX512_BMI2 inline __m256 high_half(__m512 v) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

// drop_range's groups of 64 entries (16 Philox blocks, one per 32-bit lane) from begin while whole ones fit
// before end; returns where it stopped. The L1 sums go into the same lanes (entry j into lane j % 8) in the
// same order as the portable loop's: the same bits.
RF_TARGET_AVX512_BMI2 int64_t drop_avx512(float* delta, int64_t begin, int64_t end, const uint32_t key[2],
                                          uint64_t threshold, double* acc_before, double* acc_after) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(threshold)));
  const bool keep_all = threshold > 0xFFFFFFFFull;
  const __m512 zero = _mm512_setzero_ps();
  __m512d sum_before = _mm512_loadu_pd(acc_before), sum_after = _mm512_loadu_pd(acc_after);
  int64_t g = begin;
  for (; g + 64 <= end; g += 64) {
    const uint64_t b0 = static_cast<uint64_t>(g / 4);
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(b0))), lane);
    __m512i c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(b0 >> 32)));
    c1 = _mm512_mask_add_epi32(c1, _mm512_cmplt_epu32_mask(c0, lane), c1, _mm512_set1_epi32(1));  // carry
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    uint32_t k0 = key[0], k1 = key[1];
    for (int r = 0; r < 10; ++r) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0, m0, &hi0, &lo0);
      mulhilo16(c2, m1, &hi1, &lo1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint64_t keep = ~0ull;  // bit e: entry g + e is kept (word e % 4 of lane e / 4)
    if (!keep_all) {
      keep = _pdep_u64(_mm512_cmplt_epu32_mask(c0, thr), 0x1111111111111111ull) |
             _pdep_u64(_mm512_cmplt_epu32_mask(c1, thr), 0x2222222222222222ull) |
             _pdep_u64(_mm512_cmplt_epu32_mask(c2, thr), 0x4444444444444444ull) |
             _pdep_u64(_mm512_cmplt_epu32_mask(c3, thr), 0x8888888888888888ull);
    }
    for (int q = 0; q < 4; ++q) {
      float* x = delta + g + 16 * q;
      const __m512 v = _mm512_loadu_ps(x);
      const __mmask16 drop = static_cast<__mmask16>(~(keep >> (16 * q)));
      const __m512 kept = _mm512_mask_mul_ps(v, drop, v, zero);  // v * 0, as torch's mul by a bool mask
      _mm512_storeu_ps(x, kept);
      sum_before = _mm512_add_pd(sum_before, _mm512_abs_pd(_mm512_cvtps_pd(low_half(v))));
      sum_before = _mm512_add_pd(sum_before, _mm512_abs_pd(_mm512_cvtps_pd(high_half(v))));
      sum_after = _mm512_add_pd(sum_after, _mm512_abs_pd(_mm512_cvtps_pd(low_half(kept))));
      sum_after = _mm512_add_pd(sum_after, _mm512_abs_pd(_mm512_cvtps_pd(high_half(kept))));
    }
  }
  _mm512_storeu_pd(acc_before, sum_before);
  _mm512_storeu_pd(acc_after, sum_after);
  return g;
}
#pragma GCC diagnostic pop
#endif

// Drops entries [begin, end) of delta (begin a multiple of kGroup); returns their L1 before and after.
void drop_range(float* delta, int64_t begin, int64_t end, const uint32_t key[2], uint64_t threshold,
                bool avx512, double* before, double* after) {
  double acc_before[kAcc] = {}, acc_after[kAcc] = {};  // entry j into lane j % kAcc, in order
  int64_t g = begin;
#if RF_TV_AVX512
  if (avx512) g = drop_avx512(delta, begin, end, key, threshold, acc_before, acc_after);
#endif
  float keep[kGroup];
  for (; g < end; g += kGroup) {
    draw_group(static_cast<uint64_t>(g / 4), key, threshold, keep);
    float* x = delta + g;
    const int64_t m = std::min(kGroup, end - g);
    if (m == kGroup) {
      for (int64_t e = 0; e < kGroup; e += kAcc) {
        for (int k = 0; k < kAcc; ++k) {
          const float v = x[e + k];
          const float kept = v * keep[e + k];
          acc_before[k] += std::fabs(static_cast<double>(v));
          acc_after[k] += std::fabs(static_cast<double>(kept));
          x[e + k] = kept;
        }
      }
    } else {
      for (int64_t e = 0; e < m; ++e) {
        const float v = x[e];
        const float kept = v * keep[e];
        acc_before[e % kAcc] += std::fabs(static_cast<double>(v));
        acc_after[e % kAcc] += std::fabs(static_cast<double>(kept));
        x[e] = kept;
      }
    }
  }
  double b = 0.0, a = 0.0;
  for (int k = 0; k < kAcc; ++k) {
    b += acc_before[k];
    a += acc_after[k];
  }
  *before = b;
  *after = a;
}

}  // namespace

bool dare_drop_avx512_compiled() { return RF_TV_AVX512 != 0; }

void dare_drop_cpu(float* delta, int64_t n, const uint32_t key[2], uint64_t threshold, double l1[2],
                   const TaskRunner& runner, bool allow_avx512) {
  const bool avx512 = allow_avx512 && RF_TV_AVX512 && cpu_features().avx512;
  const int64_t chunks = ceil_div(n, kDropChunk);
  std::vector<double> sums(static_cast<size_t>(2 * chunks), 0.0);
  runner.parallel_for(chunks, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      drop_range(delta, c * kDropChunk, std::min(n, (c + 1) * kDropChunk), key, threshold, avx512,
                 &sums[2 * c], &sums[2 * c + 1]);
    }
  });
  l1[0] = 0.0;
  l1[1] = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {  // in chunk order: the same sum on any number of threads
    l1[0] += sums[2 * c];
    l1[1] += sums[2 * c + 1];
  }
}

namespace {

inline uint32_t magnitude_bits(float v) { return float_bits(v) & 0x7FFFFFFFu; }

// hist[d] = how many entries have (bits >> shift) & mask == d among those whose bits >> (shift + width) equal
// prefix (width: the digit's width; prefix ignored when shift + width == 31). Per-task histograms, then summed.
void magnitude_histogram(const float* x, int64_t n, int shift, int width, uint32_t prefix, std::vector<int64_t>& hist,
                         const TaskRunner& runner) {
  constexpr int64_t kChunk = int64_t(1) << 20;
  const int64_t chunks = ceil_div(n, kChunk);
  const size_t bins = size_t(1) << width;
  const uint32_t mask = static_cast<uint32_t>(bins - 1);
  const bool filtered = shift + width < 31;
  std::vector<std::vector<int64_t>> parts(static_cast<size_t>(chunks));
  runner.parallel_for(chunks, [&](int64_t cb, int64_t ce) {
    std::vector<uint32_t> local(bins, 0);  // a chunk's counts fit 32 bits
    for (int64_t c = cb; c < ce; ++c) {
      std::fill(local.begin(), local.end(), 0u);
      const int64_t b = c * kChunk, e = std::min(n, b + kChunk);
      for (int64_t j = b; j < e; ++j) {
        const uint32_t m = magnitude_bits(x[j]);
        if (filtered && (m >> (shift + width)) != prefix) continue;
        ++local[(m >> shift) & mask];
      }
      parts[static_cast<size_t>(c)].assign(local.begin(), local.end());
    }
  });
  hist.assign(bins, 0);
  for (const auto& p : parts) {
    for (size_t d = 0; d < bins; ++d) hist[d] += p[d];
  }
}

// The digit (from the top) whose cumulative count from the top reaches `need`; `above`: the count above it.
uint32_t select_digit(const std::vector<int64_t>& hist, int64_t need, int64_t* above) {
  int64_t acc = 0;
  for (size_t d = hist.size(); d-- > 0;) {
    if (acc + hist[d] >= need) {
      *above = acc;
      return static_cast<uint32_t>(d);
    }
    acc += hist[d];
  }
  *above = acc;
  return 0;
}

}  // namespace

void magnitude_drop_cpu(float* delta, int64_t n, int64_t k, double l1[2], const TaskRunner& runner) {
  // The k-th largest magnitude's bit pattern: its top 16 bits, then its low 15 among the entries sharing them.
  std::vector<int64_t> hist;
  int64_t above_hi = 0, above_lo = 0;
  magnitude_histogram(delta, n, 15, 16, 0, hist, runner);
  const uint32_t hi = select_digit(hist, k, &above_hi);
  magnitude_histogram(delta, n, 0, 15, hi, hist, runner);
  const uint32_t lo = select_digit(hist, k - above_hi, &above_lo);
  const uint32_t threshold = (hi << 15) | lo;
  int64_t ties_left = k - above_hi - above_lo;  // entries at the threshold to keep: the first ones
  // Per chunk: how many entries sit at the threshold, then each chunk's quota of them in flat order, and the
  // index before which its kept ties lie (so that "kept" is a branch-free test per entry).
  constexpr int64_t kChunk = kDropChunk;
  const int64_t chunks = ceil_div(n, kChunk);
  std::vector<int64_t> quota(static_cast<size_t>(chunks), 0);
  runner.parallel_for(chunks, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int64_t at = 0;
      for (int64_t j = c * kChunk; j < std::min(n, (c + 1) * kChunk); ++j) at += magnitude_bits(delta[j]) == threshold;
      quota[static_cast<size_t>(c)] = at;
    }
  });
  for (auto& q : quota) {  // in flat order: the earliest ties are kept
    const int64_t take = std::min(q, ties_left);
    ties_left -= take;
    q = take;
  }
  std::vector<double> sums(static_cast<size_t>(2 * chunks), 0.0);
  runner.parallel_for(chunks, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t b = c * kChunk, e = std::min(n, b + kChunk);
      int64_t ties_end = b;  // the ties before it are kept
      for (int64_t ties = quota[static_cast<size_t>(c)]; ties > 0; ++ties_end) {
        ties -= magnitude_bits(delta[ties_end]) == threshold;
      }
      double before[kAcc] = {}, after[kAcc] = {};  // entry j into lane j % kAcc (b is a multiple of kAcc)
      for (int64_t j0 = b; j0 < e; j0 += kAcc) {
        const int64_t m_end = std::min<int64_t>(kAcc, e - j0);
        for (int64_t lane = 0; lane < m_end; ++lane) {  // (v * 1 is v, v * 0 the drop: branch-free, vectorises)
          const int64_t j = j0 + lane;
          const float v = delta[j];
          const uint32_t m = magnitude_bits(v);
          const float keep = (m > threshold) | ((m == threshold) & (j < ties_end)) ? 1.0f : 0.0f;
          const float kept = v * keep;
          before[lane] += std::fabs(static_cast<double>(v));
          after[lane] += std::fabs(static_cast<double>(kept));
          delta[j] = kept;
        }
      }
      for (int a = 0; a < kAcc; ++a) {
        sums[static_cast<size_t>(2 * c)] += before[a];
        sums[static_cast<size_t>(2 * c + 1)] += after[a];
      }
    }
  });
  l1[0] = 0.0;
  l1[1] = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    l1[0] += sums[static_cast<size_t>(2 * c)];
    l1[1] += sums[static_cast<size_t>(2 * c + 1)];
  }
}

void consensus_merge_cpu(float* base, const float* const* deltas, int64_t K, const float* coeffs,
                         const float* weights, bool normalize, float scaling, int64_t n, const TaskRunner& runner) {
  constexpr int64_t kTile = 1024;     // entries per inner pass: the tile's sums stay in L1
  constexpr int64_t kTask = 1 << 16;  // entries per task
  runner.parallel_for(ceil_div(n, kTask), [&](int64_t cb, int64_t ce) {
    float total[kTile], mixed[kTile], divisor[kTile];
    for (int64_t t0 = cb * kTask; t0 < std::min(n, ce * kTask); t0 += kTile) {
      const int64_t m = std::min(kTile, n - t0);
      for (int64_t j = 0; j < m; ++j) total[j] = 0.0f;
      for (int64_t i = 0; i < K; ++i) {
        const float c = coeffs[i];
        const float* d = deltas[i] + t0;
        for (int64_t j = 0; j < m; ++j) total[j] += c * d[j];
      }
      for (int64_t j = 0; j < m; ++j) {
        total[j] = total[j] >= 0.0f ? 1.0f : -1.0f;  // the elected sign (NaN: -1, as torch.where(x >= 0))
        mixed[j] = 0.0f;
        divisor[j] = 0.0f;
      }
      for (int64_t i = 0; i < K; ++i) {
        const float c = coeffs[i], w = weights[i];
        const float* d = deltas[i] + t0;
        for (int64_t j = 0; j < m; ++j) {
          const float tau = c * d[j];
          const bool agree = tau * total[j] > 0.0f;  // sign(tau) == elected (+-1: exact; 0 and NaN never)
          mixed[j] += agree ? tau : 0.0f;
          divisor[j] += agree ? w : 0.0f;
        }
      }
      float* out = base + t0;
      if (normalize) {
        for (int64_t j = 0; j < m; ++j) {
          const float div = divisor[j] == 0.0f ? 1.0f : divisor[j];
          out[j] += scaling * (mixed[j] / div);
        }
      } else {
        for (int64_t j = 0; j < m; ++j) out[j] += scaling * mixed[j];
      }
    }
  });
}

}  // namespace kernels
}  // namespace regmean_fast
