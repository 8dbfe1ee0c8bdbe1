// CUDA grouped GEMMs (ops/grouped_gemm.h) against a CPU double-precision reference (blas_dgemm per
// group) on the same bf16-rounded inputs: NT, NN and TN on awkward segment sizes (0, 1, 17, 130, 300
// rows, unsorted, plus unused tail rows) and sizes that are no multiple of any tile (72, 200, 136),
// one case at 3072 x 768 with ~500 rows per group, TN with beta = 0 over NaN and beta = 1
// accumulating, bitwise repeatability, and shape errors. Every case runs on both kernel choices
// (grouped_gemm_set_kernel: wgmma, the default, and the mma.sync fallback).
//
// Outputs are poisoned with NaN before every call: an element the kernel should write and did not
// fails, and rows >= offsets[G] (and, for TN, nothing outside C) must stay poisoned.
//
// Tolerances, per element, scale = sum over the reduction of |a b| (+ |beta C0| for TN):
//   bf16 out (NT, NN): |got - ref| <= 2^-7 |ref| + 2^-16 scale
//     (one bf16 ulp of the result: rounding to bf16 costs up to half an ulp, <= 2^-8 |x|; 2^-16 scale
//      covers the fp32 sums in any order, Hopper's tensor-core accumulation included, and is still
//      far below what one missing or doubled term of the sum would cost)
//   f32 out (TN):      |got - ref| <= 2^-16 scale
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/check.h"
#include "ops/blas.h"
#include "ops/grouped_gemm.h"
#include "support/gpu_util.h"
#include "support/test_util.h"

