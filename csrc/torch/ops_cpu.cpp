// Operator definitions (the schema lives here, once) and their CPU implementations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/gram_cpu.h"
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

}  // namespace

TORCH_LIBRARY(regmean_fast, m) {
  m.def("gram_update(Tensor(a!) G, Tensor X, Tensor? mask=None) -> ()");
  m.def("symmetrize_(Tensor(a!) G) -> ()");
}

TORCH_LIBRARY_IMPL(regmean_fast, CPU, m) {
  m.impl("gram_update", &gram_update_cpu);
  m.impl("symmetrize_", &symmetrize_cpu);
}

}  // namespace binding
}  // namespace regmean_fast
