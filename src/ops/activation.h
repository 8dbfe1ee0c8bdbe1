// activation.h: GELU (tanh approximation, as GPT-2) and SwiGLU. f32 on the CPU and the GPU; bf16
// (all tensors, mixed precision: fp32 math, results rounded once) on the GPU only.
#pragma once
#include "core/tensor.h"

namespace lmf {

// out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise; out and inp same shape
void gelu_forward(Tensor out, Tensor inp);
void gelu_backward(Tensor dinp, Tensor dout, Tensor inp);  // dinp +=

// inp: (N, 2F) = [gate | up] along the last dim; out: (N, F) = silu(gate) * up
void swiglu_forward(Tensor out, Tensor inp);
void swiglu_backward(Tensor dinp, Tensor dout, Tensor inp);  // dinp: (N, 2F) +=

namespace cuda {  // launchers (activation.cu); called by the op entries after validation
// out, inp, dinp, dout: (n) flat. Backward: dinp += (accumulate, the op contract) or dinp = (not read;
// for callers whose buffer holds nothing to keep, e.g. the MoE layer's scratch).
void gelu_forward(float* out, const float* inp, int64_t n);
void gelu_forward(bf16* out, const bf16* inp, int64_t n);
void gelu_backward(float* dinp, const float* dout, const float* inp, int64_t n, bool accumulate = true);
void gelu_backward(bf16* dinp, const bf16* dout, const bf16* inp, int64_t n, bool accumulate = true);
// inp, dinp: (N, 2F) rows [gate | up]; out, dout: (N, F)
void swiglu_forward(float* out, const float* inp, int64_t N, int64_t F);
void swiglu_forward(bf16* out, const bf16* inp, int64_t N, int64_t F);
void swiglu_backward(float* dinp, const float* dout, const float* inp, int64_t N, int64_t F, bool accumulate = true);
void swiglu_backward(bf16* dinp, const bf16* dout, const bf16* inp, int64_t N, int64_t F, bool accumulate = true);
}  // namespace cuda

}  // namespace lmf
