#include "model/gpt.h"

#include "core/check.h"
#include "core/memory.h"

namespace lmf {

std::vector<TensorSpec> gpt_param_specs(const ModelConfig& c) { return model_param_specs(c, *make_ends(c)); }

int64_t gpt_param_count(const ModelConfig& c, bool include_position_embedding) {
  int64_t n = 0;
  for (const TensorSpec& s : gpt_param_specs(c))
    if (include_position_embedding || s.name != "pos_emb.weight") n = checked_add(n, s.numel(), "parameter count");
  return n;
}

int64_t gpt_active_param_count(const ModelConfig& c, bool include_position_embedding) {
  int64_t n = 0;
  for (const TensorSpec& s : gpt_param_specs(c)) {
    if (!include_position_embedding && s.name == "pos_emb.weight") continue;
    const bool routed = s.name.find(".moe.experts.") != std::string::npos;
    n = checked_add(n, routed ? s.numel() / c.moe.experts * c.moe.top_k : s.numel(), "active parameter count");
  }
  return n;
}

double gpt_train_flops_per_token(const ModelConfig& c, int64_t T) {
  return 6.0 * static_cast<double>(gpt_active_param_count(c, false)) +
         12.0 * c.n_layer * static_cast<double>(c.d_model) * static_cast<double>(T);
}

size_t gpt_plan_bytes(const ModelConfig& c, const ModelPlan& p) {
  plan_validate(c, p);
  const std::vector<TensorSpec> specs = gpt_param_specs(c);
  const size_t master = arena_plan_bytes(specs, "params");
  size_t bytes = master;
  if (p.bf16())  // the flat bf16 copy: one bf16 per f32 slot of the masters (model/params.h)
    bytes = checked_add(bytes, arena_plan_bytes({{"flat", {static_cast<int64_t>(master / 4)}, DType::bf16}}, "params_bf16"),
                        "model memory");
  if (p.training)  // gradients, AdamW m and v: the masters' layout each
    bytes = checked_add(bytes, checked_mul(master, size_t{3}, "training state memory"), "model memory");
  return checked_add(bytes, Model::plan_bytes(c, p, *make_ends(c)), "model memory");
}

namespace {
// The plan's rules hold, and the memory is there, before anything is allocated.
std::vector<TensorSpec> validated_specs(const ModelConfig& c, const ModelPlan& p) {
  const size_t bytes = gpt_plan_bytes(c, p);
  // AdamW addresses the parameters with i32 indices (ops/optim.h adamw_decay_ranges)
  const size_t elems = arena_plan_bytes(gpt_param_specs(c), "params") / sizeof(float);
  if (p.training && elems > static_cast<size_t>(INT32_MAX))
    fail("the model has ", gpt_param_count(c), " parameters (", elems, " f32 slots); training supports at most ",
         INT32_MAX, " (the optimizer's i32 index)");
  check_memory_fits(bytes, p.device,
                    detail::concat("the model (", gpt_param_count(c), " parameters; weights",
                                   p.training ? ", gradients, AdamW state" : "", ", activations and workspace)"));
  return gpt_param_specs(c);
}
}  // namespace

namespace {
BlockKernels kernels_with(const ModelConfig& c, const ModelPlan& p, Communicator* tp, bool sequence_parallel) {
  BlockKernels k = block_kernels(c, p);
  if (tp) k.comm = tp;
  k.sequence_parallel = sequence_parallel;
  return k;
}
}  // namespace

Gpt::Gpt(const ModelConfig& c, const ModelPlan& p, Communicator* tp, int64_t moments_begin, int64_t moments_end,
         bool sequence_parallel)
    : kernels(kernels_with(c, p, tp, sequence_parallel)),
      params(validated_specs(c, p), p.device, p.bf16()),
      state(p.training ? std::make_unique<TrainingState>(params, Model::lazy_grads(c, p, *make_ends(c), &kernels),
                                                         moments_begin, moments_end)
                       : nullptr),
      model(c, p, params, state.get(), make_ends(c), &kernels) {}

}  // namespace lmf
