// blas.h: the one place lmforge calls BLAS (CPU).
//
// OpenBLAS runs single-threaded: its threaded GEMM allocates a job table on every call (an
// allocation inside the step) and its thread pool competes with lmforge's. lmforge parallelises a
// large GEMM itself by splitting C into row blocks (or column blocks when C has few rows), one
// single-threaded sgemm per block, over the worker threads (parallel_for, core/parallel.h). The
// blocks are fixed sizes that depend only on the shape, so results are bitwise the same for any
// number of threads. Inside a parallel_for chunk (e.g. attention's per-head loop) the call runs on
// the calling thread.
// Narrow shapes (N <= 32, up to 1e6 multiply-adds: attention's P V and its gradients at head sizes up
// to 32, small MoE experts) do not go to OpenBLAS (whose small-matrix kernels allocate) but to
// lmforge's own register-blocked AVX2/FMA tiles (blas.cpp), where every element of C is one FMA chain
// over k in order: its bits depend on nothing but its own row, column and K.
#pragma once
#include <cstdint>

namespace lmf {

// Row-major C (M, N) = alpha * op(A) op(B) + beta * C, with op(X) = X or X^T as cblas_sgemm.
void blas_sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// Row-major C (M, N) double precision (reference computations in tests/tools only).
void blas_dgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
                int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

}  // namespace lmf
