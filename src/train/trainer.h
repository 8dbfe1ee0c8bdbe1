// trainer.h: `lmforge train` as a library (the CLI parses flags into TrainOptions; tests drive the
// Trainer directly).
//
// Set-up (constructor): resolve the config, plan the model's arenas, open and validate the data,
// load a checkpoint when resuming, all before anything is written. Run: step() is one optimizer
// step (grad_accum micro-batches, global-norm clipping, AdamW); it allocates nothing and prints
// nothing. run() adds logging, evaluation and checkpoints at their intervals.
#pragma once
#include <cstdint>
#include <chrono>
#include <fstream>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "core/arena.h"
#include "core/fsutil.h"
#include "data/loader.h"
#include "model/gpt.h"
#include "train/checkpoint.h"

namespace lmf {

class GradBuckets;  // dist/grad_buckets.h

struct TrainOptions {
  std::string config_path;          // --config (JSON); else --preset
  std::string preset = "tiny";
  std::vector<std::string> data;    // shard paths/patterns; empty = bundled corpus
  std::vector<std::string> val_data;
  int64_t batch_size = 16;
  int64_t seq_len = 0;              // 0 = context_length
  int64_t grad_accum = 1;
  int64_t steps = 200;
  float lr = 3e-3f;
  float min_lr = -1.0f;             // -1: lr / 10
  int64_t warmup = 0;
  float weight_decay = 0.1f;
  float grad_clip = 1.0f;
  float beta1 = 0.9f, beta2 = 0.95f, adam_eps = 1e-8f;
  uint64_t seed = 1337;
  int64_t log_every = 10;
  int64_t eval_every = 0;           // 0 = only at the end
  int64_t eval_batches = 10;
  int64_t checkpoint_every = 0;     // 0 = only at the end
  int64_t keep_last = 0;            // --keep-last: checkpoints kept in out_dir (0 = all)
  std::string out_dir = "out";
  std::string resume;               // checkpoint dir or out-dir
  // --init-from: a fresh run (step 0, new optimizer state) from these weights and their model: a
  // checkpoint, an out-dir, a Hugging Face directory or a GGUF file (convert/import.h load_model_source)
  std::string init_from;
  bool overwrite = false;           // --overwrite: a new run may replace the run already in out_dir
  bool allow_change = false;        // --allow-change: on resume, the run's data/batch/optimizer may change
  bool allow_nonfinite = false;     // --allow-nonfinite: resume from a checkpoint holding NaN/Inf
  bool save_final_checkpoint = true;
  bool save_init = false;           // --save-init: also checkpoint the weights before the first step (step 0)
  bool progress = true;             // progress line on stderr when it is a terminal
  std::string device = "auto";      // cpu | cuda | auto (cuda when a GPU is present)
  std::string precision = "auto";   // auto (bf16 on a GPU, fp32 on the CPU) | fp32 | tf32 (GPU) | bf16 (GPU)
  std::string attention = "auto";   // bf16 flash attention kernels: auto (cudnn when available) | lmforge | cudnn
  std::string recompute = "none";   // activation recompute (model/plan.h Recompute): none | attention | full
  // --batch-invariant: training and evaluation forwards in batch-invariant plans (model/plan.h), bitwise
  // the batch-invariant sampler's for the same sequence (docs/BATCH_INVARIANCE.md)
  bool batch_invariant = false;
  double mfu_peak_tflops = 0;       // 0: the device's dense bf16 peak from a table (H100 SXM, H200: 989)
  std::string cuda_graph = "auto";  // auto (on for GPU runs with grad_accum 1) | on | off
  // Distributed runs (docs/DISTRIBUTED.md; the ranks come from the launcher's environment, dist/env.h):
  int64_t dp = 0;                   // --dp: data-parallel ranks (0: the world size / tp)
  int64_t tp = 1;                   // --tp: tensor-parallel ranks
  int64_t zero = 0;                 // --zero: 1 shards AdamW's moments over the data-parallel ranks (ZeRO-1)
  bool sequence_parallel = false;   // --sequence-parallel: with --tp, norms and residuals over N / tp rows
  int64_t dist_timeout = 60;        // --dist-timeout: seconds a rank waits for the others
  // --grad-bucket-mb: data parallelism all-reduces the gradients in buckets of at least this
  // many MB, each as soon as the backward has finished it (dist/grad_buckets.h); 0: one all-reduce
  // after the backward
  double grad_bucket_mb = 25;
  // --tune (alias --gemm-tune) on: after the first step, each bf16 GEMM and cuDNN attention plan takes the
  // fastest of its library's candidates that give the same bits as the current choice (ops/gemm_cuda.h
  // gemm_autotune, ops/attention.h cudnn_attention_autotune); off: the heuristics' choices
  std::string gemm_tune = "on";
  // --profile: steps [first + profile_warmup, + profile_steps) run eagerly (never as a CUDA graph)
  // with an OpProfiler attached; then a Chrome trace goes to profile_out (default
  // <out_dir>/trace.json) and a per-op summary to the log.
  bool profile = false;
  int64_t profile_steps = 3;
  int64_t profile_warmup = 2;
  std::string profile_out;

