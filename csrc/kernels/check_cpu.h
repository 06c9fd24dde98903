// One-pass validity checks of tensors read from files (weights, Grams), CPU. No torch.
#pragma once

#include <cstdint>

#include "gram_cpu.h"

namespace regmean_fast {
namespace kernels {

// True when no element of x (n elements of type dt, contiguous) is inf or NaN. Tests exponent
// bits, so it vectorises and never touches the floating-point unit's flags.
bool all_finite_cpu(const void* x, DType dt, int64_t n, const TaskRunner& runner);

// Summary of a square fp32 matrix G (d x d, row-major) in one pass over its tile pairs:
// finite = every element finite; max_abs = max |G[i,j]|; max_asym = max |G[i,j] - G[j,i]|.
struct SymmetryStats {
  bool finite;
  float max_abs;
  float max_asym;
  float min_diag;
};
SymmetryStats symmetry_stats_cpu(const float* G, int64_t d, const TaskRunner& runner);

// One model's RegMean term from its raw Gram G (d x d fp32, row-major) and G's SymmetryStats
// (returned): S = factor (alpha G + (1 - alpha) diag(G)), elementwise from G as given. Each output is
// optional (null = skip): A's upper triangle (diagonal included) += S's, its strict lower triangle
// untouched (symmetrize it before reading it); s_f32 = S (d x d fp32); s_bf16 = the bf16x3 slices of
// S (3 x d x d, see split_bf16x3). The outputs are meaningful only when the stats say G is finite.
SymmetryStats gram_term_cpu(const float* G, int64_t d, double factor, double alpha, float* A, float* s_f32,
                            uint16_t* s_bf16, const TaskRunner& runner);

}  // namespace kernels
}  // namespace regmean_fast
