// norm.cu: CUDA launchers of LayerNorm and RMSNorm over the last dimension, and of the fused
// residual add + norm (norm.h), on f32 or bf16 rows (mixed precision: weight, bias, mean, rstd,
// dweight, dbias stay f32).
//
// Layout: inp, out, dout, dinp, a, b, res (N, C) row-major; mean, rstd (N); weight, bias, dweight,
// dbias (C). Kernels are templates on the storage type T of the rows (float or __nv_bfloat16,
// packed.cuh): loads widen exactly, math is fp32 (row statistics in double), every stored row value
// is rounded once.
// Row kernels (forward, fused forward, dinp): one warp per row, blockDim / 32 rows per block. Lane l
// takes the packs of W columns starting at l W, l W + 32 W, ... in order; row statistics accumulate in
// double and combine by the xor butterfly (block_reduce.cuh), so they depend only on C and W.
// W = 1 for f32 (the order of the fp32-only code, bitwise) and for bf16 rows whose C is not a
// multiple of 8 or whose pointers are not 16-byte aligned; else W = 8 (128-bit accesses).
// As on the CPU (norm.cpp): LayerNorm is two-pass (mean, then mean squared deviation), mean/rstd are
// stored as f32 and the outputs and gradients use those stored values, with the CPU's fp32
// expressions.
// Fused residual + norm: one pass over a and b; each lane stores res = T(a + b) and keeps the rounded
// values of its own columns in shared memory (rows per block chosen so a block stays within 48 KiB),
// then computes exactly what the unfused norm computes from the stored res: the fused output
// equals residual_forward followed by the norm, bitwise, for the same W.
// dweight/dbias (sums over rows), deterministic without atomics, in two passes:
//   1. block (row chunk k, column block): each thread owns one column and sums rows
//      [k kRowChunk, (k+1) kRowChunk) in increasing order, in double, into partial[k][c];
//   2. one thread per column sums partial[0..nchunks) in increasing k, in double, and adds the
//      rounded result to dweight/dbias.
//   The chunking is a fixed constant, so the order depends only on N, never on the grid scheduling.
//   Partials live in lmf::cuda_workspace (norm_backward_workspace(N, C) bytes).
// Backward accumulates (+=) into dinp, dweight and dbias (a bf16 dinp: widened, the fp32 gradient
// added, the sum rounded once).
#include <algorithm>
#include <string>
#include <type_traits>

#include "ops/block_reduce.cuh"
#include "ops/elementwise.cuh"
#include "ops/norm.h"
#include "ops/packed.cuh"

