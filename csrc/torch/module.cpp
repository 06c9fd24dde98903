// The Python module regmean_fast._C: importing it registers the operators (ops_*.cpp); the few
// functions here only report what was built.
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#include "../kernels/gram_cpu.h"

// setup.py passes the arch list as one preprocessor number such as 8.0_8.6_9.0_PTX (no quotes
// survive every build tool's escaping); it is turned into a string here.
#define RF_STR2(x) #x
#define RF_STR(x) RF_STR2(x)
#ifdef REGMEAN_FAST_CUDA_ARCHS
#define RF_CUDA_ARCHS RF_STR(REGMEAN_FAST_CUDA_ARCHS)
#else
#define RF_CUDA_ARCHS ""
#endif

namespace {

regmean_fast::kernels::DType parse_dtype(const std::string& name) {
  using regmean_fast::kernels::DType;
  if (name == "float32") return DType::F32;
  if (name == "bfloat16") return DType::BF16;
  if (name == "float16") return DType::F16;
  throw std::invalid_argument("unknown dtype '" + name + "' (float32, bfloat16, float16)");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "regmean_fast compiled kernels; the operators are in torch.ops.regmean_fast";
  m.def("build_info", [] {
    char blas[256];
    regmean_fast::kernels::cpu_blas_summary(blas, sizeof(blas));
    pybind11::dict d;
#ifdef REGMEAN_FAST_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["cuda_archs"] = std::string(RF_CUDA_ARCHS);
    d["cpu_blas"] = std::string(blas);
    d["torch_version"] = std::string(TORCH_VERSION);
    return d;
  });
  m.def(
      "cpu_gemm_path",
      [](const std::string& dtype) {
        return std::string(regmean_fast::kernels::cpu_gemm_path_name(regmean_fast::kernels::cpu_gemm_path(parse_dtype(dtype))));
      },
      "The CPU path gram_update takes for this activation dtype right now (honours REGMEAN_FAST_CPU_GEMM).");
}
