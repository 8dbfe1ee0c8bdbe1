// CUDA GEMM (cuBLASLt, ops/gemm_cuda.h) against blas_sgemm on the same inputs: every transpose pair
// on awkward sizes, alpha/beta/bias variants, padded leading dimensions, 4-byte-aligned (not 16 or
// 256) pointers, beta = 0 over a NaN-poisoned C, a long K; the strided-batched form (odd and zero
// strides, untouched gaps); determinism, the plan cache, errors.
//
// Tolerance: |gpu - cpu| <= 32 u * scale per element, scale = |alpha| |A| |B| + |beta| |C| + |bias|
// (support/scaled_compare.h): both are fp32 FMA sums of the same terms in different orders.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "ops/blas.h"
#include "ops/gemm_cuda.h"
#include "ops/op_plans.h"
#include "support/gpu_util.h"
#include "support/scaled_compare.h"
#include "support/test_util.h"

namespace lmf {
namespace {

constexpr double kGemmTol = 32 * test::kRoundoff;  // 1.9e-6 of the scale

// The launcher exists only in CUDA builds; elsewhere every test skips before reaching these.
#ifdef LMF_WITH_CUDA
void device_gemm(const char* op, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                 int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc,
                 const float* bias = nullptr, GemmMath math = GemmMath::fp32) {
  cuda::gemm(op, math, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias);
}
void device_gemm_batched(const char* op, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                         const float* A, int64_t lda, int64_t sa, const float* B, int64_t ldb, int64_t sb, float beta,
                         float* C, int64_t ldc, int64_t sc, int64_t batch) {
  cuda::gemm_strided_batched(op, GemmMath::fp32, ta, tb, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch);
}
uint64_t plan_queries() { return cuda::gemm_plan_queries(); }
#else
void device_gemm(const char*, bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                 int64_t, float, float*, int64_t, const float* = nullptr, GemmMath = GemmMath::fp32) {
  fail("built without the CUDA backend");
}
void device_gemm_batched(const char*, bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, int64_t,
                         const float*, int64_t, int64_t, float, float*, int64_t, int64_t, int64_t) {
  fail("built without the CUDA backend");
}
uint64_t plan_queries() { return 0; }
#endif

struct Case {
  bool ta = false, tb = false;
  int64_t M = 1, N = 1, K = 1;
  float alpha = 1.0f, beta = 0.0f;
  bool bias = false;
  int64_t pad = 0;     // extra elements in every leading dimension
  int64_t offset = 0;  // device pointers start this many floats into their buffers (1: only 4-byte aligned)
  std::string str() const {
    return std::string(ta ? "A^T" : "A") + (tb ? " B^T" : " B") + " M=" + std::to_string(M) +
           " N=" + std::to_string(N) + " K=" + std::to_string(K) + " alpha=" + std::to_string(alpha) +
           " beta=" + std::to_string(beta) + (bias ? " bias" : "") + " pad=" + std::to_string(pad) +
           " offset=" + std::to_string(offset);
  }
};

// A device copy of `host` starting `offset` floats into its buffer.
struct OffsetBuffer {
  test::DeviceBuffer buf;
  int64_t offset;
  OffsetBuffer(const std::vector<float>& host, int64_t off) : buf((host.size() + off) * sizeof(float)), offset(off) {
    std::vector<float> h(off, 0.0f);
    h.insert(h.end(), host.begin(), host.end());
    buf.upload(h);
  }
  float* ptr() const { return static_cast<float*>(buf.data()) + offset; }
  std::vector<float> download() const {
    std::vector<float> h = buf.download<float>();
    return {h.begin() + offset, h.end()};
  }
  void poison() { buf.poison(); }
};

struct Result {
  std::vector<float> gpu, cpu, scale;  // (M, ldc) each
};

Result run_case(const Case& c, uint64_t seed, GemmMath math = GemmMath::fp32) {
  const int64_t a_rows = c.ta ? c.K : c.M, a_cols = c.ta ? c.M : c.K;
  const int64_t b_rows = c.tb ? c.N : c.K, b_cols = c.tb ? c.K : c.N;
  const int64_t lda = a_cols + c.pad, ldb = b_cols + c.pad, ldc = c.N + c.pad;
  std::vector<float> A = test::randn(a_rows * lda, seed), B = test::randn(b_rows * ldb, seed + 1),
                     C0 = test::randn(c.M * ldc, seed + 2), bias = test::randn(c.N, seed + 3);
  Result r;
  r.cpu = C0;
  blas_sgemm(c.ta, c.tb, c.M, c.N, c.K, c.alpha, A.data(), lda, B.data(), ldb, c.beta, r.cpu.data(), ldc);
  if (c.bias)
    for (int64_t i = 0; i < c.M; ++i)
      for (int64_t j = 0; j < c.N; ++j) r.cpu[i * ldc + j] += bias[j];
  r.scale = test::gemm_error_scale(c.ta, c.tb, c.M, c.N, c.K, c.alpha, A, lda, B, ldb, c.beta, C0, ldc,
                                   c.bias ? bias : std::vector<float>{});
  OffsetBuffer dA(A, c.offset), dB(B, c.offset), dC(C0, c.offset), dbias(bias, c.offset);
  if (c.beta == 0.0f) dC.poison();  // beta = 0: C must not be read
  device_gemm("test_gemm", c.ta, c.tb, c.M, c.N, c.K, c.alpha, dA.ptr(), lda, dB.ptr(), ldb, c.beta, dC.ptr(), ldc,
             c.bias ? dbias.ptr() : nullptr, math);
  r.gpu = dC.download();
  // Padding columns of C are never written: still the poison (beta = 0) or the original values.
  for (int64_t i = 0; i < c.M; ++i)
    for (int64_t j = c.N; j < ldc; ++j) {
      const float v = r.gpu[i * ldc + j];
      EXPECT_TRUE(c.beta == 0.0f ? test::is_poison(v) : v == C0[i * ldc + j])
          << c.str() << ": padding C[" << i << ", " << j << "] was written";
    }
  return r;
}

// The (M, N) part of an (M, ldc) matrix.
std::vector<float> valid(const std::vector<float>& m, int64_t M, int64_t N, int64_t ldc) {
  std::vector<float> r;
  for (int64_t i = 0; i < M; ++i) r.insert(r.end(), m.begin() + i * ldc, m.begin() + i * ldc + N);
  return r;
}

void check_case(const Case& c, uint64_t seed) {
  const Result r = run_case(c, seed);
  const int64_t ldc = c.N + c.pad;
  EXPECT_TRUE(test::within_scale(c.str(), valid(r.gpu, c.M, c.N, ldc), valid(r.cpu, c.M, c.N, ldc),
                                 valid(r.scale, c.M, c.N, ldc), kGemmTol))
      << "seed=" << seed;
}

TEST(CudaGemm, AllTransposesOnAwkwardSizesMatchCpu) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  const uint64_t seed = test::fresh_seed();
  const float betas[] = {0.0f, 1.0f, -0.5f};
  int idx = 0;
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (int64_t M : test::awkward_sizes())
        for (int64_t N : test::awkward_sizes())
          for (int64_t K : test::awkward_sizes()) {
            Case c{ta, tb, M, N, K, idx % 4 == 1 ? 0.75f : 1.0f, betas[idx % 3], idx % 2 == 1, idx % 3 == 0 ? 3 : 0,
                   idx % 5 == 0 ? 1 : 0};
            check_case(c, seed + 4 * idx);
            ++idx;
          }
}

TEST(CudaGemm, LongKMatchesCpu) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  const uint64_t seed = test::fresh_seed();
  check_case({false, true, 256, 384, 4096, 1.0f, 0.0f, true, 0, 0}, seed);      // forward-like, bias
  check_case({true, false, 384, 256, 4096, 1.0f, 1.0f, false, 0, 0}, seed + 4);  // weight-gradient-like
  check_case({false, false, 333, 200, 3072, 1.0f, 1.0f, false, 5, 1}, seed + 8); // input-gradient-like
}

