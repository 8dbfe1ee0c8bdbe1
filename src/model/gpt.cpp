#include "model/gpt.h"

namespace lmf {

std::vector<TensorSpec> gpt_param_specs(const ModelConfig& c) { return model_param_specs(c, TokenEnds(c)); }

int64_t gpt_param_count(const ModelConfig& c, bool include_position_embedding) {
  int64_t n = 0;
  for (const TensorSpec& s : gpt_param_specs(c))
    if (include_position_embedding || s.name != "pos_emb.weight") n += s.numel();
  return n;
}

int64_t gpt_active_param_count(const ModelConfig& c, bool include_position_embedding) {
  int64_t n = 0;
  for (const TensorSpec& s : gpt_param_specs(c)) {
    if (!include_position_embedding && s.name == "pos_emb.weight") continue;
    const bool routed = s.name.find(".moe.experts.") != std::string::npos;
    n += routed ? s.numel() / c.moe.experts * c.moe.top_k : s.numel();
  }
  return n;
}

double gpt_train_flops_per_token(const ModelConfig& c, int64_t T) {
  return 6.0 * static_cast<double>(gpt_active_param_count(c, false)) +
         12.0 * c.n_layer * static_cast<double>(c.d_model) * static_cast<double>(T);
}

namespace {
// The plan's rules hold before anything is allocated.
std::vector<TensorSpec> validated_specs(const ModelConfig& c, const ModelPlan& p) {
  plan_validate(c, p);
  return gpt_param_specs(c);
}
}  // namespace

Gpt::Gpt(const ModelConfig& c, const ModelPlan& p)
    : params(validated_specs(c, p), p.device, p.bf16()),
      state(p.training ? std::make_unique<TrainingState>(params, Model::lazy_grads(c, p, TokenEnds(c))) : nullptr),
      model(c, p, params, state.get(), std::make_unique<TokenEnds>(c)) {}

}  // namespace lmf
