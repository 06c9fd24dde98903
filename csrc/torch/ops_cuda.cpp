// CUDA implementations of the operators: argument checks, device guard, the caller's stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kernels/cuda/gram_cuda.h"
#include "checks.h"

namespace regmean_fast {
namespace binding {
namespace {

void gram_update_cuda(at::Tensor G, const at::Tensor& X, const c10::optional<at::Tensor>& mask) {
  check_gram_update_args(G, X, mask);
  const c10::cuda::CUDAGuard guard(G.device());
  at::Tensor rows = rows_2d(X);
  // Kept rows as an index list: the kernel reads them in place, no gathered copy of X.
  at::Tensor index;
  int64_t n_rows = rows.size(0);
  if (mask.has_value()) {
    index = at::nonzero(flat_mask(X, *mask)).reshape({-1}).contiguous();
    n_rows = index.size(0);
  }
  if (n_rows == 0) return;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const cudaError_t err = kernels::gram_update_cuda(
      G.data_ptr<float>(), G.size(0), rows.const_data_ptr(), kernel_dtype(X.scalar_type()),
      rows.size(0) > 1 ? rows.stride(0) : rows.size(1), index.defined() ? index.const_data_ptr<int64_t>() : nullptr,
      n_rows, sms, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "gram_update: CUDA launch failed: ", cudaGetErrorString(err));
}

void symmetrize_cuda(at::Tensor G) {
  check_square_f32(G, "symmetrize_");
  const c10::cuda::CUDAGuard guard(G.device());
  const cudaError_t err = kernels::symmetrize_cuda(G.data_ptr<float>(), G.size(0), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "symmetrize_: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(regmean_fast, CUDA, m) {
  m.impl("gram_update", &gram_update_cuda);
  m.impl("symmetrize_", &symmetrize_cuda);
}

}  // namespace binding
}  // namespace regmean_fast
