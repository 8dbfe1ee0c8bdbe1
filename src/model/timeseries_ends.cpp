// timeseries_ends.cpp: see timeseries_ends.h.
#include "model/timeseries_ends.h"

#include "core/profiler.h"
#include "ops/activation.h"
#include "ops/linear.h"
#include "ops/mse.h"

namespace lmf {

TimeSeriesEnds::TimeSeriesEnds(const ModelConfig& c)
    : C_(c.d_model), H_(c.ts.max_horizon()), D_(c.ts.head_outputs()), horizons_(c.ts.horizons), delta_(c.ts.huber_delta) {
  LMF_CHECK(c.family == ModelFamily::timeseries && H_ >= 1, "timeseries ends: the config is not family=timeseries");
}

std::vector<TensorSpec> TimeSeriesEnds::input_param_specs() const { return {{"ts_embed.weight", {2 * C_, 1}}}; }

std::vector<TensorSpec> TimeSeriesEnds::output_param_specs() const { return {{"ts_heads.weight", {D_, C_}}}; }

std::vector<TensorSpec> TimeSeriesEnds::workspace_specs(const ModelPlan& p) const {
  if (p.device != Device::cpu || p.precision != Precision::fp32)
    fail("the time-series model runs on the CPU in fp32 in this version (plan: ", device_name(p.device), " ",
         precision_name(p.precision), "; pass --device cpu)");
  const int64_t N = p.B * p.T;
  return {{"ts_pre", {N, 2 * C_}}, {"ts_dpre", {N, 2 * C_}}, {"ts_pred", {N, D_}}, {"ts_dpred", {N, D_}}};
}

void TimeSeriesEnds::bind(const EndsViews& v, const Arena& workspace, const BlockKernels&) {
  w_emb_ = v.master("ts_embed.weight");
  w_heads_ = v.master("ts_heads.weight");
  LMF_CHECK(w_emb_.defined() && w_heads_.defined(), "timeseries ends: the parameters lack ts_embed / ts_heads");
  dw_emb_ = v.grad("ts_embed.weight");
  dw_heads_ = v.grad("ts_heads.weight");
  pre_ = workspace.get("ts_pre");
  dpre_ = workspace.get("ts_dpre");
  pred_ = workspace.get("ts_pred");
  dpred_ = workspace.get("ts_dpred");
}

void TimeSeriesEnds::check_inputs(Tensor inputs, const ModelPlan& p, const char* what) const {
  check_shape(inputs, {p.B, p.T, 1}, what);
  check_f32(inputs, what);
}

void TimeSeriesEnds::check_targets(Tensor targets, const ModelPlan& p, const char* what) const {
  check_shape(targets, {p.B, p.T, H_}, what);
  check_f32(targets, what);
}

void TimeSeriesEnds::input_forward(Tensor x, Tensor inputs, Tensor, OpProfiler* prof) {
  ProfileScope scope(prof, "point embedding fwd");
  const int64_t N = inputs.dim(0) * inputs.dim(1);
  const Tensor pre = pre_.rows(0, N);
  linear_forward(pre, inputs.view({N, 1}), w_emb_, Tensor());
  swiglu_forward(x.view({N, C_}), pre);
}

void TimeSeriesEnds::input_backward(Tensor dx, Tensor inputs, OpProfiler* prof) {
  ProfileScope scope(prof, "point embedding bwd");
  const int64_t N = inputs.dim(0) * inputs.dim(1);
  const Tensor pre = pre_.rows(0, N), dpre = dpre_.rows(0, N);
  std::fill(dpre.f32(), dpre.f32() + dpre.numel(), 0.0f);  // swiglu_backward accumulates
  swiglu_backward(dpre, dx.view({N, C_}), pre);
  linear_backward(Tensor(), dw_emb_, Tensor(), dpre, inputs.view({N, 1}), w_emb_);
}

void TimeSeriesEnds::output_loss(Tensor losses, Tensor dx, Tensor x, Tensor targets, float grad_scale, GradMode,
                                 OpProfiler* prof) {
  ProfileScope scope(prof, dx.defined() ? "forecast heads + huber fwd+bwd" : "forecast heads + huber fwd");
  const int64_t N = x.dim(0);
  const Tensor pred = pred_.rows(0, N), dpred = dpred_.rows(0, N);
  linear_forward(pred, x, w_heads_, Tensor());
  const Tensor t = targets.view({N, H_});
  if (!dx.defined()) {
    huber_horizons_loss(losses, Tensor(), pred, t, horizons_, delta_, 0.0f);
    return;
  }
  huber_horizons_loss(losses, dpred, pred, t, horizons_, delta_, grad_scale);
  linear_backward(dx, dw_heads_, Tensor(), dpred, x, w_heads_);
}

void TimeSeriesEnds::output_values(Tensor out, Tensor x) {
  linear_forward(out.view({x.dim(0), D_}), x, w_heads_, Tensor());
}

}  // namespace lmf
