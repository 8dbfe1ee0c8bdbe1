// ends.h: what a model puts around the trunk (DESIGN.md section 2: model = input end + trunk of
// blocks + output end).
//
// The trunk (model/model.h) knows (B, T, C) rows and nothing about tokens. An Ends implementation
// turns the model's inputs into the trunk's first residual stream (the input end) and the trunk's
// normalised output into per-row losses and their gradient (the output end), and declares the
// parameters and workspace it needs. Its parameters sit before (input) and after (output) the trunk's
// in the spec table, which is the checkpoint's order. New model families are new Ends (or new block
// table entries), never a copied loop:
//   TokenEnds       token embedding (+ learned positions) in, LM head + cross-entropy out (model/token_ends.h)
//   RegressionEnds  a linear projection of real values in, a linear head + MSE out (model/regression_ends.h)
//   TimeSeriesEnds  gated point embedding in, multi-horizon heads + Huber out (model/timeseries_ends.h)
#pragma once
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/arena.h"
#include "model/block.h"
#include "model/config.h"
#include "model/plan.h"
#include "ops/grad_mode.h"

namespace lmf {

// name -> tensor, or an absent Tensor when there is no such tensor.
using TensorLookup = std::function<Tensor(const std::string&)>;

// The three views of the parameters an end reads and writes.
struct EndsViews {
  TensorLookup master;  // f32 masters
  TensorLookup gemm;    // what the GEMMs read: the bf16 copy (BlockKernels::gemm_reads_copy) or the masters
  TensorLookup grad;    // gradients (training plans), else returns absent tensors
};

class ModelEnds {
 public:
  virtual ~ModelEnds() = default;
  virtual const char* name() const = 0;

  // --- plan (set-up) ---------------------------------------------------------------------------
  // Parameters before and after the trunk's, in checkpoint order.
  virtual std::vector<TensorSpec> input_param_specs() const = 0;
  virtual std::vector<TensorSpec> output_param_specs() const = 0;
  // Gradients the first backward after zero_grad writes whole (lazy zeroing, train_state.h).
  virtual std::vector<std::string> lazy_grads(const BlockKernels& k) const = 0;
  // Workspace the ends use at this plan (carved into the model's workspace arena).
  virtual std::vector<TensorSpec> workspace_specs(const ModelPlan& p) const = 0;
  // CUDA workspace bytes (lmf::cuda_reserve_workspace) the ends' ops need at this plan.
  virtual size_t cuda_workspace(const ModelPlan& p) const = 0;
  // Takes the views (valid as long as the owners live) and the workspace tensors.
  virtual void bind(const EndsViews& v, const Arena& workspace, const BlockKernels& k) = 0;
  // The model's inputs and targets at this plan (the trainer's batch buffers are laid out from them).
  virtual TensorSpec input_spec(const ModelPlan& p) const = 0;
  virtual TensorSpec target_spec(const ModelPlan& p) const = 0;

  // --- run (a step: no allocation, no host synchronisation) ------------------------------------
  // x (B, T, C) = input end(inputs); positions: absent (row t of each sequence is position t) or (B T)
  // i32, each row's position (serving).
  virtual void input_forward(Tensor x, Tensor inputs, Tensor positions, OpProfiler* prof) = 0;
  // The input end's parameter gradients += from dx = d(loss)/d(x).
  virtual void input_backward(Tensor dx, Tensor inputs, OpProfiler* prof) = 0;
  // losses (N) = per-row loss of the trunk output x (N, C) against targets. dx absent: forward only;
  // else dx (N, C, zeroed by the caller) += d(grad_scale * losses)/dx and the output end's parameter
  // gradients += theirs (weights_mode: Overwrite right after zero_grad for gradients in lazy_grads()).
  virtual void output_loss(Tensor losses, Tensor dx, Tensor x, Tensor targets, float grad_scale, GradMode weights_mode,
                           OpProfiler* prof) = 0;
  // out = the output end's values of x (N, C): logits of the real vocabulary, predictions (fp32 plans).
  virtual void output_values(Tensor out, Tensor x) = 0;
  virtual int64_t output_width() const = 0;  // columns of output_values' out
};

// t has the spec's shape and dtype (the model checks its inputs and targets against the ends' specs,
// kept from set-up: no allocation in a step); throws naming `what`.
void check_matches_spec(const Tensor& t, const TensorSpec& s, const char* what);

// The ends of a config's family: TokenEnds (text) or TimeSeriesEnds (timeseries).
std::unique_ptr<ModelEnds> make_ends(const ModelConfig& c);

}  // namespace lmf
