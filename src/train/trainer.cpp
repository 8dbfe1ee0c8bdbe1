#include "train/trainer.h"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <ctime>
#include <type_traits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <nlohmann/json.hpp>

#include "convert/import.h"
#include "core/check.h"
#include "core/device.h"
#include "core/gpu_monitor.h"
#include "core/json_util.h"
#include "core/profiler.h"
#include "core/trace.h"
#include "data/corpus.h"
#include "data/series_loader.h"
#include "data/tokenizer.h"
#include "dist/env.h"
#include "dist/grad_buckets.h"
#include "dist/run.h"
#include "dist/tensor_parallel.h"
#include "ops/cross_entropy.h"
#include "ops/gemm_cuda.h"
#include "ops/optim.h"
#include "train/checkpoint.h"

namespace lmf {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::string with_commas(double v) {
  long long n = std::llround(v);
  std::string digits = std::to_string(n < 0 ? -n : n), out = n < 0 ? "-" : "";
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), f, v);
  return buf;
}

// 42s, 3m05s, 1h02m
std::string duration_text(double s) {
  const long long t = std::llround(std::max(0.0, s));
  char buf[32];
  if (t < 60) std::snprintf(buf, sizeof(buf), "%llds", t);
  else if (t < 3600) std::snprintf(buf, sizeof(buf), "%lldm%02llds", t / 60, t % 60);
  else std::snprintf(buf, sizeof(buf), "%lldh%02lldm", t / 3600, (t % 3600) / 60);
  return buf;
}

// Wall-clock seconds since the Unix epoch (metrics.jsonl's "time").
double unix_time() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string human_count(int64_t n) {
  if (n >= 1000000) return fmt("%.2fM", n / 1e6);
  if (n >= 1000) return fmt("%.2fK", n / 1e3);
  return std::to_string(n);
}

// Bundled corpus, byte-tokenized: the first 90% trains, the last 10% validates.
std::vector<int32_t> bundled_tokens(bool val) {
  std::string_view text = bundled_corpus();
  size_t split = text.size() / 10 * 9;
  ByteTokenizer tok;
  return tok.encode(val ? text.substr(split) : text.substr(0, split));
}

}  // namespace

namespace {
std::vector<std::string> absolute_paths(const std::vector<std::string>& paths) {
  std::vector<std::string> out;
  for (const std::string& p : paths) out.push_back(p.empty() ? p : fs::absolute(p).lexically_normal().string());
  return out;
}
}  // namespace

std::string TrainOptions::to_json() const {
  json j = {{"config", config_path.empty() ? config_path : fs::absolute(config_path).lexically_normal().string()},
            {"preset", preset}, {"data", absolute_paths(data)}, {"val_data", absolute_paths(val_data)},
            {"batch_size", batch_size}, {"seq_len", seq_len}, {"grad_accum", grad_accum}, {"steps", steps},
            {"lr", lr}, {"min_lr", min_lr}, {"warmup", warmup}, {"weight_decay", weight_decay},
            {"grad_clip", grad_clip}, {"seed", seed}, {"log_every", log_every}, {"eval_every", eval_every},
            {"eval_batches", eval_batches}, {"checkpoint_every", checkpoint_every}, {"keep_last", keep_last},
            {"out_dir", out_dir.empty() ? out_dir : fs::absolute(out_dir).lexically_normal().string()},
            {"device", device}, {"precision", precision}, {"attention", attention}, {"cuda_graph", cuda_graph},
            {"tune", gemm_tune}, {"dp", std::max<int64_t>(dp, 1)}, {"tp", tp}, {"zero", zero},
            {"sequence_parallel", sequence_parallel}, {"grad_bucket_mb", grad_bucket_mb},
            {"batch_invariant", batch_invariant}};
  // (dp, tp, zero, sequence_parallel: for the record; a run may resume at another mesh)
  if (!init_from.empty()) j["init_from"] = init_from;  // for the record; a resume loads its own checkpoint
  return j.dump();
}

std::vector<std::string> TrainOptions::apply_json(const std::string& text, const std::vector<std::string>& skip,
                                                  const std::string& where) {
  const json j = json::parse(text);
  std::vector<std::string> set;
  auto take = [&](const char* key, auto& field) {
    if (!j.contains(key) || std::find(skip.begin(), skip.end(), key) != skip.end()) return;
    try {
      field = j.at(key).get<std::remove_reference_t<decltype(field)>>();
    } catch (const json::exception&) {
      fail(where, " '", key, "' has the wrong type: ", j.at(key).dump());
    }
    set.push_back(key);
  };
  take("config", config_path);
  take("preset", preset);
  take("data", data);
  take("val_data", val_data);
  take("batch_size", batch_size);
  take("seq_len", seq_len);
  take("grad_accum", grad_accum);
  take("steps", steps);
  take("lr", lr);
  take("min_lr", min_lr);
  take("warmup", warmup);
  take("weight_decay", weight_decay);
  take("grad_clip", grad_clip);
  take("seed", seed);
  take("log_every", log_every);
  take("eval_every", eval_every);
  take("eval_batches", eval_batches);
  take("checkpoint_every", checkpoint_every);
  take("keep_last", keep_last);
  take("out_dir", out_dir);
  take("device", device);
  take("precision", precision);
  take("attention", attention);
  take("cuda_graph", cuda_graph);
  take("tune", gemm_tune);
  take("grad_bucket_mb", grad_bucket_mb);  // (the buckets fix the order of the sums: resumes keep it)
  take("batch_invariant", batch_invariant);
  // flags that state.json does not record (the Python package's train() passes them here too)
  take("init_from", init_from);
  take("resume", resume);
  take("overwrite", overwrite);
  take("allow_change", allow_change);
  take("allow_nonfinite", allow_nonfinite);
  take("mfu_peak_tflops", mfu_peak_tflops);
  take("profile", profile);
  take("profile_steps", profile_steps);
  take("profile_warmup", profile_warmup);
  take("profile_out", profile_out);
  return set;
}

namespace {
// The run directory of a checkpoint directory: <run>/checkpoints/step_N -> <run>; "" when it is not
// inside one.
std::string run_dir_of(const std::string& ckpt_dir) {
  const fs::path p = fs::absolute(ckpt_dir).lexically_normal();
  const fs::path parent = (p.filename().empty() ? p.parent_path() : p).parent_path();
  return parent.filename() == "checkpoints" ? parent.parent_path().string() : std::string();
}

bool same_dir(const std::string& a, const std::string& b) {
  std::error_code ec;
  if (a.empty() || b.empty()) return false;
  if (fs::exists(a, ec) && fs::exists(b, ec)) return fs::equivalent(a, b, ec);
  return fs::absolute(a).lexically_normal() == fs::absolute(b).lexically_normal();
}

// Keys whose change alters what a resumed run computes.
const char* const kMeaningKeys[] = {"data", "val_data", "batch_size", "seq_len", "grad_accum", "lr", "min_lr",
                                    "warmup", "weight_decay", "grad_clip", "seed"};
}  // namespace

std::vector<std::string> restore_run_options(TrainOptions& o, const std::vector<std::string>& given) {
  if (o.resume.empty()) return {};
  const std::string dir = resolve_checkpoint(o.resume);
  const CheckpointState st = read_checkpoint_state(dir);
  // the model is the checkpoint's: a --preset that names another one is an error, not ignored
  if (std::find(given.begin(), given.end(), "preset") != given.end() &&
      config_to_json(config_preset(o.preset)) != config_to_json(load_checkpoint_config(dir)))
    fail("--preset ", o.preset, " differs from the model of checkpoint ", dir, " (a resumed run keeps its model)");
  std::vector<std::string> skip = given;
  skip.push_back("out_dir");  // below
  skip.push_back("config");   // the model comes from the checkpoint itself
  skip.push_back("preset");
  skip.push_back("init_from");  // recorded for the record only: a resumed run loads its own checkpoint
  std::vector<std::string> restored;
  if (!st.options_json.empty()) restored = o.apply_json(st.options_json, skip);
  if (std::find(given.begin(), given.end(), "out_dir") == given.end()) {
    std::string run = run_dir_of(dir);
    if (run.empty() && !st.options_json.empty()) {
      const json j = json::parse(st.options_json);
      if (j.contains("out_dir") && j.at("out_dir").is_string()) run = j.at("out_dir").get<std::string>();
    }
    if (!run.empty()) {
      o.out_dir = run;
      restored.push_back("out_dir");
    }
  }
  return restored;
}

