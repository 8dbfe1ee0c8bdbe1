// moe.cu: CUDA launchers of the Mixture-of-Experts layer (moe.h), bf16 mixed precision.
//
// Forward, all on the device (no host synchronisation, no allocation: graph-safe):
//   router_kernel      one warp per token: fp32 logits from bf16 x and the f32 router weight (fixed-order
//                      warp sums), softmax/sigmoid scores, top-K (+ selection bias), combine weights,
//                      shared-gate values
//   count / scan / scatter   the stable counting sort of moe.cpp's dispatch: per-chunk expert histograms
//                      (integer), a one-block scan into counts, capacity-cut offsets and the drop count,
//                      then each chunk ranks its assignments with warp match masks, so the permutation is
//                      exactly the CPU's (increasing (token, slot) order within an expert)
//   gather             xg rows in perm order
//   grouped GEMMs      pre = xg w_in[e]^T, y = act w_out[e]^T over the per-expert segments (grouped_gemm.h
//                      reads the offsets from device memory)
//   combine            out[n] = sum_k w[n,k] y[row(n,k)] (+ gated shared experts), fp32, k order: no atomics
//   aux_kernel         one block: P_e, the Switch aux loss and the z loss into stats, fixed-order reductions
// Backward: one warp per token for the combine's and the router's gradients (dy rows, d topk_w, dlogits),
// grouped NN/TN GEMMs for the experts (weight gradients accumulate in f32, reduced inside one block per
// tile), dense cuBLASLt GEMMs for the shared experts and the router weight, and one gather kernel that
// sums every contribution to dx in fp32 and rounds once. Deterministic: bitwise reproducible.
#include <cuda_bf16.h>

#include <algorithm>

#include "core/cuda_launch.cuh"
#include "ops/activation.h"
#include "ops/block_reduce.cuh"
#include "ops/elementwise.cuh"
#include "ops/gemm_cuda.h"
#include "ops/grouped_gemm.h"
#include "ops/moe.h"
#include "ops/packed.cuh"