// The GPT-2 124M weight-gradient shapes at B*T = 16384 (dW = dout^T inp, K = 16384), where the
// heuristic may pick an out-of-place split-K: against the CPU, and bitwise equal over three runs.
TEST(CudaGemm, TallKWeightGradientsMatchCpuAndAreDeterministic) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  const uint64_t seed = test::fresh_seed();
  for (const Case& c : {Case{true, false, 768, 768, 16384, 1.0f, 1.0f, false, 0, 0},
                        Case{true, false, 3072, 768, 16384, 1.0f, 1.0f, false, 0, 0}}) {
    check_case(c, seed);
    const Result first = run_case(c, seed + 1);
    for (int rep = 0; rep < 2; ++rep)
      EXPECT_EQ(run_case(c, seed + 1).gpu, first.gpu) << c.str() << ": run " << rep + 2 << " differs bitwise";
  }
}

// TF32 math: inputs rounded to 10-bit mantissas, fp32 accumulation. ||gpu - cpu|| / ||cpu|| lands
// near 2^-11 ~ 5e-4 for random data; bound 3e-3. Then fp32 again, which must match exactly the first
// fp32 call's result (the two maths have separate plans).
TEST(CudaGemm, Tf32ModeIsWithinTf32RoundingAndSwitchesBack) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  const uint64_t seed = test::fresh_seed();
  const Case c{false, true, 1024, 768, 3072, 1.0f, 0.0f, false, 0, 0};
  const Result fp32 = run_case(c, seed);
  const Result tf32 = run_case(c, seed, GemmMath::tf32);
  double num = 0, den = 0;
  for (size_t i = 0; i < tf32.cpu.size(); ++i) {
    num += (tf32.gpu[i] - tf32.cpu[i]) * double(tf32.gpu[i] - tf32.cpu[i]);
    den += double(tf32.cpu[i]) * tf32.cpu[i];
  }
  const double rel = std::sqrt(num / den);
  EXPECT_LT(rel, 3e-3) << "seed=" << seed;
  EXPECT_GT(rel, 1e-6) << "tf32 mode gave fp32-exact results: tensor cores were not used";
  std::printf("[ measured ] tf32 GEMM 1024x768x3072: ||gpu - cpu|| / ||cpu|| = %.2e\n", rel);
  EXPECT_EQ(run_case(c, seed).gpu, fp32.gpu) << "fp32 after tf32 differs from fp32 before";
}

