// device_none.cpp: the device runtime of a build without CUDA (see device.h).
#ifndef LMF_WITH_CUDA
#include "core/check.h"
#include "core/device.h"

namespace lmf {

namespace {
[[noreturn]] void no_cuda(const char* what) {
  fail(what, ": lmforge was built without the CUDA backend (no nvcc found at configure time)");
}
}  // namespace

bool cuda_built() { return false; }
int cuda_device_count() { return 0; }
void cuda_set_device(int) { no_cuda("cuda_set_device"); }
const DeviceLimits& cuda_limits() { no_cuda("cuda_limits"); }
void* device_alloc(size_t, const std::string& what) { no_cuda(what.c_str()); }
void device_free(void*) {}
void device_memset0(void*, size_t) { no_cuda("device_memset0"); }
void copy_to_device(void*, const void*, size_t) { no_cuda("copy_to_device"); }
void copy_to_host(void*, const void*, size_t) { no_cuda("copy_to_host"); }
void device_synchronize() {}
void device_copy(void*, const void*, size_t) { no_cuda("device_copy"); }
uint64_t cuda_launch_count() { return 0; }
size_t cuda_memory_used_bytes() { return 0; }
size_t cuda_memory_free_bytes() { return 0; }
size_t cuda_peak_allocated_bytes() { return 0; }
void* host_alloc_pinned(size_t, const std::string& what) { no_cuda(what.c_str()); }
void host_free_pinned(void*) {}
void copy_to_device_async(void*, const void*, size_t) { no_cuda("copy_to_device_async"); }
void copy_to_host_async(void*, const void*, size_t) { no_cuda("copy_to_host_async"); }
void cuda_event_wait(void*) { no_cuda("cuda_event_wait"); }
void cuda_capture_begin() { no_cuda("cuda_capture_begin"); }
void* cuda_capture_end() { no_cuda("cuda_capture_end"); }
void cuda_graph_replay(void*) { no_cuda("cuda_graph_replay"); }
void cuda_graph_destroy(void*) {}
std::vector<void*> cuda_event_pool_create(size_t) { no_cuda("cuda_event_pool_create"); }
void cuda_event_pool_destroy(std::vector<void*>&) {}
void cuda_event_record(void*) { no_cuda("cuda_event_record"); }
double cuda_event_elapsed_ms(void*, void*) { no_cuda("cuda_event_elapsed_ms"); }
void* cuda_side_stream_create() { no_cuda("cuda_side_stream_create"); }
void cuda_side_stream_destroy(void*) {}
void cuda_stream_fork(void*, void*) { no_cuda("cuda_stream_fork"); }
void cuda_stream_join(void*, void*) { no_cuda("cuda_stream_join"); }
SideStreamScope::SideStreamScope(void* side) : previous_(side) { no_cuda("SideStreamScope"); }
SideStreamScope::~SideStreamScope() = default;
void cuda_reserve_workspace(size_t) { no_cuda("cuda_reserve_workspace"); }
void* cuda_workspace(size_t, const char* op) { no_cuda(op); }
size_t cuda_workspace_reserved() { return 0; }

}  // namespace lmf
#endif
