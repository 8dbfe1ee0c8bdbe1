// lmforge: the command line. Subcommands: train, prepare, generate, score, serve, plot, import, export,
// tokenizer.
// Every error is one line on stderr and a non-zero exit: 1 for a failed run, 2 for bad flags.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <execinfo.h>

#include <csignal>
#include <unistd.h>
#include <thread>
#include <cstdio>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <type_traits>
#include <vector>
#include <iomanip>
#include <iostream>
#include <string>

#include "cli/forecast_cmd.h"
#include "cli/launch_cmd.h"
#include "cli/tokenizer_cmd.h"
#include "convert/hf_export.h"
#include "convert/import.h"
#include "core/check.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "dist/env.h"
#include "model/gpt.h"
#include "model/score.h"
#include "core/device.h"
#include "ops/sampling.h"
#include "serve/chat_template.h"
#include "serve/engine.h"
#include "serve/invariance.h"
#include "serve/served_model.h"
#include "serve/server.h"  // the options always; the server itself only with LMF_WITH_HTTP
#include "train/checkpoint.h"
#include "core/fsutil.h"
#include "train/plot.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace lmf;

namespace {

constexpr const char* kBatchInvariantHelp =
    "batch-invariant numerics: a sequence's logprobs do not depend on its batch, and training, evaluation, "
    "generate and serve compute them bitwise alike (MoE dropless; slower: docs/BATCH_INVARIANCE.md)";

// A number on the command line parses strictly: the whole text, never empty, never clamped when out
// of the type's range, and finite for floating-point flags.
template <class T>
CLI::Option* add_num(CLI::App* c, const std::string& name, T& v, const std::string& help) {
  CLI::Option* opt = c->add_option(name, v, help);
  opt->check(CLI::Validator(
      [](std::string& s) -> std::string {
        if (s.empty()) return "an empty value is not a number";
        if constexpr (std::is_floating_point_v<T>) {
          char* end = nullptr;
          errno = 0;
          const double d = std::strtod(s.c_str(), &end);
          if (end != s.c_str() + s.size()) return "'" + s + "' is not a number";
          if (!std::isfinite(d) || !std::isfinite(static_cast<T>(d)) || errno == ERANGE)
            return "'" + s + "' is not a finite number in range";
        } else {
          T x{};
          const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), x);
          if (ec == std::errc::result_out_of_range) return "'" + s + "' is out of range";
          if (ec != std::errc() || p != s.data() + s.size()) return "'" + s + "' is not an integer";
        }
        return "";
      },
      std::is_floating_point_v<T> ? "NUMBER" : "INT", "strict number"));
  return opt;
}

// What this binary contains (--version and the help banner).
std::string build_text() {
  std::string s = "backends: cpu (fp32)";
  if (cuda_built()) s += ", cuda (sm_90a; bf16, tf32, fp32)";
#ifdef LMF_WITH_HTTP
  s += "; HTTP server: yes";
#else
  s += "; HTTP server: no (cpp-httplib was not found at build time)";
#endif
  return s;
}

// Edit distance, for "did you mean" on a mistyped flag.
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// " (did you mean --steps?)" for the first unknown --flag of `args` close to a flag of `app`'s chosen
// subcommand; "" when nothing is close.
std::string did_you_mean(CLI::App& app, const std::vector<std::string>& args) {
  std::vector<CLI::App*> subs = app.get_subcommands();
  if (subs.empty()) subs = app.get_subcommands([](CLI::App*) { return true; });
  for (const std::string& arg : args) {
    if (arg.rfind("--", 0) != 0) continue;
    const std::string name = arg.substr(2, arg.find('=') == std::string::npos ? std::string::npos : arg.find('=') - 2);
    std::string best;
    size_t best_d = std::max<size_t>(2, name.size() / 3) + 1;
    for (CLI::App* sub : subs)
      for (const CLI::Option* o : sub->get_options())
        for (const std::string& l : o->get_lnames()) {
          const size_t d = edit_distance(name, l);
          if (d < best_d) {
            best_d = d;
            best = "--" + l;
          }
        }
    if (!best.empty()) return " (did you mean " + best + "?)";
  }
  return "";
}