TEST(CudaGemm, DeterministicAndPlannedOnce) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  const uint64_t seed = test::fresh_seed();
  const Case c{false, true, 517, 301, 1111, 1.0f, 1.0f, true, 0, 0};
  const Result first = run_case(c, seed);
  const uint64_t queries = plan_queries();
  const Result second = run_case(c, seed);
  EXPECT_EQ(plan_queries(), queries) << "the second call of the same signature queried the heuristic";
  EXPECT_TRUE(test::bitwise_equal(c.str() + " run twice", first.gpu, second.gpu)) << "seed=" << seed;
  // A new signature queries once.
  run_case({false, true, 518, 301, 1111, 1.0f, 1.0f, true, 0, 0}, seed);
  EXPECT_EQ(plan_queries(), queries + 1);
}

// Strided batch: `batch` problems at element offsets i * stride (odd strides: 4-byte-aligned
// matrices; stride_a = 0: one A shared by all), each against blas_sgemm; the gap between the C_i is
// never written; beta = 0 over poison; run twice bitwise equal.
struct BatchedCase {
  Case c;
  int64_t batch, gap_a, gap_b, gap_c;  // stride = matrix extent + gap; gap_a < 0: stride_a = 0
};

void check_batched(const BatchedCase& bc, uint64_t seed) {
  const Case& c = bc.c;
  const int64_t a_rows = c.ta ? c.K : c.M, a_cols = c.ta ? c.M : c.K;
  const int64_t b_rows = c.tb ? c.N : c.K, b_cols = c.tb ? c.K : c.N;
  const int64_t lda = a_cols + c.pad, ldb = b_cols + c.pad, ldc = c.N + c.pad;
  const int64_t sa = bc.gap_a < 0 ? 0 : a_rows * lda + bc.gap_a, sb = b_rows * ldb + bc.gap_b,
                sc = c.M * ldc + bc.gap_c;
  const int64_t na = sa * (bc.batch - 1) + a_rows * lda, nb = sb * (bc.batch - 1) + b_rows * ldb,
                nc = sc * (bc.batch - 1) + c.M * ldc;
  const std::vector<float> A = test::randn(na, seed), B = test::randn(nb, seed + 1), C0 = test::randn(nc, seed + 2);
  OffsetBuffer dA(A, c.offset), dB(B, c.offset);
  std::vector<float> first;
  for (int run = 0; run < 2; ++run) {
    OffsetBuffer C(C0, c.offset);
    if (c.beta == 0.0f) C.poison();
    device_gemm_batched("test_gemm_batched", c.ta, c.tb, c.M, c.N, c.K, c.alpha, dA.ptr(), lda, sa, dB.ptr(), ldb, sb,
                        c.beta, C.ptr(), ldc, sc, bc.batch);
    const std::vector<float> got = C.download();
    const std::string what = c.str() + " batch=" + std::to_string(bc.batch) + " strides=(" + std::to_string(sa) +
                             "," + std::to_string(sb) + "," + std::to_string(sc) + ")";
    if (run == 1) {
      EXPECT_TRUE(test::bitwise_equal(what + " run twice", first, got)) << "seed=" << seed;
      break;
    }
    first = got;
    for (int64_t i = 0; i < bc.batch; ++i) {
      const std::vector<float> Ai(A.begin() + i * sa, A.begin() + i * sa + a_rows * lda),
          Bi(B.begin() + i * sb, B.begin() + i * sb + b_rows * ldb),
          Ci(C0.begin() + i * sc, C0.begin() + i * sc + c.M * ldc),
          Gi(got.begin() + i * sc, got.begin() + i * sc + c.M * ldc);
      std::vector<float> ref = Ci;
      blas_sgemm(c.ta, c.tb, c.M, c.N, c.K, c.alpha, Ai.data(), lda, Bi.data(), ldb, c.beta, ref.data(), ldc);
      const auto scale = test::gemm_error_scale(c.ta, c.tb, c.M, c.N, c.K, c.alpha, Ai, lda, Bi, ldb, c.beta, Ci, ldc);
      EXPECT_TRUE(test::within_scale(what + " matrix " + std::to_string(i), valid(Gi, c.M, c.N, ldc),
                                     valid(ref, c.M, c.N, ldc), valid(scale, c.M, c.N, ldc), kGemmTol))
          << "seed=" << seed;
      // Padding columns and the gap after C_i: never written.
      for (int64_t e = 0; e < (i + 1 < bc.batch ? sc : c.M * ldc); ++e) {
        const bool inside = e < c.M * ldc && e % ldc < c.N;
        if (inside) continue;
        const float v = got[i * sc + e];
        EXPECT_TRUE(c.beta == 0.0f ? test::is_poison(v) : v == C0[i * sc + e])
            << what << ": C element " << i * sc + e << " outside matrix " << i << " was written";
      }
    }
  }
}

