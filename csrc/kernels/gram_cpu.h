// CPU kernels for Gram accumulation. Raw pointers only; threads come from the caller through a
// TaskRunner so that the torch binding can use torch's own pool (no second OpenMP runtime).
#pragma once

#include <cstdint>
#include <functional>

#include "common.h"
#include "cpu_path.h"

namespace regmean_fast {
namespace kernels {

// Runs body(begin, end) over [0, n) in parallel chunks. The torch binding wraps at::parallel_for.
class TaskRunner {
 public:
  virtual ~TaskRunner() = default;
  virtual void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& body) const = 0;
};

class SerialRunner final : public TaskRunner {
 public:
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& body) const override {
    if (n > 0) body(0, n);
  }
};

// std::thread pool-less runner for tests and the CMake-only build.
class ThreadRunner final : public TaskRunner {
 public:
  explicit ThreadRunner(int threads) : threads_(threads < 1 ? 1 : threads) {}
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& body) const override;

 private:
  int threads_;
};

// Summary of the fast BLAS entry points that were found at run time (for build_info).
// Writes e.g. "libtorch_cpu.so: bf16 f32" or "none" into buf.
void cpu_blas_summary(char* buf, int64_t buflen);

// G[i, j] += sum_r X[r, i] * X[r, j] for every i <= j (the strict lower triangle is not touched).
//   G:    d x d fp32, row-major, leading dimension d.
//   X:    rows x d, row-major with row stride ldx elements and unit column stride, of type dt.
void gram_update_cpu(float* G, int64_t d, const void* X, DType dt, int64_t rows, int64_t ldx,
                     const TaskRunner& runner);

// Same contract, forcing one path (tests compare paths). A path that cannot run here, or not on dt,
// runs the portable kernel instead.
void gram_update_cpu_path(float* G, int64_t d, const void* X, DType dt, int64_t rows, int64_t ldx,
                          const TaskRunner& runner, CpuGemmPath path);

// True when a bf16 x bf16 -> fp32 GEMM (MKL's cblas_gemm_bf16bf16f32) is in the process: it can run,
// which says nothing of its speed (fast with AMX only: see cpu_path.h).
bool have_bf16_gemm();

// C[m x n] += alpha * op(A) B with fp32 accumulation; A, B bfloat16, C float32, all row-major.
// op(A) = A ([m x k], row stride lda) or, with trans_a, A^T (A stored [k x m], row stride lda).
// B is [k x n] with row stride ldb; C has row stride ldc. Requires have_bf16_gemm().
void gemm_bf16_accumulate(int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* A, int64_t lda,
                          bool trans_a, const uint16_t* B, int64_t ldb, float* C, int64_t ldc);

// Three bfloat16 slices with x[i] == s0[i] + s1[i] + s2[i] exactly (for normal numbers): s0 is x
// rounded to bf16, s1 the rounded remainder, s2 the rest (which fits in 8 bits). out holds 3 * n
// elements: s0, then s1, then s2. A product of a bf16 matrix with x through three bf16 GEMMs with
// fp32 accumulation is then as accurate as an fp32 GEMM (every bf16 x bf16 product is exact).
void split_bf16x3_cpu(const float* x, int64_t n, uint16_t* out, const TaskRunner& runner);

// Copy the upper triangle of the d x d row-major matrix G into the lower triangle.
void symmetrize_cpu(float* G, int64_t d, const TaskRunner& runner);

}  // namespace kernels
}  // namespace regmean_fast
