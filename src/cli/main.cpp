// lmforge: the command line. Subcommands: train, prepare, generate.
// Every error is one line on stderr and a non-zero exit: 1 for a failed run, 2 for bad flags.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <string>

#include "core/check.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "model/decoder.h"
#include "model/gpt.h"
#include "model/sampler.h"
#include "train/checkpoint.h"
#include "core/fsutil.h"
#include "train/plot.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace lmf;

namespace {

void add_train_flags(CLI::App* c, TrainOptions& o) {
  auto* cfg = c->add_option("--config", o.config_path, "model config JSON (docs/MODEL.md)");
  c->add_option("--preset", o.preset,
                "model preset: tiny, tiny-moe, test-gpt2, test-llama, test-moe, gpt2-124m, llama-style, moe-bench, "
                "moe-bench-dense")
      ->capture_default_str()->excludes(cfg);
  c->add_option("--data", o.data, "training shards (llm.c .bin; wildcards ok); default: the bundled corpus");
  c->add_option("--val-data", o.val_data, "validation shards");
  c->add_option("--batch-size,-B", o.batch_size, "micro-batch size")->capture_default_str();
  c->add_option("--seq-len,-T", o.seq_len, "sequence length (0 = context_length)")->capture_default_str();
  c->add_option("--grad-accum", o.grad_accum, "micro-batches per optimizer step")->capture_default_str();
  c->add_option("--steps", o.steps, "optimizer steps")->capture_default_str();
  c->add_option("--lr", o.lr, "peak learning rate")->capture_default_str();
  c->add_option("--min-lr", o.min_lr, "final learning rate of the cosine schedule (default lr/10)");
  c->add_option("--warmup", o.warmup, "linear warmup steps")->capture_default_str();
  c->add_option("--weight-decay", o.weight_decay, "AdamW decoupled weight decay (2-D params)")->capture_default_str();
  c->add_option("--grad-clip", o.grad_clip, "clip the global gradient norm to this (0 = off)")->capture_default_str();
  c->add_option("--seed", o.seed, "seed for initialisation and data order")->capture_default_str();
  c->add_option("--log-every", o.log_every, "steps between metric lines")->capture_default_str();
  c->add_option("--eval-every", o.eval_every, "steps between validation runs (0 = at the end)")->capture_default_str();
  c->add_option("--eval-batches", o.eval_batches, "batches per validation run")->capture_default_str();
  c->add_option("--checkpoint-every", o.checkpoint_every, "steps between checkpoints (0 = at the end)")
      ->capture_default_str();
  c->add_option("--out-dir", o.out_dir, "metrics.jsonl and checkpoints go here")->capture_default_str();
  c->add_option("--resume", o.resume, "checkpoint directory or out-dir to continue from");
  c->add_option("--device", o.device, "cpu, cuda, or auto (cuda when a GPU is present)")->capture_default_str();
  c->add_option("--precision", o.precision, "auto (bf16 on a GPU, fp32 on the CPU), fp32, tf32 (GPU: fp32 GEMMs on tensor cores) or bf16 (GPU: "
                "mixed precision, fp32 master weights)")
      ->capture_default_str();
  c->add_option("--attention", o.attention,
                 "bf16 flash attention kernels: auto (cuDNN's fused attention when available, else lmforge's), "
                 "lmforge or cudnn")
      ->capture_default_str();
  c->add_option("--mfu-peak-tflops", o.mfu_peak_tflops, "peak TFLOP/s for MFU (default: the GPU's dense bf16 peak)");
  c->add_option("--cuda-graph", o.cuda_graph,
                 "auto (on for GPU runs with --grad-accum 1), on or off: each step after warm-up as one CUDA graph")
      ->capture_default_str();
  c->add_option("--tune,--gemm-tune", o.gemm_tune,
                 "on: after the first step, each bf16 GEMM and cuDNN attention plan takes the fastest of its "
                 "library's candidates that give the same bits as the current choice; off: the heuristics' choices")
      ->capture_default_str();
  c->add_flag("--profile", o.profile,
              "time every op of a few steps after warm-up (eagerly): Chrome trace JSON + per-op summary");
  c->add_option("--profile-steps", o.profile_steps, "steps to profile (with --profile)")->capture_default_str();
  c->add_option("--profile-warmup", o.profile_warmup, "steps before the profiled ones (with --profile)")
      ->capture_default_str();
  c->add_option("--profile-out", o.profile_out, "trace file (default: <out-dir>/trace.json)");
}

int run_prepare(const std::string& input, const std::string& out_dir, std::string name, double val_fraction,
                const std::string& tokenizer_name) {
  if (!(val_fraction >= 0 && val_fraction < 1)) fail("--val-fraction=", val_fraction, " must be in [0, 1)");
  auto tok = make_tokenizer(tokenizer_name);
  std::string text = read_file(input, "input text");
  if (text.empty()) fail(input, ": input text is empty");
  std::vector<uint16_t> ids = tok->encode(text);
  size_t n_val = static_cast<size_t>(static_cast<double>(ids.size()) * val_fraction);
  if (name.empty()) name = fs::path(input).stem().string();
  fs::create_directories(out_dir);
  std::string train_path = (fs::path(out_dir) / (name + "_train.bin")).string();
  write_shard(train_path, std::vector<uint16_t>(ids.begin(), ids.end() - static_cast<long>(n_val)));
  std::cout << "wrote " << train_path << " (" << ids.size() - n_val << " tokens, tokenizer " << tok->name() << ")\n";
  if (n_val > 0) {
    std::string val_path = (fs::path(out_dir) / (name + "_val.bin")).string();
    write_shard(val_path, std::vector<uint16_t>(ids.end() - static_cast<long>(n_val), ids.end()));
    std::cout << "wrote " << val_path << " (" << n_val << " tokens)\n";
  }
  return 0;
}

int run_generate(const std::string& checkpoint, const std::string& prompt, int64_t max_new, const SamplerOptions& so,
                 const std::string& tokenizer_name) {
  sampler_validate(so);
  if (max_new < 0) fail("--max-new-tokens=", max_new, " must be >= 0");
  std::string dir = resolve_checkpoint(checkpoint);
  ModelConfig cfg = load_checkpoint_config(dir);
  auto tok = make_tokenizer(tokenizer_name);
  if (tok->vocab_size() > cfg.vocab_size)
    fail("tokenizer '", tok->name(), "' has ", tok->vocab_size(), " tokens but the model's vocab_size is ", cfg.vocab_size);
  std::vector<uint16_t> ids = tok->encode(prompt);
  if (ids.empty()) fail("--prompt is empty");
  if (static_cast<int64_t>(ids.size()) >= cfg.context_length)
    fail("--prompt has ", ids.size(), " tokens; context_length is ", cfg.context_length);
  Parameters params(gpt_param_specs(cfg), Device::cpu, false);
  load_checkpoint_weights(dir, params);
  Decoder decoder(cfg, params, cfg.context_length);
  Sampler sampler(so, cfg.vocab_size);

  // Feed the prompt, then sample. When the KV cache is full, the last half of the text is fed
  // again from position 0 (a sliding window), so any number of tokens can be generated.
  std::cout << prompt << std::flush;
  std::vector<int32_t> history(ids.begin(), ids.end());
  const float* logits = nullptr;
  int64_t pos = 0;
  for (int32_t t : history) logits = decoder.step(t, pos++);
  int64_t generated = 0;
  for (; generated < max_new; ++generated) {
    int32_t next = sampler.sample(logits, static_cast<uint64_t>(generated));
    std::cout << (next < tok->vocab_size() ? tok->decode(static_cast<uint16_t>(next)) : std::string("?")) << std::flush;
    history.push_back(next);
    if (generated + 1 == max_new) break;
    if (pos == cfg.context_length) {
      pos = 0;
      for (size_t i = history.size() - static_cast<size_t>(cfg.context_length / 2); i < history.size(); ++i)
        logits = decoder.step(history[i], pos++);
    } else {
      logits = decoder.step(next, pos++);
    }
  }
  if (max_new > 0) ++generated;
  std::cout << "\n" << std::flush;
  std::cerr << "[generated " << generated << " tokens from " << dir << "; context_length " << cfg.context_length << "]\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"lmforge: train and sample transformer language models (CPU reference backend)"};
  app.require_subcommand(1);

  TrainOptions topts;
  CLI::App* train = app.add_subcommand("train", "train a model (default: the tiny preset on the bundled corpus)");
  add_train_flags(train, topts);

  std::string p_input, p_out = "data_out", p_name, p_tok = "byte";
  double p_val = 0.1;
  CLI::App* prepare = app.add_subcommand("prepare", "turn a text file into llm.c-format token shards");
  prepare->add_option("--input", p_input, "UTF-8 text file")->required();
  prepare->add_option("--out-dir", p_out, "where NAME_train.bin and NAME_val.bin go")->capture_default_str();
  prepare->add_option("--name", p_name, "shard name prefix (default: the input's file stem)");
  prepare->add_option("--val-fraction", p_val, "fraction of tokens (from the end) for validation")->capture_default_str();
  prepare->add_option("--tokenizer", p_tok, "tokenizer: byte")->capture_default_str();

  std::string g_ckpt, g_prompt = "And God said", g_tok = "byte";
  int64_t g_max = 200;
  SamplerOptions so;
  CLI::App* gen = app.add_subcommand("generate", "sample text from a checkpoint");
  gen->add_option("--checkpoint", g_ckpt, "checkpoint directory or training out-dir")->required();
  gen->add_option("--prompt", g_prompt, "text to continue")->capture_default_str();
  gen->add_option("--max-new-tokens,-n", g_max, "tokens to generate")->capture_default_str();
  gen->add_option("--temperature", so.temperature, "softmax temperature (0 = greedy)")->capture_default_str();
  gen->add_option("--top-k", so.top_k, "keep the k most likely tokens (0 = off)")->capture_default_str();
  gen->add_option("--top-p", so.top_p, "nucleus sampling mass (1 = off)")->capture_default_str();
  gen->add_option("--seed", so.seed, "sampling seed")->capture_default_str();
  gen->add_option("--tokenizer", g_tok, "tokenizer: byte")->capture_default_str();

  PlotOptions plot_o;
  CLI::App* plot = app.add_subcommand("plot", "loss and tokens/s curves of a run (metrics.jsonl) as SVG or PNG (gnuplot)");
  plot->add_option("--metrics", plot_o.metrics, "metrics.jsonl or a training out-dir")->required();
  plot->add_option("--out", plot_o.out, "image path, .svg or .png (default: curves.svg beside metrics.jsonl)");
  plot->add_option("--title", plot_o.title, "plot title (default: the metrics path)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::string msg = e.what();
    for (char& ch : msg)
      if (ch == '\n') ch = ' ';
    std::cerr << "lmforge: error: " << msg << " (see lmforge --help)\n";
    return 2;
  }

  try {
    if (*train) {
      Trainer t(topts, std::cout);
      t.run();
      return 0;
    }
    if (*prepare) return run_prepare(p_input, p_out, p_name, p_val, p_tok);
    if (*gen) return run_generate(g_ckpt, g_prompt, g_max, so, g_tok);
    if (*plot) {
      std::cout << "wrote " << plot_metrics(plot_o) << "\n";
      return 0;
    }
  } catch (const lmf::Error& e) {
    std::cerr << "lmforge: error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "lmforge: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