namespace lmf {

namespace {
constexpr int kChunk = 1024;  // assignments per dispatch block (one thread each)
int64_t dispatch_chunks(int64_t NK) { return (NK + kChunk - 1) / kChunk; }
}  // namespace

size_t moe_cuda_workspace(const MoeConfig& cfg, int64_t N) {
  return static_cast<size_t>(dispatch_chunks(N * cfg.K) * cfg.E) * sizeof(int32_t);
}

namespace cuda {
namespace {

using nv = __nv_bfloat16;
constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float bf(const nv v) { return __bfloat162float(v); }

// ---- forward ---------------------------------------------------------------------------------
// Router kernels: one warp per token; lane l owns experts l, l + 32, ... (slot j: expert 32 j + l), so
// the per-expert math runs lane-parallel in registers. Sums over experts keep moe.cpp's order (e
// increasing, double): every lane adds the E values, fetched by shuffles, in that order, so all lanes
// hold the same bits; selections are warp argmaxes with ties to the lowest expert (the CPU's strict >).
// Slots per lane: a template parameter (1 for E <= 32, 2 for <= 64, kMoeMaxExperts / 32 beyond), so
// that the usual small E keeps its per-expert arrays in a few registers.
constexpr int kMaxSlots = kMoeMaxExperts / 32;
int slots_for(int64_t E) { return E <= 32 ? 1 : E <= 64 ? 2 : kMaxSlots; }

// Sequential sum over e in [0, E) of v(slot, lane) (double), the same bits in every lane.
template <int kSlots, class F>
__device__ __forceinline__ double expert_sum(int E, F&& v) {
  double acc = 0;
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    if (32 * j >= E) break;
    const double x = v(j);
    for (int l = 0; l < 32 && 32 * j + l < E; ++l) acc += __shfl_sync(0xffffffffu, x, l);
  }
  return acc;
}

// Value of slot j of lane e % 32 for a run-time expert e (every lane gets it).
template <int kSlots>
__device__ __forceinline__ float expert_value(const float (&v)[kSlots], int e) {
  float x = 0;
#pragma unroll
  for (int j = 0; j < kSlots; ++j)
    if (j == (e >> 5)) x = v[j];
  return __shfl_sync(0xffffffffu, x, e & 31);
}

// logsumexp over the E logits (max, then the ordered sum of exp(l - max)), in double
template <int kSlots>
__device__ __forceinline__ double logits_lse(const double (&l)[kSlots], int E, int lane) {
  double m = -INFINITY;
#pragma unroll
  for (int j = 0; j < kSlots; ++j)
    if (32 * j + lane < E) m = fmax(m, l[j]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, off));
  return m + log(expert_sum<kSlots>(E, [&](int j) { return 32 * j + lane < E ? exp(l[j] - m) : 0.0; }));
}

template <int kSlots>
__global__ void router_kernel(float* logits, float* scores, int32_t* topk_idx, float* topk_w, float* shared_g,
                              const nv* x, const float* rw, const float* bias, const float* gate_w, int N, int E,
                              int K, int C, int S, bool sigmoid, bool renormalize) {
  const int n = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (n >= N) return;
  const nv* xr = x + static_cast<int64_t>(n) * C;
  // x . w over C in packs of 8 channels (C % 8 == 0), lane-strided, then a fixed-order warp sum
  auto dot = [&](const float* w) {
    float acc = 0;
    for (int c = lane * 8; c < C; c += 256) {
      float xv[8], wv[8];
      load_f32<8>(xv, xr + c);
      load_f32<8>(wv, w + c);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc += xv[j] * wv[j];
    }
    return warp_sum(acc);
  };
  double lg[kSlots];
  if constexpr (kSlots == 1) {
    // E <= 32: the x row is read once, every expert's partial dot accumulates in its own register (each
    // in dot()'s order), then E independent warp sums: the same bits as dot(), far shorter chains
    float acc[32];
#pragma unroll
    for (int e = 0; e < 32; ++e) acc[e] = 0;
    for (int c = lane * 8; c < C; c += 256) {
      float xv[8];
      load_f32<8>(xv, xr + c);
#pragma unroll
      for (int e = 0; e < 32; ++e) {
        if (e >= E) break;
        float wv[8];
        load_f32<8>(wv, rw + static_cast<int64_t>(e) * C + c);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[e] += xv[j] * wv[j];
      }
    }
    lg[0] = 0;
#pragma unroll
    for (int e = 0; e < 32; ++e) {
      if (e >= E) break;
      const float t = warp_sum(acc[e]);
      if (lane == e) lg[0] = t;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      lg[j] = 0;
      if (32 * j >= E) continue;
      for (int l = 0; l < 32 && 32 * j + l < E; ++l) {
        const float acc = dot(rw + static_cast<int64_t>(32 * j + l) * C);
        if (lane == l) lg[j] = acc;
      }
    }
  }
  for (int s = 0; gate_w && s < S; ++s) {
    const float acc = dot(gate_w + static_cast<int64_t>(s) * C);
    if (lane == 0) shared_g[static_cast<int64_t>(s) * N + n] = 1.0f / (1.0f + expf(-acc));
  }
  float sc[kSlots];
  const double lse = sigmoid ? 0.0 : logits_lse<kSlots>(lg, E, lane);
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    const int e = 32 * j + lane;
    sc[j] = 0;
    if (e >= E) continue;
    sc[j] = sigmoid ? static_cast<float>(1.0 / (1.0 + exp(-lg[j]))) : static_cast<float>(exp(lg[j] - lse));
    logits[static_cast<int64_t>(n) * E + e] = static_cast<float>(lg[j]);
    scores[static_cast<int64_t>(n) * E + e] = sc[j];
  }
  // top-K by repeated argmax of sc + bias over the experts not yet taken
  float key[kSlots];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    const int e = 32 * j + lane;
    key[j] = e < E ? (bias ? sc[j] + bias[e] : sc[j]) : 0.0f;
  }
  uint32_t taken = 0;  // bit j: this lane's slot j
  double sum = 0;
  int my_idx = 0;
  float my_w = 0;
  for (int k = 0; k < K; ++k) {
    int best = -1;
    float best_key = 0;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const int e = 32 * j + lane;
      if (e < E && !(taken & (1u << j)) && (best < 0 || key[j] > best_key)) {
        best = e;
        best_key = key[j];
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const int ob = __shfl_xor_sync(0xffffffffu, best, off);
      const float ok = __shfl_xor_sync(0xffffffffu, best_key, off);
      if (ob >= 0 && (best < 0 || ok > best_key || (ok == best_key && ob < best))) {
        best = ob;
        best_key = ok;
      }
    }
    if ((best & 31) == lane) taken |= 1u << (best >> 5);
    const float w = expert_value<kSlots>(sc, best);
    if (lane == k) {  // lane k keeps slot k
      my_idx = best;
      my_w = w;
    }
    sum += w;
  }
  if (lane < K) {
    topk_idx[static_cast<int64_t>(n) * K + lane] = my_idx;
    topk_w[static_cast<int64_t>(n) * K + lane] = renormalize ? static_cast<float>(my_w / sum) : my_w;
  }
}

