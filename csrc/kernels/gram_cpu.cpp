// CPU Gram accumulation: triu(G) += X^T X with fp32 accumulation.
//
// Four implementations behind one contract (which one runs: cpu_path.h):
//  * MKL (resolved at run time with dlsym; torch's x86 wheels export cblas_gemm_bf16bf16f32 and
//    sgemm_): one GEMM per block row of the upper triangle, beta = 1,
//    straight into G. The diagonal block goes through a scratch tile so the strict lower
//    triangle of G stays untouched.
//  * AVX-512: our micro-kernels, vdpbf16ps for bf16 and FMA for fp32/fp16 (gram_avx512.cpp).
//  * Portable: rows are packed (widened to fp32, zero-padded to the tile) one chunk at a time and
//    every tile on or above the diagonal is computed with a register-blocked micro-kernel written
//    with GCC/Clang vector extensions, so it vectorises on any ISA the compiler targets.
#include "gram_cpu.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "blas_cpu.h"
#include "gram_avx512.h"
#include "tiling.h"

namespace regmean_fast {
namespace kernels {

void ThreadRunner::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& body) const {
  if (n <= 0) return;
  const int64_t parts = std::min<int64_t>(threads_, n);
  if (parts == 1) {
    body(0, n);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t p = 1; p < parts; ++p) {
    int64_t b, e;
    split_range(n, parts, p, &b, &e);
    pool.emplace_back([&body, b, e] { body(b, e); });
  }
  int64_t b, e;
  split_range(n, parts, 0, &b, &e);
  body(b, e);
  for (auto& t : pool) t.join();
}

// ---------------------------------------------------------------------------------------------
// BLAS path.

namespace {

// Rows per BLAS call: MKL's LP64 interface takes 32-bit sizes.
constexpr int64_t kMaxBlasRows = int64_t(1) << 30;
// Largest diagonal block of the BLAS path's recursive triangle (computed whole, in a scratch tile).
// 512: at d = 768 and 3072 (~750 rows) 256 was at most ~10% faster on an idle machine but makes
// twice the BLAS calls, and each call is a parallel region that stalls when the cores are shared
// (measured 2x slower than 512 on a busy 2-thread machine).
constexpr int64_t kBlasBlock = 512;

// One GEMM C[m x n] (+)= sum_r X[r, i0 + a] * X[r, j0 + b] for the selected path.
void blas_xtx(CpuGemmPath path, const void* X, DType dt, int64_t rows, int64_t ldx, int64_t i0,
              int64_t m, int64_t j0, int64_t n, float beta, float* C, int64_t ldc) {
  const BlasTable& t = blas();
  const int64_t es = dtype_size(dt);
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxBlasRows) {
    const int k = static_cast<int>(std::min(kMaxBlasRows, rows - r0));
    const char* base = static_cast<const char*>(X) + r0 * ldx * es;
    const float b = r0 == 0 ? beta : 1.0f;
    if (path == CpuGemmPath::BlasF32) {
      // Column-major view: X is the d x rows matrix Xc = X^T with ld = ldx. C (col-major, ldc)
      // at C + 0 is the row-major block we want, transposed; the block of X^T X is symmetric in
      // (i, j) so C_cm[b, a] = sum_r X[r, j0+b] X[r, i0+a] is what sgemm computes with A = Xc
      // rows j0.., B = Xc rows i0.. transposed.
      const float* xf = reinterpret_cast<const float*>(base);
      const int mm = static_cast<int>(n), nn = static_cast<int>(m), lda = static_cast<int>(ldx),
                ldcc = static_cast<int>(ldc);
      const float one = 1.0f;
      t.sgemm("N", "T", &mm, &nn, &k, &one, xf + j0, &lda, xf + i0, &lda, &b, C, &ldcc);
    } else {
      const uint16_t* xh = reinterpret_cast<const uint16_t*>(base);
      t.gemm_bf16(kCblasRowMajor, kCblasTrans, kCblasNoTrans, static_cast<int>(m), static_cast<int>(n), k,
         1.0f, xh + i0, static_cast<int>(ldx), xh + j0, static_cast<int>(ldx), b, C,
         static_cast<int>(ldc));
    }
  }
}

// Rows widened at a time when fp16 or bf16 goes through sgemm (MKL's f16 GEMM has no fast kernel on
// CPUs without AMX-FP16: measured 2x slower than widening here).
constexpr int64_t kWidenRows = 1024;

// The scratch tile of the diagonal blocks, kept per thread: allocating (and zeroing) it on every
// call cost ~0.1 ms, as much as a d=768 update's GEMMs at a few hundred rows.
float* scratch_tile(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

// The upper triangle of the diagonal block [i0, i0 + n)^2, recursively: two half-size triangles
// and one full GEMM for the square between them, so the GEMMs stay large (n/2 x n/2, better BLAS
// efficiency than many thin block-row panels; measured: a staircase of block rows was no faster)
// while the FLOPs stay (1/2 + O(kBlasBlock / d)) of the full product. Blocks of at most
// kBlasBlock go through a scratch tile so the strict lower triangle of G is never written.
void blas_triangle(float* G, int64_t d, const void* X, DType dt, int64_t rows, int64_t ldx, CpuGemmPath path,
                   int64_t i0, int64_t n) {
  if (n <= kBlasBlock) {
    float* scratch = scratch_tile(n * n);
    blas_xtx(path, X, dt, rows, ldx, i0, n, i0, n, 0.0f, scratch, n);
    // Serial: a few microseconds of adds, less than the cost of a parallel region.
    for (int64_t a = 0; a < n; ++a) {
      float* __restrict__ g = G + (i0 + a) * d + i0;
      const float* __restrict__ s = scratch + a * n;
      for (int64_t c = a; c < n; ++c) g[c] += s[c];
    }
    return;
  }
  const int64_t h = round_up(ceil_div(n, 2), 64);
  blas_triangle(G, d, X, dt, rows, ldx, path, i0, h);
  blas_xtx(path, X, dt, rows, ldx, i0, h, i0 + h, n - h, 1.0f, G + i0 * d + i0 + h, d);
  blas_triangle(G, d, X, dt, rows, ldx, path, i0 + h, n - h);
}

void gram_update_blas(float* G, int64_t d, const void* X, DType dt, int64_t rows, int64_t ldx,
                      CpuGemmPath path, const TaskRunner& runner) {
  if (path == CpuGemmPath::BlasF32 && dt != DType::F32) {
    std::vector<float> wide(static_cast<size_t>(std::min(kWidenRows, rows) * d));
    for (int64_t r0 = 0; r0 < rows; r0 += kWidenRows) {
      const int64_t nr = std::min(kWidenRows, rows - r0);
      runner.parallel_for(nr, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const uint16_t* src = static_cast<const uint16_t*>(X) + (r0 + r) * ldx;
          if (dt == DType::F16) {
            for (int64_t c = 0; c < d; ++c) wide[r * d + c] = f16_bits_to_float(src[c]);
          } else {
            for (int64_t c = 0; c < d; ++c) wide[r * d + c] = bf16_bits_to_float(src[c]);
          }
        }
      });
      gram_update_blas(G, d, wide.data(), DType::F32, nr, d, path, runner);
    }
    return;
  }
  // BLAS threads internally (MKL uses torch's OpenMP pool), so the calls run in order.
  blas_triangle(G, d, X, dt, rows, ldx, path, 0, d);
}

