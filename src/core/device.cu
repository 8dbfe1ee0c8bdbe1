// device.cu: the CUDA implementation of device.h, plus the stream, cuBLASLt handle and workspace
// every launcher shares.
#include <atomic>
#include <unordered_map>
#include <cstdio>

#include "core/cuda_check.h"
#include "core/cuda_launch.cuh"
#include "core/device.h"

namespace lmf {

namespace detail {

[[noreturn]] void cuda_call_failed(const char* stmt, cudaError_t err, const char* file, int line) {
  int dev = -1;
  cudaGetDevice(&dev);
  const char* base = file;
  for (const char* p = file; *p; ++p)
    if (*p == '/') base = p + 1;
  throw Error(detail::concat(base, ":", line, ": CUDA call `", stmt, "` failed on device ", dev, ": ",
                             cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"),
              Error::Kind::internal);
}

[[noreturn]] void cublas_call_failed(const char* stmt, cublasStatus_t st, const char* file, int line) {
  int dev = -1;
  cudaGetDevice(&dev);
  const char* base = file;
  for (const char* p = file; *p; ++p)
    if (*p == '/') base = p + 1;
  throw Error(detail::concat(base, ":", line, ": cuBLAS call `", stmt, "` failed on device ", dev, ": status ",
                             static_cast<int>(st)),
              Error::Kind::internal);
}

}  // namespace detail

namespace {

struct Context {
  int device = -1;
  DeviceLimits limits;
  cudaStream_t stream = nullptr;
  cublasLtHandle_t blaslt = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};
Context g_ctx;
std::atomic<uint64_t> g_launches{0};
std::atomic<size_t> g_allocated{0}, g_peak{0};
std::unordered_map<void*, size_t> g_sizes;  // live device_alloc() blocks (set-up time only)

Context& ctx() {
  if (g_ctx.device < 0) cuda_set_device(0);
  return g_ctx;
}

}  // namespace

bool cuda_built() { return true; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

void cuda_set_device(int device) {
  if (g_ctx.device == device) return;
  const int n = cuda_device_count();
  if (device < 0 || device >= n) fail("CUDA device ", device, " requested but ", n, " device(s) are available");
  LMF_CUDA_CHECK(cudaSetDevice(device));
  cudaDeviceProp p{};
  LMF_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  DeviceLimits& l = g_ctx.limits;
  l.device = device;
  l.name = p.name;
  l.max_threads_per_block = p.maxThreadsPerBlock;
  l.max_block = {p.maxThreadsDim[0], p.maxThreadsDim[1], p.maxThreadsDim[2]};
  l.max_grid = {p.maxGridSize[0], p.maxGridSize[1], p.maxGridSize[2]};
  l.smem_per_block = p.sharedMemPerBlock;
  l.smem_per_block_optin = p.sharedMemPerBlockOptin;
  l.sm_count = p.multiProcessorCount;
  LMF_CUDA_CHECK(cudaStreamCreateWithFlags(&g_ctx.stream, cudaStreamNonBlocking));
  LMF_CUBLAS_CHECK(cublasLtCreate(&g_ctx.blaslt));
  g_ctx.device = device;
}

const DeviceLimits& cuda_limits() { return ctx().limits; }

void* device_alloc(size_t bytes, const std::string& what) {
  ctx();
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    fail(what, ": cannot allocate ", bytes, " bytes on CUDA device ", g_ctx.device, " (", free_b, " of ", total_b,
         " bytes free): ", cudaGetErrorString(e));
  }
  // Zero on lmforge's (non-blocking) stream and wait: a cudaMemset on the legacy stream would not
  // be ordered before work on ours.
  LMF_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, g_ctx.stream));
  LMF_CUDA_CHECK(cudaStreamSynchronize(g_ctx.stream));
  g_sizes[p] = bytes;
  size_t now = g_allocated += bytes;
  size_t peak = g_peak.load();
  while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
  }
  return p;
}

void device_free(void* p) {
  if (!p) return;
  cudaFree(p);
  auto it = g_sizes.find(p);
  if (it != g_sizes.end()) {
    g_allocated -= it->second;
    g_sizes.erase(it);
  }
}

void device_memset0(void* p, size_t bytes) { LMF_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, ctx().stream)); }

void copy_to_device(void* dst, const void* src, size_t bytes) {
  LMF_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, ctx().stream));
  LMF_CUDA_CHECK(cudaStreamSynchronize(g_ctx.stream));
}

void copy_to_host(void* dst, const void* src, size_t bytes) {
  LMF_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, ctx().stream));
  LMF_CUDA_CHECK(cudaStreamSynchronize(g_ctx.stream));
}

void device_copy(void* dst, const void* src, size_t bytes) {
  LMF_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, ctx().stream));
}

void device_synchronize() {
  if (g_ctx.device >= 0) LMF_CUDA_CHECK(cudaStreamSynchronize(g_ctx.stream));
}

