// mse.h: regression losses per row: mean squared error (model/regression_ends.h) and the
// multi-horizon Huber loss of the time-series heads (model/timeseries_ends.h, ops/timeseries.h).
// mse_loss: CPU only (a GPU tensor is an error naming the op). huber_horizons_loss: CPU reference and
// GPU (mse.cu: one warp per row, the same fixed-order double sums, so the GPU matches the CPU to
// rounding of the final float).
#pragma once
#include <cstdint>
#include <vector>

#include "core/bf16.h"
#include "core/tensor.h"

namespace lmf {

// y, targets: (N, D) f32; losses: (N) f32, losses[n] = mean_d (y[n, d] - targets[n, d])^2.
// dy: (N, D) or absent; when present it is OVERWRITTEN with d(grad_scale * losses[n])/dy =
// grad_scale * 2 (y - targets) / D.
void mse_loss(Tensor losses, Tensor dy, Tensor y, Tensor targets, float grad_scale);

// The multi-resolution forecast loss. y: (N, Dy) f32, Dy >= D = sum of `horizons` (columns past D are
// padding: ignored, and written 0 in dy): head j's columns
// [sum(horizons[0..j)), + horizons[j]) predict the next horizons[j] values; targets: (N, Hmax) f32,
// Hmax = horizons.back(), column h the value h + 1 steps ahead, NaN where it is missing (masked).
// losses[n] = mean over the heads of (mean over head j's columns with a target of huber(y - t)),
// a head with no target counting 0; huber(r) = r^2 / 2 for |r| <= delta, else delta (|r| - delta / 2).
// dy (N, Dy) f32, or bf16 on the GPU, or absent: OVERWRITTEN with d(grad_scale * losses[n])/dy (0 where
// masked).
void huber_horizons_loss(Tensor losses, Tensor dy, Tensor y, Tensor targets, const std::vector<int64_t>& horizons,
                         float delta, float grad_scale);

namespace cuda {  // launchers (mse.cu); called by the op entries after validation
inline constexpr int kMaxHorizons = 16;  // model/config.h allows 1 to 16 heads
// y (N, Dy), targets (N, H), losses (N); dy (N, Dy) or nullptr; horizons: n of them, increasing.
void huber_horizons_loss(float* losses, float* dy, const float* y, const float* targets, int64_t N, int64_t Dy,
                         int64_t H, const int64_t* horizons, int n, float delta, float grad_scale);
void huber_horizons_loss(float* losses, bf16* dy, const float* y, const float* targets, int64_t N, int64_t Dy,
                         int64_t H, const int64_t* horizons, int n, float delta, float grad_scale);
}  // namespace cuda

}  // namespace lmf
