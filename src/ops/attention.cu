// attention.cu: CUDA launchers of causal MHA/GQA attention (attention.h) as cuBLASLt GEMMs
// (ops/gemm_cuda.h) plus two row kernels, the same formulation as the CPU reference (attention.cpp):
//   forward:  S = scale Q K^T; P = causal softmax(S) (max-subtracted, precise expf, float sum),
//             0 for s > t; O = P V
//   backward: dP = dO V^T; dS = P * (dP - rowsum(dP * P)); dV += P^T dO; dQ += scale dS K;
//             dK += scale dS^T Q
// Scale 1/sqrt(HS) is passed in by the op entry; q head h reads kv head h / (NH/NKV).
//
// Layout: qkv, dqkv (B, T, C3), C3 = (NH + 2 NKV) HS, rows [q heads | k heads | v heads];
// out, dout (B, T, NH HS); probs, dprobs (B, NH, T, T). S and dP live in probs / dprobs. The heads
// are strided views (no copies): head h of batch b starts at qkv + b T C3 + h HS with leading
// dimension C3 (out: + b T CO + h HS, leading dimension CO = NH HS), its (T, T) probabilities at
// probs + (b NH + h) T T with leading dimension T.
//
// GEMMs: one strided-batched call per (head, row block, product), batched over b (strides T C3,
// T CO, NH T T); heads in increasing order, all on lmforge's one stream. The causal structure is
// skipped per row block:
//   - products whose output is (rows, keys), S and dP: query blocks [r0, r1) of Rs rows (about
//     kScoreRows) against keys [0, r1);
//   - products whose output is (rows, HS): O and dQ over query blocks [r0, r1) of Ro rows (about
//     kOutRows) against keys [0, r1); dV and dK over key blocks [c0, c1) of the same Ro rows against
//     queries [c0, T). Their outputs are only HS wide, so the blocks are coarser than for S: each
//     call needs (rows / tile) * B tiles to fill the GPU.
//   The number of blocks is capped (kMaxScoreBlocks, kMaxOutBlocks) so that long sequences do not
//   flood the GEMM plan cache (one plan per block and product).
// The row kernels make every entry the block GEMMs read above the diagonal an exact zero: the
// forward softmax writes whole probs rows (zeros for s > t, as the op promises); the dS kernel writes
// zeros for t < s < the end of t's Ro block (what dQ and dK read; the rest of dprobs is scratch).
//
// Row kernels: one warp per (b, h, t) row, kRowWarps rows per block. Each lane reduces s = lane,
// lane + 32, ... in increasing order, then the warp combines by the fixed xor butterfly
// (block_reduce.cuh). The softmax recomputes expf(S - max) in its write pass instead of storing it
// (same inputs, same bits).
//
// Determinism: every GEMM has a fixed plan (gemm_cuda.h: split-K only out of place), the calls run in a fixed
// order on one stream and no kernel uses atomics. dK/dV of a kv head accumulate (beta = 1) over the
// q heads of its group in increasing head order, one GEMM per head and key block; dQ is written once
// per (head, query block). The reduction orders depend on (B, T, NH, NKV, HS) only through the
// GEMMs' plans (not batch-invariant, like every cuBLASLt GEMM here).
//
// Workspace: the GEMMs use kGemmWorkspaceBytes of lmf::cuda_workspace(). The model reserves it at
// set-up; for a standalone call the launchers reserve it on first use (a no-op once reserved).
#include <algorithm>
#include <string>

#include "core/cuda_launch.cuh"
#include "core/device.h"
#include "ops/attention.h"
#include "ops/block_reduce.cuh"
#include "ops/gemm_cuda.h"

