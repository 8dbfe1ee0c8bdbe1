// flash_attention_cudnn.cpp: the cuDNN kernels behind flash_attention_forward/backward
// (FlashKernels::cudnn, attention.h): cuDNN's fused scaled-dot-product attention (SDPA) through the
// graph API of the cuDNN frontend headers. Same contract as lmforge's own kernels (flash_attention.cu):
// bf16 qkv/out/dout/dqkv, fp32 softmax and accumulation, causal, GQA, lse as the natural log.
//
// Layout, all as strided views of lmforge's buffers (no copies), dims (batch, heads, time, head dim):
//   Q  = qkv + h HS                 dims (B, NH,  T, HS)  strides (T C3, HS, C3, 1)
//   K  = qkv + NH HS                dims (B, NKV, T, HS)  same strides
//   V  = qkv + (NH + NKV) HS        dims (B, NKV, T, HS)  same strides
//   O, dO = out, dout               dims (B, NH,  T, HS)  strides (T CO, HS, CO, 1), CO = NH HS
//   Stats = lse (f32)               dims (B, NH, T, 1)    strides (NH T, T, 1, 1)
//   dQ, dK, dV: dqkv at the offsets and strides of Q, K, V (written, not added: GradMode::Overwrite)
// cuDNN's Stats are the softmax's log-sum-exp of the scaled scores (natural log), the value lmforge's
// own kernels store in lse: either kernel set can run the backward of the other's forward (tested).
//
// Plans: one forward and one backward graph per shape (B, T, NH, NKV, HS) and device, built on first
// use (validate, operation graph, heuristics mode A, support check, plan), kept for the process. The
// model builds its plans at set-up through flash_attention_cuda_workspace(), so no step builds one
// (building queries the GPU and may allocate: it must not happen inside a CUDA-graph capture; a plan
// missing during a capture is an error, not a silent build).
// Determinism: the backward asks for cuDNN's deterministic algorithm (no atomic dQ accumulation); the
// forward has no cross-block sums. Repeatability and batch invariance are tested on the device
// (tests/test_cuda_flash_attention.cpp), as cuDNN documents neither for every engine.
// Workspace: the plan's, from lmf::cuda_workspace (reserved at set-up; standalone calls reserve it on
// first use, outside any capture).
#include <string>

#include "core/check.h"
#include "ops/attention.h"
#include "ops/op_plans.h"

#ifdef LMF_WITH_CUDNN

#include <cudnn.h>
#include <cudnn_frontend.h>

#include <algorithm>
#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/cuda_check.h"
#include "core/cuda_context.h"
#include "core/device.h"
#include "core/launch.h"

