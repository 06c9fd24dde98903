// Unit tests of the framework-agnostic kernels: the tile/index math shared with the CUDA kernels,
// half-precision conversions, and the CPU Gram kernel against a double-precision loop.
// Run by ctest; no GPU, no torch.
#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "axpy_cpu.h"
#include "check_cpu.h"
#include "common.h"
#include "cpu_path.h"
#include "gram_avx512.h"
#include "gram_cpu.h"
#include "philox.h"
#include "reduce_cpu.h"
#include "task_vectors_cpu.h"
#include "tiling.h"
#include "cuda/gram_wmma_layout.h"

using namespace regmean_fast::kernels;

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond, ...)                                             \
  do {                                                               \
    ++g_checks;                                                      \
    if (!(cond)) {                                                   \
      ++g_failures;                                                  \
      std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                             \
      std::fprintf(stderr, "\n");                                    \
    }                                                                \
  } while (0)

static void test_triangle_enumeration() {
  for (int64_t nb = 1; nb <= 300; ++nb) {
    int64_t t = 0;
    bool ok = true;
    for (int64_t i = 0; i < nb && ok; ++i) {
      ok = triangle_row_offset(i, nb) == t;
      for (int64_t j = i; j < nb && ok; ++j, ++t) {
        int64_t bi, bj;
        triangle_tile_coords(t, nb, &bi, &bj);
        ok = bi == i && bj == j;
      }
    }
    CHECK(ok, "nb=%lld", (long long)nb);
    CHECK(t == triangle_tile_count(nb), "nb=%lld count", (long long)nb);
  }
  // Large grids: exact at the ends of rows far beyond float precision of a sqrt formula.
  const int64_t nb = 3000000;
  for (int64_t i : {int64_t(0), int64_t(1), int64_t(12345), nb - 2, nb - 1}) {
    int64_t bi, bj;
    triangle_tile_coords(triangle_row_offset(i, nb), nb, &bi, &bj);
    CHECK(bi == i && bj == i, "row start %lld", (long long)i);
    triangle_tile_coords(triangle_row_offset(i, nb) + (nb - 1 - i), nb, &bi, &bj);
    CHECK(bi == i && bj == nb - 1, "row end %lld", (long long)i);
  }
}

static void test_ranges() {
  CHECK(ceil_div(0, 64) == 0 && ceil_div(1, 64) == 1 && ceil_div(64, 64) == 1 && ceil_div(65, 64) == 2, "ceil_div");
  CHECK(round_up(130, 64) == 192, "round_up");
  CHECK(block_extent(0, 64, 130) == 64 && block_extent(2, 64, 130) == 2 && block_extent(3, 64, 130) == 0, "extent");
  for (int64_t n : {0, 1, 7, 100, 1001}) {
    for (int64_t parts : {1, 2, 3, 8, 13}) {
      int64_t expect_begin = 0, lo = n, hi = 0;
      for (int64_t p = 0; p < parts; ++p) {
        int64_t b, e;
        split_range(n, parts, p, &b, &e);
        CHECK(b == expect_begin && e >= b, "split n=%lld parts=%lld p=%lld", (long long)n, (long long)parts, (long long)p);
        lo = std::min(lo, e - b);
        hi = std::max(hi, e - b);
        expect_begin = e;
      }
      CHECK(expect_begin == n && hi - lo <= 1, "split cover n=%lld parts=%lld", (long long)n, (long long)parts);
    }
  }
  // Row splits: at least one, at most max, never fewer than min_rows rows a split (when > 1).
  for (int64_t tiles : {1, 10, 2080, 100000}) {
    for (int64_t rows : {1, 63, 64, 1000, 1 << 20}) {
      const int64_t s = gram_row_splits(tiles, rows, 132, 64, 65535);
      CHECK(s >= 1 && s <= 65535, "splits range");
      CHECK(s == 1 || rows / s >= 64, "splits rows tiles=%lld rows=%lld s=%lld", (long long)tiles, (long long)rows, (long long)s);
      CHECK(tiles * s <= std::max<int64_t>(tiles, 2 * 132 + tiles), "splits not excessive");
    }
  }
}

static float f16_reference(uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  const float sign = s ? -1.f : 1.f;
  if (e == 31) return m ? NAN : sign * INFINITY;
  if (e == 0) return sign * std::ldexp(static_cast<float>(m), -24);
  return sign * std::ldexp(1.f + m / 1024.f, e - 15);
}

static void test_conversions() {
  int bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float a = f16_bits_to_float(static_cast<uint16_t>(h)), b = f16_reference(static_cast<uint16_t>(h));
    if (!((std::isnan(a) && std::isnan(b)) || a == b)) ++bad;
  }
  CHECK(bad == 0, "%d float16 values widen wrongly", bad);
  bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float a = bf16_bits_to_float(static_cast<uint16_t>(h));
    if (!std::isnan(a) && float_to_bf16_bits(a) != h) ++bad;
  }
  CHECK(bad == 0, "%d bfloat16 values do not round-trip", bad);
  CHECK(bf16_bits_to_float(float_to_bf16_bits(1.00390625f)) == 1.0f, "ties to even (down)");
  CHECK(bf16_bits_to_float(float_to_bf16_bits(1.01171875f)) == 1.015625f, "ties to even (up)");
}

// Random activations of type dt, rows x d with row stride ldx, and their widened values.
struct Activations {
  std::vector<uint16_t> half;
  std::vector<float> f32;
  std::vector<double> widened;
  const void* data(DType dt) const { return dt == DType::F32 ? static_cast<const void*>(f32.data()) : half.data(); }
};

static Activations make_activations(DType dt, int64_t rows, int64_t d, int64_t ldx, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  Activations a;
  const size_t n = static_cast<size_t>(rows * ldx);
  a.widened.assign(n, 0.0);
  if (dt == DType::F32) a.f32.assign(n, 0.f); else a.half.assign(n, 0);
  for (size_t k = 0; k < n; ++k) {
    if (static_cast<int64_t>(k) % ldx >= d) {  // the gap between strided rows: NaN, must never be read
      if (dt == DType::F32) a.f32[k] = NAN; else a.half[k] = 0x7fc0;  // a NaN in both bf16 and fp16
      continue;
    }
    const float v = normal(rng);
    if (dt == DType::F32) {
      a.f32[k] = v;
      a.widened[k] = v;
    } else {
      // bf16: round; fp16: build bits from the value range by rounding through the reference.
      uint16_t bits;
      if (dt == DType::BF16) {
        bits = float_to_bf16_bits(v);
      } else {
        // Search-free fp16 encoding of small normal values: quantise to 10 mantissa bits.
        int e;
        const float m = std::frexp(std::fabs(v), &e);  // v = m * 2^e, m in [0.5, 1)
        const int exp16 = e - 1 + 15;
        int man = static_cast<int>(std::lround((m * 2.f - 1.f) * 1024.f));
        int ex = exp16;
        if (man == 1024) { man = 0; ++ex; }
        bits = (ex <= 0) ? 0 : static_cast<uint16_t>((v < 0 ? 0x8000 : 0) | (ex << 10) | man);
      }
      a.half[k] = bits;
      a.widened[k] = load_as_float(a.half.data(), dt, static_cast<int64_t>(k));
    }
  }
  return a;
}

