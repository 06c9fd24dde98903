// In-place Cholesky solve on the CPU with the LAPACK already in the process (blas_cpu.h). No torch.
#pragma once

#include <cstdint>

#include "gram_cpu.h"

namespace regmean_fast {
namespace kernels {

// True when LAPACK's potrf/potrs for T (float or double) were found in the process.
template <typename T>
bool have_spd_solve();

// Solves X A = Bt in place (Bt <- Bt A^-1), i.e. A X^T = Bt^T, for a symmetric positive definite A
// (d x d, row-major; only its upper triangle is read) and Bt (n x d, row-major). Row-major Bt is
// LAPACK's column-major d x n right-hand side, so nothing is copied or transposed.
// info = {potrf info (k > 0: the leading minor of order k is not positive definite), factor
// non-finite, potrs info}, the layout of the CUDA spd_solve. On success (info[0] == info[1] == 0)
// A's upper triangle holds the factor U (A = U^T U); otherwise A is restored from its strict lower
// triangle and saved diagonal (unchanged when A was symmetric) and Bt is untouched.
// factored: A's upper triangle already holds U (from an earlier successful call): potrs only, A is
// not touched (this solves further right-hand sides with one factorisation).
// Requires have_spd_solve<T>().
template <typename T>
void spd_solve_inplace_cpu(T* A, int64_t d, T* Bt, int64_t n, bool factored, int32_t info[3],
                           const TaskRunner& runner);

}  // namespace kernels
}  // namespace regmean_fast