namespace lmf {
namespace {

namespace fe = cudnn_frontend;

// Tensor uids of the variant pack.
enum Uid : int64_t { kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV };

struct Shape {
  int64_t B, T, NH, NKV, HS;
  int64_t C3() const { return (NH + 2 * NKV) * HS; }
  int64_t CO() const { return NH * HS; }
  ShapeText text() const { return shape_text("B=", B, " T=", T, " NH=", NH, " NKV=", NKV, " HS=", HS); }
};

struct Plan {
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace = 0;
  Shape shape{};
  bool backward = false;
  int64_t index = -1;       // the engine config executed: -1 the heuristic's choice, else a tuned one
  std::array<void*, 9> last{};  // the latest call's pointers while the tuning window is open (no allocation)
  int nlast = 0;                // how many of them: 0 when not called in the window
  int64_t calls = 0;            // calls while the window is open
};

// A model's cuDNN plans (ops/op_plans.h): the handle, the plan of every (device, direction, shape)
// and the tuning window. The process's default cache serves calls made with no OpPlans bound.
struct Cache {
  std::mutex mu;
  bool tune_open = false;  // cudnn_attention_tune_begin() .. cudnn_attention_autotune()
  cudnnHandle_t handle = nullptr;
  int device = -1;
  std::map<std::tuple<int, bool, int64_t, int64_t, int64_t, int64_t, int64_t>, Plan> plans;  // (device, bwd, shape)
  ~Cache() {
    plans.clear();  // the graphs first: they were built on the handle
    if (handle != nullptr) cudnnDestroy(handle);
  }
};
Cache& cache() {
  const OpPlans* bound = op_plans_current();
  if (bound != nullptr && bound->cudnn() != nullptr) return *static_cast<Cache*>(bound->cudnn());
  static Cache c;
  return c;
}

[[noreturn]] void cudnn_failed(const char* op, const Shape& s, const std::string& step, const std::string& why) {
  fail(op, " (cuDNN ", cudnnGetVersion(), "): ", step, " failed for ", s.text().c_str(), ": ", why);
}

void check_fe(fe::error_t e, const char* op, const Shape& s, const char* step) {
  if (!e.is_good()) cudnn_failed(op, s, step, e.get_message());
}

// The handle of the current device, bound to lmforge's stream (created once; the caller holds mu).
cudnnHandle_t handle_locked(Cache& c) {
  int dev = 0;
  LMF_CUDA_CHECK(cudaGetDevice(&dev));
  if (c.handle == nullptr || c.device != dev) {
    if (c.handle != nullptr) cudnnDestroy(c.handle);
    c.handle = nullptr;
    const cudnnStatus_t st = cudnnCreate(&c.handle);
    if (st != CUDNN_STATUS_SUCCESS)
      fail("cuDNN: cudnnCreate failed on CUDA device ", dev, ": ", cudnnGetErrorString(st));
    c.device = dev;
    c.plans.clear();
  }
  const cudnnStatus_t st = cudnnSetStream(c.handle, cuda::stream());
  if (st != CUDNN_STATUS_SUCCESS) fail("cuDNN: cudnnSetStream failed: ", cudnnGetErrorString(st));
  return c.handle;
}

std::shared_ptr<fe::graph::Tensor_attributes> qkv_part(fe::graph::Graph& g, const char* name, Uid uid,
                                                        int64_t heads, const Shape& s) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_dim({s.B, heads, s.T, s.HS})
                      .set_stride({s.T * s.C3(), s.HS, s.C3(), 1}));
}

std::shared_ptr<fe::graph::Tensor_attributes> out_like(fe::graph::Graph& g, const char* name, Uid uid,
                                                       const Shape& s) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_dim({s.B, s.NH, s.T, s.HS})
                      .set_stride({s.T * s.CO(), s.HS, s.CO(), 1}));
}

std::vector<int64_t> stats_dim(const Shape& s) { return {s.B, s.NH, s.T, 1}; }
std::vector<int64_t> stats_stride(const Shape& s) { return {s.NH * s.T, s.T, 1, 1}; }

std::shared_ptr<fe::graph::Graph> new_graph() {
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(fe::DataType_t::BFLOAT16)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  return g;
}

std::shared_ptr<fe::graph::Graph> forward_graph(const Shape& s, float scale) {
  auto g = new_graph();
  auto q = qkv_part(*g, "Q", kQ, s.NH, s), k = qkv_part(*g, "K", kK, s.NKV, s), v = qkv_part(*g, "V", kV, s.NKV, s);
  auto opts = fe::graph::SDPA_attributes()
                  .set_name("lmforge_flash_attention_forward")
                  .set_generate_stats(true)
                  .set_causal_mask(true)
                  .set_attn_scale(scale);
  auto [o, stats] = g->sdpa(q, k, v, opts);
  o->set_output(true).set_uid(kO).set_dim({s.B, s.NH, s.T, s.HS}).set_stride({s.T * s.CO(), s.HS, s.CO(), 1});
  stats->set_output(true).set_uid(kStats).set_data_type(fe::DataType_t::FLOAT).set_dim(stats_dim(s)).set_stride(
      stats_stride(s));
  return g;
}

