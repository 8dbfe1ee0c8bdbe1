#include "ops/blas.h"

#include <cblas.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "core/check.h"
#include "core/parallel.h"

namespace lmf {

namespace {

// Set once at load time: OpenBLAS single-threaded (see blas.h).
const int kBlasThreadsPinned = (openblas_set_num_threads(1), 1);

// Below this many multiply-adds a GEMM is one call.
constexpr double kParallelMinFlops = 2.0e6;
// Fixed block sizes of the parallel split (see blas_sgemm).
constexpr int64_t kRowBlock = 128, kColBlock = 256;

// OpenBLAS's small-matrix kernels (chosen for narrow C, N <= 32, up to ~1e6 multiply-adds on
// Skylake-X) allocate on some calls, and a planned training step must not allocate: those shapes
// run small_sgemm instead (one thread, no allocation, deterministic).
constexpr double kSmallMaxMacs = 1.0e6;
constexpr int64_t kSmallMaxN = 32;

// ---- small_sgemm: register-blocked AVX2/FMA GEMM on one thread -----------------------------------
// C is computed in tiles of kMr x kNr (6 x 16: twelve 8-float accumulators). Every element of C is
// one FMA chain over k = 0, 1, ..., K-1 in order, started from 0, then c = alpha acc (beta = 0) or
// fma(alpha, acc, beta c): its bits depend only on its own row of op(A), column of op(B) and K, never
// on the tiling, M, N or the thread count. op(B)'s columns are read straight from B's rows when B is
// not transposed; a transposed B is first packed, one strip of kNr columns at a time, into a (K, kNr)
// buffer on the stack, so K is limited to kPackMaxK there (larger shapes take the plain loop, same
// order). A last strip narrower than kNr uses masked loads and stores.
constexpr int kMr = 6, kNr = 16;
constexpr int64_t kPackMaxK = 512;

// Lane masks for the first n of 8 floats.
inline __m256i lane_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// C[0:MR, 0:nc] = alpha op(A)[0:MR, :] op(B)[:, 0:nc] (+ beta C). op(A)[r, k] = a[r * ars + k * aks];
// op(B)[k, 0:kNr] = b[k * bs, + kNr) (FULL: all 16 columns readable; else masked by m0, m1).
template <int MR, bool FULL>
void small_tile(int64_t K, const float* a, int64_t ars, int64_t aks, const float* b, int64_t bs, float alpha,
                float beta, float* c, int64_t ldc, __m256i m0, __m256i m1) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * bs;
    const __m256 b0 = FULL ? _mm256_loadu_ps(bk) : _mm256_maskload_ps(bk, m0);
    const __m256 b1 = FULL ? _mm256_loadu_ps(bk + 8) : _mm256_maskload_ps(bk + 8, m1);
    const float* ak = a + k * aks;
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(ak + r * ars);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    for (int h = 0; h < 2; ++h) {
      __m256 v = _mm256_mul_ps(va, acc[r][h]);
      const __m256i m = h == 0 ? m0 : m1;
      if (beta != 0.0f) {
        const __m256 old = FULL ? _mm256_loadu_ps(cr + 8 * h) : _mm256_maskload_ps(cr + 8 * h, m);
        v = _mm256_fmadd_ps(va, acc[r][h], _mm256_mul_ps(vb, old));
      }
      if (FULL) _mm256_storeu_ps(cr + 8 * h, v);
      else _mm256_maskstore_ps(cr + 8 * h, m, v);
    }
  }
}

template <bool FULL>
void small_tile_rows(int mr, int64_t K, const float* a, int64_t ars, int64_t aks, const float* b, int64_t bs,
                     float alpha, float beta, float* c, int64_t ldc, __m256i m0, __m256i m1) {
  switch (mr) {
    case 6: return small_tile<6, FULL>(K, a, ars, aks, b, bs, alpha, beta, c, ldc, m0, m1);
    case 5: return small_tile<5, FULL>(K, a, ars, aks, b, bs, alpha, beta, c, ldc, m0, m1);
    case 4: return small_tile<4, FULL>(K, a, ars, aks, b, bs, alpha, beta, c, ldc, m0, m1);
    case 3: return small_tile<3, FULL>(K, a, ars, aks, b, bs, alpha, beta, c, ldc, m0, m1);
    case 2: return small_tile<2, FULL>(K, a, ars, aks, b, bs, alpha, beta, c, ldc, m0, m1);
    case 1: return small_tile<1, FULL>(K, a, ars, aks, b, bs, alpha, beta, c, ldc, m0, m1);
    default: fail("small_sgemm: tile of ", mr, " rows (1 to ", kMr, ")");
  }
}

