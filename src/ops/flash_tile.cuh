// flash_tile.cuh: the warp-level pieces of the flash attention kernels (flash_attention.cu's header
// explains the fragment layouts): ldmatrix fragment loads, the mma loops, the output strip store, and
// the forward's per-warp step over one key tile (fwd_strip_tile), shared by the training forward
// (flash_fwd_kernel) and --batch-invariant serving (paged_attention.cu's paged_flash_kernel).
//
// A row's forward result depends only on its query, its keys and values (positions 0 .. its own, in key
// tiles of kFwdBc from tile 0 up) and HS: which other rows share its warp, its CTA or its batch, and
// where in the 16-row strip it sits, change nothing (each mma output row is its own dot products; the
// row max and sum are over the row's own quad; a tile past a row's diagonal is an exact no-op for it:
// all -inf, so m stays, alpha = exp2(0) = 1, p = 0). fwd_strip_softmax spells every rounding step with
// an intrinsic (__fmul_rn, __fadd_rn, __fsub_rn, __fmaf_rn) so that no kernel's FMA contraction can
// make the two callers round differently. Every caller uses kFwdBc-key tiles from key 0 up; the mma
// may run over the whole tile (fwd_strip_tile) or in 16-key pieces (fwd_scores_piece, fwd_pv_piece):
// each accumulator gets the same sequence of mma either way.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/packed.cuh"
#include "ops/ptx.cuh"

namespace lmf::cuda::flash {

using nv_bf16 = __nv_bfloat16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kPad = 8;  // bf16 elements of padding per shared-memory row (16 bytes)

// ---------------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------------

// (ops/ptx.cuh: smem_u32, cp_async_*, ldmatrix_x4[_trans], mma_bf16; ops/packed.cuh: pack_bf16,
// bf16_lo, bf16_hi)

// ---------------------------------------------------------------------------------------------
// Fragment loads from a row-major shared tile with row stride kLd (elements); see the header.
// ---------------------------------------------------------------------------------------------

template <int kLd>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const nv_bf16* tile, int m0, int k0, int lane) {
  ldmatrix_x4(a, tile + (m0 + (lane & 15)) * kLd + k0 + ((lane >> 4) << 3));
}
// b[0], b[1]: (b0, b1) of n-tile n0; b[2], b[3]: of n-tile n0 + 8. Tile rows are n.
template <int kLd>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const nv_bf16* tile, int n0, int k0, int lane) {
  ldmatrix_x4(b, tile + (n0 + ((lane >> 4) << 3) + (lane & 7)) * kLd + k0 + (((lane >> 3) & 1) << 3));
}
// Same fragments from a tile whose rows are k.
template <int kLd>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const nv_bf16* tile, int k0, int n0, int lane) {
  ldmatrix_x4_trans(b, tile + (k0 + (((lane >> 3) & 1) << 3) + (lane & 7)) * kLd + n0 + ((lane >> 4) << 3));
}

