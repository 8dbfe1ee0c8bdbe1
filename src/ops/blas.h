// blas.h: the one place lmforge does GEMMs on the CPU.
//
// blas_sgemm is lmforge's own GEMM (blas.cpp, ops/gemm_tiles.h): packed, register-blocked tiles in
// three builds, AVX-512, AVX2/FMA and portable, of which the best the CPU runs is picked at run
// time; large GEMMs are cut into tiles of C over the worker threads (parallel_for, core/parallel.h),
// and a call from inside a parallel_for chunk (e.g. attention's per-head loop) runs on the calling
// thread. It allocates nothing (packing buffers are per-thread static storage).
//
// Bitwise contract: every element of C is ONE fused multiply-add chain over k = 0, 1, ..., K-1,
//   acc = beta * c (acc = 0 when beta == 0; C is then never read), acc = fma(alpha * a_ik, b_kj, acc)
// so its bits depend only on its own row of op(A), column of op(B), K, alpha and beta: not on M or
// N (batch-invariant), the tiling, the thread count or the instruction set. (OpenBLAS, used before,
// gave the same bits only for fixed blocks, and allocated in its small-matrix kernels.)
// blas_dgemm stays on OpenBLAS (single-threaded): fp64 references in tests and tools.
#pragma once
#include <cstdint>
#include <optional>

namespace lmf {

// A step run on each finished tile of C, rows [i0, i1) x columns [j0, j1), while the tile is still in
// cache (e.g. linear's bias add: one pass over C fewer). It may touch only that tile of C, and runs
// on whichever thread computed the tile.
struct BlasEpilogue {
  void (*fn)(void* ctx, int64_t i0, int64_t i1, int64_t j0, int64_t j1);
  void* ctx;
};

// Row-major C (M, N) = alpha * op(A) op(B) + beta * C, with op(X) = X or X^T as cblas_sgemm; then the
// epilogue, if any, on every tile of C.
void blas_sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc,
                const BlasEpilogue* epilogue = nullptr);

// Row-major C (M, N) double precision (reference computations in tests/tools only).
void blas_dgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
                int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

// The builds of blas_sgemm's tiles (all give the same bits).
enum class BlasKernels { portable, avx2, avx512 };
const char* blas_kernels_name(BlasKernels k);  // "portable", "avx2", "avx512"
// The build blas_sgemm uses now: the best this CPU runs, unless blas_use_kernels said otherwise.
BlasKernels blas_kernels();
// For tests: use build k (it must run on this CPU, else an error), or the best again (nullopt).
void blas_use_kernels(std::optional<BlasKernels> k);

}  // namespace lmf
