// Training on the GPU (fp32, tf32, bf16): follows the CPU reference's loss curve, is bitwise reproducible run
// to run, and resumes bitwise from a checkpoint. SKIPPED without a GPU.
//
// Bound on the curve: the GPU computes the same function with other reduction orders, so losses
// agree to fp32 rounding at first and drift apart slowly as training amplifies differences:
// step 1 within 1e-5 relative, every one of 50 steps within 2%, the mean of the last 10 within 1%.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <cstring>
#include <filesystem>
#include <sstream>

#include "core/arena.h"
#include "core/device.h"
#include "core/fsutil.h"
#include "data/shard.h"
#include "model/config.h"
#include "model/gpt.h"
#include "ops/gemm_cuda.h"
#include "ops/op_plans.h"
#include "support/gpu_util.h"
#include "support/test_util.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace lmf {
namespace {

namespace fs = std::filesystem;

// precision "bf16-moe": bf16 on the tiny MoE preset (4 experts, top-2, every layer)
// precision "bf16-lmforge": bf16 with lmforge's own attention kernels (plain bf16 takes --attention auto:
// cuDNN's where available)
TrainOptions run_opts(const std::string& dir, const char* device, int64_t steps, const char* precision = "fp32") {
  TrainOptions o;
  const bool moe = std::string(precision) == "bf16-moe", own = std::string(precision) == "bf16-lmforge";
  o.precision = moe || own ? "bf16" : precision;
  if (own) o.attention = "lmforge";
  o.preset = moe ? "tiny-moe" : "tiny";
  o.batch_size = 8;
  o.seq_len = 64;
  o.steps = steps;
  o.lr = 3e-3f;
  o.warmup = 5;
  o.log_every = 1000;
  o.eval_batches = 2;
  o.out_dir = dir;
  o.device = device;
  o.progress = false;
  o.save_final_checkpoint = false;
  return o;
}

bool bitwise_equal(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

TEST(CudaTraining, FiftyStepsFollowTheCpuLossCurve) {
  LMF_REQUIRE_GPU();
  std::string d = test::make_temp_dir("gpu_curve");
  std::ostringstream log;
  Trainer cpu(run_opts(d + "/cpu", "cpu", 50), log), gpu(run_opts(d + "/gpu", "cuda", 50), log);
  cpu.run();
  gpu.run();
  const auto &c = cpu.losses(), &g = gpu.losses();
  ASSERT_EQ(c.size(), 50u);
  ASSERT_EQ(g.size(), 50u);
  EXPECT_NEAR(g[0], c[0], 1e-5 * c[0]) << "step 1";
  double worst = 0, tail_c = 0, tail_g = 0;
  for (size_t i = 0; i < 50; ++i) {
    worst = std::max(worst, std::fabs(g[i] - c[i]) / c[i]);
    EXPECT_NEAR(g[i], c[i], 0.02 * c[i]) << "step " << i + 1;
    if (i >= 40) { tail_c += c[i] / 10; tail_g += g[i] / 10; }
  }
  EXPECT_NEAR(tail_g, tail_c, 0.01 * tail_c);
  std::printf("[ measured ] GPU vs CPU fp32, 50 steps: step-1 rel diff %.2e, worst %.2e, last-10 mean %.4f vs %.4f\n",
              std::fabs(g[0] - c[0]) / c[0], worst, tail_g, tail_c);
  fs::remove_all(d);
}

// TF32 GEMMs (10-bit mantissa inputs, fp32 accumulation) against the fp32 CPU reference: step 1
// within 2e-3 relative, every step of 50 within 6%, the mean of the last 10 within 2%. TF32 rounds
// every GEMM input by ~5e-4 (fp32: 6e-8), and lr 3e-3 amplifies that early on: the first H200 run
// measured step 1 at 1.6e-6, the worst step at 4.35e-2 and the last-10 mean at 0.25%.
TEST(CudaTraining, Tf32FiftyStepsFollowTheCpuLossCurve) {
  LMF_REQUIRE_GPU();
  std::string d = test::make_temp_dir("gpu_tf32");
  std::ostringstream log;
  TrainOptions g = run_opts(d + "/gpu", "cuda", 50);
  g.precision = "tf32";
  Trainer cpu(run_opts(d + "/cpu", "cpu", 50), log), gpu(g, log);
  cpu.run();
  gpu.run();
  const auto c = cpu.losses(), t = gpu.losses();
  ASSERT_EQ(t.size(), 50u);
  EXPECT_NEAR(t[0], c[0], 2e-3 * c[0]) << "step 1";
  double worst = 0, tail_c = 0, tail_t = 0;
  for (size_t i = 0; i < 50; ++i) {
    worst = std::max(worst, std::fabs(t[i] - c[i]) / c[i]);
    EXPECT_NEAR(t[i], c[i], 0.06 * c[i]) << "step " << i + 1;
    if (i >= 40) { tail_c += c[i] / 10; tail_t += t[i] / 10; }
  }
  EXPECT_NEAR(tail_t, tail_c, 0.02 * tail_c);
  std::printf("[ measured ] GPU tf32 vs CPU fp32, 50 steps: step-1 rel diff %.2e, worst %.2e, last-10 %.4f vs %.4f\n",
              std::fabs(t[0] - c[0]) / c[0], worst, tail_t, tail_c);
  // the GEMM mode is process-wide: later tests in this binary plan fp32 again
  fs::remove_all(d);
}

TEST(CudaTraining, Tf32AndBf16OnTheCpuAreClearErrors) {
  std::ostringstream log;
  TrainOptions o = run_opts("/tmp/lmf_unused", "cpu", 5);
  o.precision = "tf32";
  EXPECT_THROW(Trainer(o, log), Error);
  o.precision = "bf16";
  try {
    Trainer t(o, log);
    FAIL() << "bf16 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("needs the GPU"), std::string::npos) << e.what();
  }
}

// bf16 mixed precision against the fp32 CPU reference. Every GEMM operand and activation is rounded
// to bf16 (8-bit significand), so the curves differ from step 1 (~1e-4) and then drift as training
// amplifies the differences. The small-batch, high-lr setting of the fp32 test (B=8, T=64, lr 3e-3)
// is chaotic there: its first H200 run matched to 1e-4 up to step 10 and then wandered by up to
// 19.5% (last-10 mean 2.83 vs 2.68) although every gradient agrees with the CPU within 1e-2 (the
// gradient test below); a 300-step run at B=16 T=128 ended at val_loss 2.1404 vs 2.1350 (fp32). So
// this test uses B=16, T=128, lr 1e-3 with 10 warm-up steps. Bounds: step 1 within 1e-3, every step
// within 3%, the last-10 mean within 1%.
TEST(CudaTraining, Bf16FiftyStepsFollowTheCpuLossCurve) {
  LMF_REQUIRE_GPU();
  std::string d = test::make_temp_dir("gpu_bf16");
  std::ostringstream log;
  auto opts = [&](const char* dev, const char* prec) {
    TrainOptions o = run_opts(d + "/" + dev, dev, 50, prec);
    o.batch_size = 16;
    o.seq_len = 128;
    o.lr = 1e-3f;
    o.warmup = 10;
    return o;
  };
  Trainer cpu(opts("cpu", "fp32"), log), gpu(opts("cuda", "bf16"), log);
  cpu.run();
  gpu.run();
  const auto c = cpu.losses(), t = gpu.losses();
  ASSERT_EQ(t.size(), 50u);
  double worst = 0, tail_c = 0, tail_t = 0;
  for (size_t i = 0; i < 50; ++i) {
    worst = std::max(worst, std::fabs(t[i] - c[i]) / c[i]);
    if (i >= 40) { tail_c += c[i] / 10; tail_t += t[i] / 10; }
  }
  std::printf("[ measured ] GPU bf16 vs CPU fp32, 50 steps: step-1 rel diff %.2e, worst %.2e, last-10 %.4f vs %.4f\n",
              std::fabs(t[0] - c[0]) / c[0], worst, tail_t, tail_c);
  for (size_t i : {0, 1, 2, 4, 9, 19, 29, 39, 49}) std::printf("  step %zu: bf16 %.4f fp32 %.4f\n", i + 1, t[i], c[i]);
  EXPECT_NEAR(t[0], c[0], 1e-3 * c[0]) << "step 1";
  for (size_t i = 0; i < 50; ++i) EXPECT_NEAR(t[i], c[i], 0.03 * c[i]) << "step " << i + 1;
  EXPECT_NEAR(tail_t, tail_c, 0.01 * tail_c);
  fs::remove_all(d);
}

// A vocabulary of 151,936 (Qwen2's; ids above 65,535 need 32-bit ids and a version-2 shard): the tiny
// model with that vocabulary trains 20 bf16 steps on the GPU from a shard of wide ids, its first loss
// matches the fp32 CPU run's (1e-3 relative, as the bf16 curve test), and the loss falls.
TEST(CudaTraining, Qwen2SizedVocabularyTrainsTwentyStepsOnTheGpu) {
  LMF_REQUIRE_GPU();
  std::string d = test::make_temp_dir("gpu_vocab");
  ModelConfig cfg = config_preset("tiny");
  cfg.vocab_size = 151936;
  write_file_atomic(d + "/config.json", config_to_json(cfg));
  std::vector<int32_t> toks(200000);  // a learnable stream over the whole id range
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = static_cast<int32_t>((i % 997) * 152 + (i / 997) % 3);
  write_shard(d + "/wide_train.bin", toks);
  std::ostringstream log;
  auto opts = [&](const char* dev, const char* prec, int64_t steps) {
    TrainOptions o = run_opts(d + "/" + dev, dev, steps, prec);
    o.preset.clear();
    o.config_path = d + "/config.json";
    o.data = {d + "/wide_train.bin"};
    o.lr = 1e-3f;
    return o;
  };
  Trainer cpu(opts("cpu", "fp32", 2), log), gpu(opts("cuda", "bf16", 20), log);
  cpu.run();
  gpu.run();
  const auto c = cpu.losses(), g = gpu.losses();
  ASSERT_EQ(g.size(), 20u);
  std::printf("[ measured ] V=151936 bf16 GPU: step 1 %.4f (CPU fp32 %.4f), step 20 %.4f\n", g[0], c[0], g[19]);
  EXPECT_NEAR(g[0], c[0], 1e-3 * c[0]) << "step 1";
  EXPECT_NEAR(c[0], std::log(151936.0), 0.5) << "an untrained model is near-uniform over the vocabulary";
  EXPECT_LT(g[19], g[0] - 1.0) << "the loss falls";
  for (double v : g) EXPECT_TRUE(std::isfinite(v));
  fs::remove_all(d);
}

// One forward + backward of the tiny model on the same weights and batch: the bf16 GPU gradients of
// every parameter tensor against the fp32 CPU ones. bf16 activations and operands carry ~2^-9
// relative rounding into each op, and the backward passes it through ~10 ops per layer, so each
// tensor's rel_l2 error should stay around 1e-2; the bound is 5e-2 (a wrong or missing term gives
// O(1)). The loss within 1e-2 relative.
TEST(CudaTraining, Bf16GradientsMatchTheCpuPerTensor) {
  LMF_REQUIRE_GPU();
  // The tiny model after 30 CPU steps: attention is no longer near-uniform, logits are sharper.
  std::vector<float> trained;
  {
    std::string d = test::make_temp_dir("gpu_grad_state");
    std::ostringstream log;
    Trainer t(run_opts(d, "cpu", 30), log);
    t.run();
    Tensor f = t.params().master().flat_f32();
    trained.resize(static_cast<size_t>(f.numel()));
    tensor_to_host(trained.data(), f);
    fs::remove_all(d);
  }
  // Both flash attention kernel sets (cuDNN's where available; lmforge's always): the dense presets.
  std::vector<std::pair<const char*, FlashKernels>> cases;
  for (const char* preset : {"tiny", "test-llama-hs32", "tiny-trained", "tiny-moe", "moe-shared-sigmoid-capacity"})
    cases.push_back({preset, cudnn_attention_available() ? FlashKernels::cudnn : FlashKernels::lmforge});
  if (cudnn_attention_available())
    for (const char* preset : {"tiny", "test-llama-hs32", "tiny-trained"}) cases.push_back({preset, FlashKernels::lmforge});
  for (const auto& [preset, attention] : cases) {
    const bool llama = std::string(preset) == "test-llama-hs32";
    const bool moe = std::string(preset).find("moe") != std::string::npos;
    ModelConfig c = llama ? config_preset("test-llama") : config_preset(moe ? "tiny-moe" : "tiny");
    // MoE models route every token to every expert here (top_k = experts): the GPU router sees the
    // bf16 norm output and the CPU the f32 one, so a top-K choice near a tie could flip between them
    // and change the function (a flipped token moved the router gradient by 2e-1 in a 4-of-2 model).
    // With all experts chosen only their order can differ, which the combine does not see. The
    // top-K selection itself is tested on identical inputs in test_cuda_moe.
    if (moe) c.moe.top_k = c.moe.experts;
    if (std::string(preset) == "moe-shared-sigmoid-capacity") {  // every MoE option, SwiGLU experts
      c.moe.experts = 3;
      c.moe.top_k = 3;
      c.activation = ActivationKind::swiglu;
      c.moe.first_dense = 1;
      c.moe.shared = 1;
      c.moe.shared_gate = true;
      c.moe.sigmoid = true;
      c.moe.renormalize = false;
      c.moe.capacity_factor = 1.25f;
      c.moe.z_coef = 0.001f;
    }
    if (llama) {  // Llama-style (RMSNorm, SwiGLU, RoPE, GQA) at head size 32
      c.d_model = 128;
      c.n_head = 4;
      c.n_kv_head = 2;
      c.d_ff = 96;
      c.context_length = 64;
    }
    const int64_t B = 4, T = 64;
    Gpt cpu(c, ModelPlan{B, T, true, Device::cpu, Precision::fp32});
    Gpt gpu(c, ModelPlan{B, T, true, Device::cuda, Precision::bf16, attention});
    cpu.params.init_gpt2(5, c.n_layer, c.vocab_size);
    gpu.params.init_gpt2(5, c.n_layer, c.vocab_size);
    if (std::string(preset) == "tiny-trained") {
      tensor_from_host(cpu.params.master().flat_f32(), trained.data());
      tensor_from_host(gpu.params.master().flat_f32(), trained.data());
      gpu.params.sync_copy();
    }
    if (moe) {  // a router far from uniform, so the combine weights and their gradients matter
      for (size_t k = 0; k < cpu.params.master().size(); ++k) {
        if (cpu.params.master().spec(k).name.find("moe.router.weight") == std::string::npos) continue;
        std::vector<float> r = test::randn(static_cast<size_t>(cpu.params.master()[k].numel()), 40 + k, 0.3f);
        tensor_from_host(cpu.params.master()[k], r.data());
        tensor_from_host(gpu.params.master()[k], r.data());
      }
      gpu.params.sync_copy();
    }
    std::vector<int32_t> tok = test::randint(B * T, 11, static_cast<int32_t>(c.vocab_size)),
                         tgt = test::randint(B * T, 12, static_cast<int32_t>(c.vocab_size));
    Arena batch("batch", {{"tok", {B, T}, DType::i32}, {"tgt", {B, T}, DType::i32}}, Device::cuda);
    tensor_from_host(batch.get("tok"), tok.data());
    tensor_from_host(batch.get("tgt"), tgt.data());
    cpu.state->zero_grad();
    gpu.state->zero_grad();
    const double lc = cpu.model.forward_backward(test::tensor_of(tok, {B, T}, "tok"), test::tensor_of(tgt, {B, T}, "tgt"));
    const double lg = gpu.model.forward_backward(batch.get("tok"), batch.get("tgt"));
    EXPECT_NEAR(lg, lc, 1e-2 * lc) << preset;
    double worst = 0;
    std::string worst_name;
    for (size_t k = 0; k < cpu.state->grads().size(); ++k) {
      Tensor tc = cpu.state->grads()[k], tg = gpu.state->grads()[k];
      std::vector<float> hc(static_cast<size_t>(tc.numel())), hg(hc.size());
      tensor_to_host(hc.data(), tc);
      tensor_to_host(hg.data(), tg);
      const double e = test::rel_l2_error(hg, hc);
      const std::string& name = cpu.state->grads().spec(k).name;
      if (name.find("qkv.weight") != std::string::npos) {  // q, k and v rows separately
        const int64_t C = c.d_model, HS = c.head_size(), rq = c.n_head * HS, rk = c.n_kv_head * HS;
        const int64_t bounds[4] = {0, rq * C, (rq + rk) * C, (rq + 2 * rk) * C};
        for (int part = 0; part < 3; ++part) {
          std::vector<float> pg(hg.begin() + bounds[part], hg.begin() + bounds[part + 1]),
              pc(hc.begin() + bounds[part], hc.begin() + bounds[part + 1]);
          const double ep = test::rel_l2_error(pg, pc);
          std::printf("  %s %s part %c: rel_l2 %.2e (|g| %.3e)\n", preset, name.c_str(), "qkv"[part], ep,
                      std::sqrt(std::inner_product(pc.begin(), pc.end(), pc.begin(), 0.0)));
          EXPECT_LE(ep, 5e-2) << preset << " grad of " << name << " part " << "qkv"[part];
        }
      }
      EXPECT_LE(e, 5e-2) << preset << " grad of " << name;
      if (e > worst) { worst = e; worst_name = name; }
    }
    std::printf("[ measured ] bf16 GPU vs fp32 CPU gradients (%s, attention %s): loss %.6f vs %.6f, worst tensor "
                "rel_l2 %.2e (%s)\n",
                preset, flash_kernels_name(attention), lg, lc, worst, worst_name.c_str());
    // The routed experts' weight gradients and, with bf16, the dense weight matrices' and the LM head's
    // are zeroed lazily on the GPU (the first backward writes them): a second backward without
    // zero_grad adds the same values (exactly twice the first, for the tensors a single GEMM or expert
    // pass writes; the tied head's sum has three parts), and zero_grad followed by a read of the
    // gradients (no backward) gives zeros.
    auto is_lazy = [](const std::string& name) {
      for (const char* part : {".moe.experts.", ".attn.qkv.weight", ".attn.proj.weight", ".mlp.fc.weight",
                               ".mlp.proj.weight", "tok_emb.weight", "lm_head.weight"})
        if (name.find(part) != std::string::npos) return true;
      return false;
    };
    std::vector<std::vector<float>> first;
    std::vector<size_t> experts, lazy;
    for (size_t k = 0; k < gpu.state->grads().size(); ++k) {
      const std::string& name = gpu.state->grads().spec(k).name;
      if (!is_lazy(name)) continue;
      lazy.push_back(k);
      if (name.find("_emb.") != std::string::npos || name.find("lm_head") != std::string::npos) continue;
      experts.push_back(k);
      first.emplace_back(static_cast<size_t>(gpu.state->grads()[k].numel()));
      tensor_to_host(first.back().data(), gpu.state->grads()[k]);
    }
    ASSERT_GE(experts.size(), 4u * static_cast<size_t>(c.n_layer) / 2) << preset;
    gpu.model.forward_backward(batch.get("tok"), batch.get("tgt"));
    for (size_t i = 0; i < experts.size(); ++i) {
      std::vector<float> h(first[i].size());
      tensor_to_host(h.data(), gpu.state->grads()[experts[i]]);
      for (size_t j = 0; j < h.size(); ++j)
        ASSERT_EQ(h[j], 2.0f * first[i][j]) << preset << " accumulated " << gpu.state->grads().spec(experts[i]).name << "[" << j << "]";
    }
    gpu.state->zero_grad();
    for (size_t k : lazy) {
      std::vector<float> h(static_cast<size_t>(gpu.state->grads()[k].numel()));
      tensor_to_host(h.data(), gpu.state->grads()[k]);
      for (size_t j = 0; j < h.size(); ++j) ASSERT_EQ(h[j], 0.0f) << preset << " after zero_grad " << k << "[" << j << "]";
    }
  }
}

class CudaTrainingPrecision : public ::testing::TestWithParam<const char*> {};

TEST_P(CudaTrainingPrecision, TwoRunsAreBitwiseIdentical) {
  LMF_REQUIRE_GPU();
  std::string d = test::make_temp_dir("gpu_det");
  std::ostringstream log;
  Trainer a(run_opts(d + "/a", "cuda", 20, GetParam()), log);
  a.run();
  Trainer b(run_opts(d + "/b", "cuda", 20, GetParam()), log);
  b.run();
  EXPECT_TRUE(bitwise_equal(a.losses(), b.losses()));
  fs::remove_all(d);
}

TEST_P(CudaTrainingPrecision, ResumeIsBitwiseIdentical) {
  LMF_REQUIRE_GPU();
  std::string d = test::make_temp_dir("gpu_resume");
  std::ostringstream log;
  TrainOptions o = run_opts(d + "/full", "cuda", 10, GetParam());
  o.checkpoint_every = 5;
  Trainer full(o, log);
  full.run();
  TrainOptions r = run_opts(d + "/resumed", "cuda", 10, GetParam());
  r.resume = d + "/full/checkpoints/step_000005";
  Trainer resumed(r, log);
  resumed.run();
  const std::vector<double> full_losses = full.losses();
  std::vector<double> tail(full_losses.begin() + 5, full_losses.end());
  EXPECT_TRUE(bitwise_equal(tail, resumed.losses()));
  fs::remove_all(d);
}

TEST_P(CudaTrainingPrecision, StepCapturesInGlobalModeAndReplaysBitwise) {
  LMF_REQUIRE_GPU();
  // The device work of a training step (forward, loss, backward, clipping, AdamW) is captured into
  // one CUDA graph in cudaStreamCaptureModeGlobal, where any allocation or host synchronisation
  // fails the capture. Replaying it must give the eager step's loss and weights bit for bit.
  std::string d = test::make_temp_dir("gpu_capture");
  std::ostringstream log;
  TrainOptions o = run_opts(d + "/eager", "cuda", 3, GetParam());
  o.cuda_graph = "off";  // this test captures the step's device work itself
  TrainOptions og = o;
  og.out_dir = d + "/graph";
  Trainer eager(o, log), graphed(og, log);
  eager.step();
  eager.step();
  graphed.step();  // warm-up: GEMM plans and CUB sizes are settled outside the capture
  graphed.stage_batch();
  const uint64_t launches_before = cuda_launch_count();
  cuda_capture_begin();
  graphed.compute_micro(0);
  graphed.finish_step();
  void* graph = nullptr;
  ASSERT_NO_THROW(graph = cuda_capture_end());
  const uint64_t kernels_in_step = cuda_launch_count() - launches_before;
  cuda_graph_replay(graph);  // one launch for the whole step
  device_synchronize();
  cuda_graph_destroy(graph);
  EXPECT_EQ(eager.step_loss(1), graphed.step_loss(1));
  Tensor a = eager.params().master().flat_f32(), b = graphed.params().master().flat_f32();
  std::vector<float> ha(a.numel()), hb(b.numel());
  tensor_to_host(ha.data(), a);
  tensor_to_host(hb.data(), b);
  EXPECT_EQ(0, std::memcmp(ha.data(), hb.data(), ha.size() * 4)) << "weights after the replayed step differ";
  std::printf("[ measured ] one %s training step captured: %llu kernel launches replayed as 1 graph launch\n",
              GetParam(), static_cast<unsigned long long>(kernels_in_step));
  fs::remove_all(d);
}

// The trainer's own graph mode (--cuda-graph): step 1 eager, step 2 captured, then one graph launch
// per step; every loss and the final weights bitwise equal to the eager trainer's.
TEST_P(CudaTrainingPrecision, GraphModeMatchesEagerBitwiseWithOneLaunchPerStep) {
  LMF_REQUIRE_GPU();
  std::string d = test::make_temp_dir("gpu_graph_mode");
  std::ostringstream log;
  TrainOptions oe = run_opts(d + "/eager", "cuda", 12, GetParam()), og = run_opts(d + "/graph", "cuda", 12, GetParam());
  oe.cuda_graph = "off";
  og.cuda_graph = "on";
  Trainer eager(oe, log), graphed(og, log);
  EXPECT_FALSE(eager.uses_cuda_graph());
  EXPECT_TRUE(graphed.uses_cuda_graph());
  for (int s = 0; s < 12; ++s) eager.step();
  graphed.step();
  graphed.step();  // warm-up and capture
  const uint64_t before = cuda_launch_count();
  for (int s = 2; s < 12; ++s) graphed.step();
  const uint64_t launches = cuda_launch_count() - before;
  EXPECT_TRUE(bitwise_equal(eager.losses(), graphed.losses()));
  Tensor a = eager.params().master().flat_f32(), b = graphed.params().master().flat_f32();
  std::vector<float> ha(a.numel()), hb(b.numel());
  tensor_to_host(ha.data(), a);
  tensor_to_host(hb.data(), b);
  EXPECT_EQ(0, std::memcmp(ha.data(), hb.data(), ha.size() * 4)) << "weights after 12 graph steps differ";
  EXPECT_EQ(launches, 10u) << "kernel launches over 10 graph-mode steps";
  // evaluation: eager the first time, its own graphs from the second; bitwise equal to eager
  const double ve = eager.evaluate(), vg1 = graphed.evaluate(), vg2 = graphed.evaluate(), vg3 = graphed.evaluate();
  EXPECT_EQ(ve, vg1);
  EXPECT_EQ(ve, vg2);
  EXPECT_EQ(ve, vg3);
  std::printf("[ measured ] %s graph mode: 10 steps, %llu launches, losses and weights bitwise equal to eager\n",
              GetParam(), static_cast<unsigned long long>(launches));
  fs::remove_all(d);
}

// A diverging run stops at its first non-finite step, read from the guard inside the step: the same
// step with and without the CUDA graph, and no checkpoint written from it on.
TEST_P(CudaTrainingPrecision, ADivergedRunStopsAtTheSameFirstNonFiniteStepWithAndWithoutGraphs) {
  LMF_REQUIRE_GPU();
  std::string d = test::make_temp_dir("gpu_diverge");
  std::string said[2];
  for (int g = 0; g < 2; ++g) {
    TrainOptions o = run_opts(d + (g ? "/graph" : "/eager"), "cuda", 40, GetParam());
    o.lr = 1e6f;
    o.warmup = 0;
    o.log_every = 10;
    o.checkpoint_every = 1;
    o.cuda_graph = g ? "on" : "off";
    std::ostringstream log;
    Trainer t(o, log);
    try {
      t.run();
    } catch (const Error& e) {
      said[g] = e.what();
    }
    EXPECT_NE(said[g].find("is not finite"), std::string::npos) << o.cuda_graph << ": " << said[g];
    const int64_t bad = std::atoll(said[g].c_str() + said[g].find("step ") + 5);
    for (const std::string& c : list_checkpoints(o.out_dir)) EXPECT_LT(checkpoint_step(c), bad) << c;
  }
  EXPECT_EQ(said[0], said[1]) << "graph mode named another step than eager mode";
  std::printf("[ measured ] %s diverged run: %s\n", GetParam(), said[0].c_str());
  fs::remove_all(d);
}

INSTANTIATE_TEST_SUITE_P(Precisions, CudaTrainingPrecision, ::testing::Values("fp32", "bf16", "bf16-lmforge", "bf16-moe"),
                         [](const ::testing::TestParamInfo<const char*>& i) {
                           std::string n = i.param;
                           for (char& ch : n) ch = ch == '-' ? '_' : ch;
                           return n;
                         });

// The launcher exists only in CUDA builds; elsewhere the test skips before reaching it.
#ifdef LMF_WITH_CUDA
uint64_t gemm_queries() { return cuda::gemm_plan_queries(); }
#else
uint64_t gemm_queries() { fail("built without the CUDA backend"); }
#endif

// Each model keeps its own GPU library plans (ops/op_plans.h): a model's steps query cuBLASLt into its
// table, never the process's default one, and a second model of the same shapes builds its own.
TEST(CudaTraining, EachModelKeepsItsOwnLibraryPlans) {
  LMF_REQUIRE_GPU();
  const ModelConfig c = config_preset("tiny");
  const int64_t B = 4, T = 64;
  std::vector<int32_t> tok = test::randint(B * T, 11, static_cast<int32_t>(c.vocab_size));
  Arena batch("batch", {{"tok", {B, T}, DType::i32}}, Device::cuda);
  tensor_from_host(batch.get("tok"), tok.data());
  auto queries_of = [](Model& m) {
    const OpPlansScope bound(m.op_plans());
    return gemm_queries();
  };
  const uint64_t default_before = gemm_queries();
  Gpt a(c, ModelPlan{B, T, true, Device::cuda, Precision::bf16});
  a.params.init_gpt2(5, c.n_layer, c.vocab_size);
  a.state->zero_grad();
  a.model.forward_backward(batch.get("tok"), batch.get("tok"));
  const uint64_t qa = queries_of(a.model);
  EXPECT_GT(qa, 0u) << "the model's steps built no GEMM plan in its own table";
  Gpt b(c, ModelPlan{B, T, true, Device::cuda, Precision::bf16});
  b.params.init_gpt2(5, c.n_layer, c.vocab_size);
  b.state->zero_grad();
  b.model.forward_backward(batch.get("tok"), batch.get("tok"));
  EXPECT_EQ(queries_of(b.model), qa) << "a second model of the same shapes did not build its own plans";
  a.model.forward_backward(batch.get("tok"), batch.get("tok"));
  EXPECT_EQ(queries_of(a.model), qa) << "a model's second step queried again";
  EXPECT_EQ(gemm_queries(), default_before) << "models' GEMMs went to the process's default table";
  std::printf("[ measured ] one bf16 tiny step builds %llu GEMM plans in its model's own table\n",
              static_cast<unsigned long long>(qa));
}

}  // namespace
}  // namespace lmf
