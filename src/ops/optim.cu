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
// adamw_update_flat: the same per-element code (adamw_math, shared with adamw_update's kernel, so
// the two agree bitwise) in one grid-stride launch over the flat arrays, four elements per 16-byte
// access (the n % 4 tail one element per thread). The decay table travels in the launch arguments
// (__grid_constant__, no copy to device memory, no host sync). Each thread visits increasing
// indices, so it keeps a cursor (DecayCursor): the first range whose end is past its index, with
// that range's [begin, end) in registers; it is found by a binary search over the table ends at the
// start and again whenever the index passes the cursor's end (a few times per thread; between those,
// the decay test is one compare). Element i is decayed iff begin <= i.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include <cuda_bf16.h>

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

// torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6)), as the CPU computes it.
__device__ __forceinline__ float adamw_clip(const float* norm, float max_norm) {
  float clip = 1.0f;
  if (norm != nullptr && max_norm > 0.0f) {
    const float c = max_norm / (norm[0] + 1e-6f);
    clip = c < 1.0f ? c : 1.0f;
  }
  return clip;
}

// The scalars of one AdamW step (one_m_b1/2 = 1 - beta1/2 computed on the host).
struct AdamWScalars {
  float lr, beta1, beta2, one_m_b1, one_m_b2, eps, bias_corr1, bias_corr2;
};

// optim.h's update of one element held in registers; the only code both AdamW kernels use for it.
__device__ __forceinline__ void adamw_math(float& p, float& mi, float& vi, float grad, float clip, const AdamWScalars& a,
                                           float weight_decay) {
  const float g = clip * grad;
  mi = a.beta1 * mi + a.one_m_b1 * g;
  vi = a.beta2 * vi + a.one_m_b2 * (g * g);
  const float m_hat = mi / a.bias_corr1, v_hat = vi / a.bias_corr2;
  p -= a.lr * (m_hat / (sqrtf(v_hat) + a.eps) + weight_decay * p);
}
__device__ __forceinline__ void adamw_element(float* __restrict__ param, float* __restrict__ m, float* __restrict__ v,
                                              const float* __restrict__ grad, int64_t i, float clip,
                                              const AdamWScalars& a, float weight_decay) {
  float p = param[i], mi = m[i], vi = v[i];
  adamw_math(p, mi, vi, grad[i], clip, a, weight_decay);
  m[i] = mi;
  v[i] = vi;
  param[i] = p;
}

// The decay table as a launch argument: s (begin, end) pairs in r[0, 2 s). Capacity kCap ranges;
// instantiated for a few capacities so that a short table is not a 16 KiB argument.
template <int kCap>
struct DecayTable {
  int32_t r[2 * kCap];
};
constexpr int kDecayCaps[] = {32, 256, static_cast<int>(kAdamWMaxDecayRanges)};

