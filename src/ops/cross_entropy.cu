// cross_entropy.cu: CUDA launcher of the LM head fused with softmax cross-entropy (cross_entropy.h).
//
// The CPU reference's algorithm, chunk by chunk (R rows of logits_scratch at a time, in order):
//   logits = x_chunk W[:V]^T                 (cuBLASLt, ld Vp; columns V..Vp-1 are never written)
//   one block per row:  max (fixed-order tree), sum exp(l - max) accumulated in double (fixed-order
//     tree), loss = max - l[target] + log(sum) in double; with gradients, the row is overwritten in
//     place with grad_scale (softmax - onehot) (exp recomputed, the same value as in the sum)
//   dx_chunk += dlogits W[:V];  dW[:V] += dlogits^T x_chunk          (cuBLASLt, beta = 1)
// Every reduction has a fixed order and every GEMM a cached algorithm: bitwise reproducible.
// exp is CUDA's expf (<= 2 ulp; the CPU's exp_nonpos is <= 1.4 ulp), the sum in double as on the CPU.
//
// bf16 (mixed precision, docs/MIXED_PRECISION.md): the same chunks and GEMM shapes with bf16 x, W
// (the bf16 weight copy) and logits (cuda::gemm's bf16 overloads, fp32 accumulation). The row kernel
// widens the bf16 logits, computes max, sum of exp and the loss in fp32 (block_reduce.cuh's
// fixed-order reductions; exp is __expf, ex2.approx: 2 + 1.16 |x| ulp, far under the bf16 logits'
// rounding, and a third of expf's instructions, which made the row kernel issue-bound) and, with
// gradients, overwrites each logit in place with
// bf16(grad_scale (softmax - onehot)): every element is read and then written by the same thread, and
// the target logit, which all threads read, is read before the first barrier. Row kernels by Vp: up to
// 32K columns the row lives in registers (ce_row_bf16_reg_kernel<4>), up to 55K (GPT-2's 50,304) in
// shared memory: for a chunk of more rows than SMs, one block per SM walking its rows through two row
// buffers filled by bulk copies (ce_row_bf16_pipe_kernel), else two blocks per SM
// (ce_row_bf16_smem_kernel; both give the same bits); up to 64K in registers again, beyond that three
// passes over global memory. dx += dlogits W is a
// bf16-C GEMM (beta 1: dx is read, accumulated in fp32, rounded once), dW += dlogits^T x an fp32-C one.
#include <climits>
#include <cmath>
#include <cstring>

#include "core/cuda_launch.cuh"
#include "ops/cross_entropy.h"
#include "ops/elementwise.cuh"
#include "ops/block_reduce.cuh"
#include "ops/ptx.cuh"
#include "ops/gemm_cuda.h"
#include "ops/packed.cuh"