namespace lmf::cuda {
namespace {

constexpr int kRowWarps = 8;  // rows (warps) per block of the row kernels
constexpr int kRowThreads = 32 * kRowWarps;

// Target rows per block of the (rows, keys) products S, dP and of the (rows, HS) products O, dQ,
// dV, dK, and the most blocks of each kind.
constexpr int64_t kScoreRows = 256, kMaxScoreBlocks = 16;
constexpr int64_t kOutRows = 512, kMaxOutBlocks = 8;
constexpr int64_t kRowAlign = 64;  // block sizes are multiples of this (GEMM tile friendly)

struct Dims {
  int64_t B, T, NH, NKV, HS;
  GemmMath math;  // of every GEMM of the call
  int64_t C3() const { return (NH + 2 * NKV) * HS; }
  int64_t CO() const { return NH * HS; }
  int64_t group() const { return NH / NKV; }
  int64_t kvh(int64_t h) const { return h / group(); }
  // Batch strides over b (elements) of qkv/dqkv, out/dout, probs/dprobs.
  int64_t s_qkv() const { return T * C3(); }
  int64_t s_out() const { return T * CO(); }
  int64_t s_probs() const { return NH * T * T; }
  // Offsets (elements, within batch 0) of head h's Q / K / V columns, output columns, (T, T) matrix.
  int64_t q_off(int64_t h) const { return h * HS; }
  int64_t k_off(int64_t h) const { return (NH + kvh(h)) * HS; }
  int64_t v_off(int64_t h) const { return (NH + NKV + kvh(h)) * HS; }
  int64_t o_off(int64_t h) const { return h * HS; }
  int64_t p_off(int64_t h) const { return h * T * T; }
};

ShapeText shapes_of(const Dims& d) {
  return shape_text("B=", d.B, " T=", d.T, " NH=", d.NH, " NKV=", d.NKV, " HS=", d.HS);
}

// Rows per block: T split into min(ceil(T / target), max_blocks) blocks, rounded up to a multiple of
// kRowAlign (at most T). Depends only on T.
int64_t block_rows(int64_t T, int64_t target, int64_t max_blocks) {
  const int64_t n = std::min(ceil_div(T, target), max_blocks);
  return std::min(T, ceil_div(ceil_div(T, n), kRowAlign) * kRowAlign);
}

// One strided-batched GEMM over b (d.B matrices).
void bgemm(const char* op, const Dims& d, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
           const float* A, int64_t lda, int64_t stride_a, const float* B, int64_t ldb, int64_t stride_b, float beta,
           float* C, int64_t ldc, int64_t stride_c) {
  gemm_strided_batched(op, d.math, trans_a, trans_b, M, N, K, alpha, A, lda, stride_a, B, ldb, stride_b, beta, C, ldc,
                       stride_c, d.B);
}

// Row r = (b NH + h) T + t of probs (rows = B NH T, each T long): the scores p[0, t] become the causal
// softmax, p[t+1, T) zeros. One warp per row.
__global__ void softmax_rows_kernel(float* probs, int64_t rows, int64_t T) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (r >= rows) return;  // whole warps only: the shuffles below see all 32 lanes
  const int lane = threadIdx.x % 32;
  const int64_t t = r % T;
  float* p = probs + r * T;
  float mx = -INFINITY;
  for (int64_t s = lane; s <= t; s += 32) mx = fmaxf(mx, p[s]);
  mx = warp_max(mx);
  float sum = 0.0f;
  for (int64_t s = lane; s <= t; s += 32) sum += expf(p[s] - mx);
  sum = warp_sum(sum);
  const float inv = 1.0f / sum;
  for (int64_t s = lane; s < T; s += 32) p[s] = s <= t ? expf(p[s] - mx) * inv : 0.0f;
}

// Row r of dprobs (holding dP) and probs: ds[s] = p[s] (dp[s] - sum_{s' <= t} dp[s'] p[s']) for s <= t,
// 0 for t < s < the end of t's block of zero_rows rows (min T). One warp per row.
__global__ void softmax_backward_rows_kernel(float* dprobs, const float* probs, int64_t rows, int64_t T,
                                             int64_t zero_rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t t = r % T;
  const float* p = probs + r * T;
  float* dp = dprobs + r * T;
  float dot = 0.0f;
  for (int64_t s = lane; s <= t; s += 32) dot += dp[s] * p[s];
  dot = warp_sum(dot);
  const int64_t block_end = (t / zero_rows + 1) * zero_rows, end = block_end < T ? block_end : T;
  for (int64_t s = lane; s < end; s += 32) dp[s] = s <= t ? p[s] * (dp[s] - dot) : 0.0f;
}

LaunchSpec row_launch(const char* op, const ShapeText& shapes, int64_t rows) {
  return {op, shapes, {ceil_div(rows, kRowWarps), 1, 1}, {kRowThreads, 1, 1}, 0};
}

}  // namespace

