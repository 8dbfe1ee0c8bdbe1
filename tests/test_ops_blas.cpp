// test_ops_blas.cpp: blas_sgemm (ops/blas.h), the CPU GEMM under linear, attention, cross-entropy
// and MoE, against a float64 reference on every transpose pair, awkward sizes (tails of the 12 x 32,
// 6 x 16 and 4 x 4 tiles, one row, one column, K = 1), leading dimensions larger than the matrix,
// alpha/beta, NaN in C with beta = 0; the bitwise contract (each element one FMA chain over k in
// order) in every build of the tiles the CPU runs; and the same bits for 1 and 3 threads.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "ops/blas.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::randn;

struct Case {
  bool ta, tb;
  int64_t M, N, K;
  float alpha, beta;
  std::string str() const {
    return std::string("ta=") + (ta ? "1" : "0") + " tb=" + (tb ? "1" : "0") + " M=" + std::to_string(M) +
           " N=" + std::to_string(N) + " K=" + std::to_string(K) + " alpha=" + std::to_string(alpha) +
           " beta=" + std::to_string(beta);
  }
};

// Operands with padded leading dimensions (pad columns hold garbage that must never be read into C).
struct Operands {
  int64_t lda, ldb, ldc;
  std::vector<float> A, B, C;
};

Operands make_operands(const Case& c, uint64_t seed) {
  Operands o;
  const int64_t ar = c.ta ? c.K : c.M, ac = c.ta ? c.M : c.K;  // stored shape of A
  const int64_t br = c.tb ? c.N : c.K, bc = c.tb ? c.K : c.N;  // stored shape of B
  o.lda = ac + 3;
  o.ldb = bc + 5;
  o.ldc = c.N + 2;
  o.A = randn(static_cast<size_t>(ar * o.lda), seed);
  o.B = randn(static_cast<size_t>(br * o.ldb), seed + 1);
  o.C = randn(static_cast<size_t>(c.M * o.ldc), seed + 2);
  return o;
}

float op_a(const Case& c, const Operands& o, int64_t i, int64_t k) { return c.ta ? o.A[k * o.lda + i] : o.A[i * o.lda + k]; }
float op_b(const Case& c, const Operands& o, int64_t k, int64_t j) { return c.tb ? o.B[j * o.ldb + k] : o.B[k * o.ldb + j]; }

// The shapes every path is tested on: one thread (small), parallel tiles split by rows and by
// columns, k over several packed blocks; tails of every tile size; K = 0 (C = beta C).
std::vector<Case> cases() {
  std::vector<Case> v;
  for (int t = 0; t < 4; ++t) {
    const bool ta = t & 1, tb = t & 2;
    for (int64_t M : {1, 5, 6, 7, 13, 111})
      for (int64_t N : {1, 7, 8, 15, 16, 17, 32, 33, 130})
        for (int64_t K : {1, 19, 64})
          v.push_back({ta, tb, M, N, K, (M + N) % 3 == 0 ? 0.5f : 1.0f, (M * N) % 2 == 0 ? 0.0f : 0.75f});
    v.push_back({ta, tb, 300, 40, 70, 1.0f, 1.0f});   // tiles split by rows, in parallel
    v.push_back({ta, tb, 100, 600, 50, 1.0f, 0.0f});  // tiles split by columns, in parallel
    v.push_back({ta, tb, 5, 9, 0, 1.0f, 0.5f});       // K = 0
    v.push_back({ta, tb, 3, 20, 700, 1.0f, 1.0f});    // one thread, k in several packed blocks
  }
  return v;
}

