// optim.h: global gradient norm and AdamW.
// CUDA: the norm is a deterministic two-pass reduction (fixed blocks of kNormBlock elements, each
// block's sum of squares in double into the workspace, then one block adds the partials in a fixed
// order and takes the square root into norm[0]); AdamW is element-wise and reads norm[0] on the
// device, so neither syncs with the host.
#pragma once
#include <cstddef>

#include "core/tensor.h"

namespace lmf {

// norm: (1) f32 = sqrt(sum g^2) over every element of grads (any shape), accumulated in double in a
// fixed order. Kept in a tensor so the GPU path never has to sync to the host for it.
void grad_global_norm(Tensor norm, Tensor grads);

// Elements per block of the norm's first pass (CPU and CUDA use the same partition).
inline constexpr int64_t kNormBlock = 1 << 14;
// CUDA workspace bytes (cuda_reserve_workspace) grad_global_norm needs for n elements: one double
// per block.
size_t grad_global_norm_cuda_workspace(int64_t n);

// AdamW (Loshchilov & Hutter), decoupled weight decay, bias correction; `step` counts from 1.
// The gradient is first multiplied by clip = max_norm > 0 ? min(1, max_norm / (norm + 1e-6)) : 1
// (torch.nn.utils.clip_grad_norm_'s factor)
// where norm is the (1) tensor from grad_global_norm.
//   g = clip * grad; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2
//   param -= lr * ( (m / (1-b1^step)) / (sqrt(v / (1-b2^step)) + eps) + weight_decay * param )
// param, m, v, grad: same numel, f32.
void adamw_update(Tensor param, Tensor m, Tensor v, Tensor grad, Tensor norm, float max_norm, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int64_t step);

namespace cuda {  // launchers (optim.cu); called by the op entries after validation
// norm: (1) = sqrt(sum grads[i]^2), grads: (n) flat
void grad_global_norm(float* norm, const float* grads, int64_t n);
// param, m, v, grad: (n) flat; norm: (1) on the device, or nullptr when clipping is off (max_norm <= 0).
// bias_corr1/2 = 1 - beta1^step, 1 - beta2^step (computed by the op entry).
void adamw_update(float* param, float* m, float* v, const float* grad, const float* norm, int64_t n, float max_norm,
                  float lr, float beta1, float beta2, float eps, float weight_decay, float bias_corr1,
                  float bias_corr2);
}  // namespace cuda

}  // namespace lmf
