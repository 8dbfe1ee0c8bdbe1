// elementwise.cuh: one generic kernel for element-wise ops (STYLE.md practice 11).
//
// An op is a functor `f(i)` applied to every index in [0, n): it loads, computes and stores its own
// elements (plain pointers captured by value). Grid-stride over a grid sized from the SM count, so
// any n fits the grid limits. Each element is independent: results never depend on the launch shape.
#pragma once
#include <cstdint>

#include "core/cuda_launch.cuh"

namespace lmf::cuda {

template <class F>
__global__ void elementwise_kernel(int64_t n, F f) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    f(i);
}

template <class F>
void launch_elementwise(const char* op, int64_t n, F f) {
  if (n <= 0) return;
  constexpr int64_t kBlock = 256;
  const int64_t max_blocks = static_cast<int64_t>(cuda_limits().sm_count) * 16;
  const int64_t blocks = std::min(ceil_div(n, kBlock), std::max<int64_t>(max_blocks, 1));
  launch({op, shape_text("n=", n), {blocks, 1, 1}, {kBlock, 1, 1}, 0}, elementwise_kernel<F>, n, f);
}

}  // namespace lmf::cuda
