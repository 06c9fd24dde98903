// One pass over the K Grams: each 64 x 64 tile pair of the upper triangle is read once per Gram,
// reduced in a local tile, and written to both halves of A. Memory traffic is K * d^2 / 2 reads
// (full input reads only its upper half) plus d^2 writes, against the ~3K d^2 of the tensor
// expression sum_k f_k (alpha G_k + (1 - alpha) diag(G_k)).
#include "reduce_cpu.h"

#include <algorithm>
#include <vector>

#include "tiling.h"

namespace regmean_fast {
namespace kernels {

namespace {
constexpr int64_t kTile = 64;

// Index of G[i, j] (i <= j) in the source layout.
inline int64_t src_index(int64_t i, int64_t j, int64_t d, bool packed) {
  return packed ? triangle_row_offset(i, d) + (j - i) : i * d + j;
}
}  // namespace

template <typename Out>
void gram_reduce_cpu(Out* A, int64_t d, const float* const* grams, int64_t K, const double* factors, double alpha,
                     bool packed, const TaskRunner& runner) {
  const int64_t nb = ceil_div(d, kTile);
  runner.parallel_for(triangle_tile_count(nb), [&](int64_t tb, int64_t te) {
    std::vector<Out> acc(static_cast<size_t>(kTile * kTile));
    for (int64_t t = tb; t < te; ++t) {
      int64_t bi, bj;
      triangle_tile_coords(t, nb, &bi, &bj);
      const int64_t i0 = bi * kTile, iend = std::min(i0 + kTile, d);
      const int64_t j0 = bj * kTile, jend = std::min(j0 + kTile, d);
      std::fill(acc.begin(), acc.end(), Out(0));
      for (int64_t k = 0; k < K; ++k) {
        const float* G = grams[k];
        const Out off = static_cast<Out>(factors[k] * alpha);
        const Out on = static_cast<Out>(factors[k]);  // diagonal: alpha + (1 - alpha) = 1
        for (int64_t i = i0; i < iend; ++i) {
          const int64_t jstart = std::max(j0, i);
          const float* g = G + src_index(i, jstart, d, packed);
          Out* a = acc.data() + (i - i0) * kTile - j0;
          int64_t j = jstart;
          if (j == i) {
            a[j] += on * static_cast<Out>(g[0]);
            ++j;
          }
          for (; j < jend; ++j) a[j] += off * static_cast<Out>(g[j - jstart]);
        }
      }
      for (int64_t i = i0; i < iend; ++i) {
        for (int64_t j = std::max(j0, i); j < jend; ++j) {
          const Out v = acc[(i - i0) * kTile + (j - j0)];
          A[i * d + j] = v;
          A[j * d + i] = v;
        }
      }
    }
  });
}

template void gram_reduce_cpu<float>(float*, int64_t, const float* const*, int64_t, const double*, double, bool,
                                     const TaskRunner&);
template void gram_reduce_cpu<double>(double*, int64_t, const float* const*, int64_t, const double*, double, bool,
                                      const TaskRunner&);

void pack_upper_cpu(const float* G, int64_t d, float* packed, const TaskRunner& runner) {
  runner.parallel_for(d, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) std::copy(G + i * d + i, G + i * d + d, packed + triangle_row_offset(i, d));
  });
}

void unpack_upper_cpu(const float* packed, int64_t d, float* G, const TaskRunner& runner) {
  runner.parallel_for(d, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) std::copy(packed + triangle_row_offset(i, d), packed + triangle_row_offset(i + 1, d), G + i * d + i);
  });
  symmetrize_cpu(G, d, runner);
}

}  // namespace kernels
}  // namespace regmean_fast
