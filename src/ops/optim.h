// optim.h: global gradient norm and AdamW.
#pragma once
#include "core/tensor.h"

namespace lmf {

// norm: (1) f32 = sqrt(sum g^2) over every element of grads (any shape), accumulated in double in a
// fixed order. Kept in a tensor so the GPU path never has to sync to the host for it.
void grad_global_norm(Tensor norm, Tensor grads);

// AdamW (Loshchilov & Hutter), decoupled weight decay, bias correction; `step` counts from 1.
// The gradient is first multiplied by clip = max_norm > 0 ? min(1, max_norm / (norm + 1e-6)) : 1
// (torch.nn.utils.clip_grad_norm_'s factor)
// where norm is the (1) tensor from grad_global_norm.
//   g = clip * grad; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2
//   param -= lr * ( (m / (1-b1^step)) / (sqrt(v / (1-b2^step)) + eps) + weight_decay * param )
// param, m, v, grad: same numel, f32.
void adamw_update(Tensor param, Tensor m, Tensor v, Tensor grad, Tensor norm, float max_norm, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int64_t step);

}  // namespace lmf
