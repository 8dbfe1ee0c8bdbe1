// test_model_recompute.cpp: activation recompute (model/plan.h Recompute, --recompute). The backward
// reruns the part of each layer's forward whose outputs live in shared buffers, so every mode gives the
// same loss and gradients bit for bit, with less activation memory: dense (GPT-2 and Llama-style, the
// latter with RoPE and GQA) and MoE layers, two micro-batches accumulating, and the flag's errors.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "core/check.h"
#include "model/gpt.h"
#include "support/cli_util.h"
#include "support/test_util.h"

namespace lmf {
namespace {

struct RunResult {
  std::vector<double> losses;
  std::vector<float> grads;
  size_t plan_bytes = 0;
};

// Two micro-batches of forward + backward into zeroed gradients from seeded weights.
RunResult run(const ModelConfig& c, Recompute r) {
  const int64_t B = 2, T = 12;
  ModelPlan p{B, T, true};
  p.recompute = r;
  Gpt g(c, p);
  g.params.init_gpt2(7, c.n_layer, c.vocab_size);
  RunResult out;
  out.plan_bytes = Model::plan_bytes(c, p, g.model.ends());
  g.state->zero_grad();
  for (int micro = 0; micro < 2; ++micro) {
    std::vector<int32_t> in = test::randint(B * T, 11 + micro, static_cast<int32_t>(c.vocab_size)),
                         tg = test::randint(B * T, 21 + micro, static_cast<int32_t>(c.vocab_size));
    out.losses.push_back(
        g.model.forward_backward(test::tensor_of(in, {B, T}, "tokens"), test::tensor_of(tg, {B, T}, "targets"), 0.5f));
  }
  const Tensor flat = g.state->grads().flat_f32();
  out.grads.assign(flat.f32(), flat.f32() + flat.numel());
  return out;
}

TEST(Recompute, EveryModeTrainsBitwiseAlikeWithLessMemory) {
  for (const char* preset : {"test-gpt2", "test-llama", "test-moe"}) {
    SCOPED_TRACE(preset);
    const ModelConfig c = config_preset(preset);
    const RunResult none = run(c, Recompute::none), attention = run(c, Recompute::attention),
                    full = run(c, Recompute::full);
    for (const RunResult* r : {&attention, &full}) {
      EXPECT_EQ(r->losses, none.losses);
      ASSERT_EQ(r->grads.size(), none.grads.size());
      EXPECT_EQ(0, std::memcmp(r->grads.data(), none.grads.data(), none.grads.size() * sizeof(float)))
          << "gradients differ from --recompute none";
    }
    EXPECT_LT(attention.plan_bytes, none.plan_bytes);
    EXPECT_LT(full.plan_bytes, attention.plan_bytes);
    std::printf("[ measured ] %s activations + workspace: none %zu, attention %zu, full %zu bytes\n", preset,
                none.plan_bytes, attention.plan_bytes, full.plan_bytes);
  }
}

// BlockKernels::recompute_act (GPU training plans take it: one shared activation buffer, recomputed from fc
// before each mproj backward), run here on the CPU through the kernel table: bitwise the same gradients as
// a buffer per layer, with less memory (GELU and SwiGLU).
TEST(Recompute, SharedActivationBufferTrainsBitwiseAlike) {
  for (const char* preset : {"test-gpt2", "test-llama"}) {
    SCOPED_TRACE(preset);
    const ModelConfig c = config_preset(preset);
    const int64_t B = 2, T = 12;
    const ModelPlan p{B, T, true};
    std::vector<float> grads[2];
    size_t bytes[2] = {0, 0};
    for (int on = 0; on < 2; ++on) {
      BlockKernels k = block_kernels(c, p);
      k.recompute_act = on == 1;
      Parameters params(model_param_specs(c, *make_ends(c)), p.device, false);
      TrainingState state(params, Model::lazy_grads(c, p, *make_ends(c), &k), -1, -1);
      Model m(c, p, params, &state, make_ends(c), &k);
      params.init_gpt2(5, c.n_layer, c.vocab_size);
      bytes[on] = Model::plan_bytes(c, p, m.ends(), &k);
      state.zero_grad();
      std::vector<int32_t> in = test::randint(B * T, 31, static_cast<int32_t>(c.vocab_size)),
                           tg = test::randint(B * T, 41, static_cast<int32_t>(c.vocab_size));
      m.forward_backward(test::tensor_of(in, {B, T}, "tokens"), test::tensor_of(tg, {B, T}, "targets"));
      const Tensor flat = state.grads().flat_f32();
      grads[on].assign(flat.f32(), flat.f32() + flat.numel());
    }
    ASSERT_EQ(grads[0].size(), grads[1].size());
    EXPECT_EQ(0, std::memcmp(grads[0].data(), grads[1].data(), grads[0].size() * sizeof(float)));
    EXPECT_LT(bytes[1], bytes[0]);
  }
}

TEST(Recompute, FlagErrorsNameTheFlag) {
  const ModelConfig c = config_preset("test-gpt2");
  EXPECT_TRUE(test::one_line_error([&] { plan_from_flags(c, {"cpu", "auto", "auto", false, "some"}, 2, 8, true); },
                                   {"--recompute=some", "none, attention or full"}));
  EXPECT_TRUE(test::one_line_error([&] { plan_from_flags(c, {"cpu", "auto", "auto", false, "full"}, 2, 8, false); },
                                   {"--recompute=full", "forward only"}));
  EXPECT_EQ(plan_from_flags(c, {"cpu", "auto", "auto", false, "attention"}, 2, 8, true).recompute,
            Recompute::attention);
}

}  // namespace
}  // namespace lmf
