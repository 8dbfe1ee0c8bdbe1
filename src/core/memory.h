// memory.h: how much memory a plan may take, asked before anything is allocated (DESIGN.md section 1:
// sizes are known up front, so a model too large for the machine is refused at set-up in one line,
// not by an allocator failing, the OOM killer or swap halfway through zero-filling an arena).
//
// Host: MemAvailable from /proc/meminfo (what can be allocated without swapping), lowered to the
// room left under a cgroup memory limit (v2 memory.max, v1 memory.limit_in_bytes) when there is one;
// sysconf's available pages where /proc is missing. GPU: cudaMemGetInfo's free bytes.
#pragma once
#include <cstddef>
#include <string>

#include "core/tensor.h"

namespace lmf {

size_t host_memory_available_bytes();
size_t memory_available_bytes(Device d);  // host, or the current GPU's free memory

// "3.2 GiB", "512 MiB", "7 bytes".
std::string human_bytes(double bytes);

// Throws one line "<what> needs X of <device> memory; Y is available" when bytes exceed what is available.
void check_memory_fits(size_t bytes, Device d, const std::string& what);

}  // namespace lmf
