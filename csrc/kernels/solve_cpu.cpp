// LAPACK straight on the caller's buffers: torch.linalg.cholesky_ex + cholesky_solve copy A and B
// into column-major clones and zero the factor's other triangle first, which costs as much as the
// factorisation itself at d = 1024 (measured 3.7 ms spotrf against 13.6 ms through torch).
#include "solve_cpu.h"

#include <atomic>
#include <cmath>
#include <vector>

#include "blas_cpu.h"

namespace regmean_fast {
namespace kernels {

namespace {

template <typename T>
struct Lapack;
template <>
struct Lapack<float> {
  static PotrfFn<float> potrf() { return blas().spotrf; }
  static PotrsFn<float> potrs() { return blas().spotrs; }
};
template <>
struct Lapack<double> {
  static PotrfFn<double> potrf() { return blas().dpotrf; }
  static PotrsFn<double> potrs() { return blas().dpotrs; }
};

}  // namespace

template <typename T>
bool have_spd_solve() {
  return Lapack<T>::potrf() != nullptr && Lapack<T>::potrs() != nullptr;
}

template <typename T>
void spd_solve_inplace_cpu(T* A, int64_t d, T* Bt, int64_t n, bool factored, int32_t info[3],
                           const TaskRunner& runner) {
  info[0] = info[1] = info[2] = 0;
  if (d == 0) return;
  // Row-major upper triangle = column-major lower: uplo "L".
  const int dd = static_cast<int>(d), nn = static_cast<int>(n);
  int status = 0;
  if (factored) {
    if (n > 0) Lapack<T>::potrs()("L", &dd, &nn, A, &dd, Bt, &dd, &status);
    info[2] = status;
    return;
  }
  std::vector<T> diag(static_cast<size_t>(d));
  for (int64_t i = 0; i < d; ++i) diag[i] = A[i * d + i];
  Lapack<T>::potrf()("L", &dd, A, &dd, &status);
  info[0] = status;
  if (status == 0) {
    std::atomic<bool> finite{true};
    runner.parallel_for(d, [&](int64_t b, int64_t e) {
      bool ok = true;
      for (int64_t i = b; i < e; ++i)
        for (int64_t j = i; j < d; ++j) ok = ok && std::isfinite(A[i * d + j]);
      if (!ok) finite.store(false, std::memory_order_relaxed);
    });
    info[1] = finite.load() ? 0 : 1;
  }
  if (info[0] != 0 || info[1] != 0) {
    runner.parallel_for(d, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        A[i * d + i] = diag[i];
        for (int64_t j = i + 1; j < d; ++j) A[i * d + j] = A[j * d + i];
      }
    });
    return;
  }
  if (n == 0) return;
  Lapack<T>::potrs()("L", &dd, &nn, A, &dd, Bt, &dd, &status);
  info[2] = status;
}

template bool have_spd_solve<float>();
template bool have_spd_solve<double>();
template void spd_solve_inplace_cpu<float>(float*, int64_t, float*, int64_t, bool, int32_t[3], const TaskRunner&);
template void spd_solve_inplace_cpu<double>(double*, int64_t, double*, int64_t, bool, int32_t[3],
                                            const TaskRunner&);

}  // namespace kernels
}  // namespace regmean_fast