// ---------------------------------------------------------------------------------------------
// Portable path.

constexpr int64_t kTile = 64;       // tile side (both i and j)
constexpr int64_t kRowChunk = 512;  // rows packed at a time
constexpr int kMR = 4;              // micro-kernel rows (i)
constexpr int kVec = 16;            // floats per vector
constexpr int kNV = kTile / kVec;   // vectors per micro-kernel row (j)

typedef float vfloat __attribute__((vector_size(kVec * sizeof(float))));
typedef float vfloat_u __attribute__((vector_size(kVec * sizeof(float)), aligned(4)));

// Packed layout of a chunk of nr rows: column block b (kTile wide, zero-padded past d) is a
// contiguous [nr x kTile] panel, so the micro-kernel streams both operands with unit stride.
inline float* panel(float* P, int64_t b, int64_t nr) { return P + b * nr * kTile; }

// out[a][c] = sum_r Pi[r, a] * Pj[r, c] for a < kMR, c < kTile, where Pi = panel_i + a0 and
// Pj = panel_j (rows of kTile floats). Padding is zero, so there is no edge case here.
inline void micro_kernel(const float* pi, const float* pj, int64_t nr, float* out) {
  vfloat acc[kMR][kNV];
  for (int a = 0; a < kMR; ++a)
    for (int v = 0; v < kNV; ++v) acc[a][v] = vfloat{};
  for (int64_t r = 0; r < nr; ++r) {
    const float* ri = pi + r * kTile;
    const float* rj = pj + r * kTile;
    vfloat bj[kNV];
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) bj[v] = *reinterpret_cast<const vfloat_u*>(rj + v * kVec);
#pragma GCC unroll 4
    for (int a = 0; a < kMR; ++a) {
      const float s = ri[a];
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) acc[a][v] += s * bj[v];
    }
  }
  for (int a = 0; a < kMR; ++a)
    for (int v = 0; v < kNV; ++v) std::memcpy(out + a * kTile + v * kVec, &acc[a][v], sizeof(vfloat));
}

