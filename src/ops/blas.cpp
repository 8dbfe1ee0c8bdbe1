#include "ops/blas.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>

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
// run this plain loop instead (fixed k order, fp32 accumulation; deterministic).
constexpr double kSmallMaxMacs = 1.0e6;
constexpr int64_t kSmallMaxN = 32;

void small_sgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += (ta ? A[k * lda + i] : A[i * lda + k]) * (tb ? B[j * ldb + k] : B[k * ldb + j]);
      float& c = C[i * ldc + j];
      c = beta == 0.0f ? alpha * acc : alpha * acc + beta * c;
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
  const int nt = omp_in_parallel() ? 1 : omp_get_max_threads();
  // The blocks depend only on the shape, never on the thread count: OpenBLAS picks its kernels by
  // the block's size, so the same blocks give the same bits on 1 thread or 64.
  if (static_cast<double>(M) * N * K < kParallelMinFlops || (M < 2 * kRowBlock && N < 2 * kColBlock)) {
    cblas_sgemm(CblasRowMajor, opa, opb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  if (M >= 2 * kRowBlock) {
    // Row blocks of C: rows [r0, r1) of C need rows [r0, r1) of op(A).
    const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < blocks; ++i) {
      const int64_t r0 = i * kRowBlock, r1 = std::min(M, r0 + kRowBlock);
      const float* Ab = ta ? A + r0 : A + r0 * lda;
      cblas_sgemm(CblasRowMajor, opa, opb, r1 - r0, N, K, alpha, Ab, lda, B, ldb, beta, C + r0 * ldc, ldc);
    }
  } else {
    // Column blocks of C: columns [c0, c1) of C need columns [c0, c1) of op(B).
    const int64_t blocks = (N + kColBlock - 1) / kColBlock;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < blocks; ++i) {
      const int64_t c0 = i * kColBlock, c1 = std::min(N, c0 + kColBlock);
      const float* Bb = tb ? B + c0 * ldb : B + c0;
      cblas_sgemm(CblasRowMajor, opa, opb, M, c1 - c0, K, alpha, A, lda, Bb, ldb, beta, C + c0, ldc);
    }
  }
}

void blas_dgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  (void)kBlasThreadsPinned;
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda,
              B, ldb, beta, C, ldc);
}

}  // namespace lmf