// First k in [lo, s) with end_k > i (s when none); ends are increasing (sorted, disjoint, non-empty).
template <int kCap>
__device__ __forceinline__ int first_range_ending_after(const DecayTable<kCap>& t, int lo, int s, int64_t i) {
  int hi = s;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (t.r[2 * mid + 1] <= i) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Decay cursor of one thread over increasing indices: the first range whose end is past the index.
template <int kCap>
struct DecayCursor {
  static constexpr int64_t kNone = INT64_MAX;  // past the last range: never decayed, never reached
  const DecayTable<kCap>& t;
  int s, k = 0;
  int64_t begin = kNone, end = -1;  // end = -1: nothing looked up yet
  __device__ __forceinline__ DecayCursor(const DecayTable<kCap>& table, int n_ranges) : t(table), s(n_ranges) {}
  // weight_decay if index i (never smaller than the previous call's) is decayed, else 0.
  __device__ __forceinline__ float decay(int64_t i, float weight_decay) {
    if (i >= end) {
      k = first_range_ending_after(t, end < 0 ? 0 : k + 1, s, i);
      begin = k < s ? t.r[2 * k] : kNone;
      end = k < s ? t.r[2 * k + 1] : kNone;
    }
    return i >= begin ? weight_decay : 0.0f;
  }
};

// Elements in quads: thread j updates quads j, j + stride, ... (16-byte loads and stores of param, m,
// v and grad; 8 bytes of bf16 copy), then the n % 4 tail elements one each. Arrays 16-byte aligned.
template <int kCap>
__global__ void adamw_flat_kernel(float* __restrict__ param, float* __restrict__ m, float* __restrict__ v,
                                  const float* __restrict__ grad, const float* __restrict__ norm, int64_t n,
                                  const __grid_constant__ DecayTable<kCap> table, int s, float max_norm,
                                  AdamWScalars a, float weight_decay, __nv_bfloat16* __restrict__ param_bf16,
                                  const float* __restrict__ schedule) {
  if (schedule) {  // {lr, bias_corr1, bias_corr2} from device memory (graph replays)
    a.lr = schedule[0];
    a.bias_corr1 = schedule[1];
    a.bias_corr2 = schedule[2];
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const float clip = adamw_clip(norm, max_norm);
  const int64_t quads = n / 4;
  DecayCursor<kCap> cur(table, s);
  for (int64_t q = first; q < quads; q += stride) {
    const int64_t i0 = 4 * q;
    float4 p4 = *reinterpret_cast<const float4*>(param + i0);
    float4 m4 = *reinterpret_cast<const float4*>(m + i0);
    float4 v4 = *reinterpret_cast<const float4*>(v + i0);
    const float4 g4 = *reinterpret_cast<const float4*>(grad + i0);
    adamw_math(p4.x, m4.x, v4.x, g4.x, clip, a, cur.decay(i0, weight_decay));
    adamw_math(p4.y, m4.y, v4.y, g4.y, clip, a, cur.decay(i0 + 1, weight_decay));
    adamw_math(p4.z, m4.z, v4.z, g4.z, clip, a, cur.decay(i0 + 2, weight_decay));
    adamw_math(p4.w, m4.w, v4.w, g4.w, clip, a, cur.decay(i0 + 3, weight_decay));
    *reinterpret_cast<float4*>(param + i0) = p4;
    *reinterpret_cast<float4*>(m + i0) = m4;
    *reinterpret_cast<float4*>(v + i0) = v4;
    if (param_bf16) {
      const __nv_bfloat162 lo = __floats2bfloat162_rn(p4.x, p4.y), hi = __floats2bfloat162_rn(p4.z, p4.w);
      uint2 packed;
      packed.x = *reinterpret_cast<const uint32_t*>(&lo);
      packed.y = *reinterpret_cast<const uint32_t*>(&hi);
      *reinterpret_cast<uint2*>(param_bf16 + i0) = packed;
    }
  }
  const int64_t i = 4 * quads + first;  // the tail: fewer than 4 elements, one thread each
  if (i < n) {
    DecayCursor<kCap> tail(table, s);
    adamw_element(param, m, v, grad, i, clip, a, tail.decay(i, weight_decay));
    if (param_bf16) param_bf16[i] = __float2bfloat16_rn(param[i]);
  }
}

template <int kCap>
void launch_adamw_flat(const LaunchSpec& spec, float* param, float* m, float* v, const float* grad, const float* norm,
                       int64_t n, const int32_t* ranges, int s, float max_norm, const AdamWScalars& a,
                       float weight_decay, bf16* param_bf16, const float* schedule) {
  DecayTable<kCap> table;
  std::memset(&table, 0, sizeof(table));
  if (s > 0) std::memcpy(table.r, ranges, static_cast<size_t>(s) * 2 * sizeof(int32_t));
  cuda::launch(spec, adamw_flat_kernel<kCap>, param, m, v, grad, norm, n, table, s, max_norm, a, weight_decay,
               reinterpret_cast<__nv_bfloat16*>(param_bf16), schedule);
}

}  // namespace

namespace cuda {

void grad_global_norm(float* norm, const float* grads, int64_t n) {
  const char* op = "grad_global_norm";
  const int64_t parts = ceil_div(n, kNormBlock);
  auto* partial = static_cast<double*>(cuda_workspace(grad_global_norm_cuda_workspace(n), op));
  const ShapeText shapes = shape_text("n=", n);
  if (parts > 0)
    launch({op, shapes, {parts, 1, 1}, {kNormThreads, 1, 1}, 0}, norm_partial_kernel, partial, grads, n);
  // With n == 0 this writes sqrt(0) = 0, as the CPU does.
  launch({op, shapes, {1, 1, 1}, {kFinishThreads, 1, 1}, 0}, norm_finish_kernel, norm,
         static_cast<const double*>(partial), parts);
}

void adamw_update(float* param, float* m, float* v, const float* grad, const float* norm, int64_t n, float max_norm,
                  float lr, float beta1, float beta2, float eps, float weight_decay, float bias_corr1,
                  float bias_corr2) {
  const AdamWScalars a{lr, beta1, beta2, 1.0f - beta1, 1.0f - beta2, eps, bias_corr1, bias_corr2};
  launch_elementwise("adamw_update", n, [=] __device__(int64_t i) {
    adamw_element(param, m, v, grad, i, adamw_clip(norm, max_norm), a, weight_decay);
  });
}

void adamw_update_flat(float* param, float* m, float* v, const float* grad, const float* norm, int64_t n,
                       const int32_t* ranges, int64_t s, float max_norm, float lr, float beta1, float beta2, float eps,
                       float weight_decay, float bias_corr1, float bias_corr2, bf16* param_bf16,
                       const float* schedule) {
  const char* op = "adamw_update_flat";
  LMF_CHECK(0 <= s && s <= kAdamWMaxDecayRanges, op, ": ", s, " decay ranges, at most ", kAdamWMaxDecayRanges);
  if (n <= 0) return;
  const AdamWScalars a{lr, beta1, beta2, 1.0f - beta1, 1.0f - beta2, eps, bias_corr1, bias_corr2};
  // The grid of launch_elementwise: 256 threads, at most 16 blocks per SM, grid-stride beyond.
  constexpr int64_t kBlock = 256;
  const int64_t max_blocks = std::max<int64_t>(static_cast<int64_t>(cuda_limits().sm_count) * 16, 1);
  const int64_t blocks = std::min(ceil_div(std::max<int64_t>(n / 4, n % 4), kBlock), max_blocks);
  const auto aligned = [](const void* p, uintptr_t b) { return reinterpret_cast<uintptr_t>(p) % b == 0; };
  LMF_CHECK(aligned(param, 16) && aligned(m, 16) && aligned(v, 16) && aligned(grad, 16) && aligned(param_bf16, 8), op,
            ": param, m, v and grad must be 16-byte aligned and param_bf16 8-byte aligned");
  const LaunchSpec spec{op, shape_text("n=", n, " S=", s), {blocks, 1, 1}, {kBlock, 1, 1}, 0};
  const int si = static_cast<int>(s);
  if (s <= kDecayCaps[0])
    launch_adamw_flat<kDecayCaps[0]>(spec, param, m, v, grad, norm, n, ranges, si, max_norm, a, weight_decay, param_bf16, schedule);
  else if (s <= kDecayCaps[1])
    launch_adamw_flat<kDecayCaps[1]>(spec, param, m, v, grad, norm, n, ranges, si, max_norm, a, weight_decay, param_bf16, schedule);
  else
    launch_adamw_flat<kDecayCaps[2]>(spec, param, m, v, grad, norm, n, ranges, si, max_norm, a, weight_decay, param_bf16, schedule);
}

void cast_to_bf16(bf16* dst, const float* src, int64_t n) {
  auto* d = reinterpret_cast<__nv_bfloat16*>(dst);
  launch_elementwise("cast_to_bf16", n, [=] __device__(int64_t i) { d[i] = __float2bfloat16_rn(src[i]); });
}

void nonfinite_guard(int32_t* guard, const float* loss, const float* norm) {
  launch_elementwise("nonfinite_guard", 1, [=] __device__(int64_t) {
    guard[0] += 1;
    if (guard[1] == 0 && !(isfinite(loss[0]) && isfinite(norm[0]))) guard[1] = guard[0];
  });
}

}  // namespace cuda
}  // namespace lmf