void optimizer_step(Parameters& params, TrainingState& state, Tensor norm, const TrainOptions& o, double lr,
                    int64_t step, Tensor schedule, bool norm_ready) {
  // Two launches for the norm, one for AdamW over the whole parameter arena (weight decay on the
  // 2-D tensors' ranges): bitwise the same as per-tensor updates.
  Tensor g = state.grads().flat_f32();
  if (!norm_ready) grad_global_norm(norm, g);
  adamw_update_flat(params.master().flat_f32(), state.adam_m().flat_f32(), state.adam_v().flat_f32(), g,
                    state.decay_ranges(), norm, o.grad_clip, static_cast<float>(lr), o.beta1, o.beta2, o.adam_eps,
                    o.weight_decay, step, params.flat_copy(), schedule);
}

void attach_grad_buckets(Model& model, GradBuckets& buckets) {
  const Arena& grads = model.state().grads_for_backward();
  const int64_t total = grads.flat_f32().numel();
  model.set_grads_final_hook([&buckets, &grads, total](size_t first) {
    buckets.final_from(first < grads.size() ? static_cast<int64_t>(grads.offset_elems(first)) : total);
  });
}

void train_step_device(Gpt& gpt, Tensor tokens, Tensor targets, Tensor norm, Tensor loss, Tensor schedule,
                       const TrainOptions& o, Communicator* comm, GradBuckets* buckets) {
  const float share = comm ? 1.0f / static_cast<float>(comm->world_size()) : 1.0f;
  gpt.state->zero_grad();
  if (comm && buckets) buckets->begin();  // the backward sends them (attach_grad_buckets)
  gpt.model.forward_backward_device(tokens, targets, share);
  if (loss.defined()) loss_mean(loss, gpt.model.row_losses(), share, false);
  if (comm) {
    if (buckets) buckets->finish();
    else comm->all_reduce_sum(gpt.state->grads().flat_f32());
    if (loss.defined()) comm->all_reduce_sum(loss);
  }
  optimizer_step(gpt.params, *gpt.state, norm, o, 0.0, 1, schedule);  // lr and step come from schedule
}

void tune_begin(Model& model) {
#ifdef LMF_WITH_CUDA
  const OpPlansScope plans(model.op_plans());
  cuda::gemm_tune_begin();
  cudnn_attention_tune_begin();
#else
  (void)model;
#endif
}

void tune_finish(Model& model, std::ostream& log) {
#ifdef LMF_WITH_CUDA
  const OpPlansScope plans(model.op_plans());
  // between steps: the first step's GEMM outputs are dead
  const auto t0 = std::chrono::steady_clock::now();
  const cuda::GemmTuneResult r = cuda::gemm_autotune();
  log << "gemm_tune plans=" << r.plans << " kept_for_data=" << r.skipped << " candidates=" << r.candidates
      << " same_bits=" << r.equal << " changed=" << r.changed << " saved_ms_per_step=" << fmt("%.3f", r.saved_ms)
      << " seconds=" << fmt("%.2f", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count())
      << "\n";
  const auto t1 = std::chrono::steady_clock::now();
  const AttentionTuneResult a = cudnn_attention_autotune();
  if (a.plans > 0)
    log << "attention_tune plans=" << a.plans << " engine_configs=" << a.candidates << " over_workspace=" << a.too_big
        << " same_bits=" << a.equal << " changed=" << a.changed << " saved_ms_per_step=" << fmt("%.3f", a.saved_ms)
        << " seconds=" << fmt("%.2f", std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count())
        << "\n";
#else
  (void)model;
  (void)log;
#endif
}

double gpu_peak_tflops(const std::string& name) {
  // Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets.
  struct Entry { const char* match; double tflops; };
  static const Entry table[] = {{"H200", 989.0}, {"H100 80GB HBM3", 989.0}, {"H100 SXM", 989.0},
                                {"H100 NVL", 835.0}, {"H100 PCIe", 756.0}, {"H100", 756.0},
                                {"A100", 312.0}, {"L40S", 362.0}, {"A10", 125.0}};
  for (const Entry& e : table)
    if (name.find(e.match) != std::string::npos) return e.tflops;
  return 0;
}

double lr_at_step(const TrainOptions& o, int64_t s) {
  const double lr = o.lr, min_lr = o.min_lr < 0 ? o.lr * 0.1 : o.min_lr;
  if (s < o.warmup) return lr * static_cast<double>(s + 1) / static_cast<double>(o.warmup);
  double p = static_cast<double>(s - o.warmup) / static_cast<double>(std::max<int64_t>(1, o.steps - o.warmup));
  p = std::min(1.0, p);
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(M_PI * p));
}

namespace {

// The options the trainer itself uses (the plan's flags are checked by plan_from_flags).
void validate_options(const TrainOptions& o) {
  if (const std::string p = train_options_problem(o); !p.empty()) fail(p);  // every count and float
  if (o.cuda_graph != "auto" && o.cuda_graph != "on" && o.cuda_graph != "off")
    fail("--cuda-graph=", o.cuda_graph, " must be auto, on or off");
  if (o.gemm_tune != "on" && o.gemm_tune != "off") fail("--tune=", o.gemm_tune, " must be on or off");
}

// From the checkpoint when resuming or the model of --init-from (--config must then agree), else
// --config or --preset.
ModelConfig resolve_config(const TrainOptions& o, const std::string& resume_dir, const ModelSource* init) {
  if (!resume_dir.empty() || init) {
    const ModelConfig c = init ? init->config : load_checkpoint_config(resume_dir);
    if (!o.config_path.empty() && config_to_json(config_from_file(o.config_path)) != config_to_json(c))
      fail("--config ", o.config_path, " differs from the config of ", init ? init->what : "checkpoint " + resume_dir);
    return c;
  }
  return o.config_path.empty() ? config_preset(o.preset) : config_from_file(o.config_path);
}

}  // namespace

namespace {
// Ranks other than 0 of a distributed run print nothing but their errors: rank 0 speaks for the run.
std::ostream& rank_log(std::ostream& log) {
  static std::ostream quiet(nullptr);
  return dist_env().rank == 0 ? log : quiet;
}
}  // namespace

