// model.h: a model = input end + trunk of blocks + output end (DESIGN.md sections 1 and 2).
//
// Model runs steps: it owns the activation workspace (what a forward saves for its backward, and the
// backward's scratch) planned for one ModelPlan, and reads and writes state it does not own:
//   Parameters     the weights (model/params.h)
//   TrainingState  gradients and AdamW moments (model/train_state.h), training plans only
//   KvCache        serving's paged keys and values (model/kv_cache.h), serving plans only
// The trunk is n_layer calls of the one block step (model/block.h) under the plan's kernel table,
// between the ends (model/ends.h). After set-up a step allocates nothing and, except where a function
// says it reads a result back, never synchronises with the device: a training step is capturable as
// one CUDA graph.
//
// Trunk data flow (forward): x0 = input end(inputs); ln1[0] = norm1[0](x0) (the head); block l turns
// (x_l, ln1[l]) into res2[l] = x_{l+1} and its tail norm's output (ln1[l+1], or lnf for the last);
// the output end reads lnf. Backward walks the same path back; d_res carries d(loss)/d(residual).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/arena.h"
#include "model/block.h"
#include "model/ends.h"
#include "model/params.h"
#include "model/plan.h"
#include "model/train_state.h"
#include "ops/op_plans.h"

namespace lmf {

class OpProfiler;
class KvCache;
struct PagedBatch;

// The trunk's parameters in checkpoint order: every layer's, then the final norm's.
std::vector<TensorSpec> trunk_param_specs(const ModelConfig& c);
// The model's: the input end's, the trunk's, the output end's.
std::vector<TensorSpec> model_param_specs(const ModelConfig& c, const ModelEnds& ends);
// The MoE layers' op configuration (ops/moe.h) for this model (C = d_model, F = d_expert).
MoeConfig model_moe_config(const ModelConfig& c);
// The MoE configuration a plan runs: dropless (no capacity) in serving and batch-invariant plans, where
// whether a token reaches its experts must not depend on what else is in the batch (the capacity factor
// is a training-time load-balancing device).
MoeConfig plan_moe_config(const ModelConfig& c, const ModelPlan& p);

class Model {
 public:
  // params must hold model_param_specs(c, *ends) (and a bf16 copy in bf16 plans); state is required
  // by training plans (and built with lazy_grads(c, p, *ends)), ignored otherwise. kernels: the block
  // table, block_kernels(c, p) when null (tests run other combinations: each computes the same function).
  Model(const ModelConfig& c, const ModelPlan& p, Parameters& params, TrainingState* state,
        std::unique_ptr<ModelEnds> ends, const BlockKernels* kernels = nullptr);
  Model(const Model&) = delete;  // views point into the arenas: it stays where it was built
  Model& operator=(const Model&) = delete;

  // Bytes of the activation and workspace arenas such a model allocates (overflow-checked; nothing is
  // allocated). The CUDA launchers' scratch is not included.
  static size_t plan_bytes(const ModelConfig& c, const ModelPlan& p, const ModelEnds& ends,
                           const BlockKernels* kernels = nullptr);
  // The gradients that the first backward after zero_grad writes whole (for TrainingState).
  static std::vector<std::string> lazy_grads(const ModelConfig& c, const ModelPlan& p, const ModelEnds& ends,
                                             const BlockKernels* kernels = nullptr);

  const ModelConfig& config() const { return cfg_; }
  const ModelPlan& plan() const { return plan_; }
  const BlockKernels& kernels() const { return kernels_; }
  Parameters& params() { return params_; }
  TrainingState& state();
  // The GPU libraries' plans and tuning results of this model (ops/op_plans.h): every method below
  // binds them while it runs; tuning between steps binds them too (train/trainer.h tune_begin).
  OpPlans& op_plans() { return op_plans_; }
  ModelEnds& ends() { return *ends_; }