TEST(Blas, SgemmMatchesFloat64Reference) {
  uint64_t seed = 1;
  for (const Case& c : cases()) {
    Operands o = make_operands(c, seed += 3);
    std::vector<double> ref(c.M * c.N);
    double tol = 0;
    for (int64_t i = 0; i < c.M; ++i)
      for (int64_t j = 0; j < c.N; ++j) {
        double s = 0, mag = 0;
        for (int64_t k = 0; k < c.K; ++k) {
          const double p = static_cast<double>(op_a(c, o, i, k)) * op_b(c, o, k, j);
          s += p;
          mag += std::fabs(p);
        }
        const double old = o.C[i * o.ldc + j];
        ref[i * c.N + j] = c.alpha * s + (c.beta != 0.0f ? c.beta * old : 0.0);
        // fp32 accumulation over K terms: |err| <= K u sum |a b| (first order), plus the alpha/beta step.
        tol = std::max(tol, (c.K + 2) * 6e-8 * (mag + std::fabs(old)));
      }
    std::vector<float> C = o.C;
    blas_sgemm(c.ta, c.tb, c.M, c.N, c.K, c.alpha, o.A.data(), o.lda, o.B.data(), o.ldb, c.beta, C.data(), o.ldc);
    std::vector<float> got(c.M * c.N);
    for (int64_t i = 0; i < c.M; ++i)
      for (int64_t j = 0; j < c.N; ++j) got[i * c.N + j] = C[i * o.ldc + j];
    ASSERT_TRUE(test::all_close(c.str(), got, ref, tol + 1e-6, 0.0));
    // The padding columns of C are untouched.
    for (int64_t i = 0; i < c.M; ++i)
      for (int64_t j = c.N; j < o.ldc; ++j) ASSERT_EQ(C[i * o.ldc + j], o.C[i * o.ldc + j]) << c.str();
  }
}

// beta = 0 never reads C: NaN there must not leak into the result (the small tiles load C only when
// beta != 0).
TEST(Blas, BetaZeroIgnoresNanInC) {
  for (const Case& c : {Case{false, false, 7, 17, 5, 1.0f, 0.0f}, Case{true, true, 13, 32, 9, 2.0f, 0.0f},
                        Case{false, true, 111, 130, 19, 1.0f, 0.0f}}) {
    Operands o = make_operands(c, 7);
    std::fill(o.C.begin(), o.C.end(), std::numeric_limits<float>::quiet_NaN());
    blas_sgemm(c.ta, c.tb, c.M, c.N, c.K, c.alpha, o.A.data(), o.lda, o.B.data(), o.ldb, 0.0f, o.C.data(), o.ldc);
    for (int64_t i = 0; i < c.M; ++i)
      for (int64_t j = 0; j < c.N; ++j) ASSERT_FALSE(std::isnan(o.C[i * o.ldc + j])) << c.str() << " at " << i << "," << j;
  }
}

// The contract (blas.h): every element of C is one FMA chain over k = 0..K-1, started from beta c
// (0 when beta is 0), acc = fma(alpha a_ik, b_kj, acc). So its bits are those of the scalar loop below,
// whatever the path (single thread, parallel tiles, long k in several passes), the tails, or the build
// of the tiles (each build this CPU runs is checked).
TEST(Blas, EveryElementIsOneFmaChainInEveryBuild) {
  std::vector<Case> all = cases();
  all.push_back({false, false, 40, 50, 9000, 1.0f, 1.0f});  // k in several parallel passes
  all.push_back({true, true, 30, 70, 600, 0.5f, 0.0f});     // k in several packed blocks
  std::vector<BlasKernels> builds{BlasKernels::portable};
  if (blas_kernels() != BlasKernels::portable) builds.push_back(BlasKernels::avx2);
  if (blas_kernels() == BlasKernels::avx512) builds.push_back(BlasKernels::avx512);
  uint64_t seed = 100;
  for (const Case& c : all) {
    Operands o = make_operands(c, seed += 3);
    std::vector<float> want(c.M * c.N);
    for (int64_t i = 0; i < c.M; ++i)
      for (int64_t j = 0; j < c.N; ++j) {
        float acc = c.beta == 0.0f ? 0.0f : c.beta * o.C[i * o.ldc + j];
        for (int64_t k = 0; k < c.K; ++k) acc = std::fma(c.alpha * op_a(c, o, i, k), op_b(c, o, k, j), acc);
        want[i * c.N + j] = acc;
      }
    for (BlasKernels k : builds) {
      blas_use_kernels(k);
      std::vector<float> C = o.C;
      blas_sgemm(c.ta, c.tb, c.M, c.N, c.K, c.alpha, o.A.data(), o.lda, o.B.data(), o.ldb, c.beta, C.data(), o.ldc);
      for (int64_t i = 0; i < c.M; ++i)
        for (int64_t j = 0; j < c.N; ++j)
          ASSERT_EQ(C[i * o.ldc + j], want[i * c.N + j])
              << c.str() << " kernels=" << blas_kernels_name(k) << " at " << i << "," << j;
    }
    blas_use_kernels(std::nullopt);
  }
}