Trainer::Trainer(const TrainOptions& opts, std::ostream& log) : o_(opts), log_(rank_log(log)) {
  validate_options(o_);
  // --- a distributed run: meet the other ranks first, so every later error reaches them as this
  // rank's exit (dist/run.h) instead of a hang
  const DistEnv env = dist_env();
  if (o_.tp < 1 || o_.tp > 1024) fail("--tp=", o_.tp, " must be in [1, 1024]");
  if (o_.tp != 1 && !env.distributed() && !env.launched())
    fail("--tp=", o_.tp, " needs ", o_.tp, " ranks: launch them (lmforge launch -n ", o_.tp, " -- train ..., "
         "torchrun or srun; docs/DISTRIBUTED.md)");
  if (env.world_size % o_.tp != 0)
    fail("--tp=", o_.tp, " does not divide the world size, ", env.world_size, " (", env.launcher, ")");
  if (o_.dp != 0 && o_.dp != env.world_size / o_.tp)
    fail("--dp=", o_.dp, " x --tp=", o_.tp, " must equal the world size, ", env.world_size, " (", env.launcher, ")");
  if (o_.sequence_parallel && o_.tp < 2)
    fail("--sequence-parallel splits the tensor-parallel ranks' rows: it needs --tp 2 or more (got --tp=", o_.tp, ")");
  if (o_.zero != 0 && o_.zero != 1) fail("--zero=", o_.zero, " must be 0 (off) or 1 (AdamW's moments sharded)");
  if (o_.zero == 1 && parse_device(o_.device) == Device::cuda)
    fail("--zero=1 --device cuda: ZeRO-1 runs on the CPU backend in this version (on GPUs it comes with the "
         "multi-GPU work; docs/DISTRIBUTED.md)");
  if (o_.tp > 1 && parse_device(o_.device) == Device::cuda)
    fail("--tp=", o_.tp, " --device cuda: tensor parallelism runs on the CPU backend in this version (on GPUs it "
         "comes with the multi-GPU work; docs/DISTRIBUTED.md); data parallelism runs on both");
  if (env.distributed() || env.launched()) {  // (a launcher's world of 1 too: the same path with one rank)
    if (o_.dist_timeout < 1 || o_.dist_timeout > 86400) fail("--dist-timeout=", o_.dist_timeout, " must be in [1, 86400] seconds");
    const bool gpu = parse_device(o_.device) == Device::cuda;
    if (gpu && env.local_rank != 0)
      fail("LOCAL_RANK=", env.local_rank, ": one GPU per host in this version (several GPUs of one host are the "
           "multi-GPU issue's; docs/DISTRIBUTED.md)");
    dist_ = std::make_unique<DistRun>(env, std::chrono::seconds(o_.dist_timeout), gpu);
    // the mesh: rank = dp_rank x tp + tp_rank; a tensor-parallel group is tp consecutive ranks
    tp_size_ = o_.tp;
    dp_ = env.world_size / o_.tp;
    o_.dp = dp_;
    dp_rank_ = env.rank / tp_size_;
    tp_rank_ = env.rank % tp_size_;
    writer_ = env.rank == 0;
    auto group_of = [&](const std::string& name, int first, int stride, int64_t n) -> Communicator& {
      if (n == env.world_size) return dist_->comm();
      if (n == 1) return single_rank();
      std::vector<int> ranks;
      for (int64_t i = 0; i < n; ++i) ranks.push_back(first + static_cast<int>(i) * stride);
      return dist_->group(name, ranks);
    };
    tp_comm_ = &group_of("tp" + std::to_string(dp_rank_), static_cast<int>(dp_rank_ * tp_size_), 1, tp_size_);
    dp_comm_ = &group_of("dp" + std::to_string(tp_rank_), static_cast<int>(tp_rank_), static_cast<int>(tp_size_), dp_);
  }
  if (const char* f = std::getenv("LMF_FAULT")) {
    int r = -1;
    long long s = -1;
    if (std::sscanf(f, "kill-rank-%d@%lld", &r, &s) == 2 && r == env.rank) kill_at_step_ = s;
  }
  if (o_.profile_out.empty()) o_.profile_out = (fs::path(o_.out_dir) / "trace.json").string();
  const std::string resume_dir = o_.resume.empty() ? std::string() : resolve_checkpoint(o_.resume);
  ModelSource init;  // --init-from: its config now, its weights once the model is laid out
  if (!o_.init_from.empty()) {
    if (!resume_dir.empty()) fail("--init-from and --resume both give the starting weights; pass one of them");
    init = load_model_source(o_.init_from, o_.allow_nonfinite);
    init_what_ = init.what;
  }
  cfg_ = resolve_config(o_, resume_dir, init.load_weights ? &init : nullptr);
  // --data X_train.bin without --val-data: X_val.bin beside it (lmforge prepare writes both)
  if (o_.val_data.empty() && !o_.data.empty()) {
    std::vector<std::string> found;
    const std::string suffix = "_train.bin";
    for (const std::string& d : o_.data) {
      if (d.size() <= suffix.size() || d.compare(d.size() - suffix.size(), suffix.size(), suffix) != 0) break;
      const std::string v = d.substr(0, d.size() - suffix.size()) + "_val.bin";
      std::error_code ec;
      if (!fs::is_regular_file(v, ec)) break;
      found.push_back(v);
    }
    if (found.size() == o_.data.size()) {
      o_.val_data = found;
      val_found_beside_ = true;
    }
  }

  // --- plan and model: every flag of the plan is parsed and checked by plan_from_flags ----------
  const int64_t T = o_.seq_len == 0 ? cfg_.context_length : o_.seq_len;
  if (o_.batch_size > INT32_MAX / std::max<int64_t>(T, 1))
    fail("--batch-size=", o_.batch_size, " x --seq-len=", T, " tokens per micro-batch exceed ", INT32_MAX);
  const ModelPlan plan = plan_from_flags(cfg_, {o_.device, o_.precision, o_.attention, o_.batch_invariant, o_.recompute}, o_.batch_size, T,
                                         true);
  device_ = plan.device;
  if (device_ == Device::cuda) monitor_ = std::make_unique<GpuMonitor>(0);
  if (!dist_) dp_comm_ = tp_comm_ = &single_rank();  // (ZeRO-1 in one process: one slice, the identity)
  const ModelConfig local =
      tp_size_ > 1 ? tp_local_config(cfg_, static_cast<int>(tp_size_), static_cast<int>(tp_rank_)) : cfg_;
  int64_t m_begin = -1, m_end = -1;
  if (o_.zero == 1) {  // ZeRO-1: this data-parallel rank's slice of the flat parameter arena
    zero_ = true;
    const int64_t n = static_cast<int64_t>(arena_plan_bytes(gpt_param_specs(local), "params") / sizeof(float));
    zero_S_ = (n + dp_ - 1) / dp_;
    zero_lo_ = std::min(n, dp_rank_ * zero_S_);
    zero_hi_ = std::min(n, zero_lo_ + zero_S_);
    if (zero_hi_ <= zero_lo_)
      fail("--zero=1: ", dp_, " data-parallel ranks for ", n, " parameter elements leave rank ", dp_rank_, " none");
    m_begin = zero_lo_;
    m_end = zero_hi_;
    zero_buf_ = Arena("zero", {{"gather", {dp_ * zero_S_}}, {"grad slice", {zero_S_}}, {"param slice", {zero_S_}}});
  }
  if (tp_size_ > 1) {  // this rank's share of the model, and the full model for checkpoints
    gpt_ = std::make_unique<Gpt>(local, plan, tp_comm_, m_begin, m_end, o_.sequence_parallel);
    full_params_ = std::make_unique<Parameters>(gpt_param_specs(cfg_), Device::cpu, false);
    full_state_ = std::make_unique<TrainingState>(*full_params_, std::vector<std::string>{});
    tp_ = std::make_unique<TensorParallel>(cfg_, gpt_param_specs(cfg_), gpt_param_specs(local),
                                           static_cast<int>(tp_size_), static_cast<int>(tp_rank_), o_.sequence_parallel);
  } else {
    gpt_ = std::make_unique<Gpt>(cfg_, plan, nullptr, m_begin, m_end);
  }
  plan_buffers(T);
  if (dist_ && !zero_ && o_.grad_bucket_mb > 0) {  // (one bucket a layer at most, and the rest)
    buckets_ = std::make_unique<GradBuckets>(gpt_->state->grads().flat_f32(), *dp_comm_,
                                             static_cast<int64_t>(o_.grad_bucket_mb * 1e6 / sizeof(float)),
                                             cfg_.n_layer + 1);
    attach_grad_buckets(gpt_->model, *buckets_);  // once: a step allocates nothing
  }
  if (o_.cuda_graph == "on" && device_ != Device::cuda) fail("--cuda-graph=on needs the GPU (--device cuda)");
  if (o_.cuda_graph == "on" && o_.grad_accum != 1)
    fail("--cuda-graph=on captures one micro-batch per step: it needs --grad-accum 1 (got ", o_.grad_accum, ")");
  use_graph_ = o_.cuda_graph != "off" && device_ == Device::cuda && o_.grad_accum == 1;
  tune_gemms_ = o_.gemm_tune == "on" && device_ == Device::cuda && plan.bf16();
  open_data(T);

  // --- weights: checkpoint or fresh --------------------------------------------------------------
  // tensor parallelism: the full model is loaded or initialised, then each rank takes its share
  // (ZeRO-1: the whole moments first, then this rank's slice of them)
  Parameters& weights = full_params_ ? *full_params_ : gpt_->params;
  std::unique_ptr<TrainingState> whole;
  if (zero_ && !full_state_) whole = std::make_unique<TrainingState>(gpt_->params, std::vector<std::string>{});
  TrainingState& opt_state = full_state_ ? *full_state_ : whole ? *whole : *gpt_->state;
  if (!resume_dir.empty()) {
    CheckpointState st = load_checkpoint(resume_dir, weights, opt_state, o_.allow_nonfinite);
    assets_ = load_checkpoint_assets(resume_dir);
    // a flag that changes what the run computes is refused unless --allow-change (one rule, here)
    if (!st.options_json.empty() && !o_.allow_change) {
      const json was = json::parse(st.options_json), now = json::parse(o_.to_json());
      for (const char* key : kMeaningKeys) {
        if (!was.contains(key) || was.at(key) == now.at(key)) continue;
        if (std::string(key) == "batch_size") {  // data parallelism: the global batch is what must not change
          const int64_t was_global = was.at(key).get<int64_t>() * was.value("dp", int64_t{1});
          if (was_global == o_.batch_size * dp_) continue;
          fail("--batch-size=", o_.batch_size, " x ", dp_, " rank(s) = a global batch of ", o_.batch_size * dp_,
               " differs from the run being resumed (", was_global, " in ",
               (fs::path(resume_dir) / "state.json").string(), "); pass -B ", was_global / dp_,
               " or --allow-change");
        }
        std::string flag = std::string("--") + key;
        std::replace(flag.begin(), flag.end(), '_', '-');
        fail(flag, "=", now.at(key).dump(), " differs from the run being resumed (", was.at(key).dump(), " in ",
             (fs::path(resume_dir) / "state.json").string(), "); pass --allow-change to change it");
      }
    }
    step_ = first_step_ = st.step;
    train_->set_position(st.data_position);
    if (st.seed != o_.seed && !o_.allow_change)
      fail("--seed=", o_.seed, " differs from the checkpoint's seed ", st.seed, " (", resume_dir, ")");
    if (step_ >= o_.steps)
      fail("checkpoint ", resume_dir, " is at step ", step_, ", the run's last (--steps=", o_.steps,
           "); pass --steps N with N > ", step_, " to continue it");
  } else if (init.load_weights) {
    init.load_weights(weights);
    assets_ = std::move(init.assets);
  } else {
    weights.init_gpt2(o_.seed, cfg_.n_layer, cfg_.vocab_size);
  }
  if (tp_) {
    tp_->scatter(full_params_->master(), gpt_->params.master());
    if (zero_) whole = std::make_unique<TrainingState>(gpt_->params, std::vector<std::string>{});
    TrainingState& share = zero_ ? *whole : *gpt_->state;
    tp_->scatter(full_state_->adam_m(), share.adam_m());
    tp_->scatter(full_state_->adam_v(), share.adam_v());
    gpt_->params.sync_copy();
  }
  if (zero_) {
    const size_t bytes = static_cast<size_t>(zero_hi_ - zero_lo_) * sizeof(float);
    std::memcpy(gpt_->state->adam_m().flat_f32().f32(), whole->adam_m().flat_f32().f32() + zero_lo_, bytes);
    std::memcpy(gpt_->state->adam_v().flat_f32().f32(), whole->adam_v().flat_f32().f32() + zero_lo_, bytes);
  }
  {  // the guard counts steps from the first this Trainer runs
    const int32_t g[2] = {static_cast<int32_t>(first_step_), 0};
    tensor_from_host(guard_, g);
  }
  if (o_.profile && first_step_ + o_.profile_warmup >= o_.steps)
    fail("--profile: --steps=", o_.steps, " leaves no step after the ", o_.profile_warmup, " warm-up steps from step ",
         first_step_);
  tokens_per_step_ = static_cast<double>(o_.batch_size * T * o_.grad_accum * dp_);  // every rank's
  flops_per_token_ = gpt_train_flops_per_token(cfg_, T);

  // Pinned staging for the GPU uploads, last among the set-up steps that can throw, so a failed
  // set-up leaks nothing (the destructor does not run when the constructor throws).
  if (device_ == Device::cuda) {
    const size_t bytes = tokens_host_.nbytes() + targets_host_.nbytes() + 4 * sizeof(float);  // inputs, targets, schedule
    for (void*& p : staging_) p = host_alloc_pinned(bytes, "batch staging");
    staging_events_ = cuda_event_pool_create(2);
  }

  // every rank must run the same model on the same data with the same flags (its slice of the batch
  // aside): compared with rank 0's before the first collective of a step
  if (dist_) {
    std::string fp = "config " + config_to_json(cfg_) + "\n";
    json opts = json::parse(o_.to_json());
    // float flags (f32) in their shortest form that reads back to the same f32: --lr=0.001
    auto f32_text = [](double v) {
      for (int digits = 1; digits < 9; ++digits) {
        const std::string t = fmt(("%." + std::to_string(digits) + "g").c_str(), v);
        if (static_cast<float>(std::strtod(t.c_str(), nullptr)) == static_cast<float>(v)) return t;
      }
      return fmt("%.9g", v);
    };
    for (auto it = opts.begin(); it != opts.end(); ++it)
      fp += "--" + it.key() + "=" +
            (it.value().is_number_float() ? f32_text(it.value().get<double>()) : it.value().dump()) + "\n";
    fp += "data " + train_->description() + " (" + std::to_string(train_->total_points()) + " points)\n";
    fp += "starting step " + std::to_string(first_step_) + "\n";
    dist_->agree("run (config, flags, data)", fp);
  }

  // --- only now touch the output directory (rank 0 of a distributed run) ----------------------
  if (writer_) {
    prepare_out_dir(resume_dir);
    fs::path mpath = fs::path(o_.out_dir) / "metrics.jsonl";
    metrics_.open(mpath, std::ios::app);
    if (!metrics_) fail(mpath.string(), ": cannot open metrics file for writing");
  }
  log_setup(T, resume_dir);
}

