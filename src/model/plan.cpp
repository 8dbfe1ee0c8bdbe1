#include "model/plan.h"

#include "core/check.h"
#include "core/device.h"
#include "ops/paged_attention.h"

namespace lmf {

const char* recompute_name(Recompute r) {
  switch (r) {
    case Recompute::attention: return "attention";
    case Recompute::full: return "full";
    case Recompute::none: break;
  }
  return "none";
}

Recompute parse_recompute(const std::string& s, const char* flag) {
  if (s == "none") return Recompute::none;
  if (s == "attention") return Recompute::attention;
  if (s == "full") return Recompute::full;
  fail(flag, "=", s, " must be none, attention or full");
}

const char* precision_name(Precision p) {
  switch (p) {
    case Precision::fp32: return "fp32";
    case Precision::tf32: return "tf32";
    case Precision::bf16: return "bf16";
  }
  return "?";
}

Precision parse_precision(const std::string& s, const char* flag) {
  if (s == "fp32") return Precision::fp32;
  if (s == "tf32") return Precision::tf32;
  if (s == "bf16") return Precision::bf16;
  fail(flag, "=", s, " must be fp32, tf32 or bf16");
}

Device parse_device(const std::string& s) {
  if (s == "auto") return cuda_device_count() > 0 ? Device::cuda : Device::cpu;
  if (s == "cpu") return Device::cpu;
  if (s == "cuda") {
    if (!cuda_built()) fail("--device=cuda: lmforge was built without the CUDA backend");
    if (cuda_device_count() == 0) fail("--device=cuda: no CUDA device is visible");
    return Device::cuda;
  }
  fail("--device=", s, " must be cpu, cuda or auto");
}

ModelPlan plan_from_flags(const ModelConfig& c, const PlanFlags& f, int64_t B, int64_t T, bool training) {
  ModelPlan p;
  p.B = B;
  p.T = T;
  p.training = training;
  p.batch_invariant = f.batch_invariant;
  p.recompute = parse_recompute(f.recompute, "--recompute");
  p.device = parse_device(f.device);
  if (p.device == Device::cuda) cuda_set_device(0);
  p.precision = f.precision == "auto" ? (p.device == Device::cuda ? Precision::bf16 : Precision::fp32)
                                      : parse_precision(f.precision, "--precision");
  plan_validate_sizes(c, p);  // sizes first: the cuDNN shape query below sees only bounded ones
  p.attention = flash_kernels_from_flag(f.attention, p.bf16() && p.device == Device::cuda,
                                        {B, T, c.n_head, c.n_kv_head, c.head_size()}, "--attention",
                                        p.batch_invariant);
  plan_validate(c, p);
  return p;
}

void plan_validate_sizes(const ModelConfig& c, const ModelPlan& p) {
  c.validate("model config");
  if (p.B < 1 || p.B > PlanLimits::B) fail("--batch-size=", p.B, " must be in [1, ", PlanLimits::B, "]");
  if (p.T < 1 || (p.T > c.context_length && !p.serve))
    fail("--seq-len=", p.T, " must be in [1, context_length=", c.context_length, "]");
  if (p.serve && p.T > PlanLimits::rows) fail("serving plan: ", p.T, " rows per step, at most ", PlanLimits::rows);
  if (p.B * p.T > PlanLimits::tokens)  // B and T are bounded above: the product fits
    fail("--batch-size=", p.B, " x --seq-len=", p.T, " = ", p.B * p.T, " tokens per micro-batch, at most ",
         PlanLimits::tokens);
}

void plan_validate(const ModelConfig& c, const ModelPlan& p) {
  plan_validate_sizes(c, p);
  const bool gpu = p.device == Device::cuda;
  if (p.precision != Precision::fp32 && !gpu)
    fail("--precision=", precision_name(p.precision), " needs the GPU (--device cuda); the CPU computes in fp32");
  const int64_t HS = c.head_size();
  if (p.bf16() && p.serve && !paged_head_size_supported(HS, p.batch_invariant))
    fail("model config: head size d_model/n_head = ", HS, " is not run by serving's GPU paged attention",
         p.batch_invariant ? " under --batch-invariant (the lmforge flash forward's step: " : " (",
         paged_head_sizes_text(p.batch_invariant), ")");
  if (p.bf16() && !p.serve && !flash_head_size_supported(p.attention, HS))
    fail("model config: head size d_model/n_head = ", HS, " is not run by the ", flash_kernels_name(p.attention),
         " flash attention kernels (", flash_head_sizes_text(p.attention), ")",
         p.attention == FlashKernels::lmforge && !p.batch_invariant
             ? (cudnn_attention_available() ? "" : "; cuDNN's (--attention cudnn) run multiples of 8 up to 256, but "
                                                   "cuDNN is not available here")
             : "");
  if (p.batch_invariant && gpu && !p.bf16())
    fail("--batch-invariant on the GPU runs the bf16 kernels serving runs (--precision bf16, not ",
         precision_name(p.precision), ")");
  if (p.batch_invariant && p.bf16() && !p.serve && p.attention != FlashKernels::lmforge)
    fail("--attention=", flash_kernels_name(p.attention), ": --batch-invariant runs attention with lmforge's flash "
         "kernels (their forward is the step serving runs); use --attention lmforge or auto");
  if (p.attention == FlashKernels::cudnn && !(p.bf16() && gpu))
    fail("--attention=cudnn runs bf16 flash attention on the GPU; it needs --precision bf16 on --device cuda");
  if (p.attention == FlashKernels::cudnn && !cudnn_attention_available())
    fail("--attention=cudnn: cuDNN is not available (lmforge built without cuDNN, or no cuDNN >= 9 at run time); "
         "use --attention lmforge");
  if (p.recompute != Recompute::none && !p.training)
    fail("--recompute=", recompute_name(p.recompute), ": recompute saves the memory of training's backward; this "
         "plan runs the forward only");
  if (p.serve && (p.training || p.B != 1))
    fail("serving plans run the forward only, with B = 1 (rows of many sequences along T)");
  if (p.serve && (p.samples < 1 || p.samples > p.T))
    fail("serving plan: ", p.samples, " sampled rows, must be in [1, rows per step=", p.T, "]");
  if (p.serve && p.precision == Precision::tf32)
    fail("--precision=tf32: serving runs fp32 on the CPU and bf16 on the GPU");
  bool any_moe = false;
  for (int l = 0; l < c.n_layer; ++l) any_moe = any_moe || c.is_moe_layer(l);
  if (any_moe && gpu && !p.bf16())
    fail("--precision=", precision_name(p.precision), ": MoE layers on the GPU run in bf16 mixed precision (use "
         "--precision bf16)");
  if (any_moe && gpu && (c.d_model % 8 != 0 || c.d_expert() % 8 != 0))
    fail("MoE layers on the GPU need d_model and d_expert multiples of 8 (d_model=", c.d_model,
         " d_expert=", c.d_expert(), ")");
}

}  // namespace lmf
