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
// Rows in registers: when a lane owns at most kMaxLaneCols columns (C <= 1024), the row kernels keep
// the lane's packs in registers (NP packs, a compile-time count from with_lane_packs), issue every
// load of the row before its first use and read each input once; same lane columns and operation
// order and expressions as the looping kernels. Wider rows use the looping kernels.
// Fused residual + norm: one pass over a and b; each lane stores res = T(a + b) and keeps the rounded
// values of its own columns (in registers, or for wide rows in shared memory, rows per block chosen so
// a block stays within 48 KiB), then computes exactly what the unfused norm computes from the stored
// res: the fused output equals residual_forward followed by the norm, bitwise, for the same W.
// Backward, rows in registers (the common case): one fused kernel computes dinp and the partials of
// dweight, dbias and (when asked) the column sums of the updated dinp, which are the bias gradient of
// the linear layer whose output fed inp through the residual stream; then a small kernel sums the
// partials; deterministic without atomics:
//   1. a fixed partition of the rows that depends on N only: rpw = ceil(N / kBwdTargetWarps) rows per
//      warp, kBwdWarps warps per block; warp w of block k takes rows [(k kBwdWarps + w) rpw, + rpw) in
//      increasing order (the next row's loads in flight while one is computed) and accumulates
//      dout * xhat, dout and the stored dinp per lane column in the warp's slice of shared memory (fp32
//      for bf16 rows; double for f32 rows, whose CPU tolerance is ~1 ulp of the sum); the block adds
//      its warps' sums in warp order and writes one partial row per block and sum, part[k][0 / 1 / 2][c];
//   2. norm_params_sum_kernel: for each column, 16 threads sum every 16th partial in double, then the
//      16 sums are added in order and the rounded result added to dweight / dbias / dinp_sum.
// Wide rows (C > 1024): the dinp row kernel, then per-chunk partials in double (each thread one
//   column, rows [k kRowChunk, (k+1) kRowChunk) in order, the stored dinp read back) and the same
//   fixed-order sum (pass 2).
// Both partial layouts live in lmf::cuda_workspace (norm_backward_workspace(N, C) bytes, the larger).
// Backward accumulates (+=) into dinp, dweight and dbias (a bf16 dinp: widened, the fp32 gradient
// added, the sum rounded once).
#include <algorithm>
#include <string>
#include <type_traits>

#include "core/cuda_launch.cuh"
#include "ops/block_reduce.cuh"
#include "ops/norm.h"
#include "ops/packed.cuh"

