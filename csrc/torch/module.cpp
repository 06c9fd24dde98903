// The Python module regmean_fast._C: importing it registers the operators (ops_*.cpp); the few
// functions here only report what was built.
#include <torch/extension.h>
#include <torch/version.h>

#include <string>
#include <vector>

#include "../kernels/axpy_cpu.h"
#include "../kernels/check_cpu.h"
#include "../kernels/gram_cpu.h"
#include "../kernels/task_vectors_cpu.h"
#include "aten_runner.h"
#include "checks.h"

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
    namespace k = regmean_fast::kernels;
    char blas[256], model[64], features[128], paths[128];
    k::cpu_blas_summary(blas, sizeof(blas));
    k::cpu_model_name(model, sizeof(model));
    k::cpu_features_summary(k::cpu_features(), features, sizeof(features));
    k::cpu_paths_available(k::cpu_features(), k::cpu_libs(), paths, sizeof(paths));
    pybind11::dict d;
#ifdef REGMEAN_FAST_WITH_CUDA
    d["cuda"] = true;
    d["cuda_reduce"] = true;     // gram_reduce / pack_triu / unpack_triu have CUDA kernels
    d["cuda_gram_wmma"] = true;  // tensor-core gram_update for bf16/fp16 on sm_80+
    d["cuda_bf16x3"] = true;     // split_bf16x3 / addmm_bf16x3_ on CUDA (cublasGemmEx)
#else
    d["cuda"] = false;
    d["cuda_reduce"] = false;
    d["cuda_gram_wmma"] = false;
    d["cuda_bf16x3"] = false;
