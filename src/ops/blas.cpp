// blas.cpp: blas_sgemm, lmforge's own CPU GEMM (packed register-blocked tiles, ops/gemm_tiles.h, in
// the best build the CPU runs: AVX-512, AVX2/FMA or portable), and blas_dgemm (OpenBLAS; references).
//
// C is cut into tiles; each tile packs its own rows of op(A) and columns of op(B) into the running
// thread's buffers. Small GEMMs, GEMMs called from inside a parallel_for chunk (attention's heads) and
// one thread: the calling thread, tile by tile; large GEMMs: tiles over the worker threads
// (parallel_for, core/parallel.h). The same bits either way: every element is one FMA chain over k
// (gemm_tiles.h), whatever the tiling, thread count, batch size or instruction set.
#include "ops/blas.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>

#include "core/check.h"
#include "core/parallel.h"
#include "ops/gemm_tiles.h"

namespace lmf {
namespace {

using blas_detail::GemmIsa;

// Set once at load time: OpenBLAS (blas_dgemm only) single-threaded.
const int kBlasThreadsPinned = (openblas_set_num_threads(1), 1);

// Below this many multiply-adds a GEMM runs on the calling thread, tile by tile.
constexpr double kParallelMinMacs = 1.0e6;
// A parallel GEMM is cut into tiles of C, each packing its own rows of op(A) and columns of op(B):
// at least kTilesPerThread per thread (so that a thread that starts late, or is descheduled, still
// shares the work), grown the cheaper way (see parallel_tiles). k longer than kKRange runs in ranges,
// one parallel loop each (the chains continue in C), so the A and B blocks a range's tiles re-read
// stay in cache.
constexpr int64_t kTilesPerThread = 3;
constexpr int64_t kKRange = 4096;

// This thread's packing buffers for the tile-by-tile path (static TLS: no allocation, ever).
struct alignas(64) PackBuffers {
  float a[kMcMax * kKc];
  float b[kKc * 32];
};
thread_local PackBuffers tls_pack;

const GemmIsa& isa_scalar() { return isa_of<Tiles<Scalar, 4, 4>>(); }

const GemmIsa& isa_of_kernels(BlasKernels k) {
  switch (k) {
    case BlasKernels::avx512: return blas_detail::gemm_isa_avx512();
    case BlasKernels::avx2: return blas_detail::gemm_isa_avx2();
    case BlasKernels::portable: return isa_scalar();
  }
  fail("blas: unknown kernels ", static_cast<int>(k));
}

BlasKernels best_kernels() {
  static const BlasKernels best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return BlasKernels::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return BlasKernels::avx2;
    return BlasKernels::portable;
  }();
  return best;
}

std::atomic<int> g_forced{-1};  // blas_use_kernels: -1 = the best

BlasKernels current_kernels() {
  const int f = g_forced.load(std::memory_order_relaxed);
  return f < 0 ? best_kernels() : static_cast<BlasKernels>(f);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The calling thread alone, tile by tile.
void gemm_tiles(const GemmArgs& g, const GemmIsa& isa, const BlasEpilogue* ep) {
  for (int64_t i0 = 0; i0 < g.M; i0 += kMcMax) {
    const int64_t i1 = std::min(g.M, i0 + kMcMax);
    isa.tile(g, i0, i1, 0, g.N, 0, g.K, tls_pack.a, tls_pack.b);
    if (ep) ep->fn(ep->ctx, i0, i1, 0, g.N);
  }
}

// The worker threads, tile by tile: tm x tn tiles. Each tile packs its op(A) rows and op(B) columns,
// so A is packed tn times and B tm times: starting from row tiles of kMcMax, each step adds the
// cheaper of one more column (M more rows of A to pack per k) or row of tiles (N more columns of B).
void gemm_parallel_tiles(const GemmArgs& g, const GemmIsa& isa, const BlasEpilogue* ep) {
  int64_t tm = ceil_div(g.M, kMcMax), tn = 1;
  const int64_t target = kTilesPerThread * cpu_threads();
  while (tm * tn < target) {
    const bool more_n = ceil_div(g.N, tn + 1) >= 2 * isa.nr, more_m = ceil_div(g.M, tm + 1) >= 4 * isa.mr;
    if (more_n && (g.M <= g.N || !more_m)) ++tn;
    else if (more_m) ++tm;
    else break;
  }
  const int64_t mc = ceil_div(ceil_div(g.M, tm), isa.mr) * isa.mr, nc = ceil_div(ceil_div(g.N, tn), isa.nr) * isa.nr;
  const int64_t rows = ceil_div(g.M, mc), cols = ceil_div(g.N, nc);
  for (int64_t pb = 0; pb < g.K; pb += kKRange) {
    const int64_t pe = std::min(g.K, pb + kKRange);
    parallel_for(rows * cols, 1, [&](int64_t t, int64_t) {
      const int64_t i0 = (t / cols) * mc, j0 = (t % cols) * nc;
      const int64_t i1 = std::min(g.M, i0 + mc), j1 = std::min(g.N, j0 + nc);
      isa.tile(g, i0, i1, j0, j1, pb, pe, tls_pack.a, tls_pack.b);
      if (ep && pe == g.K) ep->fn(ep->ctx, i0, i1, j0, j1);
    });
  }
}

}  // namespace

const char* blas_kernels_name(BlasKernels k) {
  switch (k) {
    case BlasKernels::avx512: return "avx512";
    case BlasKernels::avx2: return "avx2";
    case BlasKernels::portable: return "portable";
  }
  return "?";
}

BlasKernels blas_kernels() { return current_kernels(); }

void blas_use_kernels(std::optional<BlasKernels> k) {
  if (k) {
    const BlasKernels best = best_kernels();
    const bool runs = *k == BlasKernels::portable || (*k == BlasKernels::avx2 && best != BlasKernels::portable) ||
                      *k == best;
    LMF_CHECK(runs, "blas_use_kernels: this CPU does not run the ", blas_kernels_name(*k), " kernels (best: ",
              blas_kernels_name(best), ")");
  }
  g_forced.store(k ? static_cast<int>(*k) : -1, std::memory_order_relaxed);
}

void blas_sgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, float beta, float* C, int64_t ldc, const BlasEpilogue* epilogue) {
  if (M <= 0 || N <= 0) return;
  const GemmArgs g{ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc};
  const GemmIsa& isa = isa_of_kernels(current_kernels());
  const bool parallel = K > 0 && static_cast<double>(M) * N * K >= kParallelMinMacs && cpu_threads() > 1 &&
                        !in_parallel_for();
  if (parallel) gemm_parallel_tiles(g, isa, epilogue);
  else gemm_tiles(g, isa, epilogue);
}

void blas_dgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  (void)kBlasThreadsPinned;
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda,
              B, ldb, beta, C, ldc);
}

}  // namespace lmf