namespace lmf {
namespace {

constexpr int kRowThreads = 512;

// losses: (rows) of this chunk; logits: (rows, Vp), the first V columns valid; targets: (rows).
// One block per row. grad: overwrite logits[:, :V] with grad_scale (softmax - onehot) and
// logits[:, V:Vp] with 0.
__global__ void ce_row_kernel(float* __restrict__ losses, float* __restrict__ logits,
                              const int32_t* __restrict__ targets, int64_t V, int64_t Vp, float grad_scale,
                              bool grad) {
  __shared__ float s_max[kRowThreads];
  __shared__ double s_sum[kRowThreads];
  const int tid = threadIdx.x;
  float* l = logits + static_cast<int64_t>(blockIdx.x) * Vp;
  const int64_t tgt = targets[blockIdx.x];
  const bool tgt_ok = tgt >= 0 && tgt < V;
  // Read before any thread overwrites the row (the writes come after several __syncthreads).
  const float l_tgt = tgt_ok ? l[tgt] : 0.0f;

  // max: thread t over t, t + kRowThreads, ...; then a fixed tree. NaN is skipped (x > m is false).
  float mx = -INFINITY;
  for (int64_t j = tid; j < V; j += kRowThreads) mx = l[j] > mx ? l[j] : mx;
  s_max[tid] = mx;
  for (int stride = kRowThreads / 2; stride > 0; stride /= 2) {
    __syncthreads();
    if (tid < stride) s_max[tid] = s_max[tid + stride] > s_max[tid] ? s_max[tid + stride] : s_max[tid];
  }
  __syncthreads();
  mx = s_max[0];

  // sum of exp(l - max) in double, same partition and tree.
  double sum = 0.0;
  for (int64_t j = tid; j < V; j += kRowThreads) sum += static_cast<double>(expf(l[j] - mx));
  s_sum[tid] = sum;
  for (int stride = kRowThreads / 2; stride > 0; stride /= 2) {
    __syncthreads();
    if (tid < stride) s_sum[tid] += s_sum[tid + stride];
  }
  __syncthreads();
  sum = s_sum[0];
  if (tid == 0)
    losses[blockIdx.x] = tgt_ok ? static_cast<float>(static_cast<double>(mx) - static_cast<double>(l_tgt) + log(sum))
                                : __int_as_float(0x7fc00000);  // NaN: the loader let a bad target through
  if (!grad) return;
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t j = tid; j < V; j += kRowThreads) {
    const float p = expf(l[j] - mx) * inv;
    l[j] = grad_scale * (j == tgt ? p - 1.0f : p);
  }
  for (int64_t j = V + tid; j < Vp; j += kRowThreads) l[j] = 0.0f;  // padded vocab: no gradient
}

// The bf16 twin of ce_row_kernel (fp32 math; the reductions from block_reduce.cuh). losses: (rows)
// f32; logits: (rows, Vp) bf16, the first V columns valid; targets: (rows). One block per row. grad:
// logits[:, :V] = bf16(grad_scale (softmax - onehot)) in place, logits[:, V:Vp] = 0.
__global__ void ce_row_bf16_kernel(float* __restrict__ losses, __nv_bfloat16* __restrict__ logits,
                                   const int32_t* __restrict__ targets, int64_t V, int64_t Vp, float grad_scale,
                                   bool grad) {
  __shared__ float scratch[32];
  const int tid = threadIdx.x;
  __nv_bfloat16* l = logits + static_cast<int64_t>(blockIdx.x) * Vp;
  const int64_t tgt = targets[blockIdx.x];
  const bool tgt_ok = tgt >= 0 && tgt < V;
  // Read before any thread overwrites the row (the writes come after the barriers of block_max/sum).
  const float l_tgt = tgt_ok ? cuda::to_f32(l[tgt]) : 0.0f;

  // Thread t reduces t, t + kRowThreads, ... in order, then the fixed butterfly of the block.
  float mx = -INFINITY;
  for (int64_t j = tid; j < V; j += kRowThreads) mx = fmaxf(mx, cuda::to_f32(l[j]));
  mx = cuda::block_max(mx, scratch);
  float sum = 0.0f;
  for (int64_t j = tid; j < V; j += kRowThreads) sum += __expf(cuda::to_f32(l[j]) - mx);
  sum = cuda::block_sum(sum, scratch);
  if (tid == 0)
    losses[blockIdx.x] = tgt_ok ? (mx - l_tgt) + logf(sum) : __int_as_float(0x7fc00000);  // NaN: bad target
  if (!grad) return;
  const float inv = 1.0f / sum;
  for (int64_t j = tid; j < V; j += kRowThreads) {
    const float p = __expf(cuda::to_f32(l[j]) - mx) * inv;
    l[j] = cuda::from_f32<__nv_bfloat16>(grad_scale * (j == tgt ? p - 1.0f : p));
  }
  for (int64_t j = V + tid; j < Vp; j += kRowThreads) l[j] = __nv_bfloat16(0.0f);  // padded vocab: no gradient
}

// ce_row_bf16_kernel with the row held in registers: read once, written once (the three passes of
// the kernel above read it three times). Thread t holds the 8-element vectors t, t + kRegThreads, ...
// (kVecs of them, raw bf16); needs Vp % 8 == 0 (16-byte rows) and Vp <= 8 kVecs kRegThreads.
// Same math and fixed-order reductions (each thread's partial in vector order, then the block's
// butterfly), so bitwise reproducible.
constexpr int kRegThreads = 1024;

template <int kVecs>
__global__ void __launch_bounds__(kRegThreads) ce_row_bf16_reg_kernel(float* __restrict__ losses,
                                                                     __nv_bfloat16* __restrict__ logits,
                                                                     const int32_t* __restrict__ targets, int64_t V,
                                                                     int64_t Vp, float grad_scale, bool grad) {
  __shared__ float scratch[32];
  const int tid = threadIdx.x;
  __nv_bfloat16* l = logits + static_cast<int64_t>(blockIdx.x) * Vp;
  const int64_t tgt = targets[blockIdx.x];
  const bool tgt_ok = tgt >= 0 && tgt < V;
  const float l_tgt = tgt_ok ? cuda::to_f32(l[tgt]) : 0.0f;
  const int64_t nvec = Vp / 8;
  uint4 raw[kVecs];
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    const int64_t v = tid + static_cast<int64_t>(k) * kRegThreads;
    raw[k] = v < nvec ? reinterpret_cast<const uint4*>(l)[v] : make_uint4(0, 0, 0, 0);
  }
  auto value = [&](int k, int e) {  // element e of vector k, widened
    __nv_bfloat16 h[8];
    memcpy(h, &raw[k], 16);
    return __bfloat162float(h[e]);
  };
  // n_valid(k): elements of vector k below V (8 for every vector but the tail's)
  const int Vi = static_cast<int>(V);
  auto n_valid = [&](int k) { return min(8, max(0, Vi - (tid + k * kRegThreads) * 8)); };
  float mx = -INFINITY;
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    const int nv = n_valid(k);
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (e < nv) mx = fmaxf(mx, value(k, e));
  }
  mx = cuda::block_max(mx, scratch);
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    const int nv = n_valid(k);
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (e < nv) sum += __expf(value(k, e) - mx);
  }
  sum = cuda::block_sum(sum, scratch);
  if (tid == 0)
    losses[blockIdx.x] = tgt_ok ? (mx - l_tgt) + logf(sum) : __int_as_float(0x7fc00000);  // NaN: bad target
  if (!grad) return;
  const float inv = 1.0f / sum;
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    const int64_t v = tid + static_cast<int64_t>(k) * kRegThreads;
    if (v >= nvec) continue;
    __nv_bfloat16 out[8];
    const int nv = n_valid(k), t_e = static_cast<int>(tgt - v * 8);  // the target's element, if in [0, 8)
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float p = e < nv ? __expf(value(k, e) - mx) * inv : 0.0f;
      out[e] = e < nv ? cuda::from_f32<__nv_bfloat16>(grad_scale * (e == t_e ? p - 1.0f : p)) : __nv_bfloat16(0.0f);
    }
    uint4 u;
    memcpy(&u, out, 16);
    reinterpret_cast<uint4*>(l)[v] = u;
  }
}

