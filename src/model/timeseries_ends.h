// timeseries_ends.h: the ends of the time-series family (Time-MoE style; docs/TIMESERIES.md).
//
// Input end: one real value per position (B, T, 1) -> x = SiLU(x W_g^T) * (x W_e^T), (B, T, C): one
// linear map to [gate | up] (ts_embed.weight, (2C, 1)) then SwiGLU, fused in one op
// (ops/timeseries.h point_embedding_*). Output end: the heads, one linear map (ts_heads.weight,
// (sum of horizons, C), no bias) whose column block j predicts the next horizons[j] values from each
// position, and the multi-horizon Huber loss (ops/timeseries.h forecast_heads_loss, ops/mse.h
// huber_horizons_loss). targets: (B, T, Hmax) f32, the value h + 1 steps after each position, NaN
// where missing. Every plan: CPU fp32; GPU fp32, tf32 and bf16 (bf16 activations and the bf16 copy of
// the heads' weight; f32 predictions, loss and gradients).
#pragma once
#include <vector>

#include "model/ends.h"

namespace lmf {

class TimeSeriesEnds final : public ModelEnds {
 public:
  explicit TimeSeriesEnds(const ModelConfig& c);
  const char* name() const override { return "timeseries"; }
  std::vector<TensorSpec> input_param_specs() const override;
  std::vector<TensorSpec> output_param_specs() const override;
  std::vector<std::string> lazy_grads(const BlockKernels&) const override { return {}; }
  std::vector<TensorSpec> workspace_specs(const ModelPlan& p) const override;
  size_t cuda_workspace(const ModelPlan& p) const override;
  void bind(const EndsViews& v, const Arena& workspace, const BlockKernels& k) override;
  TensorSpec input_spec(const ModelPlan& p) const override { return {"inputs", {p.B, p.T, 1}, DType::f32}; }
  TensorSpec target_spec(const ModelPlan& p) const override { return {"targets", {p.B, p.T, H_}, DType::f32}; }
  void input_forward(Tensor x, Tensor inputs, Tensor positions, OpProfiler* prof) override;
  void input_backward(Tensor dx, Tensor inputs, OpProfiler* prof) override;
  void output_loss(Tensor losses, Tensor dx, Tensor x, Tensor targets, float grad_scale, GradMode weights_mode,
                   OpProfiler* prof) override;
  void output_values(Tensor out, Tensor x) override;
  int64_t output_width() const override { return D_; }

 private:
  int64_t C_, H_, D_;
  std::vector<int64_t> horizons_;
  float delta_;
  GemmMath math_ = GemmMath::fp32;
  Tensor w_emb_, w_heads_, w_heads_gemm_, dw_emb_, dw_heads_, pred_, dpred_;
};

}  // namespace lmf
