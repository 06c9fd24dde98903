// Argument checks and row selection shared by the CPU and CUDA bindings. The messages match the
// Python-side contract in regmean_fast/ops.py word for word.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <optional>
#include <vector>

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

// Order of a matrix from a Gram argument: [d, d] (full) or [d (d + 1) / 2] (packed upper triangle).
inline int64_t gram_order(const at::Tensor& g, const char* op) {
  if (g.dim() == 2) {
    TORCH_CHECK_VALUE(g.size(0) == g.size(1), op, ": a full Gram must be square, got shape ", g.sizes());
    return g.size(0);
  }
  TORCH_CHECK_VALUE(g.dim() == 1, op, ": a Gram must be [d, d] or a packed [d (d + 1) / 2] triangle, got shape ",
                    g.sizes());
  const int64_t n = g.size(0);
  auto packed_size = [](int64_t k) { return k * (k + 1) / 2; };
  int64_t d = static_cast<int64_t>((std::sqrt(8.0 * static_cast<double>(n) + 1.0) - 1.0) / 2.0);
  while (packed_size(d) < n) ++d;
  while (d > 0 && packed_size(d) > n) --d;
  TORCH_CHECK_VALUE(packed_size(d) == n, op, ": ", n, " is not the size of a packed triangle");
  return d;
}

// What gram_reduce's arguments describe, once checked.
struct GramReduceArgs {
  int64_t d;
  bool packed;
  at::ScalarType out_type;
};

inline GramReduceArgs check_gram_reduce_args(at::TensorList grams, at::ArrayRef<double> factors, double alpha,
                                             std::optional<at::ScalarType> dtype) {
  TORCH_CHECK_VALUE(!grams.empty(), "gram_reduce: no Grams given");
  TORCH_CHECK_VALUE(factors.size() == grams.size(), "gram_reduce: ", factors.size(), " factors for ", grams.size(),
                    " Grams");
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "gram_reduce: alpha must be in [0, 1], got ", alpha);
  const at::ScalarType out_type = dtype.value_or(at::kFloat);
  TORCH_CHECK_TYPE(out_type == at::kFloat || out_type == at::kDouble,
                   "gram_reduce: dtype must be float32 or float64, got ", out_type);
  const bool packed = grams[0].dim() == 1;
  const int64_t d = gram_order(grams[0], "gram_reduce");
  for (const at::Tensor& g : grams) {
    TORCH_CHECK_TYPE(g.scalar_type() == at::kFloat, "gram_reduce: Grams must be float32, got ", g.scalar_type());
    TORCH_CHECK_VALUE(g.sizes() == grams[0].sizes(), "gram_reduce: all Grams must have one shape, got ", g.sizes(),
                      " and ", grams[0].sizes());
    TORCH_CHECK_VALUE(g.is_contiguous(), "gram_reduce: Grams must be contiguous");
    TORCH_CHECK_VALUE(g.device() == grams[0].device(), "gram_reduce: Grams must be on one device");
  }
  return {d, packed, out_type};
}

inline int64_t check_unpack_triu_args(const at::Tensor& packed) {
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kFloat, "unpack_triu: packed must be float32, got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 1 && packed.is_contiguous(), "unpack_triu: packed must be a contiguous 1-D tensor");
  return gram_order(packed, "unpack_triu");
}

// spd_solve(A, B): A [n, n] and B [n, k], one float dtype (float32 or float64), one device.
inline void check_spd_solve_args(const at::Tensor& A, const at::Tensor& B) {
  TORCH_CHECK_TYPE(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
                   "spd_solve: A must be float32 or float64, got ", A.scalar_type());
  TORCH_CHECK_TYPE(B.scalar_type() == A.scalar_type(), "spd_solve: A and B must have one dtype, got ",
                   A.scalar_type(), " and ", B.scalar_type());
  TORCH_CHECK_VALUE(A.dim() == 2 && A.size(0) == A.size(1), "spd_solve: A must be a square matrix, got shape ",
                    A.sizes());
  TORCH_CHECK_VALUE(B.dim() == 2 && B.size(0) == A.size(0), "spd_solve: B must be [", A.size(0),
                    ", k], got shape ", B.sizes());
  TORCH_CHECK_VALUE(A.device() == B.device(), "spd_solve: A and B must be on one device, got ", A.device(), " and ",
                    B.device());
}

// split_bf16x3: x float32 (any shape); allocates out [3, *x.shape] bfloat16, returns x contiguous.
inline at::Tensor split_bf16x3_operands(const at::Tensor& x, at::Tensor* out) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "split_bf16x3: x must be float32, got ", x.scalar_type());
  at::Tensor c = x.contiguous();
  std::vector<int64_t> shape{3};
  for (int64_t s : c.sizes()) shape.push_back(s);
  *out = at::empty(shape, c.options().dtype(at::kBFloat16));
  return c;
}

// addmm_bf16x3_'s operands as the GEMMs take them: A row-major ([m, k], unit column stride) or
// column-major (a transposed view, trans_a) without a copy, else a contiguous copy; Bs contiguous.
struct Bf16x3Operands {
  at::Tensor a, b;
  bool trans_a = false;
  int64_t lda = 0, ldc = 0;
  bool empty = false;
};

