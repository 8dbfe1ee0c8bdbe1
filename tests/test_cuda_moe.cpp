// CUDA MoE layer (ops/moe.cu, bf16 mixed precision) against the CPU fp32 reference (ops/moe.cpp) on
// the same bf16-rounded inputs and weights: the routing (chosen experts, rows, counts, offsets, the
// permutation) exactly, the aux/z terms and drop count, the output and every gradient within bounds;
// two configurations (softmax + renormalised + GELU, dropless; sigmoid + SwiGLU + capacity drops + two
// gated shared experts + selection bias + z loss), awkward sizes (N=333, C=72, F=40, E=5); fresh random
// inputs each run; outputs poisoned; bitwise repeat; forward + backward captured in a CUDA graph in
// global mode (no allocation, no host sync) and replayed bitwise. SKIPPED without a GPU.
//
// Bounds (rel_l2 of the result, or of the gradient's increment, against the CPU): the GPU rounds x,
// pre, act, y, dy, dact, dpre and dxg to bf16 (2^-9 relative each) and sums in other orders, so each
// output carries a few bf16 roundings: 1e-2 for out, 2e-2 for the gradients. The router's logits and
// scores are fp32 from the same bf16 x, so the top-K choice matches exactly unless two scores tie
// within fp32 rounding (improbable at these sizes; the seed is printed to reproduce).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/arena.h"
#include "core/device.h"
#include "ops/moe.h"
#include "support/gpu_util.h"
#include "support/test_util.h"

