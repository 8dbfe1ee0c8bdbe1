// residual.h: residual add.
#pragma once
#include "core/tensor.h"

namespace lmf {

// out = a + b (same shapes; out may alias a or b)
void residual_forward(Tensor out, Tensor a, Tensor b);
// da += dout; db += dout (either may be absent)
void residual_backward(Tensor da, Tensor db, Tensor dout);

namespace cuda {  // launchers (residual.cu); called by the op entries after validation
void residual_forward(float* out, const float* a, const float* b, int64_t n);
void residual_accumulate(float* dx, const float* dout, int64_t n);
}  // namespace cuda

}  // namespace lmf
