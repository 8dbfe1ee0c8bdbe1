#include "model/regression_ends.h"

#include "core/profiler.h"
#include "ops/linear.h"
#include "ops/mse.h"

namespace lmf {

RegressionEnds::RegressionEnds(const ModelConfig& c, int64_t d_in, int64_t d_out)
    : C_(c.d_model), d_in_(d_in), d_out_(d_out) {
  if (d_in < 1 || d_out < 1) fail("regression ends: d_in=", d_in, " and d_out=", d_out, " must be >= 1");
}

std::vector<TensorSpec> RegressionEnds::input_param_specs() const {
  return {{"in_proj.weight", {C_, d_in_}}, {"in_proj.bias", {C_}}};
}

std::vector<TensorSpec> RegressionEnds::output_param_specs() const {
  return {{"out_proj.weight", {d_out_, C_}}, {"out_proj.bias", {d_out_}}};
}

std::vector<TensorSpec> RegressionEnds::workspace_specs(const ModelPlan& p) const {
  if (p.device != Device::cpu || p.precision != Precision::fp32)
    fail("regression ends run on the CPU in fp32 in this version (plan: ", device_name(p.device), " ",
         precision_name(p.precision), ")");
  return {{"pred", {p.B * p.T, d_out_}}, {"dpred", {p.B * p.T, d_out_}}};
}

void RegressionEnds::bind(const EndsViews& v, const Arena& workspace, const BlockKernels&) {
  w_in_ = v.master("in_proj.weight");
  b_in_ = v.master("in_proj.bias");
  w_out_ = v.master("out_proj.weight");
  b_out_ = v.master("out_proj.bias");
  LMF_CHECK(w_in_.defined() && b_in_.defined() && w_out_.defined() && b_out_.defined(),
            "regression ends: the parameters lack in_proj / out_proj");
  dw_in_ = v.grad("in_proj.weight");
  db_in_ = v.grad("in_proj.bias");
  dw_out_ = v.grad("out_proj.weight");
  db_out_ = v.grad("out_proj.bias");
  pred_ = workspace.get("pred");
  dpred_ = workspace.get("dpred");
}

void RegressionEnds::input_forward(Tensor x, Tensor inputs, Tensor, OpProfiler* prof) {
  ProfileScope scope(prof, "input projection fwd");
  linear_forward(x, inputs, w_in_, b_in_);
}

void RegressionEnds::input_backward(Tensor dx, Tensor inputs, OpProfiler* prof) {
  ProfileScope scope(prof, "input projection bwd");
  linear_backward(Tensor(), dw_in_, db_in_, dx, inputs, w_in_);
}

void RegressionEnds::output_loss(Tensor losses, Tensor dx, Tensor x, Tensor targets, float grad_scale, GradMode,
                                 OpProfiler* prof) {
  ProfileScope scope(prof, dx.defined() ? "regression head + mse fwd+bwd" : "regression head + mse fwd");
  const int64_t N = x.dim(0);
  linear_forward(pred_, x, w_out_, b_out_);
  const Tensor t = targets.view({N, d_out_});
  if (!dx.defined()) {
    mse_loss(losses, Tensor(), pred_, t, 0.0f);
    return;
  }
  mse_loss(losses, dpred_, pred_, t, grad_scale);
  linear_backward(dx, dw_out_, db_out_, dpred_, x, w_out_);
}

void RegressionEnds::output_values(Tensor out, Tensor x) {
  linear_forward(out.view({x.dim(0), d_out_}), x, w_out_, b_out_);
}

}  // namespace lmf