// block_bytes > 0: the avx512 kernels called directly with that packing budget (small budgets put block
// boundaries inside small tests).
static void check_gram(DType dt, int64_t d, int64_t rows, int64_t ldx, const TaskRunner& runner, CpuGemmPath path,
                       std::mt19937& rng, int64_t block_bytes = 0) {
  const Activations a = make_activations(dt, rows, d, ldx, rng);
  const float poison = 12345.f;
  std::vector<float> G(static_cast<size_t>(d * d), poison);
  // Two updates: accumulation on top of existing values is part of the contract.
  for (int k = 0; k < 2; ++k) {
    if (block_bytes && dt == DType::BF16) {
      gram_update_avx512bf16(G.data(), d, static_cast<const uint16_t*>(a.data(dt)), rows, ldx, runner, block_bytes);
    } else if (block_bytes) {
      gram_update_avx512f32(G.data(), d, a.data(dt), dt, rows, ldx, runner, block_bytes);
    } else {
      gram_update_cpu_path(G.data(), d, a.data(dt), dt, rows, ldx, runner, path);
    }
  }
  double max_err = 0.0, scale = 1.0;
  bool lower_ok = true;
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j < d; ++j) {
      const float g = G[i * d + j];
      if (j < i) {
        lower_ok = lower_ok && g == poison;
        continue;
      }
      double s = 0.0;
      for (int64_t r = 0; r < rows; ++r) s += a.widened[r * ldx + i] * a.widened[r * ldx + j];
      const double expect = poison + 2.0 * s;
      max_err = std::max(max_err, std::fabs(g - expect));
      scale = std::max(scale, std::fabs(2.0 * s));
    }
  }
  const double tol = 1e-6 * (rows + 1) + 2e-3;  // poison 12345 stored in fp32 has ulp ~1e-3
  CHECK(lower_ok, "lower triangle modified: dt=%s d=%lld rows=%lld", dtype_name(dt), (long long)d, (long long)rows);
  CHECK(max_err / scale <= tol, "dt=%s d=%lld rows=%lld ldx=%lld path=%s err=%g scale=%g", dtype_name(dt),
        (long long)d, (long long)rows, (long long)ldx, cpu_gemm_path_name(path), max_err, scale);
}

static void test_gram_portable() {
  std::mt19937 rng(1234);
  SerialRunner serial;
  ThreadRunner threads(3);
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    for (int64_t d : {1, 3, 7, 64, 65, 129, 200}) {
      for (int64_t rows : {0, 1, 5, 513, 1100}) {
        const TaskRunner& runner = (d + rows) % 2 ? static_cast<const TaskRunner&>(threads) : serial;
        check_gram(dt, d, rows, d, runner, CpuGemmPath::Portable, rng);
      }
      check_gram(dt, d, 37, d + 5, threads, CpuGemmPath::Portable, rng);  // strided rows
    }
  }
}

static void test_gram_avx512() {
  std::mt19937 rng(4321);
  SerialRunner serial;
  ThreadRunner threads(3);
  for (DType dt : {DType::BF16, DType::F32, DType::F16}) {
    const CpuGemmPath path = dt == DType::BF16 ? CpuGemmPath::Avx512Bf16 : CpuGemmPath::Avx512;
    if (!cpu_path_available(path, cpu_features(), cpu_libs())) {
      std::printf("kernels_test: this CPU/build cannot run the %s Gram kernel: not tested here\n", cpu_gemm_path_name(path));
      continue;
    }
    for (int64_t d : {1, 3, 7, 33, 95, 96, 97, 130, 200, 257}) {
      // Odd and even row counts around the 256-step sums (512 rows of bf16 pairs): the zero row that pairs
      // an odd one.
      for (int64_t rows : {0, 1, 2, 3, 5, 255, 257, 511, 512, 513, 1100}) {
        const TaskRunner& runner = (d + rows) % 2 ? static_cast<const TaskRunner&>(threads) : serial;
        check_gram(dt, d, rows, d, runner, path, rng);
      }
      check_gram(dt, d, 37, d + 5, threads, path, rng);  // strided rows
      // Packing blocks of the smallest size (256 steps): block boundaries inside 1100 rows.
      check_gram(dt, d, 1100, d + 3, threads, path, rng, /*block_bytes=*/1);
    }
  }
}

// triangle_lane_mask against its definition.
static void test_lane_mask() {
  bool ok = true;
  for (int64_t d : {1, 7, 16, 17, 40})
    for (int64_t i = 0; i < d + 2; ++i)
      for (int64_t j = 0; j < d + 16; ++j) {
        uint32_t expect = 0;
        for (int64_t k = 0; k < 16; ++k)
          if (i <= j + k && j + k < d) expect |= 1u << k;
        ok = ok && triangle_lane_mask(i, j, d) == expect;
      }
  CHECK(ok, "triangle_lane_mask");
}

static void test_symmetrize() {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  ThreadRunner threads(2);
  for (int64_t d : {1, 2, 63, 64, 65, 130}) {
    std::vector<float> G(static_cast<size_t>(d * d));
    for (auto& v : G) v = u(rng);
    const std::vector<float> before = G;
    symmetrize_cpu(G.data(), d, threads);
    bool ok = true;
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j)
        ok = ok && G[i * d + j] == (j >= i ? before[i * d + j] : before[j * d + i]);
    CHECK(ok, "symmetrize d=%lld", (long long)d);
  }
}