template <typename Load>
void pack_rows(const char* X, int64_t es, int64_t ldx, int64_t d, int64_t nb, int64_t r0, int64_t nr, int64_t rb,
               int64_t re, float* P, Load load) {
  for (int64_t r = rb; r < re; ++r) {
    const char* src = X + (r0 + r) * ldx * es;
    for (int64_t b = 0; b < nb; ++b) {
      float* dst = panel(P, b, nr) + r * kTile;
      const int64_t c0 = b * kTile, w = block_extent(b, kTile, d);
      for (int64_t c = 0; c < w; ++c) dst[c] = load(src, c0 + c);
      for (int64_t c = w; c < kTile; ++c) dst[c] = 0.0f;
    }
  }
}

void gram_update_portable(float* G, int64_t d, const void* X, DType dt, int64_t rows, int64_t ldx,
                          const TaskRunner& runner) {
  const int64_t nb = ceil_div(d, kTile);
  const int64_t ntiles = triangle_tile_count(nb);
  const int64_t chunk = std::min(kRowChunk, rows);
  std::vector<float> P(static_cast<size_t>(chunk * nb * kTile));
  const int64_t es = dtype_size(dt);
  const char* xb = static_cast<const char*>(X);
  for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
    const int64_t nr = std::min(kRowChunk, rows - r0);
    runner.parallel_for(nr, [&](int64_t b, int64_t e) {
      // One instantiation per type keeps the widening loop branch-free.
      switch (dt) {
        case DType::F32:
          pack_rows(xb, es, ldx, d, nb, r0, nr, b, e, P.data(),
                    [](const char* p, int64_t c) { return reinterpret_cast<const float*>(p)[c]; });
          break;
        case DType::BF16:
          pack_rows(xb, es, ldx, d, nb, r0, nr, b, e, P.data(), [](const char* p, int64_t c) {
            return bf16_bits_to_float(reinterpret_cast<const uint16_t*>(p)[c]);
          });
          break;
        case DType::F16:
          pack_rows(xb, es, ldx, d, nb, r0, nr, b, e, P.data(), [](const char* p, int64_t c) {
            return f16_bits_to_float(reinterpret_cast<const uint16_t*>(p)[c]);
          });
          break;
      }
    });
    runner.parallel_for(ntiles, [&](int64_t tb, int64_t te) {
      alignas(64) float out[kMR * kTile];
      for (int64_t t = tb; t < te; ++t) {
        int64_t bi, bj;
        triangle_tile_coords(t, nb, &bi, &bj);
        const int64_t i0 = bi * kTile, j0 = bj * kTile;
        const int64_t iend = std::min(i0 + kTile, d), jend = std::min(j0 + kTile, d);
        const float* pi = panel(P.data(), bi, nr);
        const float* pj = panel(P.data(), bj, nr);
        for (int64_t ii = i0; ii < iend; ii += kMR) {
          micro_kernel(pi + (ii - i0), pj, nr, out);
          for (int64_t a = 0; a < kMR && ii + a < iend; ++a) {
            const int64_t i = ii + a;
            const int64_t jstart = std::max(j0, i);  // upper triangle only
            float* g = G + i * d;
            const float* o = out + a * kTile - j0;
            for (int64_t j = jstart; j < jend; ++j) g[j] += o[j];
          }
        }
      }
    });
  }
}

}  // namespace

