// block.h: the transformer layer, written once (DESIGN.md section 2).
//
// block_forward / block_backward run one layer over views of its weights and saved activations,
// driven by BlockKernels, a table of kernel choices fixed at plan time (block_kernels()). Training in
// fp32, tf32 and bf16, evaluation, and KV-cache decoding all call these two functions; nothing else
// in lmforge spells out a layer.
//
// One layer, pre-norm:
//   ln1  = norm1(x)                                   (computed before the block: see "tail" below)
//   res1 = x + proj(attn(rope(qkv(ln1))))             [comm: row-parallel output reduced before the add]
//   ln2  = norm2(res1)
//   res2 = res1 + ffn(ln2)                            dense: mproj(act(fc(ln2))), or MoE   [comm: the same]
//   tail = next_norm(res2)                            the next layer's norm1, or the final norm
// The block ends with the norm that reads its output (its "tail"), because the fused kernels add the
// residual and normalise in one pass; the trunk runs the first layer's norm1 (its "head") itself. So
// block l's tail writes block l+1's ln1, and block l's backward starts with that norm's backward. The
// op order is the one a textbook pre-norm loop runs; only the grouping differs.
//
// Buffers (B, T, ...) row-major; N = B T rows; C = d_model; QKV = (NH + 2 NKV) HS; FC = fc_dim. With
// sequence parallelism the residual stream and the norms' buffers (x, ln1, res1, ln2, res2, tail, d_res,
// d_ln) hold this rank's N / tp rows: (N / tp, C).
// Backward: d_res holds d(loss)/d(residual stream) and walks down the layers (each norm backward
// adds into it); d_ln receives d(loss)/d(a norm's output) from the layer above it (or the output
// end), the other d_* buffers are scratch shared by all layers.
#pragma once
#include <cstdint>
#include <functional>

#include "core/comm.h"
#include "model/config.h"
#include "model/plan.h"
#include "ops/gemm_math.h"
#include "ops/grad_mode.h"
#include "ops/moe.h"

