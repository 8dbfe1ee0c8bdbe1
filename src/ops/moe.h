// moe.h: Mixture-of-Experts FFN layer (top-K router, E experts, optional capacity), fp32 CPU reference.
//
// Forward, for x: (N, C):
//   logits = x router_w^T                                  (N, E)
//   scores = softmax(logits) or sigmoid(logits)            (N, E), per MoeConfig::score
//   topk_idx[n] = the K experts of largest score, ties broken by the lower expert index
//   topk_w[n, k] = scores[n, topk_idx[n, k]], divided by their sum over k when renormalize
//   dispatch: the N*K (token, slot) assignments grouped by expert in increasing expert index and,
//     within an expert, in increasing (token, slot) order (a stable counting sort). With a capacity
//     (capacity_factor > 0) expert e keeps its first Ce = ceil(capacity_factor N K / E) assignments in
//     that order and drops the rest; a dropped assignment contributes 0 to out (dropless when 0).
//   expert e on its kept rows:  pre = x_rows w_in[e]^T (rows, F_in); act = swiglu(pre) or gelu(pre)
//     (rows, F); y = act w_out[e]^T (rows, C)
//   out[n] = sum over the kept slots k of n, in k order, of topk_w[n, k] y[row(n, k)]
//   aux loss (Switch) = aux_coef E sum_i f_i P_i, f_i = counts[i] / (N K) (routed assignments, before
//     the capacity; no gradient through f), P_i = mean_n scores[n, i]
//   z loss = z_coef mean_n logsumexp(logits[n])^2
// Weights: w_in: (E, F_in, C) with F_in = 2F for SwiGLU (rows [gate; up], as swiglu_forward) or F for
// GELU; w_out: (E, C, F) (nn.Linear layout per expert, as linear.h).
// Shared experts (cfg.n_shared > 0): n_shared dense FFNs of the same activation and width, applied to
//   every token and added to the routed output after the combine, in shared-expert order:
//   pre_s = x ws_in[s]^T (N, F_in); act_s = act(pre_s); y_s = act_s ws_out[s]^T (N, C);
//   out[n] += g_s[n] y_s[n], with g_s[n] = sigmoid(x[n] . ws_gate[s]) when cfg.shared_gate (Time-MoE),
//   else 1. ws_in: (n_shared, F_in, C); ws_out: (n_shared, C, F); ws_gate: (n_shared, C).
// Selection bias (aux-loss-free balancing, DeepSeek-V3): when MoeExtra::bias (E) is given, the top-K
//   choice ranks scores[n, e] + bias[e] (fp32 sum; ties still to the lower index) while topk_w keeps
//   the unbiased scores; the bias gets no gradient. moe_update_bias moves it between steps.
// With n_shared == 0 and no bias, results are bitwise those of the plain routed layer.
// Backward accumulates (+=) into dx, drouter_w, dw_in, dw_out (and dws_in, dws_out, dws_gate), including
// the gradient through the combine weights into the scores and logits and, scaled by d_aux, the aux
// (through P only) and z terms.
// Deterministic: single-threaded fixed-order loops and fixed-shape GEMMs (ops/blas.h).
// Plan, then run: the overloads taking a MoeScratch use only the planned buffers (the model's path:
// no allocation inside a step); the overloads without one allocate the scratch per call (tests).
// Limits: E <= kMoeMaxExperts, K <= kMoeMaxTopK.
// Dimension names: N rows (B*T), C d_model, E experts, K top-k, F d_expert, R saved expert rows.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/arena.h"
#include "core/tensor.h"