namespace lmf {
namespace {

enum class Op { nt, nn, tn };
using Kernel = cuda::GroupedGemmKernel;
constexpr Kernel kKernels[] = {Kernel::wgmma, Kernel::mma_sync};  // every kernel choice
const char* kernel_tag(Kernel k) { return k == Kernel::wgmma ? "" : "(mma.sync)"; }
const char* op_name(Op op) { return op == Op::nt ? "grouped_gemm_nt" : op == Op::nn ? "grouped_gemm_nn" : "grouped_gemm_tn"; }

// The launchers exist only in CUDA builds; elsewhere every test skips before reaching these.
#ifdef LMF_WITH_CUDA
void device_rows(Op op, bf16* C, const bf16* A, const bf16* B, const int32_t* off, int G, int64_t R, int64_t N,
                 int64_t K) {
  if (op == Op::nt)
    cuda::grouped_gemm_nt(C, A, B, off, G, R, N, K);
  else
    cuda::grouped_gemm_nn(C, A, B, off, G, R, N, K);
}
void device_tn(float* C, const bf16* A, const bf16* B, const int32_t* off, int G, int64_t R, int64_t M, int64_t N,
               float beta) {
  cuda::grouped_gemm_tn(C, A, B, off, G, R, M, N, beta);
}
void set_kernel(cuda::GroupedGemmKernel k) { cuda::grouped_gemm_set_kernel(k); }
#else
void device_rows(Op, bf16*, const bf16*, const bf16*, const int32_t*, int, int64_t, int64_t, int64_t) {
  fail("built without the CUDA backend");
}
void device_tn(float*, const bf16*, const bf16*, const int32_t*, int, int64_t, int64_t, int64_t, float) {
  fail("built without the CUDA backend");
}
void set_kernel(cuda::GroupedGemmKernel) {}
#endif

constexpr double kTolRelBf16 = 1.0 / 128;    // 2^-7 of |ref|: one bf16 ulp
constexpr double kTolScale = 1.0 / 65536;    // 2^-16 of sum |a b|

struct Case {
  Op op = Op::nt;
  std::vector<int64_t> sizes;  // rows per group
  int64_t tail = 0;            // unused rows after offsets[G]
  int64_t N = 8, K = 8;        // nt/nn: C (R, N), reduction K; tn: C (G, K=M, N)
  float beta = 0.0f;           // tn
  Kernel kernel = Kernel::wgmma;  // grouped_gemm_set_kernel
  std::string str() const {
    std::string s = std::string(op_name(op)) + kernel_tag(kernel) + " G=" + std::to_string(sizes.size()) + " rows={";
    for (size_t i = 0; i < sizes.size(); ++i) s += (i ? "," : "") + std::to_string(sizes[i]);
    return s + "} tail=" + std::to_string(tail) + (op == Op::tn ? " M=" : " N=") +
           std::to_string(op == Op::tn ? K : N) + (op == Op::tn ? " N=" : " K=") + std::to_string(op == Op::tn ? N : K) +
           " beta=" + std::to_string(beta);
  }
};

std::vector<int32_t> offsets_of(const std::vector<int64_t>& sizes) {
  std::vector<int32_t> off(sizes.size() + 1, 0);
  for (size_t g = 0; g < sizes.size(); ++g) off[g + 1] = off[g] + static_cast<int32_t>(sizes[g]);
  return off;
}

std::vector<double> abs_of(const std::vector<float>& v) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = std::fabs(static_cast<double>(v[i]));
  return r;
}

bool is_poison_bf16(bf16 v) { return v.bits == 0xffff; }

// Runs one case; returns the raw output bytes (for the repeat check).
std::vector<unsigned char> run_case(const Case& c, uint64_t seed, int repeats = 1) {
  const int G = static_cast<int>(c.sizes.size());
  const std::vector<int32_t> off = offsets_of(c.sizes);
  const int64_t used = off[G], R = used + c.tail;
  const bool tn = c.op == Op::tn;
  // nt: A (R, K), B (G, N, K); nn: A (R, K), B (G, K, N); tn: A (R, M=K), B (R, N), C (G, M, N) f32.
  const int64_t a_cols = c.K, b_elems = tn ? R * c.N : G * c.N * c.K;
  const std::vector<float> A = test::round_bf16(test::randn(std::max<int64_t>(R * a_cols, 1), seed));
  const std::vector<float> B = test::round_bf16(test::randn(std::max<int64_t>(b_elems, 1), seed + 1));
  const std::vector<float> C0 = test::randn(std::max<int64_t>(G * c.K * c.N, 1), seed + 2);  // tn, beta = 1
  const std::vector<double> Ad = test::to_double(A), Bd = test::to_double(B), Aa = abs_of(A), Ba = abs_of(B);

  test::DeviceBuffer dA(test::to_bf16(A)), dB(test::to_bf16(B)), doff(off);
  std::vector<unsigned char> raw;
  const std::string what = c.str() + " seed=" + std::to_string(seed);
  if (!tn) {
    // ref, scale: (R, N); group g: rows [off[g], off[g+1]) of A times B[g] (or its transpose).
    std::vector<double> ref(R * c.N, 0.0), scale(R * c.N, 0.0);
    for (int g = 0; g < G; ++g) {
      const int64_t rows = c.sizes[g];
      if (rows == 0) continue;
      const int64_t r0 = off[g], bo = g * c.N * c.K;
      const bool tb = c.op == Op::nt;  // B[g] is (N, K): use its transpose
      const int64_t ldb = tb ? c.K : c.N;
      blas_dgemm(false, tb, rows, c.N, c.K, 1.0, Ad.data() + r0 * c.K, c.K, Bd.data() + bo, ldb, 0.0,
                 ref.data() + r0 * c.N, c.N);
      blas_dgemm(false, tb, rows, c.N, c.K, 1.0, Aa.data() + r0 * c.K, c.K, Ba.data() + bo, ldb, 0.0,
                 scale.data() + r0 * c.N, c.N);
    }
    test::DeviceBuffer dC(std::max<int64_t>(R * c.N, 1) * sizeof(bf16));
    for (int rep = 0; rep < repeats; ++rep) {
      dC.poison();
      set_kernel(c.kernel);
      device_rows(c.op, static_cast<bf16*>(dC.data()), static_cast<const bf16*>(dA.data()),
                  static_cast<const bf16*>(dB.data()), static_cast<const int32_t*>(doff.data()), G, R, c.N, c.K);
      const std::vector<bf16> got = dC.download<bf16>();
      std::vector<unsigned char> bytes(got.size() * sizeof(bf16));
      std::memcpy(bytes.data(), got.data(), bytes.size());
      if (rep > 0) EXPECT_TRUE(bytes == raw) << what << ": repeat " << rep << " differs bitwise";
      raw = bytes;
      if (rep > 0) continue;
      int64_t bad = 0;
      double worst = 0;
      std::vector<float> gotf(used * c.N), reff(used * c.N);
      for (int64_t i = 0; i < R * c.N; ++i) {
        if (i >= used * c.N) {
          if (!is_poison_bf16(got[i]) && bad++ < 5)
            ADD_FAILURE() << what << ": tail row " << i / c.N << " col " << i % c.N << " was written";
          continue;
        }
        const double v = static_cast<float>(got[i]);
        const double tol = kTolRelBf16 * std::fabs(ref[i]) + kTolScale * scale[i];
        const double err = std::fabs(v - ref[i]);
        worst = std::max(worst, err / tol);
        gotf[i] = static_cast<float>(v);
        reff[i] = static_cast<float>(ref[i]);
        if (!(err <= tol) && bad++ < 5)
          ADD_FAILURE() << what << ": C[" << i / c.N << ", " << i % c.N << "] = " << v << ", ref " << ref[i]
                        << ", err " << err << " > tol " << tol;
      }
      EXPECT_EQ(bad, 0) << what << ": " << bad << " bad elements";
      std::printf("  %-70s max err/tol %.3f  rel_l2 %.2e\n", what.c_str(), worst,
                  used ? test::rel_l2_error(gotf, reff) : 0.0);
    }
  } else {
    const int64_t M = c.K;
    // ref, scale: (G, M, N); C[g] = beta C0[g] + A[rows of g]^T B[rows of g].
    std::vector<double> ref(G * M * c.N), scale(G * M * c.N);
    for (int64_t i = 0; i < G * M * c.N; ++i) {
      ref[i] = c.beta * static_cast<double>(C0[i]);
      scale[i] = std::fabs(ref[i]);
    }
    for (int g = 0; g < G; ++g) {
      const int64_t rows = c.sizes[g];
      if (rows == 0) continue;
      const int64_t r0 = off[g], co = g * M * c.N;
      blas_dgemm(true, false, M, c.N, rows, 1.0, Ad.data() + r0 * M, M, Bd.data() + r0 * c.N, c.N, 1.0,
                 ref.data() + co, c.N);
      blas_dgemm(true, false, M, c.N, rows, 1.0, Aa.data() + r0 * M, M, Ba.data() + r0 * c.N, c.N, 1.0,
                 scale.data() + co, c.N);
    }
    test::DeviceBuffer dC(std::max<int64_t>(G * M * c.N, 1) * sizeof(float));
    for (int rep = 0; rep < repeats; ++rep) {
      if (c.beta == 0.0f)
        dC.poison();  // beta = 0: C must not be read, NaN included
      else
        dC.upload(C0);
      set_kernel(c.kernel);
      device_tn(static_cast<float*>(dC.data()), static_cast<const bf16*>(dA.data()), static_cast<const bf16*>(dB.data()),
                static_cast<const int32_t*>(doff.data()), G, R, M, c.N, c.beta);
      const std::vector<float> got = dC.download<float>();
      std::vector<unsigned char> bytes(got.size() * sizeof(float));
      std::memcpy(bytes.data(), got.data(), bytes.size());
      if (rep > 0) EXPECT_TRUE(bytes == raw) << what << ": repeat " << rep << " differs bitwise";
      raw = bytes;
      if (rep > 0) continue;
      int64_t bad = 0;
      double worst = 0;
      for (int64_t i = 0; i < G * M * c.N; ++i) {
        const double tol = kTolScale * scale[i];
        const double err = std::fabs(static_cast<double>(got[i]) - ref[i]);
        worst = std::max(worst, tol > 0 ? err / tol : err);
        if (!(err <= tol) && bad++ < 5)
          ADD_FAILURE() << what << ": C[" << i / (M * c.N) << "][" << (i / c.N) % M << ", " << i % c.N
                        << "] = " << got[i] << ", ref " << ref[i] << ", err " << err << " > tol " << tol;
      }
      EXPECT_EQ(bad, 0) << what << ": " << bad << " bad elements";
      std::printf("  %-70s max err/tol %.3f\n", what.c_str(), worst);
    }
  }
  return raw;
}

const std::vector<int64_t> kAwkward = {17, 0, 300, 1, 130};  // G = 5, unsorted, one empty group

TEST(CudaGroupedGemm, RowsAwkwardSizes) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  std::printf("seed %llu (LMF_TEST_SEED to reproduce)\n", static_cast<unsigned long long>(seed));
  for (Kernel wg : kKernels)
    for (Op op : {Op::nt, Op::nn})
      for (auto [N, K] : {std::pair<int64_t, int64_t>{72, 200}, {136, 72}, {200, 136}, {8, 8}, {264, 1032}}) {
        run_case({op, kAwkward, 23, N, K, 0.0f, wg}, seed);
        run_case({op, {1}, 0, N, K, 0.0f, wg}, seed + 7);         // one group, one row
        run_case({op, {0, 0, 5}, 3, N, K, 0.0f, wg}, seed + 11);  // leading empty groups
      }
}

