// rope.h: rotary position embedding, "rotate half" convention (GPT-NeoX / Hugging Face Llama):
// for head vector x of size HS and pair index i in [0, HS/2):
//   x'[i]        = x[i] * cos(p*f_i) - x[i+HS/2] * sin(p*f_i)
//   x'[i+HS/2]   = x[i+HS/2] * cos(p*f_i) + x[i] * sin(p*f_i),      f_i = theta^(-2i/HS)
// applied in place to the q and k heads of a fused qkv buffer; v is untouched.
// qkv/dqkv f32 on the CPU and the GPU, or bf16 (mixed precision) on the GPU only; the table is f32.
#pragma once
#include "core/tensor.h"

namespace lmf {

// freqs: (maxT, HS/2, 2) f32 table of (cos, sin), computed in double then rounded.
void rope_table_init(Tensor freqs, float theta);

// qkv: (B, T, (NH + 2*NKV) * HS), rows laid out [q heads | k heads | v heads]; position of row t is
// pos_offset + t. Rotates q and k in place.
void rope_forward(Tensor qkv, Tensor freqs, int n_head, int n_kv_head, int64_t pos_offset = 0);

// dqkv: same layout; rotates the q and k gradients back in place (the transpose of the rotation).
// Unlike other backward functions this one transforms in place rather than accumulating.
void rope_backward(Tensor dqkv, Tensor freqs, int n_head, int n_kv_head, int64_t pos_offset = 0);

// Serving (ragged rows of many sequences): row n of qkv (N, QKV) has position positions[n] (N) i32,
// each in [0, maxT) (the CPU checks every one; on the GPU the caller guarantees it).
void rope_forward(Tensor qkv, Tensor freqs, int n_head, int n_kv_head, Tensor positions);

namespace cuda {  // launchers (rope.cu); called by the op entries after validation
// qkv: (B*T, row) row-major, the first n_rot heads of size 2*half rotated in place; freqs: (maxT, half, 2);
// row n has position positions[n] when positions is not null, else pos_offset + n % T. sign = +1 (forward) or -1 (backward: the transpose).
void rope_rotate(float* qkv, const float* freqs, int64_t B, int64_t T, int64_t row, int64_t n_rot, int64_t half,
                 const int32_t* positions, int64_t pos_offset, float sign);
// bf16 qkv: fp32 math, each rotated value rounded once.
void rope_rotate(bf16* qkv, const float* freqs, int64_t B, int64_t T, int64_t row, int64_t n_rot, int64_t half,
                 const int32_t* positions, int64_t pos_offset, float sign);
}  // namespace cuda

}  // namespace lmf
