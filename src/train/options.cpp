// options.cpp: range checks on TrainOptions (trainer.h train_options_problem).
#include <cmath>
#include <string>

#include "core/check.h"
#include "model/plan.h"
#include "train/trainer.h"

namespace lmf {

namespace {
constexpr int64_t kMaxSteps = int64_t{1} << 32;          // the run keeps one f32 loss per step (16 GiB at most)
constexpr int64_t kMaxGradAccum = int64_t{1} << 20;
constexpr int64_t kMaxEvalBatches = int64_t{1} << 20;
constexpr int64_t kMaxProfileSteps = 1000;
}  // namespace

std::string train_options_problem(const TrainOptions& o) {
  auto in_range = [](const char* flag, int64_t v, int64_t lo, int64_t hi) -> std::string {
    if (v >= lo && v <= hi) return "";
    return detail::concat(flag, "=", v, " must be in [", lo, ", ", hi, "]");
  };
  for (const std::string& p : {in_range("--batch-size", o.batch_size, 1, PlanLimits::B),
                               in_range("--seq-len", o.seq_len, 0, ConfigLimits::context_length),
                               in_range("--grad-accum", o.grad_accum, 1, kMaxGradAccum),
                               in_range("--steps", o.steps, 1, kMaxSteps),
                               in_range("--warmup", o.warmup, 0, kMaxSteps),
                               in_range("--log-every", o.log_every, 1, kMaxSteps),
                               in_range("--eval-every", o.eval_every, 0, kMaxSteps),
                               in_range("--eval-batches", o.eval_batches, 1, kMaxEvalBatches),
                               in_range("--checkpoint-every", o.checkpoint_every, 0, kMaxSteps),
                               in_range("--keep-last", o.keep_last, 0, kMaxSteps),
                               in_range("--profile-steps", o.profile_steps, 1, kMaxProfileSteps),
                               in_range("--profile-warmup", o.profile_warmup, 0, kMaxSteps)})
    if (!p.empty()) return p;
  auto finite = [](const char* flag, double v, bool ok, const char* rule) -> std::string {
    if (std::isfinite(v) && ok) return "";
    return detail::concat(flag, "=", v, " must be a finite number ", rule);
  };
  for (const std::string& p :
       {finite("--lr", o.lr, o.lr > 0, "> 0"),
        o.min_lr == -1.0f ? std::string() : finite("--min-lr", o.min_lr, o.min_lr >= 0, ">= 0"),
        finite("--weight-decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        finite("--grad-clip", o.grad_clip, o.grad_clip >= 0, ">= 0 (0 = off)"),
        finite("beta1", o.beta1, o.beta1 >= 0 && o.beta1 < 1, "in [0, 1)"),
        finite("beta2", o.beta2, o.beta2 >= 0 && o.beta2 < 1, "in [0, 1)"),
        finite("adam_eps", o.adam_eps, o.adam_eps > 0, "> 0"),
        finite("--mfu-peak-tflops", o.mfu_peak_tflops, o.mfu_peak_tflops >= 0, ">= 0 (0 = from the device table)"),
        finite("--grad-bucket-mb", o.grad_bucket_mb, o.grad_bucket_mb >= 0 && o.grad_bucket_mb <= 1e6,
               "in [0, 1e6] (0 = one all-reduce after the backward)")})
    if (!p.empty()) return p;
  return "";
}

}  // namespace lmf