std::shared_ptr<fe::graph::Graph> backward_graph(const Shape& s, float scale) {
  auto g = new_graph();
  auto q = qkv_part(*g, "Q", kQ, s.NH, s), k = qkv_part(*g, "K", kK, s.NKV, s), v = qkv_part(*g, "V", kV, s.NKV, s);
  auto o = out_like(*g, "O", kO, s), dout = out_like(*g, "dO", kDO, s);
  auto stats = g->tensor(fe::graph::Tensor_attributes()
                             .set_name("Stats")
                             .set_uid(kStats)
                             .set_dim(stats_dim(s))
                             .set_stride(stats_stride(s))
                             .set_data_type(fe::DataType_t::FLOAT));
  auto opts = fe::graph::SDPA_backward_attributes()
                  .set_name("lmforge_flash_attention_backward")
                  .set_causal_mask(true)
                  .set_attn_scale(scale)
                  .set_deterministic_algorithm(true);
  auto [dq, dk, dv] = g->sdpa_backward(q, k, v, o, dout, stats, opts);
  const std::vector<int64_t> stride = {s.T * s.C3(), s.HS, s.C3(), 1};
  dq->set_output(true).set_uid(kDQ).set_dim({s.B, s.NH, s.T, s.HS}).set_stride(stride);
  dk->set_output(true).set_uid(kDK).set_dim({s.B, s.NKV, s.T, s.HS}).set_stride(stride);
  dv->set_output(true).set_uid(kDV).set_dim({s.B, s.NKV, s.T, s.HS}).set_stride(stride);
  return g;
}

bool capturing() {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  LMF_CUDA_CHECK(cudaStreamIsCapturing(cuda::stream(), &st));
  return st != cudaStreamCaptureStatusNone;
}

// The plan of (backward, shape), built on first use; returns it with the handle (bound to the stream).
std::pair<Plan*, cudnnHandle_t> plan_for(bool backward, const Shape& s, float scale, const char* op) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  cudnnHandle_t h = handle_locked(c);
  const auto key = std::make_tuple(c.device, backward, s.B, s.T, s.NH, s.NKV, s.HS);
  auto it = c.plans.find(key);
  if (it != c.plans.end()) return {&it->second, h};
  if (capturing())
    fail(op, ": no cuDNN plan for ", s.text().c_str(), " while the stream is being captured into a CUDA graph; build it at "
         "set-up with flash_attention_cuda_workspace()");
  Plan p;
  p.shape = s;
  p.backward = backward;
  p.graph = backward ? backward_graph(s, scale) : forward_graph(s, scale);
  check_fe(p.graph->validate(), op, s, "graph validation");
  check_fe(p.graph->build_operation_graph(h), op, s, "operation graph");
  check_fe(p.graph->create_execution_plans({fe::HeurMode_t::A}), op, s, "heuristics");
  check_fe(p.graph->check_support(h), op, s, "support check");
  check_fe(p.graph->build_plans(h), op, s, "plan build");
  check_fe(p.graph->get_workspace_size(p.workspace), op, s, "workspace query");
  return {&c.plans.emplace(key, std::move(p)).first->second, h};
}

// Runs engine config `index` (-1: the heuristic's choice) of the plan on ptrs, the variant pack's
// device pointers in increasing uid order (the frontend's sorted-pointer execute: no map built per
// call; the frontend checks the count against the graph's).
fe::error_t run_config(const Plan& p, cudnnHandle_t h, void** ptrs, int n, int64_t index, void* ws) {
  return index < 0 ? p.graph->execute(h, ptrs, n, ws) : p.graph->execute_plan_at_index(h, ptrs, n, ws, index);
}

template <size_t N>
void execute(Plan& p, cudnnHandle_t h, void* (&ptrs)[N], const char* op) {
  static_assert(N <= std::tuple_size_v<decltype(Plan::last)>);
  if (cache().tune_open) {  // the caller holds no lock: one stream, one thread
    std::copy(ptrs, ptrs + N, p.last.begin());
    p.nlast = static_cast<int>(N);
    ++p.calls;
  }
  void* ws = nullptr;
  if (p.workspace > 0) {
    cuda_reserve_workspace(static_cast<size_t>(p.workspace));  // a no-op once reserved (set-up)
    ws = cuda_workspace(static_cast<size_t>(p.workspace), op);
  }
  check_fe(run_config(p, h, ptrs, static_cast<int>(N), p.index, ws), op, p.shape, "execute");
  cuda::count_launch();
}

void* mut(const void* p) { return const_cast<void*>(p); }

// What a plan writes, as (index in its pointer list, bytes): the forward O and Stats, the backward the
// dqkv buffer (dQ, dK and dV interleaved in it, from dQ's pointer).
std::vector<std::pair<size_t, size_t>> outputs_of(const Plan& p) {
  const Shape& s = p.shape;
  const auto n = [](int64_t v) { return static_cast<size_t>(v); };
  if (!p.backward) return {{3, n(s.B * s.T * s.CO()) * sizeof(bf16)}, {4, n(s.B * s.NH * s.T) * sizeof(float)}};
  return {{6, n(s.B * s.T * s.C3()) * sizeof(bf16)}};
}