#endif
    d["spd_solve"] = true;  // torch.ops.regmean_fast.spd_solve (CPU: LAPACK; CUDA: cuSOLVER Xpotrf)
    d["cuda_archs"] = std::string(RF_CUDA_ARCHS);
    d["cpu_blas"] = std::string(blas);
    d["cpu_model"] = std::string(model);
    d["cpu_features"] = std::string(features);  // what the path choice saw (cpu_path.h)
    d["cpu_paths"] = std::string(paths);        // the paths REGMEAN_FAST_CPU_PATH may name here
    // DARE's draws (task_vectors_cpu.h): AVX-512 intrinsics where built and the CPU has them
    const bool dare_avx512 = k::dare_drop_avx512_compiled() && k::cpu_features().avx512;
    d["dare_drop_path"] = std::string(dare_avx512 ? "avx512" : "portable");
    d["torch_version"] = std::string(TORCH_VERSION);
    return d;
  });
  // Validity checks of tensors read from files: one pass each, no temporaries. CPU tensors only
  // (the Python side uses torch expressions elsewhere).
  m.def(
      "all_finite",
      [](const at::Tensor& t) {
        TORCH_CHECK_VALUE(t.device().is_cpu(), "all_finite: a CPU tensor is expected");
        const at::Tensor c = t.contiguous();
        return regmean_fast::kernels::all_finite_cpu(c.const_data_ptr(), regmean_fast::binding::kernel_dtype(c.scalar_type()),
                                                     c.numel(), regmean_fast::binding::AtenRunner());
      },
      "True when no element of the float32/bfloat16/float16 CPU tensor is inf or NaN.");
  m.def(
      "symmetry_stats",
      [](const at::Tensor& G) {
        regmean_fast::binding::check_square_f32(G, "symmetry_stats");
        TORCH_CHECK_VALUE(G.device().is_cpu(), "symmetry_stats: a CPU tensor is expected");
        const auto s = regmean_fast::kernels::symmetry_stats_cpu(G.const_data_ptr<float>(), G.size(0),
                                                                 regmean_fast::binding::AtenRunner());
        return pybind11::make_tuple(s.finite, s.max_abs, s.max_asym, s.min_diag);
      },
      "(all finite, max |G|, max |G - G^T|, min diag) of a square float32 CPU matrix, in one pass.");
  m.def(
      "scaled_add_",
      [](at::Tensor acc, const at::Tensor& x, double c, bool assign) {
        TORCH_CHECK_VALUE(acc.device().is_cpu() && acc.scalar_type() == at::kFloat && acc.is_contiguous() &&
                              x.device().is_cpu() && x.is_contiguous() && x.numel() == acc.numel(),
                          "scaled_add_: a contiguous float32 CPU acc and a contiguous CPU x of its size are expected");
        regmean_fast::kernels::scaled_add_cpu(acc.data_ptr<float>(), x.const_data_ptr(),
                                              regmean_fast::binding::kernel_dtype(x.scalar_type()), acc.numel(),
                                              static_cast<float>(c), assign, regmean_fast::binding::AtenRunner());
      },
      "In place: acc = c * x (assign) or acc += c * x, x float32/bfloat16/float16 widened exactly.");
  // The task-vector merges' per-entry passes (kernels/task_vectors_cpu.h): float32 contiguous CPU tensors
  // only; regmean_fast.ops checks and dispatches (torch expressions on other devices and dtypes).
  m.def(
      "dare_drop_",
      [](at::Tensor delta, uint32_t key0, uint32_t key1, uint64_t threshold) {
        TORCH_CHECK_VALUE(delta.device().is_cpu() && delta.scalar_type() == at::kFloat && delta.is_contiguous(),
                          "dare_drop_: a contiguous float32 CPU tensor is expected");
        const uint32_t key[2] = {key0, key1};
        double l1[2];
        regmean_fast::kernels::dare_drop_cpu(delta.data_ptr<float>(), delta.numel(), key, threshold, l1,
                                             regmean_fast::binding::AtenRunner());
        return pybind11::make_tuple(l1[0], l1[1]);
      },
      "In place: DARE's drop of the Philox stream of (key0, key1) below threshold; returns (L1 before, after).");
  m.def(
      "magnitude_drop_",
      [](at::Tensor delta, int64_t k) {
        TORCH_CHECK_VALUE(delta.device().is_cpu() && delta.scalar_type() == at::kFloat && delta.is_contiguous(),
                          "magnitude_drop_: a contiguous float32 CPU tensor is expected");
        TORCH_CHECK_VALUE(k >= 1 && k <= delta.numel(), "magnitude_drop_: k must be in [1, ", delta.numel(), "]");
        double l1[2];
        regmean_fast::kernels::magnitude_drop_cpu(delta.data_ptr<float>(), delta.numel(), k, l1,
                                                  regmean_fast::binding::AtenRunner());
        return pybind11::make_tuple(l1[0], l1[1]);
      },
      "In place: TIES's drop of all but the k entries of largest magnitude; returns (L1 before, after).");
  m.def(
      "consensus_merge_",
      [](at::Tensor base, const std::vector<at::Tensor>& deltas, const std::vector<double>& coeffs,
         const std::vector<double>& weights, bool normalize, double scaling) {
        auto ok = [&](const at::Tensor& t) {
          return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                 t.numel() == base.numel();
        };
        TORCH_CHECK_VALUE(ok(base) && !deltas.empty() && coeffs.size() == deltas.size() &&
                              weights.size() == deltas.size(),
                          "consensus_merge_: contiguous float32 CPU tensors of one size and one coefficient "
                          "and weight per delta are expected");
        std::vector<const float*> ptrs;
        for (const at::Tensor& d : deltas) {
          TORCH_CHECK_VALUE(ok(d), "consensus_merge_: every delta must be contiguous float32 on the CPU, of "
                                   "the base's size");
          ptrs.push_back(d.const_data_ptr<float>());
        }
        const std::vector<float> c(coeffs.begin(), coeffs.end()), w(weights.begin(), weights.end());
        regmean_fast::kernels::consensus_merge_cpu(base.data_ptr<float>(), ptrs.data(),
                                                   static_cast<int64_t>(ptrs.size()), c.data(), w.data(),
                                                   normalize, static_cast<float>(scaling), base.numel(),
                                                   regmean_fast::binding::AtenRunner());
      },
      "In place: base += scaling * TIES's consensus mean of the coeffs[i] * deltas[i] (weights: its divisor).");
  m.def("have_bf16_gemm", &regmean_fast::kernels::have_bf16_gemm,
        "True when MKL's bf16 GEMM is in this process (addmm_bf16x3_ needs it; fast only with AMX).");
  m.def(
      "cpu_gemm_path",
      [](const std::string& dtype) {
        namespace k = regmean_fast::kernels;
        k::CpuGemmPath path;
        char err[320];
        if (!k::cpu_gemm_path_checked(parse_dtype(dtype), &path, err, sizeof(err))) throw std::invalid_argument(err);
        return std::string(k::cpu_gemm_path_name(path));
      },
      "The CPU path gram_update takes for this activation dtype right now (honours REGMEAN_FAST_CPU_PATH); "
      "ValueError when that variable names no path this CPU can run.");
}
