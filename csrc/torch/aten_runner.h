// The kernels' TaskRunner backed by torch's own thread pool (no second OpenMP runtime).
#pragma once

#include <ATen/Parallel.h>

#include "../kernels/gram_cpu.h"

namespace regmean_fast {
namespace binding {

class AtenRunner final : public kernels::TaskRunner {
 public:
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& body) const override {
    at::parallel_for(0, n, 1, body);
  }
};

}  // namespace binding
}  // namespace regmean_fast
