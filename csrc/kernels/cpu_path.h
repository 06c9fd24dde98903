// Which CPU implementation gram_update takes, by what the CPU has: its features are read once
// (cpuid + xgetbv), the BLAS in the process is found once (blas_cpu.h), and the choice per input
// dtype is a pure function of both, so it is unit-tested with made-up CPUs.
#pragma once

#include <cstdint>

#include "common.h"

namespace regmean_fast {
namespace kernels {

enum class CpuGemmPath : int {
  Portable = 0,    // blocked, packed fp32 micro-kernel in vector extensions (any CPU)
  MklBf16 = 1,     // MKL's cblas_gemm_bf16bf16f32 (bf16 only): AMX tiles on Sapphire Rapids and newer
  BlasF32 = 2,     // sgemm_ of the BLAS in the process; bf16/fp16 widened to fp32 in row chunks
  Avx512Bf16 = 3,  // our vdpbf16ps micro-kernel (bf16 only; gram_avx512.h)
  Avx512 = 4,      // our FMA micro-kernel (fp32 and fp16, widened; gram_avx512.h)
};
constexpr int kCpuGemmPathCount = 5;

// "portable", "mkl-bf16", "blas-sgemm", "avx512bf16", "avx512".
const char* cpu_gemm_path_name(CpuGemmPath p);

// What the CPU can run, each only when the OS also saves the registers it needs (XCR0).
struct CpuFeatures {
  bool avx2_fma = false;    // AVX2 + FMA
  bool avx512 = false;      // AVX-512 F + BW + VL
  bool avx512bf16 = false;  // AVX512_BF16 (vdpbf16ps), with avx512
  bool amx_bf16 = false;    // AMX-BF16 tiles
};

// What this process has to run them with.
struct CpuLibs {
  bool mkl_bf16 = false;           // cblas_gemm_bf16bf16f32 found (blas_cpu.h)
  bool sgemm = false;              // sgemm_ found
  bool avx512_kernels = false;  // this build contains the kernels of gram_avx512.h
};

CpuFeatures detect_cpu_features();  // cpuid now (all false off x86)
const CpuFeatures& cpu_features();  // detected once
CpuLibs cpu_libs();                 // from blas() and the build

// "avx2_fma avx512 avx512_bf16 amx_bf16" (those present), or "none".
void cpu_features_summary(const CpuFeatures& f, char* buf, int64_t buflen);
// The CPU's brand string (cpuid 0x80000002..4), or "unknown".
void cpu_model_name(char* buf, int64_t buflen);

// The automatic path for inputs of type dt. bf16: MKL's bf16 GEMM only with AMX (without it, MKL's bf16
// GEMM is slower than torch's own bf16 GEMM and than widening + sgemm), our vdpbf16ps kernel with
// AVX512-BF16, else sgemm (widened), else portable. fp32/fp16: our FMA kernel on AVX-512 CPUs without
// AMX, sgemm on the AMX machine (where it was measured) and elsewhere, else portable.
CpuGemmPath choose_cpu_path(DType dt, const CpuFeatures& f, const CpuLibs& l);

// Whether path p can run at all here (mkl-bf16 and avx512bf16 only ever take bf16 inputs, avx512 only
// fp32 and fp16).
bool cpu_path_available(CpuGemmPath p, const CpuFeatures& f, const CpuLibs& l);

// Whether path p computes inputs of type dt (exactly: no path rounds its inputs).
bool cpu_path_takes(CpuGemmPath p, DType dt);

// The path for dt when `forced` names one (REGMEAN_FAST_CPU_PATH): portable and blas-sgemm take every
// dtype; mkl-bf16 and avx512bf16 take bf16, avx512 takes fp32 and fp16, and each leaves the other dtypes
// to the automatic choice. forced
// null, empty or "auto": the automatic choice. False, with the reason in err (one line, e.g. "this CPU has
// no AVX512-BF16 (available here: auto, blas-sgemm, portable)"), when forced is not a path name or names
// one this CPU/process cannot run.
bool resolve_cpu_path(DType dt, const char* forced, const CpuFeatures& f, const CpuLibs& l, CpuGemmPath* out,
                      char* err, int64_t errlen);

// The forced path's name from the environment: REGMEAN_FAST_CPU_PATH, else its older name
// REGMEAN_FAST_CPU_GEMM, else null (*var, when given, is the variable's name). Read per call, so tests
// can flip it.
const char* forced_cpu_path(const char** var = nullptr);

// resolve_cpu_path with this CPU, this process and the environment; err is then
// "REGMEAN_FAST_CPU_PATH=<value>: <reason>".
bool cpu_gemm_path_checked(DType dt, CpuGemmPath* out, char* err, int64_t errlen);
// Same, the automatic path when the environment's request cannot be honoured (callers that must
// report it use the checked form).
CpuGemmPath cpu_gemm_path(DType dt);

// The paths available here, comma-separated, fastest bf16 path first: e.g. "avx512bf16, mkl-bf16, blas-sgemm, portable".
void cpu_paths_available(const CpuFeatures& f, const CpuLibs& l, char* buf, int64_t buflen);

}  // namespace kernels
}  // namespace regmean_fast
