// norm.h: LayerNorm and RMSNorm over the last dimension. Statistics are kept for backward.
// inp/out may have any leading dims; N = numel / C rows.
#pragma once
#include "core/tensor.h"

namespace lmf {

// out: (N, C) = (inp - mean) * rstd * weight + bias; mean, rstd: (N); weight: (C); bias: (C) or absent
void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight, Tensor bias, float eps);
// dinp += ..., dweight += ..., dbias += ... (dbias may be absent)
void layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp, Tensor weight,
                        Tensor mean, Tensor rstd);

// out = inp * rstd * weight, rstd = 1 / sqrt(mean(inp^2) + eps); rstd: (N)
void rmsnorm_forward(Tensor out, Tensor rstd, Tensor inp, Tensor weight, float eps);
void rmsnorm_backward(Tensor dinp, Tensor dweight, Tensor dout, Tensor inp, Tensor weight, Tensor rstd);

}  // namespace lmf