// chunk_counts (chunks, E): assignments of each chunk per expert
__global__ void count_kernel(int32_t* chunk_counts, const int32_t* topk_idx, int NK, int E) {
  extern __shared__ int32_t hist[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int a = blockIdx.x * kChunk + threadIdx.x;
  if (a < NK) atomicAdd(&hist[topk_idx[a]], 1);  // integer counts: order-independent
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) chunk_counts[static_cast<int64_t>(blockIdx.x) * E + e] = hist[e];
}

// One block: chunk_counts -> exclusive per-expert prefix over chunks (in place), counts, offsets with the
// capacity cut, dropped count into stats[2].
__global__ void scan_kernel(int32_t* chunk_counts, int32_t* counts, int32_t* offsets, float* stats, int chunks, int E,
                            int cap) {
  __shared__ int32_t kept[kMoeMaxExperts];
  __shared__ int32_t total[kMoeMaxExperts];
  const int e = threadIdx.x;
  if (e < E) {
    int32_t run = 0;
    for (int ch = 0; ch < chunks; ++ch) {
      int32_t& v = chunk_counts[static_cast<int64_t>(ch) * E + e];
      const int32_t c = v;
      v = run;
      run += c;
    }
    counts[e] = run;
    total[e] = run;
    kept[e] = min(run, cap);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t off = 0;
    int64_t dropped = 0;
    offsets[0] = 0;
    for (int i = 0; i < E; ++i) {
      off += kept[i];
      offsets[i + 1] = off;
      dropped += total[i] - kept[i];
    }
    stats[2] = static_cast<float>(dropped);
  }
}

// One block per chunk, one thread per assignment: its stable rank among the chunk's assignments to the
// same expert (warp match masks + per-warp counts), then its row, or -1 past the capacity.
__global__ void scatter_kernel(int32_t* slot_row, int32_t* perm, const int32_t* topk_idx, const int32_t* chunk_base,
                               const int32_t* offsets, int NK, int E, int cap) {
  extern __shared__ int32_t wc[];  // (32 warps, E)
  for (int i = threadIdx.x; i < 32 * E; i += blockDim.x) wc[i] = 0;
  __syncthreads();
  const int a = blockIdx.x * kChunk + threadIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool valid = a < NK;
  const int e = valid ? topk_idx[a] : -1;
  const unsigned mask = __match_any_sync(0xffffffffu, e);
  const int rank_in_warp = __popc(mask & ((1u << lane) - 1u));
  if (valid && rank_in_warp == 0) wc[warp * E + e] = __popc(mask);
  __syncthreads();
  if (!valid) return;
  int pos = chunk_base[static_cast<int64_t>(blockIdx.x) * E + e] + rank_in_warp;
  for (int w = 0; w < warp; ++w) pos += wc[w * E + e];
  if (pos < cap) {
    const int row = offsets[e] + pos;
    slot_row[a] = row;
    perm[row] = a;
  } else {
    slot_row[a] = -1;
  }
}

// xg[r] = x[perm[r] / K] for r < offsets[E]; 8 bf16 per thread
void gather_rows(nv* xg, const nv* x, const int32_t* perm, const int32_t* offsets, int64_t R, int64_t K, int64_t C,
                 int64_t E) {
  const int64_t P = C / 8;
  launch_elementwise("moe_gather", R * P, [=] __device__(int64_t i) {
    const int64_t r = i / P, c = (i % P) * 8;
    if (r >= offsets[E]) return;
    *reinterpret_cast<uint4*>(xg + r * C + c) =
        *reinterpret_cast<const uint4*>(x + static_cast<int64_t>(perm[r] / K) * C + c);
  });
}