// acc[m] (kM strips of 16 rows: rows m0 + 16 m .. + 15 of tile_a) = A B^T, A the (rows x kK) slice of
// tile_a, B stored with rows = n (kN rows of tile_b, columns = k). kK: the contraction length. Each B
// fragment loaded through ldmatrix feeds 2 kM mma (the reason for kM > 1: fewer shared-memory reads
// per mma, the backward's limit).
template <int kLd, int kK, int kN, int kM>
__device__ __forceinline__ void mma_abt(float (&acc)[kM][kN / 8][4], const nv_bf16* tile_a, int m0,
                                        const nv_bf16* tile_b, int lane) {
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks) {
    uint32_t a[kM][4];
#pragma unroll
    for (int m = 0; m < kM; ++m) load_a<kLd>(a[m], tile_a, m0 + 16 * m, ks * 16, lane);
#pragma unroll
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t b[4];
      load_b_nk<kLd>(b, tile_b, np * 16, ks * 16, lane);
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        mma_bf16(acc[m][2 * np], a[m], b[0], b[1]);
        mma_bf16(acc[m][2 * np + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// A fragments (header comment) of X[m] (16 x kK, C fragments), rounded to bf16: a[m][kk] is the
// 16-column slice kk; element (m, n, e) of x is the (e & 1 ? high : low) half of a[m][n / 2][2 (n % 2) + e / 2].
template <int kM, int kK>
__device__ __forceinline__ void pack_a(uint32_t (&a)[kM][kK / 16][4], const float (&x)[kM][kK / 8][4]) {
#pragma unroll
  for (int m = 0; m < kM; ++m) {
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk) {
      a[m][kk][0] = pack_bf16(x[m][2 * kk][0], x[m][2 * kk][1]);
      a[m][kk][1] = pack_bf16(x[m][2 * kk][2], x[m][2 * kk][3]);
      a[m][kk][2] = pack_bf16(x[m][2 * kk + 1][0], x[m][2 * kk + 1][1]);
      a[m][kk][3] = pack_bf16(x[m][2 * kk + 1][2], x[m][2 * kk + 1][3]);
    }
  }
}

// acc[m] (kM strips of 16 x N) += A[m] (16 x kK, packed A fragments) times B, B stored with rows = k
// (kK rows of tile_b, columns = n).
template <int kLd, int kK, int kN, int kM>
__device__ __forceinline__ void mma_packed_b(float (&acc)[kM][kN / 8][4], const uint32_t (&a)[kM][kK / 16][4],
                                             const nv_bf16* tile_b, int lane) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t b[4];
      load_b_kn<kLd>(b, tile_b, kk * 16, np * 16, lane);
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        mma_bf16(acc[m][2 * np], a[m][kk], b[0], b[1]);
        mma_bf16(acc[m][2 * np + 1], a[m][kk], b[2], b[3]);
      }
    }
  }
}

// acc[m] (kM strips of 16 x N) += X[m] (16 x kK, in registers as C fragments, rounded to bf16) times
// B, B stored with rows = k (kK rows of tile_b, columns = n).
template <int kLd, int kK, int kN, int kM>
__device__ __forceinline__ void mma_regs_b(float (&acc)[kM][kN / 8][4], const float (&x)[kM][kK / 8][4],
                                           const nv_bf16* tile_b, int lane) {
  uint32_t a[kM][kK / 16][4];
  pack_a<kM, kK>(a, x);
  mma_packed_b<kLd, kK, kN, kM>(acc, a, tile_b, lane);
}

// One-strip forms (the forward): a 16 x N accumulator is the kM = 1 case.
template <int kLd, int kK, int kN>
__device__ __forceinline__ void mma_strip_abt(float (&acc)[kN / 8][4], const nv_bf16* tile_a, int m0,
                                              const nv_bf16* tile_b, int lane) {
  mma_abt<kLd, kK, kN, 1>(reinterpret_cast<float(&)[1][kN / 8][4]>(acc), tile_a, m0, tile_b, lane);
}
template <int kLd, int kK, int kN>
__device__ __forceinline__ void mma_strip_regs_b(float (&acc)[kN / 8][4], const float (&x)[kK / 8][4],
                                                 const nv_bf16* tile_b, int lane) {
  mma_regs_b<kLd, kK, kN, 1>(reinterpret_cast<float(&)[1][kN / 8][4]>(acc),
                             reinterpret_cast<const float(&)[1][kK / 8][4]>(x), tile_b, lane);
}

// ---------------------------------------------------------------------------------------------
// Tile movement
// ---------------------------------------------------------------------------------------------

