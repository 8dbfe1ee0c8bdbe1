// paged_attention.cu: CUDA launchers of serving's attention over a paged KV cache (paged_attention.h):
// the cache write, split-KV ("flash decoding") attention in bf16 with fp32 math, and row gathers.
//
// Layouts (bf16 unless said): qkv (N, (NH + 2 NKV) HS), row n = [q heads | k heads | v heads];
// k_cache, v_cache (num_slots, NKV HS), slot s's kv head g at + s NKV HS + g HS; block_tables
// (S, max_blocks) i32; out (N, NH HS).
//
// kv_cache_write: element-wise (elementwise.cuh) over packs of 8 bf16 (128-bit accesses) when the
// sizes and pointers allow it (packed.cuh), else single elements. Rows whose slot is outside
// [0, num_slots) write nothing (-1 is padding; anything else is the caller's bug, checked on the CPU).
//
// paged_attention_forward, two kernels (all launches through core/cuda_launch.cuh's checked launch()):
//   1. paged_attention_chunk_kernel<HS, GT>: one CTA of 4 warps per (row n, kv head g, chunk c) of
//      kChunk = 256 positions [c kChunk, (c + 1) kChunk) of the row's sequence; CTAs past the row's
//      last position exit at once. The CTA serves all G = NH / NKV q heads of kv head g (GT of them at
//      a time, in registers), so each key and value is read from memory once per group.
//        - slots: the chunk's positions go through the block table once, into shared memory.
//        - scores: a key is read by L lanes (HS / 8 rounded up to a power of 2; lanes past the head's
//          columns hold zeros), 16 bytes (8 bf16) each; a warp reads 32 / L keys
//          at once (4 steps unrolled, all loads issued before the math). Each lane dots its 8 elements
//          with the GT query heads in fp32, then the L lanes sum by an xor butterfly. Scores are kept
//          in the log2 domain (scaled by scale log2(e)) in shared memory.
//        - softmax: one warp per head: chunk max m, p = exp2(s - m) (back into shared memory),
//          l = sum p (lane-strided sums, then warp_sum).
//        - P V: the same key-to-lane mapping over V; each lane accumulates 8 output columns of every
//          head over its keys in increasing order, then the warp's key groups are summed by xor
//          butterfly and the 4 warps in warp order through shared memory.
//        A row that fits in one chunk (positions[n] < kChunk) is finished here: out = o / l, rounded
//        once. Otherwise the CTA writes its partial (o unnormalised, m, l) to the workspace.
//   2. combine (element-wise over (n, h, 8 columns)) for rows of more than one chunk:
//        M = max_c m_c,  out = sum_c exp2(m_c - M) o_c / sum_c exp2(m_c - M) l_c,  c = 0, 1, ... in order.
// Padding rows (seqs[n] < 0) get zeros from their chunk-0 CTAs.
//
// paged_attention_forward_invariant (--batch-invariant serving, prefill and decode alike): paged_flash_kernel,
// one warp per (strip of up to 16 rows of one sequence at consecutive positions, q head) walking the keys
// in key tiles of flash::kFwdBc with the training forward's arithmetic (ops/flash_tile.cuh): each output
// row is bitwise what the training forward (lmforge's flash kernels) computes for that position
// (tests/test_cuda_paged_attention.cpp).
//
// Determinism and batch invariance: no atomics; every sum has a fixed order that depends only on HS,
// on kChunk (a constant) and on the row's own position: never on N, on the other rows, on the grid
// or on the device. So a row's output is bitwise the same alone or in any batch, in any run.
//
// Workspace (lmf::cuda_workspace, only when the block table can hold more than kChunk positions):
// paged_attention_workspace(N, NH, HS, max_blocks * block_size) bytes: the partial outputs
// part_o (N, NH, chunks, HS) f32, then part_ml (N, NH, chunks, 2) f32 (m in the log2 domain, l), with
// chunks = ceil(max_blocks * block_size / kChunk). Callers reserve it with max_context >= the positions
// a block table holds (max_blocks * block_size).
//
// Positions are clamped on the device to the block table's capacity (the CPU entry checks them; the
// GPU cannot without a host sync); block ids are trusted (the scheduler hands them out).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "core/check.h"
#include "core/cuda_launch.cuh"
#include "ops/block_reduce.cuh"
#include "ops/elementwise.cuh"
#include "ops/flash_tile.cuh"
#include "ops/packed.cuh"
#include "ops/paged_attention.h"

