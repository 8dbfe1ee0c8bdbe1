// The model's seams (docs/ARCHITECTURE.md): other ends train through the same trunk, and the block
// step's kernel table entries compute the same function as the reference composition.
//   RegressionEnds: real values in, MSE out, through the transformer trunk on the CPU: the loss falls,
//     two runs give the same bits, and a step allocates nothing.
//   BlockTable: the fused entries that run on the CPU (residual + norm in one call, bias gradients
//     from the norm backward, overwritten activation gradients, lazily zeroed weight gradients) give
//     the reference table's loss and gradients.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>

#include "core/rng.h"
#include "model/gpt.h"
#include "model/regression_ends.h"
#include "support/alloc_counter.h"
#include "support/test_util.h"
#include "train/trainer.h"

namespace lmf {
namespace {

using test::g_allocs;
using test::g_counting;

ModelConfig small_trunk() {
  ModelConfig c;
  c.vocab_size = 16;  // unused by regression ends
  c.context_length = 32;
  c.n_layer = 2;
  c.n_head = 4;
  c.n_kv_head = 2;
  c.d_model = 32;
  c.d_ff = 64;
  c.norm = NormKind::rmsnorm;
  c.activation = ActivationKind::swiglu;
  c.positions = PositionKind::rope;
  c.bias = false;
  return c;
}

// A forecasting task: each sequence is sin(w t + phase) with its own w and phase; inputs are the
// value and its cosine partner at t, the target the value at t + 1 (so the model must infer w).
void make_batch(int64_t B, int64_t T, uint64_t step, std::vector<float>& in, std::vector<float>& tg) {
  in.assign(static_cast<size_t>(B * T * 2), 0.0f);
  tg.assign(static_cast<size_t>(B * T), 0.0f);
  for (int64_t b = 0; b < B; ++b) {
    const double w = 0.2 + 0.4 * rng_uniform(7, step, static_cast<uint64_t>(2 * b));
    const double ph = 6.283 * rng_uniform(7, step, static_cast<uint64_t>(2 * b + 1));
    for (int64_t t = 0; t < T; ++t) {
      in[static_cast<size_t>((b * T + t) * 2)] = static_cast<float>(std::sin(w * t + ph));
      in[static_cast<size_t>((b * T + t) * 2 + 1)] = static_cast<float>(std::cos(w * t + ph));
      tg[static_cast<size_t>(b * T + t)] = static_cast<float>(std::sin(w * (t + 1) + ph));
    }
  }
}

struct RegressionRun {
  std::vector<double> losses;
  long allocs_in_steps = -1;
};

RegressionRun train_regression(int steps) {
  const ModelConfig c = small_trunk();
  const int64_t B = 8, T = 24;
  const ModelPlan plan{B, T, true};
  RegressionEnds spec(c, 2, 1);
  Parameters params(model_param_specs(c, spec), Device::cpu, false);
  TrainingState state(params, Model::lazy_grads(c, plan, spec));
  Model model(c, plan, params, &state, std::make_unique<RegressionEnds>(c, 2, 1));
  params.init_gpt2(3, c.n_layer, 0);
  TrainOptions o;
  o.lr = 3e-3f;
  o.weight_decay = 0.0f;
  float norm = 0;
  Tensor tnorm(&norm, DType::f32, {1}, "grad_norm");
  std::vector<float> in, tg;
  RegressionRun r;
  for (int s = 0; s < steps; ++s) {
    make_batch(B, T, static_cast<uint64_t>(s), in, tg);
    const Tensor tin = test::tensor_of(in, {B, T, 2}, "inputs"), ttg = test::tensor_of(tg, {B, T, 1}, "targets");
    const bool count = s >= 2 && s < 5;  // after warm-up (BLAS / OpenMP first touch)
    const size_t arenas = arena_allocation_count();
    if (count) {
      g_allocs = 0;
      g_counting = true;
    }
    state.zero_grad();
    model.forward_backward_device(tin, ttg);
    optimizer_step(params, state, tnorm, o, o.lr, s + 1);
    if (count) {
      g_counting = false;
      r.allocs_in_steps = std::max(r.allocs_in_steps, 0L) + g_allocs.load();
      EXPECT_EQ(arena_allocation_count(), arenas);
    }
    double sum = 0;
    const Tensor l = model.row_losses();
    for (int64_t i = 0; i < l.numel(); ++i) sum += l.f32()[i];
    r.losses.push_back(sum / static_cast<double>(l.numel()));
  }
  return r;
}

TEST(RegressionEnds, TrainThroughTheTrunkDeterministicallyWithoutAllocating) {
  const RegressionRun a = train_regression(80), b = train_regression(80);
  ASSERT_EQ(a.losses.size(), 80u);
  double first = 0, last = 0;
  for (int i = 0; i < 5; ++i) first += a.losses[static_cast<size_t>(i)] / 5;
  for (int i = 75; i < 80; ++i) last += a.losses[static_cast<size_t>(i)] / 5;
  std::printf("[ measured ] regression ends: mean MSE steps 1-5 %.4f, steps 76-80 %.4f\n", first, last);
  EXPECT_LT(last, 0.25 * first) << "the forecaster did not learn";
  EXPECT_EQ(std::memcmp(a.losses.data(), b.losses.data(), a.losses.size() * sizeof(double)), 0)
      << "two runs differ";
  EXPECT_EQ(a.allocs_in_steps, 0) << "heap allocations inside 3 training steps";
}

TEST(RegressionEnds, BadShapesAndPlansAreErrors) {
  const ModelConfig c = small_trunk();
  const ModelPlan plan{2, 8, true};
  RegressionEnds spec(c, 3, 2);
  Parameters params(model_param_specs(c, spec), Device::cpu, false);
  TrainingState state(params, {});
  Model model(c, plan, params, &state, std::make_unique<RegressionEnds>(c, 3, 2));
  std::vector<float> in(2 * 8 * 3), tg(2 * 8 * 2), wrong(2 * 8 * 5);
  EXPECT_THROW(model.forward_backward_device(test::tensor_of(wrong, {2, 8, 5}, "inputs"),
                                             test::tensor_of(tg, {2, 8, 2}, "targets")),
               Error);
  EXPECT_THROW(model.forward_backward_device(test::tensor_of(in, {2, 8, 3}, "inputs"),
                                             test::tensor_of(wrong, {2, 8, 5}, "targets")),
               Error);
  // the parameters of another model are refused by name
  Parameters gpt_params(gpt_param_specs(config_preset("test-gpt2")), Device::cpu, false);
  EXPECT_THROW(Model(c, plan, gpt_params, &state, std::make_unique<RegressionEnds>(c, 3, 2)), Error);
}

// The loss and every gradient of one forward + backward under a block table.
struct Grads {
  double loss = 0;
  std::vector<std::vector<float>> g;
  std::vector<std::string> names;
};

Grads run_table(const ModelConfig& c, const BlockKernels* k) {
  const int64_t B = 2, T = 12;
  const ModelPlan plan{B, T, true};
  TokenEnds spec(c);
  Parameters params(model_param_specs(c, spec), Device::cpu, false);
  TrainingState state(params, Model::lazy_grads(c, plan, spec, k));
  Model model(c, plan, params, &state, std::make_unique<TokenEnds>(c), k);
  params.init_gpt2(5, c.n_layer, c.vocab_size);
  // biases and norm gains away from 0 and 1, so their gradients' paths all matter
  std::vector<float> host;
  for (size_t i = 0; i < params.master().size(); ++i) {
    const std::string& name = params.master().spec(i).name;
    if (!name.ends_with(".bias") && name.find("norm") == std::string::npos) continue;
    Tensor t = params.master()[i];
    for (int64_t j = 0; j < t.numel(); ++j) t.f32()[j] += 0.1f * static_cast<float>(rng_normal(9, i, j));
  }
  std::vector<int32_t> tok = test::randint(B * T, 3, static_cast<int32_t>(c.vocab_size));
  std::vector<int32_t> tgt = test::randint(B * T, 4, static_cast<int32_t>(c.vocab_size));
  Grads r;
  for (int pass = 0; pass < 2; ++pass) {  // two micro-batches: overwrite, then accumulate
    if (pass == 0) state.zero_grad();
    r.loss = model.forward_backward(test::tensor_of(tok, {B, T}, "tokens"), test::tensor_of(tgt, {B, T}, "targets"));
  }
  Arena& g = state.grads();
  for (size_t i = 0; i < g.size(); ++i) {
    r.names.push_back(g.spec(i).name);
    r.g.emplace_back(g[i].f32(), g[i].f32() + g[i].numel());
  }
  return r;
}

class BlockTable : public ::testing::TestWithParam<const char*> {};

TEST_P(BlockTable, FusedEntriesMatchTheReferenceComposition) {
  const ModelConfig c = config_preset(GetParam());
  const BlockKernels ref = block_kernels(c, ModelPlan{2, 12, true});
  ASSERT_FALSE(ref.fused_residual_norm);  // a CPU fp32 plan gets the reference composition
  BlockKernels fused = ref;
  fused.fused_residual_norm = true;
  fused.bias_grad_from_norm = true;
  fused.overwrite_act_grads = true;
  fused.lazy_weight_grads = true;
  const Grads a = run_table(c, &ref), b = run_table(c, &fused);
  EXPECT_NEAR(a.loss, b.loss, 1e-6 * std::fabs(a.loss));
  ASSERT_EQ(a.g.size(), b.g.size());
  double worst = 0;
  for (size_t i = 0; i < a.g.size(); ++i) {
    const std::vector<double> ref(a.g[i].begin(), a.g[i].end());
    double w = 0;
    EXPECT_TRUE(test::close_to_tensor_scale("fused vs reference: " + a.names[i], b.g[i].data(), ref.data(), ref.size(),
                                            1e-5, 1e-9, &w));
    worst = std::max(worst, w);
  }
  std::printf("[ measured ] %s: fused table vs reference, worst gradient error %.2e of its tensor's scale\n",
              GetParam(), worst);
  // the residual + norm fusion alone is bitwise the reference on the CPU (norm.h)
  BlockKernels only_norm = ref;
  only_norm.fused_residual_norm = true;
  const Grads n = run_table(c, &only_norm);
  EXPECT_EQ(n.loss, a.loss);
  EXPECT_EQ(n.g, a.g);
}

INSTANTIATE_TEST_SUITE_P(Presets, BlockTable, ::testing::Values("test-gpt2", "test-llama", "test-moe"),
                         [](const auto& info) {
                           const std::string p = info.param;
                           return p == "test-gpt2" ? "Gpt2" : p == "test-llama" ? "Llama" : "Moe";
                         });

}  // namespace
}  // namespace lmf