namespace lmf::cuda {
namespace {

constexpr int64_t kRowsPerBlock = 4;  // warps (rows) per block in the row kernels
constexpr int64_t kRowChunk = 64;     // rows per partial sum of dweight/dbias
constexpr int64_t kColBlock = 128;    // columns (threads) per block of the partial-sum pass
constexpr size_t kFusedSmem = 48 * 1024;  // shared-memory budget of a fused block (no opt-in needed)

ShapeText shapes_of(int64_t N, int64_t C) { return shape_text("N=", N, " C=", C); }

int64_t row_chunks(int64_t N) { return ceil_div(N, kRowChunk); }

// Columns per lane access for rows of T: see the header comment.
template <class T, class... P>
int row_pack(int64_t C, const P*... p) {
  if constexpr (std::is_same_v<T, float>) return 1;
  else return C % kPack<T> == 0 && aligned16(p...) ? kPack<T> : 1;
}

// Pointers of one forward launch. res, b: fused only (res = a + b, with a in `inp`); mean: LayerNorm
// only; bias: optional.
template <class T>
struct NormForwardArgs {
  T* out;
  float* mean;
  float* rstd;
  T* res;
  const T* inp;
  const T* b;
  const float* weight;
  const float* bias;
  int64_t N, C;
  float eps;
};

// kCentre: LayerNorm (mean subtracted, mean stored, optional bias); else RMSNorm (mean, bias unused).
// kResidual: the row is res = T(inp + b), stored to res and cached (as f32) in dynamic shared memory,
// C floats per warp; else the row is inp, read from global memory in each pass.
template <class T, int W, bool kCentre, bool kResidual>
__global__ void norm_forward_kernel(NormForwardArgs<T> p) {
  extern __shared__ float row_cache[];  // kResidual: (blockDim / 32, C)
  const int64_t rows = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = blockIdx.x * rows + warp;
  if (n >= p.N) return;  // whole warps leave; the row kernels have no block barrier
  const int64_t C = p.C, row0 = n * C;
  float* cache = row_cache + warp * C;
  if constexpr (kResidual) {
    for (int64_t i = lane * W; i < C; i += 32 * W) {
      float x[W], y[W];
      load_f32<W>(x, p.inp + row0 + i);
      load_f32<W>(y, p.b + row0 + i);
      T r[W];
#pragma unroll
      for (int k = 0; k < W; ++k) {
        r[k] = from_f32<T>(x[k] + y[k]);
        x[k] = to_f32(r[k]);
      }
      store_raw<W>(p.res + row0 + i, r);
      store_f32<W>(cache + i, x);  // this lane's columns only: no barrier needed
    }
  }
  // v = the row at columns [i, i + W)
  auto row = [&](int64_t i, float (&v)[W]) {
    if constexpr (kResidual) load_f32<W>(v, cache + i);
    else load_f32<W>(v, p.inp + row0 + i);
  };
  double m = 0.0;
  if constexpr (kCentre) {
    double s = 0.0;
    for (int64_t i = lane * W; i < C; i += 32 * W) {
      float v[W];
      row(i, v);
#pragma unroll
      for (int k = 0; k < W; ++k) s += static_cast<double>(v[k]);
    }
    m = warp_sum(s) / static_cast<double>(C);
  }
  double ss = 0.0;
  for (int64_t i = lane * W; i < C; i += 32 * W) {
    float v[W];
    row(i, v);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const double d = static_cast<double>(v[k]) - m;
      ss += d * d;
    }
  }
  const double var = warp_sum(ss) / static_cast<double>(C);
  const float mf = static_cast<float>(m);
  const float rf = static_cast<float>(1.0 / sqrt(var + static_cast<double>(p.eps)));
  if (lane == 0) {
    if constexpr (kCentre) p.mean[n] = mf;
    p.rstd[n] = rf;
  }
  for (int64_t i = lane * W; i < C; i += 32 * W) {
    float v[W], w[W], y[W];
    row(i, v);
    load_f32<W>(w, p.weight + i);
    if constexpr (kCentre) {
      if (p.bias) {
        float bb[W];
        load_f32<W>(bb, p.bias + i);
#pragma unroll
        for (int k = 0; k < W; ++k) y[k] = (v[k] - mf) * rf * w[k] + bb[k];
      } else {
#pragma unroll
        for (int k = 0; k < W; ++k) y[k] = (v[k] - mf) * rf * w[k];
      }
    } else {
#pragma unroll
      for (int k = 0; k < W; ++k) y[k] = v[k] * rf * w[k];
    }
    store_f32<W>(p.out + row0 + i, y);
  }
}

// dinp += rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat)), dnorm = weight * dout.
// mean == nullptr: RMSNorm (no centring, no mean(dnorm) term).
template <class T, int W>
__global__ void norm_backward_dinp_kernel(T* dinp, const T* dout, const T* inp, const float* weight, const float* mean,
                                          const float* rstd, int64_t N, int64_t C) {
  const int64_t n = blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  if (n >= N) return;
  const int64_t lane = threadIdx.x % 32, row0 = n * C;
  const float m = mean ? mean[n] : 0.0f;
  const float r = rstd[n];
  double sa = 0.0, sb = 0.0;
  for (int64_t i = lane * W; i < C; i += 32 * W) {
    float x[W], dy[W], w[W];
    load_f32<W>(x, inp + row0 + i);
    load_f32<W>(dy, dout + row0 + i);
    load_f32<W>(w, weight + i);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float dnorm = w[k] * dy[k];
      const float xhat = (x[k] - m) * r;
      sa += static_cast<double>(dnorm);
      sb += static_cast<double>(dnorm) * static_cast<double>(xhat);
    }
  }
  sa = warp_sum(sa);
  sb = warp_sum(sb);
  const float a = mean ? static_cast<float>(sa / static_cast<double>(C)) : 0.0f;
  const float b = static_cast<float>(sb / static_cast<double>(C));
  for (int64_t i = lane * W; i < C; i += 32 * W) {
    float x[W], dy[W], w[W], dx[W];
    load_f32<W>(x, inp + row0 + i);
    load_f32<W>(dy, dout + row0 + i);
    load_f32<W>(w, weight + i);
    load_f32<W>(dx, dinp + row0 + i);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float xhat = (x[k] - m) * r;
      dx[k] += r * (w[k] * dy[k] - a - xhat * b);
    }
    store_f32<W>(dinp + row0 + i, dx);
  }
}

