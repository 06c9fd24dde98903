#include "cpu_path.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "blas_cpu.h"
#include "gram_avx512.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define RF_X86 1
#else
#define RF_X86 0
#endif

namespace regmean_fast {
namespace kernels {

namespace {

// In the order cpu_paths_available lists them.
constexpr CpuGemmPath kAllPaths[kCpuGemmPathCount] = {CpuGemmPath::Avx512Bf16, CpuGemmPath::MklBf16,
                                                      CpuGemmPath::Avx512, CpuGemmPath::BlasF32,
                                                      CpuGemmPath::Portable};

// Why path p cannot run here (null when it can).
const char* missing(CpuGemmPath p, const CpuFeatures& f, const CpuLibs& l) {
  switch (p) {
    case CpuGemmPath::Portable: return nullptr;
    case CpuGemmPath::BlasF32: return l.sgemm ? nullptr : "no sgemm_ in this process";
    case CpuGemmPath::MklBf16:
      return l.mkl_bf16 ? nullptr : "MKL's cblas_gemm_bf16bf16f32 is not in this process";
    case CpuGemmPath::Avx512Bf16:
      if (!l.avx512_kernels) return "this build has no AVX-512 kernels (x86-64 GCC >= 10 or Clang needed)";
      return f.avx512bf16 && f.avx512 ? nullptr : "this CPU has no AVX512-BF16";
    case CpuGemmPath::Avx512:
      if (!l.avx512_kernels) return "this build has no AVX-512 kernels (x86-64 GCC >= 10 or Clang needed)";
      return f.avx512 ? nullptr : "this CPU has no AVX-512 (F, BW, VL)";
  }
  return "unknown path";
}

#if RF_X86
uint64_t xcr0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}
#endif

}  // namespace

const char* cpu_gemm_path_name(CpuGemmPath p) {
  switch (p) {
    case CpuGemmPath::Portable: return "portable";
    case CpuGemmPath::MklBf16: return "mkl-bf16";
    case CpuGemmPath::BlasF32: return "blas-sgemm";
    case CpuGemmPath::Avx512Bf16: return "avx512bf16";
    case CpuGemmPath::Avx512: return "avx512";
  }
  return "?";
}

CpuFeatures detect_cpu_features() {
  CpuFeatures f;
#if RF_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28);
  if (!osxsave || __get_cpuid_max(0, nullptr) < 7) return f;
  // Registers the OS saves on a context switch: XMM|YMM (bits 1-2), opmask|ZMM (5-7), AMX tiles (17-18).
  const uint64_t os = xcr0();
  const bool ymm = (os & 0x6) == 0x6, zmm = (os & 0xe6) == 0xe6, tiles = (os & 0x60000) == 0x60000;
  unsigned max_sub, b7, c7, d7;
  __cpuid_count(7, 0, max_sub, b7, c7, d7);
  unsigned a71 = 0, b71, c71, d71;
  if (max_sub >= 1) __cpuid_count(7, 1, a71, b71, c71, d71);
  f.avx2_fma = ymm && avx && fma && (b7 & (1u << 5));
  f.avx512 = zmm && (b7 & (1u << 16)) && (b7 & (1u << 30)) && (b7 & (1u << 31));  // F, BW, VL
  f.avx512bf16 = f.avx512 && (a71 & (1u << 5));
  f.amx_bf16 = tiles && (d7 & (1u << 24)) && (d7 & (1u << 22));  // AMX-TILE, AMX-BF16
#endif
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect_cpu_features();
  return f;
}

CpuLibs cpu_libs() {
  const BlasTable& t = blas();
  CpuLibs l;
  l.mkl_bf16 = t.gemm_bf16 != nullptr;
  l.sgemm = t.sgemm != nullptr;
  l.avx512_kernels = avx512_kernels_compiled();
  return l;
}

void cpu_features_summary(const CpuFeatures& f, char* buf, int64_t buflen) {
  std::string s;
  if (f.avx2_fma) s += " avx2_fma";
  if (f.avx512) s += " avx512";
  if (f.avx512bf16) s += " avx512_bf16";
  if (f.amx_bf16) s += " amx_bf16";
  std::snprintf(buf, static_cast<size_t>(buflen), "%s", s.empty() ? "none" : s.c_str() + 1);
}

void cpu_model_name(char* buf, int64_t buflen) {
  std::string s;
#if RF_X86
  unsigned regs[12];
  if (__get_cpuid_max(0x80000000u, nullptr) >= 0x80000004u) {
    for (unsigned k = 0; k < 3; ++k) __get_cpuid(0x80000002u + k, &regs[4 * k], &regs[4 * k + 1], &regs[4 * k + 2], &regs[4 * k + 3]);
    char raw[49];
    std::memcpy(raw, regs, 48);
    raw[48] = 0;
    s = raw;
    const size_t b = s.find_first_not_of(' '), e = s.find_last_not_of(' ');
    s = b == std::string::npos ? "" : s.substr(b, e - b + 1);
  }
#endif
  std::snprintf(buf, static_cast<size_t>(buflen), "%s", s.empty() ? "unknown" : s.c_str());
}

CpuGemmPath choose_cpu_path(DType dt, const CpuFeatures& f, const CpuLibs& l) {
  if (dt == DType::BF16) {
    if (f.amx_bf16 && l.mkl_bf16) return CpuGemmPath::MklBf16;
    if (!missing(CpuGemmPath::Avx512Bf16, f, l)) return CpuGemmPath::Avx512Bf16;
    return l.sgemm ? CpuGemmPath::BlasF32 : CpuGemmPath::Portable;
  }
  // fp32/fp16: our triangle kernel beat sgemm's recursive triangle where it was measured (AVX-512 without
  // AMX: 1.35-1.5x on Zen 4); the AMX machine keeps the sgemm path it was measured on.
  const bool avx512 = !missing(CpuGemmPath::Avx512, f, l);
  if (avx512 && (!f.amx_bf16 || !l.sgemm)) return CpuGemmPath::Avx512;
  return l.sgemm ? CpuGemmPath::BlasF32 : CpuGemmPath::Portable;
}

bool cpu_path_available(CpuGemmPath p, const CpuFeatures& f, const CpuLibs& l) { return missing(p, f, l) == nullptr; }

bool cpu_path_takes(CpuGemmPath p, DType dt) {
  switch (p) {
    case CpuGemmPath::MklBf16:
    case CpuGemmPath::Avx512Bf16: return dt == DType::BF16;
    case CpuGemmPath::Avx512: return dt != DType::BF16;
    default: return true;
  }
}

void cpu_paths_available(const CpuFeatures& f, const CpuLibs& l, char* buf, int64_t buflen) {
  std::string s;
  for (CpuGemmPath p : kAllPaths) {
    if (!cpu_path_available(p, f, l)) continue;
    if (!s.empty()) s += ", ";
    s += cpu_gemm_path_name(p);
  }
  std::snprintf(buf, static_cast<size_t>(buflen), "%s", s.c_str());
}

bool resolve_cpu_path(DType dt, const char* forced, const CpuFeatures& f, const CpuLibs& l, CpuGemmPath* out,
                      char* err, int64_t errlen) {
  *out = choose_cpu_path(dt, f, l);
  if (!forced || !*forced || std::strcmp(forced, "auto") == 0) return true;
  char avail[128];
  cpu_paths_available(f, l, avail, sizeof(avail));
  for (CpuGemmPath p : kAllPaths) {
    if (std::strcmp(forced, cpu_gemm_path_name(p)) != 0) continue;
    if (const char* why = missing(p, f, l)) {
      std::snprintf(err, static_cast<size_t>(errlen), "%s (available here: auto, %s)", why, avail);
      return false;
    }
    if (cpu_path_takes(p, dt)) *out = p;
    return true;
  }
  std::snprintf(err, static_cast<size_t>(errlen),
                "not a CPU path (auto, avx512bf16, mkl-bf16, avx512, blas-sgemm, portable; available here: auto, %s)", avail);
  return false;
}

const char* forced_cpu_path(const char** var) {
  for (const char* name : {"REGMEAN_FAST_CPU_PATH", "REGMEAN_FAST_CPU_GEMM"}) {
    const char* v = std::getenv(name);
    if (v && *v) {
      if (var) *var = name;
      return v;
    }
  }
  return nullptr;
}

bool cpu_gemm_path_checked(DType dt, CpuGemmPath* out, char* err, int64_t errlen) {
  const char* var = nullptr;
  const char* forced = forced_cpu_path(&var);
  char why[256];
  if (resolve_cpu_path(dt, forced, cpu_features(), cpu_libs(), out, why, sizeof(why))) return true;
  std::snprintf(err, static_cast<size_t>(errlen), "%s=%s: %s", var, forced, why);
  return false;
}

CpuGemmPath cpu_gemm_path(DType dt) {
  CpuGemmPath p;
  char err[256];
  return cpu_gemm_path_checked(dt, &p, err, sizeof(err)) ? p : choose_cpu_path(dt, cpu_features(), cpu_libs());
}

}  // namespace kernels
}  // namespace regmean_fast
