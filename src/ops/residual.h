// residual.h: residual add, and scaling (out = s * in, f32: the scorer's logprobs = -losses). f32 on the
// CPU and the GPU; bf16 (all tensors, mixed precision) on the
// GPU only (docs/MIXED_PRECISION.md).
#pragma once
#include "core/tensor.h"

namespace lmf {

// out = a + b (same shapes and dtype; out may alias a or b). bf16: fp32 add, rounded once.
void residual_forward(Tensor out, Tensor a, Tensor b);
// da += dout; db += dout (either may be absent; all of one dtype)
void residual_backward(Tensor da, Tensor db, Tensor dout);
// out = s * in (f32, same shapes; out may alias in): one fp32 multiply per element, so s = -1 is exact
void scale_forward(Tensor out, Tensor in, float s);

namespace cuda {  // launchers (residual.cu); called by the op entries after validation
// out, a, b, dx, dout: (n) flat
void residual_forward(float* out, const float* a, const float* b, int64_t n);
void residual_forward(bf16* out, const bf16* a, const bf16* b, int64_t n);
void residual_accumulate(float* dx, const float* dout, int64_t n);
void residual_accumulate(bf16* dx, const bf16* dout, int64_t n);
void scale_forward(float* out, const float* in, float s, int64_t n);
}  // namespace cuda

}  // namespace lmf
