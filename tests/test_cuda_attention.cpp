// test_cuda_attention.cpp: CUDA causal attention forward/backward (ops/attention.h) against the CPU
// reference: T in {1, 7, 19, 111, 128, 1024}, MHA, GQA and MQA, head sizes below, at and above the
// block size (1, 7, 19, 64, 128, 160), extreme scores (queries at +-300), a long sequence
// (T = 6144); out/probs/dprobs poisoned,
// dqkv prefilled (accumulation), bitwise determinism.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "ops/attention.h"
#include "ops/gemm_cuda.h"
#include "support/gpu_util.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::DeviceBuffer;
using test::randn;
using test::tensor_of;
using test::to_double;

// Forward: scores are fp32 dot products over HS in another order (lane-strided warp sums vs BLAS),
// exp is CUDA's expf vs the CPU's Cephes exp, and out sums up to T products p v in another order:
// a few ulp of the scores, ~1e-7 relative of sum |p v| (the CPU test's bound against fp64 is 5e-6).
constexpr double kProbsAtol = 1e-6, kProbsRtol = 1e-5;
constexpr double kOutAtol = 1e-5, kOutRtol = 1e-5;
// Backward (from the same probs): dp = dO . v over HS (|dp| ~ sqrt(HS)), ds = p (dp - sum dp p), then
// sums over up to T rows; both sides fp32 in different orders. The CPU test's bound against FD is
// 2e-5 up to T = 300; allow more for T = 1024.
constexpr double kBwdAtol = 5e-5, kBwdRtol = 1e-4;
// Queries at +-300: scores in the hundreds carry fp32 errors of ~1e-4 (ulp(300) HS), which move
// probabilities by ~1e-4 relative; out mixes values of magnitude 300 (the CPU test's tolerances
// against fp64, observed there: out 9e-3, probs 1.6e-5).
constexpr double kExtremeOutAtol = 3e-2, kExtremeProbsAtol = 1e-4, kExtremeRtol = 1e-3;

struct Dims {
  int64_t B, T, NH, NKV, HS;
  int64_t C3() const { return (NH + 2 * NKV) * HS; }
  int64_t CO() const { return NH * HS; }
  std::string str() const {
    return "B=" + std::to_string(B) + " T=" + std::to_string(T) + " NH=" + std::to_string(NH) +
           " NKV=" + std::to_string(NKV) + " HS=" + std::to_string(HS);
  }
};

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// The lower triangle (s <= t) of a (B, NH, T, T) buffer, row by row.
std::vector<float> lower_triangle(const std::vector<float>& m, const Dims& d) {
  std::vector<float> r;
  for (int64_t bh = 0; bh < d.B * d.NH; ++bh)
    for (int64_t t = 0; t < d.T; ++t)
      for (int64_t s = 0; s <= t; ++s) r.push_back(m[(bh * d.T + t) * d.T + s]);
  return r;
}

struct Result {
  std::vector<float> out, probs, dqkv, dprobs;
};

// Forward of qkv, then backward of dout from `probs_in` (the CPU's probs, so the backward comparison
// is not affected by forward differences), dqkv prefilled with dqkv0. On the GPU every output is
// poisoned first.
Result run(bool gpu, const Dims& d, const std::vector<float>& qkv, const std::vector<float>& dout,
           const std::vector<float>& dqkv0, const std::vector<float>* probs_in) {
  const int64_t B = d.B, T = d.T, NH = d.NH;
  const int nh = static_cast<int>(d.NH), nkv = static_cast<int>(d.NKV);
  Result r;
  if (!gpu) {
    auto x = qkv, dy = dout;
    r.out.resize(static_cast<size_t>(B * T * d.CO()));
    r.probs.resize(static_cast<size_t>(B * NH * T * T));
    r.dprobs.resize(r.probs.size());
    r.dqkv = dqkv0;
    attention_forward(tensor_of(r.out, {B, T, d.CO()}, "out"), tensor_of(r.probs, {B, NH, T, T}, "probs"),
                      tensor_of(x, {B, T, d.C3()}, "qkv"), nh, nkv);
    auto p = probs_in ? *probs_in : r.probs;
    attention_backward(tensor_of(r.dqkv, {B, T, d.C3()}, "dqkv"), tensor_of(r.dprobs, {B, NH, T, T}, "dprobs"),
                       tensor_of(dy, {B, T, d.CO()}, "dout"), tensor_of(x, {B, T, d.C3()}, "qkv"),
                       tensor_of(p, {B, NH, T, T}, "probs"), nh, nkv);
    return r;
  }
  const size_t pb = static_cast<size_t>(B * NH * T * T) * sizeof(float);
  DeviceBuffer gqkv(qkv), gdout(dout), gdqkv(dqkv0), gout(static_cast<size_t>(B * T * d.CO()) * sizeof(float)),
      gprobs(pb), gdprobs(pb);
  gout.poison();
  gprobs.poison();
  gdprobs.poison();
  attention_forward(gout.tensor(DType::f32, {B, T, d.CO()}, "out"), gprobs.tensor(DType::f32, {B, NH, T, T}, "probs"),
                    gqkv.tensor(DType::f32, {B, T, d.C3()}, "qkv"), nh, nkv);
  r.out = gout.download<float>();
  r.probs = gprobs.download<float>();
  if (probs_in) gprobs.upload(*probs_in);
  attention_backward(gdqkv.tensor(DType::f32, {B, T, d.C3()}, "dqkv"),
                     gdprobs.tensor(DType::f32, {B, NH, T, T}, "dprobs"), gdout.tensor(DType::f32, {B, T, d.CO()}, "dout"),
                     gqkv.tensor(DType::f32, {B, T, d.C3()}, "qkv"), gprobs.tensor(DType::f32, {B, NH, T, T}, "probs"),
                     nh, nkv);
  r.dqkv = gdqkv.download<float>();
  r.dprobs = gdprobs.download<float>();
  return r;
}