// The CUDA kernel's schedule replayed on the host: every (tile, split) block of the launch grid
// accumulates its rows into its tile's upper part. Together they must cover each (i <= j, row)
// exactly once, which is what makes the unsynchronised / atomic adds on the GPU correct.
static void test_cuda_schedule_covers_once() {
  const int64_t tile = 64;
  for (int64_t d : {1, 63, 64, 65, 300}) {
    for (int64_t rows : {1, 64, 1000, 5000}) {
      const int64_t nb = ceil_div(d, tile), tiles = triangle_tile_count(nb);
      const int64_t splits = gram_row_splits(tiles, rows, 132, tile, 65535);
      std::vector<int64_t> hits(static_cast<size_t>(d * d), 0);
      for (int64_t bx = 0; bx < tiles; ++bx) {
        int64_t bi, bj;
        triangle_tile_coords(bx, nb, &bi, &bj);
        for (int64_t by = 0; by < splits; ++by) {
          int64_t rb, re;
          split_range(rows, splits, by, &rb, &re);
          for (int64_t i = bi * tile; i < std::min(d, (bi + 1) * tile); ++i)
            for (int64_t j = std::max(i, bj * tile); j < std::min(d, (bj + 1) * tile); ++j) hits[i * d + j] += re - rb;
        }
      }
      bool ok = true;
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) ok = ok && hits[i * d + j] == (j >= i ? rows : 0);
      CHECK(ok, "schedule d=%lld rows=%lld splits=%lld", (long long)d, (long long)rows, (long long)splits);
    }
  }
}

static void test_path_selection() {
  // This test binary does not load torch or MKL: no BLAS, so sgemm-based paths are out.
  const bool bf16_kernel = cpu_path_available(CpuGemmPath::Avx512Bf16, cpu_features(), cpu_libs());
  const bool f32_kernel = cpu_path_available(CpuGemmPath::Avx512, cpu_features(), cpu_libs());
  CHECK(cpu_gemm_path(DType::F32) == (f32_kernel ? CpuGemmPath::Avx512 : CpuGemmPath::Portable),
        "f32 without BLAS -> avx512 where the CPU has it, else portable");
  CHECK(cpu_gemm_path(DType::BF16) == (bf16_kernel ? CpuGemmPath::Avx512Bf16 : CpuGemmPath::Portable),
        "bf16 without BLAS -> avx512bf16 where the CPU has it, else portable");
  char buf[128];
  cpu_blas_summary(buf, sizeof(buf));
  CHECK(std::string(buf) == "none", "blas summary '%s'", buf);
  CHECK(std::string(cpu_gemm_path_name(CpuGemmPath::MklBf16)) == "mkl-bf16", "path name");
  CHECK(std::string(cpu_gemm_path_name(CpuGemmPath::Avx512Bf16)) == "avx512bf16", "path name");
  CHECK(std::string(cpu_gemm_path_name(CpuGemmPath::Avx512)) == "avx512", "path name");
}

// The choice table with made-up CPUs and processes.
static void test_path_choice_table() {
  using P = CpuGemmPath;
  auto cpu = [](bool avx2, bool avx512, bool bf16, bool amx) {
    CpuFeatures f;
    f.avx2_fma = avx2;
    f.avx512 = avx512;
    f.avx512bf16 = bf16;
    f.amx_bf16 = amx;
    return f;
  };
  auto libs = [](bool mkl, bool sgemm, bool kernel) {
    CpuLibs l;
    l.mkl_bf16 = mkl;
    l.sgemm = sgemm;
    l.avx512_kernels = kernel;
    return l;
  };
  const CpuFeatures spr = cpu(true, true, true, true), zen4 = cpu(true, true, true, false),
                    skx = cpu(true, true, false, false), zen3 = cpu(true, false, false, false),
                    old = cpu(false, false, false, false);
  const CpuLibs mkl = libs(true, true, true), openblas = libs(false, true, true), none = libs(false, false, true),
                no_kernel = libs(true, true, false);
  struct Row {
    const char* what;
    CpuFeatures f;
    CpuLibs l;
    P bf16, f16, f32;
  };
  const Row table[] = {
      {"AMX + MKL", spr, mkl, P::MklBf16, P::BlasF32, P::BlasF32},
      {"AMX, no MKL bf16", spr, openblas, P::Avx512Bf16, P::BlasF32, P::BlasF32},
      {"AMX, no BLAS", spr, none, P::Avx512Bf16, P::Avx512, P::Avx512},
      {"Zen 4 + MKL", zen4, mkl, P::Avx512Bf16, P::Avx512, P::Avx512},
      {"Zen 4, build without the kernels", zen4, no_kernel, P::BlasF32, P::BlasF32, P::BlasF32},
      {"Zen 4, no BLAS", zen4, none, P::Avx512Bf16, P::Avx512, P::Avx512},
      {"AVX-512 without bf16 + MKL", skx, mkl, P::BlasF32, P::Avx512, P::Avx512},
      {"AVX2 + MKL", zen3, mkl, P::BlasF32, P::BlasF32, P::BlasF32},
      {"AVX2, no BLAS", zen3, none, P::Portable, P::Portable, P::Portable},
      {"nothing", old, none, P::Portable, P::Portable, P::Portable},
  };
  for (const Row& r : table) {
    CHECK(choose_cpu_path(DType::BF16, r.f, r.l) == r.bf16, "%s: bf16 -> %s", r.what,
          cpu_gemm_path_name(choose_cpu_path(DType::BF16, r.f, r.l)));
    CHECK(choose_cpu_path(DType::F16, r.f, r.l) == r.f16, "%s: f16", r.what);
    CHECK(choose_cpu_path(DType::F32, r.f, r.l) == r.f32, "%s: f32", r.what);
    // The automatic choice is always one the forced form accepts.
    for (DType dt : {DType::BF16, DType::F16, DType::F32})
      CHECK(cpu_path_available(choose_cpu_path(dt, r.f, r.l), r.f, r.l), "%s: choice available", r.what);
  }

  // Forcing.
  P out;
  char err[256];
  auto forced = [&](DType dt, const char* name, const CpuFeatures& f, const CpuLibs& l) {
    err[0] = 0;
    return resolve_cpu_path(dt, name, f, l, &out, err, sizeof(err));
  };
  for (const char* automatic : {static_cast<const char*>(nullptr), "", "auto"})
    CHECK(forced(DType::BF16, automatic, zen4, mkl) && out == P::Avx512Bf16, "auto request");
  for (DType dt : {DType::BF16, DType::F16, DType::F32}) {
    CHECK(forced(dt, "portable", zen4, mkl) && out == P::Portable, "portable takes every dtype");
    CHECK(forced(dt, "blas-sgemm", zen4, mkl) && out == P::BlasF32, "blas-sgemm takes every dtype");
  }
  CHECK(forced(DType::BF16, "mkl-bf16", zen4, mkl) && out == P::MklBf16, "mkl-bf16 forced without AMX runs");
  CHECK(forced(DType::F32, "mkl-bf16", zen4, mkl) && out == P::Avx512, "bf16-only path leaves f32 to auto");
  CHECK(forced(DType::F16, "avx512bf16", zen4, mkl) && out == P::Avx512, "bf16-only path leaves f16 to auto");
  CHECK(forced(DType::BF16, "avx512", zen4, mkl) && out == P::Avx512Bf16, "avx512 leaves bf16 to auto");
  CHECK(forced(DType::F32, "avx512", spr, mkl) && out == P::Avx512, "avx512 forced on AMX");
  CHECK(!forced(DType::F32, "avx512", zen3, mkl) && std::string(err).find("no AVX-512") != std::string::npos,
        "avx512 on an AVX2 CPU: %s", err);
  CHECK(forced(DType::BF16, "avx512bf16", spr, mkl) && out == P::Avx512Bf16, "avx512bf16 forced on AMX");
  CHECK(!forced(DType::BF16, "avx512bf16", skx, mkl), "avx512bf16 on a CPU without it is refused");
  CHECK(std::string(err) == "this CPU has no AVX512-BF16 (available here: auto, mkl-bf16, avx512, blas-sgemm, portable)",
        "message: %s", err);
  CHECK(!forced(DType::F32, "avx512bf16", skx, mkl), "refused for every dtype, not only bf16");
  CHECK(!forced(DType::BF16, "avx512bf16", zen4, no_kernel) && std::string(err).find("this build") == 0,
        "kernel not compiled: %s", err);
  CHECK(!forced(DType::F32, "blas-sgemm", zen4, none) && std::string(err).find("sgemm_") != std::string::npos,
        "blas-sgemm without sgemm: %s", err);
  CHECK(!forced(DType::BF16, "mkl-bf16", zen4, openblas) &&
            std::string(err).find("cblas_gemm_bf16bf16f32") != std::string::npos,
        "mkl-bf16 without MKL: %s", err);
  CHECK(!forced(DType::BF16, "AVX512BF16", zen4, mkl) && std::string(err).find("not a CPU path") == 0,
        "names are exact: %s", err);
  CHECK(!forced(DType::BF16, "amx", old, none) &&
            std::string(err).find("available here: auto, portable)") != std::string::npos,
        "lists what is available: %s", err);
}

