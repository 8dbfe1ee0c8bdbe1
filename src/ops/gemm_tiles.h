// gemm_tiles.h: the CPU GEMM's packed, register-blocked tiles (internal to blas*.cpp; not an API).
// Included once per instruction set, each build in its own translation unit with its own flags:
// blas.cpp (portable scalar tiles, any x86-64), blas_avx2.cpp (-mavx2 -mfma), blas_avx512.cpp
// (-mavx512f); blas.cpp picks one at run time from the CPU's features. The templates have internal
// linkage (anonymous namespace), so code built for one instruction set never stands in for another's.
//
// One tile of C: rows [i0, i1), columns [j0, j1), k range [p0, p1) of
//   C (M, N) = alpha op(A) op(B) + beta C          (row-major, op(X) = X or X^T as cblas_sgemm)
// The k range is cut into blocks of kKc. For each block op(A)'s rows are packed (times alpha) into
// slivers of MR rows, k-major ([k][MR], zero rows past the tile), and op(B)'s columns into one sliver
// of NR columns at a time ([k][NR], zero columns past the tile); a micro-kernel keeps an MR x NR
// block of C in MR * NR / W vector registers over the whole k block.
//
// The bitwise contract (blas.h): every element of C is ONE fused multiply-add chain over k in
// increasing order, acc = fma(alpha * a_ik, b_kj, acc), started from beta * c (or from 0 when beta
// is 0, where C is never read). Between k blocks the running value is kept in C itself (a float, as
// in the register), so neither the k blocking, nor the tile sizes, nor M and N, nor the vector width
// (AVX2 or AVX-512) change any bit: the result depends only on the element's own row of op(A),
// column of op(B), K, alpha and beta.
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace lmf {
namespace blas_detail {

// The arguments of one GEMM (row-major, cblas_sgemm's meaning). Plain data, shared by both builds.
struct GemmArgs {
  bool ta, tb;
  int64_t M, N, K;
  float alpha;
  const float* A;
  int64_t lda;
  const float* B;
  int64_t ldb;
  float beta;
  float* C;
  int64_t ldc;
};

// One build's entry point (Tiles::tile below, mr x nr micro-tiles): C[i0:i1, j0:j1] over k in
// [pb, pe) with the running thread's buffers (abuf: kMcMax x kKc floats, bbuf: kKc x 32 floats).
struct GemmIsa {
  int mr, nr;
  void (*tile)(const GemmArgs& g, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t pb, int64_t pe, float* abuf,
               float* bbuf);
};
const GemmIsa& gemm_isa_avx2();    // blas_avx2.cpp
const GemmIsa& gemm_isa_avx512();  // blas_avx512.cpp

}  // namespace blas_detail

namespace {

using blas_detail::GemmArgs;

// k per packed block: an MR x kKc A sliver (12 KiB at MR = 12) streams from L2 while a kKc x NR B
// sliver (32 KiB at NR = 32) stays in L1.
constexpr int64_t kKc = 256;
// Rows of C per tile at most: the packed A block of one k block is kMcMax x kKc floats (264 KiB).
constexpr int64_t kMcMax = 264;

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// How a micro-kernel starts its accumulators: 0, beta * C (the first k block), or C (a later block).
enum class AccInit { zero, beta_c, c };

// V: the vector type's operations (Avx2 / Avx512 below); MR rows by NV vectors of W floats.
template <class V, int MR, int NV>
struct Tiles {
  static constexpr int W = V::kWidth, NR = NV * W, kMr = MR;

  // dst[s][k][r] = alpha op(A)[i0 + s MR + r, p0 + k] for r < rows left, else 0; k < kc.
  static void pack_a(const GemmArgs& g, int64_t i0, int64_t i1, int64_t p0, int64_t kc, float* dst) {
    if (g.ta) {  // op(A)[i, k] = A[k, i]: row k of A holds every sliver's values for k, read once
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = g.A + (p0 + k) * g.lda;
        float* d = dst + k * MR;
        for (int64_t s0 = i0; s0 < i1; s0 += MR, d += MR * kc) {
          const int mr = static_cast<int>(imin(MR, i1 - s0));
          for (int r = 0; r < mr; ++r) d[r] = g.alpha * src[s0 + r];
          for (int r = mr; r < MR; ++r) d[r] = 0.0f;
        }
      }
      return;
    }
    for (int64_t s0 = i0; s0 < i1; s0 += MR) {
      const int mr = static_cast<int>(imin(MR, i1 - s0));
      {  // op(A)[i, k] = A[i, k]: rows contiguous in k, transposed W k's at a time
        const float* src = g.A + s0 * g.lda + p0;
        int64_t k = 0;
        if constexpr (MR <= W)
          for (; k + W <= kc; k += W) V::transpose(src + k, g.lda, mr, g.alpha, dst + k * MR, MR, MR);
        for (; k < kc; ++k)
          for (int r = 0; r < MR; ++r) dst[k * MR + r] = r < mr ? g.alpha * src[r * g.lda + k] : 0.0f;
      }
      dst += MR * kc;
    }
  }

  // dst[k][c] = op(B)[p0 + k, j + c] for c < nc, else 0; k < kc.
  static void pack_b(const GemmArgs& g, int64_t j, int nc, int64_t p0, int64_t kc, float* dst) {
    if (g.tb) {  // op(B)[k, j] = B[j, k]: columns contiguous in k, transposed W x W at a time
      const float* src = g.B + j * g.ldb + p0;
      for (int cb = 0; cb < NR; cb += W) {
        const int valid = nc - cb < 0 ? 0 : nc - cb < W ? nc - cb : W;
        int64_t k = 0;
        for (; k + W <= kc; k += W) V::transpose(src + cb * g.ldb + k, g.ldb, valid, 1.0f, dst + k * NR + cb, NR, W);
        for (; k < kc; ++k)
          for (int c = cb; c < cb + W; ++c) dst[k * NR + c] = c < nc ? src[c * g.ldb + k] : 0.0f;
      }
    } else {  // op(B)[k, j] = B[k, j]: each k holds the sliver's columns contiguously
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = g.B + (p0 + k) * g.ldb + j;
        float* d = dst + k * NR;
        if (nc == NR) {
          for (int v = 0; v < NV; ++v) V::store(d + v * W, V::load(src + v * W));
        } else {
          for (int c = 0; c < nc; ++c) d[c] = src[c];
          for (int c = nc; c < NR; ++c) d[c] = 0.0f;
        }
      }
    }
  }

  // C[0:mr, 0:nc] (leading dimension ldc) gets the chain over the kc packed k's of ap ([k][MR]) and
  // bp ([k][NR]), started as `init` says.
  // How the micro-kernel reads op(A): packed ([k][MR]), or in place with alpha 1 (the same products)
  // for a full sliver of MR rows: rows (op(A) = A, row r at ap + r lda) or columns (op(A) = A^T, k at
  // ap + k lda).
  enum class ARead { packed, rows, cols };

  template <ARead kA = ARead::packed>
  static void micro(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, int mr, int nc,
                    AccInit init, float beta, int64_t lda = 0) {
    const float* arow[MR];
    if constexpr (kA == ARead::rows)
      for (int r = 0; r < MR; ++r) arow[r] = ap + r * lda;
    typename V::Reg acc[MR][NV];
    typename V::Mask mask[NV];
    for (int v = 0; v < NV; ++v) mask[v] = V::mask_first(nc - v * W);
    const bool full = nc == NR;
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) {
        if (init == AccInit::zero || r >= mr) {
          acc[r][v] = V::zero();
        } else {
          const float* cr = c + r * ldc + v * W;
          const typename V::Reg old = full ? V::load(cr) : V::load_masked(cr, mask[v]);
          acc[r][v] = init == AccInit::c ? old : V::mul(V::set1(beta), old);
        }
      }
    for (int64_t k = 0; k < kc; ++k) {
      typename V::Reg b[NV];
      for (int v = 0; v < NV; ++v) b[v] = V::load(bp + k * NR + v * W);
      for (int r = 0; r < MR; ++r) {
        const float av = kA == ARead::rows ? arow[r][k] : kA == ARead::cols ? ap[k * lda + r] : ap[k * MR + r];
        const typename V::Reg a = V::set1(av);
        for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(a, b[v], acc[r][v]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      if (r >= mr) break;
      for (int v = 0; v < NV; ++v) {
        float* cr = c + r * ldc + v * W;
        if (full) V::store(cr, acc[r][v]);
        else V::store_masked(cr, mask[v], acc[r][v]);
      }
    }
  }

  // Asks for the next micro-tile of C (rows of NR floats) while this one computes.
  static void prefetch_c(const float* c, int64_t ldc, int rows) {
    for (int r = 0; r < rows; ++r)
      for (int off = 0; off < NR; off += 16) __builtin_prefetch(c + r * ldc + off, 1);
  }

  // The tile C[i0:i1, j0:j1] over k in [pb, pe) (i1 - i0 <= kMcMax; pb > 0 continues the chains
  // that earlier k ranges left in C). abuf: kMcMax x kKc floats, bbuf: kKc x NR floats (this thread's).
  static void tile(const GemmArgs& g, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t pb, int64_t pe,
                   float* abuf, float* bbuf) {
    if (g.K == 0) {  // no k: C = beta C (0 when beta is 0)
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) g.C[i * g.ldc + j] = g.beta == 0.0f ? 0.0f : g.beta * g.C[i * g.ldc + j];
      return;
    }
    // op(A) with alpha 1 and at most two B slivers is read in place: each element of A then meets at
    // most 2 NR columns of B (attention's P V, dV, dQ, dK at head sizes up to 64), and packing it cost
    // as much as the products; wider C reuses the packed A across its slivers.
    const bool direct_a = g.alpha == 1.0f && j1 - j0 <= 2 * NR;
    for (int64_t p0 = pb; p0 < pe; p0 += kKc) {
      const int64_t kc = imin(kKc, pe - p0);
      if (!direct_a) pack_a(g, i0, i1, p0, kc, abuf);
      for (int64_t j = j0; j < j1; j += NR) {
        const int nc = static_cast<int>(imin(NR, j1 - j));
        pack_b(g, j, nc, p0, kc, bbuf);
        if (!direct_a) {
          column(g, i0, i1, j, nc, p0, kc, abuf, bbuf);
          continue;
        }
        const AccInit init = p0 > 0 ? AccInit::c : g.beta == 0.0f ? AccInit::zero : AccInit::beta_c;
        for (int64_t s0 = i0; s0 < i1; s0 += MR) {
          const int mr = static_cast<int>(imin(MR, i1 - s0));
          float* c = g.C + s0 * g.ldc + j;
          if (mr < MR) {  // the last, partial sliver: packed (zero rows past mr)
            pack_a(g, s0, i1, p0, kc, abuf);
            micro(kc, abuf, bbuf, c, g.ldc, mr, nc, init, g.beta);
          } else if (g.ta) {
            micro<ARead::cols>(kc, g.A + p0 * g.lda + s0, bbuf, c, g.ldc, mr, nc, init, g.beta, g.lda);
          } else {
            micro<ARead::rows>(kc, g.A + s0 * g.lda + p0, bbuf, c, g.ldc, mr, nc, init, g.beta, g.lda);
          }
        }
      }
    }
  }

  // C[i0:i1, j:j+nc] over the packed k block [p0, p0 + kc): apanel holds op(A)'s rows [i0, i1) in MR
  // slivers (pack_a), bsliver the NR columns from j (pack_b).
  static void column(const GemmArgs& g, int64_t i0, int64_t i1, int64_t j, int nc, int64_t p0, int64_t kc,
                     const float* apanel, const float* bsliver) {
    const AccInit init = p0 > 0 ? AccInit::c : g.beta == 0.0f ? AccInit::zero : AccInit::beta_c;
    const float* ap = apanel;
    for (int64_t s0 = i0; s0 < i1; s0 += MR, ap += MR * kc) {
      if (s0 + MR < i1) prefetch_c(g.C + (s0 + MR) * g.ldc + j, g.ldc, static_cast<int>(imin(MR, i1 - s0 - MR)));
      micro(kc, ap, bsliver, g.C + s0 * g.ldc + j, g.ldc, static_cast<int>(imin(MR, i1 - s0)), nc, init, g.beta);
    }
  }
};

