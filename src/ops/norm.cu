// norm.cu: CUDA launchers of LayerNorm and RMSNorm over the last dimension (norm.h).
//
// Layout: inp, out, dout, dinp (N, C) row-major; mean, rstd (N); weight, bias, dweight, dbias (C).
// Row kernels (forward, dinp): one warp per row, kRowsPerBlock rows per block. Lane l takes columns
// l, l + 32, ... in order; row statistics accumulate in double and combine by the xor butterfly
// (block_reduce.cuh), so they depend only on C. As on the CPU (norm.cpp): LayerNorm is two-pass
// (mean, then mean squared deviation), mean/rstd are stored as f32 and the outputs and gradients use
// those stored values, with the CPU's fp32 expressions.
// dweight/dbias (sums over rows), deterministic without atomics, in two passes:
//   1. block (row chunk k, column block): each thread owns one column and sums rows
//      [k kRowChunk, (k+1) kRowChunk) in increasing order, in double, into partial[k][c];
//   2. one thread per column sums partial[0..nchunks) in increasing k, in double, and adds the
//      rounded result to dweight/dbias.
//   The chunking is a fixed constant, so the order depends only on N, never on the grid scheduling.
//   Partials live in lmf::cuda_workspace (norm_backward_workspace(N, C) bytes).
// Backward accumulates (+=) into dinp, dweight and dbias.
#include <string>

#include "ops/block_reduce.cuh"
#include "ops/elementwise.cuh"
#include "ops/norm.h"

