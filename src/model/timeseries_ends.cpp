// timeseries_ends.cpp: see timeseries_ends.h.
#include "model/timeseries_ends.h"

#include "core/profiler.h"
#include "ops/timeseries.h"

namespace lmf {

TimeSeriesEnds::TimeSeriesEnds(const ModelConfig& c)
    : C_(c.d_model), H_(c.ts.max_horizon()), D_(c.ts.head_outputs()), horizons_(c.ts.horizons), delta_(c.ts.huber_delta) {
  LMF_CHECK(c.family == ModelFamily::timeseries && H_ >= 1, "timeseries ends: the config is not family=timeseries");
}

std::vector<TensorSpec> TimeSeriesEnds::input_param_specs() const { return {{"ts_embed.weight", {2 * C_, 1}}}; }

std::vector<TensorSpec> TimeSeriesEnds::output_param_specs() const { return {{"ts_heads.weight", {D_, C_}}}; }

std::vector<TensorSpec> TimeSeriesEnds::workspace_specs(const ModelPlan& p) const {
  const int64_t N = p.B * p.T, Dp = forecast_heads_padded(D_);
  std::vector<TensorSpec> s{{"ts_pred", {N, Dp}, DType::f32}};
  if (p.training) s.push_back({"ts_dpred", {N, Dp}, p.bf16() ? DType::bf16 : DType::f32});
  return s;
}

size_t TimeSeriesEnds::cuda_workspace(const ModelPlan& p) const {
  return p.training ? point_embedding_backward_cuda_workspace(p.B * p.T, C_) : 0;
}

void TimeSeriesEnds::bind(const EndsViews& v, const Arena& workspace, const BlockKernels& k) {
  math_ = k.gemm_math;
  w_emb_ = v.master("ts_embed.weight");
  w_heads_ = v.master("ts_heads.weight");
  w_heads_gemm_ = v.gemm("ts_heads.weight");
  LMF_CHECK(w_emb_.defined() && w_heads_.defined() && w_heads_gemm_.defined(),
            "timeseries ends: the parameters lack ts_embed / ts_heads");
  dw_emb_ = v.grad("ts_embed.weight");
  dw_heads_ = v.grad("ts_heads.weight");
  pred_ = workspace.get("ts_pred");
  dpred_ = workspace.find("ts_dpred") >= 0 ? workspace.get("ts_dpred") : Tensor();
}

void TimeSeriesEnds::input_forward(Tensor x, Tensor inputs, Tensor, OpProfiler* prof) {
  ProfileScope scope(prof, "point embedding fwd");
  const int64_t N = inputs.dim(0) * inputs.dim(1);
  point_embedding_forward(x.view({N, C_}), inputs.view({N}), w_emb_);
}

void TimeSeriesEnds::input_backward(Tensor dx, Tensor inputs, OpProfiler* prof) {
  ProfileScope scope(prof, "point embedding bwd");
  const int64_t N = inputs.dim(0) * inputs.dim(1);
  point_embedding_backward(dw_emb_, dx.view({N, C_}), inputs.view({N}), w_emb_);
}

void TimeSeriesEnds::output_loss(Tensor losses, Tensor dx, Tensor x, Tensor targets, float grad_scale, GradMode,
                                 OpProfiler* prof) {
  ProfileScope scope(prof, dx.defined() ? "forecast heads + huber fwd+bwd" : "forecast heads + huber fwd");
  const int64_t N = x.dim(0);
  forecast_heads_loss(losses, dx, dw_heads_, x, w_heads_gemm_, targets.view({N, H_}), pred_, dpred_, horizons_, delta_,
                      dx.defined() ? grad_scale : 0.0f, math_);
}

void TimeSeriesEnds::output_values(Tensor out, Tensor x) {
  const Tensor w = x.dtype == DType::bf16 ? w_heads_gemm_ : w_heads_;
  forecast_heads_forward(out.view({x.dim(0), D_}), x, w, math_);
}

}  // namespace lmf