__global__ void aux_kernel(float* stats, const float* logits, const float* scores, const int32_t* counts, int N, int E,
                           int K, float aux_coef, float z_coef) {
  __shared__ double scratch[32];
  __shared__ double scratch8[8][32];
  double acc = 0;  // thread 0's
  if (aux_coef != 0) {
    // P_e = sum_n scores[n, e]: each thread adds its tokens n = tid, tid + blockDim.x, ... in order, 8
    // experts at a time (8 independent chains), then a fixed-order block sum per expert
    for (int e0 = 0; e0 < E; e0 += 8) {
      double P[8] = {};
      for (int n = threadIdx.x; n < N; n += blockDim.x) {
        const float* row = scores + static_cast<int64_t>(n) * E + e0;
#pragma unroll
        for (int j = 0; j < 8; ++j)
          if (e0 + j < E) P[j] += row[j];
      }
      // the 8 block sums together (block_sum's arithmetic, one barrier pair instead of eight)
      const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        P[j] = warp_sum(P[j]);
        if (lane == 0) scratch8[j][warp] = P[j];
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < 8; ++j) P[j] = warp_sum(lane < nwarps ? scratch8[j][lane] : 0.0);
      __syncthreads();
      for (int j = 0; j < 8 && e0 + j < E; ++j)
        acc += static_cast<double>(counts[e0 + j]) / (static_cast<double>(N) * K) * (P[j] / N);
    }
  }
  double z = 0;
  if (z_coef != 0) {
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
      const float* l = logits + static_cast<int64_t>(n) * E;
      double m = l[0];
      for (int e = 1; e < E; ++e) m = fmax(m, static_cast<double>(l[e]));
      double s = 0;
      for (int e = 0; e < E; ++e) s += exp(static_cast<double>(l[e]) - m);
      const double lse = m + log(s);
      z += lse * lse;
    }
    z = block_sum(z, scratch);
  }
  if (threadIdx.x == 0) {
    stats[0] = static_cast<float>(aux_coef * static_cast<double>(E) * acc);
    stats[1] = static_cast<float>(z_coef * z / N);
  }
}

// out[n] = sum_k w y[row] (k order) + sum_s g_s y_s[n]; 8 channels per thread
void combine(nv* out, const nv* y, const int32_t* slot_row, const float* topk_w, const nv* shared_y,
             const float* shared_g, int64_t N, int64_t K, int64_t C, int64_t S) {
  const int64_t P = C / 8;
  launch_elementwise("moe_combine", N * P, [=] __device__(int64_t i) {
    const int64_t n = i / P, c = (i % P) * 8;
    float acc[8] = {};
    for (int64_t k = 0; k < K; ++k) {
      const int32_t r = slot_row[n * K + k];
      if (r < 0) continue;
      const float w = topk_w[n * K + k];
      float v[8];
      load_f32<8>(v, y + static_cast<int64_t>(r) * C + c);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] += w * v[j];
    }
    for (int64_t s = 0; s < S; ++s) {
      float v[8];
      load_f32<8>(v, shared_y + (s * N + n) * C + c);
      const float g = shared_g ? shared_g[s * N + n] : 1.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] += shared_g ? g * v[j] : v[j];
    }
    store_f32<8>(out + n * C + c, acc);
  });
}

void activation_forward(nv* act, const nv* pre, int64_t rows, int64_t F, MoeActivation a) {
  if (rows == 0) return;
  if (a == MoeActivation::swiglu) swiglu_forward(reinterpret_cast<bf16*>(act), reinterpret_cast<const bf16*>(pre), rows, F);
  else gelu_forward(reinterpret_cast<bf16*>(act), reinterpret_cast<const bf16*>(pre), rows * F);
}

void activation_backward(nv* dpre, const nv* dact, const nv* pre, int64_t rows, int64_t F, MoeActivation a) {
  if (rows == 0) return;
  // dpre = act'(pre) dact, overwritten (scratch: nothing to accumulate into)
  if (a == MoeActivation::swiglu)
    swiglu_backward(reinterpret_cast<bf16*>(dpre), reinterpret_cast<const bf16*>(dact),
                    reinterpret_cast<const bf16*>(pre), rows, F, false);
  else
    gelu_backward(reinterpret_cast<bf16*>(dpre), reinterpret_cast<const bf16*>(dact),
                  reinterpret_cast<const bf16*>(pre), rows * F, false);
}