TEST(CudaGemm, StridedBatchedMatchesCpu) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  const uint64_t seed = test::fresh_seed();
  const BatchedCase cases[] = {
      {{false, true, 19, 111, 7, 0.5f, 0.0f, false, 3, 1}, 3, 1, 5, 2},     // S = Q K^T like, odd everything
      {{false, false, 111, 19, 111, 1.0f, 0.0f, false, 0, 0}, 4, 0, 0, 0},  // O = P V like, packed
      {{true, false, 111, 7, 19, 1.0f, 1.0f, false, 1, 1}, 2, 3, 1, 7},     // dK += dS^T Q like, accumulate
      {{false, false, 7, 19, 19, -0.5f, 1.0f, false, 0, 0}, 5, -1, 0, 1},   // shared A (stride 0)
      {{false, true, 1, 1, 1, 1.0f, 0.0f, false, 0, 1}, 3, 0, 0, 0},        // 1x1x1
      {{false, false, 64, 64, 256, 1.0f, 1.0f, false, 0, 0}, 1, 9, 9, 9},   // batch 1: plain gemm()
  };
  int idx = 0;
  for (const BatchedCase& bc : cases) check_batched(bc, seed + 4 * idx++);
}

TEST(CudaGemm, StridedBatchedRejectsOverlappingOutputs) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  test::DeviceBuffer a(64 * 64 * 4), b(64 * 64 * 4), c(64 * 64 * 4);
  auto* pa = static_cast<float*>(a.data());
  auto* pb = static_cast<float*>(b.data());
  auto* pc = static_cast<float*>(c.data());
  try {  // C_i of 7 rows x ldc 19 overlap with stride_c = 100 < 6 * 19 + 19
    device_gemm_batched("my_op", false, false, 7, 19, 11, 1.0f, pa, 11, 77, pb, 19, 209, 0.0f, pc, 19, 100, 2);
    ADD_FAILURE() << "no exception for overlapping C";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const char* needle : {"my_op", "M=7", "batch=2", "stride_c"})
      EXPECT_NE(msg.find(needle), std::string::npos) << "message lacks '" << needle << "': " << msg;
  }
}

