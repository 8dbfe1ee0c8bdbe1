// The MoE model (issue 4) end to end on the CPU: the gradient of the whole model, aux terms
// included, against central differences of loss + aux along random directions, in every MoE
// configuration the model exposes (shared gated experts, sigmoid scores, capacity drops, z loss,
// dense first layers); parameter counts; config errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/rng.h"
#include "model/config.h"
#include "model/gpt.h"
#include "support/test_util.h"

namespace lmf {
namespace {

ModelConfig moe_config(const std::string& variant) {
  ModelConfig c = config_preset("test-moe");
  if (variant == "shared_sigmoid_z") {
    c.activation = ActivationKind::swiglu;
    c.moe.shared = 1;
    c.moe.shared_gate = true;
    c.moe.sigmoid = true;
    c.moe.renormalize = false;
    c.moe.z_coef = 0.01f;
    c.moe.aux_coef = 0.05f;
  } else if (variant == "capacity_first_dense") {
    c.n_layer = 3;
    c.moe.first_dense = 1;
    c.moe.capacity_factor = 1.0f;
  }
  c.validate(variant);
  return c;
}

// loss + aux of one forward, in double
double total_loss(Gpt& m, Tensor tokens, Tensor targets) {
  const double pred = m.model.forward_loss(tokens, targets);
  return pred + m.model.moe_summary().aux;
}

class MoeModelGrad : public ::testing::TestWithParam<const char*> {};

// d(loss + aux)/d(params) . u against (L(p + h u) - L(p - h u)) / 2h for random directions u. The
// step is small; a direction along which a top-K choice flips (the routing is compared at +-h) is
// skipped, and 4 of at most 8 directions must be checked.
TEST_P(MoeModelGrad, WholeModelGradientMatchesCentralDifferences) {
  const ModelConfig c = moe_config(GetParam());
  const int64_t B = 2, T = 8;
  Gpt m(c, ModelPlan{B, T, true});
  m.params.init_gpt2(11, c.n_layer, c.vocab_size);
  std::vector<int32_t> toks = test::randint(B * T, 3, static_cast<int32_t>(c.vocab_size));
  std::vector<int32_t> tgts = test::randint(B * T, 4, static_cast<int32_t>(c.vocab_size));
  Tensor tokens = test::tensor_of(toks, {B, T}, "tokens"), targets = test::tensor_of(tgts, {B, T}, "targets");
  m.state->zero_grad();
  m.model.forward_backward(tokens, targets);
  const Tensor p = m.params.master().flat_f32(), g = m.state->grads().flat_f32();
  const std::vector<float> p0(p.f32(), p.f32() + p.numel());
  auto routing = [&] {
    std::vector<int32_t> r;
    for (const MoeState& st : m.model.moe_states()) r.insert(r.end(), st.topk_idx.i32(), st.topk_idx.i32() + st.topk_idx.numel());
    for (const MoeState& st : m.model.moe_states()) r.insert(r.end(), st.slot_row.i32(), st.slot_row.i32() + st.slot_row.numel());
    return r;
  };
  const std::vector<int32_t> route0 = routing();
  int checked = 0;
  for (uint64_t dir = 0; dir < 8 && checked < 4; ++dir) {
    // a random unit direction
    std::vector<float> u(p0.size());
    double norm = 0, gu = 0;
    for (size_t i = 0; i < u.size(); ++i) {
      u[i] = static_cast<float>(rng_normal(77, dir, i));
      norm += static_cast<double>(u[i]) * u[i];
    }
    for (size_t i = 0; i < u.size(); ++i) {
      u[i] = static_cast<float>(u[i] / std::sqrt(norm));
      gu += static_cast<double>(g.f32()[i]) * u[i];
    }
    const double h = 1e-2;
    bool flipped = false;  // a top-K choice, its order or a drop changed: the loss is not smooth there
    auto at = [&](double s) {
      for (size_t i = 0; i < u.size(); ++i) p.f32()[i] = static_cast<float>(p0[i] + s * u[i]);
      const double L = total_loss(m, tokens, targets);
      flipped = flipped || routing() != route0;
      return L;
    };
    const double fd = (at(h) - at(-h)) / (2 * h);
    std::memcpy(p.f32(), p0.data(), p0.size() * sizeof(float));
    if (flipped) continue;
    ++checked;
    EXPECT_NEAR(gu, fd, 1e-2 * std::abs(fd) + 2e-4) << GetParam() << " direction " << dir;
  }

  EXPECT_EQ(checked, 4) << "too many directions flipped the routing";
}

INSTANTIATE_TEST_SUITE_P(Configs, MoeModelGrad, ::testing::Values("plain", "shared_sigmoid_z", "capacity_first_dense"));

TEST(MoeModel, ParameterCountsAndActiveParameters) {
  ModelConfig c = config_preset("moe-bench");
  const ModelConfig dense = config_preset("moe-bench-dense");
  const int64_t C = 768, E = 8, F = 3072, L = 12;
  const int64_t experts = L * E * 2 * F * C;
  // the MoE model = its dense twin - the dense MLPs (with biases) + routers + experts
  const int64_t dense_mlp = L * (2 * 6144 * C + 6144 + C);
  EXPECT_EQ(gpt_param_count(c), gpt_param_count(dense) - dense_mlp + L * E * C + experts);
  EXPECT_EQ(gpt_active_param_count(c), gpt_param_count(c) - experts + experts / E * 2);
  EXPECT_EQ(gpt_active_param_count(dense), gpt_param_count(dense));
  // the FLOPs convention counts active parameters
  EXPECT_DOUBLE_EQ(gpt_train_flops_per_token(c, 2048),
                   6.0 * gpt_active_param_count(c, false) + 12.0 * L * C * 2048.0);
}

TEST(MoeModel, BadMoeConfigsAreOneLineErrorsNamingTheField) {
  auto err = [](const std::string& json) {
    try {
      config_from_json(json, "cfg.json");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(err(R"({"moe": {"experts": 4, "top_k": 5}})").find("moe.top_k=5"), std::string::npos);
  EXPECT_NE(err(R"({"moe": {"experts": 300}})").find("moe.experts=300"), std::string::npos);
  EXPECT_NE(err(R"({"moe": {"experts": 4, "expert": 2}})").find("unknown field 'expert'"), std::string::npos);
  EXPECT_NE(err(R"({"moe": {"experts": 4, "score": "tanh"}})").find("'score' is 'tanh'"), std::string::npos);
  EXPECT_NE(err(R"({"moe": {"experts": 4, "capacity_factor": -1}})").find("moe.capacity_factor"), std::string::npos);
  EXPECT_NE(err(R"({"n_layer": 2, "moe": {"experts": 4, "first_dense": 2}})").find("moe.first_dense=2"),
            std::string::npos);
  // round trip
  ModelConfig c = moe_config("shared_sigmoid_z");
  ModelConfig back = config_from_json(config_to_json(c), "round trip");
  EXPECT_EQ(config_to_json(back), config_to_json(c));
  EXPECT_EQ(gpt_param_specs(back).size(), gpt_param_specs(c).size());
}

}  // namespace
}  // namespace lmf
