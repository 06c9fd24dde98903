// Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC11): a
// counter-based generator. Four 32-bit words are a pure function of a 128-bit counter and a 64-bit key, so
// any entry of a stream can be drawn on its own: on any thread, in any order, on either device, with the
// same bits. The DARE masks are drawn from it (task_vectors_cpu.h). Checked against the published
// known-answer vectors (Random123's kat_vectors) in the C++ and Python tests. No torch.
#pragma once

#include <cstdint>

#include "common.h"

namespace regmean_fast {
namespace kernels {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;  // key schedule (Weyl) increments

// out = Philox4x32-10(ctr, key). ctr and out may alias.
RF_HOST_DEVICE void philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
  uint32_t k0 = key[0], k1 = key[1];
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Word j of the stream of `key`: word j % 4 of Philox4x32-10(counter = (j / 4 low 32 bits, j / 4 high 32
// bits, 0, 0), key). Entry j of a DARE mask is kept when this word is below the keep threshold.
RF_HOST_DEVICE void philox_stream_block(uint64_t block, const uint32_t key[2], uint32_t out[4]) {
  const uint32_t ctr[4] = {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), 0u, 0u};
  philox4x32_10(ctr, key, out);
}

}  // namespace kernels
}  // namespace regmean_fast