TEST(CudaGroupedGemm, WeightGradAwkwardSizes) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  std::printf("seed %llu (LMF_TEST_SEED to reproduce)\n", static_cast<unsigned long long>(seed));
  for (Kernel wg : kKernels)
    for (float beta : {0.0f, 1.0f})
      for (auto [M, N] : {std::pair<int64_t, int64_t>{72, 200}, {200, 136}, {136, 72}, {8, 8}, {264, 328}}) {
        run_case({Op::tn, kAwkward, 23, N, M, beta, wg}, seed);
        run_case({Op::tn, {0, 0}, 4, N, M, beta, wg}, seed + 3);  // no rows at all: C = beta C
      }
}

// ~500 rows per group at an MoE layer's shape (d_model 768, d_ff 3072).
std::vector<int64_t> moe_sizes(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> s(8);
  for (auto& v : s) v = 400 + static_cast<int64_t>(rng() % 201);
  return s;
}

TEST(CudaGroupedGemm, MoeShapes) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  std::printf("seed %llu (LMF_TEST_SEED to reproduce)\n", static_cast<unsigned long long>(seed));
  const std::vector<int64_t> sizes = moe_sizes(seed);
  for (Kernel wg : kKernels) {
    run_case({Op::nt, sizes, 37, 3072, 768, 0.0f, wg}, seed);
    run_case({Op::nn, sizes, 37, 768, 3072, 0.0f, wg}, seed + 1);
    run_case({Op::tn, sizes, 37, 768, 3072, 1.0f, wg}, seed + 2);
  }
}

