// test_cuda_norm.cpp: CUDA LayerNorm and RMSNorm forward/backward (ops/norm.h) against the CPU
// reference: every pair of awkward sizes, a realistic size (N=4096, C=768, several dweight row
// chunks), rows with a large offset, leading dims; outputs and statistics poisoned, gradients
// prefilled (accumulation), bitwise determinism.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/device.h"
#include "ops/norm.h"
#include "support/gpu_util.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::DeviceBuffer;
using test::randn;
using test::tensor_of;
using test::to_double;

constexpr float kEps = 1e-5f;

// mean, rstd: both backends accumulate in double and round once to f32; only the summation order
// differs, which can flip that rounding by one ulp.
constexpr double kStatAtol = 1e-9, kStatRtol = 2.4e-7;
// out: the same fp32 expression on the same (or 1-ulp different) mean/rstd; FMA contraction may
// differ between the compilers: a few ulp of |out| <~ 5. (For 1000-offset rows a 1-ulp change of the
// f32 mean is 6e-5 in x - mean, times rstd ~ 1.)
constexpr double kFwdAtol = 2e-6, kFwdRtol = 2e-6, kOffsetFwdAtol = 2e-4;
// dinp = rstd (w dout - a - xhat b): the row sums a, b are double on both sides; the fp32 expression
// may contract differently, and its rounding residual is amplified by rstd (316 for C = 1, where
// the exact result is 0), so the absolute tolerance scales with max(1, max rstd).
constexpr double kDinpAtol = 2e-6, kDinpRtol = 1e-5;
// dweight, dbias: sums over N rows in double on both sides (different order), rounded once, added to
// the prefill in fp32: ~1 ulp of the result.
constexpr double kParamAtol = 1e-6, kParamRtol = 1e-6;
constexpr double kOffsetParamAtol = 1e-3;  // 1000-offset rows: xhat carries the 1-ulp mean flip

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

double max_rstd(const std::vector<float>& rstd) {
  double m = 1.0;
  for (float r : rstd) m = std::max(m, static_cast<double>(r));
  return m;
}

enum class Kind { layernorm_bias, layernorm, rmsnorm };

const char* kind_name(Kind k) {
  return k == Kind::layernorm_bias ? "layernorm+bias" : k == Kind::layernorm ? "layernorm" : "rmsnorm";
}

// Results of one forward + backward.
struct Result {
  std::vector<float> out, mean, rstd, dinp, dweight, dbias;
};