namespace lmf::cuda {
namespace {

constexpr int64_t kRowsPerBlock = 4;  // warps (rows) per block in the row kernels
constexpr int64_t kRowChunk = 64;     // rows per partial sum of dweight/dbias
constexpr int64_t kColBlock = 128;    // columns (threads) per block of the partial-sum pass

ShapeText shapes_of(int64_t N, int64_t C) { return shape_text("N=", N, " C=", C); }

int64_t row_chunks(int64_t N) { return ceil_div(N, kRowChunk); }

// kCentre: LayerNorm (mean subtracted, mean stored, optional bias); else RMSNorm (mean, bias unused).
template <bool kCentre>
__global__ void norm_forward_kernel(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                                    const float* bias, int64_t N, int64_t C, float eps) {
  const int64_t n = blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  if (n >= N) return;  // whole warps leave; the row kernels have no block barrier
  const int lane = threadIdx.x % 32;
  const float* x = inp + n * C;
  float* y = out + n * C;
  double m = 0.0;
  if constexpr (kCentre) {
    double s = 0.0;
    for (int64_t i = lane; i < C; i += 32) s += static_cast<double>(x[i]);
    m = warp_sum(s) / static_cast<double>(C);
  }
  double ss = 0.0;
  for (int64_t i = lane; i < C; i += 32) {
    const double d = static_cast<double>(x[i]) - m;
    ss += d * d;
  }
  const double var = warp_sum(ss) / static_cast<double>(C);
  const float mf = static_cast<float>(m);
  const float rf = static_cast<float>(1.0 / sqrt(var + static_cast<double>(eps)));
  if (lane == 0) {
    if constexpr (kCentre) mean[n] = mf;
    rstd[n] = rf;
  }
  if constexpr (kCentre) {
    if (bias) {
      for (int64_t i = lane; i < C; i += 32) y[i] = (x[i] - mf) * rf * weight[i] + bias[i];
    } else {
      for (int64_t i = lane; i < C; i += 32) y[i] = (x[i] - mf) * rf * weight[i];
    }
  } else {
    for (int64_t i = lane; i < C; i += 32) y[i] = x[i] * rf * weight[i];
  }
}

// dinp += rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat)), dnorm = weight * dout.
// mean == nullptr: RMSNorm (no centring, no mean(dnorm) term).
__global__ void norm_backward_dinp_kernel(float* dinp, const float* dout, const float* inp, const float* weight,
                                          const float* mean, const float* rstd, int64_t N, int64_t C) {
  const int64_t n = blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  if (n >= N) return;
  const int lane = threadIdx.x % 32;
  const float* x = inp + n * C;
  const float* dy = dout + n * C;
  float* dx = dinp + n * C;
  const float m = mean ? mean[n] : 0.0f;
  const float r = rstd[n];
  double sa = 0.0, sb = 0.0;
  for (int64_t i = lane; i < C; i += 32) {
    const float dnorm = weight[i] * dy[i];
    const float xhat = (x[i] - m) * r;
    sa += static_cast<double>(dnorm);
    sb += static_cast<double>(dnorm) * static_cast<double>(xhat);
  }
  sa = warp_sum(sa);
  sb = warp_sum(sb);
  const float a = mean ? static_cast<float>(sa / static_cast<double>(C)) : 0.0f;
  const float b = static_cast<float>(sb / static_cast<double>(C));
  for (int64_t i = lane; i < C; i += 32) {
    const float xhat = (x[i] - m) * r;
    dx[i] += r * (weight[i] * dy[i] - a - xhat * b);
  }
}

// Pass 1. Block (k = blockIdx.x, column block blockIdx.y): part_w[k][c] = sum_n dout * xhat and
// part_b[k][c] = sum_n dout (part_b may be nullptr) over rows n of chunk k, in increasing n.
// part_w, part_b: (nchunks, C) double.
__global__ void norm_params_partial_kernel(double* part_w, double* part_b, const float* dout, const float* inp,
                                           const float* mean, const float* rstd, int64_t N, int64_t C) {
  const int64_t c = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const int64_t k = blockIdx.x, n0 = k * kRowChunk, n1 = min(N, n0 + kRowChunk);
  double dw = 0.0, db = 0.0;
  for (int64_t n = n0; n < n1; ++n) {
    const float m = mean ? mean[n] : 0.0f;
    const float xhat = (inp[n * C + c] - m) * rstd[n];
    const float dy = dout[n * C + c];
    dw += static_cast<double>(dy) * static_cast<double>(xhat);
    db += static_cast<double>(dy);
  }
  part_w[k * C + c] = dw;
  if (part_b) part_b[k * C + c] = db;
}

void norm_backward(const char* op, float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                   const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C) {
  if (N == 0 || C == 0) return;
  const ShapeText shapes = shapes_of(N, C);
  launch({op, shapes, {ceil_div(N, kRowsPerBlock), 1, 1}, {kRowsPerBlock * 32, 1, 1}, 0}, norm_backward_dinp_kernel,
         dinp, dout, inp, weight, mean, rstd, N, C);
  const int64_t nchunks = row_chunks(N);
  double* part_w = static_cast<double*>(cuda_workspace(norm_backward_workspace(N, C), op));
  double* part_b = dbias ? part_w + nchunks * C : nullptr;
  launch({op, shapes, {nchunks, ceil_div(C, kColBlock), 1}, {kColBlock, 1, 1}, 0}, norm_params_partial_kernel, part_w,
         part_b, dout, inp, mean, rstd, N, C);
  // Pass 2: fixed-order sum over the chunks, one thread per column.
  launch_elementwise(op, C, [=] __device__(int64_t c) {
    double w = 0.0, b = 0.0;
    for (int64_t k = 0; k < nchunks; ++k) w += part_w[k * C + c];
    dweight[c] += static_cast<float>(w);
    if (part_b) {
      for (int64_t k = 0; k < nchunks; ++k) b += part_b[k * C + c];
      dbias[c] += static_cast<float>(b);
    }
  });
}

}  // namespace

size_t norm_backward_workspace(int64_t N, int64_t C) {
  return static_cast<size_t>(2 * row_chunks(N) * C) * sizeof(double);  // part_w and part_b
}

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight, const float* bias,
                       int64_t N, int64_t C, float eps) {
  if (N == 0) return;
  launch({"layernorm_forward", shapes_of(N, C), {ceil_div(N, kRowsPerBlock), 1, 1}, {kRowsPerBlock * 32, 1, 1}, 0},
         norm_forward_kernel<true>, out, mean, rstd, inp, weight, bias, N, C, eps);
}

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int64_t C, float eps) {
  if (N == 0) return;
  launch({"rmsnorm_forward", shapes_of(N, C), {ceil_div(N, kRowsPerBlock), 1, 1}, {kRowsPerBlock * 32, 1, 1}, 0},
         norm_forward_kernel<false>, out, static_cast<float*>(nullptr), rstd, inp, weight,
         static_cast<const float*>(nullptr), N, C, eps);
}

void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C) {
  norm_backward("layernorm_backward", dinp, dweight, dbias, dout, inp, weight, mean, rstd, N, C);
}

void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int64_t C) {
  norm_backward("rmsnorm_backward", dinp, dweight, nullptr, dout, inp, weight, nullptr, rstd, N, C);
}

}  // namespace lmf::cuda
