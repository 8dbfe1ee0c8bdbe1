#include "core/memory.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <limits>
#include <string>

#include "core/check.h"
#include "core/device.h"

namespace lmf {

namespace {

// The first number in `path` (cgroup files hold one number, or "max").
bool read_number(const char* path, size_t& out) {
  std::ifstream f(path);
  unsigned long long v = 0;
  if (!(f >> v)) return false;
  out = static_cast<size_t>(v);
  return true;
}

// Room left under this process's cgroup memory limit, or SIZE_MAX without one.
size_t cgroup_room() {
  size_t limit = 0, usage = 0;
  if (read_number("/sys/fs/cgroup/memory.max", limit) && read_number("/sys/fs/cgroup/memory.current", usage))
    return limit > usage ? limit - usage : 0;
  if (read_number("/sys/fs/cgroup/memory/memory.limit_in_bytes", limit) && limit < (size_t{1} << 60) &&
      read_number("/sys/fs/cgroup/memory/memory.usage_in_bytes", usage))
    return limit > usage ? limit - usage : 0;
  return std::numeric_limits<size_t>::max();
}

}  // namespace

size_t host_memory_available_bytes() {
  size_t avail = 0;
  bool found = false;
  std::ifstream f("/proc/meminfo");
  std::string key;
  unsigned long long kb = 0;
  std::string unit;
  while (f >> key >> kb) {
    std::getline(f, unit);
    if (key == "MemAvailable:") {
      avail = static_cast<size_t>(kb) * 1024;
      found = true;
      break;
    }
  }
  if (!found) {
    const long pages = ::sysconf(_SC_AVPHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
    avail = pages > 0 && page > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page) : 0;
  }
  return std::min(avail, cgroup_room());
}

size_t memory_available_bytes(Device d) {
  return d == Device::cuda ? cuda_memory_free_bytes() : host_memory_available_bytes();
}

std::string human_bytes(double b) {
  const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (b >= 1024 && u < 6) {
    b /= 1024;
    ++u;
  }
  char buf[64];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.1f %s", b, units[u]);
  return buf;
}

void check_memory_fits(size_t bytes, Device d, const std::string& what) {
  if (d == Device::cuda && !cuda_built()) return;  // the allocation itself says that CUDA is missing
  const size_t avail = memory_available_bytes(d);
  if (bytes <= avail) return;
  fail(what, " needs ", human_bytes(static_cast<double>(bytes)), " of ", d == Device::cuda ? "GPU" : "host",
       " memory; ", human_bytes(static_cast<double>(avail)), " is available");
}

}  // namespace lmf
