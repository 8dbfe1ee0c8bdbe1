#include "core/launch.h"

#include <sstream>

namespace lmf {

// Called before every launch: on success it builds nothing (no stream, an empty std::string
// needs no allocation); the message is formatted only for a launch that does not fit.
std::string launch_problem(const DeviceLimits& lim, const LaunchSpec& s) {
  auto dim_problem = [](const char* what, const Dim3& d, const Dim3& mx) -> std::string {
    const int64_t v[3] = {d.x, d.y, d.z}, m[3] = {mx.x, mx.y, mx.z};
    const char* n[3] = {"x", "y", "z"};
    for (int i = 0; i < 3; ++i) {
      if (v[i] >= 1 && v[i] <= m[i]) continue;
      std::ostringstream os;
      if (v[i] < 1)
        os << what << "." << n[i] << "=" << v[i] << " must be >= 1";
      else
        os << what << "." << n[i] << "=" << v[i] << " exceeds the device limit " << m[i];
      return os.str();
    }
    return "";
  };
  if (std::string p = dim_problem("grid", s.grid, lim.max_grid); !p.empty()) return p;
  if (std::string p = dim_problem("block", s.block, lim.max_block); !p.empty()) return p;
  const int64_t threads = s.block.x * s.block.y * s.block.z;
  if (threads > lim.max_threads_per_block) {
    std::ostringstream os;
    os << "block has " << threads << " threads, the device allows " << lim.max_threads_per_block;
    return os.str();
  }
  if (s.smem > lim.smem_per_block_optin) {
    std::ostringstream os;
    os << "dynamic shared memory " << s.smem << " bytes exceeds the device's opt-in limit " << lim.smem_per_block_optin;
    return os.str();
  }
  return "";
}

std::string describe_launch(const LaunchSpec& s, const DeviceLimits& lim) {
  std::ostringstream os;
  os << "op=" << s.op << " shapes=(" << s.shapes.view() << ") grid=(" << s.grid.x << "," << s.grid.y << "," << s.grid.z
     << ") block=(" << s.block.x << "," << s.block.y << "," << s.block.z << ") smem=" << s.smem
     << " device=" << lim.device << " (" << (lim.name.empty() ? "?" : lim.name) << ")";
  return os.str();
}

}  // namespace lmf
