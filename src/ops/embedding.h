// embedding.h: token embedding plus optional learned position embedding.
#pragma once
#include "core/tensor.h"

namespace lmf {

// out: (B, T, C) = wte[tokens[b,t]] + wpe[pos_offset + t]   (wpe term only when wpe is defined)
// tokens: (B, T) i32, each in [0, Vp); wte: (Vp, C); wpe: (maxT, C) or absent (RoPE models)
void embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe, int64_t pos_offset = 0);

// dwte[tokens[b,t]] += dout[b,t]; dwpe[t] += sum_b dout[b,t]   (accumulates; dwpe may be absent)
// Deterministic: rows are reduced in a fixed order (no float atomics).
void embedding_backward(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens);

}  // namespace lmf