// The out-dir for this run, under its lock: a new run never replaces another one's files unless
// --overwrite; a resumed run's later records and checkpoints (a continuation it abandons) move aside;
// leftovers of interrupted saves go.
void Trainer::prepare_out_dir(const std::string& resume_dir) {
  fs::create_directories(o_.out_dir);
  lock_ = DirLock(o_.out_dir);
  const fs::path out(o_.out_dir);
  const bool same_run = !resume_dir.empty() && same_dir(run_dir_of(resume_dir), o_.out_dir);
  std::error_code ec;
  const bool has_run = fs::exists(out / "metrics.jsonl", ec) || fs::exists(out / "checkpoints", ec);
  if (has_run && !same_run) {
    if (!o_.overwrite)
      fail(o_.out_dir, ": out-dir already holds a run (metrics.jsonl, checkpoints/); continue it with --resume ",
           o_.out_dir, ", choose another --out-dir, or pass --overwrite to replace it");
    for (const char* f : {"metrics.jsonl", "checkpoints", "trace.json"}) fs::remove_all(out / f);
    log_ << "out-dir " << o_.out_dir << ": replaced the previous run (--overwrite)\n";
  }
  lock_.write_pid();
  const int cleaned = clean_interrupted_saves(o_.out_dir);
  if (cleaned > 0) log_ << "out-dir " << o_.out_dir << ": removed " << cleaned << " leftovers of interrupted saves\n";
  if (same_run) move_aside_after(first_step_, resume_dir);
}

void Trainer::move_aside_after(int64_t step, const std::string& resume_dir) {
  const fs::path out(o_.out_dir), mpath = out / "metrics.jsonl";
  std::string kept, later;
  std::error_code ec;
  if (fs::exists(mpath, ec)) {
    std::istringstream in(read_file(mpath.string(), "metrics file"));
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      int64_t s = INT64_MAX;  // a line that does not parse (a write torn by a crash) goes aside too
      try {
        const json j = json_parse(line, "metrics record");
        if (j.contains("step") && j.at("step").is_number_integer()) s = j.at("step").get<int64_t>();
      } catch (const Error&) {
      }
      (s > step ? later : kept) += line + "\n";
    }
  }
  std::vector<std::string> ckpts;
  for (const std::string& c : list_checkpoints(o_.out_dir))
    if (checkpoint_step(c) > step) ckpts.push_back(c);
  if (later.empty() && ckpts.empty()) return;
  char stamp[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(stamp, sizeof(stamp), "%Y%m%d-%H%M%S", std::gmtime(&now));
  fs::path aside = out / "superseded" / (std::string("after-step-") + std::to_string(step) + "-" + stamp);
  for (int n = 2; fs::exists(aside, ec); ++n)
    aside = out / "superseded" / (std::string("after-step-") + std::to_string(step) + "-" + stamp + "-" + std::to_string(n));
  fs::create_directories(aside / "checkpoints");
  if (!later.empty()) {
    write_file_atomic((aside / "metrics.jsonl").string(), later);
    write_file_atomic(mpath.string(), kept);
  }
  const fs::path root = out / "checkpoints";
  if (!ckpts.empty()) {
    // `latest` first points at the resumed checkpoint, so it never names a moved one
    write_file_atomic((root / "latest").string(), fs::path(resume_dir).lexically_normal().filename().string() + "\n");
    for (const std::string& c : ckpts) rename_path((root / c).string(), (aside / "checkpoints" / c).string());
    fsync_dir(root.string());
  }
  log_ << "out-dir " << o_.out_dir << ": resuming at step " << step << " moved what came after it ("
       << std::count(later.begin(), later.end(), '\n') << " metrics records, " << ckpts.size() << " checkpoints) to "
       << aside.string() << "\n";
}

// The batch on the host and on the model's device, the grad norm, the graph mode's slots, the losses.
void Trainer::plan_buffers(int64_t T) {
  // the inputs and targets as the model's ends take them: tokens (B, T) i32 for a language model,
  // values (B, T, 1) and futures (B, T, H) f32 for a forecaster
  const ModelPlan& plan = gpt_->model.plan();
  TensorSpec in = gpt_->model.ends().input_spec(plan), tg = gpt_->model.ends().target_spec(plan);
  LMF_CHECK(in.shape[0] == o_.batch_size && in.shape[1] == T, "the ends' input spec disagrees with the plan");
  in.name = "tokens";
  tg.name = "targets";
  batch_host_ = Arena("batch (host)", {in, tg});
  batch_ = Arena("batch", {in, tg,
                           {"grad_norm", {1}, DType::f32},
                           {"schedule", {3}, DType::f32},
                           {"cur_loss", {1}, DType::f32}}, device_);
  tokens_host_ = batch_host_.get("tokens");
  targets_host_ = batch_host_.get("targets");
  stats_ = Arena("training stats", {{"step_losses", {o_.steps}}, {"eval_loss", {1}}, {"guard", {2}, DType::i32},
                                    {"dist_flags", {2}}},
                 device_);
  step_losses_ = stats_.get("step_losses");
  eval_loss_ = stats_.get("eval_loss");
  guard_ = stats_.get("guard");
  tokens_ = batch_.get("tokens");
  targets_ = batch_.get("targets");
  norm_ = batch_.get("grad_norm");
  schedule_ = batch_.get("schedule");
  cur_loss_ = batch_.get("cur_loss");
}

