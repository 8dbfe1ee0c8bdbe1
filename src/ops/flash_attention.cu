// flash_attention.cu: fused causal flash attention (MHA/GQA) in bf16 for sm_90a, forward and
// backward (attention.h, docs/MIXED_PRECISION.md). FlashAttention-2 structure on warp-level tensor
// cores (mma.sync m16n8k16 bf16 -> fp32, operands from shared memory through ldmatrix); fp32
// accumulation and softmax; no (T, T) matrix ever reaches memory.
//
// Math (per batch b, q head h, kv head g = h / (NH / NKV); scale = 1/sqrt(HS); causal: s <= t):
//   S = scale Q K^T;  lse[t] = ln sum_{s<=t} exp(S[t,s]);  P = exp(S - lse);  O = P V
//   delta[t] = sum_d dO[t,d] O[t,d]            (O the stored bf16 output)
//   dP = dO V^T;  dS = P (dP - delta);  dV += P^T dO;  dK += scale dS^T Q;  dQ += scale dS K
// The softmax runs in the log2 domain: s2 = S log2(e), exp2 (ex2.approx), lse stored as natural log.
//
// Layout: qkv, dqkv (B, T, C3), C3 = (NH + 2 NKV) HS, row t = [q heads | k heads | v heads], so head
// h's Q rows start at qkv + b T C3 + h HS with row stride C3, K at + (NH + g) HS, V at + (NH + NKV + g) HS;
// out, dout (B, T, NH HS) (head h at + h HS, row stride NH HS); lse, delta (B, NH, T) f32.
//
// Kernels (all launches through core/cuda_launch.cuh's checked launch()):
//   1. flash_fwd_kernel<HS>: one CTA per (b h, query tile of 128 rows), 8 warps, warp w owns query
//      rows [16 w, 16 w + 16) of the tile. Key/value tiles of 64 rows stream through shared memory
//      (cp.async, double-buffered) from key tile 0 up to the diagonal; online softmax per row (running
//      max m and sum l in fp32); O accumulates in registers; P goes from the S accumulator straight
//      into the A operand of P V (the C and A fragment layouts coincide, see below). Writes out (bf16,
//      O / l) and lse. Query tiles are scheduled heaviest (last) first.
//   2. flash_bwd_dq_kernel<HS> (launched first): one CTA per (b h, query tile of kBqDq = 64 rows; 128
//      at HS 32), 4 warps, warp w owns 16 (HS 32: 32) query rows. First delta[t] = sum_d dO[t,d] O[t,d]
//      for the tile's rows (written to `delta` for kernel 3). Then loops over the key tiles (32 keys at
//      HS 64, else 64; double-buffered) up to the diagonal, recomputing P and dP; dQ accumulates in
//      registers and is added into dqkv once at the end.
//   3. flash_bwd_dkdv_kernel<HS>: one CTA per (b g, key tile of kBk = 64 keys; 128 at HS 32), 4 warps,
//      warp w owns 16 (HS 32: 32) keys. Loops, in a fixed order, over the q heads of the kv group
//      (increasing) and, for each, over the query tiles (32 rows) from the key tile's diagonal to T
//      (Q, dO, lse, delta double-buffered), recomputing S^T = K Q^T and P^T = exp(S^T - lse) in
//      registers; dV and dK accumulate in registers (fp32) and are added into dqkv once at the end.
//      Key tile 0 (the most query tiles) is scheduled first.
// Head sizes: 32, 64, 80, 96, 112, 128 (attention.h flash_head_size_supported; any multiple of 16 fits
// the fragment loops, the instances are the sizes real models use).
// Registers (ptxas, nvcc 13.0) at HS 32 / 64 / 80 / 96 / 112 / 128: forward 103 / 127 / 162 / 186 / 198 / 198
// (2 CTAs per SM at HS <= 64 by __launch_bounds__); dQ 241 / 128 / 171 / 175 / 240 / 240; dK/dV 202 / 168 /
// 171 / 238 / 255 / 255 (spills: 16 bytes at HS 64, 8 at 112, 36 at 128).
// Measured on an H200 at B=16, NH=12, T=1024, HS=64 (ncu per kernel): forward 139 us (events: 0.134
// ms, ~190 TFLOP/s on the causal half); backward 0.443 ms by events (~146 TFLOP/s counted as 2.5x the
// forward's FLOPs): dQ + delta 187 us, dK/dV 267 us (before this tiling: delta 15 + dQ 173 + dK/dV
// 276 us, 0.455 ms; tile shapes tried without gain: BwdCfg's comment).
// Determinism: no atomics; every sum has a fixed order that depends only on (T, HS, NH / NKV) (not on
// B, the grid or scheduling): the kernels are deterministic and batch-invariant. dqkv accumulates
// (+=, GradMode::Accumulate: each element is read, the fp32 gradient added, the sum rounded once, round
// to nearest even) or is written (GradMode::Overwrite: the fp32 gradient rounded once);
// each element of dqkv is owned by exactly one CTA (kernel 2: the Q columns, kernel 3: the K and V
// columns).
//
// Fragment layouts of mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (PTX ISA, "Matrix
// fragments for mma.m16n8k16"), lane = 4 gid + tig (gid = lane / 4 in [0, 8), tig = lane % 4):
//   A (16 x 16, row-major), 4 x b32 registers of 2 bf16 (lower column in the low half):
//     a0: (row gid,     cols 2 tig, 2 tig + 1)     a1: (row gid + 8, cols 2 tig, 2 tig + 1)
//     a2: (row gid,     cols 2 tig + 8, + 9)       a3: (row gid + 8, cols 2 tig + 8, + 9)
//   B (16 x 8, k x n), 2 x b32:  b0: (k rows 2 tig, 2 tig + 1, col gid)   b1: (k rows 2 tig + 8, + 9, col gid)
//   C/D (16 x 8, f32), 4 floats: c0, c1: (row gid, cols 2 tig, 2 tig + 1); c2, c3: (row gid + 8, same cols)
// So the C fragments of two adjacent 8-column tiles n = 2j, 2j + 1 of a 16-row strip, packed to bf16
// pairs (c0 c1), (c2 c3), are exactly the A fragment (a0, a1) = tile 2j, (a2, a3) = tile 2j + 1 of
// the 16-column slice j: P (and dS) never leave registers.
// A thread's accumulator element acc[nt][e] of a 16-row strip is at row gid + 8 (e / 2), column
// 8 nt + 2 tig + (e % 2).
//
// ldmatrix.x4 (m8n8, b16) loads four 8 x 8 matrices; lanes 8 i .. 8 i + 7 give the row addresses of
// matrix i (16 contiguous bytes each); register i of lane l receives matrix i's row l / 4, elements
// 2 (l % 4), + 1 (with .trans: column l / 4, rows 2 (l % 4), + 1). Three uses (smem tiles row-major,
// row stride kLd elements):
//   load_a:      A fragment of a 16 x 16 block at (m0, k0) of a row-major (m, k) tile;
//                lane l points at row m0 + l % 16, column k0 + 8 (l / 16).
//   load_b_nk:   B fragments (b0, b1) of two 8-column n-tiles n0, n0 + 8 for the k-slice [k0, k0 + 16)
//                from a tile stored with rows = n (K for S = Q K^T); lane l points at row
//                n0 + 8 (l / 16) + l % 8, column k0 + 8 ((l / 8) % 2).
//   load_b_kn:   the same B fragments from a tile stored with rows = k (V for O = P V), through .trans;
//                lane l points at row k0 + 8 ((l / 8) % 2) + l % 8, column n0 + 8 (l / 16).
// Shared-memory rows are padded by 8 bf16 (16 bytes): a row is HS + 8 elements, so the 8 rows an
// ldmatrix phase reads (and the 16-byte cp.async writes of a row) fall in 8 distinct bank groups.
//
// Masking and tails: tiles are loaded with cp.async zero-fill beyond T (rows of zeros, finite scores).
// The forward starts at key tile 0, where every query row has its key 0 unmasked, so the running max
// is finite from the first tile on (no exp of inf - inf). Masked probabilities are set by selection,
// never by multiplication. Rows and keys >= T are computed on zeros and never stored.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "core/check.h"
#include "core/cuda_launch.cuh"
#include "ops/attention.h"
#include "ops/flash_tile.cuh"
#include "ops/packed.cuh"
#include "ops/ptx.cuh"

