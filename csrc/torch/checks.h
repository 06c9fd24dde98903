// Argument checks and row selection shared by the CPU and CUDA bindings. The messages match the
// Python-side contract in regmean_fast/ops.py word for word.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "../kernels/common.h"

namespace regmean_fast {
namespace binding {

inline kernels::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernels::DType::F32;
    case at::kBFloat16: return kernels::DType::BF16;
    case at::kHalf: return kernels::DType::F16;
    default: TORCH_CHECK_TYPE(false, "gram_update: X must be float32, bfloat16 or float16, got ", t);
  }
  return kernels::DType::F32;
}

inline void check_square_f32(const at::Tensor& G, const char* op) {
  TORCH_CHECK_TYPE(G.scalar_type() == at::kFloat, op, ": G must be float32, got ", G.scalar_type());
  TORCH_CHECK_VALUE(G.dim() == 2 && G.size(0) == G.size(1), op, ": G must be a square matrix, got shape ",
                    G.sizes());
  TORCH_CHECK_VALUE(G.is_contiguous(), op, ": G must be contiguous");
}

inline void check_gram_update_args(const at::Tensor& G, const at::Tensor& X,
                                   const c10::optional<at::Tensor>& mask) {
  check_square_f32(G, "gram_update");
  kernel_dtype(X.scalar_type());
  TORCH_CHECK_VALUE(X.dim() >= 1 && X.size(-1) == G.size(0), "gram_update: X's last dimension must equal G's size ",
                    G.size(0), ", got shape ", X.sizes());
  TORCH_CHECK_VALUE(X.device() == G.device(), "gram_update: G and X must be on the same device, got ", G.device(),
                    " and ", X.device());
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "gram_update: mask must be bool, got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.device() == X.device(), "gram_update: mask must be on X's device ", X.device(), ", got ",
                      m.device());
    auto rows_shape = X.sizes().slice(0, X.dim() - 1);
    bool ok = m.dim() <= static_cast<int64_t>(rows_shape.size());
    for (int64_t k = 1; ok && k <= m.dim(); ++k) {
      const int64_t ms = m.size(-k), xs = rows_shape[rows_shape.size() - k];
      ok = ms == xs || ms == 1;
    }
    TORCH_CHECK_VALUE(ok, "gram_update: mask of shape ", m.sizes(), " does not broadcast to X's rows ", rows_shape);
  }
}

// X [..., d] -> a 2-D view (or copy) with unit column stride: [rows, d], row stride = stride(0).
inline at::Tensor rows_2d(const at::Tensor& X) {
  at::Tensor x2 = X.reshape({-1, X.size(-1)});
  if (x2.size(1) > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  if (x2.size(0) > 1 && x2.stride(0) < x2.size(1)) x2 = x2.contiguous();
  return x2;
}

// The flattened bool mask over X's rows.
inline at::Tensor flat_mask(const at::Tensor& X, const at::Tensor& mask) {
  return mask.expand(X.sizes().slice(0, X.dim() - 1)).reshape({-1});
}

}  // namespace binding
}  // namespace regmean_fast
