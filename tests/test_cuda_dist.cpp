// Data parallelism's gradient buckets on the GPU (dist/grad_buckets.h): each bucket's all-reduce runs
// on the buckets' side stream, forked from lmforge's stream after the kernels that finished it and
// joined back at finish(), eagerly and inside a captured CUDA graph. The communicator here stands in
// for NCCL (which needs a second GPU to sum anything): its "all-reduce" doubles the bucket with a kernel
// on the current stream, so a bucket read before its writer finished, a doubling on the wrong stream
// ordered wrongly, or a read before the join, shows up as a wrong value. tools/gpu_check.sh dist runs
// the real NCCL path (launch -n 1, graphs) against the plain run.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "core/comm.h"
#include "core/device.h"
#include "dist/grad_buckets.h"
#include "ops/residual.h"
#include "support/gpu_util.h"
#include "support/test_util.h"

namespace lmf {
namespace {

class DoublingComm final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 2; }
  void all_reduce_sum(Tensor t) override {
    scale_forward(t, t, 2.0f);  // on cuda::stream(): the side stream inside GradBuckets
    ++calls;
  }
  void all_reduce_max(Tensor) override {}
  void all_gather(Tensor, Tensor) override {}
  void reduce_scatter_sum(Tensor, Tensor) override {}
  void broadcast(Tensor, int) override {}
  void barrier() override {}
  const char* backend() const override { return "doubling (test)"; }
  int calls = 0;
};

// A "backward" of four layers of 1M elements over [64, 4M + 64) and an input end [0, 64): each layer
// is copied in from `src` by a kernel on lmforge's stream, then declared final; buckets of >= 1.5M
// elements (two layers). After finish(), a kernel on lmforge's stream copies the gradients out.
void one_step(GradBuckets& b, Tensor grads, Tensor src, Tensor out, int64_t layer) {
  const int64_t n = grads.numel();
  auto part = [](Tensor t, int64_t lo, int64_t hi) {
    return Tensor(t.f32() + lo, DType::f32, {hi - lo}, "part", Device::cuda);
  };
  b.begin();
  for (int64_t hi = n; hi > 64; hi -= layer) {
    const int64_t lo = hi - layer;
    scale_forward(part(grads, lo, hi), part(src, lo, hi), 1.0f);
    b.final_from(lo);
  }
  scale_forward(part(grads, 0, 64), part(src, 0, 64), 1.0f);
  b.finish();
  scale_forward(out, grads, 1.0f);
}

TEST(CudaGradBuckets, SideStreamBucketsEagerAndInsideAGraph) {
  LMF_REQUIRE_GPU();
  const int64_t layer = int64_t{1} << 20, n = 4 * layer + 64;
  const uint64_t seed = test::fresh_seed();
  const std::vector<float> h = test::randn(static_cast<size_t>(n), seed);
  std::vector<float> twice(h.size());
  for (size_t i = 0; i < h.size(); ++i) twice[i] = 2.0f * h[i];
  test::DeviceBuffer src(h), grads(static_cast<size_t>(n) * 4), out(static_cast<size_t>(n) * 4);
  const Tensor g = grads.tensor(DType::f32, {n}, "grads"), s = src.tensor(DType::f32, {n}, "src"),
               o = out.tensor(DType::f32, {n}, "out");
  DoublingComm comm;
  GradBuckets b(g, comm, 3 * layer / 2, 6);

  out.poison();
  one_step(b, g, s, o, layer);
  device_synchronize();
  EXPECT_EQ(comm.calls, 3);  // layers 3+2, 1+0, the input end
  EXPECT_EQ(b.buckets(), (std::vector<std::pair<int64_t, int64_t>>{{2 * layer + 64, n}, {64, 2 * layer + 64}, {0, 64}}));
  EXPECT_EQ(out.download<float>(), twice) << "eager, seed " << seed;

  cuda_capture_begin();
  one_step(b, g, s, o, layer);
  void* graph = cuda_capture_end();
  for (int replay = 0; replay < 3; ++replay) {
    out.poison();
    cuda_graph_replay(graph);
    device_synchronize();
    ASSERT_EQ(out.download<float>(), twice) << "graph replay " << replay << ", seed " << seed;
  }
  cuda_graph_destroy(graph);
}

}  // namespace
}  // namespace lmf