  // inputs, targets as the ends take them (tokens: (B, T) i32), on the plan's device.
  // Forward + backward; gradients accumulate (+=) scaled so that they are d(mean loss)/dparam * loss_scale.
  // No allocation and no host synchronisation: the per-row losses stay in row_losses().
  void forward_backward_device(Tensor inputs, Tensor targets, float loss_scale = 1.0f);
  void forward_loss_device(Tensor inputs, Tensor targets);
  // The same, returning the mean loss (a host synchronisation on a GPU).
  double forward_backward(Tensor inputs, Tensor targets, float loss_scale = 1.0f);
  double forward_loss(Tensor inputs, Tensor targets);
  Tensor row_losses() const { return losses_; }  // (B*T) f32 on the plan's device
  // The output end's values (logits (B, T, V) of the real vocabulary; predictions) for tests and tools;
  // fp32 and tf32 plans.
  void forward_values(Tensor out, Tensor inputs);
  // Serving plans: computes the batch's rows (model/kv_cache.h: tokens (1, T), their positions, cache
  // slots and sequences), writing their keys and values into the cache, and the output end's values of
  // the rows batch.sample_rows (samples) into out: (samples, V) f32 on the CPU; (samples, padded vocab)
  // bf16 on the GPU, the columns >= V unused. No allocation, no host synchronisation.
  void forward_paged(Tensor out, const PagedBatch& batch, KvCache& cache);

  // MoE models: per MoE layer (in layer order) the state of the last forward, on the plan's device.
  const std::vector<MoeState>& moe_states() const { return moe_states_; }
  struct MoeSummary {
    double aux = 0;            // aux + z terms added to the training loss
    int64_t dropped = 0;       // assignments dropped by the capacity, all layers
    int64_t assignments = 0;   // routed assignments, all layers (N K per layer)
    double load_min = 0, load_max = 0;  // min / max over layers and experts of count / (N K)
    std::vector<std::vector<double>> loads;  // per MoE layer (layer order), per expert: count / (N K)
    std::vector<double> layer_aux;           // per MoE layer: its aux + z terms
  };
  // Sums the last forward's MoE losses and loads (reads the device).
  MoeSummary moe_summary() const;

  size_t arena_bytes() const { return acts_.bytes() + work_.bytes(); }  // activations + workspace
  // Attach an op profiler (nullptr detaches): every op call is timed as one named scope.
  void set_profiler(OpProfiler* p) { prof_ = p; }
  // Gradients becoming final during a backward (data parallelism's bucketed all-reduce overlaps the
  // backward with them, dist/grad_buckets.h): after each layer's backward, f(i) with i the index (in
  // model_param_specs order) from which on no gradient is written again by this backward: the layers
  // above and the output end are done; the input end (a tied embedding included) and the layers below
  // are not. Called from the thread running the backward, host order (CPU plans). Empty: no calls.
  void set_grads_final_hook(std::function<void(size_t first_final)> f) { grads_final_ = std::move(f); }
  // Every forward's activations, op by op (model/block.h ActivationTap); empty: none.
  void set_activation_tap(ActivationTap f) { tap_ = std::move(f); }

 private:
  void plan_activations();
  void plan_workspace();
  void bind_weights();
  BlockStep step_of(int l);  // layer l's block step over this model's views
  void trunk_forward(Tensor inputs, KvCache* cache = nullptr, const PagedBatch* batch = nullptr);
  void trunk_backward(Tensor inputs, float loss_scale);

  ModelConfig cfg_;
  ModelPlan plan_;
  BlockKernels kernels_;
  MoeConfig moe_cfg_;
  BlockFlops flops_;
  Parameters& params_;
  TrainingState* state_;
  OpPlans op_plans_;
  std::unique_ptr<ModelEnds> ends_;
  TensorSpec input_spec_, target_spec_;  // the ends' specs at this plan (checked every call, built once)
  OpProfiler* prof_ = nullptr;
  Arena acts_, work_;
  // views: weights (masters, GEMM operands, gradients) of every layer and the final norm
  std::vector<BlockWeights> w_, wg_, g_;
  NormWeights final_w_, final_g_;
  std::vector<BlockActs> acts_l_;
  Tensor encoded_, losses_, sampled_;  // sampled_: serving's gathered rows (samples, C)
  // sequence parallelism: this rank's rows of encoded_ (the first layer's input; encoded_ itself
  // otherwise), and the shared (B, T, C) scratch of block.h
  Tensor stream_in_, seq_gathered_, seq_grad_, seq_partial_;
  Tensor seq_all(Tensor local, Tensor full);  // local's rows of every rank gathered into full (or local)
  NormOut lnf_;
  BlockGrads d_;
  Tensor rope_freqs_;
  std::vector<MoeState> moe_states_;
  std::vector<size_t> layer_first_param_;  // index of layer l's first parameter; [n_layer]: the output end's first
  std::function<void(size_t)> grads_final_;
  ActivationTap tap_;
  mutable std::vector<int32_t> moe_counts_host_;  // planned staging for moe_summary()
  mutable std::vector<float> moe_stats_host_, losses_host_;
};

}  // namespace lmf
