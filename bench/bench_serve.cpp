// bench_serve: the serving engine's benchmark (docs/SERVING.md), random weights, one JSON line out.
//
//   lmforge_bench_serve --preset llama-1b|gpt2-124m [--device cuda] [--requests 512] [--rate 0]
//                       [--workload-out FILE] [--skip-batch1]
//
// 1. batch-1 decode: one request (prompt 128, 256 new tokens, greedy); time per token after the first,
//    against the floor = (weight bytes + KV bytes read per step) / the device-to-device copy bandwidth
//    measured in the same run (bytes read + written, as a copy counts them).
// 2. throughput: --requests requests with prompts 128-1024 and outputs 128-512 tokens (seeded), all at
//    once (--rate 0) or arriving as a Poisson process of --rate requests/s; output tokens/s, TTFT and
//    TPOT p50/p99, steps, launches per step (1 with CUDA graphs).
// --workload-out writes the workload for bench/serve_reference_hf.py (the same requests in
// transformers). tools/gpu_check.sh servebench runs both and prints the ratios.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/device.h"
#include "core/profiler.h"
#include "core/rng.h"
#include "model/gpt.h"
#include "serve/engine.h"

using namespace lmf;
using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

namespace {

struct Req {
  int64_t prompt = 0, output = 0;
  double arrival = 0;
};

// Models with a short context (smoke runs) get prompts and outputs clamped to fit it.
std::vector<Req> workload(int64_t n, double rate, uint64_t seed, int64_t ctx) {
  std::vector<Req> w;
  double t = 0;
  for (int64_t i = 0; i < n; ++i) {
    Req r;
    r.prompt = 128 + static_cast<int64_t>(rng_u64(seed, 1, static_cast<uint64_t>(i)) % 897);  // 128..1024
    r.output = 128 + static_cast<int64_t>(rng_u64(seed, 2, static_cast<uint64_t>(i)) % 385);  // 128..512
    r.prompt = std::min(r.prompt, ctx / 2);
    r.output = std::min(r.output, ctx - r.prompt);
    if (rate > 0) t += -std::log(1.0 - static_cast<double>(rng_uniform(seed, 3, static_cast<uint64_t>(i)))) / rate;
    r.arrival = t;
    w.push_back(r);
  }
  return w;
}

std::vector<int32_t> prompt_tokens(int64_t n, int64_t vocab, uint64_t seed, int64_t i) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) p[static_cast<size_t>(k)] = static_cast<int32_t>(rng_u64(seed, 10 + static_cast<uint64_t>(i), static_cast<uint64_t>(k)) % static_cast<uint64_t>(vocab));
  return p;
}

double pct(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))];
}

