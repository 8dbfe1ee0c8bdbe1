// attention.h: causal multi-head attention with grouped-query attention (NKV divides NH;
// q head h reads kv head h / (NH/NKV)). Scale 1/sqrt(HS). Both backends keep the softmax
// probabilities (B, NH, T, T) for backward (both backends compute them with GEMMs per head and
// row kernels; a flash kernel that does not keep them may replace them).
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
// CPU only (generation runs on the CPU): fails for GPU tensors.
void attention_decode_forward(Tensor out, Tensor scores, Tensor q, Tensor k_cache, Tensor v_cache, int64_t n_ctx,
                              int n_head, int n_kv_head);

namespace cuda {  // launchers (attention.cu); called by the op entries after validation
// out: (B, T, NH*HS); probs, dprobs: (B, NH, T, T); qkv, dqkv: (B, T, (NH + 2*NKV) * HS); dout: (B, T, NH*HS).
// scale = 1/sqrt(HS) as the op entry computes it. Backward accumulates into dqkv; dprobs is overwritten.
void attention_forward(float* out, float* probs, const float* qkv, int64_t B, int64_t T, int64_t NH, int64_t NKV,
                       int64_t HS, float scale);
void attention_backward(float* dqkv, float* dprobs, const float* dout, const float* qkv, const float* probs, int64_t B,
                        int64_t T, int64_t NH, int64_t NKV, int64_t HS, float scale);
}  // namespace cuda

}  // namespace lmf