namespace lmf {
namespace {

struct Layer {  // one layer's tensors on one device
  Arena w, state, scratch;
  MoeState st;
  MoeScratch sc;
  Layer(const MoeConfig& cfg, int64_t N, Device dev) {
    const bool gpu = dev == Device::cuda;
    const DType rdt = gpu ? DType::bf16 : DType::f32;
    const int64_t E = cfg.E, C = cfg.C, F = cfg.F, Fi = moe_f_in(cfg), S = cfg.n_shared;
    std::vector<TensorSpec> ws = {{"x", {N, C}, rdt},           {"router_w", {E, C}},
                                  {"w_in", {E, Fi, C}, rdt},    {"w_out", {E, C, F}, rdt},
                                  {"bias", {E}},                {"out", {N, C}, rdt},
                                  {"dx", {N, C}, rdt},          {"dout", {N, C}, rdt},
                                  {"drouter_w", {E, C}},        {"dw_in", {E, Fi, C}},
                                  {"dw_out", {E, C, F}}};
    if (S > 0)
      ws.insert(ws.end(), {{"ws_in", {S, Fi, C}, rdt}, {"ws_out", {S, C, F}, rdt}, {"ws_gate", {S, C}},
                           {"dws_in", {S, Fi, C}}, {"dws_out", {S, C, F}}, {"dws_gate", {S, C}}});
    w = Arena("moe test weights", ws, dev);
    state = Arena("moe test state", moe_state_specs(cfg, N, rdt, ""), dev);
    scratch = Arena("moe test scratch", moe_scratch_specs(cfg, N, rdt, true, ""), dev);
    st = moe_state_bind(state, cfg, "");
    sc = moe_scratch_bind(scratch, cfg, true, "");
  }
  Tensor t(const char* name) const { return w.find(name) >= 0 ? w.get(name) : Tensor(); }
  MoeExtra extra(bool with_bias) const { return {t("ws_in"), t("ws_out"), t("ws_gate"), with_bias ? t("bias") : Tensor()}; }
  MoeExtraGrads dextra() const { return {t("dws_in"), t("dws_out"), t("dws_gate")}; }
  void forward(const MoeConfig& cfg, bool bias) {
    moe_forward(t("out"), st, sc, t("x"), t("router_w"), t("w_in"), t("w_out"), extra(bias), cfg);
  }
  void backward(const MoeConfig& cfg, bool bias, float d_aux) {
    moe_backward(t("dx"), t("drouter_w"), t("dw_in"), t("dw_out"), dextra(), t("dout"), st, sc, t("x"), t("router_w"),
                 t("w_in"), t("w_out"), extra(bias), cfg, d_aux);
  }
};

// host values of any f32 / bf16 / i32 tensor, as float (i32 exactly below 2^24)
std::vector<float> host(const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  if (t.dtype == DType::f32) {
    tensor_to_host(v.data(), t);
  } else if (t.dtype == DType::bf16) {
    std::vector<bf16> b(v.size());
    tensor_to_host(b.data(), t);
    v = test::from_bf16(b);
  } else {
    std::vector<int32_t> b(v.size());
    tensor_to_host(b.data(), t);
    for (size_t i = 0; i < b.size(); ++i) v[i] = static_cast<float>(b[i]);
  }
  return v;
}

void upload(const Tensor& t, const std::vector<float>& v) {
  if (t.dtype == DType::bf16) {
    std::vector<bf16> b = test::to_bf16(v);
    tensor_from_host(t, b.data());
  } else {
    tensor_from_host(t, v.data());
  }
}

struct Case {
  const char* name;
  MoeConfig cfg;
  bool bias;
};

Case make_case(int which) {
  MoeConfig c;
  c.E = 5;
  c.K = 2;
  c.C = 72;
  c.F = 40;
  c.aux_coef = 0.01f;
  if (which == 0) {
    c.activation = MoeActivation::gelu;
    c.z_coef = 0.001f;
    c.aux_coef = 0.5f;  // large: the aux term's gradient is a visible part of drouter_w
    return {"softmax_renorm_gelu_dropless", c, false};
  }
  c.activation = MoeActivation::swiglu;
  c.score = MoeScore::sigmoid;
  c.renormalize = false;
  c.capacity_factor = 1.0f;
  c.z_coef = 0.01f;
  c.n_shared = 2;
  c.shared_gate = true;
  return {"sigmoid_swiglu_capacity_shared_bias", c, true};
}

class CudaMoe : public ::testing::TestWithParam<int> {};

TEST_P(CudaMoe, MatchesTheCpuReferenceAndIsBitwiseRepeatableAndCapturable) {
  LMF_REQUIRE_GPU();
  const Case cs = make_case(GetParam());
  const MoeConfig& cfg = cs.cfg;
  const int64_t N = 333;
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE(std::string(cs.name) + " seed " + std::to_string(seed));
  cuda_reserve_workspace(std::max<size_t>(moe_cuda_workspace(cfg, N), size_t{64} << 20));
  Layer cpu(cfg, N, Device::cpu), gpu(cfg, N, Device::cuda);
  // the same inputs on both: bf16-rounded where the GPU stores bf16
  std::vector<std::vector<float>> init;  // per weight-arena tensor
  for (size_t k = 0; k < cpu.w.size(); ++k) {
    const TensorSpec& s = cpu.w.spec(k);
    float scale = 0.1f;
    if (s.name == "x" || s.name == "dout" || s.name == "dx") scale = 1.0f;
    if (s.name == "router_w") scale = 0.3f;
    if (s.name == "bias") scale = 0.05f;
    if (s.name[0] == 'd' && s.name != "dout" && s.name != "dx") scale = 0.01f;  // initial gradients (+=)
    std::vector<float> v = test::randn(static_cast<size_t>(s.numel()), seed + k, scale);
    if (gpu.w.spec(k).dtype == DType::bf16) v = test::round_bf16(v);
    tensor_from_host(cpu.w[k], v.data());
    upload(gpu.w[k], v);
    init.push_back(v);
  }
  {  // poison the GPU output, state and scratch: 0xFF bytes are NaN in f32 and bf16, -1 in i32
    std::vector<unsigned char> junk(std::max(gpu.state.bytes(), gpu.scratch.bytes()), 0xFF);
    copy_to_device(gpu.state.base(), junk.data(), gpu.state.bytes());
    copy_to_device(gpu.scratch.base(), junk.data(), gpu.scratch.bytes());
    std::vector<bf16> nan(static_cast<size_t>(N * cfg.C), bf16{0x7FC0});
    tensor_from_host(gpu.t("out"), nan.data());
  }
  const float d_aux = 0.5f;
  const MoeLosses lc = [&] {
    MoeLosses l = moe_forward(cpu.t("out"), cpu.st, cpu.sc, cpu.t("x"), cpu.t("router_w"), cpu.t("w_in"),
                              cpu.t("w_out"), cpu.extra(cs.bias), cfg);
    return l;
  }();
  cpu.backward(cfg, cs.bias, d_aux);
  gpu.forward(cfg, cs.bias);
  gpu.backward(cfg, cs.bias, d_aux);
  device_synchronize();

  // routing: exact
  for (const char* f : {"topk_idx", "slot_row", "counts", "offsets"}) {
    const Tensor tc = cpu.state.get(f), tg = gpu.state.get(f);
    EXPECT_EQ(host(tc), host(tg)) << f;
  }
  const std::vector<float> offs = host(cpu.state.get("offsets"));
  const int64_t rows = static_cast<int64_t>(offs.back());
  std::vector<float> pc = host(cpu.state.get("perm")), pg = host(gpu.state.get("perm"));
  pc.resize(static_cast<size_t>(rows));
  pg.resize(static_cast<size_t>(rows));
  EXPECT_EQ(pc, pg) << "perm";
  const std::vector<float> stats = host(gpu.st.stats);
  EXPECT_NEAR(stats[0], lc.aux, 1e-4 * std::abs(lc.aux) + 1e-9) << "aux";
  EXPECT_NEAR(stats[1], lc.z, 1e-4 * std::abs(lc.z) + 1e-9) << "z";
  EXPECT_EQ(static_cast<int64_t>(stats[2]), lc.dropped) << "dropped";
  if (cfg.capacity_factor > 0) EXPECT_GT(lc.dropped, 0) << "this case should drop assignments";
  std::printf("[ measured ] %s: aux %.6g vs %.6g, z %.6g vs %.6g, dropped %lld\n", cs.name, stats[0], lc.aux,
              stats[1], lc.z, static_cast<long long>(lc.dropped));

  // values
  auto check = [&](const char* name, double bound, bool increment) {
    std::vector<float> g = host(gpu.t(name)), c = host(cpu.t(name));
    if (increment) {
      const std::vector<float>& i0 = init[static_cast<size_t>(cpu.w.find(name))];
      for (size_t i = 0; i < g.size(); ++i) { g[i] -= i0[i]; c[i] -= i0[i]; }
    }
    const double e = test::rel_l2_error(g, c);
    std::printf("  %-10s rel_l2 %.2e (bound %.0e)\n", name, e, bound);
    EXPECT_LE(e, bound) << name;
  };
  check("out", 1e-2, false);
  for (const char* g : {"dx", "drouter_w", "dw_in", "dw_out"}) check(g, 2e-2, true);
  if (cfg.n_shared > 0)
    for (const char* g : {"dws_in", "dws_out", "dws_gate"}) check(g, 2e-2, true);

  // bitwise repeat, then the same in a graph captured in global mode
  auto results = [&] {
    std::vector<std::vector<float>> r;
    for (const char* f : {"out", "dx", "drouter_w", "dw_in", "dw_out", "dws_in", "dws_out", "dws_gate"})
      if (gpu.w.find(f) >= 0) r.push_back(host(gpu.t(f)));
    r.push_back(host(gpu.st.stats));
    return r;
  };
  auto reset_grads = [&] {
    for (size_t k = 0; k < gpu.w.size(); ++k)
      if (gpu.w.spec(k).name[0] == 'd' && gpu.w.spec(k).name != "dout") upload(gpu.w[k], init[k]);
  };
  const auto first = results();
  reset_grads();
  gpu.forward(cfg, cs.bias);
  gpu.backward(cfg, cs.bias, d_aux);
  device_synchronize();
  EXPECT_TRUE(results() == first) << "second run differs bitwise";
  reset_grads();
  device_synchronize();
  cuda_capture_begin();
  gpu.forward(cfg, cs.bias);
  gpu.backward(cfg, cs.bias, d_aux);
  void* graph = nullptr;
  ASSERT_NO_THROW(graph = cuda_capture_end());
  cuda_graph_replay(graph);
  device_synchronize();
  cuda_graph_destroy(graph);
  EXPECT_TRUE(results() == first) << "graph replay differs bitwise from eager";
}

INSTANTIATE_TEST_SUITE_P(Configs, CudaMoe, ::testing::Values(0, 1), [](const ::testing::TestParamInfo<int>& i) {
  return std::string(i.param == 0 ? "SoftmaxGeluDropless" : "SigmoidSwigluCapacitySharedBias");
});

}  // namespace
}  // namespace lmf