  // The run's settings as state.json records them (data paths absolute): every key below is a flag
  // of `lmforge train` with '-' as '_' ("batch_size" is --batch-size; "tune" is --tune).
  std::string to_json() const;
  // Sets every key present in `json` except those in `skip`; returns the keys set. A value of the wrong
  // type is an error naming `where` and the key ("state.json option 'lr' has the wrong type: ...").
  std::vector<std::string> apply_json(const std::string& json, const std::vector<std::string>& skip,
                                      const std::string& where = "state.json option");
};

// --resume: every setting the user did not give (`given`: to_json() keys of the flags on the command
// line) comes from the resumed checkpoint's state.json, and out_dir defaults to the run directory
// that holds the checkpoint. Returns the keys restored (the CLI logs them). The Trainer then refuses
// a given flag that changes the run's meaning unless allow_change.
std::vector<std::string> restore_run_options(TrainOptions& o, const std::vector<std::string>& given);

// One line naming the flag when an option is out of range ("" when all are fine): every count within
// its bound (--batch-size, --seq-len, --grad-accum, --steps, ... ; train/options.cpp), every float
// finite and in range (--lr, --min-lr, --weight-decay, --grad-clip, the AdamW betas and eps).
std::string train_options_problem(const TrainOptions& o);

// Global-norm clipping + AdamW over every parameter (weight decay on 2-D parameters only), as one
// optimizer step number `step` (1-based) at learning rate `lr`; bf16 plans' weight copy is rewritten
// in the same launch. `norm` is a (1) f32 buffer that receives the pre-clip gradient norm. Allocates
// nothing. schedule: optional device (3) f32 {lr, bias corrections} read by the AdamW kernel instead
// of lr and step (graph replays; see adamw_update_flat).
// norm_ready: `norm` already holds the norm (tensor parallelism sums it over the group's shares).
void optimizer_step(Parameters& params, TrainingState& state, Tensor norm, const TrainOptions& o, double lr,
                    int64_t step, Tensor schedule = Tensor(), bool norm_ready = false);

// The device work of one training step of one micro-batch, as `lmforge train` runs it (and captures it
// as one CUDA graph): zero_grad, forward + backward, the mean loss into loss (when defined), with data
// parallelism (comm) each rank's 1 / ranks share summed over the ranks (gradients and loss, in-stream
// NCCL all-reduces), clipping and AdamW with lr and bias corrections from `schedule`. No allocation,
// no host synchronisation.
// buckets (with comm; attached to gpt.model by attach_grad_buckets): the gradients all-reduced in
// buckets while the backward runs, on the buckets' side stream (dist/grad_buckets.h), joined before
// the optimizer; none: one all-reduce after it.
void train_step_device(Gpt& gpt, Tensor tokens, Tensor targets, Tensor norm, Tensor loss, Tensor schedule,
                       const TrainOptions& o, Communicator* comm = nullptr, GradBuckets* buckets = nullptr);

// From now on the model's backward hands each part of the gradients it finishes to the buckets
// (Model::set_grads_final_hook); they send it between their begin() and finish() and ignore it
// otherwise (the micro-batches before a step's last). Once, at set-up: the hook is not rebuilt per step.
void attach_grad_buckets(Model& model, GradBuckets& buckets);

// --tune: tune_begin() before the first step opens the GEMM and cuDNN-attention tuning windows of the
// model's plans (Model::op_plans); tune_finish() after it (between steps) tunes every plan called in
// them, keeps the results in the model's plans and logs one line per tuner. No-ops without CUDA.
void tune_begin(Model& model);
void tune_finish(Model& model, std::ostream& log);

// Dense bf16 peak TFLOP/s of a GPU by its name (0 when unknown).
double gpu_peak_tflops(const std::string& device_name);

// Learning rate at 0-based step s (docs/MODEL.md: linear warmup, then cosine to min_lr).
double lr_at_step(const TrainOptions& o, int64_t s);

class Trainer {
 public:
  Trainer(const TrainOptions& opts, std::ostream& log);
  ~Trainer();

