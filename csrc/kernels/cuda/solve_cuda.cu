// cuSOLVER Cholesky + triangular solves (64-bit API), with a finiteness check of the factor.
#include "solve_cuda.h"

#include <cusolverDn.h>

#include <mutex>
#include <vector>

namespace regmean_fast {
namespace kernels {

namespace {

struct SolverContext {
  cusolverDnHandle_t handle = nullptr;
  cusolverDnParams_t params = nullptr;
};

// One context per device, created on first use and kept for the life of the process (destroying
// handles at exit races with the CUDA runtime's own teardown). The mutex is held for the whole
// enqueue of a solve, so concurrent host threads never share the handle's stream binding.
std::mutex g_mutex;
std::vector<SolverContext> g_contexts;

std::string status_message(const char* what, cusolverStatus_t s) {
  return std::string(what) + " failed with cuSOLVER status " + std::to_string(static_cast<int>(s));
}

// Call with g_mutex held. Binds the current device's handle to `stream`.
std::string context_for_stream(cudaStream_t stream, SolverContext** out) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return std::string("cudaGetDevice: ") + cudaGetErrorString(err);
  if (static_cast<int>(g_contexts.size()) <= device) g_contexts.resize(static_cast<size_t>(device) + 1);
  SolverContext& ctx = g_contexts[static_cast<size_t>(device)];
  if (ctx.handle == nullptr) {
    cusolverStatus_t s = cusolverDnCreate(&ctx.handle);
    if (s != CUSOLVER_STATUS_SUCCESS) {
      ctx.handle = nullptr;
      return status_message("cusolverDnCreate", s);
    }
    s = cusolverDnCreateParams(&ctx.params);
    if (s != CUSOLVER_STATUS_SUCCESS) {
      ctx.params = nullptr;
      cusolverDnDestroy(ctx.handle);
      ctx.handle = nullptr;
      return status_message("cusolverDnCreateParams", s);
    }
  }
  const cusolverStatus_t s = cusolverDnSetStream(ctx.handle, stream);
  if (s != CUSOLVER_STATUS_SUCCESS) return status_message("cusolverDnSetStream", s);
  *out = &ctx;
  return "";
}

// flag = 1 if any element of the factor's triangle (column-major lower: row >= col) is not finite.
template <typename T>
__global__ void factor_nonfinite_kernel(const T* __restrict__ L, int64_t n, int* __restrict__ flag) {
  const int64_t total = n * n;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t col = e / n, row = e % n;
    if (row >= col && !isfinite(L[e])) *flag = 1;  // benign race: every writer stores 1
  }
}

}  // namespace

std::string spd_solve_workspace(const void* A, int64_t n, bool f64, cudaStream_t stream, size_t* device_bytes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  SolverContext* ctx = nullptr;
  std::string err = context_for_stream(stream, &ctx);
  if (!err.empty()) return err;
  const cudaDataType t = f64 ? CUDA_R_64F : CUDA_R_32F;
  size_t host_bytes = 0;
  const cusolverStatus_t s = cusolverDnXpotrf_bufferSize(ctx->handle, ctx->params, CUBLAS_FILL_MODE_LOWER, n, t, A,
                                                         n > 0 ? n : 1, t, device_bytes, &host_bytes);
  if (s != CUSOLVER_STATUS_SUCCESS) return status_message("cusolverDnXpotrf_bufferSize", s);
  return "";
}

std::string spd_solve_cuda(void* A, void* B, int64_t n, int64_t nrhs, bool f64, void* workspace,
                           size_t workspace_bytes, int* info, cudaStream_t stream) {
  cudaError_t cerr = cudaMemsetAsync(info, 0, 3 * sizeof(int), stream);
  if (cerr != cudaSuccess) return std::string("cudaMemsetAsync: ") + cudaGetErrorString(cerr);
  if (n <= 0) return "";
  std::lock_guard<std::mutex> lock(g_mutex);
  SolverContext* ctx = nullptr;
  std::string err = context_for_stream(stream, &ctx);
  if (!err.empty()) return err;
  const cudaDataType t = f64 ? CUDA_R_64F : CUDA_R_32F;
  size_t device_bytes = 0, host_bytes = 0;
  cusolverStatus_t s = cusolverDnXpotrf_bufferSize(ctx->handle, ctx->params, CUBLAS_FILL_MODE_LOWER, n, t, A, n, t,
                                                   &device_bytes, &host_bytes);
  if (s != CUSOLVER_STATUS_SUCCESS) return status_message("cusolverDnXpotrf_bufferSize", s);
  if (device_bytes > workspace_bytes) return "spd_solve_cuda: workspace too small";
  // Xpotrf needs no host workspace today; should a version want one, it must outlive the
  // asynchronous call, so it is kept per thread for the life of the process.
  static thread_local std::vector<char> host_workspace;
  if (host_workspace.size() < host_bytes) host_workspace.resize(host_bytes);
  s = cusolverDnXpotrf(ctx->handle, ctx->params, CUBLAS_FILL_MODE_LOWER, n, t, A, n, t, workspace, workspace_bytes,
                       host_bytes ? host_workspace.data() : nullptr, host_bytes, info);
  if (s != CUSOLVER_STATUS_SUCCESS) return status_message("cusolverDnXpotrf", s);
  const int threads = 256;
  const int64_t want = (n * n + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(want < 4096 ? want : 4096);
  if (f64) {
    factor_nonfinite_kernel<double><<<blocks, threads, 0, stream>>>(static_cast<const double*>(A), n, info + 1);
  } else {
    factor_nonfinite_kernel<float><<<blocks, threads, 0, stream>>>(static_cast<const float*>(A), n, info + 1);
  }
  cerr = cudaGetLastError();
  if (cerr != cudaSuccess) return std::string("factor check launch: ") + cudaGetErrorString(cerr);
  if (nrhs > 0) {
    // potrs' own info only reports invalid arguments (all checked above): it goes to info[2].
    s = cusolverDnXpotrs(ctx->handle, ctx->params, CUBLAS_FILL_MODE_LOWER, n, nrhs, t, A, n, t, B, n, info + 2);
    if (s != CUSOLVER_STATUS_SUCCESS) return status_message("cusolverDnXpotrs", s);
  }
  return "";
}

}  // namespace kernels
}  // namespace regmean_fast
