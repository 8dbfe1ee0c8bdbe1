// regression_ends.h: ends for real-valued sequences (the seam a time-series model plugs into):
// x = inputs W_in^T + b_in in; y = x W_out^T + b_out out with a per-row mean squared error against
// the targets. inputs: (B, T, D_in) f32; targets and values: (B, T, D_out) f32. CPU, fp32 plans.
#pragma once
#include "model/ends.h"

namespace lmf {

class RegressionEnds final : public ModelEnds {
 public:
  RegressionEnds(const ModelConfig& c, int64_t d_in, int64_t d_out);
  const char* name() const override { return "regression"; }
  std::vector<TensorSpec> input_param_specs() const override;
  std::vector<TensorSpec> output_param_specs() const override;
  std::vector<std::string> lazy_grads(const BlockKernels&) const override { return {}; }
  std::vector<TensorSpec> workspace_specs(const ModelPlan& p) const override;
  size_t cuda_workspace(const ModelPlan&) const override { return 0; }
  void bind(const EndsViews& v, const Arena& workspace, const BlockKernels& k) override;
  TensorSpec input_spec(const ModelPlan& p) const override { return {"inputs", {p.B, p.T, d_in_}, DType::f32}; }
  TensorSpec target_spec(const ModelPlan& p) const override { return {"targets", {p.B, p.T, d_out_}, DType::f32}; }
  void input_forward(Tensor x, Tensor inputs, Tensor positions, OpProfiler* prof) override;
  void input_backward(Tensor dx, Tensor inputs, OpProfiler* prof) override;
  void output_loss(Tensor losses, Tensor dx, Tensor x, Tensor targets, float grad_scale, GradMode weights_mode,
                   OpProfiler* prof) override;
  void output_values(Tensor out, Tensor x) override;
  int64_t output_width() const override { return d_out_; }

 private:
  int64_t C_, d_in_, d_out_;
  Tensor w_in_, b_in_, w_out_, b_out_, dw_in_, db_in_, dw_out_, db_out_, pred_, dpred_;
};

}  // namespace lmf
