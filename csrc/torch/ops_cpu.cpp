// Operator definitions (the schema lives here, once) and their CPU implementations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "../kernels/gram_cpu.h"
#include "../kernels/reduce_cpu.h"
#include "checks.h"

namespace regmean_fast {
namespace binding {
namespace {

// Kernels take their threads from torch's pool.
class AtenRunner final : public kernels::TaskRunner {
 public:
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& body) const override {
    at::parallel_for(0, n, 1, body);
  }
};

void gram_update_cpu(at::Tensor G, const at::Tensor& X, const c10::optional<at::Tensor>& mask) {
  check_gram_update_args(G, X, mask);
  at::Tensor rows = rows_2d(X);
  // Padding rows are gathered away once, so every GEMM sees only real tokens.
  if (mask.has_value()) rows = rows.index({flat_mask(X, *mask)});
  if (rows.size(0) == 0) return;
  kernels::gram_update_cpu(G.data_ptr<float>(), G.size(0), rows.const_data_ptr(), kernel_dtype(X.scalar_type()),
                           rows.size(0), rows.size(0) > 1 ? rows.stride(0) : rows.size(1), AtenRunner());
}

void symmetrize_cpu(at::Tensor G) {
  check_square_f32(G, "symmetrize_");
  kernels::symmetrize_cpu(G.data_ptr<float>(), G.size(0), AtenRunner());
}

// Order of a matrix from a Gram argument: [d, d] (full) or [d (d + 1) / 2] (packed upper triangle).
int64_t gram_order(const at::Tensor& g, const char* op) {
  if (g.dim() == 2) {
    TORCH_CHECK_VALUE(g.size(0) == g.size(1), op, ": a full Gram must be square, got shape ", g.sizes());
    return g.size(0);
  }
  TORCH_CHECK_VALUE(g.dim() == 1, op, ": a Gram must be [d, d] or a packed [d (d + 1) / 2] triangle, got shape ",
                    g.sizes());
  const int64_t n = g.size(0);
  int64_t d = static_cast<int64_t>((std::sqrt(8.0 * static_cast<double>(n) + 1.0) - 1.0) / 2.0);
  while (kernels::packed_size(d) < n) ++d;
  while (d > 0 && kernels::packed_size(d) > n) --d;
  TORCH_CHECK_VALUE(kernels::packed_size(d) == n, op, ": ", n, " is not the size of a packed triangle");
  return d;
}

at::Tensor gram_reduce_cpu(at::TensorList grams, at::ArrayRef<double> factors, double alpha,
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
  std::vector<const float*> ptrs;
  for (const at::Tensor& g : grams) {
    TORCH_CHECK_TYPE(g.scalar_type() == at::kFloat, "gram_reduce: Grams must be float32, got ", g.scalar_type());
    TORCH_CHECK_VALUE(g.sizes() == grams[0].sizes(), "gram_reduce: all Grams must have one shape, got ", g.sizes(),
                      " and ", grams[0].sizes());
    TORCH_CHECK_VALUE(g.is_contiguous(), "gram_reduce: Grams must be contiguous");
    TORCH_CHECK_VALUE(g.device() == grams[0].device(), "gram_reduce: Grams must be on one device");
    ptrs.push_back(g.const_data_ptr<float>());
  }
  at::Tensor A = at::empty({d, d}, grams[0].options().dtype(out_type));
  if (out_type == at::kFloat) {
    kernels::gram_reduce_cpu<float>(A.data_ptr<float>(), d, ptrs.data(), static_cast<int64_t>(ptrs.size()),
                                    factors.data(), alpha, packed, AtenRunner());
  } else {
    kernels::gram_reduce_cpu<double>(A.data_ptr<double>(), d, ptrs.data(), static_cast<int64_t>(ptrs.size()),
                                     factors.data(), alpha, packed, AtenRunner());
  }
  return A;
}

at::Tensor pack_triu_cpu(const at::Tensor& G) {
  check_square_f32(G, "pack_triu");
  const int64_t d = G.size(0);
  at::Tensor out = at::empty({kernels::packed_size(d)}, G.options());
  kernels::pack_upper_cpu(G.const_data_ptr<float>(), d, out.data_ptr<float>(), AtenRunner());
  return out;
}

at::Tensor unpack_triu_cpu(const at::Tensor& packed) {
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kFloat, "unpack_triu: packed must be float32, got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 1 && packed.is_contiguous(), "unpack_triu: packed must be a contiguous 1-D tensor");
  const int64_t d = gram_order(packed, "unpack_triu");
  at::Tensor G = at::empty({d, d}, packed.options());
  kernels::unpack_upper_cpu(packed.const_data_ptr<float>(), d, G.data_ptr<float>(), AtenRunner());
  return G;
}

}  // namespace

TORCH_LIBRARY(regmean_fast, m) {
  m.def("gram_update(Tensor(a!) G, Tensor X, Tensor? mask=None) -> ()");
  m.def("symmetrize_(Tensor(a!) G) -> ()");
  m.def("gram_reduce(Tensor[] grams, float[] factors, float alpha, ScalarType? dtype=None) -> Tensor");
  m.def("pack_triu(Tensor G) -> Tensor");
  m.def("unpack_triu(Tensor packed) -> Tensor");
}

TORCH_LIBRARY_IMPL(regmean_fast, CPU, m) {
  m.impl("gram_update", &gram_update_cpu);
  m.impl("symmetrize_", &symmetrize_cpu);
  m.impl("gram_reduce", &gram_reduce_cpu);
  m.impl("pack_triu", &pack_triu_cpu);
  m.impl("unpack_triu", &unpack_triu_cpu);
}

}  // namespace binding
}  // namespace regmean_fast
