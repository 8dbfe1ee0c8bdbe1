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
#include "core/rng.h"
#include "model/gpt.h"
#include "train/trainer.h"

using namespace lmf;

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
  app.add_option("--device", device, "cpu or cuda");
  CLI11_PARSE(app, argc, argv);
  try {
    ModelConfig c = config.empty() ? config_preset(preset) : config_from_file(config);
    const Device dev = device == "cuda" ? Device::cuda : Device::cpu;
    if (dev == Device::cuda) cuda_set_device(0);
    Gpt model(c, GptPlan{B, T, true, 0, dev});
    model.init_weights(1);
    std::vector<int32_t> tok(B * T), tgt(B * T);
    for (int64_t i = 0; i < B * T; ++i) {
      tok[i] = static_cast<int32_t>(rng_u64(3, 1, i) % c.vocab_size);
      tgt[i] = static_cast<int32_t>(rng_u64(3, 2, i) % c.vocab_size);
    }
    Arena batch("batch", {{"tokens", {B, T}, DType::i32}, {"targets", {B, T}, DType::i32}, {"norm", {1}, DType::f32}},
                dev);
    Tensor ttok = batch.get("tokens"), ttgt = batch.get("targets"), tnorm = batch.get("norm");
    tensor_from_host(ttok, tok.data());
    tensor_from_host(ttgt, tgt.data());
    TrainOptions o;
    std::vector<double> ms;
    for (int64_t s = 0; s < warmup + steps; ++s) {
      auto t0 = std::chrono::steady_clock::now();
      model.zero_grad();
      model.forward_backward(ttok, ttgt);
      optimizer_step(model, tnorm, o, 1e-4, s + 1);
      device_synchronize();
      double dt = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (s >= warmup) ms.push_back(dt);
    }
    std::sort(ms.begin(), ms.end());
    double med = ms[ms.size() / 2];
    const double tok_s = B * T / (med / 1e3);
    const double mfu = dev == Device::cuda ? tok_s * gpt_train_flops_per_token(c, T) / 989e12 : 0.0;
    std::printf("{\"impl\": \"lmforge\", \"device\": \"%s\", \"tok_s\": %.2f, \"step_ms\": %.2f, \"threads\": %d, "
                "\"mfu\": %.4f, \"peak_mem_gb\": %.2f}\n",
                device.c_str(), tok_s, med, omp_get_max_threads(), mfu, cuda_peak_allocated_bytes() / 1e9);
  } catch (const std::exception& e) {
    std::cerr << "lmforge_bench: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