// Rows [0, R) x columns [0, HS) of a bf16 tile at g (row stride ld elements) into shared s (row
// stride HS + kPad), asynchronously; rows >= valid_rows are zero-filled (g itself must be a valid
// address: callers pass a tile's first row, which is < T). Called by all kThreads threads; the tile's
// 16-byte chunks go round the threads (a last partial round where they do not divide, e.g. HS 80).
template <int R, int HS, int kThreads>
__device__ __forceinline__ void load_tile_async(nv_bf16* s, const nv_bf16* g, int64_t ld, int valid_rows) {
  constexpr int kChunksPerRow = HS / 8, kChunks = R * kChunksPerRow;
  static_assert(HS % 16 == 0, "head sizes are multiples of 16 (whole mma k-slices)");
#pragma unroll
  for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
    const int c = static_cast<int>(threadIdx.x) + i * kThreads;
    if (kChunks % kThreads != 0 && c >= kChunks) break;
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const bool ok = r < valid_rows;
    cp_async_16(s + r * (HS + kPad) + col, ok ? g + r * ld + col : g, ok);
  }
}

// A warp's 16 x HS accumulator strip (C fragments) to global bf16 rows [0, rows) at g (row stride ld),
// row gid scaled by mul_lo and row gid + 8 by mul_hi. accumulate: g += result (old bf16 widened,
// fp32 add, one rounding); else g = result (g not read). Staged through the warp-private shared buffer `stage`
// (16 x (HS + 4) floats, 16-byte aligned) so that global accesses are 16 bytes per lane, coalesced.
template <int HS>
__device__ __forceinline__ void warp_store_strip(nv_bf16* g, int64_t ld, int rows, const float (&acc)[HS / 8][4],
                                                 float mul_lo, float mul_hi, float* stage, int lane, bool accumulate) {
  constexpr int kLdS = HS + 4;  // floats; the 4-float pad spreads rows over the banks
  const int gid = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int nt = 0; nt < HS / 8; ++nt) {
    *reinterpret_cast<float2*>(stage + gid * kLdS + nt * 8 + 2 * tig) =
        make_float2(acc[nt][0] * mul_lo, acc[nt][1] * mul_lo);
    *reinterpret_cast<float2*>(stage + (gid + 8) * kLdS + nt * 8 + 2 * tig) =
        make_float2(acc[nt][2] * mul_hi, acc[nt][3] * mul_hi);
  }
  __syncwarp();
  constexpr int kChunksPerRow = HS / 8;  // 8 bf16 = 16 bytes per chunk
  static_assert((16 * kChunksPerRow) % 32 == 0, "whole passes of the warp");
#pragma unroll
  for (int it = 0; it < 16 * kChunksPerRow / 32; ++it) {
    const int c = lane + 32 * it;
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    if (r < rows) {
      const float4 x0 = *reinterpret_cast<const float4*>(stage + r * kLdS + col);
      const float4 x1 = *reinterpret_cast<const float4*>(stage + r * kLdS + col + 4);
      float v[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
      uint4* dst = reinterpret_cast<uint4*>(g + r * ld + col);
      if (accumulate) {
        const uint4 old = *dst;
        const uint32_t w[4] = {old.x, old.y, old.z, old.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          v[2 * i] += bf16_lo(w[i]);
          v[2 * i + 1] += bf16_hi(w[i]);
        }
      }
      *dst = make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]), pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
    }
  }
  __syncwarp();
}


// ---------------------------------------------------------------------------------------------
// The forward's per-warp step (flash_fwd_kernel and paged_flash_kernel)
// ---------------------------------------------------------------------------------------------

constexpr int kFwdBc = 64;  // keys per tile: part of every forward row's arithmetic (the invariance contract)

// A warp's 16 query rows in the online softmax: O (C fragments, unnormalised), and for this thread's rows
// gid (lo) and gid + 8 (hi) the running max m of s2 = S scale log2(e) (quad-uniform) and the running sum
// l of exp2(s2 - m) over this thread's columns (quad-summed by fwd_strip_sums).
template <int HS>
struct FwdStrip {
  float o[HS / 8][4];
  float m_lo, m_hi, l_lo, l_hi;
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < HS / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    m_lo = m_hi = -INFINITY;
    l_lo = l_hi = 0.0f;
  }
};

