// CUDA implementations of the operators: argument checks (shared with the CPU ops, checks.h),
// device guard, the caller's stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "../kernels/cuda/gram_cuda.h"
#include "../kernels/cuda/products_cuda.h"
#include "../kernels/cuda/reduce_cuda.h"
#include "../kernels/cuda/solve_cuda.h"
#include "checks.h"

namespace regmean_fast {
namespace binding {
namespace {

// REGMEAN_FAST_CUDA_GEMM=fma forces the fp32-FMA Gram kernel (tests compare both paths).
bool tensor_cores_allowed() {
  const char* v = std::getenv("REGMEAN_FAST_CUDA_GEMM");
  return v == nullptr || std::strcmp(v, "fma") != 0;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

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
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const kernels::DType dt = kernel_dtype(X.scalar_type());
  const kernels::GramCudaPath path =
      kernels::gram_cuda_path(dt, prop->major * 10 + prop->minor, tensor_cores_allowed());
  check_launch(kernels::gram_update_cuda(G.data_ptr<float>(), G.size(0), rows.const_data_ptr(), dt,
                                         rows.size(0) > 1 ? rows.stride(0) : rows.size(1),
                                         index.defined() ? index.const_data_ptr<int64_t>() : nullptr, n_rows,
                                         prop->multiProcessorCount, path, at::cuda::getCurrentCUDAStream()),
               "gram_update");
}

void symmetrize_cuda(at::Tensor G) {
  check_square_f32(G, "symmetrize_");
  const c10::cuda::CUDAGuard guard(G.device());
  check_launch(kernels::symmetrize_cuda(G.data_ptr<float>(), G.size(0), at::cuda::getCurrentCUDAStream()),
               "symmetrize_");
}

at::Tensor gram_reduce_cuda(at::TensorList grams, at::ArrayRef<double> factors, double alpha,
                            std::optional<at::ScalarType> dtype) {
  const GramReduceArgs args = check_gram_reduce_args(grams, factors, alpha, dtype);
  const c10::cuda::CUDAGuard guard(grams[0].device());
  std::vector<const float*> ptrs;
  for (const at::Tensor& g : grams) ptrs.push_back(g.const_data_ptr<float>());
  at::Tensor A = at::empty({args.d, args.d}, grams[0].options().dtype(args.out_type));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t K = static_cast<int64_t>(ptrs.size());
  if (args.out_type == at::kFloat) {
    check_launch(kernels::gram_reduce_cuda<float>(A.data_ptr<float>(), args.d, ptrs.data(), K, factors.data(), alpha,
                                                  args.packed, stream),
                 "gram_reduce");
  } else {
    check_launch(kernels::gram_reduce_cuda<double>(A.data_ptr<double>(), args.d, ptrs.data(), K, factors.data(),
                                                   alpha, args.packed, stream),
                 "gram_reduce");
  }
  return A;
}

at::Tensor pack_triu_cuda(const at::Tensor& G) {
  check_square_f32(G, "pack_triu");
  const c10::cuda::CUDAGuard guard(G.device());
  const int64_t d = G.size(0);
  at::Tensor out = at::empty({d * (d + 1) / 2}, G.options());
  check_launch(kernels::pack_upper_cuda(G.const_data_ptr<float>(), d, out.data_ptr<float>(),
                                        at::cuda::getCurrentCUDAStream()),
               "pack_triu");
  return out;
}

at::Tensor unpack_triu_cuda(const at::Tensor& packed) {
  const int64_t d = check_unpack_triu_args(packed);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor G = at::empty({d, d}, packed.options());
  check_launch(kernels::unpack_upper_cuda(packed.const_data_ptr<float>(), d, G.data_ptr<float>(),
                                          at::cuda::getCurrentCUDAStream()),
               "unpack_triu");
  return G;
}

// A X = B through cuSOLVER Xpotrf + Xpotrs on the current stream, no host synchronisation.
// Returns X [n, k] and info = int32 [potrf info, factor non-finite, potrs info] on A's device.
std::tuple<at::Tensor, at::Tensor> spd_solve_cuda(const at::Tensor& A, const at::Tensor& B) {
  check_spd_solve_args(A, B);
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t n = A.size(0), k = B.size(1);
  const bool f64 = A.scalar_type() == at::kDouble;
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor L = A.contiguous().clone();  // overwritten by the factor; symmetric, so layout-free
  // cuSOLVER wants B column-major [n, k] = row-major [k, n]: B^T contiguous, solved in place.
  at::Tensor Xt = B.t().contiguous();
  if (Xt.data_ptr() == B.data_ptr()) Xt = Xt.clone();
  at::Tensor info = at::empty({3}, A.options().dtype(at::kInt));
  size_t work_bytes = 0;
  std::string err = kernels::spd_solve_workspace(L.data_ptr(), n, f64, stream, &work_bytes);
  TORCH_CHECK(err.empty(), "spd_solve: ", err);
  at::Tensor work = at::empty({static_cast<int64_t>(work_bytes > 0 ? work_bytes : 1)}, A.options().dtype(at::kByte));
  err = kernels::spd_solve_cuda(L.data_ptr(), Xt.data_ptr(), n, k, f64, work.data_ptr(), work_bytes,
                                info.data_ptr<int>(), stream);
  TORCH_CHECK(err.empty(), "spd_solve: ", err);
  return {Xt.t(), info};
}

at::Tensor split_bf16x3_cuda(const at::Tensor& x) {
  at::Tensor out;
  const at::Tensor c = split_bf16x3_operands(x, &out);
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(kernels::split_bf16x3_cuda(c.const_data_ptr<float>(), c.numel(),
                                          reinterpret_cast<uint16_t*>(out.data_ptr()),
                                          at::cuda::getCurrentCUDAStream()),
               "split_bf16x3");
  return out;
}

// Three bf16 tensor-core GEMMs with fp32 accumulation through cublasGemmEx, on torch's cuBLAS
// handle for the current stream (it carries torch's workspace).
void addmm_bf16x3_cuda(at::Tensor C, const at::Tensor& A, const at::Tensor& Bs, double alpha) {
  const Bf16x3Operands op = check_addmm_bf16x3_args(C, A, Bs);
  if (op.empty) return;
  const c10::cuda::CUDAGuard guard(C.device());
  const int64_t m = C.size(0), n = C.size(1), k = A.size(1);
  const std::string err = kernels::gemm_bf16x3_accumulate_cuda(
      at::cuda::getCurrentCUDABlasHandle(), m, n, k, static_cast<float>(alpha),
      reinterpret_cast<const uint16_t*>(op.a.const_data_ptr()), op.lda, op.trans_a,
      reinterpret_cast<const uint16_t*>(op.b.const_data_ptr()), n, k * n, C.data_ptr<float>(), op.ldc);
  TORCH_CHECK(err.empty(), "addmm_bf16x3_: ", err);
}

}  // namespace

TORCH_LIBRARY_IMPL(regmean_fast, CUDA, m) {
  m.impl("gram_update", &gram_update_cuda);
  m.impl("symmetrize_", &symmetrize_cuda);
  m.impl("gram_reduce", &gram_reduce_cuda);
  m.impl("pack_triu", &pack_triu_cuda);
  m.impl("unpack_triu", &unpack_triu_cuda);
  m.impl("spd_solve", &spd_solve_cuda);
  m.impl("split_bf16x3", &split_bf16x3_cuda);
  m.impl("addmm_bf16x3_", &addmm_bf16x3_cuda);
}

}  // namespace binding
}  // namespace regmean_fast