  // One optimizer step: per micro-batch stage_batch() then compute_micro(), then finish_step().
  // On a GPU the step's mean loss stays in a device buffer until someone reads it (step_loss(), at
  // log intervals); the only host wait is stage_batch()'s, for an upload two batches old.
  // With CUDA graphs (--cuda-graph), the first step runs eagerly, the second is captured as one
  // graph, and every step from then on is one graph launch: what changes per step (the batch, the
  // learning rate and AdamW's bias corrections) is uploaded into fixed device buffers before it.
  // Profiled steps (run() with --profile) take the eager path; capture happens on the first graph
  // step after them, with no profiler attached.
  void step();
  bool uses_cuda_graph() const { return use_graph_; }
  // Next training batch: loader -> pinned staging buffer -> device, asynchronously (a staging
  // buffer is reused only after its previous upload has completed).
  void stage_batch();
  // Forward + backward of the staged batch, its mean loss into this step's slot. With
  // finish_step() this is the device work of a step: no allocation, no host synchronisation.
  void compute_micro(int64_t micro);
  // Global-norm clipping + AdamW; advances the step counter.
  void finish_step();
  // Mean training loss of finished step `s` (0-based); reads from the device.
  double step_loss(int64_t s) const;
  // Mean validation loss over eval_batches fixed batches (NaN without validation data).
  double evaluate();
  // Steps until opts.steps with logging, evaluation and checkpoints.
  void run();

  // For callers that watch or stop a run (the CLI's SIGINT/SIGTERM, the Python package's run handle,
  // which drives run() on another thread): on_metric receives every record written to metrics.jsonl
  // (one JSON object per line), after it is written. stop_requested is asked after every step: when
  // it says true, run() checkpoints that step (unless it just did), logs "stopped at step N" and
  // returns early; stopped_early() then says so. save_requested, asked at the same point, checkpoints
  // without stopping (on_saved receives the directory). Hooks run on run()'s thread.
  struct Hooks {
    std::function<void(const std::string& json_line)> on_metric;
    std::function<bool()> stop_requested;
    std::function<bool()> save_requested;
    std::function<void(const std::string& checkpoint_dir)> on_saved;
  };
  void set_hooks(Hooks h) { hooks_ = std::move(h); }
  bool stopped_early() const { return stopped_early_; }

  int64_t step_count() const { return step_; }
  const TrainOptions& options() const { return o_; }  // as resolved (resumed settings included)
  Model& model() { return gpt_->model; }
  Parameters& params() { return gpt_->params; }
  // Losses of the steps this Trainer ran (read from the device).
  std::vector<double> losses() const;
  double last_grad_norm() const;
  std::string save();

 private:
  void step_once();  // step() without the tuning around the first one
  void plan_buffers(int64_t T);
  void open_data(int64_t T);
  void finish_open_data();
  void log_setup(int64_t T, const std::string& resume_dir);
  size_t arena_bytes() const;  // the model's arenas: weights, training state, activations and workspace
  void log_step(double loss, double step_ms, int64_t steps);
  void write_metric(const std::string& json_line);
  void stage_from(BatchSource& loader, bool with_schedule = false);
  void write_profile(const class OpProfiler& prof, double step_ms);
  void check_guard();  // throws naming the first step whose loss or gradient norm was not finite
  void prepare_out_dir(const std::string& resume_dir);
  void move_aside_after(int64_t step, const std::string& resume_dir);

