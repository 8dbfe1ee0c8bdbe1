// The MoE FFN CPU reference (ops/moe.h) against an independent PyTorch float64 MoE layer
// (tools/make_moe_fixture.py, fixtures tests/fixtures/moe_small_{a,b}.safetensors) on the same
// fp32 inputs: N=10, C=16, E=4, K=2, F=12, aux_coef 0.01, z_coef 0.001,
//   a: softmax router, renormalised, SwiGLU experts, dropless
//   b: sigmoid router, not renormalised, tanh-GELU experts, capacity_factor 1.0 (drops > 0)
// Loss L = sum(out * G) + aux + z; backward with d_aux = 1 into zeroed gradient buffers.
//
// Tolerance: our fp32 result against the float64 reference, per tensor,
//   |ours - ref| <= 1e-5 * max|ref| + 1e-7   elementwise   (out, dx, drouter_w, dw_in, dw_out)
//   |ours - ref| <= 1e-5 * |ref|                           (aux, z)
// Routing (top-K experts) and the drop count must match exactly (the fixture guarantees a top-K
// score gap >= 1e-3, so fp32 rounding cannot flip a choice).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "ops/moe.h"
#include "support/fixture_tensor.h"
#include "support/moe_state.h"
#include "support/test_util.h"
#include "train/safetensors.h"

namespace lmf {
namespace {

using nlohmann::json;
using test::StateBuf;
using test::tensor_of;

constexpr double kRel = 1e-5;  // of each tensor's max |ref|
constexpr double kAbs = 1e-7;

struct Fixture {
  SafetensorsFile file;
  json cfg;
  explicit Fixture(const std::string& name) : file(test::fixture_path(name + ".safetensors")) {
    cfg = json::parse(file.metadata().at("config"));
  }
  std::vector<double> f64(const std::string& name) const { return test::fixture_tensor<double>(file, name, "F64"); }
  std::vector<int32_t> i32(const std::string& name) const { return test::fixture_tensor<int32_t>(file, name, "I32"); }
};

// Compares a to r within kRel * max|r| + kAbs; records the worst |a - r| / max|r| in *worst.
::testing::AssertionResult close_to_scale(const std::string& what, const std::vector<float>& a,
                                          const std::vector<double>& r, double* worst) {
  if (a.size() != r.size())
    return ::testing::AssertionFailure() << what << ": size " << a.size() << " vs reference " << r.size();
  return test::close_to_tensor_scale(what, a.data(), r.data(), r.size(), kRel, kAbs, worst);
}

class MoeVsTorch : public ::testing::TestWithParam<const char*> {};

TEST_P(MoeVsTorch, ForwardAuxAndGradientsMatch) {
  const Fixture fx(GetParam());
  const json& j = fx.cfg;
  const int64_t N = j.at("N");
  MoeConfig cfg;
  cfg.E = j.at("E");
  cfg.K = j.at("K");
  cfg.C = j.at("C");
  cfg.F = j.at("F");
  cfg.activation = j.at("activation") == "swiglu" ? MoeActivation::swiglu : MoeActivation::gelu;
  cfg.score = j.at("score") == "softmax" ? MoeScore::softmax : MoeScore::sigmoid;
  cfg.renormalize = j.at("renormalize");
  cfg.capacity_factor = j.at("capacity_factor").get<float>();
  cfg.aux_coef = j.at("aux_coef").get<float>();
  cfg.z_coef = j.at("z_coef").get<float>();
  const int64_t E = cfg.E, C = cfg.C, F = cfg.F, Fi = moe_f_in(cfg);

  std::vector<float> x(N * C), rw(E * C), win(E * Fi * C), wout(E * C * F), G(N * C);
  Tensor tx = tensor_of(x, {N, C}, "x"), trw = tensor_of(rw, {E, C}, "router_w");
  Tensor twin = tensor_of(win, {E, Fi, C}, "w_in"), twout = tensor_of(wout, {E, C, F}, "w_out");
  Tensor tG = tensor_of(G, {N, C}, "G");
  fx.file.read_into("x", tx);
  fx.file.read_into("router_w", trw);
  fx.file.read_into("w_in", twin);
  fx.file.read_into("w_out", twout);
  fx.file.read_into("G", tG);

  StateBuf sb(cfg, N);
  std::vector<float> out(N * C);
  const MoeLosses ls = moe_forward(tensor_of(out, {N, C}, "out"), sb.st, tx, trw, twin, twout, cfg);

  // routing and drops: exact
  EXPECT_EQ(sb.topk_idx, fx.i32("ref.topk_idx"));
  EXPECT_EQ(ls.dropped, fx.i32("ref.dropped").at(0));
  if (cfg.capacity_factor > 0) {
    EXPECT_GT(ls.dropped, 0) << "fixture b must exercise the capacity";
  }

  double w_out_err = 0, w_dx = 0, w_drw = 0, w_dwin = 0, w_dwout = 0;
  EXPECT_TRUE(close_to_scale("out", out, fx.f64("ref.out"), &w_out_err));
  const double aux_ref = fx.f64("ref.aux").at(0), z_ref = fx.f64("ref.z").at(0);
  const double aux_err = std::fabs(ls.aux - aux_ref) / std::fabs(aux_ref);
  const double z_err = std::fabs(ls.z - z_ref) / std::fabs(z_ref);
  EXPECT_LE(aux_err, kRel) << "aux " << ls.aux << " vs " << aux_ref;
  EXPECT_LE(z_err, kRel) << "z " << ls.z << " vs " << z_ref;

  std::vector<float> dx(N * C, 0.0f), drw(E * C, 0.0f), dwin(E * Fi * C, 0.0f), dwout(E * C * F, 0.0f);
  moe_backward(tensor_of(dx, {N, C}, "dx"), tensor_of(drw, {E, C}, "drouter_w"),
               tensor_of(dwin, {E, Fi, C}, "dw_in"), tensor_of(dwout, {E, C, F}, "dw_out"), tG, sb.st, tx, trw,
               twin, twout, cfg, 1.0f);
  EXPECT_TRUE(close_to_scale("dx", dx, fx.f64("grad.x"), &w_dx));
  EXPECT_TRUE(close_to_scale("drouter_w", drw, fx.f64("grad.router_w"), &w_drw));
  EXPECT_TRUE(close_to_scale("dw_in", dwin, fx.f64("grad.w_in"), &w_dwin));
  EXPECT_TRUE(close_to_scale("dw_out", dwout, fx.f64("grad.w_out"), &w_dwout));

  std::printf(
      "[ measured ] %s (dropped %lld): err / max|ref|: out %.2e, dx %.2e, drouter_w %.2e, dw_in %.2e, "
      "dw_out %.2e; rel err aux %.2e, z %.2e (bound %.0e)\n",
      GetParam(), static_cast<long long>(ls.dropped), w_out_err, w_dx, w_drw, w_dwin, w_dwout, aux_err, z_err,
      kRel);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, MoeVsTorch, ::testing::Values("moe_small_a", "moe_small_b"),
                         [](const auto& info) { return std::string(info.param).substr(10); });

}  // namespace
}  // namespace lmf