void attention_forward(float* out, float* probs, const float* qkv, int64_t B, int64_t T, int64_t NH, int64_t NKV,
                       int64_t HS, float scale, GemmMath math) {
  const char* op = "attention_forward";
  const Dims d{B, T, NH, NKV, HS, math};
  const int64_t C3 = d.C3(), CO = d.CO(), sq = d.s_qkv(), so = d.s_out(), sp = d.s_probs();
  const int64_t Rs = block_rows(T, kScoreRows, kMaxScoreBlocks), Ro = block_rows(T, kOutRows, kMaxOutBlocks);
  // GEMM workspace: reserved at set-up by the caller (the model; tests); the GEMMs fail clearly if not
  // S[r0:r1, 0:r1] = scale Q[r0:r1] K[0:r1]^T into probs
  for (int64_t h = 0; h < NH; ++h)
    for (int64_t r0 = 0; r0 < T; r0 += Rs) {
      const int64_t r1 = std::min(T, r0 + Rs);
      bgemm(op, d, false, true, r1 - r0, r1, HS, scale, qkv + d.q_off(h) + r0 * C3, C3, sq, qkv + d.k_off(h), C3, sq,
            0.0f, probs + d.p_off(h) + r0 * T, T, sp);
    }
  const int64_t rows = B * NH * T;
  launch(row_launch(op, shapes_of(d), rows), softmax_rows_kernel, probs, rows, T);
  // O[r0:r1] = P[r0:r1, 0:r1] V[0:r1]
  for (int64_t h = 0; h < NH; ++h)
    for (int64_t r0 = 0; r0 < T; r0 += Ro) {
      const int64_t r1 = std::min(T, r0 + Ro);
      bgemm(op, d, false, false, r1 - r0, HS, r1, 1.0f, probs + d.p_off(h) + r0 * T, T, sp, qkv + d.v_off(h), C3, sq,
            0.0f, out + d.o_off(h) + r0 * CO, CO, so);
    }
}

void attention_backward(float* dqkv, float* dprobs, const float* dout, const float* qkv, const float* probs, int64_t B,
                        int64_t T, int64_t NH, int64_t NKV, int64_t HS, float scale, GemmMath math) {
  const char* op = "attention_backward";
  const Dims d{B, T, NH, NKV, HS, math};
  const int64_t C3 = d.C3(), CO = d.CO(), sq = d.s_qkv(), so = d.s_out(), sp = d.s_probs();
  const int64_t Rs = block_rows(T, kScoreRows, kMaxScoreBlocks), Ro = block_rows(T, kOutRows, kMaxOutBlocks);
  // GEMM workspace: reserved at set-up by the caller (the model; tests); the GEMMs fail clearly if not
  // dP[r0:r1, 0:r1] = dO[r0:r1] V[0:r1]^T into dprobs
  for (int64_t h = 0; h < NH; ++h)
    for (int64_t r0 = 0; r0 < T; r0 += Rs) {
      const int64_t r1 = std::min(T, r0 + Rs);
      bgemm(op, d, false, true, r1 - r0, r1, HS, 1.0f, dout + d.o_off(h) + r0 * CO, CO, so, qkv + d.v_off(h), C3, sq,
            0.0f, dprobs + d.p_off(h) + r0 * T, T, sp);
    }
  // dS in place over dP; zeros above the diagonal inside each Ro block (read by dQ, dK below)
  const int64_t rows = B * NH * T;
  launch(row_launch(op, shapes_of(d), rows), softmax_backward_rows_kernel, dprobs, probs, rows, T, Ro);
  for (int64_t h = 0; h < NH; ++h) {  // increasing h: the q heads of a group add into dK/dV in order
    const float* q = qkv + d.q_off(h);
    const float* k = qkv + d.k_off(h);
    const float* dO = dout + d.o_off(h);
    const float* p = probs + d.p_off(h);
    const float* ds = dprobs + d.p_off(h);
    float* dq = dqkv + d.q_off(h);
    float* dk = dqkv + d.k_off(h);
    float* dv = dqkv + d.v_off(h);
    for (int64_t c0 = 0; c0 < T; c0 += Ro) {
      const int64_t c1 = std::min(T, c0 + Ro), cb = c1 - c0, n = T - c0;
      // dV[c0:c1] += P[c0:T, c0:c1]^T dO[c0:T]
      bgemm(op, d, true, false, cb, HS, n, 1.0f, p + c0 * T + c0, T, sp, dO + c0 * CO, CO, so, 1.0f, dv + c0 * C3, C3,
            sq);
      // dK[c0:c1] += scale dS[c0:T, c0:c1]^T Q[c0:T]
      bgemm(op, d, true, false, cb, HS, n, scale, ds + c0 * T + c0, T, sp, q + c0 * C3, C3, sq, 1.0f, dk + c0 * C3,
            C3, sq);
      // dQ[c0:c1] += scale dS[c0:c1, 0:c1] K[0:c1]
      bgemm(op, d, false, false, cb, HS, c1, scale, ds + c0 * T, T, sp, k, C3, sq, 1.0f, dq + c0 * C3, C3, sq);
    }
  }
}

}  // namespace lmf::cuda