void add_train_flags(CLI::App* c, TrainOptions& o) {
  auto* cfg = c->add_option("--config", o.config_path, "model config JSON (docs/MODEL.md)");
  std::string presets;
  for (const std::string& p : config_preset_names()) presets += (presets.empty() ? "" : ", ") + p;
  auto* preset = c->add_option("--preset", o.preset, "model preset: " + presets + " (README.md, Config format; docs/TIMESERIES.md)")
      ->capture_default_str()->excludes(cfg);
  c->add_option("--data", o.data, "training shards (llm.c .bin; wildcards ok); default: the bundled corpus");
  c->add_option("--val-data", o.val_data, "validation shards");
  add_num(c, "--batch-size,-B", o.batch_size, "micro-batch size")->capture_default_str();
  add_num(c, "--seq-len,-T", o.seq_len, "sequence length (0 = context_length)")->capture_default_str();
  add_num(c, "--grad-accum", o.grad_accum, "micro-batches per optimizer step")->capture_default_str();
  add_num(c, "--steps", o.steps, "optimizer steps")->capture_default_str();
  add_num(c, "--lr", o.lr, "peak learning rate")->capture_default_str();
  add_num(c, "--min-lr", o.min_lr, "final learning rate of the cosine schedule (default lr/10)")
      ->check(CLI::Validator(
          [](std::string& v) { return std::strtod(v.c_str(), nullptr) < 0 ? "'" + v + "' must be >= 0" : std::string(); },
          "NUMBER >= 0", "non-negative"));
  add_num(c, "--warmup", o.warmup, "linear warmup steps")->capture_default_str();
  add_num(c, "--weight-decay", o.weight_decay, "AdamW decoupled weight decay (2-D params)")->capture_default_str();
  add_num(c, "--grad-clip", o.grad_clip, "clip the global gradient norm to this (0 = off)")->capture_default_str();
  add_num(c, "--seed", o.seed, "seed for initialisation and data order")->capture_default_str();
  add_num(c, "--log-every", o.log_every, "steps between metric lines")->capture_default_str();
  add_num(c, "--eval-every", o.eval_every, "steps between validation runs (0 = at the end)")->capture_default_str();
  add_num(c, "--eval-batches", o.eval_batches, "batches per validation run")->capture_default_str();
  add_num(c, "--checkpoint-every", o.checkpoint_every, "steps between checkpoints (0 = at the end)")
      ->capture_default_str();
  c->add_option("--out-dir", o.out_dir, "metrics.jsonl and checkpoints go here")->capture_default_str();
  auto* resume = c->add_option("--resume", o.resume,
                "checkpoint directory or out-dir to continue from; every setting not given comes from its state.json");
  c->add_option("--init-from", o.init_from,
                "start a new run (step 0) from these weights and their model: a checkpoint, an out-dir, a Hugging Face "
                "model directory or a GGUF file")
      ->excludes(cfg)
      ->excludes(preset)
      ->excludes(resume);
  add_num(c, "--keep-last", o.keep_last, "checkpoints to keep in the out-dir, newest first (0 = all)")->capture_default_str();
  c->add_flag("--overwrite", o.overwrite, "a new run may replace the run already in --out-dir");
  c->add_flag("--save-init", o.save_init,
              "also write the weights before the first step as checkpoints/step_000000 (e.g. to start another "
              "framework from them: tools/moe_routing_compare.py)");
  c->add_flag("--allow-change", o.allow_change,
              "with --resume: let --data, --batch-size, --lr and the other settings of the run change");
  c->add_flag("--allow-nonfinite", o.allow_nonfinite, "with --resume or --init-from: load weights holding NaN/Inf values");
  c->add_option("--device", o.device, "cpu, cuda, or auto (cuda when a GPU is present)")->capture_default_str();
  c->add_option("--precision", o.precision, "auto (bf16 on a GPU, fp32 on the CPU), fp32, tf32 (GPU: fp32 GEMMs on tensor cores) or bf16 (GPU: "
                "mixed precision, fp32 master weights)")
      ->capture_default_str();
  c->add_option("--attention", o.attention,
                 "bf16 flash attention kernels: auto (cuDNN's fused attention when available, else lmforge's; with "
                 "--batch-invariant: lmforge's), lmforge or cudnn")
      ->capture_default_str();
  c->add_flag("--batch-invariant", o.batch_invariant, kBatchInvariantHelp);
  c->add_option("--recompute", o.recompute,
                "activation recompute, memory for time: none, attention (qkv, attention recomputed in the backward) "
                "or full (each layer keeps its input and norm; the block reruns before its backward); bitwise the "
                "same training")
      ->capture_default_str();
  add_num(c, "--mfu-peak-tflops", o.mfu_peak_tflops, "peak TFLOP/s for MFU (default: the GPU's dense bf16 peak)");
  add_num(c, "--dp", o.dp, "data-parallel ranks (0: the world size the launcher set, / --tp)")->capture_default_str();
  add_num(c, "--tp", o.tp, "tensor-parallel ranks: each layer split over this many ranks (CPU; docs/DISTRIBUTED.md)")->capture_default_str();
  c->add_flag("--sequence-parallel", o.sequence_parallel,
              "with --tp: the norms and residual adds over each rank's rows of the batch (CPU; docs/DISTRIBUTED.md)");
  add_num(c, "--zero", o.zero, "1: shard AdamW's moments over the data-parallel ranks (ZeRO-1; CPU)")->capture_default_str();
  add_num(c, "--grad-bucket-mb", o.grad_bucket_mb,
          "data parallelism: gradients all-reduced in buckets of this many MB while the backward runs "
          "(0: one all-reduce after it)")
      ->capture_default_str();
  add_num(c, "--dist-timeout", o.dist_timeout, "seconds a rank waits for the others (rendezvous, collectives)")
      ->capture_default_str();
  c->add_option("--cuda-graph", o.cuda_graph,
                 "auto (on for GPU runs with --grad-accum 1), on or off: each step after warm-up as one CUDA graph")
      ->capture_default_str();
  c->add_option("--tune,--gemm-tune", o.gemm_tune,
                 "on: after the first step, each bf16 GEMM and cuDNN attention plan takes the fastest of its "
                 "library's candidates that give the same bits as the current choice; off: the heuristics' choices")
      ->capture_default_str();
  c->add_flag("--profile", o.profile,
              "time every op of a few steps after warm-up (eagerly): Chrome trace JSON + per-op summary");
  add_num(c, "--profile-steps", o.profile_steps, "steps to profile (with --profile)")->capture_default_str();
  add_num(c, "--profile-warmup", o.profile_warmup, "steps before the profiled ones (with --profile)")
      ->capture_default_str();
  c->add_option("--profile-out", o.profile_out, "trace file (default: <out-dir>/trace.json)");
}

