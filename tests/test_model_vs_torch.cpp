// The whole model against PyTorch (tools/make_fixtures.py, float64 reference) on the same weights
// and batch: logits, loss, every parameter gradient, and a 10-step AdamW loss trajectory, for a
// GPT-2-style and a Llama-style tiny config.
//
// Tolerance: our fp32 result against the float64 reference, per tensor,
//   |ours - ref| <= 1e-5 * max|ref| + 1e-7   elementwise        (logits, gradients)
// i.e. about 1e-5 relative to the tensor's scale; the loss to 1e-6 relative. The trajectory is
// compared to 2e-5 relative per step (fp32 rounding compounds over 10 AdamW steps at lr 1e-2).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "model/gpt.h"
#include "support/fixture_tensor.h"
#include "support/test_util.h"
#include "train/safetensors.h"
#include "train/trainer.h"

namespace lmf {
namespace {

using nlohmann::json;

struct Fixture {
  SafetensorsFile file;
  ModelConfig cfg;
  json train;
  int64_t B, T, steps;
  explicit Fixture(const std::string& name) : file(test::fixture_path(name)) {
    cfg = config_from_json(file.metadata().at("config"), name);
    train = json::parse(file.metadata().at("train"));
    B = train.at("B");
    T = train.at("T");
    steps = train.at("steps");
  }
  std::vector<double> f64(const std::string& name) const { return test::fixture_tensor<double>(file, name, "F64"); }
  std::vector<double> f32_as_f64(const std::string& name) const {
    const std::vector<float> v = test::fixture_tensor<float>(file, name, "F32");
    return {v.begin(), v.end()};
  }
  // inputs/targets of trajectory batch k: (B, T) each
  void batch(int64_t k, std::vector<int32_t>& in, std::vector<int32_t>& tg) const {
    const SafetensorsEntry* e = file.find("batch.tokens");
    const int32_t* t = static_cast<const int32_t*>(file.data(*e)) + k * B * (T + 1);
    in.resize(B * T);
    tg.resize(B * T);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < T; ++i) {
        in[b * T + i] = t[b * (T + 1) + i];
        tg[b * T + i] = t[b * (T + 1) + i + 1];
      }
  }
  void load_params(Gpt& m) const {
    Arena& p = m.params.master();
    for (size_t i = 0; i < p.size(); ++i) file.read_into("param." + p.spec(i).name, p[i]);
  }
};

// Largest |a - r| / max|r| seen by close_to_scale in this test (printed for the record).
double g_worst_scaled_err = 0;

::testing::AssertionResult close_to_scale(const std::string& what, const float* a, const std::vector<double>& r,
                                          double rel) {
  double worst = 0;
  ::testing::AssertionResult ok = test::close_to_tensor_scale(what, a, r.data(), r.size(), rel, 1e-7, &worst);
  g_worst_scaled_err = std::max(g_worst_scaled_err, worst);
  return ok;
}

class ModelVsTorch : public ::testing::TestWithParam<const char*> {};

TEST_P(ModelVsTorch, LogitsLossAndEveryGradient) {
  Fixture fx(GetParam());
  Gpt model(fx.cfg, ModelPlan{fx.B, fx.T, true});
  fx.load_params(model);
  std::vector<int32_t> in, tg;
  fx.batch(0, in, tg);
  Tensor tin = test::tensor_of(in, {fx.B, fx.T}, "tokens"), ttg = test::tensor_of(tg, {fx.B, fx.T}, "targets");

  std::vector<float> logits(fx.B * fx.T * fx.cfg.vocab_size);
  model.model.forward_values(test::tensor_of(logits, {fx.B, fx.T, fx.cfg.vocab_size}, "logits"), tin);
  EXPECT_TRUE(close_to_scale("logits", logits.data(), fx.f32_as_f64("ref.logits"), 1e-5));

  model.state->zero_grad();
  double loss = model.model.forward_backward(tin, ttg);
  double ref_loss = fx.f64("ref.loss")[0];
  EXPECT_NEAR(loss, ref_loss, 1e-6 * std::fabs(ref_loss)) << "loss";
  EXPECT_NEAR(model.model.forward_loss(tin, ttg), ref_loss, 1e-6 * std::fabs(ref_loss)) << "forward_loss";

  size_t checked = 0;
  for (size_t i = 0; i < model.state->grads().size(); ++i) {
    const std::string& name = model.state->grads().spec(i).name;
    EXPECT_TRUE(close_to_scale("grad " + name, model.state->grads()[i].f32(), fx.f32_as_f64("grad." + name), 1e-5));
    checked++;
  }
  EXPECT_EQ(checked, model.params.master().size());
  std::printf("[ measured ] %s: loss rel err %.2e, worst logits/grad err %.2e of tensor scale (%zu grads)\n",
              GetParam(), std::fabs(loss - ref_loss) / ref_loss, g_worst_scaled_err, checked);
  g_worst_scaled_err = 0;
}

TEST_P(ModelVsTorch, TenStepAdamWTrajectory) {
  Fixture fx(GetParam());
  Gpt model(fx.cfg, ModelPlan{fx.B, fx.T, true});
  fx.load_params(model);
  TrainOptions o;
  o.steps = fx.steps;
  o.lr = fx.train.at("lr");
  o.min_lr = fx.train.at("min_lr");
  o.warmup = fx.train.at("warmup");
  o.beta1 = fx.train.at("beta1");
  o.beta2 = fx.train.at("beta2");
  o.adam_eps = fx.train.at("eps");
  o.weight_decay = fx.train.at("weight_decay");
  o.grad_clip = fx.train.at("grad_clip");
  std::vector<double> ref_loss = fx.f64("traj.loss"), ref_lr = fx.f64("traj.lr");
  ASSERT_EQ(static_cast<int64_t>(ref_loss.size()), fx.steps);
  float norm = 0;
  Tensor tnorm(&norm, DType::f32, {1}, "grad_norm");
  std::vector<int32_t> in, tg;
  double worst = 0;
  for (int64_t s = 0; s < fx.steps; ++s) {
    // options hold lr as float, the reference as double
    EXPECT_NEAR(lr_at_step(o, s), ref_lr[s], 1e-6 * ref_lr[s]) << "learning rate schedule at step " << s;
    fx.batch(s, in, tg);
    model.state->zero_grad();
    double loss = model.model.forward_backward(test::tensor_of(in, {fx.B, fx.T}, "tokens"),
                                         test::tensor_of(tg, {fx.B, fx.T}, "targets"));
    EXPECT_NEAR(loss, ref_loss[s], 2e-5 * std::fabs(ref_loss[s])) << "loss at step " << s;
    worst = std::max(worst, std::fabs(loss - ref_loss[s]) / ref_loss[s]);
    optimizer_step(model.params, *model.state, tnorm, o, ref_lr[s], s + 1);
  }
  std::printf("[ measured ] %s: 10-step loss trajectory, worst rel err %.2e\n", GetParam(), worst);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ModelVsTorch,
                         ::testing::Values("model_gpt2_tiny.safetensors", "model_llama_tiny.safetensors"),
                         [](const auto& info) {
                           std::string n = info.param;
                           return n.find("gpt2") != std::string::npos ? std::string("Gpt2Tiny")
                                                                      : std::string("LlamaTiny");
                         });

}  // namespace
}  // namespace lmf