// The build's entry point (GemmIsa above).
template <class T>
const blas_detail::GemmIsa& isa_of() {
  static const blas_detail::GemmIsa isa{T::kMr, T::NR, &T::tile};
  return isa;
}

#ifdef __AVX512F__
struct Avx512 {
  static constexpr int kWidth = 16;
  using Reg = __m512;
  using Mask = __mmask16;
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg set1(float x) { return _mm512_set1_ps(x); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Reg x) { _mm512_storeu_ps(p, x); }
  static Mask mask_first(int n) {
    return n >= 16 ? static_cast<Mask>(0xffff) : n <= 0 ? static_cast<Mask>(0) : static_cast<Mask>((1u << n) - 1);
  }
  static Reg load_masked(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store_masked(float* p, Mask m, Reg x) { _mm512_mask_storeu_ps(p, m, x); }
  static Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  // dst[kk * ldd + i] = scale * src[i * lds + kk] for kk < 16 and i < cols (<= 16); source rows
  // i >= rows are read as 0 (never loaded).
  static void transpose(const float* src, int64_t lds, int rows, float scale, float* dst, int64_t ldd, int cols) {
    Reg r[16], t[16];
    const Reg sc = set1(scale);
    for (int i = 0; i < 16; ++i) r[i] = i < rows ? mul(sc, load(src + i * lds)) : zero();
    for (int a = 0; a < 8; ++a) {  // pairs of rows, 32-bit interleave
      t[2 * a] = _mm512_unpacklo_ps(r[2 * a], r[2 * a + 1]);
      t[2 * a + 1] = _mm512_unpackhi_ps(r[2 * a], r[2 * a + 1]);
    }
    for (int b = 0; b < 4; ++b) {  // fours of rows, 64-bit interleave: u[4b + c] lane L = column 4L + c
      auto pd = [](Reg x) { return _mm512_castps_pd(x); };
      r[4 * b + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * b]), pd(t[4 * b + 2])));
      r[4 * b + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * b]), pd(t[4 * b + 2])));
      r[4 * b + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * b + 1]), pd(t[4 * b + 3])));
      r[4 * b + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * b + 1]), pd(t[4 * b + 3])));
    }
    for (int c = 0; c < 4; ++c) {  // 128-bit lanes: column 4L + c gathers lane L of r[c], r[4+c], r[8+c], r[12+c]
      const Reg x = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), y = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
      const Reg x2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88), y2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
      t[c] = _mm512_shuffle_f32x4(x, x2, 0x88);
      t[8 + c] = _mm512_shuffle_f32x4(x, x2, 0xdd);
      t[4 + c] = _mm512_shuffle_f32x4(y, y2, 0x88);
      t[12 + c] = _mm512_shuffle_f32x4(y, y2, 0xdd);
    }
    const Mask m = mask_first(cols);
    for (int kk = 0; kk < 16; ++kk) {
      if (cols == 16) store(dst + kk * ldd, t[kk]);
      else store_masked(dst + kk * ldd, m, t[kk]);
    }
  }
};
#endif