int run_prepare(const std::string& input, const std::string& out_dir, std::string name, double val_fraction,
                const std::string& tokenizer_name, int threads) {
  if (!(val_fraction >= 0 && val_fraction < 1)) fail("--val-fraction=", val_fraction, " must be in [0, 1)");
  if (threads < 1 || threads > 1024) fail("--threads=", threads, " must be in [1, 1024]");
  auto tok = make_tokenizer(tokenizer_name);
  std::string text = read_file(input, "input text");
  if (text.empty()) fail(input, ": input text is empty");
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<int32_t> ids = tok->encode_parallel(text, threads);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const long n_val = static_cast<long>(static_cast<double>(ids.size()) * val_fraction);
  if (name.empty()) name = fs::path(input).stem().string();
  fs::create_directories(out_dir);
  std::string train_path = (fs::path(out_dir) / (name + "_train.bin")).string();
  write_shard(train_path, std::vector<int32_t>(ids.begin(), ids.end() - n_val));
  std::cout << "wrote " << train_path << " (" << ids.size() - static_cast<size_t>(n_val) << " tokens, tokenizer "
            << tok->name() << ", " << std::fixed << std::setprecision(1)
            << static_cast<double>(text.size()) / 1e6 / std::max(secs, 1e-9) << std::defaultfloat << " MB/s on " << threads << " thread" << (threads == 1 ? "" : "s") << ")\n";
  if (n_val > 0) {
    std::string val_path = (fs::path(out_dir) / (name + "_val.bin")).string();
    write_shard(val_path, std::vector<int32_t>(ids.end() - n_val, ids.end()));
    std::cout << "wrote " << val_path << " (" << n_val << " tokens)\n";
  }
  return 0;
}

// The "[load] ... in X s" line of generate and serve.
void log_load(const ServedModel& m) {
  std::cerr << "[load] " << m.what << " in " << std::fixed << std::setprecision(2) << m.load_seconds
            << std::defaultfloat << " s\n";
}

int run_import(const std::string& from, const std::string& out, bool overwrite) {
  if (const std::string p = replace_dir_problem(out, overwrite); !p.empty()) fail(p);  // before any work
  const ImportedModel m = import_model(from);
  write_imported_checkpoint(m, out, overwrite);
  std::cout << "imported " << m.source << " -> " << out << ": "
            << model_summary(m.config, !m.tokenizer_json.empty(), !m.chat_template.empty()) << "\n";
  return 0;
}

int run_export(const std::string& to, const std::string& checkpoint, const std::string& out, bool overwrite) {
  if (to != "hf") fail("--to=", to, " is not a known format (hf)");
  const HfExportSummary s = export_hf(checkpoint, out, overwrite);
  std::cout << "exported " << checkpoint << " as " << hf_arch_class(s.arch) << " -> " << out << ": " << s.tensors
            << " tensors; tokenizer: " << (s.tokenizer ? "yes" : "no") << "; chat template: "
            << (s.chat_template ? "yes" : "no") << "\n";
  return 0;
}

struct GenerateOptions {
  std::string checkpoint, prompt = "And God said", tokenizer = "auto", device = "auto", system;
  int64_t max_new = 200;
  bool allow_nonfinite = false;
  bool chat = false;  // --chat: the prompt is a user message, put through the model's chat template
  bool batch_invariant = false;
  SampleParams sample{0.8f, 0, 1.0f, 0, 1337, 0};
};

