// attention.h: causal multi-head attention with grouped-query attention (NKV divides NH;
// q head h reads kv head h / (NH/NKV)). Scale 1/sqrt(HS). The CPU reference keeps the softmax
// probabilities (B, NH, T, T) for backward; the CUDA flash kernel (issue 3) will not.
#pragma once
#include "core/tensor.h"

namespace lmf {

// qkv: (B, T, (NH + 2*NKV) * HS), rows [q heads | k heads | v heads] (RoPE already applied)
// out: (B, T, NH * HS); probs: (B, NH, T, T), probs[b,h,t,s] = 0 for s > t
void attention_forward(Tensor out, Tensor probs, Tensor qkv, int n_head, int n_kv_head);

// dqkv += gradient w.r.t. qkv; dprobs: (B, NH, T, T) scratch (overwritten)
void attention_backward(Tensor dqkv, Tensor dprobs, Tensor dout, Tensor qkv, Tensor probs, int n_head,
                        int n_kv_head);

// One query position against a KV cache (generation).
// q: (NH * HS); k_cache, v_cache: (maxT, NKV * HS), positions [0, n_ctx) valid; out: (NH * HS);
// scores: (NH, maxT) scratch
void attention_decode_forward(Tensor out, Tensor scores, Tensor q, Tensor k_cache, Tensor v_cache, int64_t n_ctx,
                              int n_head, int n_kv_head);

}  // namespace lmf