// The reduction against a double loop written from its definition, for full and packed inputs,
// float and double outputs; the lower triangle of each input is garbage and must be ignored.
static void test_reduce_and_packing() {
  std::mt19937 rng(99);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  ThreadRunner threads(3);
  for (int64_t d : {1, 7, 64, 129}) {
    for (int64_t K : {1, 2, 5}) {
      for (double alpha : {1.0, 0.5, 0.0}) {
        std::vector<std::vector<float>> full(K), packed(K);
        std::vector<const float*> pf, pp;
        std::vector<double> f(K);
        for (int64_t k = 0; k < K; ++k) {
          full[k].resize(static_cast<size_t>(d * d));
          for (auto& v : full[k]) v = u(rng);
          packed[k].resize(static_cast<size_t>(packed_size(d)));
          pack_upper_cpu(full[k].data(), d, packed[k].data(), threads);
          pf.push_back(full[k].data());
          pp.push_back(packed[k].data());
          f[k] = 0.25 + k;
        }
        std::vector<float> A32(static_cast<size_t>(d * d), -1.f), B32(A32);
        std::vector<double> A64(static_cast<size_t>(d * d), -1.0);
        gram_reduce_cpu<float>(A32.data(), d, pf.data(), K, f.data(), alpha, false, threads);
        gram_reduce_cpu<float>(B32.data(), d, pp.data(), K, f.data(), alpha, true, threads);
        gram_reduce_cpu<double>(A64.data(), d, pf.data(), K, f.data(), alpha, false, threads);
        double err32 = 0, err64 = 0;
        bool same = true;
        for (int64_t i = 0; i < d; ++i) {
          for (int64_t j = 0; j < d; ++j) {
            const int64_t a = std::min(i, j), b = std::max(i, j);  // upper triangle source
            double expect = 0;
            for (int64_t k = 0; k < K; ++k) expect += f[k] * full[k][a * d + b] * (a == b ? 1.0 : alpha);
            err32 = std::max(err32, std::fabs(A32[i * d + j] - expect));
            err64 = std::max(err64, std::fabs(A64[i * d + j] - expect));
            same = same && A32[i * d + j] == B32[i * d + j];
          }
        }
        CHECK(err32 < 1e-5 * K * 5, "reduce f32 d=%lld K=%lld alpha=%g err=%g", (long long)d, (long long)K, alpha, err32);
        CHECK(err64 < 1e-12 * K * 5, "reduce f64 d=%lld K=%lld alpha=%g err=%g", (long long)d, (long long)K, alpha, err64);
        CHECK(same, "packed and full inputs give different results d=%lld", (long long)d);
      }
    }
    // Packing round trip: unpack(pack(G)) is G's upper triangle mirrored.
    std::vector<float> G(static_cast<size_t>(d * d)), P(static_cast<size_t>(packed_size(d))), H(G.size());
    for (auto& v : G) v = u(rng);
    pack_upper_cpu(G.data(), d, P.data(), threads);
    unpack_upper_cpu(P.data(), d, H.data(), threads);
    bool ok = P[0] == G[0] && P.back() == G.back();
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) ok = ok && H[i * d + j] == G[std::min(i, j) * d + std::max(i, j)];
    CHECK(ok, "pack/unpack d=%lld", (long long)d);
  }
}