// ---- backward --------------------------------------------------------------------------------
// One warp per token: dy rows of its kept slots, d topk_w (warp dots, in every lane), then, lane-parallel
// over the experts, dscores from the combine weights and the aux term, dlogits through softmax/sigmoid
// plus the z term; f32 and bf16 copies.
template <int kSlots>
__global__ void router_backward_kernel(nv* dy, float* dlogits, nv* dlogits_bf16, const nv* dout, const nv* y,
                                       const int32_t* slot_row, const float* topk_w, const int32_t* topk_idx,
                                       const float* scores, const float* logits, const int32_t* counts, int N, int E,
                                       int K, int C, bool sigmoid, bool renormalize, double aux_scale,
                                       double z_scale) {
  const int n = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (n >= N) return;
  const nv* g = dout + static_cast<int64_t>(n) * C;
  double gw[kMoeMaxTopK];
  for (int k = 0; k < K; ++k) {
    const int r = slot_row[static_cast<int64_t>(n) * K + k];
    double dot = 0;
    if (r >= 0) {
      const float w = topk_w[static_cast<int64_t>(n) * K + k];
      const nv* yr = y + static_cast<int64_t>(r) * C;
      nv* dyr = dy + static_cast<int64_t>(r) * C;
      float part = 0;
      for (int c = lane * 8; c < C; c += 256) {  // packs of 8 channels (C % 8 == 0)
        float gv[8], yv[8];
        load_f32<8>(gv, g + c);
        load_f32<8>(yv, yr + c);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          part += gv[j] * yv[j];
          gv[j] *= w;
        }
        store_f32<8>(dyr + c, gv);
      }
      dot = warp_sum(part);
    }
    gw[k] = dot;
  }
  // d scores (lane-owned experts), then d logits through softmax / sigmoid plus the z term
  const float* s = scores + static_cast<int64_t>(n) * E;
  const int32_t* idx = topk_idx + static_cast<int64_t>(n) * K;
  double S = 0, gww = 0;  // renormalisation: the selected scores' sum, sum of gw w
  if (renormalize) {
    for (int k = 0; k < K; ++k) S += s[idx[k]];
    for (int k = 0; k < K; ++k) gww += gw[k] * (s[idx[k]] / S);
  }
  double ds[kSlots], sv[kSlots], lv[kSlots];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    const int e = 32 * j + lane;
    ds[j] = sv[j] = lv[j] = 0;
    if (e >= E) continue;
    sv[j] = s[e];
    lv[j] = logits[static_cast<int64_t>(n) * E + e];
    ds[j] = aux_scale * counts[e];
    for (int k = 0; k < K; ++k)  // the top-k experts are distinct: at most one term per expert
      if (idx[k] == e) ds[j] += renormalize ? (gw[k] - gww) / S : gw[k];
  }
  const double sd = sigmoid ? 0.0 : expert_sum<kSlots>(E, [&](int j) { return sv[j] * ds[j]; });
  const double lse = z_scale != 0 ? logits_lse<kSlots>(lv, E, lane) : 0.0;
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    const int e = 32 * j + lane;
    if (e >= E) continue;
    double v = sigmoid ? ds[j] * sv[j] * (1.0 - sv[j]) : sv[j] * (ds[j] - sd);
    if (z_scale != 0) v += z_scale * lse * exp(lv[j] - lse);
    dlogits[static_cast<int64_t>(n) * E + e] = static_cast<float>(v);
    dlogits_bf16[static_cast<int64_t>(n) * E + e] = __float2bfloat16_rn(static_cast<float>(v));
  }
}