double copy_gbps(Device d) {
  if (d != Device::cuda) return 0;
  const int64_t n = int64_t{1} << 28;  // 1 GiB of f32 each way
  Arena a("copy", {{"src", {n}}, {"dst", {n}}}, Device::cuda);
  std::vector<void*> ev = cuda_event_pool_create(2);
  for (int i = 0; i < 3; ++i) device_copy(a.get("dst").data, a.get("src").data, a.get("src").nbytes());
  cuda_event_record(ev[0]);
  const int reps = 10;
  for (int i = 0; i < reps; ++i) device_copy(a.get("dst").data, a.get("src").data, a.get("src").nbytes());
  cuda_event_record(ev[1]);
  device_synchronize();
  const double ms = cuda_event_elapsed_ms(ev[0], ev[1]);
  cuda_event_pool_destroy(ev);
  return 2.0 * static_cast<double>(a.get("src").nbytes()) * reps / (ms * 1e-3) / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"lmforge serving benchmark (random weights)"};
  std::string preset = "llama-1b", device = "cuda", workload_out;
  int64_t requests = 512, max_seqs = 256, prefill = 2048;
  double rate = 0;
  uint64_t seed = 1;
  bool skip_batch1 = false, graphs = true, batch_invariant = false;
  app.add_option("--preset", preset)->capture_default_str();
  app.add_option("--device", device)->capture_default_str();
  app.add_option("--requests", requests)->capture_default_str();
  app.add_option("--rate", rate, "Poisson arrivals per second (0: all at once)")->capture_default_str();
  app.add_option("--seed", seed)->capture_default_str();
  app.add_option("--max-seqs", max_seqs)->capture_default_str();
  app.add_option("--max-prefill-tokens", prefill)->capture_default_str();
  app.add_option("--workload-out", workload_out);
  app.add_flag("--skip-batch1", skip_batch1);
  app.add_option("--cuda-graphs", graphs)->capture_default_str();
  app.add_flag("--batch-invariant", batch_invariant, "every engine in batch-invariant mode (docs/BATCH_INVARIANCE.md)");
  CLI11_PARSE(app, argc, argv);
  try {
    const ModelConfig c = config_preset(preset);
    const Device d = parse_device(device);
    if (d == Device::cuda) cuda_set_device(0);
    Parameters w(gpt_param_specs(c), d, d == Device::cuda);
    w.init_gpt2(seed, c.n_layer, c.vocab_size);
    json out = {{"preset", preset}, {"device", device_name(d)}, {"batch_invariant", batch_invariant}};
    const double gbps = copy_gbps(d);
    out["copy_gbps"] = gbps;
    const double weight_bytes = static_cast<double>(w.flat_copy().defined() ? w.flat_copy().nbytes() : w.master().bytes());

    if (!skip_batch1) {  // batch-1 decode against the bandwidth floor
      EngineOptions o;
      o.max_seqs = 1;
      o.max_prefill_tokens = 256;
      o.kv_cache_gb = 1;
      o.cuda_graphs = graphs;
      o.batch_invariant = batch_invariant;
      Engine e(c, w, o);
      RequestParams rp;
      rp.sample.temperature = 0;
      const int64_t p1 = std::min<int64_t>(128, c.context_length / 2);
      rp.max_tokens = std::min<int64_t>(256, c.context_length - p1);
      e.add(0, prompt_tokens(p1, c.vocab_size, seed, 0), rp);
      std::vector<Clock::time_point> t;
      const uint64_t l0 = cuda_built() && d == Device::cuda ? cuda_launch_count() : 0;
      int64_t steps = 0;
      while (!e.idle()) {
        if (!e.step().empty()) t.push_back(Clock::now());
        ++steps;
      }
      const double ms = std::chrono::duration<double, std::milli>(t.back() - t[1]).count() / static_cast<double>(t.size() - 2);
      // per step: every weight the GEMMs read once (the bf16 copy; the LM head's padded rows included)
      // plus the keys and values of the ~128 + 128 positions cached on average
      const double kv = static_cast<double>(KvCache::block_bytes(c, 1, d)) * static_cast<double>(p1 + rp.max_tokens / 2);
      const double floor_ms = gbps > 0 ? (weight_bytes + kv) / (gbps * 1e9) * 1e3 : 0;
      out["batch1"] = {{"ms_per_token", ms}, {"floor_ms", floor_ms}, {"ratio_to_floor", floor_ms > 0 ? ms / floor_ms : 0},
                       {"weight_bytes", weight_bytes}, {"launches_per_step",
                        d == Device::cuda ? static_cast<double>(cuda_launch_count() - l0) / static_cast<double>(steps) : 0}};
      std::cerr << "batch-1 decode: " << ms << " ms/token, floor " << floor_ms << " ms (x" << (floor_ms > 0 ? ms / floor_ms : 0)
                << ")\n";
    }

    {  // where a decode step's time goes: 32 sequences decoding (prompt 256), per-op time of 5 eager steps
      EngineOptions o;
      o.max_seqs = 32;
      o.max_prefill_tokens = 1024;
      o.kv_cache_gb = d == Device::cuda ? 4 : 0;
      o.cuda_graphs = false;
      o.batch_invariant = batch_invariant;
      Engine e(c, w, o);
      RequestParams rp;
      rp.sample.temperature = 0;
      const int64_t pl = std::min<int64_t>(256, c.context_length / 2);
      rp.max_tokens = std::min<int64_t>(64, c.context_length - pl);
      for (int64_t i = 0; i < 32; ++i) e.add(i, prompt_tokens(pl, c.vocab_size, seed, i), rp);
      while (e.stats().running < 32 || e.stats().waiting > 0 || e.stats().prompt_tokens == 0) e.step();
      for (int i = 0; i < 3; ++i) e.step();  // every prompt is prefilled: decode steps only
      OpProfiler prof(d);
      e.set_profiler(&prof);
      const int steps = 5;
      for (int i = 0; i < steps; ++i) {
        e.step();
        prof.collect();
      }
      e.set_profiler(nullptr);
      json rows = json::array();
      double total = 0;
      for (const OpProfiler::Row& r : prof.rows()) total += r.ms / steps;
      for (const OpProfiler::Row& r : prof.rows())
        rows.push_back({{"op", r.name}, {"ms_per_step", r.ms / steps}, {"share", total > 0 ? r.ms / steps / total : 0}});
      out["decode_step_breakdown"] = {{"sequences", 32}, {"ops", rows}, {"total_ms", total}};
      std::cerr << "decode step (32 sequences, eager, per op):\n";
      for (const auto& r : rows)
        std::cerr << "  " << r["op"].get<std::string>() << " " << r["ms_per_step"].get<double>() << " ms\n";
    }

    const std::vector<Req> wl = workload(requests, rate, seed, c.context_length);
    if (!workload_out.empty()) {
      json j = {{"seed", seed}, {"requests", json::array()}};
      for (const Req& r : wl) j["requests"].push_back({{"prompt_len", r.prompt}, {"output_len", r.output}, {"arrival_s", r.arrival}});
      std::ofstream(workload_out) << j.dump() << "\n";
    }
    EngineOptions o;
    o.max_seqs = static_cast<int32_t>(max_seqs);
    o.max_prefill_tokens = prefill;
    o.cuda_graphs = graphs;
    o.batch_invariant = batch_invariant;
    const Clock::time_point s0 = Clock::now();
    Engine e(c, w, o);
    const double setup_s = std::chrono::duration<double>(Clock::now() - s0).count();
    RequestParams rp;
    rp.sample = SampleParams{1.0f, 0, 1.0f, 0, seed, 0};
    std::map<int64_t, std::vector<double>> times;  // per request: the time of each token
    size_t next = 0;
    int64_t steps = 0, out_tokens = 0;
    const uint64_t l0 = d == Device::cuda ? cuda_launch_count() : 0;
    const Clock::time_point t0 = Clock::now();
    auto now = [&] { return std::chrono::duration<double>(Clock::now() - t0).count(); };
    while (next < wl.size() || !e.idle()) {
      while (next < wl.size() && wl[next].arrival <= now()) {
        RequestParams r = rp;
        r.max_tokens = wl[next].output;
        r.sample.seed = seed + next;
        e.add(static_cast<int64_t>(next), prompt_tokens(wl[next].prompt, c.vocab_size, seed, static_cast<int64_t>(next)), r);
        ++next;
      }
      if (e.idle()) continue;
      const std::vector<EngineEvent> ev = e.step();
      ++steps;
      const double t = now();
      for (const EngineEvent& x : ev) times[x.id].push_back(t);
      out_tokens += static_cast<int64_t>(ev.size());
    }
    const double wall = now();
    std::vector<double> ttft, tpot;
    for (const auto& [id, ts] : times) {
      ttft.push_back(ts.front() - wl[static_cast<size_t>(id)].arrival);
      if (ts.size() > 1) tpot.push_back((ts.back() - ts.front()) / static_cast<double>(ts.size() - 1));
    }
    out["throughput"] = {{"mode", rate > 0 ? "poisson" : "all_at_once"}, {"rate", rate}, {"requests", requests},
                         {"output_tokens", out_tokens}, {"wall_s", wall}, {"output_tokens_per_s", out_tokens / wall},
                         {"ttft_p50_s", pct(ttft, 0.5)}, {"ttft_p99_s", pct(ttft, 0.99)}, {"tpot_p50_s", pct(tpot, 0.5)},
                         {"tpot_p99_s", pct(tpot, 0.99)}, {"steps", steps}, {"setup_s", setup_s},
                         {"preemptions", e.stats().preemptions}, {"kv_blocks", e.kv_blocks()},
                         {"launches_per_step", d == Device::cuda ? static_cast<double>(cuda_launch_count() - l0) / static_cast<double>(steps) : 0}};
    std::cout << out.dump() << std::endl;
  } catch (const std::exception& ex) {
    std::cerr << "bench_serve: error: " << ex.what() << "\n";
    return 1;
  }
  return 0;
}
