// blas.cpp: blas_sgemm, lmforge's own CPU GEMM (packed register-blocked tiles, ops/gemm_tiles.h, in
// the best build the CPU runs: AVX-512, AVX2/FMA or portable), and blas_dgemm (OpenBLAS; references).
//
// Two paths, the same bits (every element is one FMA chain over k, gemm_tiles.h, whatever the
// tiling, thread count, batch size or instruction set):
// - small GEMMs, GEMMs called from inside a parallel_for chunk (attention's heads) and one thread:
//   the calling thread, tile by tile, packing into its own buffers;
// - large GEMMs: the worker threads (parallel_for, core/parallel.h) share packed panels of op(A) and
//   op(B) for each k block (BLIS's loop order), so each element of A and B is packed once per panel
//   however many threads compute from it.
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
// A parallel GEMM packs op(A) and op(B) into shared panels of at most kPanelRows x kPanelK and
// kPanelK x kPanelCols (every thread then reads the same packed data, in k blocks of kKc), then
// computes chunks of kRowGroup rows x one B sliver over the whole panel's k. kPanelRows and kRowGroup
// are multiples of every build's mr, kPanelCols of every nr, kPanelK of kKc.
constexpr int64_t kPanelRows = 768, kPanelCols = 2048, kPanelK = 1024, kRowGroup = 192;

// This thread's packing buffers for the tile-by-tile path (static TLS: no allocation, ever).
struct alignas(64) PackBuffers {
  float a[kMcMax * kKc];
  float b[kKc * 32];
};
thread_local PackBuffers tls_pack;

// The shared panels of the parallel path: one GEMM at a time (a second caller, or a GEMM called from
// inside a parallel_for chunk, takes the tile-by-tile path; same bits).
struct alignas(64) Panels {
  float a[kPanelRows * kPanelK];  // per k block: mr-row slivers of [kc][mr]
  float b[kPanelK * kPanelCols];  // per k block: nr-column slivers of [kc][nr]
};
Panels g_panels;
std::atomic<bool> g_panels_busy{false};

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
void gemm_tiles(const GemmArgs& g, const GemmIsa& isa) {
  for (int64_t i0 = 0; i0 < g.M; i0 += kMcMax)
    isa.tile(g, i0, std::min(g.M, i0 + kMcMax), 0, g.N, 0, g.K, tls_pack.a, tls_pack.b);
}

// The worker threads, through the shared panels: per panel of rows x columns x k, one parallel loop
// packs (one A or B sliver of one k block per chunk), the next computes (kRowGroup rows x one B sliver
// per chunk, over every k block of the panel: the chunk's C stays in cache between k blocks).
void gemm_panels(const GemmArgs& g, const GemmIsa& isa, Panels& p) {
  for (int64_t jc = 0; jc < g.N; jc += kPanelCols) {
    const int64_t jn = std::min(g.N, jc + kPanelCols), b_slivers = ceil_div(jn - jc, isa.nr);
    for (int64_t ic = 0; ic < g.M; ic += kPanelRows) {
      const int64_t in = std::min(g.M, ic + kPanelRows), a_slivers = ceil_div(in - ic, isa.mr);
      const int64_t groups = ceil_div(in - ic, kRowGroup);
      for (int64_t pk = 0; pk < g.K; pk += kPanelK) {
        const int64_t blocks = ceil_div(std::min(kPanelK, g.K - pk), kKc);
        // Block b of the panel: k in [pk + b kKc, + kc), its A slivers at a_at(b), B slivers at b_at(b).
        auto kc_of = [&](int64_t b) { return std::min(kKc, g.K - pk - b * kKc); };
        auto a_at = [&](int64_t b) { return p.a + b * a_slivers * isa.mr * kKc; };
        auto b_at = [&](int64_t b) { return p.b + b * b_slivers * isa.nr * kKc; };
        parallel_for(blocks * (a_slivers + b_slivers), 1, [&](int64_t t, int64_t) {
          const int64_t b = t / (a_slivers + b_slivers), u = t % (a_slivers + b_slivers);
          const int64_t p0 = pk + b * kKc, kc = kc_of(b);
          if (u < a_slivers) {
            const int64_t i0 = ic + u * isa.mr;
            isa.pack_a(g, i0, std::min(in, i0 + isa.mr), p0, kc, a_at(b) + u * isa.mr * kc);
          } else {
            const int64_t s = u - a_slivers, j = jc + s * isa.nr;
            isa.pack_b(g, j, static_cast<int>(std::min<int64_t>(isa.nr, jn - j)), p0, kc, b_at(b) + s * isa.nr * kc);
          }
        });
        parallel_for(groups * b_slivers, 1, [&](int64_t t, int64_t) {  // row-group-major: A stays in L2
          const int64_t r0 = ic + (t / b_slivers) * kRowGroup, s = t % b_slivers, j = jc + s * isa.nr;
          const int nc = static_cast<int>(std::min<int64_t>(isa.nr, jn - j));
          for (int64_t b = 0; b < blocks; ++b) {
            const int64_t kc = kc_of(b);
            isa.column(g, r0, std::min(in, r0 + kRowGroup), j, nc, pk + b * kKc, kc, a_at(b) + (r0 - ic) * kc,
                       b_at(b) + s * isa.nr * kc);
          }
        });
      }
    }
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
                const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  const GemmArgs g{ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc};
  const GemmIsa& isa = isa_of_kernels(current_kernels());
  const bool parallel = K > 0 && static_cast<double>(M) * N * K >= kParallelMinMacs && cpu_threads() > 1 &&
                        !in_parallel_for();
  if (!parallel || g_panels_busy.exchange(true, std::memory_order_acquire)) {
    gemm_tiles(g, isa);
    return;
  }
  gemm_panels(g, isa, g_panels);
  g_panels_busy.store(false, std::memory_order_release);
}

void blas_dgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  (void)kBlasThreadsPinned;
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda,
              B, ldb, beta, C, ldc);
}

}  // namespace lmf