inline Bf16x3Operands check_addmm_bf16x3_args(const at::Tensor& C, const at::Tensor& A, const at::Tensor& Bs) {
  TORCH_CHECK_TYPE(C.scalar_type() == at::kFloat, "addmm_bf16x3_: C must be float32, got ", C.scalar_type());
  TORCH_CHECK_TYPE(A.scalar_type() == at::kBFloat16 && Bs.scalar_type() == at::kBFloat16,
                   "addmm_bf16x3_: A and Bs must be bfloat16, got ", A.scalar_type(), " and ", Bs.scalar_type());
  TORCH_CHECK_VALUE(C.dim() == 2 && A.dim() == 2 && Bs.dim() == 3 && Bs.size(0) == 3,
                    "addmm_bf16x3_: expected C [m, n], A [m, k], Bs [3, k, n], got ", C.sizes(), ", ", A.sizes(),
                    ", ", Bs.sizes());
  TORCH_CHECK_VALUE(A.size(0) == C.size(0) && A.size(1) == Bs.size(1) && Bs.size(2) == C.size(1),
                    "addmm_bf16x3_: shapes do not chain: C ", C.sizes(), ", A ", A.sizes(), ", Bs ", Bs.sizes());
  TORCH_CHECK_VALUE(C.stride(1) == 1 || C.size(1) == 1, "addmm_bf16x3_: C's rows must be contiguous");
  TORCH_CHECK_VALUE(A.device() == C.device() && Bs.device() == C.device(),
                    "addmm_bf16x3_: C, A and Bs must be on the same device, got ", C.device(), ", ", A.device(),
                    " and ", Bs.device());
  Bf16x3Operands op;
  const int64_t k = A.size(1);
  op.empty = C.size(0) == 0 || C.size(1) == 0 || k == 0;
  op.a = A;
  if (!(op.a.stride(1) == 1 || op.a.size(1) == 1)) {
    if (op.a.stride(0) == 1) {
      op.trans_a = true;
    } else {
      op.a = op.a.contiguous();
    }
  }
  op.lda = op.trans_a ? op.a.stride(1) : (op.a.size(0) > 1 ? op.a.stride(0) : k);
  op.ldc = C.size(0) > 1 ? C.stride(0) : C.size(1);
  op.b = Bs.contiguous();
  return op;
}

// gram_term(G, factor, alpha, A, S): G float32 [d, d] contiguous; A (optional) float32 [d, d] contiguous;
// S (optional) float32 [d, d] or bfloat16 [3, d, d], contiguous; all on G's device.
inline void check_gram_term_args(const at::Tensor& G, const c10::optional<at::Tensor>& A,
                                 const c10::optional<at::Tensor>& S) {
  check_square_f32(G, "gram_term");
  const int64_t d = G.size(0);
  if (A.has_value()) {
    TORCH_CHECK_TYPE(A->scalar_type() == at::kFloat, "gram_term: A must be float32, got ", A->scalar_type());
    TORCH_CHECK_VALUE(A->dim() == 2 && A->size(0) == d && A->size(1) == d && A->is_contiguous(),
                      "gram_term: A must be a contiguous [", d, ", ", d, "] matrix, got shape ", A->sizes());
    TORCH_CHECK_VALUE(A->device() == G.device(), "gram_term: A must be on G's device");
  }
  if (S.has_value()) {
    const bool f32 = S->scalar_type() == at::kFloat && S->dim() == 2 && S->size(0) == d && S->size(1) == d;
    const bool split = S->scalar_type() == at::kBFloat16 && S->dim() == 3 && S->size(0) == 3 && S->size(1) == d &&
                       S->size(2) == d;
    TORCH_CHECK_VALUE(f32 || split, "gram_term: S must be float32 [", d, ", ", d, "] or bfloat16 [3, ", d, ", ", d,
                      "], got ", S->scalar_type(), " ", S->sizes());
    TORCH_CHECK_VALUE(S->is_contiguous(), "gram_term: S must be contiguous");
    TORCH_CHECK_VALUE(S->device() == G.device(), "gram_term: S must be on G's device");
  }
}

// spd_solve_(A, Bt): A [d, d] and Bt [n, d], contiguous, one float dtype (float32 or float64), one device.
inline void check_spd_solve_inplace_args(const at::Tensor& A, const at::Tensor& Bt) {
  TORCH_CHECK_TYPE(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
                   "spd_solve_: A must be float32 or float64, got ", A.scalar_type());
  TORCH_CHECK_TYPE(Bt.scalar_type() == A.scalar_type(), "spd_solve_: A and Bt must have one dtype, got ",
                   A.scalar_type(), " and ", Bt.scalar_type());
  TORCH_CHECK_VALUE(A.dim() == 2 && A.size(0) == A.size(1), "spd_solve_: A must be a square matrix, got shape ",
                    A.sizes());
  TORCH_CHECK_VALUE(Bt.dim() == 2 && Bt.size(1) == A.size(0), "spd_solve_: Bt must be [k, ", A.size(0),
                    "], got shape ", Bt.sizes());
  TORCH_CHECK_VALUE(A.is_contiguous() && Bt.is_contiguous(), "spd_solve_: A and Bt must be contiguous");
  TORCH_CHECK_VALUE(A.device() == Bt.device(), "spd_solve_: A and Bt must be on one device, got ", A.device(), " and ",
                    Bt.device());
}

}  // namespace binding
}  // namespace regmean_fast