void Trainer::open_data(int64_t T) {
  if (cfg_.family == ModelFamily::timeseries) {
    if (!o_.val_data.empty()) fail("--val-data: a time-series run validates on its files' validation rows");
    SeriesRunData d = load_series_run_data(o_.data, T, cfg_.ts.max_horizon(), o_.seed);
    series_note_ = d.note;
    train_ = std::make_unique<SeriesLoader>(std::move(d.train), o_.batch_size, T, cfg_.ts.max_horizon(), o_.seed);
    if (SeriesLoader::count_windows(d.val, T, cfg_.ts.max_horizon()) > 0)
      val_ = std::make_unique<SeriesLoader>(std::move(d.val), o_.batch_size, T, cfg_.ts.max_horizon(), o_.seed + 1);
    else if (!d.val.series.empty())
      series_note_ += "; no validation: the validation rows hold no window of -T + the longest horizon";
    finish_open_data();
    return;
  }
  if (o_.data.empty()) {
    train_ = std::make_unique<DataLoader>(bundled_tokens(false), "bundled corpus (train)", o_.batch_size, T, o_.seed,
                                          cfg_.vocab_size);
    if (o_.val_data.empty())
      val_ = std::make_unique<DataLoader>(bundled_tokens(true), "bundled corpus (val)", o_.batch_size, T,
                                          o_.seed + 1, cfg_.vocab_size);
  } else {
    train_ = std::make_unique<DataLoader>(o_.data, o_.batch_size, T, o_.seed, cfg_.vocab_size);
  }
  if (!o_.val_data.empty())
    val_ = std::make_unique<DataLoader>(o_.val_data, o_.batch_size, T, o_.seed + 1, cfg_.vocab_size);
  finish_open_data();
}

// Data parallelism: each rank reads its rows of the global batch (dp x --batch-size), so the ranks
// together read exactly what one process with the whole batch would; validation too (each rank adds
// its share of the mean loss).
void Trainer::finish_open_data() {
  if (dp_ == 1) return;
  train_->set_slice(dp_rank_, dp_);
  if (val_) val_->set_slice(dp_rank_, dp_);
}

size_t Trainer::arena_bytes() const {
  return gpt_->params.bytes() + gpt_->state->bytes() + gpt_->model.arena_bytes();
}

void Trainer::log_setup(int64_t T, const std::string& resume_dir) {
  const ModelPlan& plan = gpt_->model.plan();
  const int64_t total = gpt_param_count(cfg_), active = gpt_active_param_count(cfg_);
  log_ << "params total=" << human_count(total) << " active=" << human_count(active) << " ("
       << with_commas(static_cast<double>(total)) << " / " << with_commas(static_cast<double>(active)) << ")\n";
  if (cfg_.moe.experts > 0) {
    int moe_layers = 0;
    for (int l = 0; l < cfg_.n_layer; ++l) moe_layers += cfg_.is_moe_layer(l) ? 1 : 0;
    const MoeModelConfig& m = cfg_.moe;
    log_ << "moe layers=" << moe_layers << "/" << cfg_.n_layer << " experts=" << m.experts << " top_k=" << m.top_k
         << " d_expert=" << cfg_.d_expert() << " shared=" << m.shared << " score=" << (m.sigmoid ? "sigmoid" : "softmax")
         << " capacity_factor=" << fmt("%g", m.capacity_factor) << " aux_coef=" << fmt("%g", m.aux_coef)
         << " z_coef=" << fmt("%g", m.z_coef) << " bias_rate=" << fmt("%g", m.bias_rate)
         << (plan.batch_invariant && m.capacity_factor > 0 ? " (capacity not applied: batch-invariant runs dropless)" : "")
         << "\n";
  }
  if (plan.batch_invariant)
    log_ << "numerics batch-invariant: each row's forward independent of its batch (GEMMs: one algorithm per weight "
            "shape, no split-K; attention: lmforge's flash kernels, whose forward step serving runs; MoE dropless)\n";
  if (plan.recompute != Recompute::none)
    log_ << "recompute " << recompute_name(plan.recompute) << ": the backward recomputes "
         << (plan.recompute == Recompute::full ? "each layer's forward" : "each layer's qkv and attention")
         << " instead of keeping it (the same bits, less memory)\n";
  if (device_ == Device::cuda) {
    peak_tflops_ = o_.mfu_peak_tflops > 0 ? o_.mfu_peak_tflops : gpu_peak_tflops(cuda_limits().name);
    const bool cudnn = plan.bf16() && plan.attention == FlashKernels::cudnn;
    log_ << "device model=" << cuda_limits().name << " precision=" << precision_name(plan.precision)
         << (plan.bf16() ? std::string(" attention=") + flash_kernels_name(plan.attention) : std::string())
         << (cudnn ? " cudnn=" + cudnn_version_text() : std::string()) << " mfu_peak_tflops="
         << (peak_tflops_ > 0 ? fmt("%.0f", peak_tflops_) : std::string("unknown (set --mfu-peak-tflops)"))
         << " utilization=" << monitor_->status() << " cuda_graph=" << (use_graph_ ? "on" : "off") << "\n";
  } else {
    log_ << "device cpu threads=" << omp_get_max_threads() << " precision=fp32\n";
  }
  std::string reads = " vocab=" + std::to_string(cfg_.vocab_size) + " (padded " + std::to_string(cfg_.padded_vocab()) + ")";
  if (cfg_.family == ModelFamily::timeseries) {
    reads = " family=timeseries horizons=";
    for (size_t i = 0; i < cfg_.ts.horizons.size(); ++i) reads += (i ? "," : "") + std::to_string(cfg_.ts.horizons[i]);
    reads += " huber_delta=" + fmt("%g", cfg_.ts.huber_delta);
  }
  log_ << "model layers=" << cfg_.n_layer << " d_model=" << cfg_.d_model << " heads=" << cfg_.n_head << "/"
       << cfg_.n_kv_head << reads
       << " norm=" << (cfg_.norm == NormKind::layernorm ? "layernorm" : "rmsnorm")
       << " act=" << (cfg_.activation == ActivationKind::gelu ? "gelu" : "swiglu")
       << " pos=" << (cfg_.positions == PositionKind::learned ? "learned" : "rope") << "\n";
  const char* unit = cfg_.family == ModelFamily::timeseries ? "points" : "tokens";
  log_ << "data train=" << train_->description() << " (" << with_commas(static_cast<double>(train_->total_points()))
       << " " << unit << ") val=" << (val_ ? val_->description() : std::string("none"))
       << (val_found_beside_ ? " (found beside the training shards)" : "") << "\n";
  if (dist_)
    log_ << "dist " << dist_->world_size() << " ranks (" << dist_->env().launcher << ", rendezvous "
         << dist_->env().master_addr << ":" << dist_->env().master_port << "): data parallel dp=" << dp_
         << " x tensor parallel tp=" << tp_size_ << (o_.sequence_parallel ? " (sequence parallel)" : "") << " over "
         << dist_->comm().backend()
         << (zero_ ? "; ZeRO-1: AdamW's moments of " + with_commas(static_cast<double>(zero_hi_ - zero_lo_)) +
                         " parameter elements a rank"
                   : std::string())
         << (buckets_ ? "; gradients all-reduced during the backward in buckets of >= " +
                            fmt("%g", o_.grad_bucket_mb) + " MB"
                      : std::string())
         << "; rank 0 writes " << o_.out_dir << "\n";
  log_ << "batch B=" << o_.batch_size << (dp_ > 1 ? " per rank" : "") << " T=" << T << " grad_accum=" << o_.grad_accum
       << (cfg_.family == ModelFamily::timeseries ? " points/step=" : " tokens/step=") << with_commas(tokens_per_step_)
       << " arenas=" << fmt("%.1f", arena_bytes() / 1048576.0)
       << " MiB\n";
  if (!series_note_.empty()) log_ << "data " << series_note_ << "\n";
  if (!resume_dir.empty()) log_ << "resumed from " << resume_dir << " at step " << step_ << "\n";
  if (!init_what_.empty()) log_ << "initialised from " << init_what_ << "\n";
  log_.flush();
}