namespace lmf::cuda {
namespace {

using nv = __nv_bfloat16;

constexpr const char* kOpWrite = "kv_cache_write";
constexpr const char* kOpAttn = "paged_attention_forward";
constexpr const char* kOpAttnInvariant = "paged_attention_forward (batch-invariant: the flash forward's step)";
constexpr const char* kOpGather = "gather_rows";

// Positions per split. Part of the numerics (the order of the softmax sums), so a constant: never
// chosen from N or from the device.
constexpr int kChunk = 256;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kUnroll = 4;  // key steps whose 16-byte loads are in flight together
constexpr float kLog2e = 1.4426950408889634f;

// Positions row n attends: [0, positions[n]], clamped to [1, capacity] so that a bad position never
// reads outside the block table.
__device__ __forceinline__ int64_t row_length(int32_t position, int64_t capacity) {
  return std::min<int64_t>(std::max<int64_t>(int64_t{position} + 1, 1), capacity);
}

// 8 bf16 (one 16-byte load) widened to fp32.
__device__ __forceinline__ void unpack8(float (&f)[8], const uint4& u) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    f[2 * k] = bf16_lo(w[k]);
    f[2 * k + 1] = bf16_hi(w[k]);
  }
}

__device__ __forceinline__ uint4 load16(const nv* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// One CTA per (row n = blockIdx.x, kv head g = blockIdx.y, chunk c = blockIdx.z); see the header.
// HS: head size (multiple of 8, <= 256); GT: q heads handled at once (registers), G is done in tiles.
template <int HS, int GT>
__global__ void __launch_bounds__(kThreads)
    paged_attention_chunk_kernel(nv* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,
                                 const nv* __restrict__ qkv, const nv* __restrict__ k_cache,
                                 const nv* __restrict__ v_cache, const int32_t* __restrict__ block_tables,
                                 const int32_t* __restrict__ seqs, const int32_t* __restrict__ positions, int NH,
                                 int NKV, int block_size, int max_blocks, int chunks, float scale_log2) {
  constexpr int kCols = HS / 8;        // 8-element column groups of a head
  constexpr int L = kCols <= 1 ? 1 : kCols <= 2 ? 2 : kCols <= 4 ? 4 : kCols <= 8 ? 8 : kCols <= 16 ? 16 : 32;
  // L: lanes per key (kCols rounded up to a power of 2; lanes r >= kCols hold zeros and store nothing)
  constexpr int kKeysWarp = 32 / L;    // keys a warp reads per step
  constexpr int kKeysCta = kKeysWarp * kWarps;
  static_assert(HS % 8 == 0 && kCols >= 1 && kCols <= 32, "HS must be a multiple of 8 up to 256");
  __shared__ int64_t s_off[kChunk];              // element offset of each position's k/v head in the cache
  __shared__ float s_p[GT][kChunk];              // scores (log2 domain), then exp2(s - m)
  __shared__ __align__(16) float s_red[kWarps][GT][HS];  // each warp's P V
  __shared__ float s_m[GT], s_l[GT];

  const int n = blockIdx.x, g = blockIdx.y, c = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int j = lane / L, r = lane % L;  // key j of the warp's step, elements [8 r, 8 r + 8) of it
  const bool col = kCols == L || r < kCols;  // this lane holds columns of the head
  const int G = NH / NKV;
  const int64_t kv_stride = int64_t{NKV} * HS, row_stride = (int64_t{NH} + 2 * NKV) * HS;
  nv* out_row = out + int64_t{n} * NH * HS;

  const int32_t seq = seqs[n];
  if (seq < 0) {  // padding row: zeros, from the chunk-0 CTA of each kv head
    if (c == 0)
      for (int i = tid; i < G * HS; i += kThreads) out_row[int64_t{g} * G * HS + i] = __float2bfloat16_rn(0.0f);
    return;
  }
  const int64_t total = row_length(positions[n], int64_t{max_blocks} * block_size);
  const int64_t first = int64_t{c} * kChunk;
  if (first >= total) return;  // past the row's last position (uniform over the CTA)
  const int n_valid = static_cast<int>(std::min<int64_t>(kChunk, total - first));
  const bool single = total <= kChunk;  // the whole row in this CTA: write out directly

  const int32_t* table = block_tables + int64_t{seq} * max_blocks;
  for (int i = tid; i < n_valid; i += kThreads) {
    const int64_t p = first + i;
    s_off[i] = (int64_t{table[p / block_size]} * block_size + p % block_size) * kv_stride + int64_t{g} * HS;
  }
  __syncthreads();

  for (int h0 = 0; h0 < G; h0 += GT) {
    const int gn = std::min(GT, G - h0);  // q heads in this tile (warp-uniform)
    const int64_t h_first = int64_t{g} * G + h0;

    // ---- scores s[t][i] = q_t . k_i * scale * log2(e) ----
    {
      float q[GT][8];
#pragma unroll
      for (int t = 0; t < GT; ++t) {
        if (t < gn && col) {
          unpack8(q[t], load16(qkv + int64_t{n} * row_stride + (h_first + t) * HS + 8 * r));
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) q[t][e] = 0.0f;
        }
      }
      // base is uniform over the warp, so every lane reaches the shuffles
      for (int base = warp * kKeysWarp; base < n_valid; base += kKeysCta * kUnroll) {
        uint4 kr[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int i = base + u * kKeysCta + j;
          kr[u] = i < n_valid && col ? load16(k_cache + s_off[i] + 8 * r) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int i = base + u * kKeysCta + j;
          float kf[8];
          unpack8(kf, kr[u]);
#pragma unroll
          for (int t = 0; t < GT; ++t) {
            if (t >= gn) continue;
            float d = 0.0f;
#pragma unroll
            for (int e = 0; e < 8; ++e) d = fmaf(q[t][e], kf[e], d);
#pragma unroll
            for (int off = L / 2; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
            if (r == 0 && i < n_valid) s_p[t][i] = d * scale_log2;
          }
        }
      }
    }
    __syncthreads();

    // ---- softmax over the chunk, one warp per head: m, p = exp2(s - m), l = sum p ----
    for (int t = warp; t < gn; t += kWarps) {
      float m = -INFINITY;
      for (int i = lane; i < n_valid; i += 32) m = fmaxf(m, s_p[t][i]);
      m = warp_max(m);  // finite: n_valid >= 1
      float l = 0.0f;
      for (int i = lane; i < n_valid; i += 32) {
        const float p = exp2f(s_p[t][i] - m);
        s_p[t][i] = p;
        l += p;
      }
      l = warp_sum(l);
      if (lane == 0) {
        s_m[t] = m;
        s_l[t] = l;
      }
    }
    __syncthreads();

    // ---- o[t] = sum_i p[t][i] v_i: lanes as for the scores, keys in increasing order per lane ----
    {
      float acc[GT][8];
#pragma unroll
      for (int t = 0; t < GT; ++t)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[t][e] = 0.0f;
      for (int base = warp * kKeysWarp; base < n_valid; base += kKeysCta * kUnroll) {
        uint4 vr[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int i = base + u * kKeysCta + j;
          vr[u] = i < n_valid && col ? load16(v_cache + s_off[i] + 8 * r) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int i = base + u * kKeysCta + j;
          if (i >= n_valid) continue;
          float vf[8];
          unpack8(vf, vr[u]);
#pragma unroll
          for (int t = 0; t < GT; ++t) {
            if (t >= gn) continue;
            const float p = s_p[t][i];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[t][e] = fmaf(p, vf[e], acc[t][e]);
          }
        }
      }
      // the warp's key groups (lanes r, r + L, r + 2L, ...) by xor butterfly, then lanes 0..L-1 store
#pragma unroll
      for (int t = 0; t < GT; ++t) {
        if (t >= gn) continue;
#pragma unroll
        for (int e = 0; e < 8; ++e)
#pragma unroll
          for (int off = L; off < 32; off <<= 1) acc[t][e] += __shfl_xor_sync(0xffffffffu, acc[t][e], off);
        if (j == 0 && col) {
          float4* dst = reinterpret_cast<float4*>(&s_red[warp][t][8 * r]);
          dst[0] = make_float4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
          dst[1] = make_float4(acc[t][4], acc[t][5], acc[t][6], acc[t][7]);
        }
      }
    }
    __syncthreads();

    // ---- the warps' sums in warp order; out (one chunk) or the partial (several) ----
    for (int idx = tid; idx < gn * kCols; idx += kThreads) {
      const int t = idx / kCols, d0 = (idx % kCols) * 8;
      float o[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = s_red[0][t][d0 + e];
#pragma unroll
      for (int w = 1; w < kWarps; ++w)
#pragma unroll
        for (int e = 0; e < 8; ++e) o[e] += s_red[w][t][d0 + e];
      const int64_t h = h_first + t;
      if (single) {
#pragma unroll
        for (int e = 0; e < 8; ++e) o[e] /= s_l[t];
        store_f32<8>(out_row + h * HS + d0, o);
      } else {
        const int64_t part = (int64_t{n} * NH + h) * chunks + c;
        store_f32<8>(part_o + part * HS + d0, o);
        if (d0 == 0) {
          part_ml[2 * part] = s_m[t];
          part_ml[2 * part + 1] = s_l[t];
        }
      }
    }
    __syncthreads();  // s_p, s_red, s_m, s_l are reused by the next head tile
  }
}

template <int HS, int GT>
void launch_chunks(nv* out, float* part_o, float* part_ml, const nv* qkv, const nv* k_cache, const nv* v_cache,
                   const int32_t* block_tables, const int32_t* seqs, const int32_t* positions, int64_t N, int NH,
                   int NKV, int block_size, int max_blocks, int64_t chunks, float scale_log2) {
  launch({kOpAttn,
          shape_text("N=", N, " NH=", NH, " NKV=", NKV, " HS=", HS, " block_size=", block_size, " max_blocks=",
                     max_blocks),
          {N, NKV, chunks},
          {kThreads, 1, 1},
          0},
         paged_attention_chunk_kernel<HS, GT>, out, part_o, part_ml, qkv, k_cache, v_cache, block_tables, seqs,
         positions, NH, NKV, block_size, max_blocks, static_cast<int>(chunks), scale_log2);
}

// GT: the q heads per kv head, rounded up to 1, 2, 4 or 8 (more than 8 go in tiles of 8).
template <int HS>
void launch_chunks_hs(int G, nv* out, float* part_o, float* part_ml, const nv* qkv, const nv* k_cache,
                      const nv* v_cache, const int32_t* block_tables, const int32_t* seqs, const int32_t* positions,
                      int64_t N, int NH, int NKV, int block_size, int max_blocks, int64_t chunks, float scale_log2) {
  const auto f = G == 1 ? launch_chunks<HS, 1>
                 : G == 2 ? launch_chunks<HS, 2>
                 : G <= 4 ? launch_chunks<HS, 4>
                          : launch_chunks<HS, 8>;
  f(out, part_o, part_ml, qkv, k_cache, v_cache, block_tables, seqs, positions, N, NH, NKV, block_size, max_blocks,
    chunks, scale_log2);
}

// Rows of more than one chunk: out[n, h, d0 .. d0 + 8) from the partials, chunks in order.
void launch_combine(nv* out, const float* part_o, const float* part_ml, const int32_t* seqs,
                    const int32_t* positions, int64_t N, int64_t NH, int64_t HS, int64_t chunks, int64_t capacity) {
  const int64_t P = HS / 8;
  launch_elementwise(kOpAttn, N * NH * P, [=] __device__(int64_t i) {
    const int64_t d0 = (i % P) * 8, nh = i / P, n = nh / NH;  // nh = n NH + h
    if (seqs[n] < 0) return;
    const int64_t nc = (row_length(positions[n], capacity) + kChunk - 1) / kChunk;
    if (nc == 1) return;  // written by the chunk kernel
    const float* ml = part_ml + nh * chunks * 2;
    const float* po = part_o + nh * chunks * HS + d0;
    float M = ml[0];
    for (int64_t c = 1; c < nc; ++c) M = fmaxf(M, ml[2 * c]);
    float l = 0.0f, o[8] = {};
    for (int64_t c = 0; c < nc; ++c) {
      const float w = exp2f(ml[2 * c] - M);
      l = fmaf(w, ml[2 * c + 1], l);
      float oc[8];
      load_f32<8>(oc, po + c * HS);
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = fmaf(w, oc[e], o[e]);
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] /= l;
    store_f32<8>(out + nh * HS + d0, o);
  });
}

// ---- kv_cache_write: W elements per thread (8: 128-bit accesses) ----
// ---- --batch-invariant: paged_flash_kernel<HS> (paged_attention_forward_invariant in the header) ----
// One single-warp CTA per (batch row n = blockIdx.x, q head h = blockIdx.y). The warp's 16-row strip holds
// the rows of one sequence at consecutive positions from row n up to the next position that is a multiple
// of 16 (at most 16 rows); row n leads a strip when it starts its sequence's run of rows in the batch or
// sits at such a position, and the other rows' warps exit at once. A decode row is a strip of one row; a
// prefill chunk of P rows, about P / 16 strips. The strip walks the keys of its sequence in tiles of
// flash::kFwdBc from key 0 up to its last row's position, each tile as the training forward's step: S in
// 16-key pieces (fwd_scores_piece), the softmax update (fwd_strip_softmax), P V in 16-key pieces
// (fwd_pv_piece), every mma accumulator in the training forward's order: each row's output is bitwise
// flash_fwd_kernel's for that position. K and V stream through a ring of kRing 16-key pieces (cp.async,
// kRing - 1 in flight; keys past the strip's last position zero-filled), so a warp holds 16 + 16 kRing
// shared rows (11.5 KB at HS 64) and many warps fit an SM.
template <int HS>
struct PagedFlashCfg {
  static constexpr int kBc = flash::kFwdBc, kLd = HS + flash::kPad, kRing = 4;
  static constexpr int kTileElems = 16 * kLd;  // the Q strip, and each ring piece
  static constexpr size_t kTileBytes = static_cast<size_t>((1 + kRing) * kTileElems) * sizeof(nv);
  static constexpr size_t kStageBytes = static_cast<size_t>(16) * (HS + 4) * sizeof(float);
  static constexpr size_t kSmem = kTileBytes > kStageBytes ? kTileBytes : kStageBytes;
};

// Keys [k0, k0 + 16) of kv head g from the cache (positions >= total zero-filled) into the piece s.
template <int HS>
__device__ __forceinline__ void load_paged_piece(nv* s, const nv* cache, const int32_t* table, int block_size,
                                                 int64_t kv_stride, int g, int64_t k0, int64_t total, int lane) {
  constexpr int kChunksPerRow = HS / 8, kChunks = 16 * kChunksPerRow;
  static_assert(kChunks % 32 == 0, "whole passes of the warp");
#pragma unroll
  for (int i = 0; i < kChunks / 32; ++i) {
    const int c = lane + 32 * i;
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const int64_t p = k0 + r;
    const bool ok = p < total;
    const nv* src = cache;
    if (ok) src = cache + (int64_t{table[p / block_size]} * block_size + p % block_size) * kv_stride + int64_t{g} * HS + col;
    cp_async_16(s + r * PagedFlashCfg<HS>::kLd + col, src, ok);
  }
}

template <int HS>
__global__ void __launch_bounds__(32)
    paged_flash_kernel(nv* __restrict__ out, const nv* __restrict__ qkv, const nv* __restrict__ k_cache,
                       const nv* __restrict__ v_cache, const int32_t* __restrict__ block_tables,
                       const int32_t* __restrict__ seqs, const int32_t* __restrict__ positions, int N, int NH,
                       int NKV, int block_size, int max_blocks, float scale_log2) {
  using C = PagedFlashCfg<HS>;
  constexpr int kLd = C::kLd, kBc = C::kBc, kRing = C::kRing, kPieces = 8;  // per key tile: 4 of K, 4 of V
  extern __shared__ __align__(16) unsigned char smem_raw[];
  nv* sQ = reinterpret_cast<nv*>(smem_raw);
  nv* ring = sQ + C::kTileElems;  // piece q at ring + (q % kRing) kTileElems
  const int n = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
  const int g = h / (NH / NKV);
  const int64_t row_stride = (int64_t{NH} + 2 * NKV) * HS, kv_stride = int64_t{NKV} * HS, CO = int64_t{NH} * HS;
  const int64_t capacity = int64_t{max_blocks} * block_size;
  nv* orow = out + int64_t{n} * CO + int64_t{h} * HS;
  const int32_t seq = seqs[n], pos = positions[n];
  if (seq < 0) {  // padding row: zeros
    for (int i = lane; i < HS; i += 32) orow[i] = __float2bfloat16_rn(0.0f);
    return;
  }
  if (n > 0 && seqs[n - 1] == seq && positions[n - 1] == pos - 1 && pos % 16 != 0) return;  // not a strip leader
  int cnt = 1;  // the strip: rows n .. n + cnt - 1 at positions pos .. pos + cnt - 1 (uniform over the warp)
  while (cnt < 16 && n + cnt < N && seqs[n + cnt] == seq && positions[n + cnt] == pos + cnt && (pos + cnt) % 16 != 0)
    ++cnt;
  // positions clamped into the block table (as row_length does for the chunk kernel)
  const int p_first = static_cast<int>(row_length(pos, capacity) - 1);
  const int p_last = static_cast<int>(row_length(pos + cnt - 1, capacity) - 1);
  const int gid = lane >> 2;
  const int row_lo = static_cast<int>(row_length(pos + min(gid, cnt - 1), capacity) - 1);
  const int row_hi = static_cast<int>(row_length(pos + min(gid + 8, cnt - 1), capacity) - 1);
  const int32_t* table = block_tables + int64_t{seq} * max_blocks;
  const int64_t total = int64_t{p_last} + 1;
  const int n_pieces = kPieces * (p_last / kBc + 1);

  {  // Q: the strip's rows of head h (rows past cnt zero-filled), in the first cp.async group
    const nv* q = qkv + int64_t{n} * row_stride + int64_t{h} * HS;
    constexpr int kChunksPerRow = HS / 8;
#pragma unroll
    for (int i = 0; i < 16 * kChunksPerRow / 32; ++i) {
      const int c = lane + 32 * i;
      const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      const bool ok = r < cnt;
      cp_async_16(sQ + r * kLd + col, ok ? q + r * row_stride + col : q, ok);
    }
  }
  auto issue = [&](int q) {  // piece q: key tile q / 8, K (q % 8 < 4) or V, keys 16 (q % 4) .. + 15 of the tile
    const int64_t k0 = int64_t{q / kPieces} * kBc + 16 * (q % 4);
    load_paged_piece<HS>(ring + (q % kRing) * C::kTileElems, (q % kPieces) < 4 ? k_cache : v_cache, table, block_size,
                         kv_stride, g, k0, total, lane);
  };
  for (int q = 0; q < kRing - 1; ++q) {
    if (q < n_pieces) issue(q);
    cp_async_commit();
  }

  flash::FwdStrip<HS> st;
  st.init();
  uint32_t qa[HS / 16][4];
  float s[kBc / 8][4];
  uint32_t pa[kBc / 16][4];
  const int n_kt = n_pieces / kPieces;
  for (int j = 0; j < n_kt; ++j) {
    const int k0 = j * kBc;
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {  // unrolled: s, pa and the pieces' fragments stay in registers
      const int q = j * kPieces + i;
      if (q + kRing - 1 < n_pieces) issue(q + kRing - 1);
      cp_async_commit();
      cp_async_wait<kRing - 1>();  // piece q (and Q) landed
      __syncwarp();
      if (q == 0) flash::load_q_frags<kLd, HS>(qa, sQ, 0, lane);
      const nv* piece = ring + (q % kRing) * C::kTileElems;
      if (i == 0) {
#pragma unroll
        for (int t = 0; t < kBc / 8; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.0f;
      }
      if (i < 4) {
        flash::fwd_scores_piece<kLd, HS>(s, i, qa, piece, lane);
        if (i == 3) {
          flash::fwd_strip_softmax<HS>(st, s, k0, k0 + kBc - 1 > p_first, row_lo, row_hi, scale_log2, lane);
          flash::pack_a<1, kBc>(reinterpret_cast<uint32_t(&)[1][kBc / 16][4]>(pa),
                                reinterpret_cast<const float(&)[1][kBc / 8][4]>(s));
        }
      } else {
        flash::fwd_pv_piece<kLd, HS>(st.o, pa[i - 4], piece, lane);
      }
      __syncwarp();  // the warp is done with this slot before piece q + kRing is issued into it
    }
  }
  cp_async_wait<0>();
  __syncwarp();
  flash::fwd_strip_sums(st);
  float* stage = reinterpret_cast<float*>(smem_raw);  // the tiles are dead: the output staging buffer
  flash::warp_store_strip<HS>(out + int64_t{n} * CO + int64_t{h} * HS, CO, cnt, st.o, 1.0f / st.l_lo,
                              1.0f / st.l_hi, stage, lane, false);
}

template <int HS>
void launch_paged_flash(nv* out, const nv* qkv, const nv* k_cache, const nv* v_cache, const int32_t* block_tables,
                        const int32_t* seqs, const int32_t* positions, int64_t N, int NH, int NKV, int block_size,
                        int max_blocks, float scale_log2) {
  launch({kOpAttnInvariant, shape_text("N=", N, " NH=", NH, " NKV=", NKV, " HS=", HS), {N, NH, 1}, {32, 1, 1},
          PagedFlashCfg<HS>::kSmem},
         paged_flash_kernel<HS>, out, qkv, k_cache, v_cache, block_tables, seqs, positions, static_cast<int>(N), NH,
         NKV, block_size, max_blocks, scale_log2);
}

template <int W>
void write_packs(nv* k_cache, nv* v_cache, const nv* qkv, const int32_t* slots, int64_t N, int64_t q_dim,
                 int64_t kv_dim, int64_t num_slots) {
  const int64_t P = kv_dim / W, row = q_dim + 2 * kv_dim;
  launch_elementwise(kOpWrite, N * 2 * P, [=] __device__(int64_t i) {
    const int64_t k = i % P, rest = i / P, which = rest % 2, n = rest / 2;  // which: 0 k, 1 v
    const int64_t slot = slots[n];
    if (slot < 0 || slot >= num_slots) return;
    nv v[W];
    load_raw<W>(v, qkv + n * row + q_dim + which * kv_dim + k * W);
    store_raw<W>((which ? v_cache : k_cache) + slot * kv_dim + k * W, v);
  });
}

// ---- gather_rows: W elements per thread (16 bytes when C and the pointers allow it) ----
template <int W, class T>
void gather_packs(T* out, const T* x, const int32_t* rows, int64_t M, int64_t C) {
  const int64_t P = C / W;
  launch_elementwise(kOpGather, M * P, [=] __device__(int64_t i) {
    const int64_t m = i / P, c = (i % P) * W;
    T v[W];
    load_raw<W>(v, x + int64_t{rows[m]} * C + c);
    store_raw<W>(out + m * C + c, v);
  });
}

template <class T>
void gather_impl(T* out, const T* x, const int32_t* rows, int64_t M, int64_t C) {
  if (C % kPack<T> == 0 && aligned16(out, x)) gather_packs<kPack<T>>(out, x, rows, M, C);
  else gather_packs<1>(out, x, rows, M, C);
}

}  // namespace

void kv_cache_write(bf16* k_cache, bf16* v_cache, const bf16* qkv, const int32_t* slots, int64_t N, int64_t NH,
                    int64_t NKV, int64_t HS, int64_t num_slots) {
  const int64_t q_dim = NH * HS, kv_dim = NKV * HS;
  if (N == 0 || kv_dim == 0) return;
  constexpr int W = kPack<nv>;
  if (q_dim % W == 0 && kv_dim % W == 0 && aligned16(k_cache, v_cache, qkv))
    write_packs<W>(as_nv(k_cache), as_nv(v_cache), as_nv(qkv), slots, N, q_dim, kv_dim, num_slots);
  else
    write_packs<1>(as_nv(k_cache), as_nv(v_cache), as_nv(qkv), slots, N, q_dim, kv_dim, num_slots);
}

size_t paged_attention_workspace(int64_t N, int64_t NH, int64_t HS, int64_t max_context) {
  if (N <= 0 || max_context <= 0) return 0;
  const int64_t chunks = ceil_div(max_context, kChunk);
  return static_cast<size_t>(N * NH * chunks * (HS + 2)) * sizeof(float);
}

void paged_attention_forward(bf16* out, const bf16* qkv, const bf16* k_cache, const bf16* v_cache,
                             const int32_t* block_tables, const int32_t* seqs, const int32_t* positions, int64_t N,
                             int64_t NH, int64_t NKV, int64_t HS, int64_t block_size, int64_t max_blocks,
                             float scale) {
  if (N == 0) return;
  LMF_CHECK(NKV >= 1 && NH >= NKV && NH % NKV == 0 && NH <= INT_MAX, kOpAttn, ": NH=", NH,
            " must be a positive multiple of NKV=", NKV);
  LMF_CHECK(block_size >= 1 && max_blocks >= 1 && block_size * max_blocks <= INT_MAX, kOpAttn,
            ": block_size=", block_size, " max_blocks=", max_blocks, " out of range");
  LMF_CHECK(aligned16(out, qkv, k_cache, v_cache), kOpAttn,
            ": out, qkv, k_cache and v_cache must be 16-byte aligned (128-bit loads of 8 bf16)");
  const int64_t capacity = block_size * max_blocks, chunks = ceil_div(capacity, kChunk);
  float *part_o = nullptr, *part_ml = nullptr;
  if (chunks > 1) {  // partials of rows longer than one chunk
    auto* ws = static_cast<float*>(cuda_workspace(paged_attention_workspace(N, NH, HS, capacity), kOpAttn));
    part_o = ws;
    part_ml = ws + N * NH * chunks * HS;
  }
  const int G = static_cast<int>(NH / NKV);
  const float scale_log2 = scale * kLog2e;
  auto run = [&](auto launch_hs) {
    launch_hs(G, as_nv(out), part_o, part_ml, as_nv(qkv), as_nv(k_cache), as_nv(v_cache), block_tables, seqs,
              positions, N, static_cast<int>(NH), static_cast<int>(NKV), static_cast<int>(block_size),
              static_cast<int>(max_blocks), chunks, scale_log2);
  };
  switch (HS) {  // the instances paged_head_size_supported(HS, false) lists
#define LMF_PAGED_HS(hs) \
  case hs: run(launch_chunks_hs<hs>); break;
    LMF_PAGED_HS(16) LMF_PAGED_HS(32) LMF_PAGED_HS(64) LMF_PAGED_HS(80) LMF_PAGED_HS(96) LMF_PAGED_HS(112)
    LMF_PAGED_HS(128) LMF_PAGED_HS(256)
#undef LMF_PAGED_HS
    default:
      fail(kOpAttn, ": head size HS=", HS, " is not supported on the GPU (", paged_head_sizes_text(false), ")");
  }
  if (chunks > 1) launch_combine(as_nv(out), part_o, part_ml, seqs, positions, N, NH, HS, chunks, capacity);
}

void paged_attention_forward_invariant(bf16* out, const bf16* qkv, const bf16* k_cache, const bf16* v_cache,
                                       const int32_t* block_tables, const int32_t* seqs, const int32_t* positions,
                                       int64_t N, int64_t NH, int64_t NKV, int64_t HS, int64_t block_size,
                                       int64_t max_blocks, float scale) {
  if (N == 0) return;
  LMF_CHECK(NKV >= 1 && NH >= NKV && NH % NKV == 0 && NH <= INT_MAX && N <= INT_MAX, kOpAttnInvariant, ": NH=", NH,
            " must be a positive multiple of NKV=", NKV, " (N=", N, ")");
  LMF_CHECK(block_size >= 1 && max_blocks >= 1 && block_size * max_blocks <= INT_MAX, kOpAttnInvariant,
            ": block_size=", block_size, " max_blocks=", max_blocks, " out of range");
  LMF_CHECK(aligned16(out, qkv, k_cache, v_cache), kOpAttnInvariant,
            ": out, qkv, k_cache and v_cache must be 16-byte aligned (cp.async of 8 bf16)");
  const float scale_log2 = scale * kLog2e;  // as flash_attention_forward computes it
  auto run = [&](auto f) {
    f(as_nv(out), as_nv(qkv), as_nv(k_cache), as_nv(v_cache), block_tables, seqs, positions, N, static_cast<int>(NH),
      static_cast<int>(NKV), static_cast<int>(block_size), static_cast<int>(max_blocks), scale_log2);
  };
  switch (HS) {  // the instances paged_head_size_supported(HS, true) lists: the flash forward's
#define LMF_PAGED_FLASH_HS(hs) \
  case hs: return run(launch_paged_flash<hs>);
    LMF_PAGED_FLASH_HS(32) LMF_PAGED_FLASH_HS(64) LMF_PAGED_FLASH_HS(80) LMF_PAGED_FLASH_HS(96)
    LMF_PAGED_FLASH_HS(112) LMF_PAGED_FLASH_HS(128)
#undef LMF_PAGED_FLASH_HS
    default:
      fail(kOpAttnInvariant, ": head size HS=", HS, " is not supported (", paged_head_sizes_text(true),
           ": the flash forward's)");
  }
}

void gather_rows(bf16* out, const bf16* x, const int32_t* rows, int64_t M, int64_t C) {
  if (M == 0 || C == 0) return;
  gather_impl(as_nv(out), as_nv(x), rows, M, C);
}

void gather_rows(float* out, const float* x, const int32_t* rows, int64_t M, int64_t C) {
  if (M == 0 || C == 0) return;
  gather_impl(out, x, rows, M, C);
}

}  // namespace lmf::cuda