// Shared expert s, one warp per token: dys = g dout (or dout); dgl = (dout . y_s) g (1 - g); the gate's
// part of dx, dgl ws_gate[s], accumulated into the f32 dsx.
__global__ void shared_backward_kernel(nv* dys, float* dgl, nv* dgl_bf16, float* dsx, const nv* dout,
                                       const nv* shared_y, const float* shared_g, const float* gate_w, int N, int C) {
  const int n = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (n >= N) return;
  const nv* g = dout + static_cast<int64_t>(n) * C;
  nv* d = dys + static_cast<int64_t>(n) * C;
  if (!shared_g) {
    for (int c = lane; c < C; c += 32) d[c] = g[c];
    return;
  }
  const float gate = shared_g[n];
  const nv* ys = shared_y + static_cast<int64_t>(n) * C;
  float part = 0;
  for (int c = lane; c < C; c += 32) {
    const float gc = bf(g[c]);
    part += gc * bf(ys[c]);
    d[c] = __float2bfloat16_rn(gate * gc);
  }
  const float dg = warp_sum(part) * gate * (1.0f - gate);
  if (lane == 0) {
    dgl[n] = dg;
    dgl_bf16[n] = __float2bfloat16_rn(dg);
  }
  float* sx = dsx + static_cast<int64_t>(n) * C;
  for (int c = lane; c < C; c += 32) sx[c] += dg * gate_w[c];
}

// dx[n] += sum_k dxg[row(n,k)] + sum_e dlogits[n,e] router_w[e] (+ dsx[n]); fp32, rounded once
void dx_gather(nv* dx, const nv* dxg, const int32_t* slot_row, const float* dlogits, const float* rw, const float* dsx,
               int64_t N, int64_t K, int64_t C, int64_t E) {
  const int64_t P = C / 8;
  launch_elementwise("moe_dx", N * P, [=] __device__(int64_t i) {
    const int64_t n = i / P, c = (i % P) * 8;
    float acc[8];
    load_f32<8>(acc, dx + n * C + c);
    for (int64_t k = 0; k < K; ++k) {
      const int32_t r = slot_row[n * K + k];
      if (r < 0) continue;
      float v[8];
      load_f32<8>(v, dxg + static_cast<int64_t>(r) * C + c);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] += v[j];
    }
    for (int64_t e = 0; e < E; ++e) {
      const float g = dlogits[n * E + e];
      float w[8];
      load_f32<8>(w, rw + e * C + c);  // two 16-byte loads (scalar ones made this kernel L1-bound)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] += g * w[j];
    }
    if (dsx) {
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] += dsx[n * C + c + j];
    }
    store_f32<8>(dx + n * C + c, acc);
  });
}

__global__ void update_bias_kernel(float* bias, const int32_t* counts, int E, float rate) {
  if (threadIdx.x != 0) return;
  int64_t total = 0;
  for (int e = 0; e < E; ++e) total += counts[e];
  for (int e = 0; e < E; ++e) {
    const int64_t load = static_cast<int64_t>(counts[e]) * E;
    if (load < total) bias[e] += rate;
    else if (load > total) bias[e] -= rate;
  }
}

const nv* cnv(const bf16* p) { return reinterpret_cast<const nv*>(p); }
nv* mnv(bf16* p) { return reinterpret_cast<nv*>(p); }

ShapeText dims_text(const MoeDims& d) {
  return shape_text("N=", d.N, " E=", d.E, " K=", d.K, " C=", d.C, " F=", d.F, " R=", d.R, " S=", d.S);
}

}  // namespace

