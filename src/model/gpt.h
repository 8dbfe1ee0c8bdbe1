// gpt.h: the decoder-only transformer of docs/MODEL.md as plain data plus explicit
// forward/backward calls per layer family (DESIGN.md sections 1 and 2).
//
// Plan, then run: the constructor turns (config, B, T) into spec tables and carves every arena
// (parameters, gradients, AdamW m and v, activations, workspace). forward_backward(), forward_loss()
// and decode_step() only read and write those buffers: no allocation, no resizing.
//
// Gradient buffers accumulate across micro-batches; zero_grad() starts a new accumulation.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/arena.h"
#include "model/config.h"
#include "ops/attention.h"
#include "ops/moe.h"

namespace lmf {

// Parameter specs in the canonical order of docs/MODEL.md (also the safetensors order).
std::vector<TensorSpec> gpt_param_specs(const ModelConfig& c);
// Parameters counted for FLOPs (everything but pos_emb) and in total.
int64_t gpt_param_count(const ModelConfig& c, bool include_position_embedding = true);
// Parameters one token uses: routed experts count top_k / experts of their total (MoE models).
int64_t gpt_active_param_count(const ModelConfig& c, bool include_position_embedding = true);
// The MoE layer's op configuration (ops/moe.h) for this model (C = d_model, F = d_expert).
MoeConfig gpt_moe_config(const ModelConfig& c);
// 6 N + 12 L C T FLOPs per token for a training step, N the active parameters (docs/MODEL.md).
double gpt_train_flops_per_token(const ModelConfig& c, int64_t T);

// Views of one arena laid out by gpt_param_specs (parameters or their gradients).
struct GptLayerTensors {
  Tensor norm1_w, norm1_b, qkv_w, qkv_b, proj_w, proj_b, norm2_w, norm2_b, fc_w, fc_b, mproj_w, mproj_b;
  // MoE layers (instead of fc/mproj): router, routed experts, shared experts, selection bias
  Tensor router_w, w_in, w_out, ws_in, ws_out, ws_gate, sel_bias;
  bool moe() const { return router_w.defined(); }
  MoeExtra moe_extra() const { return {ws_in, ws_out, ws_gate, sel_bias}; }
};
struct GptTensors {
  Tensor tok_emb, pos_emb, normf_w, normf_b, lm_head;  // lm_head aliases tok_emb when tied
  std::vector<GptLayerTensors> layers;
};
GptTensors gpt_bind(const Arena& arena, const ModelConfig& c);
// The same over any lookup: `find(name)` returns the tensor, or an absent Tensor.
GptTensors gpt_bind(const std::function<Tensor(const std::string&)>& find, const ModelConfig& c);

// Numeric mode of a run. fp32: everything fp32. tf32: as fp32, but GEMMs on the GPU's tensor cores
// with TF32 inputs (fp32 accumulation). bf16: mixed precision on the GPU (docs/MIXED_PRECISION.md):
// fp32 master weights, gradients and AdamW state; a bf16 weight copy for the GEMMs; bf16 activations;
// fp32 accumulation everywhere; flash attention.
enum class Precision { fp32, tf32, bf16 };
const char* precision_name(Precision p);
// "fp32" | "tf32" | "bf16"; anything else throws naming `flag` and the accepted values.
Precision parse_precision(const std::string& s, const char* flag);

struct GptPlan {
  int64_t B = 1;           // micro-batch size
  int64_t T = 1;           // sequence length (<= context_length)
  bool training = true;    // plan gradients and AdamW state
  int64_t decode_ctx = 0;  // > 0: also plan a batch-1 KV cache of this many positions for decode_step()
  Device device = Device::cpu;  // where every arena lives
  Precision precision = Precision::fp32;  // tf32 and bf16 need device == cuda
  FlashKernels attention = FlashKernels::lmforge;  // bf16 plans: the flash attention kernels (attention.h)
};

class Gpt {
 public:
  Gpt(const ModelConfig& config, const GptPlan& plan);
  // Tensors handed out point into this object's arenas and tables: it stays where it was built.
  Gpt(const Gpt&) = delete;
  Gpt& operator=(const Gpt&) = delete;

  const ModelConfig& config() const { return cfg_; }
  const GptPlan& plan() const { return plan_; }

  // GPT-2 initialisation from the counter RNG (docs/MODEL.md); computed on the host, identical on
  // every device.
  void init_weights(uint64_t seed);

  // tokens, targets: (B, T) i32 on the model's device. Returns the mean loss over B*T (on a GPU this
  // reads the per-row losses back: a host synchronisation).
  double forward_loss(Tensor tokens, Tensor targets);
  // Forward + backward; gradients accumulate (+=) scaled so that they are d(mean loss)/dparam * loss_scale.
  double forward_backward(Tensor tokens, Tensor targets, float loss_scale = 1.0f);
  // The same without reading anything back: per-row losses stay in row_losses() on the device. No
  // host synchronisation and no allocation: this is what a training step (and a CUDA graph) runs.
  void forward_backward_device(Tensor tokens, Tensor targets, float loss_scale = 1.0f);
  void forward_loss_device(Tensor tokens, Tensor targets);
  Tensor row_losses() const { return losses_; }  // (B*T) f32 on the model's device
  // MoE models: per MoE layer (in layer order) the state of the last forward, on the model's device
  // (counts: assignments per expert before the capacity; stats: aux loss, z loss, dropped).
  const std::vector<MoeState>& moe_states() const { return moe_states_; }
  // Sum over MoE layers of the last forward's aux + z losses, and the drop count (reads the device).
  struct MoeSummary {
    double aux = 0;            // aux + z terms added to the training loss
    int64_t dropped = 0;       // assignments dropped by the capacity, all layers
    int64_t assignments = 0;   // routed assignments, all layers (N K per layer)
    double load_min = 0, load_max = 0;  // min / max over layers and experts of count / (N K)
  };
  MoeSummary moe_summary() const;
  // Logits (B, T, V) of the real vocabulary (for tests and tools; not on the training path; fp32 and
  // tf32 plans).
  void forward_logits(Tensor logits, Tensor tokens);
  // bf16 plans: rewrite the bf16 weight copy from the f32 masters (after init_weights, which calls it,
  // and after loading a checkpoint into params()). No-op for other precisions.
  void sync_weight_copy();
  // The bf16 weight copy (bf16 plans; empty arena otherwise): one flat bf16 block whose element i is
  // element i of params().flat_f32().
  Arena& params_bf16() { return params_bf16_; }
  // GPU plans zero some weight gradients lazily (the routed experts' in MoE plans; with bf16 also the
  // dense weight matrices and the LM head's): the next backward writes them whole (beta-0 GEMMs,
  // MoeExtraGrads::expert_grads_zero), and grads() / g() zero them first if it has not run.
  void zero_grad();

