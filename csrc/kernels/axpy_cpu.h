// acc (=|+=) c * x with x widened from its stored type: the weighted sums of the merge (average, linear,
// task arithmetic) straight from the bytes read from a checkpoint, without an fp32 copy of each model's
// tensor first. CPU; raw pointers; no torch. The pure-PyTorch reference: regmean_fast.ops.torch_scaled_add_.
#pragma once

#include <cstdint>

#include "gram_cpu.h"

namespace regmean_fast {
namespace kernels {

// acc[j] = c * x[j] (assign) or acc[j] += c * x[j], j < n; x of type dt (bf16/fp16 widened exactly), fp32
// arithmetic, one rounding per operation, never fused (so every build gives the same bits; torch's vectorised
// add_(x, alpha=c) fuses, so it may differ from this in the last bit).
void scaled_add_cpu(float* acc, const void* x, DType dt, int64_t n, float c, bool assign, const TaskRunner& runner);

}  // namespace kernels
}  // namespace regmean_fast