// The plain loop (same per-element order as small_tile), for a transposed B with K > kPackMaxK.
void plain_sgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k)
        acc = std::fma(ta ? A[k * lda + i] : A[i * lda + k], tb ? B[j * ldb + k] : B[k * ldb + j], acc);
      float& c = C[i * ldc + j];
      c = beta == 0.0f ? alpha * acc : std::fma(alpha, acc, beta * c);
    }
}

void small_sgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (tb && K > kPackMaxK) return plain_sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  const int64_t ars = ta ? 1 : lda, aks = ta ? lda : 1;
  alignas(32) float pack[kPackMaxK * kNr];  // 32 KiB; used only when tb
  for (int64_t j0 = 0; j0 < N; j0 += kNr) {
    const int nc = static_cast<int>(std::min<int64_t>(kNr, N - j0));
    const float* b = B + j0;
    int64_t bs = ldb;
    if (tb) {  // pack[k][jj] = B[j0 + jj, k] for jj < nc
      for (int64_t k = 0; k < K; ++k)
        for (int jj = 0; jj < nc; ++jj) pack[k * kNr + jj] = B[(j0 + jj) * ldb + k];
      b = pack;
      bs = kNr;
    }
    const __m256i m0 = lane_mask(std::min(nc, 8)), m1 = lane_mask(std::max(nc - 8, 0));
    for (int64_t i0 = 0; i0 < M; i0 += kMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kMr, M - i0));
      const float* a = A + i0 * ars;
      float* c = C + i0 * ldc + j0;
      if (nc == kNr) small_tile_rows<true>(mr, K, a, ars, aks, b, bs, alpha, beta, c, ldc, m0, m1);
      else small_tile_rows<false>(mr, K, a, ars, aks, b, bs, alpha, beta, c, ldc, m0, m1);
    }
  }
}

}  // namespace

void blas_sgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  (void)kBlasThreadsPinned;
  if (M <= 0 || N <= 0) return;
  const CBLAS_TRANSPOSE opa = ta ? CblasTrans : CblasNoTrans, opb = tb ? CblasTrans : CblasNoTrans;
  if (N <= kSmallMaxN && static_cast<double>(M) * N * K <= kSmallMaxMacs) {
    small_sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  // The blocks depend only on the shape, never on the thread count: OpenBLAS picks its kernels by
  // the block's size, so the same blocks give the same bits on 1 thread or 64.
  if (static_cast<double>(M) * N * K < kParallelMinFlops || (M < 2 * kRowBlock && N < 2 * kColBlock)) {
    cblas_sgemm(CblasRowMajor, opa, opb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  if (M >= 2 * kRowBlock) {
    // Row blocks of C: rows [r0, r1) of C need rows [r0, r1) of op(A).
    parallel_for(M, kRowBlock, [&](int64_t r0, int64_t r1) {
      const float* Ab = ta ? A + r0 : A + r0 * lda;
      cblas_sgemm(CblasRowMajor, opa, opb, r1 - r0, N, K, alpha, Ab, lda, B, ldb, beta, C + r0 * ldc, ldc);
    });
  } else {
    // Column blocks of C: columns [c0, c1) of C need columns [c0, c1) of op(B).
    parallel_for(N, kColBlock, [&](int64_t c0, int64_t c1) {
      const float* Bb = tb ? B + c0 * ldb : B + c0;
      cblas_sgemm(CblasRowMajor, opa, opb, M, c1 - c0, K, alpha, A, lda, Bb, ldb, beta, C + c0, ldc);
    });
  }
}

void blas_dgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  (void)kBlasThreadsPinned;
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda,
              B, ldb, beta, C, ldc);
}

}  // namespace lmf