// ce_row_bf16_kernel with the row staged in shared memory (Vp * 2 bytes, dynamic): read from global
// memory once, written once, and small enough (<= kSmemRowMaxBytes) that two rows fit on an SM, so one
// block loads its row while the other reduces or writes (the register-resident kernel above holds a
// 50K-column row in 1,024 threads at 62 registers: one block per SM, its phases never overlap).
// Thread t owns the 16-byte vectors t, t + kSmemThreads, ...; max and sum in fp32 over its vectors in
// order, then the block's fixed butterfly: bitwise reproducible. Needs Vp % 8 == 0, 16-byte rows.
constexpr int kSmemThreads = 512;
constexpr int64_t kSmemRowMaxBytes = 110 * 1024;

using cuda::bf16_hi;
using cuda::bf16_lo;
__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: 2 ulp, as __expf
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The staged-row kernels' shared steps. max over vector v's valid logits (vectors [0, nfull) hold 8).
__device__ __forceinline__ float vec_max(float mx, const uint4& r, int v, int nfull, int V) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
  if (v < nfull) {
#pragma unroll
    for (int i = 0; i < 4; ++i) mx = fmaxf(mx, fmaxf(bf16_lo(w[i]), bf16_hi(w[i])));
  } else {
    const int nv = V - 8 * v;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (2 * i < nv) mx = fmaxf(mx, bf16_lo(w[i]));
      if (2 * i + 1 < nv) mx = fmaxf(mx, bf16_hi(w[i]));
    }
  }
  return mx;
}

