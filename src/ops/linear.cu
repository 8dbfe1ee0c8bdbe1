// linear.cu: CUDA launchers of y = x W^T + b (linear.h).
//
// Forward is one cuBLASLt GEMM with the bias fused as its epilogue; backward is two GEMMs with
// beta = 1 (accumulate) and a two-pass column sum for dbias (linear.h): pass 1 sums fixed chunks of
// kLinearBiasRowChunk rows per column into the workspace, pass 2 adds each column's chunk partials in
// a fixed order (kFinishLanes interleaved lanes, then the lanes in order) into dbias. Every sum has a fixed order, so results are bitwise reproducible; no atomics.
#include <cuda_bf16.h>

#include "core/cuda_launch.cuh"
#include "ops/gemm_cuda.h"
#include "ops/linear.h"
#include "ops/packed.cuh"

namespace lmf {
namespace {

constexpr int kBiasCols = 32;   // columns per pass-1 block: one warp reads 128 contiguous bytes of a row
constexpr int kBiasLanes = 8;   // row lanes per pass-1 block: lane y sums rows y, y + 8, ... of its chunk
constexpr int kFinishBlock = 32;  // columns per pass-2 block: OC = 768 is 24 blocks (24 SMs), not 3
constexpr int kFinishLanes = 8;   // chunk lanes per pass-2 block (GPT-2, N = 16,384: 64 chunks, 8 per lane)
static_assert(kLinearBiasRowChunk % kBiasLanes == 0);

// partial: (chunks, OC); dout: (N, OC). Block (kBiasCols, kBiasLanes); thread x owns W consecutive
// columns (W = 1, or a 16-byte pack when OC and dout allow: the same per-column sums, 16-byte loads);
// grid.x = chunks * col_groups, block b handles column group b % col_groups of row chunk b / col_groups.
template <int W, class T>
__global__ void bias_partial_kernel(float* __restrict__ partial, const T* __restrict__ dout, int64_t N, int64_t OC,
                                    int64_t col_groups) {
  __shared__ float lane_sum[kBiasLanes][kBiasCols * W];
  const int64_t group = blockIdx.x % col_groups, chunk = blockIdx.x / col_groups;
  const int64_t c = (group * kBiasCols + threadIdx.x) * W;
  const int64_t r0 = chunk * kLinearBiasRowChunk;
  const int64_t r1 = r0 + kLinearBiasRowChunk < N ? r0 + kLinearBiasRowChunk : N;
  float acc[W] = {};
  if (c < OC)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kBiasLanes) {
      float v[W];
      cuda::load_f32<W>(v, dout + r * OC + c);
#pragma unroll
      for (int w = 0; w < W; ++w) acc[w] += v[w];
    }
#pragma unroll
  for (int w = 0; w < W; ++w) lane_sum[threadIdx.y][threadIdx.x * W + w] = acc[w];
  __syncthreads();
  if (threadIdx.y == 0 && c < OC) {
#pragma unroll
    for (int w = 0; w < W; ++w) {
      float s = lane_sum[0][threadIdx.x * W + w];
      for (int l = 1; l < kBiasLanes; ++l) s += lane_sum[l][threadIdx.x * W + w];
      partial[chunk * OC + c + w] = s;
    }
  }
}

// dbias: (OC) += sum over chunks of partial: (chunks, OC), in a fixed order. Block (kFinishBlock
// columns, kFinishLanes lanes): lane y sums chunks y, y + kFinishLanes, ... (their loads issued before
// the adds: latency, not bandwidth, bounds this pass), then lane 0 adds the lanes' sums in lane order.
__global__ void bias_finish_kernel(float* __restrict__ dbias, const float* __restrict__ partial, int64_t chunks,
                                   int64_t OC) {
  __shared__ float lane_sum[kFinishLanes][kFinishBlock];
  const int64_t c = blockIdx.x * static_cast<int64_t>(kFinishBlock) + threadIdx.x;
  float s = 0.0f;
  if (c < OC) {
    int64_t k = threadIdx.y;
    constexpr int kBatch = 8;
    for (; k + (kBatch - 1) * kFinishLanes < chunks; k += kBatch * kFinishLanes) {
      float v[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) v[i] = partial[(k + i * kFinishLanes) * OC + c];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) s += v[i];
    }
    for (; k < chunks; k += kFinishLanes) s += partial[k * OC + c];
  }
  lane_sum[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < OC) {
    float t = lane_sum[0][threadIdx.x];
    for (int l = 1; l < kFinishLanes; ++l) t += lane_sum[l][threadIdx.x];
    dbias[c] += t;
  }
}

ShapeText dims(int64_t N, int64_t IC, int64_t OC) { return shape_text("N=", N, " IC=", IC, " OC=", OC); }