Trainer::~Trainer() {
  if (device_ != Device::cuda) return;
  try {
    device_synchronize();  // pinned staging may still be read by an upload
  } catch (const Error&) {
    // a sticky CUDA error is reported by whoever saw it first; a destructor must not throw
  }
  cuda_graph_destroy(graph_);
  for (void* g : eval_graphs_) cuda_graph_destroy(g);
  for (void* p : staging_) host_free_pinned(p);
  cuda_event_pool_destroy(staging_events_);
}

double Trainer::last_grad_norm() const {
  float n = 0;
  tensor_to_host(&n, norm_);
  return n;
}

void Trainer::stage_from(BatchSource& loader, bool with_schedule) {
  // data_ms: the host time the training loader takes to produce a batch (not the wait for a free
  // staging buffer below, which is the GPU running ahead).
  auto next = [&](void* tok, void* tgt) {
    const auto t0 = std::chrono::steady_clock::now();
    loader.next(tok, tgt);
    if (&loader == train_.get())
      data_ms_acc_ += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };
  if (device_ == Device::cpu) {
    next(tokens_host_.data, targets_host_.data);
    return;
  }
  const int j = staging_turn_;
  staging_turn_ ^= 1;
  if (staging_used_[j]) cuda_event_wait(staging_events_[j]);  // its last upload is long done
  char* buf = static_cast<char*>(staging_[j]);
  const size_t n_in = tokens_.nbytes(), n_tg = targets_.nbytes();  // multiples of 4: i32 or f32 elements
  next(buf, buf + n_in);
  copy_to_device_async(tokens_.data, buf, n_in);
  copy_to_device_async(targets_.data, buf + n_in, n_tg);
  if (with_schedule) {  // graph mode: this step's lr and bias corrections, behind the batch
    float* sched = reinterpret_cast<float*>(buf + n_in + n_tg);
    adamw_schedule(sched, static_cast<float>(lr_at_step(o_, step_)), o_.beta1, o_.beta2, step_ + 1);
    copy_to_device_async(schedule_.data, sched, schedule_.nbytes());
  }
  cuda_event_record(staging_events_[j]);
  staging_used_[j] = true;
}

void Trainer::stage_batch() { stage_from(*train_); }

void Trainer::compute_micro(int64_t micro) {
  LMF_CHECK(step_ < o_.steps, "step ", step_, " beyond --steps=", o_.steps);
  if (micro == 0) {
    ProfileScope scope(prof_, "zero grad");
    gpt_->state->zero_grad();
  }
  // each rank's share of the global mean: its micro-batch is 1 / (grad_accum x dp) of the step's rows
  const float scale = 1.0f / static_cast<float>(o_.grad_accum * dp_);
  const bool cpu = device_ == Device::cpu;
  // data parallelism: the last micro-batch's backward hands each finished part of the gradients to the
  // buckets, all-reduced while the backward goes on (finish_step waits for them)
  if (buckets_ && micro == o_.grad_accum - 1) buckets_->begin();
  gpt_->model.forward_backward_device(cpu ? tokens_host_ : tokens_, cpu ? targets_host_ : targets_, scale);
  ProfileScope scope(prof_, "loss mean");
  loss_mean(step_losses_.rows(step_, step_ + 1), gpt_->model.row_losses(), scale, micro > 0);
}

void Trainer::grad_norm_tp() {
  float share = static_cast<float>(tp_->grad_norm_sq_share(gpt_->state->grads()));
  Tensor t(&share, DType::f32, {1}, "grad norm share");
  tp_comm_->all_reduce_sum(t);
  const float norm = std::sqrt(share);
  tensor_from_host(norm_, &norm);
}

// ZeRO-1: the gradients reduce-scattered over the data-parallel ranks (each gets the sum of its slice),
// the norm summed from the slices, AdamW on this rank's slice with its moments, the parameters
// all-gathered back. The same arithmetic per element as the all-reduce path.
void Trainer::zero_optimizer_step() {
  const Tensor g = gpt_->state->grads().flat_f32(), p = gpt_->params.master().flat_f32();
  const Tensor buf = zero_buf_.get("gather"), gs = zero_buf_.get("grad slice"), ps = zero_buf_.get("param slice");
  const int64_t n = g.numel(), len = zero_hi_ - zero_lo_;
  std::memcpy(buf.f32(), g.f32(), static_cast<size_t>(n) * sizeof(float));
  std::fill(buf.f32() + n, buf.f32() + buf.numel(), 0.0f);
  dp_comm_->reduce_scatter_sum(gs, buf);
  dp_comm_->all_reduce_sum(step_losses_.rows(step_, step_ + 1));
  const float* gv = gs.f32();
  double sq = 0;
  if (tp_) {
    sq = tp_->grad_norm_sq_share(gpt_->state->grads(), gv, zero_lo_, zero_hi_);
  } else {
    for (int64_t i = 0; i < len; ++i) sq += static_cast<double>(gv[i]) * static_cast<double>(gv[i]);
  }
  float share = static_cast<float>(sq);
  const Tensor t(&share, DType::f32, {1}, "grad norm share");
  dp_comm_->all_reduce_sum(t);
  if (tp_) tp_comm_->all_reduce_sum(t);
  const float norm = std::sqrt(share);
  tensor_from_host(norm_, &norm);
  adamw_update_flat(p.rows(zero_lo_, zero_hi_), gpt_->state->adam_m().flat_f32(), gpt_->state->adam_v().flat_f32(),
                    gs.rows(0, len), gpt_->state->decay_ranges(), norm_, o_.grad_clip,
                    static_cast<float>(lr_at_step(o_, step_)), o_.beta1, o_.beta2, o_.adam_eps, o_.weight_decay,
                    step_ + 1);
  std::memcpy(ps.f32(), p.f32() + zero_lo_, static_cast<size_t>(len) * sizeof(float));
  std::fill(ps.f32() + len, ps.f32() + ps.numel(), 0.0f);
  dp_comm_->all_gather(buf, ps);
  std::memcpy(p.f32(), buf.f32(), static_cast<size_t>(n) * sizeof(float));
}

std::unique_ptr<TrainingState> Trainer::whole_moments() {
  auto whole = std::make_unique<TrainingState>(gpt_->params, std::vector<std::string>{});
  const Tensor buf = zero_buf_.get("gather"), ps = zero_buf_.get("param slice");
  const int64_t len = zero_hi_ - zero_lo_, n = whole->adam_m().flat_f32().numel();
  for (int k = 0; k < 2; ++k) {
    const Tensor mine = (k == 0 ? gpt_->state->adam_m() : gpt_->state->adam_v()).flat_f32();
    std::memcpy(ps.f32(), mine.f32(), static_cast<size_t>(len) * sizeof(float));
    std::fill(ps.f32() + len, ps.f32() + ps.numel(), 0.0f);
    dp_comm_->all_gather(buf, ps);
    std::memcpy((k == 0 ? whole->adam_m() : whole->adam_v()).flat_f32().f32(), buf.f32(),
                static_cast<size_t>(n) * sizeof(float));
  }
  return whole;
}

void Trainer::finish_step() {
  if (buckets_) {  // data parallelism: the rest of the gradients summed, and every bucket waited for
    ProfileScope scope(prof_, "gradient all-reduce (buckets: the rest, and the wait)");
    buckets_->finish();
  }
  if (tp_) {  // tensor parallelism: the router's and shared gates' partial gradients summed over the group
    ProfileScope scope(prof_, "partial gradient all-reduce (tp)");
    tp_->reduce_partial_grads(gpt_->state->grads(), *tp_comm_);
  }
  if (zero_) {
    ProfileScope scope(prof_, "ZeRO-1: reduce-scatter, AdamW on the slice, all-gather");
    zero_optimizer_step();
    nonfinite_guard(guard_, step_losses_.rows(step_, step_ + 1), norm_);
    step_++;
    return;
  }
  if (dist_) {  // data parallelism: the ranks' gradients and losses summed (each already scaled by 1 / dp)
    ProfileScope scope(prof_, "gradient all-reduce");
    if (!buckets_) dp_comm_->all_reduce_sum(gpt_->state->grads().flat_f32());
    dp_comm_->all_reduce_sum(step_losses_.rows(step_, step_ + 1));  // (the tensor-parallel ranks agree on it)
  }
  {
    ProfileScope scope(prof_, "grad norm + AdamW");
    if (tp_) grad_norm_tp();
    optimizer_step(gpt_->params, *gpt_->state, norm_, o_, lr_at_step(o_, step_), step_ + 1, Tensor(), tp_ != nullptr);
    nonfinite_guard(guard_, step_losses_.rows(step_, step_ + 1), norm_);
  }
  step_++;
}

void Trainer::step() {
  const bool tune = tune_gemms_ && step_ == first_step_;
  if (tune) tune_begin(gpt_->model);
  step_once();
  if (tune) tune_finish(gpt_->model, log_);
}