// The online-softmax update of a strip by one key tile, in registers: s (the tile's S = Q K^T, C fragments
// of 16 x kFwdBc, from mma_strip_abt or the 16-key pieces below) becomes P = exp2(s2 - m) (fp32; the P V
// mma rounds it to bf16), m, l and O are updated. Keys above a row's position (row_lo, row_hi: this
// thread's two rows) are masked to -inf; diag: the tile may hold such keys for some row of the strip
// (false skips the compare, never changes a result). The first tile a strip sees must be key tile 0
// (every row has key 0 unmasked: m finite from then on).
template <int HS>
__device__ __forceinline__ void fwd_strip_softmax(FwdStrip<HS>& st, float (&s)[kFwdBc / 8][4], int k0, bool diag,
                                                  int row_lo, int row_hi, float scale_log2, int lane) {
  constexpr int kBc = kFwdBc;
  const int tig = lane & 3;
  float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
  for (int nt = 0; nt < kBc / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float v = __fmul_rn(s[nt][e], scale_log2);
      if (diag) {
        const int key = k0 + nt * 8 + 2 * tig + (e & 1), row = e < 2 ? row_lo : row_hi;
        if (key > row) v = -INFINITY;
      }
      s[nt][e] = v;
    }
    mx_lo = fmaxf(mx_lo, fmaxf(s[nt][0], s[nt][1]));
    mx_hi = fmaxf(mx_hi, fmaxf(s[nt][2], s[nt][3]));
  }
  // row max over the quad (the 4 lanes holding a row), then the online-softmax update
  mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
  mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
  mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
  mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
  const float mn_lo = fmaxf(st.m_lo, mx_lo), mn_hi = fmaxf(st.m_hi, mx_hi);
  const float alpha_lo = exp2f(__fsub_rn(st.m_lo, mn_lo)), alpha_hi = exp2f(__fsub_rn(st.m_hi, mn_hi));  // 0 at first
  st.m_lo = mn_lo;
  st.m_hi = mn_hi;
  float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
  for (int nt = 0; nt < kBc / 8; ++nt) {
    s[nt][0] = exp2f(__fsub_rn(s[nt][0], mn_lo));
    s[nt][1] = exp2f(__fsub_rn(s[nt][1], mn_lo));
    s[nt][2] = exp2f(__fsub_rn(s[nt][2], mn_hi));
    s[nt][3] = exp2f(__fsub_rn(s[nt][3], mn_hi));
    sum_lo = __fadd_rn(sum_lo, __fadd_rn(s[nt][0], s[nt][1]));
    sum_hi = __fadd_rn(sum_hi, __fadd_rn(s[nt][2], s[nt][3]));
  }
  st.l_lo = __fmaf_rn(st.l_lo, alpha_lo, sum_lo);
  st.l_hi = __fmaf_rn(st.l_hi, alpha_hi, sum_hi);
#pragma unroll
  for (int i = 0; i < HS / 8; ++i) {
    st.o[i][0] = __fmul_rn(st.o[i][0], alpha_lo);
    st.o[i][1] = __fmul_rn(st.o[i][1], alpha_lo);
    st.o[i][2] = __fmul_rn(st.o[i][2], alpha_hi);
    st.o[i][3] = __fmul_rn(st.o[i][3], alpha_hi);
  }
}