// Times engine config `index` on the plan's latest call: mean ms over `reps` runs; its outputs copied
// to `out` first (one run). false if the config does not run.
bool try_config(Plan& p, cudnnHandle_t h, int64_t index, int64_t workspace, std::vector<std::vector<char>>& out,
                double* ms) {
  const char* op = "cudnn_attention_autotune";
  void* ws = workspace > 0 ? cuda_workspace(static_cast<size_t>(workspace), op) : nullptr;
  auto run = [&] { return run_config(p, h, p.last.data(), p.nlast, index, ws).is_good(); };
  if (!run()) return false;
  const auto outs = outputs_of(p);
  out.resize(outs.size());
  for (size_t i = 0; i < outs.size(); ++i) {
    out[i].resize(outs[i].second);
    LMF_CUDA_CHECK(cudaMemcpyAsync(out[i].data(), p.last[outs[i].first], outs[i].second, cudaMemcpyDeviceToHost,
                                   cuda::stream()));
  }
  constexpr int kReps = 5;
  cudaEvent_t e0, e1;
  LMF_CUDA_CHECK(cudaEventCreate(&e0));
  LMF_CUDA_CHECK(cudaEventCreate(&e1));
  LMF_CUDA_CHECK(cudaEventRecord(e0, cuda::stream()));
  bool ok = true;
  for (int r = 0; r < kReps && ok; ++r) ok = run();
  LMF_CUDA_CHECK(cudaEventRecord(e1, cuda::stream()));
  LMF_CUDA_CHECK(cudaEventSynchronize(e1));
  float t = 0;
  LMF_CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
  LMF_CUDA_CHECK(cudaEventDestroy(e0));
  LMF_CUDA_CHECK(cudaEventDestroy(e1));
  *ms = t / kReps;
  return ok;
}

}  // namespace

namespace detail {
void* cudnn_plans_new() { return new Cache(); }
void cudnn_plans_delete(void* p) { delete static_cast<Cache*>(p); }
}  // namespace detail

void cudnn_attention_tune_begin() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.tune_open = true;
  for (auto& entry : c.plans) {
    entry.second.nlast = 0;
    entry.second.calls = 0;
  }
}

AttentionTuneResult cudnn_attention_autotune() {
  const char* op = "cudnn_attention_autotune";
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const bool was_open = c.tune_open;
  c.tune_open = false;
  AttentionTuneResult r;
  if (!was_open) return r;
  if (capturing()) fail(op, ": called while the stream is being captured into a CUDA graph; call it between steps");
  cudnnHandle_t h = handle_locked(c);
  const int64_t reserved = static_cast<int64_t>(cuda_workspace_reserved());
  for (auto& entry : c.plans) {
    Plan& p = entry.second;
    if (p.nlast == 0) continue;
    ++r.plans;
    // the reference: the current choice's outputs and time
    std::vector<std::vector<char>> ref, got;
    double ref_ms = 0;
    if (!try_config(p, h, p.index, p.workspace, ref, &ref_ms)) cudnn_failed(op, p.shape, "execute", "reference run");
    check_fe(p.graph->build_plans(h, fe::BuildPlanPolicy_t::ALL), op, p.shape, "plan build (all engine configs)");
    int64_t best = p.index, best_ws = p.workspace;
    double best_ms = ref_ms;
    for (int64_t i = 0; i < p.graph->get_execution_plan_count(); ++i) {
      int64_t ws = 0;
      if (!p.graph->get_workspace_size_plan_at_index(i, ws).is_good()) continue;
      ++r.candidates;
      if (ws > reserved) {
        ++r.too_big;
        continue;
      }
      double ms = 0;
      if (!try_config(p, h, i, ws, got, &ms) || got != ref) continue;
      ++r.equal;
      if (ms < best_ms) best = i, best_ws = ws, best_ms = ms;
    }
    if (best != p.index && best_ms <= 0.98 * ref_ms) {
      r.saved_ms += static_cast<double>(p.calls) * (ref_ms - best_ms);
      ++r.changed;
      p.index = best;
      p.workspace = best_ws;
    }
    // leave the outputs as the chosen config writes them (the same bits as the reference's)
    if (!try_config(p, h, p.index, p.workspace, got, &best_ms)) cudnn_failed(op, p.shape, "execute", "final run");
  }
  return r;
}