// Pass 1. Block (k = blockIdx.x, column block blockIdx.y): part_w[k][c] = sum_n dout * xhat and
// part_b[k][c] = sum_n dout (part_b may be nullptr) over rows n of chunk k, in increasing n.
// part_w, part_b: (nchunks, C) double.
template <class T>
__global__ void norm_params_partial_kernel(double* part_w, double* part_b, const T* dout, const T* inp,
                                           const float* mean, const float* rstd, int64_t N, int64_t C) {
  const int64_t c = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const int64_t k = blockIdx.x, n0 = k * kRowChunk, n1 = min(N, n0 + kRowChunk);
  double dw = 0.0, db = 0.0;
  for (int64_t n = n0; n < n1; ++n) {
    const float m = mean ? mean[n] : 0.0f;
    const float xhat = (to_f32(inp[n * C + c]) - m) * rstd[n];
    const float dy = to_f32(dout[n * C + c]);
    dw += static_cast<double>(dy) * static_cast<double>(xhat);
    db += static_cast<double>(dy);
  }
  part_w[k * C + c] = dw;
  if (part_b) part_b[k * C + c] = db;
}

template <class T, bool kCentre, bool kResidual>
void forward_impl(const char* op, const NormForwardArgs<T>& p) {
  if (p.N == 0) return;
  const int W = row_pack<T>(p.C, p.out, p.res, p.inp, p.b, p.weight, p.bias);
  int64_t rows = kRowsPerBlock;
  size_t smem = 0;
  if constexpr (kResidual) {
    // Whole rows cached as f32: up to kRowsPerBlock of them within kFusedSmem (C <= 12288 keeps one
    // row under 48 KiB; wider rows opt into more, and launch() names the limit if even one does not fit).
    const size_t row_bytes = static_cast<size_t>(p.C) * sizeof(float);
    rows = std::clamp<int64_t>(static_cast<int64_t>(kFusedSmem / row_bytes), 1, kRowsPerBlock);
    smem = static_cast<size_t>(rows) * row_bytes;
  }
  const LaunchSpec spec{op, shapes_of(p.N, p.C), {ceil_div(p.N, rows), 1, 1}, {rows * 32, 1, 1}, smem};
  if constexpr (!std::is_same_v<T, float>) {
    if (W == kPack<T>) return launch(spec, norm_forward_kernel<T, kPack<T>, kCentre, kResidual>, p);
  }
  launch(spec, norm_forward_kernel<T, 1, kCentre, kResidual>, p);
}

template <class T>
void backward_impl(const char* op, T* dinp, float* dweight, float* dbias, const T* dout, const T* inp,
                   const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C) {
  if (N == 0 || C == 0) return;
  const ShapeText shapes = shapes_of(N, C);
  const LaunchSpec row_spec{op, shapes, {ceil_div(N, kRowsPerBlock), 1, 1}, {kRowsPerBlock * 32, 1, 1}, 0};
  const int W = row_pack<T>(C, dinp, dout, inp, weight);
  if (W > 1) {
    if constexpr (!std::is_same_v<T, float>)
      launch(row_spec, norm_backward_dinp_kernel<T, kPack<T>>, dinp, dout, inp, weight, mean, rstd, N, C);
  } else {
    launch(row_spec, norm_backward_dinp_kernel<T, 1>, dinp, dout, inp, weight, mean, rstd, N, C);
  }
  const int64_t nchunks = row_chunks(N);
  double* part_w = static_cast<double*>(cuda_workspace(norm_backward_workspace(N, C), op));
  double* part_b = dbias ? part_w + nchunks * C : nullptr;
  launch({op, shapes, {nchunks, ceil_div(C, kColBlock), 1}, {kColBlock, 1, 1}, 0}, norm_params_partial_kernel<T>,
         part_w, part_b, dout, inp, mean, rstd, N, C);
  // Pass 2: fixed-order sum over the chunks (k = 0, 1, ...), one thread per column. Only C threads
  // run, so the loads are batched kBatch at a time to overlap their latency; the additions keep
  // their order (bitwise the same as the plain loop).
  launch_elementwise(op, C, [=] __device__(int64_t c) {
    constexpr int64_t kBatch = 16;
    double w = 0.0, b = 0.0;
    int64_t k = 0;
    for (; k + kBatch <= nchunks; k += kBatch) {
      double vw[kBatch], vb[kBatch];
#pragma unroll
      for (int64_t j = 0; j < kBatch; ++j) {
        vw[j] = part_w[(k + j) * C + c];
        vb[j] = part_b ? part_b[(k + j) * C + c] : 0.0;
      }
#pragma unroll
      for (int64_t j = 0; j < kBatch; ++j) {
        w += vw[j];
        b += vb[j];
      }
    }
    for (; k < nchunks; ++k) {
      w += part_w[k * C + c];
      if (part_b) b += part_b[k * C + c];
    }
    dweight[c] += static_cast<float>(w);
    if (part_b) dbias[c] += static_cast<float>(b);
  });
}