// The tensor-core Gram kernel's tiling replayed on the host (gram_wmma_layout.h): staging covers
// every (row, column) of a step once, WMMA pointers are 32-byte aligned, and over all blocks,
// warps, live fragments, lanes and store iterations every (i <= j) element of G is stored exactly
// once and nothing below the diagonal is.
static void test_wmma_layout() {
  namespace wl = wmma_layout;
  std::vector<int> seen(static_cast<size_t>(wl::kK * wl::kTile), 0);
  std::vector<int> offs(static_cast<size_t>(wl::kStageElems), 0);
  for (int tid = 0; tid < wl::kThreads; ++tid)
    for (int it = 0; it < wl::kStageIters; ++it) {
      int k, m;
      wl::stage_element(tid, it, &k, &m);
      if (k >= 0 && k < wl::kK && m >= 0 && m < wl::kTile) {
        ++seen[k * wl::kTile + m];
        const int o = wl::stage_offset(k, m);
        if (o >= 0 && o < wl::kStageElems) ++offs[o];
      }
    }
  bool once = true;
  for (int v : seen) once = once && v == 1;
  for (int v : offs) once = once && v <= 1;
  CHECK(once, "staging covers each (row, column) once");
  CHECK(wl::kLd % 8 == 0 && (wl::kFrag * wl::kLd * 2) % 32 == 0, "ld multiple of 8, 16-row stride 32-byte aligned");
  bool aligned = true;
  for (int kk = 0; kk < wl::kK; kk += wl::kFrag)
    for (int m0 = 0; m0 < wl::kTile; m0 += wl::kFrag) aligned = aligned && (wl::stage_offset(kk, m0) * 2) % 32 == 0;
  CHECK(aligned, "fragment pointers 32-byte aligned");
  CHECK(wl::kThreads * wl::kStageIters == wl::kK * wl::kTile, "staging iterations");
  CHECK(wl::kStoreIters * 32 == wl::kFrag * wl::kFrag, "store iterations");

  for (int64_t d : {1, 15, 16, 17, 63, 64, 65, 130, 257}) {
    const int64_t nb = ceil_div(d, wl::kTile);
    std::vector<int> hits(static_cast<size_t>(d * d), 0);
    bool skip_ok = true;
    for (int64_t t = 0; t < triangle_tile_count(nb); ++t) {
      int64_t bi, bj;
      triangle_tile_coords(t, nb, &bi, &bj);
      const int64_t i0 = bi * wl::kTile, j0 = bj * wl::kTile;
      for (int w = 0; w < wl::kWarps; ++w) {
        int wr, wc;
        wl::warp_origin(w, &wr, &wc);
        for (int p = 0; p < wl::kFragsPerWarp; ++p)
          for (int q = 0; q < wl::kFragsPerWarp; ++q) {
            const int64_t gi = i0 + wr + p * wl::kFrag, gj = j0 + wc + q * wl::kFrag;
            const bool skipped = wl::fragment_strictly_lower(gi, gj);
            for (int lane = 0; lane < 32; ++lane)
              for (int it = 0; it < wl::kStoreIters; ++it) {
                int r, c;
                wl::store_element(lane, it, &r, &c);
                const int64_t i = gi + r, j = gj + c;
                if (skipped) {
                  skip_ok = skip_ok && !(i < d && j < d && j >= i);  // a skipped fragment owns no needed element
                } else if (wl::store_mask(i, j, d)) {
                  ++hits[i * d + j];
                }
              }
          }
      }
    }
    bool ok = true;
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) ok = ok && hits[i * d + j] == (j >= i ? 1 : 0);
    CHECK(ok && skip_ok, "wmma tiling d=%lld", (long long)d);
  }
}

// CPU twin of gram_wmma_kernel: the same grid, row splits, index list, zero-filled staging
// through stage_offset, WMMA operand conventions (A = staged^T read col-major, B = staged read
// row-major, both with ld kLd) and masked stores, on bf16 data; must match a double reference.
static void test_wmma_kernel_twin() {
  namespace wl = wmma_layout;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t d : {1, 17, 130}) {
    for (int64_t n_all : {1, 33, 300}) {
      const int64_t ldx = d + 3;
      std::vector<uint16_t> X(static_cast<size_t>(n_all * ldx), 0x7fc0);  // padding columns: NaN
      for (int64_t r = 0; r < n_all; ++r)
        for (int64_t c = 0; c < d; ++c) X[r * ldx + c] = float_to_bf16_bits(nd(rng));
      std::vector<int64_t> index;
      for (int64_t r = 0; r < n_all; ++r)
        if (r % 3 != 1) index.push_back(r);
      const int64_t n_rows = static_cast<int64_t>(index.size());
      const int64_t nb = ceil_div(d, wl::kTile), tiles = triangle_tile_count(nb);
      const int64_t splits = gram_row_splits(tiles, n_rows, 132, 2 * wl::kK, 65535);
      std::vector<float> G(static_cast<size_t>(d * d), -7.f);
      std::vector<uint16_t> si(wl::kStageElems), sj(wl::kStageElems);
      for (int64_t bx = 0; bx < tiles; ++bx) {
        int64_t bi, bj;
        triangle_tile_coords(bx, nb, &bi, &bj);
        const bool diag = bi == bj;
        const int64_t i0 = bi * wl::kTile, j0 = bj * wl::kTile;
        for (int64_t by = 0; by < splits; ++by) {
          int64_t rb, re;
          split_range(n_rows, splits, by, &rb, &re);
          std::vector<double> acc(static_cast<size_t>(wl::kTile * wl::kTile), 0.0);  // all warps' fragments
          for (int64_t r0 = rb; r0 < re; r0 += wl::kK) {
            for (int tid = 0; tid < wl::kThreads; ++tid)
              for (int it = 0; it < wl::kStageIters; ++it) {
                int k, m;
                wl::stage_element(tid, it, &k, &m);
                const int64_t r = r0 + k;
                uint16_t vi = 0, vj = 0;
                if (r < re) {
                  const uint16_t* x = X.data() + index[r] * ldx;
                  if (i0 + m < d) vi = x[i0 + m];
                  if (!diag && j0 + m < d) vj = x[j0 + m];
                }
                si[wl::stage_offset(k, m)] = vi;
                if (!diag) sj[wl::stage_offset(k, m)] = vj;
              }
            const uint16_t* sb = diag ? si.data() : sj.data();
            for (int w = 0; w < wl::kWarps; ++w) {
              int wr, wc;
              wl::warp_origin(w, &wr, &wc);
              for (int p = 0; p < wl::kFragsPerWarp; ++p)
                for (int q = 0; q < wl::kFragsPerWarp; ++q) {
                  if (wl::fragment_strictly_lower(i0 + wr + p * wl::kFrag, j0 + wc + q * wl::kFrag)) continue;
                  for (int kk = 0; kk < wl::kK; kk += wl::kFrag) {
                    const uint16_t* a = si.data() + wl::stage_offset(kk, wr + p * wl::kFrag);  // col-major A
                    const uint16_t* b = sb + wl::stage_offset(kk, wc + q * wl::kFrag);         // row-major B
                    for (int mi = 0; mi < wl::kFrag; ++mi)
                      for (int ni = 0; ni < wl::kFrag; ++ni) {
                        double sum = 0;
                        for (int ki = 0; ki < wl::kFrag; ++ki)
                          sum += double(bf16_bits_to_float(a[mi + ki * wl::kLd])) *
                                 double(bf16_bits_to_float(b[ki * wl::kLd + ni]));
                        acc[(wr + p * wl::kFrag + mi) * wl::kTile + wc + q * wl::kFrag + ni] += sum;
                      }
                  }
                }
            }
          }
          for (int w = 0; w < wl::kWarps; ++w) {
            int wr, wc;
            wl::warp_origin(w, &wr, &wc);
            for (int p = 0; p < wl::kFragsPerWarp; ++p)
              for (int q = 0; q < wl::kFragsPerWarp; ++q) {
                const int64_t gi = i0 + wr + p * wl::kFrag, gj = j0 + wc + q * wl::kFrag;
                if (wl::fragment_strictly_lower(gi, gj)) continue;
                for (int lane = 0; lane < 32; ++lane)
                  for (int it = 0; it < wl::kStoreIters; ++it) {
                    int r, c;
                    wl::store_element(lane, it, &r, &c);
                    if (wl::store_mask(gi + r, gj + c, d))
                      G[(gi + r) * d + gj + c] += static_cast<float>(acc[(gi - i0 + r) * wl::kTile + gj - j0 + c]);
                  }
              }
          }
        }
      }
      double max_err = 0, scale = 1;
      bool lower_ok = true;
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) {
          if (j < i) {
            lower_ok = lower_ok && G[i * d + j] == -7.f;
            continue;
          }
          double ref = -7.0;
          for (int64_t r : index) {
            ref += double(bf16_bits_to_float(X[r * ldx + i])) * double(bf16_bits_to_float(X[r * ldx + j]));
          }
          max_err = std::max(max_err, std::fabs(ref - G[i * d + j]));
          scale = std::max(scale, std::fabs(ref));
        }
      CHECK(lower_ok && max_err / scale < 1e-5, "wmma twin d=%lld rows=%lld splits=%lld err=%g", (long long)d,
            (long long)n_rows, (long long)splits, max_err / scale);
    }
  }
}

