// launch.h: launch configurations and their validation against a device's limits
// (DESIGN.md section 4). Plain C++: the validation is unit-tested on the CPU with synthetic limits.
//
// Every CUDA launch in lmforge goes through lmf::cuda::launch() (core/cuda_launch.cuh), which calls
// launch_problem() before launching and describe_launch() when anything fails, so an error names
// the op, the shapes, grid, block, dynamic shared memory, the device and what CUDA said.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace lmf {

struct Dim3 {
  int64_t x = 1, y = 1, z = 1;
};

// What a launch must respect (filled from cudaDeviceProp on a GPU; synthetic in tests).
struct DeviceLimits {
  int device = 0;
  std::string name;
  int64_t max_threads_per_block = 1024;
  Dim3 max_block{1024, 1024, 64};
  Dim3 max_grid{2147483647, 65535, 65535};
  size_t smem_per_block = 48 * 1024;         // without opt-in
  size_t smem_per_block_optin = 227 * 1024;  // with cudaFuncAttributeMaxDynamicSharedMemorySize
  int sm_count = 0;
};

struct LaunchSpec {
  const char* op = "";  // op entry name, e.g. "layernorm_forward"
  std::string shapes;   // e.g. "N=8192 C=768"
  Dim3 grid, block;
  size_t smem = 0;      // dynamic shared memory bytes
};

// "" when the launch fits the device, else what is wrong ("grid.y=70000 exceeds 65535").
std::string launch_problem(const DeviceLimits& lim, const LaunchSpec& s);
// "op=layernorm_forward shapes=(N=8192 C=768) grid=(8192,1,1) block=(256,1,1) smem=0 device=0 (NVIDIA H200)"
std::string describe_launch(const LaunchSpec& s, const DeviceLimits& lim);

}  // namespace lmf
