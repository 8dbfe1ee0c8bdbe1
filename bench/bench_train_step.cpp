// bench_train_step: times lmforge's training step (forward + backward + clipping + AdamW) on random
// tokens and prints one JSON line. bench/bench_cpu.py runs it next to the same step in PyTorch
// and prints the ratio; this binary alone is not a comparison.
#include <omp.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <vector>

#include "core/device.h"
#include "core/profiler.h"
#include "core/rng.h"
#include "model/gpt.h"
#include "ops/gemm_cuda.h"
#include "ops/optim.h"
#include "train/trainer.h"

using namespace lmf;

namespace {

// Ceilings measured in this run: a large fp32 GEMM through the engine's own GEMM path and a large
// device-to-device copy (bytes read + written), on the GPU; on the CPU only the op times are shown.
struct Ceilings {
  double gemm_tflops = 0, copy_gbps = 0;
};

Ceilings measure_ceilings(Device dev, Precision prec) {
  Ceilings c;
#ifdef LMF_WITH_CUDA
  if (dev != Device::cuda) return c;
  const int64_t n = 8192;
  Arena a("ceilings", {{"A", {n, n}}, {"B", {n, n}}, {"C", {n, n}}, {"big", {int64_t{1} << 28}}, {"big2", {int64_t{1} << 28}}},
          Device::cuda);
  std::vector<void*> ev = cuda_event_pool_create(2);
  std::vector<float> host(static_cast<size_t>(n * n));
  for (size_t i = 0; i < host.size(); ++i) host[i] = rng_normal(7, 0, i);  // never time on zeros
  tensor_from_host(a.get("A"), host.data());
  tensor_from_host(a.get("B"), host.data());
  auto time_ms = [&](auto&& f, int reps) {
    f();
    cuda_event_record(ev[0]);
    for (int i = 0; i < reps; ++i) f();
    cuda_event_record(ev[1]);
    device_synchronize();
    return cuda_event_elapsed_ms(ev[0], ev[1]) / reps;
  };
  double g = 0;
  if (prec == Precision::bf16) {  // bf16 operands and output, fp32 accumulation (the model's GEMMs)
    Arena h("ceilings bf16", {{"A", {n, n}, DType::bf16}, {"B", {n, n}, DType::bf16}, {"C", {n, n}, DType::bf16}},
            Device::cuda);
    cast_to_bf16(h.get("A"), a.get("A"));
    cast_to_bf16(h.get("B"), a.get("B"));
    g = time_ms([&] {
      cuda::gemm("ceiling", false, true, n, n, n, 1.0f, h.get("A").ptr<bf16>(), n, h.get("B").ptr<bf16>(), n, 0.0f,
                 h.get("C").ptr<bf16>(), n);
    }, 10);
  } else {
    g = time_ms([&] {
      cuda::gemm("ceiling", prec == Precision::tf32 ? GemmMath::tf32 : GemmMath::fp32, false, true, n, n, n, 1.0f,
                 a.get("A").f32(), n, a.get("B").f32(), n, 0.0f, a.get("C").f32(), n);
    }, 5);
  }
  c.gemm_tflops = 2.0 * n * n * n / (g / 1e3) / 1e12;
  Tensor big = a.get("big"), big2 = a.get("big2");
  double t = time_ms([&] { device_copy(big2.data, big.data, big.nbytes()); }, 10);
  c.copy_gbps = 2.0 * big.nbytes() / (t / 1e3) / 1e9;
  cuda_event_pool_destroy(ev);
#endif
  return c;
}

void print_profile(const OpProfiler& prof, int64_t steps, double step_ms, Device dev, Precision prec) {
  Ceilings c = measure_ceilings(dev, prec);
  double total = 0;
  for (const auto& r : prof.rows()) total += r.ms;
  std::fprintf(stderr, "\nper-op time per step (%lld timed steps; step %.1f ms, ops sum %.1f ms)\n",
               static_cast<long long>(steps), step_ms, total / steps);
  if (c.gemm_tflops > 0)
    std::fprintf(stderr, "ceilings measured now: %s GEMM %.1f TFLOP/s (cuBLASLt 8192^3), copy %.0f GB/s\n",
                 precision_name(prec), c.gemm_tflops, c.copy_gbps);
  std::fprintf(stderr, "%-34s %10s %7s %8s %10s\n", "op", "ms/step", "share", "calls", "TFLOP/s");
  std::vector<OpProfiler::Row> rows = prof.rows();
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.ms > b.ms; });
  for (const auto& r : rows) {
    double ms = r.ms / steps, tf = r.flops > 0 ? r.flops * r.calls / (r.ms / 1e3) / 1e12 : 0;
    std::fprintf(stderr, "%-34s %10.2f %6.1f%% %8lld %10s\n", r.name.c_str(), ms, 100 * r.ms / total,
                 static_cast<long long>(r.calls / steps), tf > 0 ? std::to_string(tf).substr(0, 6).c_str() : "-");
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"time lmforge's CPU training step"};
  std::string preset = "tiny", config;
  int64_t B = 8, T = 128, steps = 5, warmup = 2;
  app.add_option("--preset", preset);
  app.add_option("--config", config);
  app.add_option("--batch-size", B);
  app.add_option("--seq-len", T);
  app.add_option("--steps", steps);
  app.add_option("--warmup-steps", warmup);
  std::string device = "cpu";
  app.add_option("--device", device, "cpu, cuda or auto");
  std::string precision = "fp32";
  app.add_option("--precision", precision, "fp32, or tf32 / bf16 (GPU)");
  std::string attention = "auto";
  app.add_option("--attention", attention, "bf16 flash attention kernels: auto, lmforge or cudnn");
  std::string recompute = "none";
  app.add_option("--recompute", recompute, "activation recompute: none, attention or full (model/plan.h)");
  bool profile = false;
  app.add_flag("--profile", profile, "print time per op (timed steps) against the measured ceilings (stderr)");
  bool graph = false;
  app.add_flag("--cuda-graph", graph,
               "time the step as one CUDA graph replay, as lmforge train runs it on a GPU (not with --profile)");
  std::string gemm_tune = "on";
  app.add_option("--tune,--gemm-tune", gemm_tune,
                 "on: after the first step, each bf16 GEMM and cuDNN attention plan takes the fastest of its "
                 "library's candidates that give the same bits, as lmforge train does; off: the heuristics' choices")
      ->check(CLI::IsMember({"on", "off"}));
  bool gemm_report = false, batch_invariant = false;
  app.add_flag("--batch-invariant", batch_invariant, "batch-invariant plans (docs/BATCH_INVARIANCE.md)");
  app.add_flag("--gemm-report", gemm_report,
               "after the timed steps, time cuBLASLt's candidate algorithms for every bf16 GEMM of the step (stderr)");
  CLI11_PARSE(app, argc, argv);
  try {
    ModelConfig c = config.empty() ? config_preset(preset) : config_from_file(config);
    const ModelPlan plan = plan_from_flags(c, {device, precision, attention, batch_invariant, recompute}, B, T, true);
    const Device dev = plan.device;
    const bool gpu = dev == Device::cuda;
    if (graph && (!gpu || profile)) fail("--cuda-graph needs --device cuda and no --profile");
    if (gemm_report && (!gpu || graph)) fail("--gemm-report needs --device cuda and no --cuda-graph");
    if (plan.bf16() && plan.attention == FlashKernels::cudnn)
      std::fprintf(stderr, "attention: cuDNN %s\n", cudnn_version_text().c_str());
    Gpt gpt(c, plan);
    gpt.params.init_gpt2(1, c.n_layer, c.vocab_size);
    std::vector<int32_t> tok(B * T), tgt(B * T);
    for (int64_t i = 0; i < B * T; ++i) {
      tok[i] = static_cast<int32_t>(rng_u64(3, 1, i) % c.vocab_size);
      tgt[i] = static_cast<int32_t>(rng_u64(3, 2, i) % c.vocab_size);
    }
    Arena batch("batch",
                {{"tokens", {B, T}, DType::i32}, {"targets", {B, T}, DType::i32}, {"norm", {1}, DType::f32},
                 {"schedule", {3}, DType::f32}},
                dev);
    Tensor ttok = batch.get("tokens"), ttgt = batch.get("targets"), tnorm = batch.get("norm");
    Tensor tsched = batch.get("schedule");
    tensor_from_host(ttok, tok.data());
    tensor_from_host(ttgt, tgt.data());
    TrainOptions o;
    std::vector<double> ms;
    OpProfiler prof(dev);
    void* step_graph = nullptr;  // --cuda-graph: the trainer's step (lr and step from `schedule`)
    auto graph_body = [&] { train_step_device(gpt, ttok, ttgt, tnorm, Tensor(), tsched, o); };
    const bool tune = gemm_tune == "on" && gpu && plan.bf16();
    for (int64_t s = 0; s < warmup + steps; ++s) {
      if (profile && s >= warmup) gpt.model.set_profiler(&prof);
      if (tune && s == 0) tune_begin(gpt.model);
      if (tune && s == 1) tune_finish(gpt.model, std::cerr);  // between steps, as lmforge train tunes
      if (graph) {
        float sched[3];
        adamw_schedule(sched, 1e-4f, o.beta1, o.beta2, s + 1);
        tensor_from_host(tsched, sched);
        if (s >= 1 && step_graph == nullptr) {  // step 0 runs eagerly: plans and attributes settle first
          cuda_capture_begin();
          graph_body();
          step_graph = cuda_capture_end();
        }
      }
      auto t0 = std::chrono::steady_clock::now();
      if (graph && step_graph) {
        cuda_graph_replay(step_graph);
      } else if (graph) {
        graph_body();
      } else {
        gpt.state->zero_grad();
        gpt.model.forward_backward(ttok, ttgt);
        ProfileScope scope(profile && s >= warmup ? &prof : nullptr, "grad norm + AdamW");
        optimizer_step(gpt.params, *gpt.state, tnorm, o, 1e-4, s + 1);
      }
      device_synchronize();
      if (profile && s >= warmup) prof.collect();
      double dt = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (s >= warmup) ms.push_back(dt);
    }
    std::vector<double> sorted = ms;
    std::sort(sorted.begin(), sorted.end());
    double med = sorted[sorted.size() / 2];
    const double peak_gb = cuda_peak_allocated_bytes() / 1e9;  // before the ceilings' buffers
    if (profile) print_profile(prof, steps, med, dev, plan.precision);
#ifdef LMF_WITH_CUDA
    if (gemm_report) {
      const OpPlansScope plans(gpt.model.op_plans());  // the model's GEMM plans
      cuda::gemm_tune_report(stderr, static_cast<double>(warmup + steps));
    }
#endif
    const double tok_s = B * T / (med / 1e3);
    const double mfu = dev == Device::cuda ? tok_s * gpt_train_flops_per_token(c, T) / 989e12 : 0.0;
    const std::string attn_tag = plan.bf16() ? std::string("-") + flash_kernels_name(plan.attention) : std::string();
    std::printf("{\"impl\": \"lmforge-%s%s-B%lld%s\", \"device\": \"%s\", \"tok_s\": %.2f, \"step_ms\": %.2f, \"threads\": %d, "
                "\"mfu\": %.4f, \"peak_mem_gb\": %.2f}\n",
                precision_name(plan.precision), attn_tag.c_str(), static_cast<long long>(B), graph ? "-graph" : "",
                device_name(dev), tok_s, med,
                omp_get_max_threads(), mfu, peak_gb);
  } catch (const std::exception& e) {
    std::cerr << "lmforge_bench: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
