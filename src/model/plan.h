// plan.h: how a model runs, fixed before set-up (DESIGN.md sections 1 and 2).
//
// A ModelPlan is the run's shape and numeric mode: micro-batch B, sequence length T, training or
// not, device, precision, attention kernels. plan_from_flags() turns the CLI's strings into one and
// plan_validate() holds every rule about which combinations run (the one place they are checked;
// the messages name the flags). block_kernels() (model/block.h) turns a plan into the table of
// kernel choices the block step reads: chosen once at set-up, never inside a step.
#pragma once
#include <cstdint>
#include <string>

#include "core/tensor.h"
#include "model/config.h"
#include "ops/attention.h"

namespace lmf {

// Numeric mode of a run. fp32: everything fp32. tf32: as fp32, but GEMMs on the GPU's tensor cores
// with TF32 inputs (fp32 accumulation). bf16: mixed precision on the GPU (docs/MIXED_PRECISION.md):
// fp32 master weights, gradients and AdamW state; a bf16 weight copy for the GEMMs; bf16 activations;
// fp32 accumulation everywhere; flash attention.
enum class Precision { fp32, tf32, bf16 };
const char* precision_name(Precision p);
// "fp32" | "tf32" | "bf16"; anything else throws naming `flag` and the accepted values.
Precision parse_precision(const std::string& s, const char* flag);

// Bounds on a plan's sizes (every size computed from them fits int64; token indices fit int32).
// Activation recompute of training plans (--recompute): what the backward recomputes instead of keeping
// per layer. none: every layer keeps everything its backward reads. attention: the qkv projection, RoPE
// and attention (qkv, the attention's saved softmax state, its output) are one shared buffer, recomputed
// from the kept ln1 right before each layer's backward. full: each layer keeps only its norm1 output and
// its output (the residual stream); the whole block forward is rerun before its backward (the MoE layers'
// routing state stays per layer, their row buffers are shared). Recomputed values are bitwise the forward's
// (the kernels are deterministic), so every mode trains bitwise alike; they trade time for memory.
enum class Recompute { none, attention, full };
const char* recompute_name(Recompute r);
// "none" | "attention" | "full"; anything else throws naming `flag` and the accepted values.
Recompute parse_recompute(const std::string& s, const char* flag);

struct PlanLimits {
  static constexpr int64_t B = int64_t{1} << 24;          // micro-batch size
  static constexpr int64_t rows = int64_t{1} << 24;       // serving: rows per step
  static constexpr int64_t tokens = (int64_t{1} << 31) - 1;  // B * T
};

struct ModelPlan {
  int64_t B = 1;           // micro-batch size
  int64_t T = 1;           // sequence length (<= context_length)
  bool training = true;    // plan activation gradients (the caller owns a TrainingState)
  Device device = Device::cpu;            // where every arena lives
  Precision precision = Precision::fp32;  // tf32 and bf16 need device == cuda
  FlashKernels attention = FlashKernels::lmforge;  // bf16 plans: the flash attention kernels (attention.h)
  bool serve = false;      // serving (model/kv_cache.h): T rows of many sequences per step over a paged KV
                           // cache; B = 1, forward only; T may exceed context_length (rows, not positions)
  int64_t samples = 0;     // serving: rows whose next-token logits a step returns (1 <= samples <= T)
  // --batch-invariant (docs/BATCH_INVARIANCE.md): every forward kernel computes a row's result in an
  // order that depends on neither the batch's other rows, its size, the row's place in it, padding, nor
  // prefill vs decode; so training, evaluation and serving give a sequence bitwise the same numbers.
  // GEMMs take one algorithm per weight shape with no split-K (ops/gemm_cuda.h), attention lmforge's flash
  // kernels, whose forward step serving's paged attention runs too (paged_attention.h), MoE runs dropless.
  bool batch_invariant = false;
  Recompute recompute = Recompute::none;  // training plans only

  bool bf16() const { return precision == Precision::bf16; }
};

// The run's flags as the CLI and the benchmark take them.
struct PlanFlags {
  std::string device = "auto";     // auto (cuda when a GPU is visible) | cpu | cuda
  std::string precision = "auto";  // auto (bf16 on a GPU, fp32 on the CPU) | fp32 | tf32 | bf16
  std::string attention = "auto";  // auto (cudnn when it runs the shape) | lmforge | cudnn
  bool batch_invariant = false;    // --batch-invariant
  std::string recompute = "none";  // --recompute: none | attention | full (training plans)
};
// --device: "auto" (cuda when a GPU is visible) | "cpu" | "cuda" (errors name the flag).
Device parse_device(const std::string& s);
// Parses the flags (errors name the flag and the accepted values), resolves the autos, then
// plan_validate()s the result. Selects the CUDA device when the plan is on it.
ModelPlan plan_from_flags(const ModelConfig& c, const PlanFlags& f, int64_t B, int64_t T, bool training);
// Every rule about a plan: sizes, precision vs device, flash attention's head sizes and kernels,
// MoE on the GPU. Throws one line naming the flag (--precision, --attention, ...) and the values.
void plan_validate(const ModelConfig& c, const ModelPlan& p);
// Its first part, the config and the sizes (B, T, tokens), which the kernel choice's shape queries need.
void plan_validate_sizes(const ModelConfig& c, const ModelPlan& p);

}  // namespace lmf