// One request at a time through the serving engine. When the context is full, the last half of the
// text becomes the next request's prompt (a sliding window), so any number of tokens can be generated.
int run_generate(const GenerateOptions& g) {
  std::string sp = sample_params_problem(g.sample, "--");
  if (!sp.empty()) {  // name the flag: --top_p -> --top-p
    std::replace(sp.begin(), sp.begin() + static_cast<std::ptrdiff_t>(sp.find('=')), '_', '-');
    fail(sp);
  }
  if (g.max_new < 0) fail("--max-new-tokens=", g.max_new, " must be >= 0");
  ServedModel m = load_served_model(g.checkpoint, g.device, g.allow_nonfinite, g.tokenizer);
  log_load(m);
  const Tokenizer* tok = m.tok.get();
  std::vector<int32_t> ids;
  if (g.chat) {  // the template writes every special token itself (BOS included), as transformers' apply_chat_template
    if (m.assets.chat_template.empty()) fail("--chat: ", m.dir, " has no chat template");
    std::vector<ChatMessage> messages;
    if (!g.system.empty()) messages.push_back({"system", g.system});
    messages.push_back({"user", g.prompt});
    ids = tok->encode(render_chat_template(m.assets.chat_template, messages, /*add_generation_prompt=*/true,
                                           tok->bos_token_text(), tok->eos_token_text()));
  } else {
    if (!g.system.empty()) fail("--system is for --chat");
    ids = tok->special_prefix();  // a BOS token where the tokenizer's template has one
    const std::vector<int32_t> text_ids = tok->encode(g.prompt);
    if (text_ids.empty()) fail("--prompt is empty");
    ids.insert(ids.end(), text_ids.begin(), text_ids.end());
  }
  const int64_t ctx = m.cfg.context_length;
  if (static_cast<int64_t>(ids.size()) >= ctx) fail("--prompt has ", ids.size(), " tokens; context_length is ", ctx);
  EngineOptions eo;
  eo.max_seqs = 1;
  eo.max_prefill_tokens = std::min<int64_t>(ctx, 512);
  eo.batch_invariant = g.batch_invariant;
  Engine engine(m.cfg, *m.params, eo);

  if (!g.chat) std::cout << g.prompt << std::flush;  // a chat shows the reply only
  std::vector<int32_t> history(ids.begin(), ids.end());
  int64_t generated = 0, request = 0;
  while (generated < g.max_new) {
    std::vector<int32_t> prompt = history;
    if (static_cast<int64_t>(prompt.size()) >= ctx) prompt.erase(prompt.begin(), prompt.end() - ctx / 2);
    RequestParams rp;
    rp.sample = g.sample;
    rp.max_tokens = std::min<int64_t>(g.max_new - generated, ctx - static_cast<int64_t>(prompt.size()));
    rp.stop_tokens = tok->end_tokens();
    engine.add(request++, prompt, rp);
    bool ended = false;
    while (!engine.idle())
      for (const EngineEvent& e : engine.step()) {
        const int32_t t = e.out.token;
        ++generated;
        if (std::find(rp.stop_tokens.begin(), rp.stop_tokens.end(), t) != rp.stop_tokens.end()) {
          ended = true;  // the model ended its text: the end token is not printed
          continue;
        }
        if (!tok->is_special(t)) std::cout << (t < tok->vocab_size() ? tok->decode(t) : std::string("?")) << std::flush;
        history.push_back(t);
      }
    if (ended) break;
  }
  std::cout << "\n" << std::flush;
  std::cerr << "[generated " << generated << " tokens from " << m.dir << " on " << device_name(m.params->device())
            << "; context_length " << ctx << "]\n";
  return 0;
}

// "1,2,3" -> {1, 2, 3}; anything else is one line naming the flag and the item ("'x' is not a token id").
template <class T>
std::vector<T> parse_int_list(const std::string& text, const char* flag, const char* what) {
  std::vector<T> out;
  size_t at = 0;
  while (at <= text.size()) {
    const size_t comma = std::min(text.find(',', at), text.size());
    const std::string one = text.substr(at, comma - at);
    T v = 0;
    const auto [p, ec] = std::from_chars(one.data(), one.data() + one.size(), v);
    if (one.empty() || ec != std::errc() || p != one.data() + one.size())
      fail(flag, ": '", one, "' is not ", what, " (expected comma-separated integers)");
    out.push_back(v);
    at = comma + 1;
  }
  return out;
}

struct ScoreOptions {
  std::string checkpoint, prompt, tokens, tokenizer = "auto", device = "auto", precision = "auto";
  bool allow_nonfinite = false, batch_invariant = false;
};

