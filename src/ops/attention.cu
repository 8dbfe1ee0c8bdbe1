// attention.cu: CUDA launchers of causal MHA/GQA attention (attention.h), the straightforward design:
// one block per query row (forward, backward dQ) and one block per key row (backward dK, dV), scores
// and probabilities of the row in shared memory. Same semantics as the CPU reference
// (attention.cpp): scale 1/sqrt(HS) (passed in by the op entry), q head h reads kv head h / (NH/NKV),
// probs (B, NH, T, T) written with zeros above the diagonal, dprobs used as scratch.
//
// Layout: qkv, dqkv (B, T, C3), C3 = (NH + 2 NKV) HS, rows [q heads | k heads | v heads];
// out, dout (B, T, NH HS); probs, dprobs (B, NH, T, T).
//
// Forward, block (b, h, t):  p[s] = scale q_t . k_s (s <= t); p = softmax(p) (max-subtracted, precise
//   expf, float sum); probs row = p (0 for s > t); out_t = sum_s p[s] v_s.
// Backward, two kernels, no atomics:
//   1. block (b, h, t): dp[s] = dO_t . v_s; ds[s] = p[s] (dp[s] - sum_s dp p) into the dprobs row
//      (0 for s > t); dq_t += scale sum_s ds[s] k_s. Each block owns its dq row.
//   2. block (b, kv head, s), after 1 on the stream: dk_s += scale sum_h sum_{t>=s} ds[h,t,s] q_t,h and
//      dv_s += sum_h sum_{t>=s} p[h,t,s] dO_t,h over the q heads h of the group in increasing order.
//      Each block owns its dk/dv row.
// Reduction orders depend only on (T, HS) and the fixed block size, never on B or the scheduling:
// dot products over HS are lane-strided warp sums (block_reduce.cuh); sums over keys/queries split
// into G = max(1, kBlock / HS) interleaved groups (group g takes s = g, g + G, ...), each summed in
// increasing order, then the G partials combined in increasing g. Deterministic and batch-invariant.
// Shared memory per block is O(T + HS) floats; the launcher validates it against the device (above
// 48 KiB it opts in, up to ~28K positions).
#include <string>

#include "ops/attention.h"
#include "ops/block_reduce.cuh"
#include "ops/elementwise.cuh"

namespace lmf::cuda {
namespace {

constexpr int kBlock = 128;  // threads per block (4 warps) in every attention kernel
constexpr int kWarps = kBlock / 32;

struct Dims {
  int64_t B, T, NH, NKV, HS;
  __host__ __device__ int64_t C3() const { return (NH + 2 * NKV) * HS; }
  __host__ __device__ int64_t CO() const { return NH * HS; }
  __host__ __device__ int64_t group() const { return NH / NKV; }
  // Key/query groups of the weighted sums and the size of their partial-sum buffer.
  __host__ __device__ int64_t G() const { return HS >= kBlock ? 1 : kBlock / HS; }
  __host__ __device__ int64_t parts() const { return G() * HS; }
};

std::string shapes_of(const Dims& d) {
  return "B=" + std::to_string(d.B) + " T=" + std::to_string(d.T) + " NH=" + std::to_string(d.NH) +
         " NKV=" + std::to_string(d.NKV) + " HS=" + std::to_string(d.HS);
}

// Rows s in [0, n) of an (n, HS) matrix with leading dimension ld, dotted with vec (HS, shared
// memory): dst[s] = alpha * (rows[s] . vec). Warp w takes s = w, w + kWarps, ...; lane-strided
// products combined by warp_sum.
__device__ __forceinline__ void rows_dot(float* dst, const float* rows, int64_t ld, const float* vec, int64_t n,
                                         int64_t HS, float alpha) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t s = warp; s < n; s += kWarps) {
    const float* r = rows + s * ld;
    float acc = 0.0f;
    for (int64_t i = lane; i < HS; i += 32) acc += vec[i] * r[i];
    acc = warp_sum(acc);
    if (lane == 0) dst[s] = alpha * acc;
  }
}

