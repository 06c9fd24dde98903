// Run-time resolution of the BLAS/LAPACK already in the process (torch's MKL). No torch headers:
// the entry points are looked up with dlsym, so the kernels link against nothing.
#pragma once

#include <cstdint>

namespace regmean_fast {
namespace kernels {

constexpr int kCblasRowMajor = 101;
constexpr int kCblasColMajor = 102;
constexpr int kCblasNoTrans = 111;
constexpr int kCblasTrans = 112;

using GemmHalfFn = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc);
using SgemmFn = void (*)(const char* transa, const char* transb, const int* m, const int* n,
                         const int* k, const float* alpha, const float* a, const int* lda,
                         const float* b, const int* ldb, const float* beta, float* c,
                         const int* ldc);
// LAPACK's Cholesky factorisation and solve (Fortran interface, 32-bit integers).
template <typename T>
using PotrfFn = void (*)(const char* uplo, const int* n, T* a, const int* lda, int* info);
template <typename T>
using PotrsFn = void (*)(const char* uplo, const int* n, const int* nrhs, const T* a, const int* lda, T* b,
                         const int* ldb, int* info);

struct BlasTable {
  GemmHalfFn gemm_bf16 = nullptr;
  SgemmFn sgemm = nullptr;
  PotrfFn<float> spotrf = nullptr;
  PotrsFn<float> spotrs = nullptr;
  PotrfFn<double> dpotrf = nullptr;
  PotrsFn<double> dpotrs = nullptr;
  const char* source = "none";
};

// The entry points found (each may be null). Only libraries already in the process are searched
// (RTLD_NOLOAD): we never load a BLAS of our own, we use the one torch (or the host program) brought.
const BlasTable& blas();

}  // namespace kernels
}  // namespace regmean_fast