// dbias (OC) += column sums of dout (N, OC), two passes in a fixed order (file comment).
template <class T>
void bias_grad(const char* op, float* dbias, const T* dout, int64_t N, int64_t IC, int64_t OC) {
  constexpr int kW = cuda::kPack<T>;  // columns per thread in 16 bytes
  const int64_t chunks = cuda::ceil_div(N, kLinearBiasRowChunk);
  auto* partial = static_cast<float*>(cuda_workspace(linear_backward_cuda_workspace(N, OC), op));
  const ShapeText shapes = dims(N, IC, OC);
  if (OC % kW == 0 && cuda::aligned16(dout)) {
    const int64_t col_groups = cuda::ceil_div(OC, kBiasCols * kW);
    cuda::launch({op, shapes, {chunks * col_groups, 1, 1}, {kBiasCols, kBiasLanes, 1}, 0}, bias_partial_kernel<kW, T>,
                 partial, dout, N, OC, col_groups);
  } else {
    const int64_t col_groups = cuda::ceil_div(OC, kBiasCols);
    cuda::launch({op, shapes, {chunks * col_groups, 1, 1}, {kBiasCols, kBiasLanes, 1}, 0}, bias_partial_kernel<1, T>,
                 partial, dout, N, OC, col_groups);
  }
  cuda::launch({op, shapes, {cuda::ceil_div(OC, kFinishBlock), 1, 1}, {kFinishBlock, kFinishLanes, 1}, 0},
               bias_finish_kernel, dbias, static_cast<const float*>(partial), chunks, OC);
}

const __nv_bfloat16* dev(const bf16* p) { return reinterpret_cast<const __nv_bfloat16*>(p); }

}  // namespace

namespace cuda {

void linear_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N, int64_t IC,
                    int64_t OC, GemmMath math) {
  // out (N, OC) = inp (N, IC) weight^T (IC, OC) + bias
  gemm("linear_forward", math, false, true, N, OC, IC, 1.0f, inp, IC, weight, IC, 0.0f, out, OC, bias);
}

void linear_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int64_t IC, int64_t OC, GemmMath math, bool accumulate_dinp) {
  const char* op = "linear_backward";
  if (dbias) bias_grad(op, dbias, dout, N, IC, OC);
  // dinp (N, IC) += dout (N, OC) weight (OC, IC)
  if (dinp)
    gemm(op, math, false, false, N, IC, OC, 1.0f, dout, OC, weight, IC, accumulate_dinp ? 1.0f : 0.0f, dinp, IC);
  // dweight (OC, IC) += dout^T (OC, N) inp (N, IC)
  if (dweight) gemm(op, math, true, false, OC, IC, N, 1.0f, dout, OC, inp, IC, 1.0f, dweight, IC);
}

void linear_forward(bf16* out, const bf16* inp, const bf16* weight, const bf16* bias, int64_t N, int64_t IC,
                    int64_t OC) {
  gemm("linear_forward", false, true, N, OC, IC, 1.0f, inp, IC, weight, IC, 0.0f, out, OC, bias);
}

void linear_gelu_forward(bf16* act, bf16* pre, const bf16* inp, const bf16* weight, const bf16* bias, int64_t N,
                         int64_t IC, int64_t OC) {
  // pre = inp weight^T + bias (the aux output), act = gelu(pre): one GEMM with the GELU_AUX_BIAS epilogue
  gemm("linear_gelu_forward", false, true, N, OC, IC, 1.0f, inp, IC, weight, IC, 0.0f, act, OC, bias,
       GemmEpilogue::gelu_aux, pre, OC);
}

void linear_backward(bf16* dinp, float* dweight, float* dbias, const bf16* dout, const bf16* inp, const bf16* weight,
                     int64_t N, int64_t IC, int64_t OC, bool accumulate_dinp, bool accumulate_dweight) {
  const char* op = "linear_backward";
  if (dbias) bias_grad(op, dbias, dev(dout), N, IC, OC);
  if (dinp) gemm(op, false, false, N, IC, OC, 1.0f, dout, OC, weight, IC, accumulate_dinp ? 1.0f : 0.0f, dinp, IC);
  if (dweight)
    gemm(op, true, false, OC, IC, N, 1.0f, dout, OC, inp, IC, accumulate_dweight ? 1.0f : 0.0f, dweight, IC);
}

void linear_backward_dgelu(bf16* dpre, float* dweight, float* dbias, const bf16* dout, const bf16* inp,
                           const bf16* weight, const bf16* pre, int64_t N, int64_t IC, int64_t OC,
                           bool accumulate_dweight) {
  const char* op = "linear_backward_dgelu";
  if (dbias) bias_grad(op, dbias, dev(dout), N, IC, OC);
  // dpre (N, IC) = (dout (N, OC) weight (OC, IC)) * gelu'(pre): the DGELU epilogue (overwrites)
  gemm(op, false, false, N, IC, OC, 1.0f, dout, OC, weight, IC, 0.0f, dpre, IC, nullptr, GemmEpilogue::dgelu,
       const_cast<bf16*>(pre), IC);
  if (dweight)
    gemm(op, true, false, OC, IC, N, 1.0f, dout, OC, inp, IC, accumulate_dweight ? 1.0f : 0.0f, dweight, IC);
}

}  // namespace cuda
}  // namespace lmf