#if defined(__AVX2__) && defined(__FMA__)
struct Avx2 {
  static constexpr int kWidth = 8;
  using Reg = __m256;
  using Mask = __m256i;
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg set1(float x) { return _mm256_set1_ps(x); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Reg x) { _mm256_storeu_ps(p, x); }
  static Mask mask_first(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Reg load_masked(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static void store_masked(float* p, Mask m, Reg x) { _mm256_maskstore_ps(p, m, x); }
  static Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  // dst[kk * ldd + i] = scale * src[i * lds + kk] for kk < 8 and i < cols (<= 8); source rows
  // i >= rows are read as 0 (never loaded).
  static void transpose(const float* src, int64_t lds, int rows, float scale, float* dst, int64_t ldd, int cols) {
    Reg r[8], t[8];
    const Reg sc = set1(scale);
    for (int i = 0; i < 8; ++i) r[i] = i < rows ? mul(sc, load(src + i * lds)) : zero();
    for (int a = 0; a < 4; ++a) {
      t[2 * a] = _mm256_unpacklo_ps(r[2 * a], r[2 * a + 1]);
      t[2 * a + 1] = _mm256_unpackhi_ps(r[2 * a], r[2 * a + 1]);
    }
    for (int b = 0; b < 2; ++b) {  // u[4b + c] lane L = column 4L + c of rows 4b..4b+3
      auto pd = [](Reg x) { return _mm256_castps_pd(x); };
      r[4 * b + 0] = _mm256_castpd_ps(_mm256_unpacklo_pd(pd(t[4 * b]), pd(t[4 * b + 2])));
      r[4 * b + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(pd(t[4 * b]), pd(t[4 * b + 2])));
      r[4 * b + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(pd(t[4 * b + 1]), pd(t[4 * b + 3])));
      r[4 * b + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(pd(t[4 * b + 1]), pd(t[4 * b + 3])));
    }
    for (int c = 0; c < 4; ++c) {
      t[c] = _mm256_permute2f128_ps(r[c], r[4 + c], 0x20);
      t[4 + c] = _mm256_permute2f128_ps(r[c], r[4 + c], 0x31);
    }
    const Mask m = mask_first(cols);
    for (int kk = 0; kk < 8; ++kk) {
      if (cols == 8) store(dst + kk * ldd, t[kk]);
      else store_masked(dst + kk * ldd, m, t[kk]);
    }
  }
};
#endif

// One float per "vector": the portable build (std::fma rounds once, as the vector FMAs do).
struct Scalar {
  static constexpr int kWidth = 1;
  using Reg = float;
  using Mask = bool;
  static Reg zero() { return 0.0f; }
  static Reg set1(float x) { return x; }
  static Reg load(const float* p) { return *p; }
  static void store(float* p, Reg x) { *p = x; }
  static Mask mask_first(int n) { return n >= 1; }
  static Reg load_masked(const float* p, Mask m) { return m ? *p : 0.0f; }
  static void store_masked(float* p, Mask m, Reg x) {
    if (m) *p = x;
  }
  static Reg mul(Reg a, Reg b) { return a * b; }
  static Reg fmadd(Reg a, Reg b, Reg c) { return std::fma(a, b, c); }
  static void transpose(const float* src, int64_t, int rows, float scale, float* dst, int64_t, int cols) {
    if (cols >= 1) *dst = rows >= 1 ? scale * *src : 0.0f;
  }
};

}  // namespace
}  // namespace lmf