namespace lmf::cuda {
namespace {

using namespace flash;  // ops/flash_tile.cuh: fragment loads, mma loops, the strip store, the forward's step
static_assert(sizeof(nv_bf16) == sizeof(lmf::bf16), "lmf::bf16 must be bit-compatible with __nv_bfloat16");

// Sizes of one attention call as the kernels see them (all element offsets fit int64); accumulate:
// the backward adds into dqkv (else writes it).
struct FlashDims {
  int T, NH, NKV;
  bool accumulate;
  __device__ __forceinline__ int group() const { return NH / NKV; }
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <int HS>
struct FwdCfg {
  static constexpr int kBr = 128, kBc = kFwdBc, kWarps = 8, kThreads = 32 * kWarps;
  static constexpr int kLd = HS + kPad;
  static constexpr int kQElems = kBr * kLd, kKVElems = kBc * kLd;
  // sQ, then K stage 0, K stage 1, V stage 0, V stage 1.
  static constexpr size_t kTileBytes = static_cast<size_t>(kQElems + 4 * kKVElems) * sizeof(nv_bf16);
  static constexpr size_t kStageBytes = static_cast<size_t>(kWarps) * 16 * (HS + 4) * sizeof(float);
  static constexpr size_t kSmem = kTileBytes > kStageBytes ? kTileBytes : kStageBytes;
  static_assert(kBr == 16 * kWarps, "one 16-row strip per warp");
};

// grid (B NH, ceil(T / kBr)); block kThreads; dynamic smem FwdCfg::kSmem.
// out: (B, T, NH HS) bf16; lse: (B, NH, T); qkv: (B, T, C3). scale_log2 = scale log2(e).
template <int HS>
__global__ void __launch_bounds__(FwdCfg<HS>::kThreads, HS <= 64 ? 2 : 1)
    flash_fwd_kernel(nv_bf16* __restrict__ out, float* __restrict__ lse, const nv_bf16* __restrict__ qkv,
                     FlashDims d, float scale_log2) {
  using C = FwdCfg<HS>;
  constexpr int kLd = C::kLd, kBr = C::kBr, kBc = C::kBc;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  nv_bf16* sQ = reinterpret_cast<nv_bf16*>(smem_raw);
  nv_bf16* sK = sQ + C::kQElems;      // stage s at sK + s kKVElems
  nv_bf16* sV = sK + 2 * C::kKVElems;  // stage s at sV + s kKVElems

  const int T = d.T, NH = d.NH, NKV = d.NKV;
  const int qt = static_cast<int>(gridDim.y - 1 - blockIdx.y);  // heaviest (last) query tile first
  const int bh = static_cast<int>(blockIdx.x), b = bh / NH, h = bh % NH, g = h / d.group();
  const int q0 = qt * kBr;
  const int64_t C3 = static_cast<int64_t>(NH + 2 * NKV) * HS, CO = static_cast<int64_t>(NH) * HS;
  const nv_bf16* qbase = qkv + static_cast<int64_t>(b) * T * C3 + static_cast<int64_t>(h) * HS;
  const nv_bf16* kbase = qkv + static_cast<int64_t>(b) * T * C3 + static_cast<int64_t>(NH + g) * HS;
  const nv_bf16* vbase = kbase + static_cast<int64_t>(NKV) * HS;
  const int q_end = min(T, q0 + kBr);          // query rows [q0, q_end) are real
  const int n_kt = (q_end + kBc - 1) / kBc;    // key tiles [0, n_kt): keys [0, q_end) and zeros past T

  load_tile_async<kBr, HS, C::kThreads>(sQ, qbase + static_cast<int64_t>(q0) * C3, C3, q_end - q0);
  load_tile_async<kBc, HS, C::kThreads>(sK, kbase, C3, min(T, kBc));
  load_tile_async<kBc, HS, C::kThreads>(sV, vbase, C3, min(T, kBc));
  cp_async_commit();

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int gid = lane >> 2, tig = lane & 3;
  const int strip0 = q0 + 16 * warp;                  // first query row of this warp
  const int row_lo = strip0 + gid, row_hi = row_lo + 8;  // this thread's two rows

  FwdStrip<HS> st;
  st.init();

  for (int j = 0; j < n_kt; ++j) {
    const int stage = j & 1;
    if (j + 1 < n_kt) {  // prefetch tile j + 1 into the other stage (freed by the barrier ending j - 1)
      const int k1 = (j + 1) * kBc;
      load_tile_async<kBc, HS, C::kThreads>(sK + (stage ^ 1) * C::kKVElems, kbase + static_cast<int64_t>(k1) * C3,
                                            C3, T - k1);
      load_tile_async<kBc, HS, C::kThreads>(sV + (stage ^ 1) * C::kKVElems, vbase + static_cast<int64_t>(k1) * C3,
                                            C3, T - k1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int k0 = j * kBc;
    if (k0 <= strip0 + 15)  // else every key of the tile is above this warp's rows: nothing to add
      fwd_strip_tile<kLd, HS>(st, sQ, 16 * warp, sK + stage * C::kKVElems, sV + stage * C::kKVElems, k0,
                              k0 + kBc - 1 > strip0, row_lo, row_hi, scale_log2, lane);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  fwd_strip_sums(st);
  if (tig == 0) {
    float* lrow = lse + static_cast<int64_t>(bh) * T;
    if (row_lo < T) lrow[row_lo] = fwd_lse(st.m_lo, st.l_lo);
    if (row_hi < T) lrow[row_hi] = fwd_lse(st.m_hi, st.l_hi);
  }
  // The tiles are dead (the loop ended with a barrier and no copy is in flight): reuse the shared
  // memory as the warps' output staging buffers.
  float* stage = reinterpret_cast<float*>(smem_raw) + warp * 16 * (HS + 4);
  nv_bf16* orow = out + (static_cast<int64_t>(b) * T + strip0) * CO + static_cast<int64_t>(h) * HS;
  warp_store_strip<HS>(orow, CO, min(16, T - strip0), st.o, 1.0f / st.l_lo, 1.0f / st.l_hi, stage, lane, false);
}

// ---------------------------------------------------------------------------------------------
// Backward, shared tiling of kernels 2 and 3
// ---------------------------------------------------------------------------------------------

template <int HS>
struct BwdCfg {
  static constexpr int kWarps = 4, kThreads = 32 * kWarps;
  // 16-row strips per warp (kM dK/dV, kMq dQ). Two strips let each B fragment read from shared memory
  // feed 4 mma instead of 2, but at HS 64 that did not pay (H200, B=16 NH=12 T=1024: dK/dV 276 us with
  // 2 strips x 32 queries (spills at 255 registers) vs 267 us with 1 x 32; dQ with delta 187 us either
  // way at 1 x 32 keys, 200 us at 2 x 32): the kernels are not bound by shared-memory reads. Two at
  // HS 32 (registers to spare), one elsewhere.
  static constexpr int kM = HS < 64 ? 2 : 1, kMq = kM;
  static constexpr int kRows = 16 * kM;             // keys per dK/dV warp
  static constexpr int kRowsQ = 16 * kMq;           // queries per dQ warp
  static constexpr int kBk = kRows * kWarps;        // keys per dK/dV CTA
  static constexpr int kBq = 32;                    // dK/dV's query tile
  static constexpr int kBqDq = kRowsQ * kWarps;     // queries per dQ CTA
  static constexpr int kBkDq = HS == 64 ? 32 : 64;  // dQ's key tile (32 at HS 64: 128 registers, 4 CTAs/SM)
  static constexpr int kLd = HS + kPad;
  static constexpr int kKTile = kBk * kLd, kQTile = kBq * kLd;          // dK/dV tiles (elements)
  static constexpr int kQTileDq = kBqDq * kLd, kKTileDq = kBkDq * kLd;  // dQ tiles (elements)
  // dK/dV kernel: K, V, then Q and dO for two stages, then lse and delta for two stages.
  static constexpr size_t kDkdvTiles =
      static_cast<size_t>(2 * kKTile + 4 * kQTile) * sizeof(nv_bf16) + 2 * 2 * kBq * sizeof(float);
  // dQ kernel: Q, dO, then K and V for two stages, then delta of the query tile.
  static constexpr size_t kDqTiles =
      static_cast<size_t>(2 * kQTileDq + 4 * kKTileDq) * sizeof(nv_bf16) + kBqDq * sizeof(float);
  static constexpr size_t kStageBytes = static_cast<size_t>(kWarps) * 16 * (HS + 4) * sizeof(float);
  static constexpr size_t kSmemDkdv = kDkdvTiles > kStageBytes ? kDkdvTiles : kStageBytes;
  static constexpr size_t kSmemDq = kDqTiles > kStageBytes ? kDqTiles : kStageBytes;
  static_assert(kBk % kBq == 0, "a key tile starts on a query tile boundary");
  static_assert(kThreads >= kBq, "a query's lse and delta are copied by one thread");
};

// ---------------------------------------------------------------------------------------------
// Backward, kernel 1: dQ and delta
// ---------------------------------------------------------------------------------------------

// grid (B NH, ceil(T / kBqDq)); block kThreads; dynamic smem BwdCfg::kSmemDq.
// Query tile = last first (the heaviest). First delta[t] = sum_d dO[t, d] O[t, d] for the tile's rows
// (each of the HS / 8 lanes of a row sums its 8 products in order, then the fixed xor butterfly;
// written to `delta` for kernel 2). Then for each key tile from 0 to the diagonal, with the warp's
// kRows queries as rows: S = Q K^T; P = exp2(S log2(e) scale - lse log2(e)) (0 where key > query);
// dP = dO V^T; dS = P (dP - delta); dQ += dS K. Then dqkv[Q] += scale dQ.
template <int HS>
__global__ void __launch_bounds__(BwdCfg<HS>::kThreads)
    flash_bwd_dq_kernel(nv_bf16* __restrict__ dqkv, float* __restrict__ delta, const nv_bf16* __restrict__ qkv,
                        const nv_bf16* __restrict__ dout, const nv_bf16* __restrict__ out,
                        const float* __restrict__ lse, FlashDims d, float scale, float scale_log2) {
  using C = BwdCfg<HS>;
  constexpr int kLd = C::kLd, kBq = C::kBqDq, kBk = C::kBkDq, kThreads = C::kThreads, kM = C::kMq, kRows = C::kRowsQ;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  nv_bf16* sQ = reinterpret_cast<nv_bf16*>(smem_raw);
  nv_bf16* sdO = sQ + C::kQTileDq;
  nv_bf16* sK = sdO + C::kQTileDq;     // stage s at sK + s kKTileDq
  nv_bf16* sV = sK + 2 * C::kKTileDq;  // stage s at sV + s kKTileDq
  float* sDl = reinterpret_cast<float*>(sV + 2 * C::kKTileDq);  // [kBq] delta

  const int T = d.T, NH = d.NH, NKV = d.NKV;
  const int qt = static_cast<int>(gridDim.y - 1 - blockIdx.y);  // heaviest (last) query tile first
  const int bh = static_cast<int>(blockIdx.x), b = bh / NH, h = bh % NH, g = h / d.group();
  const int q0 = qt * kBq;
  const int64_t C3 = static_cast<int64_t>(NH + 2 * NKV) * HS, CO = static_cast<int64_t>(NH) * HS;
  const nv_bf16* qkv_b = qkv + static_cast<int64_t>(b) * T * C3;
  const nv_bf16* kbase = qkv_b + static_cast<int64_t>(NH + g) * HS;
  const nv_bf16* vbase = kbase + static_cast<int64_t>(NKV) * HS;
  const int64_t orow0 = (static_cast<int64_t>(b) * T + q0) * CO + static_cast<int64_t>(h) * HS;
  const int q_end = min(T, q0 + kBq);
  const int n_kt = (q_end + kBk - 1) / kBk;  // key tiles [0, n_kt)

  load_tile_async<kBq, HS, kThreads>(sQ, qkv_b + static_cast<int64_t>(q0) * C3 + h * HS, C3, q_end - q0);
  load_tile_async<kBq, HS, kThreads>(sdO, dout + orow0, CO, q_end - q0);
  load_tile_async<kBk, HS, kThreads>(sK, kbase, C3, min(T, kBk));
  load_tile_async<kBk, HS, kThreads>(sV, vbase, C3, min(T, kBk));
  cp_async_commit();

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t lrow = static_cast<int64_t>(bh) * T;
  {  // delta of the tile's rows (0 past T), while the tiles load; dO read from global as well (L2)
    // kLanes: HS / 8 rounded up to a power of 2 (the butterfly's width); lanes past HS add 0.
    constexpr int kLanes = HS <= 64 ? HS / 8 : 16, kChunks = kBq * kLanes;
    static_assert(kLanes * 8 >= HS && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0 && kChunks % kThreads == 0,
                  "row lanes in a warp");
#pragma unroll
    for (int i = 0; i < kChunks / kThreads; ++i) {
      const int c = tid + i * kThreads, r = c / kLanes, col = (c % kLanes) * 8;
      float acc = 0.0f;
      if (q0 + r < T && col < HS) {
        const uint4 a = *reinterpret_cast<const uint4*>(dout + orow0 + r * CO + col);
        const uint4 y = *reinterpret_cast<const uint4*>(out + orow0 + r * CO + col);
        const uint32_t wa[4] = {a.x, a.y, a.z, a.w}, wy[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          acc += bf16_lo(wa[k]) * bf16_lo(wy[k]);
          acc += bf16_hi(wa[k]) * bf16_hi(wy[k]);
        }
      }
#pragma unroll
      for (int off = kLanes / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (col == 0) {
        sDl[r] = acc;
        if (q0 + r < T) delta[lrow + q0 + r] = acc;
      }
    }
  }
  __syncthreads();

  const int warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tig = lane & 3;
  const int strip0 = q0 + kRows * warp;  // first query row of this warp
  float l2[kM][2], dl[kM][2];            // lse log2(e) and delta of rows strip0 + 16 m + gid (+ 8)
#pragma unroll
  for (int m = 0; m < kM; ++m) {
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const int row = strip0 + 16 * m + gid + 8 * hi;
      l2[m][hi] = row < T ? lse[lrow + row] * kLog2e : 0.0f;
      dl[m][hi] = sDl[row - q0];
    }
  }

  float dq[kM][HS / 8][4];
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int i = 0; i < HS / 8; ++i) dq[m][i][0] = dq[m][i][1] = dq[m][i][2] = dq[m][i][3] = 0.0f;

  for (int j = 0; j < n_kt; ++j) {
    const int st = j & 1;
    if (j + 1 < n_kt) {
      const int k1 = (j + 1) * kBk;
      load_tile_async<kBk, HS, kThreads>(sK + (st ^ 1) * C::kKTileDq, kbase + static_cast<int64_t>(k1) * C3, C3,
                                         T - k1);
      load_tile_async<kBk, HS, kThreads>(sV + (st ^ 1) * C::kKTileDq, vbase + static_cast<int64_t>(k1) * C3, C3,
                                         T - k1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int k0 = j * kBk;
    if (k0 <= strip0 + kRows - 1) {  // else every key of the tile is above this warp's rows
      const nv_bf16* tK = sK + st * C::kKTileDq;
      const nv_bf16* tV = sV + st * C::kKTileDq;
      // S = Q K^T (kRows queries x kBk keys).
      float s[kM][kBk / 8][4];
#pragma unroll
      for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int n = 0; n < kBk / 8; ++n) s[m][n][0] = s[m][n][1] = s[m][n][2] = s[m][n][3] = 0.0f;
      mma_abt<kLd, HS, kBk, kM>(s, sQ, kRows * warp, tK, lane);
      // P; mask where key > query (which covers keys >= T for the real rows).
      const bool diag = k0 + kBk - 1 > strip0;
#pragma unroll
      for (int m = 0; m < kM; ++m) {
#pragma unroll
        for (int n = 0; n < kBk / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float p = exp2f(s[m][n][e] * scale_log2 - l2[m][e >> 1]);
            if (diag) {
              const int key = k0 + n * 8 + 2 * tig + (e & 1), row = strip0 + 16 * m + gid + 8 * (e >> 1);
              if (key > row) p = 0.0f;
            }
            s[m][n][e] = p;
          }
        }
      }
      // dP = dO V^T (kRows queries x kBk keys).
      float dp[kM][kBk / 8][4];
#pragma unroll
      for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int n = 0; n < kBk / 8; ++n) dp[m][n][0] = dp[m][n][1] = dp[m][n][2] = dp[m][n][3] = 0.0f;
      mma_abt<kLd, HS, kBk, kM>(dp, sdO, kRows * warp, tV, lane);
      // dS = P (dP - delta[row]), in place of dP.
#pragma unroll
      for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int n = 0; n < kBk / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) dp[m][n][e] = s[m][n][e] * (dp[m][n][e] - dl[m][e >> 1]);
      // dQ += dS K (K stored with rows = keys = k).
      mma_regs_b<kLd, kBk, HS, kM>(dq, dp, tK, lane);
    }
    __syncthreads();
  }

  float* stage = reinterpret_cast<float*>(smem_raw) + warp * 16 * (HS + 4);
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    const int row0 = strip0 + 16 * m;
    nv_bf16* drow = dqkv + (static_cast<int64_t>(b) * T + row0) * C3 + static_cast<int64_t>(h) * HS;
    warp_store_strip<HS>(drow, C3, min(16, T - row0), dq[m], scale, scale, stage, lane, d.accumulate);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, kernel 2: dK, dV
// ---------------------------------------------------------------------------------------------

// grid (B NKV, ceil(T / kBk)); block kThreads; dynamic smem BwdCfg::kSmemDkdv.
// Key tile kt = blockIdx.y (tile 0, which sees every query tile, first). For each q head of the group
// (increasing) and each query tile from the diagonal to the end (increasing), with the warp's kRows
// keys as rows:  S^T = K Q^T; P^T = exp2(S^T log2(e) scale - lse log2(e)) (0 where query < key or
// query >= T); dV += P^T dO; dP^T = V dO^T; dS^T = P^T (dP^T - delta); dK += dS^T Q. Then
// dqkv[K] += scale dK, dqkv[V] += dV.
template <int HS>
__global__ void __launch_bounds__(BwdCfg<HS>::kThreads)
    flash_bwd_dkdv_kernel(nv_bf16* __restrict__ dqkv, const nv_bf16* __restrict__ qkv,
                          const nv_bf16* __restrict__ dout, const float* __restrict__ lse,
                          const float* __restrict__ delta, FlashDims d, float scale, float scale_log2) {
  using C = BwdCfg<HS>;
  constexpr int kLd = C::kLd, kBq = C::kBq, kBk = C::kBk, kThreads = C::kThreads, kM = C::kM, kRows = C::kRows;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  nv_bf16* sK = reinterpret_cast<nv_bf16*>(smem_raw);
  nv_bf16* sV = sK + C::kKTile;
  nv_bf16* sQ = sV + C::kKTile;        // stage s at sQ + s kQTile
  nv_bf16* sdO = sQ + 2 * C::kQTile;   // stage s at sdO + s kQTile
  float* sL = reinterpret_cast<float*>(sdO + 2 * C::kQTile);  // [2][kBq] lse
  float* sD = sL + 2 * kBq;                                       // [2][kBq] delta

  const int T = d.T, NH = d.NH, NKV = d.NKV, group = d.group();
  const int bg = static_cast<int>(blockIdx.x), b = bg / NKV, g = bg % NKV;
  const int k0 = static_cast<int>(blockIdx.y) * kBk;
  const int64_t C3 = static_cast<int64_t>(NH + 2 * NKV) * HS, CO = static_cast<int64_t>(NH) * HS;
  const nv_bf16* qkv_b = qkv + static_cast<int64_t>(b) * T * C3;
  const nv_bf16* dout_b = dout + static_cast<int64_t>(b) * T * CO;
  const int64_t k_col = static_cast<int64_t>(NH + g) * HS, v_col = k_col + static_cast<int64_t>(NKV) * HS;

  const int qt0 = k0 / kBq;                    // first query tile with a query >= k0
  const int n_qt = (T + kBq - 1) / kBq - qt0;  // query tiles per head
  const int n_iter = group * n_qt;

  // Iteration i: q head h = g group + i / n_qt, query tile qt0 + i % n_qt, into stage st.
  auto issue = [&](int i, int st) {
    const int h = g * group + i / n_qt, q0 = (qt0 + i % n_qt) * kBq;
    load_tile_async<kBq, HS, kThreads>(sQ + st * C::kQTile, qkv_b + static_cast<int64_t>(q0) * C3 + h * HS, C3,
                                       T - q0);
    load_tile_async<kBq, HS, kThreads>(sdO + st * C::kQTile, dout_b + static_cast<int64_t>(q0) * CO + h * HS,
                                       CO, T - q0);
    const int tid = static_cast<int>(threadIdx.x);
    const int64_t row0 = (static_cast<int64_t>(b) * NH + h) * T + q0;
    if (tid < kBq) {  // zeros past T
      const bool ok = q0 + tid < T;
      cp_async_4(sL + st * kBq + tid, lse + row0 + (ok ? tid : 0), ok);
      cp_async_4(sD + st * kBq + tid, delta + row0 + (ok ? tid : 0), ok);
    }
  };

  load_tile_async<kBk, HS, kThreads>(sK, qkv_b + static_cast<int64_t>(k0) * C3 + k_col, C3, T - k0);
  load_tile_async<kBk, HS, kThreads>(sV, qkv_b + static_cast<int64_t>(k0) * C3 + v_col, C3, T - k0);
  issue(0, 0);
  cp_async_commit();

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int gid = lane >> 2, tig = lane & 3;
  const int strip0 = k0 + kRows * warp;  // first key of this warp

  float dk[kM][HS / 8][4], dv[kM][HS / 8][4];
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int i = 0; i < HS / 8; ++i) {
      dk[m][i][0] = dk[m][i][1] = dk[m][i][2] = dk[m][i][3] = 0.0f;
      dv[m][i][0] = dv[m][i][1] = dv[m][i][2] = dv[m][i][3] = 0.0f;
    }

  for (int i = 0; i < n_iter; ++i) {
    const int st = i & 1;
    if (i + 1 < n_iter) {
      issue(i + 1, st ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int q0 = (qt0 + i % n_qt) * kBq;
    const nv_bf16* tQ = sQ + st * C::kQTile;
    const nv_bf16* tdO = sdO + st * C::kQTile;
    const float* tL = sL + st * kBq;
    const float* tD = sD + st * kBq;
    if (strip0 <= q0 + kBq - 1) {  // else every query of the tile is before this warp's keys
      // S^T = K Q^T (kRows keys x kBq queries).
      float s[kM][kBq / 8][4];
#pragma unroll
      for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int n = 0; n < kBq / 8; ++n) s[m][n][0] = s[m][n][1] = s[m][n][2] = s[m][n][3] = 0.0f;
      mma_abt<kLd, HS, kBq, kM>(s, sK, kRows * warp, tQ, lane);
      // P^T; mask where query < key (causal) or query >= T.
      const bool mask = q0 < strip0 + kRows - 1 || q0 + kBq > T;
#pragma unroll
      for (int n = 0; n < kBq / 8; ++n) {
        const float2 l = *reinterpret_cast<const float2*>(tL + n * 8 + 2 * tig);  // this thread's 2 queries
        const float l2[2] = {l.x * kLog2e, l.y * kLog2e};
#pragma unroll
        for (int m = 0; m < kM; ++m) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float p = exp2f(s[m][n][e] * scale_log2 - l2[e & 1]);
            if (mask) {
              const int q = q0 + n * 8 + 2 * tig + (e & 1), key = strip0 + 16 * m + gid + 8 * (e >> 1);
              if (q < key || q >= T) p = 0.0f;
            }
            s[m][n][e] = p;
          }
        }
      }
      // dV += P^T dO (dO stored with rows = queries = k).
      mma_regs_b<kLd, kBq, HS, kM>(dv, s, tdO, lane);
      // dP^T = V dO^T (kRows keys x kBq queries).
      float dp[kM][kBq / 8][4];
#pragma unroll
      for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int n = 0; n < kBq / 8; ++n) dp[m][n][0] = dp[m][n][1] = dp[m][n][2] = dp[m][n][3] = 0.0f;
      mma_abt<kLd, HS, kBq, kM>(dp, sV, kRows * warp, tdO, lane);
      // dS^T = P^T (dP^T - delta[query]), in place of dP^T.
#pragma unroll
      for (int n = 0; n < kBq / 8; ++n) {
        const float2 dl = *reinterpret_cast<const float2*>(tD + n * 8 + 2 * tig);
#pragma unroll
        for (int m = 0; m < kM; ++m) {
#pragma unroll
          for (int e = 0; e < 4; ++e) dp[m][n][e] = s[m][n][e] * (dp[m][n][e] - ((e & 1) ? dl.y : dl.x));
        }
      }
      // dK += dS^T Q (Q stored with rows = queries = k).
      mma_regs_b<kLd, kBq, HS, kM>(dk, dp, tQ, lane);
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  // The tiles are dead: the shared memory becomes the warps' staging buffers (one 16-row strip at a time).
  float* stage = reinterpret_cast<float*>(smem_raw) + warp * 16 * (HS + 4);
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    const int row0 = strip0 + 16 * m, rows = min(16, T - row0);
    nv_bf16* drow = dqkv + (static_cast<int64_t>(b) * T + row0) * C3;
    warp_store_strip<HS>(drow + v_col, C3, rows, dv[m], 1.0f, 1.0f, stage, lane, d.accumulate);
    warp_store_strip<HS>(drow + k_col, C3, rows, dk[m], scale, scale, stage, lane, d.accumulate);
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

ShapeText shapes_of(int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS) {
  return shape_text("B=", B, " T=", T, " NH=", NH, " NKV=", NKV, " HS=", HS);
}

// The limits the kernels' int arithmetic and grids rely on (the op entry checks them with names).
void check_dims(const char* op, int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS) {
  LMF_CHECK(B >= 1 && T >= 1 && NH >= 1 && NKV >= 1 && NH % NKV == 0, op, ": bad sizes B=", B, " T=", T, " NH=", NH,
            " NKV=", NKV);
  LMF_CHECK(T <= INT_MAX / 2 && (NH + 2 * NKV) * HS <= INT_MAX && B * NH <= INT_MAX, op, ": sizes B=", B, " T=", T,
            " NH=", NH, " NKV=", NKV, " HS=", HS, " exceed the kernels' int range");
}

[[noreturn]] void unsupported_head_size(const char* op, int64_t HS) {
  fail(op, ": head size HS=", HS, " is not supported by the lmforge flash attention kernels (",
       flash_head_sizes_text(FlashKernels::lmforge), ")");
}

template <int HS>
void forward_hs(nv_bf16* out, float* lse, const nv_bf16* qkv, int64_t B, int64_t T, int64_t NH, int64_t NKV,
                float scale) {
  using C = FwdCfg<HS>;
  const FlashDims d{static_cast<int>(T), static_cast<int>(NH), static_cast<int>(NKV), false};
  launch({"flash_attention_forward", shapes_of(B, T, NH, NKV, HS), {B * NH, ceil_div(T, C::kBr), 1},
          {C::kThreads, 1, 1}, C::kSmem},
         flash_fwd_kernel<HS>, out, lse, qkv, d, scale * kLog2e);
}

template <int HS>
void backward_hs(nv_bf16* dqkv, float* delta, const nv_bf16* dout, const nv_bf16* qkv, const nv_bf16* out,
                 const float* lse, int64_t B, int64_t T, int64_t NH, int64_t NKV, float scale, bool accumulate) {
  using C = BwdCfg<HS>;
  const char* op = "flash_attention_backward";
  const ShapeText shapes = shapes_of(B, T, NH, NKV, HS);
  const FlashDims d{static_cast<int>(T), static_cast<int>(NH), static_cast<int>(NKV), accumulate};
  // dQ first: it also writes delta, which the dK/dV kernel reads.
  launch({op, shapes, {B * NH, ceil_div(T, C::kBqDq), 1}, {C::kThreads, 1, 1}, C::kSmemDq}, flash_bwd_dq_kernel<HS>,
         dqkv, delta, qkv, dout, out, lse, d, scale, scale * kLog2e);
  launch({op, shapes, {B * NKV, ceil_div(T, C::kBk), 1}, {C::kThreads, 1, 1}, C::kSmemDkdv}, flash_bwd_dkdv_kernel<HS>,
         dqkv, qkv, dout, static_cast<const float*>(lse), static_cast<const float*>(delta), d, scale,
         scale * kLog2e);
}

}  // namespace

void flash_attention_forward(bf16* out, float* lse, const bf16* qkv, int64_t B, int64_t T, int64_t NH, int64_t NKV,
                             int64_t HS, float scale) {
  const char* op = "flash_attention_forward";
  check_dims(op, B, T, NH, NKV, HS);
  switch (HS) {  // the instances flash_head_size_supported(FlashKernels::lmforge, HS) lists
#define LMF_FLASH_FWD(hs) \
  case hs: return forward_hs<hs>(as_nv(out), lse, as_nv(qkv), B, T, NH, NKV, scale);
    LMF_FLASH_FWD(32) LMF_FLASH_FWD(64) LMF_FLASH_FWD(80) LMF_FLASH_FWD(96) LMF_FLASH_FWD(112) LMF_FLASH_FWD(128)
#undef LMF_FLASH_FWD
    default: unsupported_head_size(op, HS);
  }
}

void flash_attention_backward(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out,
                              const float* lse, int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS,
                              float scale, bool accumulate) {
  const char* op = "flash_attention_backward";
  check_dims(op, B, T, NH, NKV, HS);
  switch (HS) {
#define LMF_FLASH_BWD(hs)                                                                                         \
  case hs:                                                                                                        \
    return backward_hs<hs>(as_nv(dqkv), delta, as_nv(dout), as_nv(qkv), as_nv(out), lse, B, T, NH, NKV, scale, \
                           accumulate);
    LMF_FLASH_BWD(32) LMF_FLASH_BWD(64) LMF_FLASH_BWD(80) LMF_FLASH_BWD(96) LMF_FLASH_BWD(112) LMF_FLASH_BWD(128)
#undef LMF_FLASH_BWD
    default: unsupported_head_size(op, HS);
  }
}

}  // namespace lmf::cuda
