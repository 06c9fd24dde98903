#include "blas_cpu.h"

#include <dlfcn.h>

#include <mutex>

namespace regmean_fast {
namespace kernels {

// torch's own MKL comes first so that a different sgemm_ elsewhere in the process (another BLAS,
// another integer width) is not picked.
const BlasTable& blas() {
  static BlasTable table;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* libs[] = {"libtorch_cpu.so", "libmkl_rt.so.2", "libmkl_rt.so"};
    for (const char* name : libs) {
      void* h = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
      if (!h) continue;
      table.gemm_bf16 = reinterpret_cast<GemmHalfFn>(dlsym(h, "cblas_gemm_bf16bf16f32"));
      table.sgemm = reinterpret_cast<SgemmFn>(dlsym(h, "sgemm_"));
      if (table.gemm_bf16 || table.sgemm) {
        table.spotrf = reinterpret_cast<PotrfFn<float>>(dlsym(h, "spotrf_"));
        table.spotrs = reinterpret_cast<PotrsFn<float>>(dlsym(h, "spotrs_"));
        table.dpotrf = reinterpret_cast<PotrfFn<double>>(dlsym(h, "dpotrf_"));
        table.dpotrs = reinterpret_cast<PotrsFn<double>>(dlsym(h, "dpotrs_"));
        table.source = name;
        return;
      }
    }
  });
  return table;
}

}  // namespace kernels
}  // namespace regmean_fast