void moe_forward(const MoePtrs& p, const MoeDims& d, const MoeConfig& cfg) {
  const ShapeText shapes = dims_text(d);
  const int N = static_cast<int>(d.N), E = static_cast<int>(d.E), K = static_cast<int>(d.K), C = static_cast<int>(d.C);
  const int NK = N * K;
  const int64_t chunks = dispatch_chunks(NK);
  const LaunchSpec router_spec{"moe_router", shapes, {ceil_div(d.N, kWarpsPerBlock), 1, 1}, {32 * kWarpsPerBlock, 1, 1}, 0};
  auto router = [&](auto kernel) {
    launch(router_spec, kernel, p.logits, p.scores, p.topk_idx, p.topk_w, p.shared_g, cnv(p.x), p.router_w, p.bias,
           p.ws_gate, N, E, K, C, static_cast<int>(d.S), cfg.score == MoeScore::sigmoid, cfg.renormalize);
  };
  switch (slots_for(d.E)) {
    case 1: router(router_kernel<1>); break;
    case 2: router(router_kernel<2>); break;
    default: router(router_kernel<kMaxSlots>); break;
  }
  auto* chunk = static_cast<int32_t*>(cuda_workspace(moe_cuda_workspace(cfg, d.N), "moe_forward"));
  const int cap = static_cast<int>(d.cap);
  launch({"moe_count", shapes, {chunks, 1, 1}, {kChunk, 1, 1}, static_cast<size_t>(E) * sizeof(int32_t)},
         count_kernel, chunk, p.topk_idx, NK, E);
  launch({"moe_scan", shapes, {1, 1, 1}, {kMoeMaxExperts, 1, 1}, 0}, scan_kernel, chunk, p.counts, p.offsets,
         p.stats, static_cast<int>(chunks), E, cap);
  launch({"moe_scatter", shapes, {chunks, 1, 1}, {kChunk, 1, 1}, static_cast<size_t>(32 * E) * sizeof(int32_t)},
         scatter_kernel, p.slot_row, p.perm, p.topk_idx, chunk, p.offsets, NK, E, cap);
  gather_rows(mnv(p.xg), cnv(p.x), p.perm, p.offsets, d.R, d.K, d.C, d.E);
  grouped_gemm_nt(p.pre, p.xg, p.w_in, p.offsets, E, d.R, d.F_in, d.C);
  activation_forward(mnv(p.act), cnv(p.pre), d.R, d.F, cfg.activation);
  grouped_gemm_nt(p.y, p.act, p.w_out, p.offsets, E, d.R, d.C, d.F);
  for (int64_t s = 0; s < d.S; ++s) {
    bf16* pre = p.shared_pre + s * d.N * d.F_in;
    bf16* act = p.shared_act + s * d.N * d.F;
    gemm("moe_shared_in", false, true, d.N, d.F_in, d.C, 1.0f, p.x, d.C, p.ws_in + s * d.F_in * d.C, d.C, 0.0f, pre,
         d.F_in);
    activation_forward(mnv(act), cnv(pre), d.N, d.F, cfg.activation);
    gemm("moe_shared_out", false, true, d.N, d.C, d.F, 1.0f, act, d.F, p.ws_out + s * d.C * d.F, d.F, 0.0f,
         p.shared_y + s * d.N * d.C, d.C);
  }
  combine(mnv(p.out), cnv(p.y), p.slot_row, p.topk_w, cnv(p.shared_y), p.ws_gate ? p.shared_g : nullptr, d.N, d.K,
          d.C, d.S);
  launch({"moe_aux", shapes, {1, 1, 1}, {1024, 1, 1}, 0}, aux_kernel, p.stats, p.logits, p.scores, p.counts, N, E, K,
         cfg.aux_coef, cfg.z_coef);
}

