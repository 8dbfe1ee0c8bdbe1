// optim.cu: CUDA launchers of the global gradient norm and AdamW (optim.h).
//
// grad_global_norm, deterministic whatever the scheduling of blocks:
//   pass 1: block b (kNormThreads threads) owns elements [b kNormBlock, (b+1) kNormBlock); thread t
//           adds g^2 in double over its elements t, t + kNormThreads, ... in order; the block's
//           threads are combined by a fixed shared-memory tree; partial[b] goes to the workspace.
//   pass 2: one block adds the partials (thread t: partials t, t + kFinishThreads, ... in order,
//           then a fixed tree) and writes norm[0] = sqrt(total) rounded to float.
// The CPU reference sums each block in another fixed order, so the two agree to double rounding
// (~1e-16 relative) before the final rounding to float: almost always bitwise, within 1 ulp always.
// adamw_update: optim.h's formula per element in float, the clip factor from norm[0] on the device.
#include <cmath>

#include "core/cuda_launch.cuh"
#include "ops/elementwise.cuh"
#include "ops/optim.h"

namespace lmf {
namespace {

constexpr int kNormThreads = 256;
constexpr int kFinishThreads = 1024;

// Fixed-order tree over s[0, n) (n a power of two, n == blockDim.x); the result ends in s[0].
template <int n>
__device__ void block_tree_sum(double* s) {
  for (int stride = n / 2; stride > 0; stride /= 2) {
    __syncthreads();
    if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
  }
  __syncthreads();
}

// partial: (ceil(n / kNormBlock)) doubles; grads: (n). Block b sums block b's squares.
__global__ void norm_partial_kernel(double* __restrict__ partial, const float* __restrict__ grads, int64_t n) {
  __shared__ double s[kNormThreads];
  const int64_t i0 = blockIdx.x * kNormBlock;
  const int64_t i1 = i0 + kNormBlock < n ? i0 + kNormBlock : n;
  double acc = 0.0;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += kNormThreads) {
    const double g = grads[i];
    acc += g * g;
  }
  s[threadIdx.x] = acc;
  block_tree_sum<kNormThreads>(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}

// norm: (1) = sqrt(sum of partial[0, parts)); one block.
__global__ void norm_finish_kernel(float* __restrict__ norm, const double* __restrict__ partial, int64_t parts) {
  __shared__ double s[kFinishThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < parts; i += kFinishThreads) acc += partial[i];
  s[threadIdx.x] = acc;
  block_tree_sum<kFinishThreads>(s);
  if (threadIdx.x == 0) norm[0] = static_cast<float>(sqrt(s[0]));
}

}  // namespace

namespace cuda {

void grad_global_norm(float* norm, const float* grads, int64_t n) {
  const char* op = "grad_global_norm";
  const int64_t parts = ceil_div(n, kNormBlock);
  auto* partial = static_cast<double*>(cuda_workspace(grad_global_norm_cuda_workspace(n), op));
  const std::string shapes = "n=" + std::to_string(n);
  if (parts > 0)
    launch({op, shapes, {parts, 1, 1}, {kNormThreads, 1, 1}, 0}, norm_partial_kernel, partial, grads, n);
  // With n == 0 this writes sqrt(0) = 0, as the CPU does.
  launch({op, shapes, {1, 1, 1}, {kFinishThreads, 1, 1}, 0}, norm_finish_kernel, norm,
         static_cast<const double*>(partial), parts);
}

void adamw_update(float* param, float* m, float* v, const float* grad, const float* norm, int64_t n, float max_norm,
                  float lr, float beta1, float beta2, float eps, float weight_decay, float bias_corr1,
                  float bias_corr2) {
  const float one_m_b1 = 1.0f - beta1, one_m_b2 = 1.0f - beta2;
  launch_elementwise("adamw_update", n, [=] __device__(int64_t i) {
    // torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6)), as the CPU computes it
    float clip = 1.0f;
    if (norm != nullptr && max_norm > 0.0f) {
      const float c = max_norm / (norm[0] + 1e-6f);
      clip = c < 1.0f ? c : 1.0f;
    }
    const float g = clip * grad[i];
    const float mi = beta1 * m[i] + one_m_b1 * g;
    const float vi = beta2 * v[i] + one_m_b2 * (g * g);
    m[i] = mi;
    v[i] = vi;
    const float m_hat = mi / bias_corr1, v_hat = vi / bias_corr2;
    param[i] -= lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * param[i]);
  });
}

}  // namespace cuda
}  // namespace lmf
