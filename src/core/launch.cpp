#include "core/launch.h"

#include <sstream>

namespace lmf {

std::string launch_problem(const DeviceLimits& lim, const LaunchSpec& s) {
  std::ostringstream os;
  auto dim_ok = [&](const char* what, const Dim3& d, const Dim3& mx) {
    const int64_t v[3] = {d.x, d.y, d.z}, m[3] = {mx.x, mx.y, mx.z};
    const char* n[3] = {"x", "y", "z"};
    for (int i = 0; i < 3; ++i) {
      if (v[i] < 1) { os << what << "." << n[i] << "=" << v[i] << " must be >= 1"; return false; }
      if (v[i] > m[i]) { os << what << "." << n[i] << "=" << v[i] << " exceeds the device limit " << m[i]; return false; }
    }
    return true;
  };
  if (!dim_ok("grid", s.grid, lim.max_grid)) return os.str();
  if (!dim_ok("block", s.block, lim.max_block)) return os.str();
  const int64_t threads = s.block.x * s.block.y * s.block.z;
  if (threads > lim.max_threads_per_block) {
    os << "block has " << threads << " threads, the device allows " << lim.max_threads_per_block;
    return os.str();
  }
  if (s.smem > lim.smem_per_block_optin) {
    os << "dynamic shared memory " << s.smem << " bytes exceeds the device's opt-in limit " << lim.smem_per_block_optin;
    return os.str();
  }
  return "";
}

std::string describe_launch(const LaunchSpec& s, const DeviceLimits& lim) {
  std::ostringstream os;
  os << "op=" << s.op << " shapes=(" << s.shapes << ") grid=(" << s.grid.x << "," << s.grid.y << "," << s.grid.z
     << ") block=(" << s.block.x << "," << s.block.y << "," << s.block.z << ") smem=" << s.smem
     << " device=" << lim.device << " (" << (lim.name.empty() ? "?" : lim.name) << ")";
  return os.str();
}

}  // namespace lmf
