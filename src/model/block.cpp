#include "model/block.h"

#include "core/profiler.h"
#include "model/kv_cache.h"
#include "ops/activation.h"
#include "ops/attention.h"
#include "ops/linear.h"
#include "ops/norm.h"
#include "ops/paged_attention.h"
#include "ops/residual.h"
#include "ops/rope.h"

namespace lmf {

BlockKernels block_kernels(const ModelConfig& c, const ModelPlan& p) {
  BlockKernels k;
  const bool fused = p.bf16();
  k.attention = p.serve ? AttentionImpl::paged : fused ? AttentionImpl::flash : AttentionImpl::reference;
  k.flash = p.attention;
  k.fused_residual_norm = fused;
  k.fused_bias_gelu = fused && c.activation == ActivationKind::gelu && c.bias;  // the epilogue needs a bias
  k.bias_grad_from_norm = fused;
  k.gemm_reads_copy = fused;
  k.gemm_math = p.precision == Precision::tf32 ? GemmMath::tf32 : GemmMath::fp32;
  k.overwrite_act_grads = fused;
  k.recompute_act = fused && p.training && !k.fused_bias_gelu;  // GPU training, where memory binds (SwiGLU)
  // Lazy weight gradients: the backward writes them (beta 0) instead of zero_grad clearing them and the
  // backward adding (GPT-2 on the CPU: 0.5 GB fewer written and read a step). The CPU MoE backward
  // always adds, so MoE models keep their gradients eager on the CPU.
  bool moe = false;
  for (int l = 0; l < c.n_layer; ++l) moe = moe || c.is_moe_layer(l);
  k.lazy_weight_grads = p.device == Device::cuda ? fused : !fused && !moe;
  k.comm = &single_rank();
  return k;
}

BlockFlops block_flops(const ModelConfig& c, const MoeConfig& m, int64_t B, int64_t T) {
  const double N = static_cast<double>(B * T), C = static_cast<double>(c.d_model);
  const double HS = static_cast<double>(c.head_size()), NH = c.n_head;
  BlockFlops f;
  f.qkv = 2.0 * N * C * static_cast<double>(c.qkv_dim());
  f.proj = 2.0 * N * NH * HS * C;
  f.fc = 2.0 * N * C * static_cast<double>(c.fc_dim());
  f.mproj = 2.0 * N * static_cast<double>(c.d_ff) * C;
  f.attn = 4.0 * static_cast<double>(B) * NH * static_cast<double>(T) * static_cast<double>(T) * HS / 2;  // causal half
  if (m.E > 0)
    f.moe = 2.0 * N * (static_cast<double>(m.E) * C + static_cast<double>(m.K + m.n_shared) *
                                                           static_cast<double>(moe_f_in(m) + m.F) * C);
  return f;
}

void norm_forward(const ModelConfig& c, const NormOut& out, Tensor inp, const NormWeights& w) {
  if (c.norm == NormKind::layernorm) layernorm_forward(out.out, out.mean, out.rstd, inp, w.w, w.b, c.norm_eps);
  else rmsnorm_forward(out.out, out.rstd, inp, w.w, c.norm_eps);
}

void norm_backward(const ModelConfig& c, Tensor dinp, const NormWeights& dw, Tensor dout, Tensor inp,
                   const NormWeights& w, const NormOut& saved, Tensor dinp_sum) {
  if (c.norm == NormKind::layernorm)
    layernorm_backward(dinp, dw.w, dw.b, dout, inp, w.w, saved.mean, saved.rstd, dinp_sum);
  else rmsnorm_backward(dinp, dw.w, dout, inp, w.w, saved.rstd, dinp_sum);
}

namespace {

template <class F>
void timed(const BlockStep& s, const char* name, double flops, F&& f) {
  ProfileScope scope(s.prof, name, flops);
  f();
}

// Where a tensor-parallel run sums partial results over its ranks.
void reduce(const BlockStep& s, Tensor t) {
  if (s.k->comm) s.k->comm->all_reduce_sum(t);
}

bool seq_par(const BlockStep& s) { return s.k->sequence_parallel; }

// Sequence parallelism: this rank's rows of `local` all-gathered into `full` (the rows in rank order)
// and `full` returned; otherwise `local` itself.
Tensor seq_gather(const BlockStep& s, Tensor local, Tensor full) {
  if (!seq_par(s)) return local;
  s.k->comm->all_gather(full.view({full.numel()}), local.view({local.numel()}));
  return full;
}

// A row-parallel layer's output (or a column-parallel layer's input gradient) `partial`, every row,
// summed over the ranks: with sequence parallelism this rank's rows into `out` (reduce-scatter),
// otherwise in place (`partial` is `out`).
void seq_reduce(const BlockStep& s, Tensor partial, Tensor out) {
  if (!seq_par(s)) {
    reduce(s, out);
    return;
  }
  s.k->comm->reduce_scatter_sum(out.view({out.numel()}), partial.view({partial.numel()}));
}

// A row-parallel layer's bias (attention and MLP output projections): added once, by the group's rank 0,
// so the sum of the ranks' partial outputs holds it once (every rank's gradient of it is the same).
Tensor row_bias(const BlockStep& s, Tensor b) { return s.k->comm && s.k->comm->rank() != 0 ? Tensor() : b; }

// res = a + b, out = norm(res): one fused kernel, or the residual add then the norm.
void residual_norm(const BlockStep& s, Tensor res, Tensor a, Tensor b, const NormOut& out, const NormWeights& w) {
  const ModelConfig& c = *s.cfg;
  if (s.k->fused_residual_norm) {
    timed(s, "residual + norm fwd", 0, [&] {
      if (c.norm == NormKind::layernorm) residual_layernorm_forward(res, out.out, out.mean, out.rstd, a, b, w.w, w.b, c.norm_eps);
      else residual_rmsnorm_forward(res, out.out, out.rstd, a, b, w.w, c.norm_eps);
    });
    return;
  }
  timed(s, "residual fwd", 0, [&] { residual_forward(res, b, a); });
  timed(s, "norm fwd", 0, [&] { norm_forward(c, out, res, w); });
}

void attention_step_forward(const BlockStep& s) {
  const ModelConfig& c = *s.cfg;
  BlockActs& a = *s.a;
  switch (s.k->attention) {
    case AttentionImpl::reference:
      timed(s, "attention fwd", s.flops->attn, [&] {
        attention_forward(a.att, a.probs, a.qkv, c.n_head, c.n_kv_head, s.k->gemm_math);
      });
      return;
    case AttentionImpl::flash:
      timed(s, "flash attention fwd", s.flops->attn, [&] {
        flash_attention_forward(a.att, a.probs, a.qkv, c.n_head, c.n_kv_head, s.k->flash);
      });
      return;
    case AttentionImpl::paged: {
      LMF_CHECK(s.cache != nullptr && s.batch != nullptr && s.B == 1, "paged attention: a KV cache, a batch and B = 1");
      const int64_t N = s.T, D = c.n_head * c.head_size();
      const Tensor qkv = a.qkv.view({N, c.qkv_dim()});
      const PagedBatch& b = *s.batch;
      timed(s, "kv cache write", 0, [&] {
        kv_cache_write(s.cache->k(s.layer), s.cache->v(s.layer), qkv, b.slots, c.n_head, c.n_kv_head);
      });
      timed(s, "paged attention fwd", 0, [&] {
        paged_attention_forward(a.att.view({N, D}), qkv, s.cache->k(s.layer), s.cache->v(s.layer), b.block_tables,
                                b.seqs, b.positions, c.n_head, c.n_kv_head);
      });
      return;
    }
  }
}

// MoE layers: the router reads the f32 router weight (fp32 logits), the experts the GEMM copies; the
// shared gate and the selection bias are f32.
MoeExtra moe_extra(const BlockStep& s) {
  return MoeExtra{s.wg->ws_in, s.wg->ws_out, s.w->ws_gate, s.w->sel_bias};
}

// act = the activation of fc (dense FFN, unfused): the forward, and recompute_act's backward
void activation_forward(const BlockStep& s, const char* what) {
  BlockActs& a = *s.a;
  timed(s, what, 0, [&] {
    if (s.cfg->activation == ActivationKind::gelu) gelu_forward(a.act, a.fc);
    else swiglu_forward(a.act, a.fc);
  });
}

// ln2 (every row) -> out (every row; the residual add comes later)
void ffn_forward(const BlockStep& s, Tensor ln2, Tensor out) {
  const ModelConfig& c = *s.cfg;
  const BlockWeights &w = *s.w, &wg = *s.wg;
  BlockActs& a = *s.a;
  const int64_t N = s.B * s.T, C = c.d_model;
  if (w.moe()) {
    timed(s, "moe fwd", s.flops->moe, [&] {
      moe_forward(out.view({N, C}), a.moe, a.moe_scratch, ln2.view({N, C}), w.router_w, wg.w_in, wg.w_out,
                  moe_extra(s), *s.moe);
    });
    return;
  }
  if (s.k->fused_bias_gelu) {
    timed(s, "linear fc + gelu fwd", s.flops->fc, [&] { linear_gelu_forward(a.act, a.fc, ln2, wg.fc_w, wg.fc_b); });
  } else {
    timed(s, "linear fc fwd", s.flops->fc, [&] { linear_forward(a.fc, ln2, wg.fc_w, wg.fc_b, s.k->gemm_math); });
    activation_forward(s, "activation fwd");
  }
  timed(s, "linear mproj fwd", s.flops->mproj, [&] {
    linear_forward(out, a.act, wg.mproj_w, row_bias(s, wg.mproj_b), s.k->gemm_math);
  });
}

// The mode of a backward op's activation-gradient output: overwritten, or zeroed here and accumulated.
GradMode act_grad(const BlockStep& s, Tensor t) {
  if (s.k->overwrite_act_grads) return GradMode::Overwrite;
  tensor_zero(t);
  return GradMode::Accumulate;
}

// dout = d(res2) (every row) -> dln = d(ln2) (every row), the FFN's weight gradients; ln2: its input
void ffn_backward(const BlockStep& s, GradMode wmode, Tensor ln2, Tensor dout, Tensor dln) {
  const ModelConfig& c = *s.cfg;
  const BlockWeights &w = *s.w, &wg = *s.wg, &g = *s.g;
  const BlockGrads& d = *s.d;
  BlockActs& a = *s.a;
  const int64_t N = s.B * s.T, C = c.d_model;
  const BlockFlops& f = *s.flops;
  if (w.moe()) {
    tensor_zero(dln);
    timed(s, "moe bwd", 2 * f.moe, [&] {
      moe_backward(dln.view({N, C}), g.router_w, g.w_in, g.w_out,
                   MoeExtraGrads{g.ws_in, g.ws_out, g.ws_gate, s.grads_zero}, dout.view({N, C}), a.moe,
                   a.moe_scratch, ln2.view({N, C}), w.router_w, wg.w_in, wg.w_out, moe_extra(s), *s.moe,
                   s.d_aux);
    });
    return;
  }
  // with bias_grad_from_norm the mproj bias gradient came from the tail norm's backward
  const Tensor mproj_db = s.k->bias_grad_from_norm ? Tensor() : g.mproj_b;
  if (s.k->fused_bias_gelu) {
    timed(s, "linear mproj + gelu bwd", 2 * f.mproj, [&] {
      linear_backward_dgelu(d.d_fc, g.mproj_w, mproj_db, dout, a.act, wg.mproj_w, a.fc, wmode);
    });
  } else {
    if (s.k->recompute_act) activation_forward(s, "activation fwd (recompute)");
    timed(s, "linear mproj bwd", 2 * f.mproj, [&] {
      linear_backward(d.d_act, g.mproj_w, mproj_db, dout, a.act, wg.mproj_w, act_grad(s, d.d_act), wmode,
                      s.k->gemm_math);
    });
    tensor_zero(d.d_fc);
    timed(s, "activation bwd", 0, [&] {
      if (c.activation == ActivationKind::gelu) gelu_backward(d.d_fc, d.d_act, a.fc);
      else swiglu_backward(d.d_fc, d.d_act, a.fc);
    });
  }
  timed(s, "linear fc bwd", 2 * f.fc, [&] {
    linear_backward(dln, g.fc_w, g.fc_b, d.d_fc, ln2, wg.fc_w, act_grad(s, dln), wmode, s.k->gemm_math);
  });
}

void attention_step_backward(const BlockStep& s) {
  const ModelConfig& c = *s.cfg;
  const BlockGrads& d = *s.d;
  BlockActs& a = *s.a;
  switch (s.k->attention) {
    case AttentionImpl::reference:
      tensor_zero(d.d_qkv);
      timed(s, "attention bwd", 2 * s.flops->attn, [&] {
        attention_backward(d.d_qkv, d.d_probs, d.d_att, a.qkv, a.probs, c.n_head, c.n_kv_head, s.k->gemm_math);
      });
      return;
    case AttentionImpl::flash:
      timed(s, "flash attention bwd", 2 * s.flops->attn, [&] {
        flash_attention_backward(d.d_qkv, d.d_probs, d.d_att, a.qkv, a.att, a.probs, c.n_head, c.n_kv_head,
                                 GradMode::Overwrite, s.k->flash);
      });
      return;
    case AttentionImpl::paged: fail("block_backward: paged attention is forward only (serving)");
  }
}

void tap(const BlockStep& s, const char* op, Tensor out) {
  if (s.tap) (*s.tap)(s.layer, op, out);
}

// ln1 -> qkv (projection, RoPE) -> att: the attention half's first part (block_forward, and
// block_recompute's attention mode)
void qkv_attention_forward(const BlockStep& s) {
  const ModelConfig& c = *s.cfg;
  const BlockWeights& wg = *s.wg;
  BlockActs& a = *s.a;
  const Tensor ln1 = seq_gather(s, a.ln1.out, s.seq_gathered);
  timed(s, "linear qkv fwd", s.flops->qkv, [&] { linear_forward(a.qkv, ln1, wg.qkv_w, wg.qkv_b, s.k->gemm_math); });
  if (c.positions == PositionKind::rope)
    timed(s, "rope fwd", 0, [&] {
      if (s.batch) rope_forward(a.qkv, s.rope_freqs, c.n_head, c.n_kv_head, s.batch->positions);
      else rope_forward(a.qkv, s.rope_freqs, c.n_head, c.n_kv_head);
    });
  tap(s, c.positions == PositionKind::rope ? "qkv projection + rope" : "qkv projection", a.qkv);
  attention_step_forward(s);
  tap(s, "attention", a.att);
}

}  // namespace

void block_forward(const BlockStep& s) {
  const ModelConfig& c = *s.cfg;
  const BlockWeights &w = *s.w, &wg = *s.wg;
  BlockActs& a = *s.a;
  auto tap = [&](const char* op, Tensor out) { lmf::tap(s, op, out); };
  qkv_attention_forward(s);
  const Tensor proj_out = seq_par(s) ? s.seq_partial : a.res1;
  timed(s, "linear proj fwd", s.flops->proj, [&] {
    linear_forward(proj_out, a.att, wg.proj_w, row_bias(s, wg.proj_b), s.k->gemm_math);
  });
  seq_reduce(s, proj_out, a.res1);
  residual_norm(s, a.res1, s.x, a.res1, a.ln2, w.norm2);
  tap("output projection + residual", a.res1);
  tap("second norm", a.ln2.out);
  const Tensor ffn_out = seq_par(s) ? s.seq_partial : a.res2;
  ffn_forward(s, seq_gather(s, a.ln2.out, s.seq_gathered), ffn_out);
  seq_reduce(s, ffn_out, a.res2);
  residual_norm(s, a.res2, a.res1, a.res2, s.tail, s.tail_w);
  tap(c.is_moe_layer(s.layer) ? "MoE + residual" : "MLP + residual", a.res2);
  tap("next norm (the next layer's first, or the final norm)", s.tail.out);
}

void block_backward(const BlockStep& s) {
  const ModelConfig& c = *s.cfg;
  const BlockWeights &w = *s.w, &wg = *s.wg, &g = *s.g;
  const BlockGrads& d = *s.d;
  BlockActs& a = *s.a;
  const BlockFlops& f = *s.flops;
  // Right after zero_grad, with lazy weight gradients, the weight-gradient GEMMs write (beta 0).
  const GradMode wmode = s.k->lazy_weight_grads && s.grads_zero ? GradMode::Overwrite : GradMode::Accumulate;
  const bool db_norm = s.k->bias_grad_from_norm;
  // The tail norm: d_res += its input gradient; its column sums are the mproj bias gradient (the layer
  // that wrote res2's increment), with bias_grad_from_norm.
  timed(s, "norm bwd", 0, [&] {
    norm_backward(c, d.d_res, s.tail_g, d.d_ln, a.res2, s.tail_w, s.tail, db_norm ? g.mproj_b : Tensor());
  });
  // (sequence parallelism: the FFN's input and output gradient gathered, its input gradient's partial
  // sums reduce-scattered; the input is gathered again rather than kept)
  const Tensor ffn_dln = seq_par(s) ? s.seq_partial : d.d_ln;
  ffn_backward(s, wmode, seq_gather(s, a.ln2.out, s.seq_gathered), seq_gather(s, d.d_res, s.seq_grad), ffn_dln);
  seq_reduce(s, ffn_dln, d.d_ln);
  timed(s, "norm bwd", 0, [&] {
    norm_backward(c, d.d_res, g.norm2, d.d_ln, a.res1, w.norm2, a.ln2, db_norm ? g.proj_b : Tensor());
  });
  const Tensor proj_dout = seq_gather(s, d.d_res, s.seq_grad);
  timed(s, "linear proj bwd", 2 * f.proj, [&] {
    linear_backward(d.d_att, g.proj_w, db_norm ? Tensor() : g.proj_b, proj_dout, a.att, wg.proj_w,
                    act_grad(s, d.d_att), wmode, s.k->gemm_math);
  });
  attention_step_backward(s);
  if (c.positions == PositionKind::rope)
    timed(s, "rope bwd", 0, [&] { rope_backward(d.d_qkv, s.rope_freqs, c.n_head, c.n_kv_head); });
  const Tensor qkv_dln = seq_par(s) ? s.seq_partial : d.d_ln;
  const Tensor ln1 = seq_gather(s, a.ln1.out, s.seq_gathered);
  timed(s, "linear qkv bwd", 2 * f.qkv, [&] {
    linear_backward(qkv_dln, g.qkv_w, g.qkv_b, d.d_qkv, ln1, wg.qkv_w, act_grad(s, qkv_dln), wmode, s.k->gemm_math);
  });
  seq_reduce(s, qkv_dln, d.d_ln);
}

void block_recompute(const BlockStep& s, Recompute what) {
  BlockStep r = s;
  r.tap = nullptr;
  if (what == Recompute::attention) qkv_attention_forward(r);
  else if (what == Recompute::full) block_forward(r);
}

}  // namespace lmf
