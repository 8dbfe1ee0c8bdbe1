// linear.h: y = x W^T + b through BLAS (PyTorch's nn.Linear layout: W is (OC, IC)).
#pragma once
#include "core/tensor.h"

namespace lmf {

// out: (N, OC); inp: (N, IC); weight: (OC, IC); bias: (OC) or absent. Leading dims of inp/out flatten to N.
void linear_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias);

// dinp += dout W; dweight += dout^T inp; dbias += sum_n dout. Any of dinp/dweight/dbias may be absent.
void linear_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp, Tensor weight);

}  // namespace lmf
