// timeseries.h: the time-series ends' ops (model/timeseries_ends.h, docs/TIMESERIES.md): the point
// embedding (one real value per row in, C channels out) and the forecast heads with their Huber loss.
// CPU reference in f32; the GPU runs f32 (fp32 / tf32 plans) and bf16 activations (bf16 plans) with
// f32 weights, gradients, predictions and losses.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/bf16.h"
#include "core/tensor.h"
#include "ops/gemm_math.h"

namespace lmf {

// x (N, C) f32 or bf16 (GPU) = SiLU(v w_g) * (v w_e) per row, v = values[n] (N) f32, w (2C, 1) f32:
// rows [0, C) the gate w_g, rows [C, 2C) the up w_e (one linear map to [gate | up] then SwiGLU, as
// ops/activation.h's swiglu_forward, with exp clamped to [-87, 87]). fp32 math, x rounded once.
void point_embedding_forward(Tensor x, Tensor values, Tensor w);
// dw (2C, 1) f32 += d(sum x . dx)/dw over the rows; dx (N, C) f32 or bf16 (GPU), values (N), w as above.
// Deterministic on both devices: the GPU sums each column's rows in fixed chunks, then the chunks in
// order (no atomics), into lmf::cuda_workspace (reserve point_embedding_backward_cuda_workspace).
void point_embedding_backward(Tensor dw, Tensor dx, Tensor values, Tensor w);
size_t point_embedding_backward_cuda_workspace(int64_t N, int64_t C);

// The forecast heads' scratch width: D = sum(horizons) rounded up to 8 columns (16-byte bf16 rows).
int64_t forecast_heads_padded(int64_t D);

// Forecast heads + multi-horizon Huber loss (ops/mse.h huber_horizons_loss), fused like the LM head's
// cross-entropy: pred = x w^T into `pred` (N, Dp) f32 scratch (Dp = forecast_heads_padded(D), columns
// past D unused); losses (N) f32 = huber_horizons_loss(pred, targets (N, Hmax) f32). Training (dx
// defined): dpred (N, Dp) scratch of x's dtype = d(grad_scale * losses)/dpred, then dx (N, C) += dpred w
// and dw (D, C) f32 += dpred^T x. x (N, C) and w (D, C) share a dtype: f32 (CPU, GPU with `math`) or
// bf16 (GPU: the bf16 copy of the weight, fp32 accumulation).
void forecast_heads_loss(Tensor losses, Tensor dx, Tensor dw, Tensor x, Tensor w, Tensor targets, Tensor pred,
                         Tensor dpred, const std::vector<int64_t>& horizons, float delta, float grad_scale,
                         GemmMath math = GemmMath::fp32);
// out (N, D) f32 = x w^T: the heads' predictions (x, w as in forecast_heads_loss).
void forecast_heads_forward(Tensor out, Tensor x, Tensor w, GemmMath math = GemmMath::fp32);

namespace cuda {  // launchers (timeseries.cu); called by the op entries after validation
void point_embedding_forward(float* x, const float* values, const float* w, int64_t N, int64_t C);
void point_embedding_forward(bf16* x, const float* values, const float* w, int64_t N, int64_t C);
void point_embedding_backward(float* dw, const float* dx, const float* values, const float* w, int64_t N, int64_t C);
void point_embedding_backward(float* dw, const bf16* dx, const float* values, const float* w, int64_t N, int64_t C);
size_t point_embedding_backward_workspace(int64_t N, int64_t C);
}  // namespace cuda

}  // namespace lmf