uint64_t cuda_launch_count() { return g_launches.load(); }

size_t cuda_memory_used_bytes() {
  size_t free_b = 0, total_b = 0;
  LMF_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return total_b - free_b;
}

size_t cuda_memory_free_bytes() {
  size_t free_b = 0, total_b = 0;
  LMF_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return free_b;
}

size_t cuda_peak_allocated_bytes() { return g_peak.load(); }

void* host_alloc_pinned(size_t bytes, const std::string& what) {
  ctx();
  void* p = nullptr;
  cudaError_t e = cudaMallocHost(&p, bytes ? bytes : 4);
  if (e != cudaSuccess) fail(what, ": cannot allocate ", bytes, " bytes of pinned host memory: ", cudaGetErrorString(e));
  return p;
}

void host_free_pinned(void* p) {
  if (p) cudaFreeHost(p);
}

void copy_to_device_async(void* dst, const void* src, size_t bytes) {
  LMF_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, ctx().stream));
}

void copy_to_host_async(void* dst, const void* src, size_t bytes) {
  LMF_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, ctx().stream));
}

void cuda_event_wait(void* e) { LMF_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(e))); }

void cuda_capture_begin() { LMF_CUDA_CHECK(cudaStreamBeginCapture(ctx().stream, cudaStreamCaptureModeGlobal)); }

void* cuda_capture_end() {
  cudaGraph_t g = nullptr;
  LMF_CUDA_CHECK(cudaStreamEndCapture(ctx().stream, &g));
  cudaGraphExec_t exec = nullptr;
  LMF_CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
  LMF_CUDA_CHECK(cudaGraphDestroy(g));
  return exec;
}

void cuda_graph_replay(void* exec) {
  LMF_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec), ctx().stream));
  cuda::count_launch();  // one launch, whatever the graph holds
}

void cuda_graph_destroy(void* exec) {
  if (exec) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec));
}

std::vector<void*> cuda_event_pool_create(size_t n) {
  ctx();
  std::vector<void*> ev(n);
  for (auto& e : ev) {
    cudaEvent_t x;
    LMF_CUDA_CHECK(cudaEventCreate(&x));
    e = x;
  }
  return ev;
}

void cuda_event_pool_destroy(std::vector<void*>& events) {
  for (void* e : events) cudaEventDestroy(static_cast<cudaEvent_t>(e));
  events.clear();
}

void cuda_event_record(void* e) { LMF_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(e), ctx().stream)); }

double cuda_event_elapsed_ms(void* a, void* b) {
  float ms = 0;
  LMF_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(a), static_cast<cudaEvent_t>(b)));
  return ms;
}

namespace {
thread_local cudaStream_t t_stream_override = nullptr;  // SideStreamScope
}  // namespace

void* cuda_side_stream_create() {
  ctx();
  cudaStream_t s = nullptr;
  LMF_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return s;
}

void cuda_side_stream_destroy(void* s) {
  if (s) cudaStreamDestroy(static_cast<cudaStream_t>(s));
}

void cuda_stream_fork(void* side, void* e) {
  LMF_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(e), ctx().stream));
  LMF_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(side), static_cast<cudaEvent_t>(e), 0));
}

void cuda_stream_join(void* side, void* e) {
  LMF_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(e), static_cast<cudaStream_t>(side)));
  LMF_CUDA_CHECK(cudaStreamWaitEvent(ctx().stream, static_cast<cudaEvent_t>(e), 0));
}

SideStreamScope::SideStreamScope(void* side) : previous_(t_stream_override) {
  t_stream_override = static_cast<cudaStream_t>(side);
}

SideStreamScope::~SideStreamScope() { t_stream_override = static_cast<cudaStream_t>(previous_); }

void cuda_reserve_workspace(size_t bytes) {
  Context& c = ctx();
  if (bytes <= c.workspace_bytes) return;
  if (c.workspace) device_free(c.workspace);
  c.workspace = device_alloc(bytes, "CUDA workspace");
  c.workspace_bytes = bytes;
}

size_t cuda_workspace_reserved() { return ctx().workspace_bytes; }

void* cuda_workspace(size_t bytes, const char* op) {
  Context& c = ctx();
  if (bytes > c.workspace_bytes)
    fail(op, ": needs ", bytes, " bytes of CUDA workspace but only ", c.workspace_bytes,
         " were reserved at set-up (cuda_reserve_workspace)");
  return c.workspace;
}

namespace cuda {

cudaStream_t stream() { return t_stream_override ? t_stream_override : ctx().stream; }
cublasLtHandle_t blaslt() { return ctx().blaslt; }
void count_launch() { g_launches.fetch_add(1, std::memory_order_relaxed); }

[[noreturn]] void launch_failed(const LaunchSpec& s, const std::string& problem) {
  fail("CUDA launch failed: ", describe_launch(s, cuda_limits()), ": ", problem);
}

}  // namespace cuda

}  // namespace lmf