// Forward and backward of kind k on the CPU, or on the GPU (outputs poisoned first).
Result run(Kind k, bool gpu, int64_t N, int64_t C, const std::vector<float>& x, const std::vector<float>& w,
           const std::vector<float>& b, const std::vector<float>& dy, const std::vector<float>& dx0,
           const std::vector<float>& dw0, const std::vector<float>& db0) {
  const bool ln = k != Kind::rmsnorm, bias = k == Kind::layernorm_bias;
  Result r;
  if (!gpu) {
    auto xs = x, ws = w, bs = b, dys = dy;
    r.out.resize(x.size());
    r.mean.resize(static_cast<size_t>(N));
    r.rstd.resize(static_cast<size_t>(N));
    r.dinp = dx0;
    r.dweight = dw0;
    r.dbias = db0;
    if (ln) {
      layernorm_forward(tensor_of(r.out, {N, C}, "out"), tensor_of(r.mean, {N}, "mean"), tensor_of(r.rstd, {N}, "rstd"),
                        tensor_of(xs, {N, C}, "inp"), tensor_of(ws, {C}, "weight"),
                        bias ? tensor_of(bs, {C}, "bias") : Tensor(), kEps);
      layernorm_backward(tensor_of(r.dinp, {N, C}, "dinp"), tensor_of(r.dweight, {C}, "dweight"),
                         bias ? tensor_of(r.dbias, {C}, "dbias") : Tensor(), tensor_of(dys, {N, C}, "dout"),
                         tensor_of(xs, {N, C}, "inp"), tensor_of(ws, {C}, "weight"), tensor_of(r.mean, {N}, "mean"),
                         tensor_of(r.rstd, {N}, "rstd"));
    } else {
      rmsnorm_forward(tensor_of(r.out, {N, C}, "out"), tensor_of(r.rstd, {N}, "rstd"), tensor_of(xs, {N, C}, "inp"),
                      tensor_of(ws, {C}, "weight"), kEps);
      rmsnorm_backward(tensor_of(r.dinp, {N, C}, "dinp"), tensor_of(r.dweight, {C}, "dweight"),
                       tensor_of(dys, {N, C}, "dout"), tensor_of(xs, {N, C}, "inp"), tensor_of(ws, {C}, "weight"),
                       tensor_of(r.rstd, {N}, "rstd"));
    }
    return r;
  }
  const size_t nb = x.size() * sizeof(float), sb = static_cast<size_t>(N) * sizeof(float);
  DeviceBuffer gx(x), gw(w), gb(b), gdy(dy), gout(nb), gmean(sb), grstd(sb), gdx(dx0), gdw(dw0), gdb(db0);
  gout.poison();
  gmean.poison();
  grstd.poison();
  if (ln) {
    layernorm_forward(gout.tensor(DType::f32, {N, C}, "out"), gmean.tensor(DType::f32, {N}, "mean"),
                      grstd.tensor(DType::f32, {N}, "rstd"), gx.tensor(DType::f32, {N, C}, "inp"),
                      gw.tensor(DType::f32, {C}, "weight"), bias ? gb.tensor(DType::f32, {C}, "bias") : Tensor(), kEps);
    layernorm_backward(gdx.tensor(DType::f32, {N, C}, "dinp"), gdw.tensor(DType::f32, {C}, "dweight"),
                       bias ? gdb.tensor(DType::f32, {C}, "dbias") : Tensor(), gdy.tensor(DType::f32, {N, C}, "dout"),
                       gx.tensor(DType::f32, {N, C}, "inp"), gw.tensor(DType::f32, {C}, "weight"),
                       gmean.tensor(DType::f32, {N}, "mean"), grstd.tensor(DType::f32, {N}, "rstd"));
  } else {
    rmsnorm_forward(gout.tensor(DType::f32, {N, C}, "out"), grstd.tensor(DType::f32, {N}, "rstd"),
                    gx.tensor(DType::f32, {N, C}, "inp"), gw.tensor(DType::f32, {C}, "weight"), kEps);
    rmsnorm_backward(gdx.tensor(DType::f32, {N, C}, "dinp"), gdw.tensor(DType::f32, {C}, "dweight"),
                     gdy.tensor(DType::f32, {N, C}, "dout"), gx.tensor(DType::f32, {N, C}, "inp"),
                     gw.tensor(DType::f32, {C}, "weight"), grstd.tensor(DType::f32, {N}, "rstd"));
  }
  r.out = gout.download<float>();
  r.mean = ln ? gmean.download<float>() : std::vector<float>(static_cast<size_t>(N), 0.0f);
  r.rstd = grstd.download<float>();
  r.dinp = gdx.download<float>();
  r.dweight = gdw.download<float>();
  r.dbias = gdb.download<float>();
  return r;
}

