#include "core/gpu_monitor.h"

#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>

namespace lmf {

// The NVML entry points and types used here, declared by hand from NVML's documented C API (the
// header ships with the driver's development files, which build machines may lack).
namespace {
using nvmlReturn = int;  // NVML_SUCCESS == 0
struct Utilization {
  unsigned int gpu, memory;
};
struct GpmSupport {
  unsigned int version, isSupportedDevice;
};
struct GpmMetric {
  unsigned int metricId;
  nvmlReturn nvmlReturn_;
  double value;
  struct {
    char *shortName, *longName, *unit;
  } metricInfo;
};
constexpr int kGpmMaxMetrics = 210;  // at least NVML's NVML_GPM_METRIC_MAX; only metrics[0] is used
struct GpmMetricsGet {
  unsigned int version, numMetrics;
  void *sample1, *sample2;
  GpmMetric metrics[kGpmMaxMetrics];
};
constexpr unsigned int kGpmMetricDramBwUtil = 10;  // NVML_GPM_METRIC_DRAM_BW_UTIL
constexpr unsigned int kGpmVersion = 1;            // NVML_GPM_SUPPORT_VERSION, NVML_GPM_METRICS_GET_VERSION
}  // namespace

struct GpuMonitor::Api {
  nvmlReturn (*init)() = nullptr;
  nvmlReturn (*shutdown)() = nullptr;
  nvmlReturn (*handle_by_index)(unsigned int, void**) = nullptr;
  nvmlReturn (*utilization)(void*, Utilization*) = nullptr;
  nvmlReturn (*gpm_query)(void*, GpmSupport*) = nullptr;
  nvmlReturn (*gpm_alloc)(void**) = nullptr;
  nvmlReturn (*gpm_free)(void*) = nullptr;
  nvmlReturn (*gpm_sample)(void*, void*) = nullptr;
  nvmlReturn (*gpm_metrics)(GpmMetricsGet*) = nullptr;
  bool gpm = false;
};

GpuMonitor::GpuMonitor(int device) {
  lib_ = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib_) {
    status_ = "n/a (no libnvidia-ml.so.1)";
    return;
  }
  api_ = new Api;
  auto sym = [&](auto& fn, const char* name) { fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib_, name)); };
  sym(api_->init, "nvmlInit_v2");
  sym(api_->shutdown, "nvmlShutdown");
  sym(api_->handle_by_index, "nvmlDeviceGetHandleByIndex_v2");
  sym(api_->utilization, "nvmlDeviceGetUtilizationRates");
  sym(api_->gpm_query, "nvmlGpmQueryDeviceSupport");
  sym(api_->gpm_alloc, "nvmlGpmSampleAlloc");
  sym(api_->gpm_free, "nvmlGpmSampleFree");
  sym(api_->gpm_sample, "nvmlGpmSampleGet");
  sym(api_->gpm_metrics, "nvmlGpmMetricsGet");
  if (!api_->init || !api_->handle_by_index || !api_->utilization || api_->init() != 0) {
    status_ = "n/a (NVML did not initialise)";
    return;
  }
  void* h = nullptr;
  if (api_->handle_by_index(static_cast<unsigned int>(device), &h) != 0 || !h) {
    status_ = "n/a (NVML has no device " + std::to_string(device) + ")";
    return;
  }
  dev_ = h;
  status_ = "nvml";
  if (api_->gpm_query && api_->gpm_alloc && api_->gpm_free && api_->gpm_sample && api_->gpm_metrics) {
    GpmSupport s{kGpmVersion, 0};
    if (api_->gpm_query(dev_, &s) == 0 && s.isSupportedDevice && api_->gpm_alloc(&samples_[0]) == 0 &&
        api_->gpm_alloc(&samples_[1]) == 0) {
      api_->gpm = true;
      status_ = "nvml+gpm";
    }
  }
}

GpuMonitor::~GpuMonitor() {
  if (api_) {
    for (void* s : samples_)
      if (s && api_->gpm_free) api_->gpm_free(s);
    if (dev_ && api_->shutdown) api_->shutdown();
  }
  delete api_;
  if (lib_) dlclose(lib_);
}

GpuMonitor::Sample GpuMonitor::read() {
  Sample r;
  if (!dev_) return r;
  Utilization u{};
  if (api_->utilization(dev_, &u) == 0) {
    r.sm_util = u.gpu;
    r.mem_ctrl_util = u.memory;
  }
  if (api_->gpm) {
    void* now = samples_[turn_];
    if (api_->gpm_sample(dev_, now) == 0) {
      if (gpm_primed_) {
        static GpmMetricsGet g;  // ~10 KB: kept out of the stack; read() is called from one thread
        std::memset(&g, 0, sizeof(g));
        g.version = kGpmVersion;
        g.numMetrics = 1;
        g.sample1 = samples_[turn_ ^ 1];
        g.sample2 = now;
        g.metrics[0].metricId = kGpmMetricDramBwUtil;
        // a too-short interval can read as NaN: that is "not available", not a value
        if (api_->gpm_metrics(&g) == 0 && g.metrics[0].nvmlReturn_ == 0 && std::isfinite(g.metrics[0].value))
          r.hbm_util = g.metrics[0].value;
      }
      gpm_primed_ = true;
      turn_ ^= 1;
    }
  }
  return r;
}

std::string format_util(double v) {
  if (!(v >= 0)) return "n/a";  // negative or NaN
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f%%", v);
  return buf;
}

}  // namespace lmf