// The log-probability of each token of a text (or of given token ids) under the model, as training
// computes it (model/score.h): one JSON object on stdout.
int run_score(const ScoreOptions& so) {
  if (so.prompt.empty() == so.tokens.empty()) fail("score: give exactly one of --prompt and --tokens");
  ServedModel m = load_served_model(so.checkpoint, so.device, so.allow_nonfinite, so.tokenizer);
  std::vector<int32_t> ids;
  if (!so.tokens.empty()) {
    ids = parse_int_list<int32_t>(so.tokens, "--tokens", "a token id");
  } else {
    ids = m.tok->special_prefix();
    const std::vector<int32_t> text_ids = m.tok->encode(so.prompt);
    ids.insert(ids.end(), text_ids.begin(), text_ids.end());
  }
  SequenceScorer scorer(m.cfg, *m.params, so.precision, so.batch_invariant);
  const std::vector<float> lp = scorer.logprobs({ids});
  double sum = 0;
  for (float v : lp) sum += v;
  nlohmann::json j = {{"tokens", ids}, {"logprobs", lp}, {"sum", sum}, {"device", device_name(m.params->device())}};
  std::cout << j.dump() << "\n";
  return 0;
}

struct InvarianceCommand {
  std::string checkpoint, device = "auto", batches = "1,2,3,4,5,8,16,32,64,128,256";
  bool allow_nonfinite = false;
  InvarianceOptions o;
};

// The batch-invariance harness (serve/invariance.h): a table of bitwise comparisons; exit 0 when every
// value is equal, 1 when one differs.
int run_check_invariance(InvarianceCommand& ic) {
  ic.o.batches = parse_int_list<int64_t>(ic.batches, "--batches", "a batch size");
  ServedModel m = load_served_model(ic.checkpoint, ic.device, ic.allow_nonfinite);
  if (const std::string p = invariance_options_problem(ic.o, m.cfg); !p.empty()) fail(p);
  std::cerr << "[check-invariance] " << m.what << " on " << device_name(m.params->device()) << ": "
            << model_summary(m.cfg, m.tok != nullptr, !m.assets.chat_template.empty()) << "\n";
  const InvarianceReport r = check_invariance(m.cfg, *m.params, ic.o, &std::cerr);
  r.print(std::cout);
  return r.all_equal() ? 0 : 1;
}

struct ServeOptions {
  std::string checkpoint, tokenizer = "auto", device = "auto";
  bool allow_nonfinite = false;
  ServerOptions server;
  EngineOptions engine;
};

std::atomic<int> g_signal{0};
extern "C" void on_stop_signal(int sig) { g_signal = sig; }
extern "C" void on_train_signal(int sig) {
  g_signal = sig;
  std::signal(sig, SIG_DFL);  // the next one ends the process
  static const char msg[] = "\n[train] stopping after this step, with a checkpoint (again to quit at once)\n";
  [[maybe_unused]] const ssize_t n = ::write(STDERR_FILENO, msg, sizeof(msg) - 1);
}

int run_serve(ServeOptions so) {
#ifndef LMF_WITH_HTTP
  fail("lmforge was built without the HTTP server (cpp-httplib not found; scripts/install_deps.sh installs it)");
#else
  if (const std::string p = engine_options_problem(so.engine); !p.empty()) fail(p);
  if (so.server.port < 0 || so.server.port > 65535) fail("--port=", so.server.port, " must be in [0, 65535]");
  ServedModel m = load_served_model(so.checkpoint, so.device, so.allow_nonfinite, so.tokenizer);
  log_load(m);
  const Tokenizer* tok = m.tok.get();
  so.server.chat_template = m.assets.chat_template;
  if (so.server.model_name.empty()) {  // the directory the user named (a training out-dir or a checkpoint)
    fs::path p = fs::path(so.checkpoint).lexically_normal();
    if (p.filename().empty()) p = p.parent_path();
    so.server.model_name = p.filename().string();
  }
  std::cerr << "[serve] planning the engine on " << device_name(m.params->device()) << "...\n";
  Engine engine(m.cfg, *m.params, so.engine);
  Server server(engine, *tok, so.server);
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
  std::atomic<bool> done{false};
  std::thread watcher([&] {
    while (!done && g_signal == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (g_signal != 0) {
      std::cerr << "[serve] signal " << g_signal.load() << ": draining the live requests, then exiting\n";
      server.stop();
    }
  });
  std::string buckets;
  for (int64_t b : engine.buckets()) buckets += (buckets.empty() ? "" : ",") + std::to_string(b);
  try {
    server.run([&](int port) {
      std::cerr << "[serve] model '" << so.server.model_name << "' from " << m.dir << ": " << m.cfg.n_layer
                << " layers, d_model " << m.cfg.d_model << ", context " << m.cfg.context_length << "; KV cache "
                << engine.kv_blocks() << " blocks of " << so.engine.block_size << " positions; max " << so.engine.max_seqs
                << " sequences; row buckets " << buckets << "\n";
      std::cout << "listening on http://" << so.server.host << ":" << port << std::endl;
    });
  } catch (...) {
    done = true;
    watcher.join();
    throw;
  }
  done = true;
  watcher.join();
  std::cerr << "[serve] stopped\n";
  return 0;
#endif
}

}  // namespace

