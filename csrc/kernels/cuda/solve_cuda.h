// SPD solve on the GPU through cuSOLVER's 64-bit API (Xpotrf + Xpotrs), no torch. One cuSOLVER
// handle (and params object) per device, created on first use, cached for the process and bound to
// the caller's stream on every call. Workspaces come from the caller (torch's caching allocator in
// the binding), so nothing here allocates device memory.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace regmean_fast {
namespace kernels {

// Device workspace bytes that spd_solve_cuda needs for an n x n system of fp32 (f64 = false) or
// fp64 values at A (device). Returns "" or an error message.
std::string spd_solve_workspace(const void* A, int64_t n, bool f64, cudaStream_t stream, size_t* device_bytes);

// Solve A X = B for symmetric positive definite A, on `stream`, on the current device.
// A: n x n (either layout: it is symmetric), overwritten by its Cholesky factor (the lower triangle
// in column-major order, i.e. the upper triangle in row-major order; the other triangle is kept).
// B: column-major n x nrhs (ld n), i.e. row-major nrhs x n, overwritten by X.
// info: 3 device ints, written on the stream: info[0] = potrf's info (0 = success, k > 0: the
// leading minor of order k is not positive definite), info[1] = 1 when the factor holds a non-finite
// value (CUDA can report info 0 for NaN input), else 0; info[2] = potrs' info (invalid arguments
// only). X is meaningful only when info[0] and info[1] are 0.
// Returns "" or an error message (a failed cuSOLVER / CUDA call, not a failed factorisation).
std::string spd_solve_cuda(void* A, void* B, int64_t n, int64_t nrhs, bool f64, void* workspace,
                           size_t workspace_bytes, int* info, cudaStream_t stream);

}  // namespace kernels
}  // namespace regmean_fast
