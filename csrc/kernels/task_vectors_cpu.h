// The per-entry passes of the task-vector merges (ties, dare_ties, dare_linear), CPU, fp32, contiguous
// buffers. Raw pointers; no torch. The pure-PyTorch references are regmean_fast.ops.torch_magnitude_drop_,
// torch_dare_drop_ and torch_consensus_merge_ (the paths taken on other devices and dtypes).
#pragma once

#include <cstdint>

#include "gram_cpu.h"

namespace regmean_fast {
namespace kernels {

// DARE's random drop, in place: entry j of delta (n entries) is kept when word j of the Philox stream of
// `key` (philox.h) is below `threshold` (= ceil(density * 2^32), so P(keep) = density to 2^-32), else
// multiplied by 0 (as torch's mul by a bool mask: an inf dropped becomes NaN). l1[0] = sum |delta| before,
// l1[1] = after, in fp64, summed in chunks of a fixed size in a fixed order: the same bits on any number
// of threads and on either path: AVX-512 intrinsics where the CPU has them (allow_avx512: tests turn them
// off), else a loop the compiler vectorises.
void dare_drop_cpu(float* delta, int64_t n, const uint32_t key[2], uint64_t threshold, double l1[2],
                   const TaskRunner& runner, bool allow_avx512 = true);
bool dare_drop_avx512_compiled();  // this build has the AVX-512 path (the CPU may still lack it)

// TIES's magnitude sparsification, in place: keeps the k entries of delta (n entries) of largest magnitude,
// among equal magnitudes at the cut-off the earliest (flat index), and multiplies the others by 0 (as
// dare_drop_cpu). The k-th largest magnitude comes from a radix select over the magnitudes' bit patterns
// (16 then 15 bits, one histogram pass each); the kept ties from per-chunk counts. 1 <= k <= n. l1 as in
// dare_drop_cpu.
void magnitude_drop_cpu(float* delta, int64_t n, int64_t k, double l1[2], const TaskRunner& runner);

// TIES's sign consensus and disjoint mean, into base (n entries): with tau_i = coeffs[i] * deltas[i][j]
// (fp32), elected = +1 where tau_0 + ... + tau_{K-1} >= 0 (summed in that order) else -1; agree_i = sign(tau_i)
// == elected; mixed = sum of the agreeing tau_i, divisor = sum of the agreeing weights[i];
// base[j] += scaling * (normalize ? mixed / (divisor == 0 ? 1 : divisor) : mixed). All in fp32.
void consensus_merge_cpu(float* base, const float* const* deltas, int64_t K, const float* coeffs,
                         const float* weights, bool normalize, float scaling, int64_t n, const TaskRunner& runner);

}  // namespace kernels
}  // namespace regmean_fast