void cpu_blas_summary(char* buf, int64_t buflen) {
  const BlasTable& t = blas();
  if (!t.gemm_bf16 && !t.sgemm) {
    std::snprintf(buf, static_cast<size_t>(buflen), "none");
    return;
  }
  std::snprintf(buf, static_cast<size_t>(buflen), "%s:%s%s", t.source, t.gemm_bf16 ? " bf16" : "",
                t.sgemm ? " f32" : "");
}

void gram_update_cpu_path(float* G, int64_t d, const void* X, DType dt, int64_t rows, int64_t ldx,
                          const TaskRunner& runner, CpuGemmPath path) {
  if (d <= 0 || rows <= 0) return;
  // A path that does not fit the data or cannot run here falls back to the portable one.
  const bool usable = cpu_path_available(path, cpu_features(), cpu_libs()) && cpu_path_takes(path, dt);
  if (usable && path == CpuGemmPath::Avx512Bf16) {
    gram_update_avx512bf16(G, d, static_cast<const uint16_t*>(X), rows, ldx, runner);
  } else if (usable && path == CpuGemmPath::Avx512) {
    gram_update_avx512f32(G, d, X, dt, rows, ldx, runner);
  } else if (usable && path != CpuGemmPath::Portable && d <= INT_MAX && ldx <= INT_MAX) {
    gram_update_blas(G, d, X, dt, rows, ldx, path, runner);
  } else {
    gram_update_portable(G, d, X, dt, rows, ldx, runner);
  }
}

void gram_update_cpu(float* G, int64_t d, const void* X, DType dt, int64_t rows, int64_t ldx,
                     const TaskRunner& runner) {
  gram_update_cpu_path(G, d, X, dt, rows, ldx, runner, cpu_gemm_path(dt));
}

bool have_bf16_gemm() { return blas().gemm_bf16 != nullptr; }

void gemm_bf16_accumulate(int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* A, int64_t lda,
                          bool trans_a, const uint16_t* B, int64_t ldb, float* C, int64_t ldc) {
  if (m <= 0 || n <= 0 || k <= 0) return;
  blas().gemm_bf16(kCblasRowMajor, trans_a ? kCblasTrans : kCblasNoTrans, kCblasNoTrans, static_cast<int>(m),
                   static_cast<int>(n), static_cast<int>(k), alpha, A, static_cast<int>(lda), B,
                   static_cast<int>(ldb), 1.0f, C, static_cast<int>(ldc));
}

void split_bf16x3_cpu(const float* x, int64_t n, uint16_t* out, const TaskRunner& runner) {
  runner.parallel_for(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) split_bf16x3(x[i], out + i, n);
  });
}

void symmetrize_cpu(float* G, int64_t d, const TaskRunner& runner) {
  // Tile pairs (bi <= bj): the lower tile (bj, bi) is the transpose of the upper (bi, bj).
  const int64_t nb = ceil_div(d, kTile);
  runner.parallel_for(triangle_tile_count(nb), [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      int64_t bi, bj;
      triangle_tile_coords(t, nb, &bi, &bj);
      const int64_t i0 = bi * kTile, iend = std::min(i0 + kTile, d);
      const int64_t j0 = bj * kTile, jend = std::min(j0 + kTile, d);
      for (int64_t i = i0; i < iend; ++i)
        for (int64_t j = std::max(j0, i + 1); j < jend; ++j) G[j * d + i] = G[i * d + j];
    }
  });
}

}  // namespace kernels
}  // namespace regmean_fast
