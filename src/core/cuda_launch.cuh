// cuda_launch.cuh: the checked launch every CUDA launcher uses (DESIGN.md sections 3 and 4).
//
//   lmf::cuda::launch({"layernorm_forward", shapes, grid, block, smem}, kernel, args...);
//
// validates grid/block/shared memory against the current device's limits *before* launching
// (throwing with the op, shapes, grid, block, smem and device), opts into more than 48 KiB of
// dynamic shared memory when asked, launches on lmforge's stream, and checks the launch.
#pragma once
#include <cuda_runtime.h>

#include <utility>

#include "core/cuda_check.h"
#include "core/cuda_context.h"
#include "core/device.h"
#include "core/launch.h"

namespace lmf::cuda {

// Throws lmf::Error describing the launch and the problem.
[[noreturn]] void launch_failed(const LaunchSpec& s, const std::string& problem);

inline dim3 to_dim3(const Dim3& d) {
  return dim3(static_cast<unsigned>(d.x), static_cast<unsigned>(d.y), static_cast<unsigned>(d.z));
}

template <class... KArgs, class... Args>
void launch(const LaunchSpec& s, void (*kernel)(KArgs...), Args&&... args) {
  const DeviceLimits& lim = cuda_limits();
  if (std::string p = launch_problem(lim, s); !p.empty()) launch_failed(s, p);
  if (s.smem > lim.smem_per_block) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(s.smem));
    if (e != cudaSuccess) launch_failed(s, std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(e));
  }
  kernel<<<to_dim3(s.grid), to_dim3(s.block), s.smem, stream()>>>(std::forward<Args>(args)...);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) launch_failed(s, std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e));
  count_launch();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace lmf::cuda
