// gpu_monitor.h: device utilisation from NVML, loaded at run time (dlopen of libnvidia-ml.so.1,
// which comes with the NVIDIA driver; lmforge neither links nor needs its header).
//
//   sm_util        nvmlDeviceGetUtilizationRates().gpu: percent of the last sample period (1/6 s to
//                  1 s, driver-chosen) during which one or more kernels ran on the GPU
//   mem_ctrl_util  nvmlDeviceGetUtilizationRates().memory: percent of that period during which
//                  device memory was read or written
//   hbm_util       NVML GPM (Hopper and later) DRAM_BW_UTIL between the previous read() and this one:
//                  DRAM bandwidth used against its theoretical maximum, in percent
// Anything unavailable (no driver, no NVML, GPM unsupported, a call failing) reads as -1, printed
// "n/a"; the monitor never throws after construction and never fails a run.
#pragma once
#include <string>

namespace lmf {

class GpuMonitor {
 public:
  struct Sample {
    double sm_util = -1, hbm_util = -1, mem_ctrl_util = -1;
  };
  // device: the CUDA device index (NVML's index order matches CUDA's by default on one-GPU machines).
  explicit GpuMonitor(int device = 0);
  ~GpuMonitor();
  GpuMonitor(const GpuMonitor&) = delete;
  GpuMonitor& operator=(const GpuMonitor&) = delete;

  bool available() const { return dev_ != nullptr; }
  const std::string& status() const { return status_; }  // why not available, or "nvml"/"nvml+gpm"
  Sample read();

 private:
  struct Api;
  Api* api_ = nullptr;
  void* lib_ = nullptr;
  void* dev_ = nullptr;
  void* samples_[2] = {nullptr, nullptr};
  int turn_ = 0;
  bool gpm_primed_ = false;
  std::string status_ = "n/a";
};

// "n/a" for a negative or NaN value, else the value with one decimal and a percent sign ("87.5%").
std::string format_util(double v);

}  // namespace lmf