TEST(Blas, KernelsTheCpuDoesNotRunAreAnError) {
  blas_use_kernels(std::nullopt);
  if (blas_kernels() == BlasKernels::avx512) GTEST_SKIP() << "this CPU runs every build";
  EXPECT_THROW(blas_use_kernels(BlasKernels::avx512), Error);
  blas_use_kernels(std::nullopt);
}

// The epilogue runs once on every element of C, after the element's last k (on both paths, and after
// the last of several k passes), where C already holds the GEMM's final values.
TEST(Blas, EpilogueSeesEachFinishedTileOnce) {
  const int saved = omp_get_max_threads();
  for (int threads : {1, 3})
    for (const Case& c : {Case{false, true, 300, 200, 70, 1.0f, 0.0f}, Case{false, false, 37, 41, 9000, 1.0f, 1.0f},
                          Case{true, false, 13, 17, 5, 0.5f, 0.75f}}) {
      omp_set_num_threads(threads);
      Operands o = make_operands(c, 21);
      std::vector<float> plain = o.C, C = o.C, seen(o.C.size(), 0.0f);
      std::vector<int> hits(o.C.size(), 0);
      blas_sgemm(c.ta, c.tb, c.M, c.N, c.K, c.alpha, o.A.data(), o.lda, o.B.data(), o.ldb, c.beta, plain.data(), o.ldc);
      struct Ctx {
        float* C;
        float* seen;
        int* hits;
        int64_t ldc;
      } ctx{C.data(), seen.data(), hits.data(), o.ldc};
      const BlasEpilogue ep{[](void* p, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
                              const Ctx& x = *static_cast<const Ctx*>(p);
                              for (int64_t i = i0; i < i1; ++i)
                                for (int64_t j = j0; j < j1; ++j) {
                                  x.seen[i * x.ldc + j] = x.C[i * x.ldc + j];
                                  x.hits[i * x.ldc + j]++;
                                }
                            },
                            &ctx};
      blas_sgemm(c.ta, c.tb, c.M, c.N, c.K, c.alpha, o.A.data(), o.lda, o.B.data(), o.ldb, c.beta, C.data(), o.ldc, &ep);
      for (int64_t i = 0; i < c.M; ++i)
        for (int64_t j = 0; j < c.N; ++j) {
          ASSERT_EQ(hits[i * o.ldc + j], 1) << c.str() << " threads=" << threads << " at " << i << "," << j;
          ASSERT_EQ(seen[i * o.ldc + j], plain[i * o.ldc + j]) << c.str() << " threads=" << threads;
        }
    }
  omp_set_num_threads(saved);
}

// Same bits on 1 and 3 threads (the parallel split's blocks depend only on the shape).
TEST(Blas, SameBitsForAnyThreadCount) {
  const int saved = omp_get_max_threads();
  for (const Case& c : {Case{false, true, 1000, 300, 200, 1.0f, 1.0f}, Case{true, false, 60, 900, 300, 1.0f, 0.0f},
                        Case{false, false, 128, 32, 128, 1.0f, 1.0f}}) {
    Operands o = make_operands(c, 11);
    std::vector<float> one = o.C, three = o.C;
    omp_set_num_threads(1);
    blas_sgemm(c.ta, c.tb, c.M, c.N, c.K, c.alpha, o.A.data(), o.lda, o.B.data(), o.ldb, c.beta, one.data(), o.ldc);
    omp_set_num_threads(3);
    blas_sgemm(c.ta, c.tb, c.M, c.N, c.K, c.alpha, o.A.data(), o.lda, o.B.data(), o.ldb, c.beta, three.data(), o.ldc);
    EXPECT_EQ(0, std::memcmp(one.data(), three.data(), one.size() * sizeof(float))) << c.str();
  }
  omp_set_num_threads(saved);
}

}  // namespace
}  // namespace lmf