namespace lmf::cuda {
namespace {

constexpr int64_t kRowsPerBlock = 4;  // warps (rows) per block in the row kernels
constexpr int64_t kRowChunk = 64;     // rows per partial sum of dweight/dbias
constexpr int64_t kColBlock = 128;    // columns (threads) per block of the partial-sum pass
constexpr size_t kFusedSmem = 48 * 1024;  // shared-memory budget of a fused block (no opt-in needed)
constexpr int kMaxLaneCols = 32;          // register-resident rows: at most this many columns per lane
constexpr int kBwdWarps = 8;              // warps (row streams) per block of the fused backward
constexpr int64_t kBwdTargetWarps = 2048; // row streams of the fused backward: rows per warp = ceil(N / this)
constexpr int kSumRows = 16;              // threads per column in the final partial sum (blockDim.y)

ShapeText shapes_of(int64_t N, int64_t C) { return shape_text("N=", N, " C=", C); }

int64_t row_chunks(int64_t N) { return ceil_div(N, kRowChunk); }

// Fused backward partition, a function of N only: warp w of block k owns rows
// [(k kBwdWarps + w) rpw, ... + rpw) with rpw = bwd_rows_per_warp(N).
int64_t bwd_rows_per_warp(int64_t N) { return ceil_div(N, kBwdTargetWarps); }
int64_t bwd_blocks(int64_t N) { return ceil_div(N, kBwdWarps * bwd_rows_per_warp(N)); }

// Register-resident rows: calls f(std::integral_constant<int, NP>{}) with NP packs of W columns per lane
// (lane l owns packs l W + j 32 W, j < NP, the columns of the looping kernels in the same order) and
// returns true, or returns false when a row has more than 32 kMaxLaneCols columns. The columns per
// lane are rounded up to a multiple of 8 (W divides 8): four instantiations per (T, W).
template <int W, class F>
bool with_lane_packs(int64_t C, F&& f) {
  static_assert(8 % W == 0, "W must divide 8");
  switch (ceil_div(ceil_div(C, 32), 8) * 8) {
    case 8: f(std::integral_constant<int, 8 / W>{}); return true;
    case 16: f(std::integral_constant<int, 16 / W>{}); return true;
    case 24: f(std::integral_constant<int, 24 / W>{}); return true;
    case kMaxLaneCols: f(std::integral_constant<int, kMaxLaneCols / W>{}); return true;
    default: return false;
  }
}

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

// The row kernel above with the row held in registers (NP packs of W columns per lane, C <= 32 *
// kMaxLaneCols): every load is issued before the first use and each input is read once. Same lane
// columns, same operation order: bitwise the same results as norm_forward_kernel<T, W, ...>.
template <class T, int W, int NP, bool kCentre, bool kResidual>
__global__ void norm_forward_reg_kernel(NormForwardArgs<T> p) {
  const int64_t rows = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = blockIdx.x * rows + warp;
  if (n >= p.N) return;
  const int64_t C = p.C, row0 = n * C;
  auto col = [&](int j) { return lane * W + static_cast<int64_t>(j) * 32 * W; };
  float v[NP][W];
  T xa[NP][W], xb[NP][W];
#pragma unroll
  for (int j = 0; j < NP; ++j)
    if (col(j) < C) {
      load_raw<W>(xa[j], p.inp + row0 + col(j));
      if constexpr (kResidual) load_raw<W>(xb[j], p.b + row0 + col(j));
    }
#pragma unroll
  for (int j = 0; j < NP; ++j)
    if (col(j) < C) {
      if constexpr (kResidual) {
        T r[W];
#pragma unroll
        for (int k = 0; k < W; ++k) {
          r[k] = from_f32<T>(to_f32(xa[j][k]) + to_f32(xb[j][k]));
          v[j][k] = to_f32(r[k]);
        }
        store_raw<W>(p.res + row0 + col(j), r);
      } else {
#pragma unroll
        for (int k = 0; k < W; ++k) v[j][k] = to_f32(xa[j][k]);
      }
    }
  double m = 0.0;
  if constexpr (kCentre) {
    double s = 0.0;
#pragma unroll
    for (int j = 0; j < NP; ++j)
      if (col(j) < C) {
#pragma unroll
        for (int k = 0; k < W; ++k) s += static_cast<double>(v[j][k]);
      }
    m = warp_sum(s) / static_cast<double>(C);
  }
  double ss = 0.0;
#pragma unroll
  for (int j = 0; j < NP; ++j)
    if (col(j) < C) {
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const double d = static_cast<double>(v[j][k]) - m;
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
#pragma unroll
  for (int j = 0; j < NP; ++j)
    if (col(j) < C) {
      const int64_t i = col(j);
      float w[W], y[W];
      load_f32<W>(w, p.weight + i);
      if constexpr (kCentre) {
        if (p.bias) {
          float bb[W];
          load_f32<W>(bb, p.bias + i);
#pragma unroll
          for (int k = 0; k < W; ++k) y[k] = (v[j][k] - mf) * rf * w[k] + bb[k];
        } else {
#pragma unroll
          for (int k = 0; k < W; ++k) y[k] = (v[j][k] - mf) * rf * w[k];
        }
      } else {
#pragma unroll
        for (int k = 0; k < W; ++k) y[k] = v[j][k] * rf * w[k];
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

// Pass 1. Block (k = blockIdx.x, column block blockIdx.y): part_w[k][c] = sum_n dout * xhat,
// part_b[k][c] = sum_n dout and part_s[k][c] = sum_n dinp (the updated dinp, as stored) over rows n
// of chunk k, in increasing n (part_b and part_s may be nullptr). part_*: (nchunks, C) double.
template <class T>
__global__ void norm_params_partial_kernel(double* part_w, double* part_b, double* part_s, const T* dinp,
                                           const T* dout, const T* inp, const float* mean, const float* rstd,
                                           int64_t N, int64_t C) {
  const int64_t c = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const int64_t k = blockIdx.x, n0 = k * kRowChunk, n1 = min(N, n0 + kRowChunk);
  double dw = 0.0, db = 0.0, ds = 0.0;
  for (int64_t n = n0; n < n1; ++n) {
    const float m = mean ? mean[n] : 0.0f;
    const float xhat = (to_f32(inp[n * C + c]) - m) * rstd[n];
    const float dy = to_f32(dout[n * C + c]);
    dw += static_cast<double>(dy) * static_cast<double>(xhat);
    db += static_cast<double>(dy);
    if (part_s) ds += static_cast<double>(to_f32(dinp[n * C + c]));
  }
  part_w[k * C + c] = dw;
  if (part_b) part_b[k * C + c] = db;
  if (part_s) part_s[k * C + c] = ds;
}

// Fused backward for register-resident rows (NP packs of W columns per lane, as above): dinp as
// norm_backward_dinp_kernel (same lane columns and order: the same dinp), and the partial sums over
// the block's rows of dout * xhat (dweight), of dout (dbias, when kBias) and of the updated dinp as
// stored (its column sums, when kSum). Warp w of block k takes rows [(k kBwdWarps + w) rpw, + rpw) in
// increasing order and accumulates per lane column, in type Acc (bwd_acc_t: fp32 for bf16 rows, double
// for f32 rows, whose CPU tolerance is ~1 ulp of the sum), in its own slice of shared memory (laid out
// [kSums][NP W][32 lanes]: each lane's columns at a stride of 32, so the warp's accesses hit 32 banks);
// the block then adds its warps' sums in warp order and writes part[k][s][c], s = 0 dweight, 1 dbias,
// 2 dinp column sums. The order depends on N only. Keeping the sums out of registers leaves room for
// the next row's loads, issued before the current row is computed (two rows in flight per warp).
// part: (gridDim.x, kPartRows, C) Acc.
template <class T>
using bwd_acc_t = std::conditional_t<std::is_same_v<T, float>, double, float>;
constexpr int kPartRows = 3;  // dweight, dbias, dinp column sums

template <class T, int NP, int W>
size_t bwd_smem_bytes(int sums) {
  return static_cast<size_t>(kBwdWarps) * sums * NP * W * 32 * sizeof(bwd_acc_t<T>);
}

template <class T, int W, int NP, bool kBias, bool kSum>
__global__ void __launch_bounds__(kBwdWarps * 32, W * NP <= 24 && W > 1 ? 2 : 1)
    norm_backward_reg_kernel(T* dinp, bwd_acc_t<T>* part, const T* dout, const T* inp, const float* weight,
                             const float* mean, const float* rstd, int64_t N, int64_t C, int64_t rpw) {
  using Acc = bwd_acc_t<T>;
  constexpr int kSlots = NP * W;  // columns per lane
  constexpr int kSums = 1 + kBias + kSum;
  constexpr int kSumAt = kBias ? 2 : 1;                      // slice of the dinp column sums
  extern __shared__ __align__(16) unsigned char bwd_smem[];  // (kBwdWarps, kSums, kSlots, 32) Acc
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  auto col = [&](int j) { return static_cast<int64_t>(lane) * W + static_cast<int64_t>(j) * 32 * W; };
  Acc* sums = reinterpret_cast<Acc*>(bwd_smem);
  Acc* my = sums + warp * kSums * kSlots * 32 + lane;  // my[(s kSlots + slot) 32]
#pragma unroll
  for (int q = 0; q < kSums * kSlots; ++q) my[q * 32] = Acc(0);
  const int64_t n0 = (blockIdx.x * static_cast<int64_t>(kBwdWarps) + warp) * rpw, n1 = min(N, n0 + rpw);
  struct Row {
    T x[NP][W], dy[NP][W], dx[NP][W];
    float m, r;
  };
  auto load_row = [&](Row& R, int64_t n) {
    const int64_t row0 = n * C;
#pragma unroll
    for (int j = 0; j < NP; ++j)
      if (col(j) < C) {
        load_raw<W>(R.x[j], inp + row0 + col(j));
        load_raw<W>(R.dy[j], dout + row0 + col(j));
        load_raw<W>(R.dx[j], dinp + row0 + col(j));
      }
    R.m = mean ? mean[n] : 0.0f;
    R.r = rstd[n];
  };
  auto compute_row = [&](const Row& R, int64_t n) {
    const int64_t row0 = n * C;
    const float m = R.m, r = R.r;
    double sa = 0.0, sb = 0.0;
#pragma unroll
    for (int j = 0; j < NP; ++j)
      if (col(j) < C) {
        float w[W];
        load_f32<W>(w, weight + col(j));
#pragma unroll
        for (int k = 0; k < W; ++k) {
          const float dnorm = w[k] * to_f32(R.dy[j][k]);
          const float xhat = (to_f32(R.x[j][k]) - m) * r;
          sa += static_cast<double>(dnorm);
          sb += static_cast<double>(dnorm) * static_cast<double>(xhat);
        }
      }
    sa = warp_sum(sa);
    sb = warp_sum(sb);
    const float a = mean ? static_cast<float>(sa / static_cast<double>(C)) : 0.0f;
    const float b = static_cast<float>(sb / static_cast<double>(C));
#pragma unroll
    for (int j = 0; j < NP; ++j)
      if (col(j) < C) {
        float w[W], d[W];
        load_f32<W>(w, weight + col(j));
#pragma unroll
        for (int k = 0; k < W; ++k) {
          const float g = to_f32(R.dy[j][k]);
          const float xhat = (to_f32(R.x[j][k]) - m) * r;
          d[k] = to_f32(R.dx[j][k]);
          d[k] += r * (w[k] * g - a - xhat * b);
          Acc& dw = my[(j * W + k) * 32];
          if constexpr (std::is_same_v<Acc, double>) dw += static_cast<double>(g) * static_cast<double>(xhat);
          else dw = fmaf(g, xhat, dw);
          if constexpr (kBias) my[(kSlots + j * W + k) * 32] += static_cast<Acc>(g);
          if constexpr (kSum) my[(kSumAt * kSlots + j * W + k) * 32] += static_cast<Acc>(to_f32(from_f32<T>(d[k])));
        }
        store_f32<W>(dinp + row0 + col(j), d);
      }
  };
  Row ra, rb;
  if (n0 < n1) load_row(ra, n0);
  for (int64_t n = n0; n < n1; n += 2) {  // two rows in flight: the next one loads while this one computes
    if (n + 1 < n1) load_row(rb, n + 1);
    compute_row(ra, n);
    if (n + 1 >= n1) break;
    if (n + 2 < n1) load_row(ra, n + 2);
    compute_row(rb, n + 1);
  }
  __syncthreads();
  // block partial: for each (sum, slot, lane), the warps' sums added in order 0, 1, ...
  Acc* out = part + blockIdx.x * kPartRows * C;
  for (int q = threadIdx.x; q < kSums * kSlots * 32; q += blockDim.x) {
    const int s = q / (kSlots * 32), slot = (q / 32) % kSlots, l = q % 32;
    const int64_t c = static_cast<int64_t>(l) * W + static_cast<int64_t>(slot / W) * 32 * W + slot % W;
    if (c >= C) continue;
    Acc t = sums[q];
    for (int k = 1; k < kBwdWarps; ++k) t += sums[k * kSums * kSlots * 32 + q];
    out[(s == kSumAt && kSum ? 2 : s) * C + c] = t;
  }
}

// Pass 2 of dweight/dbias/dinp column sums: dst[i][c] += sum_k src[i][k * stride + c], k < nparts, in a
// fixed order: thread (x, y) of a (32, kSumRows) block sums k = y, y + kSumRows, ... in double, then
// row y = 0 adds the kSumRows sums in increasing y. blockIdx.y = i selects the pair.
template <class P>
struct ParamSums {
  float* dst[kPartRows];
  const P* src[kPartRows];
  int count = 0;
  void add(float* d, const P* s) {
    if (d) dst[count] = d, src[count++] = s;
  }
};

template <class P>
__global__ void norm_params_sum_kernel(ParamSums<P> sums_of, int64_t nparts, int64_t stride, int64_t C) {
  __shared__ double sums[kSumRows][33];
  const int64_t c = blockIdx.x * 32 + threadIdx.x;
  float* dst = sums_of.dst[blockIdx.y];
  const P* src = sums_of.src[blockIdx.y];
  double s = 0.0;
  if (c < C) {
    constexpr int kBatch = 8;  // loads in flight; the additions keep their order
    int64_t k = threadIdx.y;
    for (; k + (kBatch - 1) * kSumRows < nparts; k += kBatch * kSumRows) {
      P v[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) v[j] = src[(k + j * kSumRows) * stride + c];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) s += static_cast<double>(v[j]);
    }
    for (; k < nparts; k += kSumRows) s += static_cast<double>(src[k * stride + c]);
  }
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    double t = 0.0;
#pragma unroll
    for (int y = 0; y < kSumRows; ++y) t += sums[y][threadIdx.x];
    dst[c] += static_cast<float>(t);
  }
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
  // Rows of up to 32 kMaxLaneCols columns stay in registers (no shared-memory cache).
  const LaunchSpec reg_spec{op, shapes_of(p.N, p.C), {ceil_div(p.N, kRowsPerBlock), 1, 1}, {kRowsPerBlock * 32, 1, 1}, 0};
  auto launch_reg = [&]<int Wc>(std::integral_constant<int, Wc>) {
    return with_lane_packs<Wc>(p.C, [&]<int NP>(std::integral_constant<int, NP>) {
      launch(reg_spec, norm_forward_reg_kernel<T, Wc, NP, kCentre, kResidual>, p);
    });
  };
  const LaunchSpec spec{op, shapes_of(p.N, p.C), {ceil_div(p.N, rows), 1, 1}, {rows * 32, 1, 1}, smem};
  if constexpr (!std::is_same_v<T, float>) {
    if (W == kPack<T>) {
      if (launch_reg(std::integral_constant<int, kPack<T>>{})) return;
      return launch(spec, norm_forward_kernel<T, kPack<T>, kCentre, kResidual>, p);
    }
  }
  if (launch_reg(std::integral_constant<int, 1>{})) return;
  launch(spec, norm_forward_kernel<T, 1, kCentre, kResidual>, p);
}

template <class T>
void backward_impl(const char* op, T* dinp, float* dweight, float* dbias, float* dinp_sum, const T* dout,
                   const T* inp, const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C) {
  if (N == 0 || C == 0) return;
  const ShapeText shapes = shapes_of(N, C);
  const int W = row_pack<T>(C, dinp, dout, inp, weight);
  // Rows that fit in registers: one fused pass (dinp and the per-block partials), then the fixed-order
  // sum over the blocks.
  auto launch_fused = [&]<int Wc>(std::integral_constant<int, Wc>) {
    return with_lane_packs<Wc>(C, [&]<int NP>(std::integral_constant<int, NP>) {
      using Acc = bwd_acc_t<T>;
      const int64_t nblocks = bwd_blocks(N);
      Acc* part = static_cast<Acc*>(cuda_workspace(norm_backward_workspace(N, C), op));
      const int nsums = 1 + (dbias != nullptr) + (dinp_sum != nullptr);
      const LaunchSpec spec{op, shapes, {nblocks, 1, 1}, {kBwdWarps * 32, 1, 1}, bwd_smem_bytes<T, NP, Wc>(nsums)};
      auto go = [&]<bool kB, bool kS>(std::bool_constant<kB>, std::bool_constant<kS>) {
        launch(spec, norm_backward_reg_kernel<T, Wc, NP, kB, kS>, dinp, part, dout, inp, weight, mean, rstd, N, C,
               bwd_rows_per_warp(N));
      };
      if (dbias && dinp_sum) go(std::true_type{}, std::true_type{});
      else if (dbias) go(std::true_type{}, std::false_type{});
      else if (dinp_sum) go(std::false_type{}, std::true_type{});
      else go(std::false_type{}, std::false_type{});
      ParamSums<Acc> targets;
      targets.add(dweight, part);
      targets.add(dbias, part + C);
      targets.add(dinp_sum, part + 2 * C);
      launch({op, shapes, {ceil_div(C, 32), targets.count, 1}, {32, kSumRows, 1}, 0}, norm_params_sum_kernel<Acc>,
             targets, nblocks, kPartRows * C, C);
    });
  };
  if constexpr (!std::is_same_v<T, float>) {
    if (W == kPack<T> && launch_fused(std::integral_constant<int, kPack<T>>{})) return;
  }
  if (W == 1 && launch_fused(std::integral_constant<int, 1>{})) return;
  // Wide rows: the row kernel for dinp, then per-chunk partials and their fixed-order sum.
  const LaunchSpec row_spec{op, shapes, {ceil_div(N, kRowsPerBlock), 1, 1}, {kRowsPerBlock * 32, 1, 1}, 0};
  if (W > 1) {
    if constexpr (!std::is_same_v<T, float>)
      launch(row_spec, norm_backward_dinp_kernel<T, kPack<T>>, dinp, dout, inp, weight, mean, rstd, N, C);
  } else {
    launch(row_spec, norm_backward_dinp_kernel<T, 1>, dinp, dout, inp, weight, mean, rstd, N, C);
  }
  const int64_t nchunks = row_chunks(N);
  double* part_w = static_cast<double*>(cuda_workspace(norm_backward_workspace(N, C), op));
  double* part_b = dbias ? part_w + nchunks * C : nullptr;
  double* part_s = dinp_sum ? part_w + 2 * nchunks * C : nullptr;
  launch({op, shapes, {nchunks, ceil_div(C, kColBlock), 1}, {kColBlock, 1, 1}, 0}, norm_params_partial_kernel<T>,
         part_w, part_b, part_s, static_cast<const T*>(dinp), dout, inp, mean, rstd, N, C);
  ParamSums<double> targets;
  targets.add(dweight, part_w);
  targets.add(dbias, part_b);
  targets.add(dinp_sum, part_s);
  launch({op, shapes, {ceil_div(C, 32), targets.count, 1}, {32, kSumRows, 1}, 0}, norm_params_sum_kernel<double>,
         targets, nchunks, C, C);
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
  // the larger of the fused path's (blocks, 3, C) and the wide-row path's (3, chunks, C) f64 partials
  return std::max(static_cast<size_t>(kPartRows * bwd_blocks(N) * C) * sizeof(double),
                  static_cast<size_t>(kPartRows * row_chunks(N) * C) * sizeof(double));
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

void layernorm_backward(float* dinp, float* dweight, float* dbias, float* dinp_sum, const float* dout,
                        const float* inp, const float* weight, const float* mean, const float* rstd, int64_t N,
                        int64_t C) {
  backward_impl("layernorm_backward", dinp, dweight, dbias, dinp_sum, dout, inp, weight, mean, rstd, N, C);
}
void layernorm_backward(bf16* dinp, float* dweight, float* dbias, float* dinp_sum, const bf16* dout, const bf16* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C) {
  backward_impl("layernorm_backward", as_nv(dinp), dweight, dbias, dinp_sum, as_nv(dout), as_nv(inp), weight, mean,
                rstd, N, C);
}

void rmsnorm_backward(float* dinp, float* dweight, float* dinp_sum, const float* dout, const float* inp,
                      const float* weight, const float* rstd, int64_t N, int64_t C) {
  backward_impl("rmsnorm_backward", dinp, dweight, static_cast<float*>(nullptr), dinp_sum, dout, inp, weight,
                static_cast<const float*>(nullptr), rstd, N, C);
}
void rmsnorm_backward(bf16* dinp, float* dweight, float* dinp_sum, const bf16* dout, const bf16* inp,
                      const float* weight, const float* rstd, int64_t N, int64_t C) {
  backward_impl("rmsnorm_backward", as_nv(dinp), dweight, static_cast<float*>(nullptr), dinp_sum, as_nv(dout),
                as_nv(inp), weight, static_cast<const float*>(nullptr), rstd, N, C);
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
