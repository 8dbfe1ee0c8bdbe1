// mse.h: mean squared error per row, the regression head's loss (model/regression_ends.h).
// CPU reference only in this version: a GPU tensor is an error naming the op.
#pragma once
#include "core/tensor.h"

namespace lmf {

// y, targets: (N, D) f32; losses: (N) f32, losses[n] = mean_d (y[n, d] - targets[n, d])^2.
// dy: (N, D) or absent; when present it is OVERWRITTEN with d(grad_scale * losses[n])/dy =
// grad_scale * 2 (y - targets) / D.
void mse_loss(Tensor losses, Tensor dy, Tensor y, Tensor targets, float grad_scale);

}  // namespace lmf