void moe_backward(const MoePtrs& p, const MoeDims& d, const MoeConfig& cfg, float d_aux) {
  const ShapeText shapes = dims_text(d);
  const int N = static_cast<int>(d.N), E = static_cast<int>(d.E), K = static_cast<int>(d.K), C = static_cast<int>(d.C);
  const double aux_scale = static_cast<double>(d_aux) * cfg.aux_coef * static_cast<double>(d.E) /
                           (static_cast<double>(d.N) * static_cast<double>(d.N * d.K));
  const double z_scale = static_cast<double>(d_aux) * cfg.z_coef * 2.0 / static_cast<double>(d.N);
  const LaunchSpec rb_spec{"moe_router_backward", shapes, {ceil_div(d.N, kWarpsPerBlock), 1, 1},
                           {32 * kWarpsPerBlock, 1, 1}, 0};
  auto router_backward = [&](auto kernel) {
    launch(rb_spec, kernel, mnv(p.dy), p.dlogits, mnv(p.dlogits_bf16), cnv(p.dout), cnv(p.y), p.slot_row, p.topk_w,
           p.topk_idx, p.scores, p.logits, p.counts, N, E, K, C, cfg.score == MoeScore::sigmoid, cfg.renormalize,
           aux_scale, z_scale);
  };
  switch (slots_for(d.E)) {
    case 1: router_backward(router_backward_kernel<1>); break;
    case 2: router_backward(router_backward_kernel<2>); break;
    default: router_backward(router_backward_kernel<kMaxSlots>); break;
  }
  // routed experts: dact = dy w_out[e]; dpre = act'(dact); dw_out[e] += dy^T act; dw_in[e] += dpre^T xg;
  // dxg = dpre w_in[e]
  if (!p.xg_saved) gather_rows(mnv(p.xg), cnv(p.x), p.perm, p.offsets, d.R, d.K, d.C, d.E);
  grouped_gemm_nn(p.dact, p.dy, p.w_out, p.offsets, E, d.R, d.F, d.C);
  activation_backward(mnv(p.dpre), cnv(p.dact), cnv(p.pre), d.R, d.F, cfg.activation);
  const float beta = p.expert_grads_zero ? 0.0f : 1.0f;  // 0: the gradients hold zeros, write them
  grouped_gemm_tn(p.dw_out, p.dy, p.act, p.offsets, E, d.R, d.C, d.F, beta);
  grouped_gemm_tn(p.dw_in, p.dpre, p.xg, p.offsets, E, d.R, d.F_in, d.C, beta);
  grouped_gemm_nn(p.dxg, p.dpre, p.w_in, p.offsets, E, d.R, d.C, d.F_in);
  // router weight: drouter_w (E, C) += dlogits^T x
  gemm("moe_router_dw", true, false, d.E, d.C, d.N, 1.0f, p.dlogits_bf16, d.E, p.x, d.C, 1.0f, p.drouter_w, d.C);
  // shared experts, in order, their part of dx summed in the f32 dsx
  if (d.S > 0) device_memset0(p.dsx, static_cast<size_t>(d.N * d.C) * sizeof(float));
  for (int64_t s = 0; s < d.S; ++s) {
    const bool gated = p.ws_gate != nullptr;
    launch({"moe_shared_backward", shapes, {ceil_div(d.N, kWarpsPerBlock), 1, 1}, {32 * kWarpsPerBlock, 1, 1}, 0},
           shared_backward_kernel, mnv(p.dys), p.dgl, mnv(p.dgl_bf16), p.dsx, cnv(p.dout),
           cnv(p.shared_y + s * d.N * d.C), gated ? p.shared_g + s * d.N : nullptr,
           gated ? p.ws_gate + s * d.C : nullptr, N, C);
    if (gated)  // dws_gate[s] (1, C) += dgl^T x
      gemm("moe_shared_gate_dw", true, false, 1, d.C, d.N, 1.0f, p.dgl_bf16, 1, p.x, d.C, 1.0f,
           p.dws_gate + s * d.C, d.C);
    const bf16* act = p.shared_act + s * d.N * d.F;
    gemm("moe_shared_out_dw", true, false, d.C, d.F, d.N, 1.0f, p.dys, d.C, act, d.F, 1.0f, p.dws_out + s * d.C * d.F,
         d.F);
    gemm("moe_shared_out_dx", false, false, d.N, d.F, d.C, 1.0f, p.dys, d.C, p.ws_out + s * d.C * d.F, d.F, 0.0f,
         p.dacts, d.F);
    activation_backward(mnv(p.dpres), cnv(p.dacts), cnv(p.shared_pre + s * d.N * d.F_in), d.N, d.F, cfg.activation);
    gemm("moe_shared_in_dw", true, false, d.F_in, d.C, d.N, 1.0f, p.dpres, d.F_in, p.x, d.C, 1.0f,
         p.dws_in + s * d.F_in * d.C, d.C);
    gemm("moe_shared_in_dx", false, false, d.N, d.C, d.F_in, 1.0f, p.dpres, d.F_in, p.ws_in + s * d.F_in * d.C, d.C,
         1.0f, p.dsx, d.C);
  }
  dx_gather(mnv(p.dx), cnv(p.dxg), p.slot_row, p.dlogits, p.router_w, d.S > 0 ? p.dsx : nullptr, d.N, d.K, d.C, d.E);
}

void moe_update_bias(float* bias, const int32_t* counts, int64_t E, float rate) {
  launch({"moe_update_bias", shape_text("E=", E), {1, 1, 1}, {32, 1, 1}, 0}, update_bias_kernel, bias, counts,
         static_cast<int>(E), rate);
}

}  // namespace cuda
}  // namespace lmf