// "rank R: " in a distributed run (which rank failed is the first thing to know), else "".
namespace {
std::string rank_prefix() {
  try {
    const DistEnv d = dist_env();
    return d.distributed() ? "rank " + std::to_string(d.rank) + ": " : "";
  } catch (const std::exception&) {
    return "";  // a bad environment is the error itself
  }
}
}  // namespace

// A crash (a bug: lmforge never means to fault) prints the signal, the rank of a distributed run and a
// backtrace to stderr, then dies of the same signal: a crashed rank in a CI log or a cluster's job log
// says where. Only async-signal-safe calls (write, backtrace_symbols_fd) after the first backtrace(),
// which is made at start-up so its library is loaded before any fault.
extern "C" void on_fatal_signal(int sig) {
  char head[160];
  const char* rank = std::getenv("RANK");
  const int n = std::snprintf(head, sizeof head, "lmforge: fatal signal %d (%s)%s%s; backtrace:\n", sig,
                              sig == SIGSEGV ? "segmentation fault" : sig == SIGBUS ? "bus error"
                              : sig == SIGFPE ? "arithmetic error" : sig == SIGILL ? "illegal instruction" : "abort",
                              rank ? " in rank " : "", rank ? rank : "");
  if (n > 0) (void)!::write(2, head, static_cast<size_t>(std::min<int>(n, sizeof head - 1)));
  void* frames[64];
  backtrace_symbols_fd(frames, backtrace(frames, 64), 2);
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

void install_crash_report() {
  void* warm[1];
  (void)backtrace(warm, 1);
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) std::signal(sig, on_fatal_signal);
}