void Trainer::step_once() {
  if (use_graph_ && !force_eager_) {
    LMF_CHECK(step_ < o_.steps, "step ", step_, " beyond --steps=", o_.steps);
    stage_from(*train_, true);
    auto body = [&] {
      train_step_device(*gpt_, tokens_, targets_, norm_, cur_loss_, schedule_, o_, dist_ ? dp_comm_ : nullptr,
                        buckets_.get());
      nonfinite_guard(guard_, cur_loss_, norm_);
    };
    if (!graph_ && eager_graph_steps_ == 0) {
      body();  // warm-up, eagerly: GEMM plans and every launch's attributes settle outside the capture
      ++eager_graph_steps_;
    } else {
      if (!graph_) {
        cuda_capture_begin();
        body();
        graph_ = cuda_capture_end();
      }
      cuda_graph_replay(graph_);
    }
    device_copy(step_losses_.rows(step_, step_ + 1).data, cur_loss_.data, sizeof(float));
    step_++;
    return;
  }
  for (int64_t micro = 0; micro < o_.grad_accum; ++micro) {
    stage_batch();
    compute_micro(micro);
  }
  finish_step();
}

double Trainer::step_loss(int64_t s) const {
  LMF_CHECK(s >= first_step_ && s < step_, "step ", s, " has not run in this trainer (ran ", first_step_, "..",
            step_, ")");
  float v = 0;
  tensor_to_host(&v, step_losses_.rows(s, s + 1));
  return v;
}

std::vector<double> Trainer::losses() const {
  std::vector<float> v(static_cast<size_t>(step_ - first_step_));
  if (!v.empty()) tensor_to_host(v.data(), step_losses_.rows(first_step_, step_));
  return {v.begin(), v.end()};
}

double Trainer::evaluate() {
  if (!val_) return std::nan("");
  val_->set_position(0);  // the same fixed batches every evaluation
  const bool cpu = device_ == Device::cpu;
  // Graph mode: evaluation has its own two graphs (the first batch sets the mean, the others add to
  // it), captured at the second evaluation; the first runs eagerly and settles every plan.
  const bool graphs = use_graph_ && !force_eager_ && evals_ > 0;
  for (int64_t i = 0; i < o_.eval_batches; ++i) {
    stage_from(*val_);
    auto body = [&] {
      gpt_->model.forward_loss_device(cpu ? tokens_host_ : tokens_, cpu ? targets_host_ : targets_);
      loss_mean(eval_loss_, gpt_->model.row_losses(), 1.0f / static_cast<float>(o_.eval_batches * dp_), i > 0);
    };
    if (!graphs) {
      body();
      continue;
    }
    void*& g = eval_graphs_[i > 0 ? 1 : 0];
    if (!g) {
      cuda_capture_begin();
      body();
      g = cuda_capture_end();
    }
    cuda_graph_replay(g);
  }
  ++evals_;
  if (dist_) dp_comm_->all_reduce_sum(eval_loss_);  // the data-parallel ranks' shares of the mean
  float v = 0;
  tensor_to_host(&v, eval_loss_);
  return v;
}

std::string Trainer::save() {
  check_guard();  // never a checkpoint from a diverged state
  // ZeRO-1: the data-parallel ranks' slices of the moments put together (every rank takes part)
  const std::unique_ptr<TrainingState> whole = zero_ ? whole_moments() : nullptr;
  TrainingState& moments = whole ? *whole : *gpt_->state;
  if (tp_) {  // the full model, put together from the group's shares (every rank of the group takes part)
    tp_->gather(gpt_->params.master(), full_params_->master(), *tp_comm_);
    tp_->gather(moments.adam_m(), full_state_->adam_m(), *tp_comm_);
    tp_->gather(moments.adam_v(), full_state_->adam_v(), *tp_comm_);
  }
  if (!writer_) return "";  // rank 0 writes the run's one checkpoint (every rank holds the same weights)
  CheckpointState st{step_, o_.seed, train_->position(), o_.to_json()};
  return save_checkpoint(o_.out_dir, cfg_, full_params_ ? *full_params_ : gpt_->params,
                         full_state_ ? *full_state_ : moments, st, o_.keep_last, assets_);
}

void Trainer::check_guard() {
  int32_t g[2] = {0, 0};
  tensor_to_host(g, guard_);
  if (g[1] != 0)
    fail("step ", g[1], ": the loss or the gradient norm is not finite (the run diverged; try a lower --lr); "
         "stopped, no checkpoint written from step ", g[1], " on");
}

void Trainer::write_metric(const std::string& line) {
  if (!writer_) return;
  const std::string path = (fs::path(o_.out_dir) / "metrics.jsonl").string();
  fault_point(path.c_str());
  metrics_ << line << "\n";
  metrics_.flush();
  if (!metrics_) fail(path, ": write failed (disk full?); the run stops rather than lose its metrics");
  if (hooks_.on_metric) hooks_.on_metric(line);
}

void Trainer::log_step(double loss, double step_ms, int64_t steps) {
  const double lr = lr_at_step(o_, step_ - 1);
  const double tok_s = tokens_per_step_ / (step_ms / 1000.0);
  const double tflops = tok_s * flops_per_token_ / 1e12;
  if (progress_line_) { std::fprintf(stderr, "\r\033[K"); progress_line_ = false; }
  // MoE: loss = pred (cross-entropy) + aux (balance and z terms of the last step, all MoE layers)
  Model::MoeSummary moe;
  if (cfg_.moe.experts > 0) moe = gpt_->model.moe_summary();
  const double pred = loss;
  loss = pred + moe.aux;
  log_ << "step=" << step_ << " loss=" << fmt("%.4f", loss);
  if (cfg_.moe.experts > 0) log_ << " pred=" << fmt("%.4f", pred) << " aux=" << fmt("%.4f", moe.aux);
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start_).count();
  const double eta = step_ > first_step_ ? elapsed / static_cast<double>(step_ - first_step_) *
                                               static_cast<double>(o_.steps - step_) : 0.0;
  const bool ts = cfg_.family == ModelFamily::timeseries;  // a forecaster's tokens are time points
  log_ << " lr=" << fmt("%.2e", lr)
       << (ts ? " points/s=" : " toks/s=") << with_commas(tok_s) << " step_ms=" << fmt("%.1f", step_ms)
       << " grad_norm=" << fmt("%.3f", last_grad_norm()) << " tflops=" << fmt("%.3f", tflops)
       << " elapsed=" << duration_text(elapsed) << " eta=" << duration_text(eta);
  json j = {{"step", step_}, {"loss", loss}, {"lr", lr}, {"toks_per_s", tok_s}, {"step_ms", step_ms},
            {"grad_norm", last_grad_norm()}, {"tflops", tflops}, {"tokens", tokens_per_step_ * step_},
            {"time", unix_time()}, {"elapsed_s", elapsed}, {"eta_s", eta}};
  if (cfg_.moe.experts > 0) {
    // per-expert load: the least and most loaded expert's share of the routed assignments (ideal 1/E)
    const double drop_frac = moe.assignments > 0 ? static_cast<double>(moe.dropped) / moe.assignments : 0.0;
    log_ << " expert_load_min=" << fmt("%.3f", moe.load_min) << " expert_load_max=" << fmt("%.3f", moe.load_max)
         << " dropped=" << moe.dropped << " (" << fmt("%.2f", 100.0 * drop_frac) << "%)";
    j["pred"] = pred;
    j["aux"] = moe.aux;
    j["expert_load_min"] = moe.load_min;
    j["expert_load_max"] = moe.load_max;
    j["expert_loads"] = moe.loads;    // [MoE layer][expert] share of the layer's assignments
    j["aux_layers"] = moe.layer_aux;  // [MoE layer] its aux + z terms
    j["dropped"] = moe.dropped;
    j["dropped_frac"] = drop_frac;
  }
  // Where the time goes: host data time, device utilisation (NVML; n/a on the CPU or without the
  // driver) and kernel launches per step (lmforge's launcher count; a graph replay counts as one).
  const double data_ms = data_ms_acc_ / static_cast<double>(std::max<int64_t>(steps, 1));
  const GpuMonitor::Sample u = monitor_ ? monitor_->read() : GpuMonitor::Sample{};
  log_ << " data_ms=" << fmt("%.3f", data_ms) << " sm_util=" << format_util(u.sm_util)
       << " hbm_util=" << format_util(u.hbm_util) << " mem_ctrl_util=" << format_util(u.mem_ctrl_util);
  j["data_ms"] = data_ms;
  auto util = [](double v) { return v < 0 ? json(nullptr) : json(v); };
  j["sm_util"] = util(u.sm_util);
  j["hbm_util"] = util(u.hbm_util);
  j["mem_ctrl_util"] = util(u.mem_ctrl_util);
  if (device_ == Device::cuda) {
    const double launches = static_cast<double>(cuda_launch_count() - launches_mark_) /
                            static_cast<double>(std::max<int64_t>(steps, 1));
    log_ << " kernel_launches_per_step=" << fmt("%.0f", launches);
    j["kernel_launches_per_step"] = launches;
  } else {
    log_ << " kernel_launches_per_step=n/a";
    j["kernel_launches_per_step"] = nullptr;
  }
  data_ms_acc_ = 0;
  if (device_ == Device::cuda) {
    const double peak_gb = cuda_peak_allocated_bytes() / 1e9;
    if (peak_tflops_ > 0) {
      log_ << " mfu=" << fmt("%.3f", tflops / peak_tflops_);
      j["mfu"] = tflops / peak_tflops_;
    }
    log_ << " peak_vram_gb=" << fmt("%.2f", peak_gb);
    j["peak_vram_gb"] = peak_gb;
  }
  log_ << "\n";
  log_.flush();
  write_metric(j.dump());
}