// part[g HS + i] = sum_{s = g, g + G, ... < n} w[s] rows[s][i] for every (g, i), then the caller
// combines the G partials. rows: (n, HS) with leading dimension ld; w: (n) in shared memory;
// part: (G HS) in shared memory. When add is set, adds to part (accumulation over heads).
__device__ __forceinline__ void weighted_rows_partial(float* part, const float* w, const float* rows, int64_t ld,
                                                      int64_t n, int64_t HS, int64_t G, bool add) {
  for (int64_t idx = threadIdx.x; idx < G * HS; idx += kBlock) {
    const int64_t g = idx / HS, i = idx - g * HS;
    float acc = 0.0f;
    for (int64_t s = g; s < n; s += G) acc += w[s] * rows[s * ld + i];
    part[idx] = add ? part[idx] + acc : acc;
  }
}

// Combined partial i: sum over g in increasing order.
__device__ __forceinline__ float combine_parts(const float* part, int64_t i, int64_t HS, int64_t G) {
  float r = 0.0f;
  for (int64_t g = 0; g < G; ++g) r += part[g * HS + i];
  return r;
}

// Block (b, h, t) = blockIdx.x. Shared memory: p (T) | q (HS) | part (G HS).
__global__ void attention_forward_kernel(float* out, float* probs, const float* qkv, Dims d, float scale) {
  extern __shared__ float smem[];
  __shared__ float scratch[32];
  const int64_t T = d.T, HS = d.HS, C3 = d.C3(), G = d.G();
  const int64_t t = blockIdx.x % T, bh = blockIdx.x / T, h = bh % d.NH, b = bh / d.NH, kvh = h / d.group();
  float* p = smem;
  float* q = p + T;
  float* part = q + HS;
  const float* base = qkv + b * T * C3;  // (T, C3) of batch b
  const float* k = base + (d.NH + kvh) * HS;
  const float* v = base + (d.NH + d.NKV + kvh) * HS;
  for (int64_t i = threadIdx.x; i < HS; i += kBlock) q[i] = base[t * C3 + h * HS + i];
  __syncthreads();
  rows_dot(p, k, C3, q, t + 1, HS, scale);
  __syncthreads();
  float mx = -INFINITY;
  for (int64_t s = threadIdx.x; s <= t; s += kBlock) mx = fmaxf(mx, p[s]);
  mx = block_max(mx, scratch);
  float sum = 0.0f;
  for (int64_t s = threadIdx.x; s <= t; s += kBlock) {
    const float e = expf(p[s] - mx);
    p[s] = e;
    sum += e;
  }
  sum = block_sum(sum, scratch);
  const float inv = 1.0f / sum;
  float* prow = probs + (bh * T + t) * T;
  for (int64_t s = threadIdx.x; s < T; s += kBlock) {
    const float ps = s <= t ? p[s] * inv : 0.0f;
    if (s <= t) p[s] = ps;
    prow[s] = ps;
  }
  __syncthreads();
  weighted_rows_partial(part, p, v, C3, t + 1, HS, G, false);
  __syncthreads();
  float* o = out + (b * T + t) * d.CO() + h * HS;
  for (int64_t i = threadIdx.x; i < HS; i += kBlock) o[i] = combine_parts(part, i, HS, G);
}

// Backward 1. Block (b, h, t) = blockIdx.x. Shared memory: p (T) | ds (T) | dO (HS) | part (G HS).
__global__ void attention_backward_query_kernel(float* dqkv, float* dprobs, const float* dout, const float* qkv,
                                                const float* probs, Dims d, float scale) {
  extern __shared__ float smem[];
  __shared__ float scratch[32];
  const int64_t T = d.T, HS = d.HS, C3 = d.C3(), G = d.G();
  const int64_t t = blockIdx.x % T, bh = blockIdx.x / T, h = bh % d.NH, b = bh / d.NH, kvh = h / d.group();
  float* p = smem;
  float* ds = p + T;
  float* dO = ds + T;
  float* part = dO + HS;
  const float* base = qkv + b * T * C3;
  const float* k = base + (d.NH + kvh) * HS;
  const float* v = base + (d.NH + d.NKV + kvh) * HS;
  const float* prow = probs + (bh * T + t) * T;
  for (int64_t i = threadIdx.x; i < HS; i += kBlock) dO[i] = dout[(b * T + t) * d.CO() + h * HS + i];
  for (int64_t s = threadIdx.x; s <= t; s += kBlock) p[s] = prow[s];
  __syncthreads();
  rows_dot(ds, v, C3, dO, t + 1, HS, 1.0f);  // dp
  __syncthreads();
  float dot = 0.0f;
  for (int64_t s = threadIdx.x; s <= t; s += kBlock) dot += ds[s] * p[s];
  dot = block_sum(dot, scratch);
  float* dsrow = dprobs + (bh * T + t) * T;
  for (int64_t s = threadIdx.x; s < T; s += kBlock) {
    const float v_ds = s <= t ? p[s] * (ds[s] - dot) : 0.0f;
    if (s <= t) ds[s] = v_ds;
    dsrow[s] = v_ds;
  }
  __syncthreads();
  weighted_rows_partial(part, ds, k, C3, t + 1, HS, G, false);
  __syncthreads();
  float* dq = dqkv + (b * T + t) * C3 + h * HS;
  for (int64_t i = threadIdx.x; i < HS; i += kBlock) dq[i] += scale * combine_parts(part, i, HS, G);
}

