// optim.cpp: CPU reference of the global gradient norm and the AdamW update.
//
// grad_global_norm: the elements are cut into fixed blocks of kNormBlock; each block's sum of
// squares is accumulated in double (kNormLanes interleaved partial sums, combined in lane order),
// and the block sums are added in block order. The result depends only on the data, never on the
// number of threads. No heap allocation: blocks are handled kNormGroup at a time.
// adamw_update: the header's formula per element in float (what a GPU kernel does too); the bias
// corrections are computed once on the host (in double, rounded to float), the clip factor is read
// from the norm tensor by the kernel (no host sync on the GPU path).
#include "ops/optim.h"

#include <algorithm>
#include <cmath>

#include "ops/dispatch.h"

namespace lmf {
namespace {

constexpr const char* kOpNorm = "grad_global_norm";
constexpr const char* kOpAdamW = "adamw_update";

constexpr int kNormGroup = 64;           // blocks per parallel group (stack array of partial sums)
constexpr int kNormLanes = 8;            // interleaved double accumulators in a block (vectorisable)

// sum of g[i]^2 for i in [0, n), in double, in a fixed order.
double block_sum_squares(const float* g, int64_t n) {
  double lane[kNormLanes] = {};
  int64_t i = 0;
  for (; i + kNormLanes <= n; i += kNormLanes)
    for (int j = 0; j < kNormLanes; ++j) lane[j] += static_cast<double>(g[i + j]) * g[i + j];
  for (int j = 0; i < n; ++i, ++j) lane[j] += static_cast<double>(g[i]) * g[i];
  double s = 0.0;
  for (int j = 0; j < kNormLanes; ++j) s += lane[j];
  return s;
}

// norm: (1); grads: (n) flat.
void grad_global_norm_cpu(float* norm, const float* grads, int64_t n) {
  const int64_t n_blocks = (n + kNormBlock - 1) / kNormBlock;
  double total = 0.0;
  for (int64_t g0 = 0; g0 < n_blocks; g0 += kNormGroup) {
    const int nb = static_cast<int>(std::min<int64_t>(kNormGroup, n_blocks - g0));
    double part[kNormGroup];
#pragma omp parallel for schedule(static) if (nb > 1)
    for (int b = 0; b < nb; ++b) {
      const int64_t i0 = (g0 + b) * kNormBlock;
      part[b] = block_sum_squares(grads + i0, std::min(kNormBlock, n - i0));
    }
    for (int b = 0; b < nb; ++b) total += part[b];
  }
  norm[0] = static_cast<float>(std::sqrt(total));
}

// param, m, v, grad: (n) flat; norm: (1) global gradient norm, or nullptr when clipping is off.
void adamw_update_cpu(float* param, float* m, float* v, const float* grad, const float* norm, int64_t n, float max_norm,
                      float lr, float beta1, float beta2, float eps, float weight_decay, float bias_corr1,
                      float bias_corr2) {
  // torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6))
  const float clip = (norm && max_norm > 0.0f) ? std::min(1.0f, max_norm / (norm[0] + 1e-6f)) : 1.0f;
  const float one_m_b1 = 1.0f - beta1, one_m_b2 = 1.0f - beta2;
#pragma omp parallel for simd schedule(static) if (n >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float g = clip * grad[i];
    const float mi = beta1 * m[i] + one_m_b1 * g;
    const float vi = beta2 * v[i] + one_m_b2 * (g * g);
    m[i] = mi;
    v[i] = vi;
    const float m_hat = mi / bias_corr1, v_hat = vi / bias_corr2;
    param[i] -= lr * (m_hat / (std::sqrt(v_hat) + eps) + weight_decay * param[i]);
  }
}

}  // namespace

size_t grad_global_norm_cuda_workspace(int64_t n) {
  return static_cast<size_t>((n + kNormBlock - 1) / kNormBlock) * sizeof(double);
}

void grad_global_norm(Tensor norm, Tensor grads) {
  check_f32(norm, kOpNorm);
  check_f32(grads, kOpNorm);
  check_same_device(kOpNorm, {&norm, &grads});
  check_shape(norm, {1}, kOpNorm);
  if (norm.device == Device::cpu) grad_global_norm_cpu(norm.f32(), grads.f32(), grads.numel());
  else LMF_CUDA_DISPATCH(kOpNorm, cuda::grad_global_norm(norm.f32(), grads.f32(), grads.numel()));
}

void adamw_update(Tensor param, Tensor m, Tensor v, Tensor grad, Tensor norm, float max_norm, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int64_t step) {
  check_f32(param, kOpAdamW);
  check_f32(m, kOpAdamW);
  check_f32(v, kOpAdamW);
  check_f32(grad, kOpAdamW);
  check_same_device(kOpAdamW, {&param, &m, &v, &grad, &norm});
  const int64_t n = param.numel();
  LMF_CHECK(m.numel() == n, kOpAdamW, ": m '", m.name, "' ", m.shape_str(), " has ", m.numel(), " elements but param '",
            param.name, "' ", param.shape_str(), " has ", n);
  LMF_CHECK(v.numel() == n, kOpAdamW, ": v '", v.name, "' ", v.shape_str(), " has ", v.numel(), " elements but param '",
            param.name, "' ", param.shape_str(), " has ", n);
  LMF_CHECK(grad.numel() == n, kOpAdamW, ": grad '", grad.name, "' ", grad.shape_str(), " has ", grad.numel(),
            " elements but param '", param.name, "' ", param.shape_str(), " has ", n);
  LMF_CHECK(step >= 1, kOpAdamW, ": step=", step, " for param '", param.name, "' must count from 1");
  LMF_CHECK(beta1 >= 0.0f && beta1 < 1.0f && beta2 >= 0.0f && beta2 < 1.0f, kOpAdamW, ": beta1=", beta1,
            " beta2=", beta2, " must be in [0, 1)");
  // The norm is only read when clipping is on.
  if (max_norm > 0.0f) {
    check_f32(norm, kOpAdamW);
    check_shape(norm, {1}, kOpAdamW);
  }
  const float bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step)));
  const float bc2 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step)));
  const float* norm_ptr = max_norm > 0.0f ? norm.f32() : nullptr;
  if (param.device == Device::cpu)
    adamw_update_cpu(param.f32(), m.f32(), v.f32(), grad.f32(), norm_ptr, n, max_norm, lr, beta1, beta2, eps,
                     weight_decay, bc1, bc2);
  else
    LMF_CUDA_DISPATCH(kOpAdamW, cuda::adamw_update(param.f32(), m.f32(), v.f32(), grad.f32(), norm_ptr, n, max_norm, lr,
                                                   beta1, beta2, eps, weight_decay, bc1, bc2));
}

}  // namespace lmf