void Trainer::write_profile(const OpProfiler& prof, double step_ms) {
  if (!writer_) return;
  TraceInfo info;
  info.device = device_ == Device::cuda ? cuda_limits().name : std::string("cpu");
  info.precision = precision_name(gpt_->model.plan().precision);
  info.first_step = prof.records().empty() ? 0 : step_ - prof.steps_collected() + 1;  // 1-based, as in the log
  info.allocated_gb = (device_ == Device::cuda ? static_cast<double>(cuda_peak_allocated_bytes())
                                               : static_cast<double>(arena_bytes())) / 1e9;
  info.step_ms = step_ms;
  // The only ceiling known here is the datasheet's dense bf16 peak (bf16 runs on the GPU);
  // bench/bench_train_step --profile measures both ceilings.
  if (device_ == Device::cuda && gpt_->model.plan().bf16()) info.ceilings.gemm_tflops = peak_tflops_;
  write_chrome_trace(o_.profile_out, prof.records(), info);
  if (progress_line_) { std::fprintf(stderr, "\r\033[K"); progress_line_ = false; }
  log_ << profile_summary(prof.records(), prof.steps_collected(), step_ms, info.ceilings);
  log_ << "trace " << o_.profile_out << " (steps " << info.first_step << ".." << step_
       << "; open in ui.perfetto.dev or chrome://tracing)\n";
  log_.flush();
}

void Trainer::run() {
  using clock = std::chrono::steady_clock;
  const bool tty = o_.progress && ::isatty(STDERR_FILENO);
  run_start_ = clock::now();
  auto do_eval = [&]() {
    if (!val_) return;
    const double vl = evaluate();
    if (!std::isfinite(vl)) {
      check_guard();  // a diverged training step is the likelier cause: name it
      fail("step ", step_, ": validation loss is ", vl, " (the run diverged; try a lower --lr)");
    }
    if (progress_line_) { std::fprintf(stderr, "\r\033[K"); progress_line_ = false; }
    log_ << "step=" << step_ << " val_loss=" << fmt("%.4f", vl) << "\n";
    log_.flush();
    write_metric(json({{"step", step_}, {"val_loss", vl}, {"time", unix_time()}}).dump());
  };
  if (step_ == 0 && o_.save_init) {  // --save-init: the initial weights, before any step
    const std::string dir = save();
    if (writer_) log_ << "initial weights " << dir << "\n";
  }
  if (step_ == 0) do_eval();  // the starting point of the validation curve
  // Step time is measured over each log interval: reading the loss at the interval's end waits
  // for the device, so the interval's wall time is the device time of its steps.
  auto t_interval = clock::now();
  int64_t steps_in_interval = 0;
  if (device_ == Device::cuda) launches_mark_ = cuda_launch_count();
  // --profile: steps [prof_begin, prof_end) run eagerly with a profiler attached; each is timed
  // from an idle device to its collect() (which waits for the device).
  const int64_t prof_begin = first_step_ + o_.profile_warmup;
  const int64_t prof_end = std::min(o_.steps, prof_begin + o_.profile_steps);
  std::unique_ptr<OpProfiler> prof;
  if (o_.profile && prof_begin < prof_end)
    prof = std::make_unique<OpProfiler>(device_, 4096, static_cast<size_t>(prof_end - prof_begin));
  struct Detach {  // never leave the model or step() pointing at the profiler, even on a throw
    Trainer* t;
    ~Detach() {
      t->gpt_->model.set_profiler(nullptr);
      t->prof_ = nullptr;
      t->force_eager_ = false;
    }
  } detach{this};
  double prof_ms = 0;
  while (step_ < o_.steps) {
    const bool profiled = prof && step_ >= prof_begin && step_ < prof_end;
    auto t_prof = clock::now();
    if (profiled) {
      device_synchronize();  // an idle stream, so the profiler's device anchor is exact
      prof_ = prof.get();
      gpt_->model.set_profiler(prof_);
      force_eager_ = true;  // never capture or replay a graph with profiler events
      t_prof = clock::now();
    }
    step();
    if (step_ == kill_at_step_) ::raise(SIGKILL);  // LMF_FAULT=kill-rank-R@S (tests)
    if (profiled) {
      prof->collect();
      prof_ms += std::chrono::duration<double, std::milli>(clock::now() - t_prof).count();
      gpt_->model.set_profiler(nullptr);
      prof_ = nullptr;
      force_eager_ = false;
    }
    steps_in_interval++;
    if (step_ % o_.log_every == 0 || step_ == o_.steps || step_ == 1) {
      const double loss = step_loss(step_ - 1);
      const double ms =
          std::chrono::duration<double, std::milli>(clock::now() - t_interval).count() / steps_in_interval;
      check_guard();
      log_step(loss, ms, steps_in_interval);
      t_interval = clock::now();
      steps_in_interval = 0;
      if (device_ == Device::cuda) launches_mark_ = cuda_launch_count();
    } else if (tty) {
      std::fprintf(stderr, "\r  step %lld/%lld", static_cast<long long>(step_), static_cast<long long>(o_.steps));
      std::fflush(stderr);
      progress_line_ = true;
    }
    bool paused = false;
    if ((o_.eval_every > 0 && step_ % o_.eval_every == 0) || step_ == o_.steps) {
      do_eval();
      paused = true;
    }
    bool stop = step_ < o_.steps && hooks_.stop_requested && hooks_.stop_requested();
    bool asked = hooks_.save_requested && hooks_.save_requested();
    if (dist_) {
      // a stop or save on any rank (a signal reaches each rank separately) is every rank's, at a step
      // they agree on: every step on the CPU; on the GPU at log intervals, where the loss read waits
      // for the device anyway (a request in between waits for the next one: the hooks keep saying so)
      const bool exchange = device_ == Device::cpu || step_ % o_.log_every == 0 || step_ == o_.steps;
      float f[2] = {stop ? 1.0f : 0.0f, asked ? 1.0f : 0.0f};
      if (exchange) {
        const Tensor flags = stats_.get("dist_flags");
        tensor_from_host(flags, f);
        dist_->comm().all_reduce_sum(flags);
        tensor_to_host(f, flags);
      }
      stop = exchange && f[0] > 0;
      asked = exchange && f[1] > 0;
    }
    if ((o_.checkpoint_every > 0 && step_ % o_.checkpoint_every == 0) ||
        (step_ == o_.steps && o_.save_final_checkpoint) || stop || asked) {
      std::string dir = save();
      log_ << "checkpoint " << dir << "\n";
      log_.flush();
      if (hooks_.on_saved) hooks_.on_saved(dir);
      paused = true;
    }
    if (stop) {
      if (progress_line_) { std::fprintf(stderr, "\r\033[K"); progress_line_ = false; }
      log_ << "stopped at step " << step_ << " of " << o_.steps << " (resume with --resume " << o_.out_dir << ")\n";
      log_.flush();
      stopped_early_ = true;
      break;
    }
    if (prof && step_ == prof_end) {
      write_profile(*prof, prof_ms / static_cast<double>(prof_end - prof_begin));
      prof.reset();
      paused = true;
    }
    if (paused) {  // evaluation, checkpoints and the profile's output are not step time
      device_synchronize();
      t_interval = clock::now();
      steps_in_interval = 0;
      data_ms_acc_ = 0;
      if (device_ == Device::cuda) launches_mark_ = cuda_launch_count();
    }
  }
  if (progress_line_) std::fprintf(stderr, "\r\033[K");
  check_guard();
  if (dist_) dist_->finish();  // a clean end: the other ranks do not take this rank's exit for a death
}

}  // namespace lmf