// Backward 2. Block (b, kv head, s) = blockIdx.x. Shared memory: ds column (T) | p column (T) |
// dk part (G HS) | dv part (G HS). Columns hold entries t in [s, T), index t - s.
__global__ void attention_backward_key_kernel(float* dqkv, const float* dprobs, const float* dout, const float* qkv,
                                              const float* probs, Dims d, float scale) {
  extern __shared__ float smem[];
  const int64_t T = d.T, HS = d.HS, C3 = d.C3(), CO = d.CO(), G = d.G(), parts = d.parts();
  const int64_t s = blockIdx.x % T, bk = blockIdx.x / T, kvh = bk % d.NKV, b = bk / d.NKV;
  float* dsc = smem;
  float* pc = dsc + T;
  float* part_k = pc + T;
  float* part_v = part_k + parts;
  const int64_t n = T - s;  // queries t = s .. T-1 see key s
  const float* base = qkv + b * T * C3;
  for (int64_t h = kvh * d.group(); h < (kvh + 1) * d.group(); ++h) {
    const int64_t bh = b * d.NH + h;
    __syncthreads();  // the previous head's columns are consumed
    for (int64_t j = threadIdx.x; j < n; j += kBlock) {
      dsc[j] = dprobs[(bh * T + s + j) * T + s];
      pc[j] = probs[(bh * T + s + j) * T + s];
    }
    __syncthreads();
    const bool add = h > kvh * d.group();
    // rows t = s + j of q (head h) and dO (head h)
    weighted_rows_partial(part_k, dsc, base + s * C3 + h * HS, C3, n, HS, G, add);
    weighted_rows_partial(part_v, pc, dout + (b * T + s) * CO + h * HS, CO, n, HS, G, add);
  }
  __syncthreads();
  float* dk = dqkv + (b * T + s) * C3 + (d.NH + kvh) * HS;
  float* dv = dqkv + (b * T + s) * C3 + (d.NH + d.NKV + kvh) * HS;
  for (int64_t i = threadIdx.x; i < HS; i += kBlock) {
    dk[i] += scale * combine_parts(part_k, i, HS, G);
    dv[i] += combine_parts(part_v, i, HS, G);
  }
}

}  // namespace

void attention_forward(float* out, float* probs, const float* qkv, int64_t B, int64_t T, int64_t NH, int64_t NKV,
                       int64_t HS, float scale) {
  const Dims d{B, T, NH, NKV, HS};
  const size_t smem = static_cast<size_t>(T + HS + d.parts()) * sizeof(float);
  launch({"attention_forward", shapes_of(d), {B * NH * T, 1, 1}, {kBlock, 1, 1}, smem}, attention_forward_kernel, out,
         probs, qkv, d, scale);
}

void attention_backward(float* dqkv, float* dprobs, const float* dout, const float* qkv, const float* probs, int64_t B,
                        int64_t T, int64_t NH, int64_t NKV, int64_t HS, float scale) {
  const Dims d{B, T, NH, NKV, HS};
  const std::string shapes = shapes_of(d);
  const size_t smem_q = static_cast<size_t>(2 * T + HS + d.parts()) * sizeof(float);
  launch({"attention_backward", shapes, {B * NH * T, 1, 1}, {kBlock, 1, 1}, smem_q}, attention_backward_query_kernel,
         dqkv, dprobs, dout, qkv, probs, d, scale);
  const size_t smem_k = static_cast<size_t>(2 * T + 2 * d.parts()) * sizeof(float);
  launch({"attention_backward", shapes, {B * NKV * T, 1, 1}, {kBlock, 1, 1}, smem_k}, attention_backward_key_kernel,
         dqkv, static_cast<const float*>(dprobs), dout, qkv, probs, d, scale);
}

}  // namespace lmf::cuda