namespace lmf {

inline constexpr int64_t kMoeMaxExperts = 256;
inline constexpr int64_t kMoeMaxTopK = 16;

enum class MoeActivation { swiglu, gelu };
enum class MoeScore { softmax, sigmoid };

struct MoeConfig {
  int64_t E = 0;  // experts
  int64_t K = 0;  // experts per token, 1 <= K <= E
  int64_t C = 0;  // d_model
  int64_t F = 0;  // d_expert (hidden width after the activation)
  MoeActivation activation = MoeActivation::swiglu;
  MoeScore score = MoeScore::softmax;
  bool renormalize = true;     // combine weights = top-K scores / their sum
  float capacity_factor = 0;   // 0: dropless; else Ce = ceil(capacity_factor N K / E) per expert
  float aux_coef = 0;          // Switch load-balancing loss coefficient
  float z_coef = 0;            // router z-loss coefficient
  int64_t n_shared = 0;        // shared (always-on) experts, >= 0
  bool shared_gate = false;    // scale each shared expert's output by sigmoid(x . ws_gate[s])
};

// Optional inputs beyond the routed experts (undefined Tensor = absent).
struct MoeExtra {
  Tensor ws_in;    // (n_shared, F_in, C) f32; required when n_shared > 0
  Tensor ws_out;   // (n_shared, C, F) f32; required when n_shared > 0
  Tensor ws_gate;  // (n_shared, C) f32; required when n_shared > 0 and shared_gate
  Tensor bias;     // (E) f32 selection-only bias; absent: none
};

// Gradients of MoeExtra's shared-expert weights (+=), defined exactly when the weight is required.
struct MoeExtraGrads {
  Tensor dws_in;    // (n_shared, F_in, C)
  Tensor dws_out;   // (n_shared, C, F)
  Tensor dws_gate;  // (n_shared, C)
  // The caller's promise that dw_in and dw_out hold zeros (the first backward after zero_grad): the
  // GPU then writes the expert weight gradients instead of reading and adding (same values; the
  // grouped TN GEMMs skip a read of C). The CPU adds either way.
  bool expert_grads_zero = false;
};

// Width of an expert's first projection: 2F (SwiGLU) or F (GELU).
int64_t moe_f_in(const MoeConfig& cfg);
// Per-expert capacity Ce for N tokens (N K when dropless; never more than N K).
int64_t moe_capacity(const MoeConfig& cfg, int64_t N);
// Rows R of the saved per-row buffers: N K when dropless, else min(N K, E Ce).
int64_t moe_rows(const MoeConfig& cfg, int64_t N);

// What forward saves for backward (all on the CPU, written by moe_forward).
struct MoeState {
  Tensor logits;    // (N, E) f32: router logits
  Tensor scores;    // (N, E) f32: softmax or sigmoid of logits
  Tensor topk_idx;  // (N, K) i32: chosen experts, by decreasing score
  Tensor topk_w;    // (N, K) f32: combine weights
  Tensor slot_row;  // (N, K) i32: row of assignment (n, k) in perm, or -1 when dropped
  Tensor counts;    // (E) i32: assignments routed to each expert, before the capacity
  Tensor offsets;   // (E + 1) i32: expert e's kept rows are perm rows [offsets[e], offsets[e + 1])
  Tensor perm;      // (R) i32: n K + k of each kept row, grouped by expert; rows >= offsets[E] unused
  Tensor pre;       // (R, F_in) f32: x_rows w_in[e]^T
  Tensor act;       // (R, F) f32: activation of pre
  Tensor y;         // (R, C) f32: act w_out[e]^T, before the combine weight
  // shared experts (required when n_shared > 0; shared_g only with shared_gate)
  Tensor shared_pre;  // (n_shared, N, F_in) f32: x ws_in[s]^T
  Tensor shared_act;  // (n_shared, N, F) f32: activation of shared_pre
  Tensor shared_y;    // (n_shared, N, C) f32: shared_act ws_out[s]^T, before the gate
  Tensor shared_g;    // (n_shared, N) f32: sigmoid(x . ws_gate[s])
  // optional: written by forward when present (on the layer's device, so a GPU step needs no sync)
  Tensor stats;       // (3) f32: aux loss, z loss, dropped assignments
};

// Scratch of one call (reusable by every MoE layer of a model; nothing in it survives the call).
// Row buffers have the activation dtype (f32 on the CPU); dlogits is f32.
struct MoeScratch {
  Tensor xg;       // (R, C): x gathered in perm order
  // xg belongs to this layer (a training plan keeps one per layer): the backward finds the forward's
  // gather still there and does not gather again. False: xg is shared scratch, regathered.
  bool xg_saved = false;
  Tensor dy;       // (R, C)
  Tensor dact;     // (R, F)
  Tensor dpre;     // (R, F_in)
  Tensor dxg;      // (R, C)
  Tensor dlogits;  // (N, E) f32
  // shared experts (n_shared > 0)
  Tensor dys;      // (N, C)
  Tensor dacts;    // (N, F)
  Tensor dpres;    // (N, F_in)
  Tensor dgl;      // (N) f32: gradient of the shared gate's logit
  // bf16 (GPU) plans only: bf16 copies that feed the weight-gradient GEMMs, and the shared experts'
  // f32 contribution to dx
  Tensor dlogits_bf16;  // (N, E) bf16
  Tensor dgl_bf16;      // (N) bf16 (n_shared > 0)
  Tensor dsx;           // (N, C) f32 (n_shared > 0)
};

// Named specs of one layer's saved state (prefix + field name; row buffers in dtype adt, the router
// tensors f32/i32) and of the scratch (training only needs the backward buffers), and views of them in
// an arena built from those specs.
std::vector<TensorSpec> moe_state_specs(const MoeConfig& cfg, int64_t N, DType adt, const std::string& prefix);
MoeState moe_state_bind(const Arena& arena, const MoeConfig& cfg, const std::string& prefix);
// The same views through `get(field)` (field as in the specs without the prefix): the caller maps each
// field to its tensor (the trunk shares the row buffers of recomputed layers, model/plan.h Recompute).
MoeState moe_state_bind(const std::function<Tensor(const std::string& field)>& get, const MoeConfig& cfg);
// The routing state among those fields (logits, scores, top-k, slots, counts, offsets, perm, stats: small,
// and read after the backward by the selection-bias update and the metrics) as opposed to the row buffers
// (the experts' pre-activations, activations and outputs).
bool moe_state_is_routing(const std::string& field);
std::vector<TensorSpec> moe_scratch_specs(const MoeConfig& cfg, int64_t N, DType adt, bool training,
                                          const std::string& prefix);
MoeScratch moe_scratch_bind(const Arena& arena, const MoeConfig& cfg, bool training, const std::string& prefix);

struct MoeLosses {
  float aux = 0;        // aux_coef E sum_i f_i P_i (0 when aux_coef is 0)
  float z = 0;          // z_coef mean_n logsumexp(logits[n])^2 (0 when z_coef is 0)
  int64_t dropped = 0;  // assignments dropped by the capacity
};

// out: (N, C); x: (N, C); router_w: (E, C); w_in: (E, F_in, C); w_out: (E, C, F); state as above.
// out is overwritten. Returns the aux terms (the caller adds them to the loss) and the drop count.
MoeLosses moe_forward(Tensor out, const MoeState& state, Tensor x, Tensor router_w, Tensor w_in, Tensor w_out,
                      const MoeConfig& cfg);
// The same with shared experts and/or a selection bias (extra as above).
MoeLosses moe_forward(Tensor out, const MoeState& state, Tensor x, Tensor router_w, Tensor w_in, Tensor w_out,
                      const MoeExtra& extra, const MoeConfig& cfg);

// The same on planned scratch (no allocation).
MoeLosses moe_forward(Tensor out, const MoeState& state, const MoeScratch& scratch, Tensor x, Tensor router_w,
                      Tensor w_in, Tensor w_out, const MoeExtra& extra, const MoeConfig& cfg);

// dx (N, C), drouter_w (E, C), dw_in (E, F_in, C), dw_out (E, C, F): += ; dout: (N, C); the other
// tensors as passed to (and saved by) moe_forward. d_aux scales the aux and z gradients (1 when
// aux + z are added to the loss as returned).
void moe_backward(Tensor dx, Tensor drouter_w, Tensor dw_in, Tensor dw_out, Tensor dout, const MoeState& state,
                  Tensor x, Tensor router_w, Tensor w_in, Tensor w_out, const MoeConfig& cfg, float d_aux = 1.0f);
// The same with shared experts: dextra's gradients += as well (the bias has no gradient).
void moe_backward(Tensor dx, Tensor drouter_w, Tensor dw_in, Tensor dw_out, const MoeExtraGrads& dextra, Tensor dout,
                  const MoeState& state, Tensor x, Tensor router_w, Tensor w_in, Tensor w_out, const MoeExtra& extra,
                  const MoeConfig& cfg, float d_aux = 1.0f);

// The same on planned scratch (no allocation).
void moe_backward(Tensor dx, Tensor drouter_w, Tensor dw_in, Tensor dw_out, const MoeExtraGrads& dextra, Tensor dout,
                  const MoeState& state, const MoeScratch& scratch, Tensor x, Tensor router_w, Tensor w_in,
                  Tensor w_out, const MoeExtra& extra, const MoeConfig& cfg, float d_aux);

// Aux-loss-free balancing step: bias (E) f32 +=, counts (E) i32 (MoeState::counts of the last step):
// bias[i] += rate when counts[i] is below the mean load sum(counts) / E, -= rate when above, unchanged
// when equal (the sign of the load error). CPU only.
void moe_update_bias(Tensor bias, Tensor counts, float rate);

// CUDA workspace (lmf::cuda_workspace) the GPU MoE layer needs for N tokens, besides the GEMMs'.
size_t moe_cuda_workspace(const MoeConfig& cfg, int64_t N);

namespace cuda {  // launchers (moe.cu), called by the op entries after validation; raw device pointers
// The GPU layer runs in bf16 mixed precision: x, out, dx, dout, the expert weights (w_in, w_out, ws_in,
// ws_out), the saved rows (pre, act, y, shared_*) and the row scratch are bf16; the router weight, the
// shared gate, the selection bias, logits, scores, combine weights, stats and every weight gradient f32.
struct MoeDims {
  int64_t N, E, K, C, F, F_in, R, cap, S;
};
struct MoePtrs {
  // inputs / weights
  const bf16* x; const float* router_w; const bf16* w_in; const bf16* w_out;
  const bf16* ws_in; const bf16* ws_out; const float* ws_gate; const float* bias;
  // state
  float* logits; float* scores; int32_t* topk_idx; float* topk_w; int32_t* slot_row; int32_t* counts;
  int32_t* offsets; int32_t* perm; bf16* pre; bf16* act; bf16* y; float* stats;
  bf16* shared_pre; bf16* shared_act; bf16* shared_y; float* shared_g;
  // scratch
  bf16* xg; bf16* dy; bf16* dact; bf16* dpre; bf16* dxg; float* dlogits; bf16* dlogits_bf16;
  bf16* dys; bf16* dacts; bf16* dpres; float* dgl; bf16* dgl_bf16; float* dsx;
  // forward output / backward tensors
  bf16* out; bf16* dx; const bf16* dout;
  float* drouter_w; float* dw_in; float* dw_out; float* dws_in; float* dws_out; float* dws_gate;
  bool expert_grads_zero;  // MoeExtraGrads::expert_grads_zero
  bool xg_saved;           // MoeScratch::xg_saved
};
void moe_forward(const MoePtrs& p, const MoeDims& d, const MoeConfig& cfg);
void moe_backward(const MoePtrs& p, const MoeDims& d, const MoeConfig& cfg, float d_aux);
void moe_update_bias(float* bias, const int32_t* counts, int64_t E, float rate);
}  // namespace cuda

}  // namespace lmf