// Given the row's block max mx (every thread), from the staged row srow: the sum of exp (thread t over
// vectors t, t + kSmemThreads, ..., then the block sum), the loss (thread 0), and with grad the row's
// gradients written to g (global), bf16(grad_scale (softmax - onehot)).
__device__ __forceinline__ void ce_staged_row_finish(float* loss, uint4* g, const uint4* srow, float mx, float l_tgt,
                                                     bool tgt_ok, int tgt, int nvec, int nfull, int V,
                                                     float grad_scale, bool grad, float* scratch) {
  const int tid = threadIdx.x;
  constexpr float kLog2e = 1.4426950408889634f;
  const float mx2 = mx * kLog2e;  // exp(x - mx) = exp2(x log2e - mx log2e), one FFMA + ex2
  float sum = 0.0f;
  for (int v = tid; v < nvec; v += kSmemThreads) {
    const uint4 r = srow[v];
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
    if (v < nfull) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        sum += fast_exp2(fmaf(bf16_lo(w[i]), kLog2e, -mx2));
        sum += fast_exp2(fmaf(bf16_hi(w[i]), kLog2e, -mx2));
      }
    } else {
      const int nv = V - 8 * v;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (2 * i < nv) sum += fast_exp2(fmaf(bf16_lo(w[i]), kLog2e, -mx2));
        if (2 * i + 1 < nv) sum += fast_exp2(fmaf(bf16_hi(w[i]), kLog2e, -mx2));
      }
    }
  }
  sum = cuda::block_sum(sum, scratch);
  if (tid == 0) *loss = tgt_ok ? (mx - l_tgt) + logf(sum) : __int_as_float(0x7fc00000);  // NaN: bad target
  if (!grad) return;
  const float scale = grad_scale / sum;  // grad = grad_scale p - grad_scale [target]
  for (int v = tid; v < nvec; v += kSmemThreads) {
    const uint4 r = srow[v];
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
    const int nv = V - 8 * v;  // >= 8 for full vectors
    uint32_t o[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int e = 8 * v + 2 * i;
      float a = 2 * i < nv ? fast_exp2(fmaf(bf16_lo(w[i]), kLog2e, -mx2)) * scale : 0.0f;
      float b = 2 * i + 1 < nv ? fast_exp2(fmaf(bf16_hi(w[i]), kLog2e, -mx2)) * scale : 0.0f;
      if (e == tgt) a -= grad_scale;
      if (e + 1 == tgt) b -= grad_scale;
      const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
      o[i] = *reinterpret_cast<const uint32_t*>(&h);
    }
    g[v] = make_uint4(o[0], o[1], o[2], o[3]);
  }
}

__global__ void __launch_bounds__(kSmemThreads, 2) ce_row_bf16_smem_kernel(float* __restrict__ losses,
                                                                          __nv_bfloat16* __restrict__ logits,
                                                                          const int32_t* __restrict__ targets, int V,
                                                                          int Vp, float grad_scale, bool grad) {
  extern __shared__ uint4 srow[];  // the row, Vp / 8 vectors
  __shared__ float scratch[32];
  const int tid = threadIdx.x;
  __nv_bfloat16* l = logits + static_cast<int64_t>(blockIdx.x) * Vp;
  uint4* g = reinterpret_cast<uint4*>(l);
  const int tgt = targets[blockIdx.x];
  const bool tgt_ok = tgt >= 0 && tgt < V;
  const float l_tgt = tgt_ok ? cuda::to_f32(l[tgt]) : 0.0f;  // read before any thread writes the row
  const int nvec = Vp / 8, nfull = V / 8;
  float mx = -INFINITY;
  for (int v = tid; v < nvec; v += kSmemThreads) {
    const uint4 r = g[v];
    srow[v] = r;
    mx = vec_max(mx, r, v, nfull, V);
  }
  mx = cuda::block_max(mx, scratch);  // its barriers also publish srow
  ce_staged_row_finish(losses + blockIdx.x, g, srow, mx, l_tgt, tgt_ok, tgt, nvec, nfull, V, grad_scale, grad, scratch);
}