static void test_checks() {
  ThreadRunner threads(3);
  std::vector<float> x(10001, 1.5f);
  CHECK(all_finite_cpu(x.data(), DType::F32, 10001, threads), "all finite f32");
  x[9999] = std::numeric_limits<float>::infinity();
  CHECK(!all_finite_cpu(x.data(), DType::F32, 10001, threads), "inf f32");
  x[9999] = std::nanf("");
  CHECK(!all_finite_cpu(x.data(), DType::F32, 10001, threads), "nan f32");
  CHECK(all_finite_cpu(x.data(), DType::F32, 9999, threads), "prefix without the nan");
  std::vector<float> big(3 * 65536 + 5, 0.5f);  // several 64K-element chunks: every one is scanned
  CHECK(all_finite_cpu(big.data(), DType::F32, static_cast<int64_t>(big.size()), threads), "big finite");
  big.back() = std::nanf("");
  CHECK(!all_finite_cpu(big.data(), DType::F32, static_cast<int64_t>(big.size()), threads), "big nan in last chunk");
  big.back() = 0.5f;
  big[70000] = -std::numeric_limits<float>::infinity();
  CHECK(!all_finite_cpu(big.data(), DType::F32, static_cast<int64_t>(big.size()), threads), "big -inf in chunk 2");
  std::vector<uint16_t> h(5000, float_to_bf16_bits(2.0f));
  CHECK(all_finite_cpu(h.data(), DType::BF16, 5000, threads), "bf16 finite");
  h[17] = 0x7f80;  // bf16 +inf
  CHECK(!all_finite_cpu(h.data(), DType::BF16, 5000, threads), "bf16 inf");
  std::vector<uint16_t> f(5000, 0x3c00);  // fp16 1.0
  CHECK(all_finite_cpu(f.data(), DType::F16, 5000, threads), "f16 finite");
  f[4999] = 0x7e00;  // fp16 NaN
  CHECK(!all_finite_cpu(f.data(), DType::F16, 5000, threads), "f16 nan");
  f[4999] = 0x7bff;  // fp16 max finite
  CHECK(all_finite_cpu(f.data(), DType::F16, 5000, threads), "f16 max is finite");

  const int64_t d = 70;
  std::vector<float> G(static_cast<size_t>(d * d));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) G[i * d + j] = static_cast<float>((i + 1) * (j + 1)) - 3.0f * (i == j);
  G[3 * d + 60] += 0.5f;
  const SymmetryStats s = symmetry_stats_cpu(G.data(), d, threads);
  CHECK(s.finite && s.max_abs == 70.f * 70.f - 3.f && s.max_asym == 0.5f && s.min_diag == -2.f,
        "symmetry stats %d %g %g %g", s.finite, s.max_abs, s.max_asym, s.min_diag);
  G[65 * d + 2] = std::nanf("");
  CHECK(!symmetry_stats_cpu(G.data(), d, threads).finite, "symmetry stats sees NaN in the lower triangle");
}

// split_bf16x3 (the CPU ops' and the CUDA kernel's one function): three bf16 slices that sum
// exactly to x for normal numbers over the whole exponent range, each slice at most 2^-8 of the one
// before, and the specials passed through the first slice.
static void test_split_bf16x3() {
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> mant(1.0, 2.0);
  std::uniform_int_distribution<int> expo(-100, 100);
  for (int t = 0; t < 20000; ++t) {
    const float x = static_cast<float>((t % 2 ? -1.0 : 1.0) * std::ldexp(mant(rng), expo(rng)));
    uint16_t s[3];
    split_bf16x3(x, s, 1);
    const double a = bf16_bits_to_float(s[0]), b = bf16_bits_to_float(s[1]), c = bf16_bits_to_float(s[2]);
    CHECK(a + b + c == static_cast<double>(x), "split %.9g -> %.9g %.9g %.9g", x, a, b, c);
    CHECK(std::fabs(b) <= std::ldexp(std::fabs(a), -8) && std::fabs(c) <= std::ldexp(std::fabs(b), -7),
          "split slices shrink %.9g: %.9g %.9g %.9g", x, a, b, c);
  }
  const float specials[] = {0.0f, -0.0f, std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(), 1.0f, -3.0f};
  for (float x : specials) {
    uint16_t s[3];
    split_bf16x3(x, s, 1);
    CHECK(bf16_bits_to_float(s[0]) == x, "split special %g", x);
  }
  uint16_t s[3];
  split_bf16x3(std::nanf(""), s, 1);
  CHECK(std::isnan(bf16_bits_to_float(s[0])), "split keeps NaN in the first slice");
}