  // Generation with a KV cache (batch 1, CPU). Feeds `token` at position `pos` (0-based, < decode_ctx) and
  // returns the logits (V) of the next token. Positions must be fed in order 0, 1, 2, ...
  const float* decode_step(int32_t token, int64_t pos);

  Arena& params() { return params_; }
  Arena& grads() {
    settle_grads();
    grads_zero_ = false;  // the caller may write them
    return grads_;
  }
  Arena& adam_m() { return m_; }
  Arena& adam_v() { return v_; }
  // Weight-decay ranges of the parameter arena (2-D and stacked 3-D expert tensors), planned once for adamw_update_flat:
  // (S, 2) i32 host tensor of [begin, end) element ranges.
  Tensor decay_ranges() { return decay_ranges_; }
  const GptTensors& p() const { return p_; }
  const GptTensors& g() const {
    settle_grads();
    return g_;
  }
  size_t arena_bytes() const;
  // Attach an op profiler (nullptr detaches): every op call is timed as one named scope.
  void set_profiler(class OpProfiler* p) { prof_ = p; }

 private:
  struct LayerActs {
    // probs: (B, NH, T, T) attention probabilities (fp32/tf32), or the flash log-sum-exp (B, NH, T) (bf16)
    Tensor ln1, ln1_mean, ln1_rstd, qkv, probs, att, res1, ln2, ln2_mean, ln2_rstd, fc, act, res2;
    MoeState moe;  // MoE layers: what the MoE forward saves (fc and act absent)
  };
  bool bf16() const { return plan_.precision == Precision::bf16; }
  void forward_body(Tensor tokens);  // embedding .. final norm into lnf_
  void forward_body_bf16(Tensor tokens);
  void backward_layers_bf16(Tensor tokens, float loss_scale);
  template <class F>
  void timed(const char* name, double flops, F&& f);
  void norm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor w, Tensor b);
  void norm_backward(Tensor dinp, Tensor dw, Tensor db, Tensor dout, Tensor inp, Tensor w, Tensor mean, Tensor rstd,
                     Tensor dinp_sum = Tensor());
  // MoE layer l: out (N, C) = moe(ln2) (forward); d_ln_ += d(ln2) from dout = d_res_ (backward)
  void moe_layer_forward(int l, Tensor out);
  void moe_layer_backward(int l, float d_aux);
  void moe_update_selection_bias();

  ModelConfig cfg_;
  GptPlan plan_;
  class OpProfiler* prof_ = nullptr;
  Arena params_, grads_, m_, v_, acts_, work_, decode_, params_bf16_;
  bool grads_zero_ = false;  // grads_ hold zeros (zero_grad, no backward since): the first backward may write them
  // zero_grad's lazily zeroed byte ranges of grads_ (see zero_grad; GPU training plans) and the
  // rest; lazy_grads_stale_: the lazy ranges hold old values.
  std::vector<std::pair<size_t, size_t>> lazy_grad_ranges_, eager_grad_ranges_;
  mutable bool lazy_grads_stale_ = false;
  void settle_grads() const;
  GptTensors p_, g_, pb_;  // pb_: views of params_bf16_ (bf16 plans)
  std::vector<Tensor> bf16_views_;  // params_bf16_ per parameter, at params_'s element offsets
  std::vector<LayerActs> la_;
  MoeConfig moe_cfg_;
  std::vector<MoeScratch> moe_layer_scratch_;  // per layer: the shared MoE scratch, xg the layer's own (training)
  std::vector<MoeState> moe_states_;
  MoeState decode_moe_;        // decode_step's MoE state (batch 1)
  MoeScratch decode_moe_scratch_;
  mutable std::vector<int32_t> moe_counts_host_;  // planned staging for moe_summary()
  mutable std::vector<float> moe_stats_host_;
  Tensor encoded_, lnf_, lnf_mean_, lnf_rstd_, losses_;
  // workspace: activation gradients (reused by every layer) and scratch
  Tensor d_res_, d_ln_, d_qkv_, d_att_, d_fc_, d_act_, d_probs_, logits_scratch_, rope_freqs_, norm_dummy_;
  // decode state (batch 1)
  std::vector<float> losses_host_;
  std::vector<int32_t> decay_ranges_host_;
  Tensor decay_ranges_;  // staging for reading losses back from a GPU (planned size)
  Tensor k_cache_, v_cache_, dx_, dln_, dqkv_, datt_, dtmp_, dfc_, dact_, dscores_, dlogits_, dmean_, drstd_, dtok_;
};

}  // namespace lmf
