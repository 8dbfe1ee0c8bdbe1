// device.h: the device runtime as the rest of the engine sees it (no CUDA types here, so plain C++
// translation units can use it). Implemented by core/device.cu when lmforge is built with CUDA and
// by core/device_none.cpp otherwise, where every call fails with "built without CUDA".
//
// Memory: arenas take device memory with device_alloc() once, at set-up. Streams: lmforge runs on
// one stream per process, device_stream(); every launcher and copy uses it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/launch.h"

namespace lmf {

bool cuda_built();                  // compiled with the CUDA backend
int cuda_device_count();            // 0 without a usable GPU (never throws)
void cuda_set_device(int device);   // selects the device and creates the stream and handles
const DeviceLimits& cuda_limits();  // of the current device

void* device_alloc(size_t bytes, const std::string& what);  // cudaMalloc, zero-filled; throws naming `what`
void device_free(void* p);
void device_memset0(void* p, size_t bytes);                  // async on the stream
void copy_to_device(void* dst, const void* src, size_t bytes);    // synchronous
void copy_to_host(void* dst, const void* src, size_t bytes);      // synchronous
void device_synchronize();                                        // waits for the stream
void device_copy(void* dst, const void* src, size_t bytes);       // device to device, async

// Bytes of device memory in use on the current device (cudaMemGetInfo: all processes) and the
// peak this process has allocated through device_alloc().
size_t cuda_memory_used_bytes();
size_t cuda_memory_free_bytes();  // free device memory (cudaMemGetInfo)
size_t cuda_peak_allocated_bytes();

// Launches made through lmf::cuda::launch() so far (for kernel-launches-per-step telemetry).
uint64_t cuda_launch_count();

// Page-locked host memory (for asynchronous uploads) and stream-ordered copies.
void* host_alloc_pinned(size_t bytes, const std::string& what);
void host_free_pinned(void* p);
void copy_to_device_async(void* dst, const void* src, size_t bytes);  // src must stay valid until done
void copy_to_host_async(void* dst, const void* src, size_t bytes);    // dst is valid after device_synchronize()
void cuda_event_wait(void* event);  // host waits for a recorded event (staging-buffer reuse only)

// Whole-stream capture into a CUDA graph in cudaStreamCaptureModeGlobal: any allocation or host
// synchronisation during the capture makes it fail. end returns an instantiated graph.
void cuda_capture_begin();
void* cuda_capture_end();
void cuda_graph_replay(void* graph);  // counts as one launch in cuda_launch_count()
void cuda_graph_destroy(void* graph);

// CUDA events for the profiler (opaque pointers, created once).
std::vector<void*> cuda_event_pool_create(size_t n);
void cuda_event_pool_destroy(std::vector<void*>& events);
void cuda_event_record(void* event);                 // on lmforge's stream
double cuda_event_elapsed_ms(void* start, void* end);

// A side stream beside lmforge's (data parallelism's gradient all-reduces overlap the backward on
// one, dist/grad_buckets.h). fork: the side stream waits for the work enqueued so far on the main
// stream; join: the main stream waits for the work enqueued so far on the side stream (each through
// `event`, from cuda_event_pool_create). Both are stream-ordered and allowed inside a CUDA graph
// capture: the side stream's work becomes a branch of the graph.
void* cuda_side_stream_create();
void cuda_side_stream_destroy(void* stream);
void cuda_stream_fork(void* side, void* event);
void cuda_stream_join(void* side, void* event);
// While alive, this thread's launches and collectives (cuda::stream()) go to `side`.
class SideStreamScope {
 public:
  explicit SideStreamScope(void* side);
  ~SideStreamScope();
  SideStreamScope(const SideStreamScope&) = delete;
  SideStreamScope& operator=(const SideStreamScope&) = delete;

 private:
  void* previous_;
};

// Scratch for launchers that need temporary device memory (e.g. partial sums of a deterministic
// two-pass reduction). Reserved at set-up; asking for more than was reserved throws, it never
// allocates inside a step.
void cuda_reserve_workspace(size_t bytes);
void* cuda_workspace(size_t bytes, const char* op);
size_t cuda_workspace_reserved();  // bytes reserved so far

}  // namespace lmf