// ce_row_bf16_smem_kernel's math with one block per SM walking its rows (blockIdx.x, + gridDim.x, ...)
// through two row buffers: the next row's bulk copy (cp.async.bulk, completing on an mbarrier) lands
// while this one is reduced and written, so the reads stream without pause (two blocks per SM of the
// kernel above read only while one of them is in its load phase: 3.0 TB/s at GPT-2's rows). Max, sum
// and gradients in the same per-thread order with the same block reductions: the same bits. Needs
// 2 Vp * 2 bytes of shared memory, Vp % 8 == 0, 16-byte aligned rows.
constexpr int64_t kPipeSmemMaxBytes = 220 * 1024;

__global__ void __launch_bounds__(kSmemThreads, 1) ce_row_bf16_pipe_kernel(float* __restrict__ losses,
                                                                          __nv_bfloat16* __restrict__ logits,
                                                                          const int32_t* __restrict__ targets,
                                                                          int rows, int V, int Vp, float grad_scale,
                                                                          bool grad) {
  extern __shared__ __align__(16) uint4 srows[];  // 2 x Vp / 8 vectors
  __shared__ float scratch[32];
  __shared__ __align__(8) uint64_t bar[2];
  const int tid = threadIdx.x;
  const int nvec = Vp / 8, nfull = V / 8;  // vectors [0, nfull) hold 8 valid logits; later ones fewer or none
  const uint32_t row_bytes = static_cast<uint32_t>(Vp) * 2;
  if (tid == 0) {
    cuda::mbar_init(&bar[0], 1);
    cuda::mbar_init(&bar[1], 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  int64_t row = blockIdx.x;
  if (tid == 0 && row < rows) {
    cuda::mbar_expect_tx(&bar[0], row_bytes);
    cuda::bulk_load(srows, logits + row * Vp, row_bytes, &bar[0]);
  }
  for (uint32_t k = 0; row < rows; ++k, row += gridDim.x) {
    const int b = static_cast<int>(k & 1);
    const uint4* srow = srows + b * nvec;
    const int64_t next = row + gridDim.x;
    if (tid == 0 && next < rows) {  // the other buffer: every thread finished with it (barrier below)
      cuda::fence_proxy_async();
      cuda::mbar_expect_tx(&bar[b ^ 1], row_bytes);
      cuda::bulk_load(srows + (b ^ 1) * nvec, logits + next * Vp, row_bytes, &bar[b ^ 1]);
    }
    cuda::mbar_wait(&bar[b], (k >> 1) & 1);
    uint4* g = reinterpret_cast<uint4*>(logits + row * Vp);
    const int tgt = targets[row];
    const bool tgt_ok = tgt >= 0 && tgt < V;
    const float l_tgt = tgt_ok ? cuda::to_f32(reinterpret_cast<const __nv_bfloat16*>(srow)[tgt]) : 0.0f;
    float mx = -INFINITY;
    for (int v = tid; v < nvec; v += kSmemThreads) mx = vec_max(mx, srow[v], v, nfull, V);
    mx = cuda::block_max(mx, scratch);
    ce_staged_row_finish(losses + row, g, srow, mx, l_tgt, tgt_ok, tgt, nvec, nfull, V, grad_scale, grad, scratch);
    __syncthreads();  // srow is refilled by the next-but-one row's copy, issued next iteration
  }
}

ShapeText dims(int64_t N, int64_t C, int64_t V, int64_t Vp, int64_t R) {
  return shape_text("N=", N, " C=", C, " V=", V, " Vp=", Vp, " R=", R);
}

// One block: each thread sums its strided elements in double in index order, then the block sum
// (fixed order, block_reduce.cuh). dst[0] = (accumulate ? dst[0] : 0) + scale * mean.
__global__ void loss_mean_kernel(float* dst, const float* losses, int64_t n, float scale, bool accumulate) {
  __shared__ double scratch[32];
  double s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += losses[i];
  s = cuda::block_sum(s, scratch);
  if (threadIdx.x == 0)
    dst[0] = static_cast<float>((accumulate ? static_cast<double>(dst[0]) : 0.0) +
                                static_cast<double>(scale) * (s / static_cast<double>(n)));
}

}  // namespace

namespace cuda {

void loss_mean(float* dst, const float* losses, int64_t n, float scale, bool accumulate) {
  launch({"loss_mean", shape_text("n=", n), {1, 1, 1}, {1024, 1, 1}, 0}, loss_mean_kernel, dst, losses, n, scale,
         accumulate);
}

void lm_head_cross_entropy(float* losses, float* dx, float* dw, const float* x, const float* w,
                           const int32_t* targets, float* logits, int64_t N, int64_t C, int64_t V, int64_t Vp,
                           int64_t R, float grad_scale, GemmMath math) {
  const char* op = "lm_head_cross_entropy";
  const bool grad = dx != nullptr;
  const ShapeText shapes = dims(N, C, V, Vp, R);
  for (int64_t n0 = 0; n0 < N; n0 += R) {
    const int64_t rows = R < N - n0 ? R : N - n0;
    const float* xc = x + n0 * C;  // (rows, C)
    // The GEMMs run over all Vp (padded) columns: an odd V (50257) sends cuBLASLt's tensor-core
    // kernels down slow paths (the tf32 head ran at 55 TFLOP/s), a multiple of 64 does not. The
    // padded columns never enter the softmax, and their gradient is written as 0, so dx and dW get
    // nothing from them (padded rows of W are zero in every lmforge model; any finite values work).
    // logits[0:rows, 0:Vp] = xc W^T
    gemm(op, math, false, true, rows, Vp, C, 1.0f, xc, C, w, C, 0.0f, logits, Vp);
    launch({op, shapes, {rows, 1, 1}, {kRowThreads, 1, 1}, 0}, ce_row_kernel, losses + n0, logits, targets + n0, V,
           Vp, grad_scale, grad);
    if (!grad) continue;
    // dx[n0:n0+rows] += dlogits (rows, Vp) W (Vp, C)
    gemm(op, math, false, false, rows, C, Vp, 1.0f, logits, Vp, w, C, 1.0f, dx + n0 * C, C);
    // dW += dlogits^T (Vp, rows) xc (rows, C)   (padded rows += 0)
    gemm(op, math, true, false, Vp, C, rows, 1.0f, logits, Vp, xc, C, 1.0f, dw, C);
  }
}

namespace {
// The bf16 row kernels over `rows` rows of logits (ld Vp, V real columns): the losses and, with grad,
// the rows overwritten by their gradient. The variant depends on Vp (and, pipe vs smem, which give the
// same bits, on rows): one definition of a row's loss for training, evaluation and token_logprobs.
void ce_rows_bf16(const char* op, const ShapeText& shapes, float* losses, bf16* logits, const int32_t* targets,
                  int64_t rows, int64_t V, int64_t Vp, float grad_scale, bool grad) {
  __nv_bfloat16* logits_k = as_nv(logits);
  // The register-resident row kernel when the row fits (16-byte rows of at most 8 * 8 * 1024 = 64K).
  const LaunchSpec row_spec{op, shapes, {rows, 1, 1}, {kRegThreads, 1, 1}, 0};
  const bool vec_ok = Vp % 8 == 0 && aligned16(logits_k);
  const int sms = cuda_limits().sm_count > 0 ? cuda_limits().sm_count : 132;
  if (vec_ok && Vp > 8 * 4 * kRegThreads && 4 * Vp <= kPipeSmemMaxBytes && rows > sms)
    launch({op, shapes, {sms, 1, 1}, {kSmemThreads, 1, 1}, static_cast<size_t>(4 * Vp)}, ce_row_bf16_pipe_kernel,
           losses, logits_k, targets, static_cast<int>(rows), static_cast<int>(V), static_cast<int>(Vp), grad_scale,
           grad);
  else if (vec_ok && Vp > 8 * 4 * kRegThreads && Vp * 2 <= kSmemRowMaxBytes && Vp <= INT_MAX)
    launch({op, shapes, {rows, 1, 1}, {kSmemThreads, 1, 1}, static_cast<size_t>(Vp * 2)}, ce_row_bf16_smem_kernel,
           losses, logits_k, targets, static_cast<int>(V), static_cast<int>(Vp), grad_scale, grad);
  else if (vec_ok && Vp <= 8 * 4 * kRegThreads)
    launch(row_spec, ce_row_bf16_reg_kernel<4>, losses, logits_k, targets, V, Vp, grad_scale, grad);
  else if (vec_ok && Vp <= 8 * 8 * kRegThreads)
    launch(row_spec, ce_row_bf16_reg_kernel<8>, losses, logits_k, targets, V, Vp, grad_scale, grad);
  else
    launch({op, shapes, {rows, 1, 1}, {kRowThreads, 1, 1}, 0}, ce_row_bf16_kernel, losses, logits_k, targets, V, Vp,
           grad_scale, grad);
}
}  // namespace

void lm_head_cross_entropy(float* losses, bf16* dx, float* dw, const bf16* x, const bf16* w,
                           const int32_t* targets, bf16* logits, int64_t N, int64_t C, int64_t V, int64_t Vp,
                           int64_t R, float grad_scale, bool accumulate_dw) {
  const char* op = "lm_head_cross_entropy";
  const bool grad = dx != nullptr;
  const ShapeText shapes = dims(N, C, V, Vp, R);
  for (int64_t n0 = 0; n0 < N; n0 += R) {
    const int64_t rows = R < N - n0 ? R : N - n0;
    const bf16* xc = x + n0 * C;  // (rows, C)
    // Over all Vp (padded) columns, as the f32 path (see there).
    // logits[0:rows, 0:Vp] = bf16(xc W^T)
    gemm(op, false, true, rows, Vp, C, 1.0f, xc, C, w, C, 0.0f, logits, Vp);
    ce_rows_bf16(op, shapes, losses + n0, logits, targets + n0, rows, V, Vp, grad_scale, grad);
    if (!grad) continue;
    // dx[n0:n0+rows] = bf16(dx + dlogits (rows, Vp) W (Vp, C))
    gemm(op, false, false, rows, C, Vp, 1.0f, logits, Vp, w, C, 1.0f, dx + n0 * C, C);
    // dW += dlogits^T (Vp, rows) xc (rows, C), fp32 C   (padded rows += 0); the first chunk writes dW
    // instead when it is not accumulated
    gemm(op, true, false, Vp, C, rows, 1.0f, logits, Vp, xc, C, accumulate_dw || n0 > 0 ? 1.0f : 0.0f, dw, C);
  }
}

void token_logprobs(float* logprobs, const bf16* logits, const int32_t* tokens, int64_t M, int64_t V, int64_t W) {
  const char* op = "token_logprobs";
  if (M == 0) return;
  // the rows' losses (no gradient: the logits are only read), then negated: exactly -(loss)
  ce_rows_bf16(op, dims(M, 0, V, W, M), logprobs, const_cast<bf16*>(logits), tokens, M, V, W, 1.0f, false);
  launch_elementwise(op, M, [=] __device__(int64_t i) { logprobs[i] = -logprobs[i]; });
}

}  // namespace cuda
}  // namespace lmf
