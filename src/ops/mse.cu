// mse.cu: CUDA launcher of the multi-horizon Huber loss (mse.h huber_horizons_loss).
//
// One warp per row. For each head the lanes walk its columns (lane, lane + 32, ...), count the targets
// that exist and sum huber(y - t) in double; warp_sum (block_reduce.cuh: a fixed xor butterfly) folds
// the lanes. The per-head weight 1 / (heads * valid) and the gradient grad_scale * w * huber'(r) are
// the CPU reference's expressions, so the gradients match it bitwise (f32 dy) or to one bf16 rounding,
// and the loss to the order of its double sums. Padding columns [D, Dy) of dy are written 0. The
// horizons travel in the kernel's arguments (at most kMaxHorizons): nothing is copied to the device,
// so the launch is graph-safe.
#include <cuda_bf16.h>

#include "core/cuda_launch.cuh"
#include "ops/block_reduce.cuh"
#include "ops/mse.h"
#include "ops/packed.cuh"

namespace lmf::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

struct HorizonList {
  int n;
  int h[kMaxHorizons];
};

template <class G>
__global__ void huber_horizons_kernel(float* losses, G* dy, const float* y, const float* targets, int64_t N, int64_t Dy,
                                      int64_t H, HorizonList hz, float delta, float grad_scale) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (n >= N) return;  // the whole warp leaves together
  const float* yr = y + n * Dy;
  const float* tr = targets + n * H;
  const double heads = static_cast<double>(hz.n);
  double total = 0;
  int64_t col = 0;
  for (int j = 0; j < hz.n; ++j) {
    const int hj = hz.h[j];
    int valid = 0;
    double s = 0;
    for (int h = lane; h < hj; h += 32) {
      const float t = tr[h];
      if (isnan(t)) continue;
      ++valid;
      const float r = yr[col + h] - t;
      const float a = fabsf(r);
      s += a <= delta ? 0.5 * static_cast<double>(r) * r : static_cast<double>(delta) * (a - 0.5 * delta);
    }
    valid = warp_sum(valid);
    s = warp_sum(s);
    const double w = valid > 0 ? 1.0 / (heads * static_cast<double>(valid)) : 0.0;
    if (dy) {
      for (int h = lane; h < hj; h += 32) {
        const float t = tr[h];
        const float r = yr[col + h] - t;
        const float a = fabsf(r);
        const float g = a <= delta ? r : (r > 0 ? delta : -delta);
        dy[n * Dy + col + h] = from_f32<G>(isnan(t) ? 0.0f : static_cast<float>(grad_scale * w * g));
      }
    }
    total += s * w;
    col += hj;
  }
  if (dy)
    for (int64_t d = col + lane; d < Dy; d += 32) dy[n * Dy + d] = from_f32<G>(0.0f);
  if (lane == 0) losses[n] = static_cast<float>(total);
}

template <class G>
void huber_impl(float* losses, G* dy, const float* y, const float* targets, int64_t N, int64_t Dy, int64_t H,
                const int64_t* horizons, int n, float delta, float grad_scale) {
  if (N == 0) return;
  HorizonList hz{};
  hz.n = n;
  for (int j = 0; j < n; ++j) hz.h[j] = static_cast<int>(horizons[j]);
  launch({"huber_horizons_loss", shape_text("N=", N, " Dy=", Dy, " H=", H, " heads=", n),
          {ceil_div(N, kWarpsPerBlock), 1, 1}, {32 * kWarpsPerBlock, 1, 1}, 0},
         huber_horizons_kernel<G>, losses, dy, y, targets, N, Dy, H, hz, delta, grad_scale);
}

}  // namespace

void huber_horizons_loss(float* losses, float* dy, const float* y, const float* targets, int64_t N, int64_t Dy,
                         int64_t H, const int64_t* horizons, int n, float delta, float grad_scale) {
  huber_impl(losses, dy, y, targets, N, Dy, H, horizons, n, delta, grad_scale);
}

void huber_horizons_loss(float* losses, bf16* dy, const float* y, const float* targets, int64_t N, int64_t Dy,
                         int64_t H, const int64_t* horizons, int n, float delta, float grad_scale) {
  huber_impl(losses, as_nv(dy), y, targets, N, Dy, H, horizons, n, delta, grad_scale);
}

}  // namespace lmf::cuda