// Adds keys [k0, k0 + kFwdBc) to the strip whose Q rows are rows [m0, m0 + 16) of the shared tile sQ;
// tK, tV: the key tile's K and V rows (shared, row stride kLd; rows past the keys' end zero-filled).
// S = Q K^T, the softmax update, then O += P V (P rounded to bf16 as the A operand; l uses fp32 P).
template <int kLd, int HS>
__device__ __forceinline__ void fwd_strip_tile(FwdStrip<HS>& st, const nv_bf16* sQ, int m0, const nv_bf16* tK,
                                               const nv_bf16* tV, int k0, bool diag, int row_lo, int row_hi,
                                               float scale_log2, int lane) {
  constexpr int kBc = kFwdBc;
  float s[kBc / 8][4];
#pragma unroll
  for (int i = 0; i < kBc / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
  mma_strip_abt<kLd, HS, kBc>(s, sQ, m0, tK, lane);
  fwd_strip_softmax<HS>(st, s, k0, diag, row_lo, row_hi, scale_log2, lane);
  mma_strip_regs_b<kLd, kBc, HS>(st.o, s, tV, lane);
}

// The same tile in 16-key pieces (paged_attention.cu streams K and V through a small ring): each mma
// accumulator sees the same mma sequence as in fwd_strip_tile, so the results are bitwise its.
//   S piece i (keys 16 i .. 16 i + 15 of the tile, K rows at tK16, row stride kLd): s[2 i], s[2 i + 1]
//   over the contraction slices ks = 0 .. HS / 16 - 1 in order, from the strip's Q A fragments qa
//   (load_q_frags), as mma_abt's loops give each accumulator.
template <int kLd, int HS>
__device__ __forceinline__ void load_q_frags(uint32_t (&qa)[HS / 16][4], const nv_bf16* sQ, int m0, int lane) {
#pragma unroll
  for (int ks = 0; ks < HS / 16; ++ks) load_a<kLd>(qa[ks], sQ, m0, ks * 16, lane);
}
template <int kLd, int HS>
__device__ __forceinline__ void fwd_scores_piece(float (&s)[kFwdBc / 8][4], int i, const uint32_t (&qa)[HS / 16][4],
                                                 const nv_bf16* tK16, int lane) {
#pragma unroll
  for (int ks = 0; ks < HS / 16; ++ks) {
    uint32_t b[4];
    load_b_nk<kLd>(b, tK16, 0, ks * 16, lane);
    mma_bf16(s[2 * i], qa[ks], b[0], b[1]);
    mma_bf16(s[2 * i + 1], qa[ks], b[2], b[3]);
  }
}
//   O piece i (values of keys 16 i .. 16 i + 15, V rows at tV16): every o[2 np], o[2 np + 1] += P slice i
//   times V, np = 0 .. HS / 16 - 1, as mma_packed_b's loops give each accumulator for kk = i (pa: pack_a of P).
template <int kLd, int HS>
__device__ __forceinline__ void fwd_pv_piece(float (&o)[HS / 8][4], const uint32_t (&pa)[4], const nv_bf16* tV16,
                                             int lane) {
#pragma unroll
  for (int np = 0; np < HS / 16; ++np) {
    uint32_t b[4];
    load_b_kn<kLd>(b, tV16, 0, np * 16, lane);
    mma_bf16(o[2 * np], pa, b[0], b[1]);
    mma_bf16(o[2 * np + 1], pa, b[2], b[3]);
  }
}

// After the last tile: the full row sums over the quad (xor butterfly: the same bits in all 4 lanes).
template <int HS>
__device__ __forceinline__ void fwd_strip_sums(FwdStrip<HS>& st) {
  st.l_lo = __fadd_rn(st.l_lo, __shfl_xor_sync(0xffffffffu, st.l_lo, 1));
  st.l_lo = __fadd_rn(st.l_lo, __shfl_xor_sync(0xffffffffu, st.l_lo, 2));
  st.l_hi = __fadd_rn(st.l_hi, __shfl_xor_sync(0xffffffffu, st.l_hi, 1));
  st.l_hi = __fadd_rn(st.l_hi, __shfl_xor_sync(0xffffffffu, st.l_hi, 2));
}

// ln of a row's softmax denominator, as the forward stores it: (m + log2 l) ln 2.
__device__ __forceinline__ float fwd_lse(float m, float l) { return __fmul_rn(__fadd_rn(m, log2f(l)), kLn2); }

}  // namespace lmf::cuda::flash