namespace lmf {

class OpProfiler;
class KvCache;
struct PagedBatch;

enum class AttentionImpl {
  reference,  // attention_forward / _backward, probabilities (B, NH, T, T) kept (fp32 and tf32 plans)
  flash,      // fused flash attention, log-sum-exp kept (bf16 plans; BlockKernels::flash picks the kernels)
  paged,      // serving: the rows' k and v written into a paged KvCache, each row attends to its sequence's
              // cached positions (ops/paged_attention.h; forward only)
};

// The table of kernel choices, fixed at plan time. Every combination computes the same function;
// the fused entries are faster and change rounding only where the kernels' contracts say so.
struct BlockKernels {
  AttentionImpl attention = AttentionImpl::reference;
  FlashKernels flash = FlashKernels::lmforge;  // kernels of AttentionImpl::flash
  bool fused_residual_norm = false;  // residual add + next norm as one kernel (else residual_forward, norm)
  bool fused_bias_gelu = false;      // GELU in the fc GEMM's epilogue, its backward in the mproj dX GEMM's
  bool bias_grad_from_norm = false;  // proj / mproj bias gradients as the norm backward's column sums
  bool gemm_reads_copy = false;      // GEMMs read the bf16 weight copy (norms, router, gates: the masters)
  GemmMath gemm_math = GemmMath::fp32;  // f32 GEMMs on the GPU: true fp32, or TF32 tensor cores (tf32 plans)
  bool overwrite_act_grads = false;  // backward ops overwrite activation gradients (else zero, then +=)
  // training: the dense FFN's activation output (when not fused into the fc GEMM) is one buffer shared by
  // the layers, recomputed from the kept fc output right before each layer's mproj backward (the same
  // kernel: the same bits), instead of one (B, T, d_ff) buffer per layer
  bool recompute_act = false;
  bool lazy_weight_grads = false;    // right after zero_grad the weight-gradient GEMMs overwrite (beta 0)
  Communicator* comm = nullptr;      // tensor parallelism's reductions (single_rank(): none)
  // Sequence parallelism (with tensor parallelism): the norms, residual adds and the residual stream
  // hold only this rank's N / tp rows; a column-parallel layer's input is all-gathered first, a
  // row-parallel layer's output reduce-scattered (instead of all-reduced), and backward the reverse.
  bool sequence_parallel = false;
};
// The table for a plan: bf16 plans take every fused kernel and the bf16 copy, fp32 / tf32 plans the
// reference composition; serving plans swap the attention for the paged one.
BlockKernels block_kernels(const ModelConfig& c, const ModelPlan& p);

struct NormWeights {
  Tensor w, b;  // (C); b absent for RMSNorm or without biases
};
struct NormOut {
  Tensor out, mean, rstd;  // out (B, T, C); mean, rstd (N); mean absent for RMSNorm
};

// One layer's parameters, or their gradients, or their bf16 copies: views into the owner's arena.
struct BlockWeights {
  NormWeights norm1, norm2;
  Tensor qkv_w, qkv_b, proj_w, proj_b;  // (QKV, C), (QKV); (C, NH HS), (C)
  Tensor fc_w, fc_b, mproj_w, mproj_b;  // dense FFN: (FC, C), (FC); (C, F), (C)
  // MoE FFN (instead of fc / mproj): router, routed experts, shared experts, selection bias
  Tensor router_w, w_in, w_out, ws_in, ws_out, ws_gate, sel_bias;
  bool moe() const { return router_w.defined(); }
};

// What one layer's forward saves for its backward.
struct BlockActs {
  NormOut ln1;      // norm1(x): written before the block (the previous block's tail, or the trunk's head)
  Tensor qkv;       // (B, T, QKV)
  Tensor probs;     // reference attention: (B, NH, T, T); flash: the log-sum-exp (B, NH, T)
  Tensor att;       // (B, T, NH HS)
  Tensor res1;      // (B, T, C)
  NormOut ln2;
  Tensor fc, act;   // dense: (B, T, FC), (B, T, F)
  Tensor res2;      // (B, T, C)
  MoeState moe;     // MoE layers: the routing and experts' saved state
  MoeScratch moe_scratch;  // shared by the layers, except xg in training plans (each layer's own)
};

// The backward's activation-gradient workspace, shared by every layer.
struct BlockGrads {
  Tensor d_res, d_ln, d_qkv, d_att, d_fc, d_act, d_probs;  // d_probs: (B,NH,T,T) reference, (B,NH,T) flash
};

// FLOPs of one layer's forward ops at (B, T), for the profiler (backward: twice each).
struct BlockFlops {
  double qkv = 0, proj = 0, fc = 0, mproj = 0, attn = 0, moe = 0;
};
BlockFlops block_flops(const ModelConfig& c, const MoeConfig& m, int64_t B, int64_t T);

// A forward's activations as they are computed (the batch-invariance harness, serve/invariance.h, finds
// the first op whose output differs): (layer, the op, its output, rows first). Layer -1 is the input
// end and the first norm; n_layer - 1's "next norm" is the final norm.
using ActivationTap = std::function<void(int layer, const char* op, Tensor out)>;

// Everything a block step of layer `layer` reads and writes. The trunk (model/model.h) builds one per
// call from its tables; nothing here owns memory.
struct BlockStep {
  const ModelConfig* cfg = nullptr;
  const MoeConfig* moe = nullptr;
  const BlockKernels* k = nullptr;
  const BlockFlops* flops = nullptr;
  OpProfiler* prof = nullptr;
  int layer = 0;
  int64_t B = 0, T = 0;
  const BlockWeights* w = nullptr;   // masters (norms, router, shared gates, selection bias)
  const BlockWeights* wg = nullptr;  // GEMM operands: the bf16 copy or the masters (k->gemm_reads_copy)
  const BlockWeights* g = nullptr;   // gradients (backward)
  NormWeights tail_w, tail_g;        // the tail norm's weights and gradients
  Tensor x;                          // the residual stream into the block (B, T, C): the previous res2
  BlockActs* a = nullptr;
  NormOut tail;                      // the tail norm's output: the next block's ln1, or the trunk's output
  const BlockGrads* d = nullptr;
  Tensor rope_freqs;                 // (context_length, HS/2, 2) with RoPE
  // serving (AttentionImpl::paged): the KV cache and the step's rows (positions, slots, block tables)
  KvCache* cache = nullptr;
  const PagedBatch* batch = nullptr;
  // sequence parallelism (BlockKernels::sequence_parallel): (B, T, C) scratch shared by the layers,
  // for a gathered norm output, a gathered d_res, and a row- or column-parallel layer's partial sums
  Tensor seq_gathered, seq_grad, seq_partial;
  // backward: the weight gradients hold zeros (the first backward after zero_grad), and the scale of
  // the MoE auxiliary losses' gradient (the micro-batch's loss scale)
  bool grads_zero = false;
  float d_aux = 1.0f;
  const ActivationTap* tap = nullptr;  // forward: each op's output (null: none)
};

void block_forward(const BlockStep& s);
// On entry d_res = d(loss)/d(res2) along the residual path (zero for the last layer) and d_ln =
// d(loss)/d(tail.out); the step adds every gradient into the layer's weights' (s.g) and leaves d_res =
// d(loss)/d(x) along every path but ln1's, and d_ln = d(loss)/d(ln1), for the norm that wrote ln1 (the
// previous block's tail, or the trunk's head) to finish.
void block_backward(const BlockStep& s);
// Training with ModelPlan::recompute: rerun, right before block_backward(s), the part of the layer's forward
// whose outputs live in shared buffers (attention: qkv projection, RoPE, attention; full: the whole
// block_forward, which rewrites its kept outputs res2 and tail with the same bits). No activation taps.
void block_recompute(const BlockStep& s, Recompute what);

// The norms of docs/MODEL.md, dispatched on the config's kind (LayerNorm or RMSNorm).
void norm_forward(const ModelConfig& c, const NormOut& out, Tensor inp, const NormWeights& w);
void norm_backward(const ModelConfig& c, Tensor dinp, const NormWeights& dw, Tensor dout, Tensor inp,
                   const NormWeights& w, const NormOut& saved, Tensor dinp_sum = Tensor());

}  // namespace lmf