// offset: added to every input (rows far from zero).
void check_case(Kind k, int64_t N, int64_t C, float offset = 0.0f) {
  const uint64_t seed = test::fresh_seed();
  const std::string what = std::string(kind_name(k)) + " N=" + std::to_string(N) + " C=" + std::to_string(C) +
                           " offset=" + std::to_string(offset) + " seed=" + std::to_string(seed);
  auto x = randn(static_cast<size_t>(N * C), seed);
  for (float& v : x) v += offset;
  auto w = randn(static_cast<size_t>(C), seed + 1, 0.3f);
  for (float& v : w) v += 1.0f;
  const auto b = randn(static_cast<size_t>(C), seed + 2, 0.3f), dy = randn(x.size(), seed + 3);
  const auto dx0 = randn(x.size(), seed + 4, 0.5f), dw0 = randn(w.size(), seed + 5, 0.5f),
             db0 = randn(w.size(), seed + 6, 0.5f);
  cuda_reserve_workspace(norm_backward_cuda_workspace(N, C));
  const Result cpu = run(k, false, N, C, x, w, b, dy, dx0, dw0, db0);
  const Result gpu = run(k, true, N, C, x, w, b, dy, dx0, dw0, db0);
  const double fwd_atol = offset != 0.0f ? kOffsetFwdAtol : kFwdAtol;
  const double param_atol = offset != 0.0f ? kOffsetParamAtol : kParamAtol;
  EXPECT_TRUE(all_close("out " + what, gpu.out, to_double(cpu.out), fwd_atol, kFwdRtol));
  if (k != Kind::rmsnorm) {
    EXPECT_TRUE(all_close("mean " + what, gpu.mean, to_double(cpu.mean), kStatAtol, kStatRtol));
  }
  EXPECT_TRUE(all_close("rstd " + what, gpu.rstd, to_double(cpu.rstd), kStatAtol, kStatRtol));
  EXPECT_TRUE(all_close("dinp " + what, gpu.dinp, to_double(cpu.dinp),
                        (offset != 0.0f ? kOffsetFwdAtol : kDinpAtol) * max_rstd(cpu.rstd), kDinpRtol));
  EXPECT_TRUE(all_close("dweight " + what, gpu.dweight, to_double(cpu.dweight), param_atol, kParamRtol));
  // without bias the prefilled dbias must come back untouched
  EXPECT_TRUE(all_close("dbias " + what, gpu.dbias, to_double(cpu.dbias), param_atol, kParamRtol));

  const Result again = run(k, true, N, C, x, w, b, dy, dx0, dw0, db0);
  for (auto [a, g, name] : {std::tuple{&again.out, &gpu.out, "out"}, std::tuple{&again.mean, &gpu.mean, "mean"},
                            std::tuple{&again.rstd, &gpu.rstd, "rstd"}, std::tuple{&again.dinp, &gpu.dinp, "dinp"},
                            std::tuple{&again.dweight, &gpu.dweight, "dweight"},
                            std::tuple{&again.dbias, &gpu.dbias, "dbias"}})
    EXPECT_TRUE(bitwise_equal(*a, *g)) << name << " not deterministic " << what;
}

TEST(CudaNorm, AwkwardSizesMatchCpu) {
  LMF_REQUIRE_GPU();
  for (Kind k : {Kind::layernorm_bias, Kind::layernorm, Kind::rmsnorm})
    for (int64_t N : test::awkward_sizes())
      for (int64_t C : test::awkward_sizes()) check_case(k, N, C);
}

TEST(CudaNorm, RealisticSizesMatchCpu) {
  LMF_REQUIRE_GPU();
  for (Kind k : {Kind::layernorm_bias, Kind::layernorm, Kind::rmsnorm}) {
    check_case(k, 4096, 768);
    check_case(k, 1000, 4096);  // N not a multiple of the row chunk, wide rows
  }
}

TEST(CudaNorm, LargeOffsetRowsMatchCpu) {
  LMF_REQUIRE_GPU();
  for (Kind k : {Kind::layernorm_bias, Kind::rmsnorm}) check_case(k, 19, 111, 1000.0f);
}

TEST(CudaNorm, LeadingDimsFlatten) {
  LMF_REQUIRE_GPU();
  const int64_t B = 2, T = 7, C = 19;
  const uint64_t seed = test::fresh_seed();
  auto x = randn(static_cast<size_t>(B * T * C), seed), w = randn(static_cast<size_t>(C), seed + 1);
  std::vector<float> out(x.size()), rstd(static_cast<size_t>(B * T));
  rmsnorm_forward(tensor_of(out, {B, T, C}, "out"), tensor_of(rstd, {B, T}, "rstd"), tensor_of(x, {B, T, C}, "inp"),
                  tensor_of(w, {C}, "w"), kEps);
  DeviceBuffer gx(x), gw(w), gout(x.size() * sizeof(float)), grstd(rstd.size() * sizeof(float));
  gout.poison();
  grstd.poison();
  rmsnorm_forward(gout.tensor(DType::f32, {B, T, C}, "out"), grstd.tensor(DType::f32, {B, T}, "rstd"),
                  gx.tensor(DType::f32, {B, T, C}, "inp"), gw.tensor(DType::f32, {C}, "w"), kEps);
  EXPECT_TRUE(all_close("rmsnorm (B, T, C) out seed=" + std::to_string(seed), gout.download<float>(), to_double(out),
                        kFwdAtol, kFwdRtol));
  EXPECT_TRUE(all_close("rmsnorm (B, T, C) rstd seed=" + std::to_string(seed), grstd.download<float>(),
                        to_double(rstd), kStatAtol, kStatRtol));
}

}  // namespace
}  // namespace lmf