// gram_term_cpu against double loops written from its definition: stats over finite pairs, S elementwise
// from G, triu(A) += triu(S) (the strict lower triangle untouched), the bf16x3 slices summing to S; a NaN
// anywhere is seen.
static void test_gram_term() {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  ThreadRunner threads(3);
  for (int64_t d : {1, 5, 64, 65, 150}) {
    for (double alpha : {1.0, 0.75, 0.0}) {
      const double factor = 0.3;
      std::vector<float> G(static_cast<size_t>(d * d)), A(G.size()), A0(G.size()), S(G.size());
      std::vector<uint16_t> H(static_cast<size_t>(3 * d * d));
      for (auto& v : G) v = u(rng);
      for (auto& v : A0) v = u(rng);
      A = A0;
      const SymmetryStats s = gram_term_cpu(G.data(), d, factor, alpha, A.data(), S.data(), H.data(), threads);
      double max_abs = 0, max_asym = 0, min_diag = 1e30, err_s = 0, err_a = 0;
      bool lower = true, exact = true;
      for (int64_t i = 0; i < d; ++i) {
        min_diag = std::min(min_diag, static_cast<double>(G[i * d + i]));
        for (int64_t j = 0; j < d; ++j) {
          max_abs = std::max(max_abs, std::fabs(static_cast<double>(G[i * d + j])));
          max_asym = std::max(max_asym, std::fabs(static_cast<double>(G[i * d + j]) - G[j * d + i]));
          const double t = factor * G[i * d + j] * (i == j ? 1.0 : alpha);
          err_s = std::max(err_s, std::fabs(S[i * d + j] - t));
          err_a = std::max(err_a, std::fabs(A[i * d + j] - (A0[i * d + j] + (j >= i ? t : 0.0))));
          lower = lower && (j >= i || A[i * d + j] == A0[i * d + j]);
          const int64_t k = i * d + j;
          exact = exact && bf16_bits_to_float(H[k]) + bf16_bits_to_float(H[d * d + k]) +
                               bf16_bits_to_float(H[2 * d * d + k]) == S[k];
        }
      }
      CHECK(s.finite && s.max_abs == static_cast<float>(max_abs) && s.min_diag == static_cast<float>(min_diag) &&
                std::fabs(s.max_asym - max_asym) <= 1e-6 * max_abs,
            "gram_term stats d=%lld: %g %g %g", (long long)d, s.max_abs, s.max_asym, s.min_diag);
      CHECK(err_s <= 2e-7 * max_abs && err_a <= 1e-6 * (max_abs + 2), "gram_term d=%lld alpha=%g: S %g A %g",
            (long long)d, alpha, err_s, err_a);
      CHECK(lower && exact, "gram_term d=%lld: A's lower triangle untouched %d, slices exact %d", (long long)d, lower,
            exact);
      G[(d - 1) * d] = std::nanf("");  // the lower triangle's corner (the diagonal when d == 1)
      CHECK(!gram_term_cpu(G.data(), d, factor, alpha, nullptr, nullptr, nullptr, threads).finite,
            "gram_term sees the NaN d=%lld", (long long)d);
    }
  }
}

// Philox4x32-10 against the published known-answer vectors (Random123 kat_vectors: counter, key -> words).
static void test_philox_known_answers() {
  struct Kat {
    uint32_t ctr[4], key[2], want[4];
  };
  const Kat kats[] = {
      {{0u, 0u, 0u, 0u}, {0u, 0u}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{~0u, ~0u, ~0u, ~0u}, {~0u, ~0u}, {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) {
    uint32_t out[4];
    philox4x32_10(k.ctr, k.key, out);
    for (int w = 0; w < 4; ++w) CHECK(out[w] == k.want[w], "word %d: %08x, expected %08x", w, out[w], k.want[w]);
  }
}

// dare_drop_cpu against a loop over the one-block definition: the same kept entries bit for bit (the
// kernel draws 16 blocks at a time, lane by lane), fp64 L1 sums, the same bits on 1 and 3 threads, a
// dropped inf is NaN (as torch's mul by a bool mask), and the kept fraction is the density.
static void test_dare_drop() {
  const uint32_t key[2] = {0x12345678u, 0x9abcdef0u};
  for (int64_t n : {int64_t(1), int64_t(63), int64_t(65), int64_t(4099), int64_t(200001)}) {
    for (double density : {0.1, 0.5, 0.9, 1.0}) {
      const uint64_t threshold = static_cast<uint64_t>(std::ceil(density * 4294967296.0));
      std::mt19937 rng(static_cast<uint32_t>(n));
      std::normal_distribution<float> normal;
      std::vector<float> x(static_cast<size_t>(n));
      for (auto& v : x) v = normal(rng);
      if (n > 10) x[7] = std::numeric_limits<float>::infinity();
      std::vector<float> a = x, b = x, c = x;
      double l1a[2], l1b[2], l1c[2];
      dare_drop_cpu(a.data(), n, key, threshold, l1a, SerialRunner());
      dare_drop_cpu(b.data(), n, key, threshold, l1b, ThreadRunner(3));
      dare_drop_cpu(c.data(), n, key, threshold, l1c, ThreadRunner(2), /*allow_avx512=*/false);
      CHECK(std::memcmp(a.data(), c.data(), sizeof(float) * a.size()) == 0 &&
                std::memcmp(l1a, l1c, sizeof(l1a)) == 0,
            "n %lld: the AVX-512 path (%s here) and the portable one differ", (long long)n,
            dare_drop_avx512_compiled() && cpu_features().avx512 ? "taken" : "not taken");
      double before = 0.0, after = 0.0;
      int64_t kept = 0, mismatched = 0, nan_mismatch = 0;
      for (int64_t j = 0; j < n; ++j) {
        uint32_t words[4];
        philox_stream_block(static_cast<uint64_t>(j / 4), key, words);
        const bool keep = words[j % 4] < threshold;
        const float expect = keep ? x[j] : x[j] * 0.0f;
        kept += keep;
        before += std::fabs(static_cast<double>(x[j]));
        after += std::fabs(static_cast<double>(expect));
        if (std::isnan(expect)) {
          nan_mismatch += !std::isnan(a[j]);
        } else if (std::memcmp(&expect, &a[j], sizeof(float)) != 0) {
          ++mismatched;
        }
      }
      CHECK(mismatched == 0 && nan_mismatch == 0, "n %lld density %g: %lld entries differ", (long long)n, density,
            (long long)(mismatched + nan_mismatch));
      CHECK(std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0,
            "n %lld: 1 and 3 threads differ", (long long)n);
      CHECK(std::memcmp(l1a, l1b, sizeof(l1a)) == 0, "n %lld: the L1 sums depend on the threads", (long long)n);
      if (n > 10) {
        CHECK(std::isinf(l1a[0]), "the inf is in the L1 before");
      } else {
        CHECK(std::fabs(l1a[0] - before) <= 1e-12 * before, "L1 before %.17g, expected %.17g", l1a[0], before);
      }
      if (std::isfinite(after)) {
        CHECK(std::fabs(l1a[1] - after) <= 1e-12 * after, "L1 after %.17g, expected %.17g", l1a[1], after);
      }
      if (n == 200001) {
        const double frac = static_cast<double>(kept) / n;  // binomial: sd <= 0.0012
        CHECK(std::fabs(frac - density) < 0.006, "density %g: kept fraction %g", density, frac);
      }
    }
  }
}

// consensus_merge_cpu against the definition in double (TIES's sign election and disjoint mean).
static void test_consensus_merge() {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  for (int64_t n : {int64_t(1), int64_t(1023), int64_t(70001)}) {
    for (bool normalize : {true, false}) {
      const int64_t K = 3;
      std::vector<std::vector<float>> deltas(K, std::vector<float>(static_cast<size_t>(n)));
      for (auto& d : deltas) {
        for (auto& v : d) v = normal(rng);
        d[0] = 0.0f;  // a zero agrees with neither sign
      }
      const float coeffs[3] = {1.0f, 0.5f, -0.25f}, weights[3] = {1.0f, 2.0f, 0.5f};
      std::vector<float> base(static_cast<size_t>(n));
      for (auto& v : base) v = normal(rng);
      std::vector<float> got = base;
      const float* ptrs[3] = {deltas[0].data(), deltas[1].data(), deltas[2].data()};
      consensus_merge_cpu(got.data(), ptrs, K, coeffs, weights, normalize, 0.7f, n, ThreadRunner(2));
      double worst = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        double total = 0.0, tau[3];
        for (int i = 0; i < K; ++i) total += tau[i] = static_cast<double>(coeffs[i]) * deltas[i][j];
        const double elected = total >= 0.0 ? 1.0 : -1.0;
        double mixed = 0.0, divisor = 0.0;
        for (int i = 0; i < K; ++i) {
          if ((tau[i] > 0.0 && elected > 0.0) || (tau[i] < 0.0 && elected < 0.0)) {
            mixed += tau[i];
            divisor += weights[i];
          }
        }
        const double expect = base[j] + 0.7 * (normalize ? mixed / (divisor == 0.0 ? 1.0 : divisor) : mixed);
        worst = std::max(worst, std::fabs(expect - got[j]) / (1.0 + std::fabs(expect)));
      }
      CHECK(worst < 2e-6, "n %lld normalize %d: worst relative error %g", (long long)n, int(normalize), worst);
    }
  }
}

// scaled_add_cpu from each stored type: acc = c0 x0, then += c1 x1, each step two fp32 roundings of the exact
// value (x widened exactly: the float of its bits), on 3 threads across chunks.
static void test_scaled_add() {
  const int64_t n = 3 * (int64_t(1) << 16) + 5;
  std::mt19937 rng(9);
  std::normal_distribution<float> normal;
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    std::vector<uint16_t> h0(n), h1(n);
    std::vector<float> f0(n), f1(n);
    for (int64_t j = 0; j < n; ++j) {
      f0[j] = normal(rng);
      f1[j] = normal(rng);
      h0[j] = dt == DType::BF16 ? float_to_bf16_bits(f0[j]) : static_cast<uint16_t>(0x3c00u + (j % 977));
      h1[j] = dt == DType::BF16 ? float_to_bf16_bits(f1[j]) : static_cast<uint16_t>(0xbc00u + (j % 1013));
    }
    const void* x0 = dt == DType::F32 ? static_cast<const void*>(f0.data()) : h0.data();
    const void* x1 = dt == DType::F32 ? static_cast<const void*>(f1.data()) : h1.data();
    std::vector<float> acc(n, 0.0f);
    scaled_add_cpu(acc.data(), x0, dt, n, 0.3f, true, ThreadRunner(3));
    std::vector<float> first = acc;
    scaled_add_cpu(acc.data(), x1, dt, n, -1.7f, false, ThreadRunner(3));
    int64_t bad = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double a = load_as_float(x0, dt, j), b = load_as_float(x1, dt, j);
      const double e0 = 0.3f * a, e1 = static_cast<double>(first[j]) + -1.7f * b;
      bad += std::fabs(first[j] - e0) > std::ldexp(std::fabs(e0), -24) * 1.01;
      bad += std::fabs(acc[j] - e1) > std::ldexp(std::fabs(first[j]) + 2 * std::fabs(1.7 * b), -23) + 1e-44;
    }
    CHECK(bad == 0, "%s: %lld entries off", dtype_name(dt), (long long)bad);
  }
}