int main(int argc, char** argv) {
  install_crash_report();
  CLI::App app{"lmforge: train, sample and serve transformer language models (" + build_text() + ")"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("lmforge ") + LMF_VERSION + " (git " + LMF_GIT_COMMIT + "; " + build_text() + ")");

  TrainOptions topts;
  CLI::App* train = app.add_subcommand("train", "train a model (default: the tiny preset on the bundled corpus)");
  add_train_flags(train, topts);

  std::string p_input, p_out = "data_out", p_name, p_tok = "byte";
  int p_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  double p_val = 0.1;
  CLI::App* prepare = app.add_subcommand("prepare", "turn a text file into llm.c-format token shards");
  prepare->add_option("--input", p_input, "UTF-8 text file")->required();
  prepare->add_option("--out-dir", p_out, "where NAME_train.bin and NAME_val.bin go")->capture_default_str();
  prepare->add_option("--name", p_name, "shard name prefix (default: the input's file stem)");
  add_num(prepare, "--val-fraction", p_val, "fraction of tokens (from the end) for validation")->capture_default_str();
  prepare->add_option("--tokenizer", p_tok, "tokenizer: byte, or a tokenizer.json (byte-level BPE)")->capture_default_str();
  add_num(prepare, "--threads", p_threads, "threads encoding the text")->capture_default_str();

  TokenizerCommand tokc;
  add_tokenizer_command(app, tokc);

  GenerateOptions go;
  ForecastCommand fco;
  add_forecast_commands(app, fco);
  ScoreOptions sco;
  CLI::App* score = app.add_subcommand("score", "log-probability of each token of a text under a model, as training computes it (JSON)");
  score->add_option("--checkpoint", sco.checkpoint,
                    "checkpoint directory, training out-dir, Hugging Face directory or GGUF file")->required();
  score->add_option("--prompt", sco.prompt, "text to score (the tokenizer's BOS first, as generate)");
  score->add_option("--tokens", sco.tokens, "token ids to score instead, comma-separated");
  score->add_option("--tokenizer", sco.tokenizer, "tokenizer: auto, byte, or a tokenizer.json")->capture_default_str();
  score->add_option("--device", sco.device, "auto (cuda when a GPU is visible), cpu or cuda")->capture_default_str();
  score->add_option("--precision", sco.precision, "auto (bf16 on a GPU, fp32 on the CPU), fp32, tf32 or bf16")
      ->capture_default_str();
  score->add_flag("--allow-nonfinite", sco.allow_nonfinite, "load a checkpoint holding NaN/Inf weights");
  score->add_flag("--batch-invariant", sco.batch_invariant, kBatchInvariantHelp);

  InvarianceCommand ico;
  CLI::App* inv = app.add_subcommand(
      "check-invariance",
      "does a sequence's log-probabilities depend on its batch? bitwise checks of the trainer and the sampler");
  inv->add_option("--checkpoint", ico.checkpoint,
                  "checkpoint directory, training out-dir, Hugging Face directory or GGUF file")->required();
  inv->add_option("--device", ico.device, "auto (cuda when a GPU is visible), cpu or cuda")->capture_default_str();
  inv->add_option("--precision", ico.o.precision, "the trainer's: auto (bf16 on a GPU, fp32 on the CPU), fp32, tf32 or bf16")
      ->capture_default_str();
  inv->add_option("--batches", ico.batches, "batch sizes and numbers of concurrent requests to sweep, comma-separated")
      ->capture_default_str();
  add_num(inv, "--prompt-len", ico.o.prompt_len, "the probe's prompt length (random ids)")->capture_default_str();
  add_num(inv, "--new-tokens", ico.o.new_tokens, "tokens the probe decodes greedily")->capture_default_str();
  add_num(inv, "--seed", ico.o.seed, "seed of the probe and of the other sequences")->capture_default_str();
  inv->add_flag("--allow-nonfinite", ico.allow_nonfinite, "load a checkpoint holding NaN/Inf weights");
  inv->add_flag("--batch-invariant", ico.o.batch_invariant, "check the trainer and the sampler in batch-invariant mode");

  CLI::App* gen = app.add_subcommand("generate", "sample text from a checkpoint (the serving engine, one request)");
  gen->add_option("--checkpoint", go.checkpoint,
                  "checkpoint directory, training out-dir, Hugging Face model directory or GGUF file")->required();
  gen->add_option("--prompt", go.prompt, "text to continue (with --chat: the user's message)")->capture_default_str();
  gen->add_flag("--chat", go.chat, "answer --prompt as a chat assistant, through the model's chat template");
  gen->add_option("--system", go.system, "with --chat: a system message before the user's");
  add_num(gen, "--max-new-tokens,-n", go.max_new, "tokens to generate")->capture_default_str();
  add_num(gen, "--temperature", go.sample.temperature, "softmax temperature (0 = greedy)")->capture_default_str();
  add_num(gen, "--top-k", go.sample.top_k, "keep the k most likely tokens (0 = off)")->capture_default_str();
  add_num(gen, "--top-p", go.sample.top_p, "nucleus sampling mass (1 = off)")->capture_default_str();
  add_num(gen, "--seed", go.sample.seed, "sampling seed")->capture_default_str();
  gen->add_option("--tokenizer", go.tokenizer, "tokenizer: auto (the checkpoint's tokenizer.json, else byte), byte, or a tokenizer.json")->capture_default_str();
  gen->add_option("--device", go.device, "auto (cuda when a GPU is visible), cpu or cuda")->capture_default_str();
  gen->add_flag("--allow-nonfinite", go.allow_nonfinite, "load a checkpoint holding NaN/Inf weights");
  gen->add_flag("--batch-invariant", go.batch_invariant, kBatchInvariantHelp);

  ServeOptions sv;
  CLI::App* serve = app.add_subcommand("serve", "serve a checkpoint over HTTP (OpenAI-compatible /v1/completions)");
  serve->add_option("--checkpoint", sv.checkpoint,
                    "checkpoint directory, training out-dir, Hugging Face model directory or GGUF file")->required();
  serve->add_option("--host", sv.server.host, "address to listen on")->capture_default_str();
  add_num(serve, "--port", sv.server.port, "port to listen on (0: any free port)")->capture_default_str();
  serve->add_option("--model-name", sv.server.model_name, "the model's name in the API (default: the checkpoint's directory name)");
  serve->add_option("--device", sv.device, "auto (cuda when a GPU is visible), cpu or cuda")->capture_default_str();
  serve->add_option("--tokenizer", sv.tokenizer, "tokenizer: auto (the checkpoint's tokenizer.json, else byte), byte, or a tokenizer.json")->capture_default_str();
  add_num(serve, "--max-seqs", sv.engine.max_seqs, "sequences decoding at once")->capture_default_str();
  add_num(serve, "--max-prefill-tokens", sv.engine.max_prefill_tokens, "prompt positions computed per engine step")
      ->capture_default_str();
  add_num(serve, "--block-size", sv.engine.block_size, "positions per KV-cache block")->capture_default_str();
  add_num(serve, "--kv-cache-gb", sv.engine.kv_cache_gb,
                    "KV-cache pool size in GiB (0: every sequence at full context on the CPU, 85% of the free memory on the GPU)")
      ->capture_default_str();
  serve->add_option("--cuda-graphs", sv.engine.cuda_graphs, "GPU: each step as one CUDA graph per row bucket")
      ->capture_default_str();
  add_num(serve, "--threads", sv.server.threads, "HTTP worker threads (each open request holds one)")->capture_default_str();
  serve->add_flag("--allow-nonfinite", sv.allow_nonfinite, "load a checkpoint holding NaN/Inf weights");
  serve->add_flag("--batch-invariant", sv.engine.batch_invariant, kBatchInvariantHelp);
  sv.server.model_name.clear();

  PlotOptions plot_o;
  CLI::App* plot = app.add_subcommand("plot", "loss and tokens/s curves of a run (metrics.jsonl) as SVG or PNG (gnuplot)");
  plot->add_option("--metrics", plot_o.metrics, "metrics.jsonl or a training out-dir")->required();
  plot->add_option("--out", plot_o.out, "image path, .svg or .png (default: curves.svg beside metrics.jsonl)");
  plot->add_option("--title", plot_o.title, "plot title (default: the metrics path)");

  std::string im_from, im_out;
  bool im_overwrite = false;
  CLI::App* imp = app.add_subcommand("import", "convert a Hugging Face model directory or a GGUF file into an lmforge checkpoint");
  imp->add_option("--from", im_from, "Hugging Face model directory (config.json + safetensors) or GGUF file")->required();
  imp->add_option("--out", im_out, "checkpoint directory to write")->required();
  imp->add_flag("--overwrite", im_overwrite, "replace a non-empty --out");

  std::string ex_to, ex_ckpt, ex_out;
  bool ex_overwrite = false;
  CLI::App* exp = app.add_subcommand("export", "write a model as a Hugging Face model directory (transformers loads it)");
  exp->add_option("--to", ex_to, "format: hf")->required();
  exp->add_option("--checkpoint", ex_ckpt, "checkpoint directory, training out-dir, Hugging Face directory or GGUF file")
      ->required();
  exp->add_option("--out", ex_out, "directory to write")->required();
  exp->add_flag("--overwrite", ex_overwrite, "replace a non-empty --out");

  LaunchCommand lc;
  add_launch_command(app, lc);
  // launch: CLI11 parses the flags before `--`; what follows is the ranks' command, untouched
  std::vector<std::string> launched;
  int parsed_argc = argc;
  if (argc > 1 && std::string(argv[1]) == "launch") {
    for (int i = 2; i < argc; ++i)
      if (std::string(argv[i]) == "--") {
        parsed_argc = i;
        launched.assign(argv + i + 1, argv + argc);
        break;
      }
  }

  try {
    app.parse(parsed_argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::string msg = e.what();
    for (char& ch : msg)
      if (ch == '\n') ch = ' ';
    std::string hint;
    if (dynamic_cast<const CLI::ExtrasError*>(&e)) {
      std::vector<std::string> args(argv + 1, argv + argc);
      hint = did_you_mean(app, args);
    }
    std::cerr << "lmforge: error: " << msg << hint << " (see lmforge --help)\n";
    return 2;
  }

  try {
    if (*train) {
      if (!topts.resume.empty()) {  // every setting not given comes from the run being resumed
        std::vector<std::string> given;
        for (const CLI::Option* opt : train->get_options())
          if (opt->count() > 0 && !opt->get_lnames().empty()) {
            std::string key = opt->get_lnames().front();
            std::replace(key.begin(), key.end(), '-', '_');
            given.push_back(key);
          }
        const std::vector<std::string> restored = restore_run_options(topts, given);
        if (!restored.empty()) {
          const nlohmann::json j = nlohmann::json::parse(topts.to_json());
          std::cout << "resume: from the run's state.json:";
          for (const std::string& k : restored)
            std::cout << " " << k << "=" << (j.contains(k) ? j.at(k).dump() : std::string("?"));
          std::cout << "\n";
        }
      }
      Trainer t(topts, std::cout);
      // Ctrl-C (or SIGTERM) stops at the end of the current step with a checkpoint of it; a second one
      // kills the process at once (checkpoint writes are atomic either way).
      std::signal(SIGINT, on_train_signal);
      std::signal(SIGTERM, on_train_signal);
      t.set_hooks({nullptr, [] { return g_signal != 0; }, nullptr, nullptr});
      t.run();
      if (t.stopped_early()) return 128 + g_signal.load();
      return 0;
    }
    if (*prepare) return run_prepare(p_input, p_out, p_name, p_val, p_tok, p_threads);
    if (*lc.app) return run_launch(lc, argv[0], launched);
    if (*tokc.app) return run_tokenizer_command(tokc);
    if (*gen) return run_generate(go);
    if (*score) return run_score(sco);
    if (*inv) return run_check_invariance(ico);
    if (*fco.forecast || *fco.eval) return run_forecast_command(fco);
    if (*serve) return run_serve(sv);
    if (*imp) return run_import(im_from, im_out, im_overwrite);
    if (*exp) return run_export(ex_to, ex_ckpt, ex_out, ex_overwrite);
    if (*plot) {
      const std::string written = plot_metrics(plot_o);
      std::cout << "wrote " << written << "\n";
      return 0;
    }
  } catch (const std::exception& e) {  // lmf::Error and the rest: one line, written at once (ranks share stderr)
    const std::string line = "lmforge: error: " + rank_prefix() + e.what() + "\n";
    std::fwrite(line.data(), 1, line.size(), stderr);
    return 1;
  }
  return 0;
}