std::string cudnn_version_text() {
  const size_t v = cudnnGetVersion();  // cuDNN 9: major * 10000 + minor * 100 + patch
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

bool cudnn_attention_available() {
  static const bool ok = [] {
    if (cuda_device_count() == 0) return false;
    return cudnnGetVersion() >= 90000;  // the SDPA graphs need cuDNN 9
  }();
  return ok;
}

namespace cuda {

size_t cudnn_flash_attention_workspace(int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS, float scale) {
  const Shape s{B, T, NH, NKV, HS};
  const int64_t f = plan_for(false, s, scale, "flash_attention_forward").first->workspace;
  const int64_t b = plan_for(true, s, scale, "flash_attention_backward").first->workspace;
  return static_cast<size_t>(std::max(f, b));
}

std::string cudnn_flash_attention_problem(int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS, float scale) {
  try {
    cudnn_flash_attention_workspace(B, T, NH, NKV, HS, scale);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

void cudnn_flash_attention_forward(bf16* out, float* lse, const bf16* qkv, int64_t B, int64_t T, int64_t NH,
                                   int64_t NKV, int64_t HS, float scale) {
  const char* op = "flash_attention_forward";
  const Shape s{B, T, NH, NKV, HS};
  auto [plan, h] = plan_for(false, s, scale, op);
  static_assert(kQ == 1 && kK == 2 && kV == 3 && kO == 4 && kStats == 5, "pointers in uid order");
  void* ptrs[] = {mut(qkv), mut(qkv + NH * HS), mut(qkv + (NH + NKV) * HS), out, lse};
  execute(*plan, h, ptrs, op);
}

void cudnn_flash_attention_backward(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse,
                                    int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS, float scale) {
  const char* op = "flash_attention_backward";
  const Shape s{B, T, NH, NKV, HS};
  auto [plan, h] = plan_for(true, s, scale, op);
  static_assert(kStats == 5 && kDO == 6 && kDQ == 7 && kDK == 8 && kDV == 9, "pointers in uid order");
  void* ptrs[] = {mut(qkv), mut(qkv + NH * HS), mut(qkv + (NH + NKV) * HS), mut(out), mut(lse), mut(dout),
                  dqkv,     dqkv + NH * HS,     dqkv + (NH + NKV) * HS};
  execute(*plan, h, ptrs, op);
}

}  // namespace cuda
}  // namespace lmf

#else  // built without cuDNN: the capability query says so; the launchers are never reached (the op
       // entries check cudnn_attention_available() first) and fail loudly if they are.

namespace lmf {

bool cudnn_attention_available() { return false; }
std::string cudnn_version_text() { return "none"; }
namespace detail {
void* cudnn_plans_new() { return nullptr; }  // no cuDNN: no plans to keep
void cudnn_plans_delete(void*) {}
}  // namespace detail
void cudnn_attention_tune_begin() {}
AttentionTuneResult cudnn_attention_autotune() { return {}; }

#ifdef LMF_WITH_CUDA
namespace cuda {
namespace {
[[noreturn]] void no_cudnn(const char* op) {
  fail(op, ": lmforge was built without cuDNN (scripts/install_deps.sh fetches the cuDNN frontend headers)");
}
}  // namespace
size_t cudnn_flash_attention_workspace(int64_t, int64_t, int64_t, int64_t, int64_t, float) {
  no_cudnn("flash_attention_cuda_workspace");
}
std::string cudnn_flash_attention_problem(int64_t, int64_t, int64_t, int64_t, int64_t, float) {
  no_cudnn("cudnn_attention_problem");
}
void cudnn_flash_attention_forward(bf16*, float*, const bf16*, int64_t, int64_t, int64_t, int64_t, int64_t, float) {
  no_cudnn("flash_attention_forward");
}
void cudnn_flash_attention_backward(bf16*, const bf16*, const bf16*, const bf16*, const float*, int64_t, int64_t,
                                    int64_t, int64_t, int64_t, float) {
  no_cudnn("flash_attention_backward");
}
}  // namespace cuda
#endif

}  // namespace lmf

#endif
