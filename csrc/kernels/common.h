// Shared definitions for the framework-agnostic kernels: element types, half-precision
// conversions and the host/device qualifier. No torch headers here, on purpose: this layer
// builds in seconds with CMake and is unit-tested without a GPU.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define RF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RF_HOST_DEVICE inline
#endif

namespace regmean_fast {
namespace kernels {

// Element type of the activations X. G is always fp32.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

inline const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::F32: return "float32";
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
  }
  return "?";
}

inline int64_t dtype_size(DType dt) { return dt == DType::F32 ? 4 : 2; }

// The float whose IEEE bits are u.
RF_HOST_DEVICE float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// bfloat16 is the top half of an IEEE float: widening is a shift.
RF_HOST_DEVICE float bf16_bits_to_float(uint16_t bits) { return float_from_bits(static_cast<uint32_t>(bits) << 16); }

// The IEEE bits of f.
RF_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

// Round-to-nearest-even narrowing (NaN stays a quiet NaN): the bf16 slices of split_bf16x3 on
// both devices, and the data of tests and CPU twins.
RF_HOST_DEVICE uint16_t float_to_bf16_bits(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// x == bf16(out[0]) + bf16(out[stride]) + bf16(out[2 * stride]) exactly (for normal numbers): the
// first slice is x rounded to bf16, the second the rounded remainder, the third the rest. One function
// for the CPU ops and the CUDA kernel, so the CPU is the GPU's twin by construction.
RF_HOST_DEVICE void split_bf16x3(float x, uint16_t* out, int64_t stride) {
  const uint16_t h0 = float_to_bf16_bits(x);
  const float r1 = x - bf16_bits_to_float(h0);  // exact: the low 16 significant bits of x
  const uint16_t h1 = float_to_bf16_bits(r1);
  const float r2 = r1 - bf16_bits_to_float(h1);  // exact, and fits in 8 bits
  out[0] = h0;
  out[stride] = h1;
  out[2 * stride] = float_to_bf16_bits(r2);
}

// IEEE binary16 -> binary32, exact for every input (normals, subnormals, inf, NaN).
RF_HOST_DEVICE float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {
    // Subnormal: normalise the mantissa.
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while ((man & 0x400u) == 0);
    u = sign | ((112u - e) << 23) | ((man & 0x3ffu) << 13);
  }
  return float_from_bits(u);
}

// Widen element `i` of a buffer of the given type.
RF_HOST_DEVICE float load_as_float(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::BF16: return bf16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::F16: return f16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

}  // namespace kernels
}  // namespace regmean_fast