  TrainOptions o_;
  std::ostream& log_;
  ModelConfig cfg_;
  ModelAssets assets_;        // the model's tokenizer and chat template, saved with every checkpoint
  std::string init_what_;     // --init-from: what the weights came from (the log)
  std::unique_ptr<Gpt> gpt_;  // the weights, the training state and the model over them
  std::unique_ptr<BatchSource> train_, val_;  // token windows (text) or series windows (timeseries)
  std::unique_ptr<class DistRun> dist_;       // a distributed run's rendezvous and communicator, or none
  int64_t dp_ = 1, dp_rank_ = 0;              // data parallelism: ranks, and this one
  int64_t tp_size_ = 1, tp_rank_ = 0;         // tensor parallelism: ranks of a group, and this one
  // the mesh's groups (dist/run.h owns them): the ranks holding the same share of the model with
  // different data (gradients summed), and the ranks sharing one model (dist/tensor_parallel.h)
  Communicator* dp_comm_ = nullptr;
  Communicator* tp_comm_ = nullptr;
  std::unique_ptr<GradBuckets> buckets_;  // data parallelism's bucketed all-reduce (CPU), or none
  std::unique_ptr<class TensorParallel> tp_;   // tensor parallelism: this rank's share of the model
  // tensor parallelism: the full model's weights and AdamW state (CPU), which checkpoints read and
  // write and initialisation fills, put together from the shares when saving
  std::unique_ptr<Parameters> full_params_;
  std::unique_ptr<TrainingState> full_state_;
  void grad_norm_tp();  // tensor parallelism: the full model's gradient norm into norm_
  // ZeRO-1: this rank's slice [zero_lo_, zero_hi_) of the flat parameter arena (S elements a rank,
  // the last one shorter), the buffer the gradients are reduce-scattered from and the parameters
  // all-gathered into (dp x S), this rank's summed gradient slice and parameter staging (S)
  bool zero_ = false;
  int64_t zero_lo_ = 0, zero_hi_ = 0, zero_S_ = 0;
  Arena zero_buf_;
  void zero_optimizer_step();
  std::unique_ptr<TrainingState> whole_moments();  // ZeRO-1: m and v put together (a save)
  bool writer_ = true;                        // rank 0 writes the out-dir (metrics, checkpoints, trace)
  // Fault injection for the distributed tests: LMF_FAULT=kill-rank-R@S makes rank R SIGKILL itself
  // right after step S (core/fsutil.h has the other LMF_FAULT forms); -1: off.
  int64_t kill_at_step_ = -1;
  Device device_ = Device::cpu;
  Arena batch_host_;  // tokens, targets (B, T) i32 filled by the loader
  Arena batch_;       // the same on the model's device, plus the grad norm (1) f32
  Tensor tokens_host_, targets_host_, tokens_, targets_, norm_;  // the model's inputs and targets (ends' specs)
  Arena stats_;  // on the model's device: step_losses (steps), eval_loss (1), guard (2) i32
  Tensor step_losses_, eval_loss_, guard_;
  DirLock lock_;  // the out-dir's lock, held for the Trainer's life
  bool val_found_beside_ = false;  // val_data: the _val.bin shards beside the _train.bin ones
  std::chrono::steady_clock::time_point run_start_;
  void* staging_[2] = {nullptr, nullptr};  // pinned (GPU runs): tokens then targets, (2, B, T) i32
  std::vector<void*> staging_events_;
  bool staging_used_[2] = {false, false};
  int staging_turn_ = 0;
  double data_ms_acc_ = 0;          // host time in the train loader and staging since the last log
  uint64_t launches_mark_ = 0;       // cuda_launch_count() at the start of the log interval
  std::unique_ptr<class GpuMonitor> monitor_;  // NVML readings (GPU runs)
  bool use_graph_ = false;
  void* graph_ = nullptr;      // the captured step (graph mode)
  void* eval_graphs_[2] = {nullptr, nullptr};  // evaluation: first batch, later batches
  int64_t evals_ = 0;
  int64_t eager_graph_steps_ = 0;
  Tensor schedule_, cur_loss_;  // graph mode: {lr, bc1, bc2} and the step's loss, fixed device slots
  int64_t step_ = 0, first_step_ = 0;
  std::ofstream metrics_;
  double tokens_per_step_ = 0, flops_per_token_ = 0, peak_tflops_ = 0;
  bool progress_line_ = false;
  std::string series_note_;  // time-series runs: what the data loading found (log_setup says it)
  class OpProfiler* prof_ = nullptr;  // attached during profiled steps (run() with --profile)
  bool tune_gemms_ = false;           // --tune on, bf16 on the GPU: tune after the first step
  Hooks hooks_;
  bool stopped_early_ = false;
  bool force_eager_ = false;          // profiled steps: the eager path even in graph mode
};

}  // namespace lmf