TEST(CudaGemm, InvalidArgumentsNameTheShapes) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  test::DeviceBuffer a(64 * 64 * 4), b(64 * 64 * 4), c(64 * 64 * 4);
  auto* pa = static_cast<float*>(a.data());
  auto* pb = static_cast<float*>(b.data());
  auto* pc = static_cast<float*>(c.data());
  try {
    device_gemm("my_op", false, false, 7, 19, 11, 1.0f, pa, 10 /* < K = 11 */, pb, 19, 0.0f, pc, 19);
    ADD_FAILURE() << "no exception for lda < K";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const char* needle : {"my_op", "M=7", "N=19", "K=11", "lda=10"})
      EXPECT_NE(msg.find(needle), std::string::npos) << "message lacks '" << needle << "': " << msg;
  }
  EXPECT_THROW(device_gemm("my_op", false, false, 7, 19, 0, 1.0f, pa, 1, pb, 19, 0.0f, pc, 19), Error);  // K = 0
}

// gemm_autotune: a bf16 GEMM of each kind the models run (bias forward, gelu_aux forward, dgelu
// backward, the f32 weight gradient with beta 1, and a tall-K one where split-K candidates exist) gives
// the same bits before and after tuning, the window covers only the calls made in it, and a second
// gemm_autotune without a new window tunes nothing.
#ifdef LMF_WITH_CUDA
TEST(CudaGemm, AutotuneKeepsEveryBit) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  const uint64_t seed = test::fresh_seed();
  const int64_t M = 2048, C = 768, H = 3072, Kt = 8192;
  // weights scaled as a trained model's (pre-activations ~ N(0, 1)): GELU and its gradient not mostly zero
  auto bf = [&](size_t n, uint64_t s, float scale = 1.0f) {
    return test::DeviceBuffer(test::to_bf16(test::randn(n, seed + s, scale)));
  };
  test::DeviceBuffer x = bf(M * C, 1), w1 = bf(H * C, 2, 0.036f), b1 = bf(H, 3), w2 = bf(C * H, 4, 0.018f),
                     dy = bf(M * C, 5);
  test::DeviceBuffer xt = bf(Kt * C, 6), dyt = bf(Kt * C, 7);
  test::DeviceBuffer h(M * H * 2), g(M * H * 2), dh(M * H * 2), y(M * C * 2);
  const std::vector<float> gw0 = test::randn(C * H, seed + 8, 0.1f), gt0 = test::randn(C * C, seed + 9, 0.1f);
  test::DeviceBuffer gw(gw0), gt(gt0);
  auto B16 = [](const test::DeviceBuffer& d) { return static_cast<bf16*>(d.data()); };
  auto F32 = [](const test::DeviceBuffer& d) { return static_cast<float*>(d.data()); };
  // The step: fc + GELU forward (gelu_aux), its projection with a bias, the dgelu backward, the fc
  // weight gradient (f32, beta 1) and a tall-K weight gradient (K = 8192).
  auto run_all = [&] {
    gw.upload(gw0);
    gt.upload(gt0);
    cuda::gemm("t_fc", false, true, M, H, C, 1.0f, B16(x), C, B16(w1), C, 0.0f, B16(g), H, B16(b1),
               cuda::GemmEpilogue::gelu_aux, B16(h), H);
    cuda::gemm("t_proj", false, true, M, C, H, 1.0f, B16(g), H, B16(w2), H, 0.0f, B16(y), C, B16(b1));
    cuda::gemm("t_dgelu", false, false, M, H, C, 1.0f, B16(dy), C, B16(w2), H, 0.0f, B16(dh), H, nullptr,
               cuda::GemmEpilogue::dgelu, B16(h), H);
    cuda::gemm("t_dw", true, false, C, H, M, 1.0f, B16(dy), C, B16(g), H, 1.0f, F32(gw), H);
    cuda::gemm("t_dw_tall", true, false, C, C, Kt, 1.0f, B16(dyt), C, B16(xt), C, 1.0f, F32(gt), C);
    std::vector<std::vector<float>> out;
    for (const test::DeviceBuffer* d : {&h, &g, &y, &dh}) out.push_back(test::from_bf16(d->download<bf16>()));
    out.push_back(gw.download<float>());
    out.push_back(gt.download<float>());
    return out;
  };
  const auto before = run_all();
  EXPECT_EQ(cuda::gemm_autotune().plans, 0) << "no window was open";
  cuda::gemm_tune_begin();
  run_all();
  const cuda::GemmTuneResult r = cuda::gemm_autotune();
  std::printf("measured: gemm_autotune on 5 plans: %d tuned, %d kept for their data, %d candidates, %d same bits, "
              "%d changed\n", r.plans, r.skipped, r.candidates, r.equal, r.changed);
  EXPECT_EQ(r.plans, 5);
  EXPECT_EQ(r.skipped, 0);
  EXPECT_GT(r.candidates, 0);
  const auto after = run_all();
  const char* names[] = {"gelu_aux pre-activation", "gelu_aux output", "bias forward", "dgelu", "f32 dW beta 1",
                         "tall-K f32 dW beta 1"};
  for (size_t i = 0; i < before.size(); ++i)
    EXPECT_TRUE(test::bitwise_equal(std::string(names[i]) + " before/after tuning", before[i], after[i]))
        << "seed=" << seed;
  EXPECT_EQ(cuda::gemm_autotune().plans, 0) << "the window closes after tuning";
}