// q and v entries at +-300 (k stays in [-1, 1]) when extreme, else N(0, 1).
std::vector<float> make_qkv(const Dims& d, uint64_t seed, bool extreme) {
  if (!extreme) return randn(static_cast<size_t>(d.B * d.T * d.C3()), seed);
  auto qkv = test::uniform(static_cast<size_t>(d.B * d.T * d.C3()), seed, -1.0f, 1.0f);
  auto big = test::uniform(qkv.size(), seed + 7, -300.0f, 300.0f);
  for (int64_t row = 0; row < d.B * d.T; ++row)
    for (int64_t c = 0; c < d.C3(); ++c)
      if (c < d.NH * d.HS || c >= (d.NH + d.NKV) * d.HS) qkv[row * d.C3() + c] = big[row * d.C3() + c];
  return qkv;
}

void check_case(const Dims& d, bool extreme = false) {
  const uint64_t seed = test::fresh_seed();
  const std::string what = d.str() + (extreme ? " extreme" : "") + " seed=" + std::to_string(seed);
  const auto qkv = make_qkv(d, seed, extreme);
  const auto dout = randn(static_cast<size_t>(d.B * d.T * d.CO()), seed + 1);
  const auto dqkv0 = randn(qkv.size(), seed + 2, 0.5f);
  const Result cpu = run(false, d, qkv, dout, dqkv0, nullptr);
  const Result gpu = run(true, d, qkv, dout, dqkv0, &cpu.probs);
  const double out_atol = extreme ? kExtremeOutAtol : kOutAtol, out_rtol = extreme ? kExtremeRtol : kOutRtol;
  const double probs_atol = extreme ? kExtremeProbsAtol : kProbsAtol, probs_rtol = extreme ? kExtremeRtol : kProbsRtol;
  EXPECT_TRUE(all_close("out " + what, gpu.out, to_double(cpu.out), out_atol, out_rtol));
  // The whole (T, T) rows: the zeros above the diagonal must be written too.
  EXPECT_TRUE(all_close("probs " + what, gpu.probs, to_double(cpu.probs), probs_atol, probs_rtol));
  if (extreme) {
    for (size_t i = 0; i < gpu.dqkv.size(); ++i)
      ASSERT_TRUE(std::isfinite(gpu.dqkv[i])) << "dqkv[" << i << "] " << what;
  } else {
    EXPECT_TRUE(all_close("dqkv " + what, gpu.dqkv, to_double(cpu.dqkv), kBwdAtol, kBwdRtol));
    // dprobs is scratch; its lower triangle holds dS on both backends.
    EXPECT_TRUE(all_close("dS " + what, lower_triangle(gpu.dprobs, d), to_double(lower_triangle(cpu.dprobs, d)),
                          kBwdAtol, kBwdRtol));
  }
  const Result again = run(true, d, qkv, dout, dqkv0, &cpu.probs);
  EXPECT_TRUE(bitwise_equal(again.out, gpu.out)) << "out not deterministic " << what;
  EXPECT_TRUE(bitwise_equal(again.probs, gpu.probs)) << "probs not deterministic " << what;
  EXPECT_TRUE(bitwise_equal(again.dqkv, gpu.dqkv)) << "dqkv not deterministic " << what;
  EXPECT_TRUE(bitwise_equal(again.dprobs, gpu.dprobs)) << "dprobs not deterministic " << what;
}

TEST(CudaAttention, AwkwardSizesMatchCpu) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);  // as the model does at set-up
  const Dims cases[] = {{2, 1, 4, 4, 7},  {2, 7, 4, 2, 7},   {3, 19, 3, 1, 19}, {2, 19, 4, 4, 1},
                        {1, 7, 2, 1, 111}, {2, 19, 4, 2, 160}, {1, 111, 2, 2, 19}, {2, 111, 6, 3, 64}};
  for (const Dims& d : cases) check_case(d);
}

TEST(CudaAttention, RealisticSizesMatchCpu) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);  // as the model does at set-up
  const Dims cases[] = {{2, 128, 4, 4, 64}, {1, 128, 8, 2, 128}, {1, 1024, 4, 4, 64}, {1, 1024, 8, 2, 64}};
  for (const Dims& d : cases) check_case(d);
}

TEST(CudaAttention, ExtremeScoresMatchCpu) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);  // as the model does at set-up
  for (const Dims& d : {Dims{2, 19, 4, 2, 7}, Dims{1, 300, 2, 1, 19}}) check_case(d, true);
}

// A long sequence: many query/key blocks of the GEMM formulation, rows far wider than a block.
TEST(CudaAttention, LongSequenceMatchesCpu) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);  // as the model does at set-up
  check_case({1, 6144, 1, 1, 16});
}

}  // namespace
}  // namespace lmf