// magnitude_drop_cpu against a stable sort by decreasing magnitude: exactly the k largest kept, ties at the
// cut-off to the earliest, signed zeros and an inf among them; the same bits on 1 and 3 threads.
static void test_magnitude_drop() {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> small(-3, 3);
  std::normal_distribution<float> normal;
  for (int64_t n : {int64_t(1), int64_t(7), int64_t(1037), int64_t(300001)}) {
    for (int tied = 0; tied < 2; ++tied) {
      std::vector<float> x(static_cast<size_t>(n));
      for (auto& v : x) v = tied ? std::ldexp(static_cast<float>(small(rng)), -9) : normal(rng);
      if (n > 100) {
        x[17] = -0.0f;
        x[50] = std::numeric_limits<float>::infinity();
      }
      std::vector<int64_t> order(static_cast<size_t>(n));
      for (int64_t j = 0; j < n; ++j) order[j] = j;
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return std::fabs(x[a]) > std::fabs(x[b]);
      });
      for (int64_t k : {int64_t(1), n / 3 + 1, n}) {
        std::vector<char> keep(static_cast<size_t>(n), 0);
        for (int64_t r = 0; r < k; ++r) keep[order[r]] = 1;
        std::vector<float> a = x, b = x;
        double l1a[2], l1b[2];
        magnitude_drop_cpu(a.data(), n, k, l1a, SerialRunner());
        magnitude_drop_cpu(b.data(), n, k, l1b, ThreadRunner(3));
        int64_t wrong = 0;
        for (int64_t j = 0; j < n; ++j) {
          const float expect = keep[j] ? x[j] : x[j] * 0.0f;
          wrong += std::memcmp(&expect, &a[j], sizeof(float)) != 0 && !(std::isnan(expect) && std::isnan(a[j]));
        }
        CHECK(wrong == 0, "n %lld k %lld tied %d: %lld entries differ", (long long)n, (long long)k, tied,
              (long long)wrong);
        CHECK(std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0 && std::memcmp(l1a, l1b, sizeof(l1a)) == 0,
              "n %lld: 1 and 3 threads differ", (long long)n);
      }
    }
  }
}

int main() {
  test_triangle_enumeration();
  test_ranges();
  test_conversions();
  test_gram_portable();
  test_lane_mask();
  test_gram_avx512();
  test_symmetrize();
  test_cuda_schedule_covers_once();
  test_path_selection();
  test_path_choice_table();
  test_reduce_and_packing();
  test_checks();
  test_split_bf16x3();
  test_gram_term();
  test_philox_known_answers();
  test_dare_drop();
  test_consensus_merge();
  test_magnitude_drop();
  test_scaled_add();
  test_wmma_layout();
  test_wmma_kernel_twin();
  std::printf("kernels_test: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