TEST(CudaGroupedGemm, BitwiseRepeatable) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  std::printf("seed %llu (LMF_TEST_SEED to reproduce)\n", static_cast<unsigned long long>(seed));
  const std::vector<int64_t> sizes = moe_sizes(seed);
  for (Kernel wg : kKernels) {
    run_case({Op::nt, sizes, 5, 768, 3072, 0.0f, wg}, seed, 3);
    run_case({Op::nn, sizes, 5, 3072, 768, 0.0f, wg}, seed, 3);
    run_case({Op::tn, sizes, 5, 3072, 768, 0.0f, wg}, seed, 3);
  }
  set_kernel(Kernel::wgmma);
}

TEST(CudaGroupedGemm, BadShapesNameTheOp) {
  LMF_REQUIRE_GPU();
  test::DeviceBuffer a(4096), b(4096), c(4096), off(std::vector<int32_t>{0, 1});
  auto A = static_cast<const bf16*>(a.data()), B = static_cast<const bf16*>(b.data());
  auto C = static_cast<bf16*>(c.data());
  auto O = static_cast<const int32_t*>(off.data());
  auto expect_error = [](auto&& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "no error; expected one naming " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error([&] { device_rows(Op::nt, C, A, B, O, 1, 1, 100, 8); }, "grouped_gemm_nt: N=100");
  expect_error([&] { device_rows(Op::nn, C, A, B, O, 1, 1, 8, 12); }, "grouped_gemm_nn: K=12");
  expect_error([&] { device_tn(static_cast<float*>(c.data()), A, B, O, 1, 1, 20, 8, 0.0f); }, "grouped_gemm_tn: M=20");
  expect_error([&] { device_tn(static_cast<float*>(c.data()), A, B, O, 1, 1, 8, 8, 0.5f); }, "grouped_gemm_tn: beta=");
  expect_error([&] { device_rows(Op::nt, C, A + 1, B, O, 1, 1, 8, 8); }, "grouped_gemm_nt: A, B and C must be 16-byte");
}

}  // namespace
}  // namespace lmf