template <class T>
void layernorm_forward_impl(T* out, float* mean, float* rstd, const T* inp, const float* weight, const float* bias,
                            int64_t N, int64_t C, float eps) {
  forward_impl<T, true, false>("layernorm_forward",
                               {out, mean, rstd, nullptr, inp, nullptr, weight, bias, N, C, eps});
}

template <class T>
void rmsnorm_forward_impl(T* out, float* rstd, const T* inp, const float* weight, int64_t N, int64_t C, float eps) {
  forward_impl<T, false, false>("rmsnorm_forward",
                                {out, nullptr, rstd, nullptr, inp, nullptr, weight, nullptr, N, C, eps});
}

template <class T>
void residual_layernorm_forward_impl(T* res, T* out, float* mean, float* rstd, const T* a, const T* b,
                                     const float* weight, const float* bias, int64_t N, int64_t C, float eps) {
  forward_impl<T, true, true>("residual_layernorm_forward", {out, mean, rstd, res, a, b, weight, bias, N, C, eps});
}

template <class T>
void residual_rmsnorm_forward_impl(T* res, T* out, float* rstd, const T* a, const T* b, const float* weight,
                                   int64_t N, int64_t C, float eps) {
  forward_impl<T, false, true>("residual_rmsnorm_forward",
                               {out, nullptr, rstd, res, a, b, weight, nullptr, N, C, eps});
}

}  // namespace

size_t norm_backward_workspace(int64_t N, int64_t C) {
  return static_cast<size_t>(2 * row_chunks(N) * C) * sizeof(double);  // part_w and part_b
}

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight, const float* bias,
                       int64_t N, int64_t C, float eps) {
  layernorm_forward_impl(out, mean, rstd, inp, weight, bias, N, C, eps);
}
void layernorm_forward(bf16* out, float* mean, float* rstd, const bf16* inp, const float* weight, const float* bias,
                       int64_t N, int64_t C, float eps) {
  layernorm_forward_impl(as_nv(out), mean, rstd, as_nv(inp), weight, bias, N, C, eps);
}

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int64_t C, float eps) {
  rmsnorm_forward_impl(out, rstd, inp, weight, N, C, eps);
}
void rmsnorm_forward(bf16* out, float* rstd, const bf16* inp, const float* weight, int64_t N, int64_t C, float eps) {
  rmsnorm_forward_impl(as_nv(out), rstd, as_nv(inp), weight, N, C, eps);
}

void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C) {
  backward_impl("layernorm_backward", dinp, dweight, dbias, dout, inp, weight, mean, rstd, N, C);
}
void layernorm_backward(bf16* dinp, float* dweight, float* dbias, const bf16* dout, const bf16* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C) {
  backward_impl("layernorm_backward", as_nv(dinp), dweight, dbias, as_nv(dout), as_nv(inp), weight, mean, rstd, N, C);
}

void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int64_t C) {
  backward_impl("rmsnorm_backward", dinp, dweight, static_cast<float*>(nullptr), dout, inp, weight,
                static_cast<const float*>(nullptr), rstd, N, C);
}
void rmsnorm_backward(bf16* dinp, float* dweight, const bf16* dout, const bf16* inp, const float* weight,
                      const float* rstd, int64_t N, int64_t C) {
  backward_impl("rmsnorm_backward", as_nv(dinp), dweight, static_cast<float*>(nullptr), as_nv(dout), as_nv(inp),
                weight, static_cast<const float*>(nullptr), rstd, N, C);
}

void residual_layernorm_forward(float* res, float* out, float* mean, float* rstd, const float* a, const float* b,
                                const float* weight, const float* bias, int64_t N, int64_t C, float eps) {
  residual_layernorm_forward_impl(res, out, mean, rstd, a, b, weight, bias, N, C, eps);
}
void residual_layernorm_forward(bf16* res, bf16* out, float* mean, float* rstd, const bf16* a, const bf16* b,
                                const float* weight, const float* bias, int64_t N, int64_t C, float eps) {
  residual_layernorm_forward_impl(as_nv(res), as_nv(out), mean, rstd, as_nv(a), as_nv(b), weight, bias, N, C, eps);
}

void residual_rmsnorm_forward(float* res, float* out, float* rstd, const float* a, const float* b,
                              const float* weight, int64_t N, int64_t C, float eps) {
  residual_rmsnorm_forward_impl(res, out, rstd, a, b, weight, N, C, eps);
}
void residual_rmsnorm_forward(bf16* res, bf16* out, float* rstd, const bf16* a, const bf16* b, const float* weight,
                              int64_t N, int64_t C, float eps) {
  residual_rmsnorm_forward_impl(as_nv(res), as_nv(out), rstd, as_nv(a), as_nv(b), weight, N, C, eps);
}

}  // namespace lmf::cuda