// Batch-invariant plans (OpPlans::set_batch_invariant, --batch-invariant): one algorithm per weight shape
// for every M, no split-K, so row i of C = A W^T has the same bits whatever the number of rows. The
// model's forward shapes (GPT-2, Llama-1B, an LM head) at M from 1 to 2048, bf16 C with and without a
// bias, against the rows of M = 2048. Default plans are counted (they may differ; printed, not asserted).
TEST(CudaGemm, BatchInvariantPlansGiveARowTheSameBitsAtEveryM) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  const uint64_t seed = test::fresh_seed();
  struct Shape {
    int64_t N, K;
    bool bias;
  };
  const Shape shapes[] = {{768, 768, true},    {2304, 768, true},   {3072, 768, false}, {768, 3072, false},
                          {50304, 768, false}, {5632, 2048, false}, {2048, 5632, false}};
  const int64_t Ms[] = {1, 2, 3, 5, 8, 13, 16, 31, 32, 64, 100, 128, 255, 256, 512, 1000, 2048};
  constexpr int64_t Mmax = 2048;
  int pairs = 0, default_differ = 0;
  for (const Shape& sh : shapes) {
    const int64_t N = sh.N, K = sh.K;
    test::DeviceBuffer a(test::to_bf16(test::randn(static_cast<size_t>(Mmax * K), seed + 1, 1.0f)));
    test::DeviceBuffer w(test::to_bf16(test::randn(static_cast<size_t>(N * K), seed + 2, 0.03f)));
    test::DeviceBuffer bias(test::to_bf16(test::randn(static_cast<size_t>(N), seed + 3, 0.1f)));
    test::DeviceBuffer c(static_cast<size_t>(Mmax * N) * sizeof(bf16));
    for (const bool invariant : {true, false}) {
      OpPlans plans;
      plans.set_batch_invariant(invariant);
      const OpPlansScope scope(plans);
      auto run = [&](int64_t M) {
        cuda::gemm("t_bi", false, true, M, N, K, 1.0f, static_cast<const bf16*>(a.data()), K,
                   static_cast<const bf16*>(w.data()), K, 0.0f, static_cast<bf16*>(c.data()), N,
                   sh.bias ? static_cast<const bf16*>(bias.data()) : nullptr);
        std::vector<float> out = test::from_bf16(c.download<bf16>());
        out.resize(static_cast<size_t>(M * N));
        return out;
      };
      const std::vector<float> ref = run(Mmax);
      for (const int64_t M : Ms) {
        const std::vector<float> got = run(M);
        const std::vector<float> want(ref.begin(), ref.begin() + M * N);
        if (invariant) {
          ++pairs;
          EXPECT_TRUE(test::bitwise_equal("batch-invariant GEMM N=" + std::to_string(N) + " K=" + std::to_string(K) +
                                              " M=" + std::to_string(M) + " vs M=2048",
                                          got, want))
              << "seed=" << seed;
        } else {
          default_differ += got == want ? 0 : 1;
        }
      }
    }
  }
  std::printf("measured: (weight shape, M) pairs whose rows differ from M=2048's: default plans %d of %d, "
              "batch-invariant plans checked equal on all %d\n",
              default_differ, pairs, pairs);
}
#endif

}  // namespace
}  // namespace lmf
