// test_cuda_norm.cpp: CUDA LayerNorm and RMSNorm forward/backward (ops/norm.h) against the CPU
// reference: every pair of awkward sizes, a realistic size (N=4096, C=768, several dweight row
// chunks), rows with a large offset, leading dims; outputs and statistics poisoned, gradients
// prefilled (accumulation), bitwise determinism. Then the fused residual + norm (f32 and bf16), and
// bf16 rows (mixed precision) against the CPU fp32 op on the same bf16-rounded inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/device.h"
#include "ops/norm.h"
#include "ops/residual.h"
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
  std::vector<float> out, mean, rstd, dinp, dweight, dbias, dsum;
};

// Forward and backward of kind k on the CPU, or on the GPU (outputs poisoned first).
Result run(Kind k, bool gpu, int64_t N, int64_t C, const std::vector<float>& x, const std::vector<float>& w,
           const std::vector<float>& b, const std::vector<float>& dy, const std::vector<float>& dx0,
           const std::vector<float>& dw0, const std::vector<float>& db0, const std::vector<float>& ds0,
           bool with_sum = true) {
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
    r.dsum = ds0;
    const Tensor tds = with_sum ? tensor_of(r.dsum, {C}, "dinp_sum") : Tensor();
    if (ln) {
      layernorm_forward(tensor_of(r.out, {N, C}, "out"), tensor_of(r.mean, {N}, "mean"), tensor_of(r.rstd, {N}, "rstd"),
                        tensor_of(xs, {N, C}, "inp"), tensor_of(ws, {C}, "weight"),
                        bias ? tensor_of(bs, {C}, "bias") : Tensor(), kEps);
      layernorm_backward(tensor_of(r.dinp, {N, C}, "dinp"), tensor_of(r.dweight, {C}, "dweight"),
                         bias ? tensor_of(r.dbias, {C}, "dbias") : Tensor(), tensor_of(dys, {N, C}, "dout"),
                         tensor_of(xs, {N, C}, "inp"), tensor_of(ws, {C}, "weight"), tensor_of(r.mean, {N}, "mean"),
                         tensor_of(r.rstd, {N}, "rstd"), tds);
    } else {
      rmsnorm_forward(tensor_of(r.out, {N, C}, "out"), tensor_of(r.rstd, {N}, "rstd"), tensor_of(xs, {N, C}, "inp"),
                      tensor_of(ws, {C}, "weight"), kEps);
      rmsnorm_backward(tensor_of(r.dinp, {N, C}, "dinp"), tensor_of(r.dweight, {C}, "dweight"),
                       tensor_of(dys, {N, C}, "dout"), tensor_of(xs, {N, C}, "inp"), tensor_of(ws, {C}, "weight"),
                       tensor_of(r.rstd, {N}, "rstd"), tds);
    }
    return r;
  }
  const size_t nb = x.size() * sizeof(float), sb = static_cast<size_t>(N) * sizeof(float);
  DeviceBuffer gx(x), gw(w), gb(b), gdy(dy), gout(nb), gmean(sb), grstd(sb), gdx(dx0), gdw(dw0), gdb(db0), gds(ds0);
  const Tensor tds = with_sum ? gds.tensor(DType::f32, {C}, "dinp_sum") : Tensor();
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
                       gmean.tensor(DType::f32, {N}, "mean"), grstd.tensor(DType::f32, {N}, "rstd"), tds);
  } else {
    rmsnorm_forward(gout.tensor(DType::f32, {N, C}, "out"), grstd.tensor(DType::f32, {N}, "rstd"),
                    gx.tensor(DType::f32, {N, C}, "inp"), gw.tensor(DType::f32, {C}, "weight"), kEps);
    rmsnorm_backward(gdx.tensor(DType::f32, {N, C}, "dinp"), gdw.tensor(DType::f32, {C}, "dweight"),
                     gdy.tensor(DType::f32, {N, C}, "dout"), gx.tensor(DType::f32, {N, C}, "inp"),
                     gw.tensor(DType::f32, {C}, "weight"), grstd.tensor(DType::f32, {N}, "rstd"), tds);
  }
  r.out = gout.download<float>();
  r.mean = ln ? gmean.download<float>() : std::vector<float>(static_cast<size_t>(N), 0.0f);
  r.rstd = grstd.download<float>();
  r.dinp = gdx.download<float>();
  r.dweight = gdw.download<float>();
  r.dbias = gdb.download<float>();
  r.dsum = gds.download<float>();
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
             db0 = randn(w.size(), seed + 6, 0.5f), ds0 = randn(w.size(), seed + 7, 0.5f);
  cuda_reserve_workspace(norm_backward_cuda_workspace(N, C));
  const Result cpu = run(k, false, N, C, x, w, b, dy, dx0, dw0, db0, ds0);
  const Result gpu = run(k, true, N, C, x, w, b, dy, dx0, dw0, db0, ds0);
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
  // dinp_sum: column sums of dinp (values of order sqrt(N)), so the dinp tolerance scaled by N
  EXPECT_TRUE(all_close("dinp_sum " + what, gpu.dsum, to_double(cpu.dsum),
                        static_cast<double>(N) * (offset != 0.0f ? kOffsetFwdAtol : kDinpAtol) * max_rstd(cpu.rstd),
                        kDinpRtol));

  // again, without dinp_sum: the same bits everywhere else (the kernels without the sum), the prefill kept
  const Result again = run(k, true, N, C, x, w, b, dy, dx0, dw0, db0, ds0, false);
  for (auto [a, g, name] : {std::tuple{&again.out, &gpu.out, "out"}, std::tuple{&again.mean, &gpu.mean, "mean"},
                            std::tuple{&again.rstd, &gpu.rstd, "rstd"}, std::tuple{&again.dinp, &gpu.dinp, "dinp"},
                            std::tuple{&again.dweight, &gpu.dweight, "dweight"},
                            std::tuple{&again.dbias, &gpu.dbias, "dbias"}, std::tuple{&again.dsum, &ds0, "dinp_sum prefill"}})
    EXPECT_TRUE(bitwise_equal(*a, *g)) << name << " not deterministic " << what;
  const Result twice = run(k, true, N, C, x, w, b, dy, dx0, dw0, db0, ds0);
  EXPECT_TRUE(bitwise_equal(twice.dsum, gpu.dsum)) << "dinp_sum not deterministic " << what;
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
    check_case(k, 5000, 1000);  // fused backward: 3 rows per warp, a partial last block, partial lane packs
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

// ---- bf16 rows (docs/MIXED_PRECISION.md) --------------------------------------------------------
// bf16 inp, out, dout, dinp; f32 weight, bias, mean, rstd, dweight, dbias. The reference is the CPU
// fp32 op on the same bf16-rounded inputs (x, dout, the dinp prefill); errors are
// rel_l2_error = ||gpu - ref|| / ||ref|| per tensor. u = 2^-8 is bf16's unit roundoff (8 significant
// bits: one rounding is off by at most u relative per element, ~2^-9.2 rms over random values; the
// contract's "2^-9" is that rms, not the bound).
// - mean, rstd (f32): both sides sum the same (exact) inputs in double and round once to f32; only the
//   summation order differs: <= 1 ulp, bound 1e-6.
// - out, dinp (bf16): the GPU evaluates the CPU's fp32 expressions on the same inputs with mean/rstd
//   within 1 ulp (dinp: row sums in double), so its fp32 values are within a few ulp (~1e-6
//   relative) of the CPU's, and the stored bf16 adds one rounding. Against the fp32 reference:
//   <= u + 2e-5 at any size (a hard bound). Against the reference rounded to bf16 the two agree
//   except for rare one-ulp flips where the fp32 values straddle a rounding tie, so on tensors of
//   >= 4096 elements (enough that a handful of flips cannot matter) the bound is u / 8. Measured on
//   an H200: 0 (the rounded values agreed everywhere); against the fp32 reference out up to 3.7e-3
//   (C = 1: a single rounding per row), dinp up to 2e-3.
// - dweight, dbias (f32): sums over rows in double of the same products (xhat from the 1-ulp mean/
//   rstd), added to the f32 prefill: ~1e-7, bound 1e-5. Measured: mean, rstd, dweight, dbias 0.
constexpr double kU = 1.0 / 256;                  // 2^-8
constexpr double kBf16Bound = kU + 2e-5;           // bf16 output vs the fp32 reference, any size
constexpr double kBf16RoundedBound = kU / 8;       // vs the bf16-rounded reference, >= kMinRoundedCheck elements
constexpr size_t kMinRoundedCheck = 4096;
constexpr double kBf16StatBound = 1e-6, kBf16ParamBound = 1e-5;

bool bitwise_equal(const std::vector<bf16>& a, const std::vector<bf16>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(bf16)) == 0;
}

// Worst errors over the cases of one test, printed at its end ("measured").
struct Worst {
  double v[9] = {};
  void take(int i, double e) { v[i] = std::max(v[i], e); }
};

// Checks a bf16 result against the fp32 reference (both bounds above); returns the two errors.
std::pair<double, double> check_bf16_output(const std::string& what, const std::vector<float>& got,
                                            const std::vector<float>& ref) {
  const double raw = test::rel_l2_error(got, ref), rounded = test::rel_l2_error(got, test::round_bf16(ref));
  EXPECT_LE(raw, kBf16Bound) << what << " (vs fp32 reference)";
  if (ref.size() >= kMinRoundedCheck) EXPECT_LE(rounded, kBf16RoundedBound) << what << " (vs bf16-rounded reference)";
  return {raw, rounded};
}

// bf16 results of one forward + backward on the GPU (outputs and statistics poisoned first).
struct Bf16Result {
  std::vector<bf16> out, dinp;
  std::vector<float> mean, rstd, dweight, dbias, dsum;
};

Bf16Result run_bf16(Kind k, int64_t N, int64_t C, const std::vector<float>& x, const std::vector<float>& w,
                    const std::vector<float>& b, const std::vector<float>& dy, const std::vector<float>& dx0,
                    const std::vector<float>& dw0, const std::vector<float>& db0, const std::vector<float>& ds0,
                    bool with_sum = true) {
  const bool ln = k != Kind::rmsnorm, bias = k == Kind::layernorm_bias;
  const size_t nb = x.size() * sizeof(bf16), sb = static_cast<size_t>(N) * sizeof(float);
  DeviceBuffer gx(test::to_bf16(x)), gw(w), gb(b), gdy(test::to_bf16(dy)), gout(nb), gmean(sb), grstd(sb),
      gdx(test::to_bf16(dx0)), gdw(dw0), gdb(db0), gds(ds0);
  const Tensor tds = with_sum ? gds.tensor(DType::f32, {C}, "dinp_sum") : Tensor();
  gout.poison();
  gmean.poison();
  grstd.poison();
  const Tensor tx = gx.tensor(DType::bf16, {N, C}, "inp"), tw = gw.tensor(DType::f32, {C}, "weight"),
               tout = gout.tensor(DType::bf16, {N, C}, "out"), trstd = grstd.tensor(DType::f32, {N}, "rstd"),
               tmean = gmean.tensor(DType::f32, {N}, "mean"), tdx = gdx.tensor(DType::bf16, {N, C}, "dinp"),
               tdy = gdy.tensor(DType::bf16, {N, C}, "dout"), tdw = gdw.tensor(DType::f32, {C}, "dweight");
  if (ln) {
    layernorm_forward(tout, tmean, trstd, tx, tw, bias ? gb.tensor(DType::f32, {C}, "bias") : Tensor(), kEps);
    layernorm_backward(tdx, tdw, bias ? gdb.tensor(DType::f32, {C}, "dbias") : Tensor(), tdy, tx, tw, tmean, trstd,
                       tds);
  } else {
    rmsnorm_forward(tout, trstd, tx, tw, kEps);
    rmsnorm_backward(tdx, tdw, tdy, tx, tw, trstd, tds);
  }
  Bf16Result r;
  r.out = gout.download<bf16>();
  r.mean = ln ? gmean.download<float>() : std::vector<float>(static_cast<size_t>(N), 0.0f);
  r.rstd = grstd.download<float>();
  r.dinp = gdx.download<bf16>();
  r.dweight = gdw.download<float>();
  r.dbias = gdb.download<float>();
  r.dsum = gds.download<float>();
  return r;
}

// prefill + column sums of the stored bf16 dinp, in double: what dinp_sum must hold
std::vector<float> column_sums(const std::vector<float>& prefill, const std::vector<bf16>& dinp, int64_t N, int64_t C) {
  std::vector<double> s(prefill.begin(), prefill.end());
  const std::vector<float> d = test::from_bf16(dinp);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) s[static_cast<size_t>(c)] += static_cast<double>(d[static_cast<size_t>(n * C + c)]);
  return std::vector<float>(s.begin(), s.end());
}

// Sizes of the bf16 tests: C = 1, 7 (scalar path), 768, 1000 (128-bit path, rows in registers; 1000: the
// widest such rows, a partial last pack), 3072 + 8 (128-bit path, wide rows); N = 1, 5, 333.
const int64_t kBf16Cs[] = {1, 7, 768, 1000, 3080};
const int64_t kBf16Ns[] = {1, 5, 333};

TEST(CudaNorm, Bf16MatchesCpuOnRoundedInputs) {
  LMF_REQUIRE_GPU();
  Worst worst;  // out, out (rounded ref), dinp, dinp (rounded ref), mean, rstd, dweight, dbias
  for (Kind k : {Kind::layernorm_bias, Kind::layernorm, Kind::rmsnorm})
    for (int64_t N : kBf16Ns)
      for (int64_t C : kBf16Cs) {
        const uint64_t seed = test::fresh_seed();
        const std::string what = std::string("bf16 ") + kind_name(k) + " N=" + std::to_string(N) +
                                 " C=" + std::to_string(C) + " seed=" + std::to_string(seed);
        const size_t n = static_cast<size_t>(N * C);
        const auto x = test::round_bf16(randn(n, seed)), dy = test::round_bf16(randn(n, seed + 3)),
                   dx0 = test::round_bf16(randn(n, seed + 4, 0.5f));
        auto w = randn(static_cast<size_t>(C), seed + 1, 0.3f);
        for (float& v : w) v += 1.0f;
        const auto b = randn(static_cast<size_t>(C), seed + 2, 0.3f), dw0 = randn(w.size(), seed + 5, 0.5f),
                   db0 = randn(w.size(), seed + 6, 0.5f), ds0 = randn(w.size(), seed + 7, 0.5f);
        cuda_reserve_workspace(norm_backward_cuda_workspace(N, C));
        const Result cpu = run(k, false, N, C, x, w, b, dy, dx0, dw0, db0, ds0);
        const Bf16Result gpu = run_bf16(k, N, C, x, w, b, dy, dx0, dw0, db0, ds0);
        const auto [e_out, e_out_r] = check_bf16_output("out " + what, test::from_bf16(gpu.out), cpu.out);
        const auto [e_dx, e_dx_r] = check_bf16_output("dinp " + what, test::from_bf16(gpu.dinp), cpu.dinp);
        const double e_mean = test::rel_l2_error(gpu.mean, cpu.mean), e_rstd = test::rel_l2_error(gpu.rstd, cpu.rstd),
                     e_dw = test::rel_l2_error(gpu.dweight, cpu.dweight),
                     e_db = test::rel_l2_error(gpu.dbias, cpu.dbias);
        if (k != Kind::rmsnorm) EXPECT_LE(e_mean, kBf16StatBound) << "mean " << what;
        EXPECT_LE(e_rstd, kBf16StatBound) << "rstd " << what;
        EXPECT_LE(e_dw, kBf16ParamBound) << "dweight " << what;
        EXPECT_LE(e_db, kBf16ParamBound) << "dbias " << what;  // without bias: the prefill, untouched
        // dinp_sum sums the stored (rounded) dinp: against those values summed in double
        const double e_ds = test::rel_l2_error(gpu.dsum, column_sums(ds0, gpu.dinp, N, C));
        EXPECT_LE(e_ds, kBf16ParamBound) << "dinp_sum " << what;
        int i = 0;
        for (double e : {e_out, e_out_r, e_dx, e_dx_r, e_mean, e_rstd, e_dw, e_db, e_ds}) worst.take(i++, e);

        // run again, in half the cases without dinp_sum: the other outputs keep their bits either way
        const bool sum_again = (N + C) % 2 == 0;
        const Bf16Result again = run_bf16(k, N, C, x, w, b, dy, dx0, dw0, db0, ds0, sum_again);
        EXPECT_TRUE(bitwise_equal(again.dsum, sum_again ? gpu.dsum : ds0)) << "dinp_sum " << what;
        EXPECT_TRUE(bitwise_equal(again.out, gpu.out)) << "out not deterministic " << what;
        EXPECT_TRUE(bitwise_equal(again.dinp, gpu.dinp)) << "dinp not deterministic " << what;
        for (auto [a, g, name] : {std::tuple{&again.mean, &gpu.mean, "mean"}, std::tuple{&again.rstd, &gpu.rstd, "rstd"},
                                  std::tuple{&again.dweight, &gpu.dweight, "dweight"},
                                  std::tuple{&again.dbias, &gpu.dbias, "dbias"}})
          EXPECT_TRUE(bitwise_equal(*a, *g)) << name << " not deterministic " << what;
      }
  std::printf("[ measured ] bf16 norms, worst rel_l2 over all cases: out %.3g (vs bf16-rounded ref %.3g; bounds %.3g, "
              "%.3g), dinp %.3g (%.3g), mean %.3g, rstd %.3g (bound %.3g), dweight %.3g, dbias %.3g, dinp_sum %.3g "
              "(bound %.3g)\n",
              worst.v[0], worst.v[1], kBf16Bound, kBf16RoundedBound, worst.v[2], worst.v[3], worst.v[4], worst.v[5],
              kBf16StatBound, worst.v[6], worst.v[7], worst.v[8], kBf16ParamBound);
}

// ---- fused residual + norm ----------------------------------------------------------------------
// residual_layernorm_forward / residual_rmsnorm_forward: res = a + b, out = norm(res).
// - res: bf16(float(a) + float(b)) (one fp32 add, rounded once): bitwise equal to the host's.
// - out, mean, rstd: the CPU norm of the rounded res (the values backward reads), bounds as above.
// - The GPU fused kernel computes exactly what residual_forward + the norm compute on the GPU:
//   bitwise equal to the unfused GPU path (f32 and bf16), and with res aliasing a.
// - f32: against the CPU fused op with the f32 tolerances of the tests above.

struct FusedResult {
  std::vector<float> res, out, mean, rstd;  // bf16 tensors widened (exact)
};

// Runs the fused op (fused = true) or residual_forward + the norm on the GPU. alias: res is a's buffer.
FusedResult run_fused_gpu(Kind k, DType dt, bool fused, bool alias, int64_t N, int64_t C, const std::vector<float>& a,
                          const std::vector<float>& b, const std::vector<float>& w, const std::vector<float>& bias) {
  const bool ln = k != Kind::rmsnorm;
  const bool bf = dt == DType::bf16;
  auto buffer = [&](const std::vector<float>& v) { return bf ? DeviceBuffer(test::to_bf16(v)) : DeviceBuffer(v); };
  const size_t nb = a.size() * dtype_size(dt), sb = static_cast<size_t>(N) * sizeof(float);
  DeviceBuffer ga = buffer(a), gb = buffer(b), gw(w), gbias(bias), gres(nb), gout(nb), gmean(sb), grstd(sb);
  for (DeviceBuffer* g : {&gres, &gout, &gmean, &grstd}) g->poison();
  const Tensor ta = ga.tensor(dt, {N, C}, "a"), tb = gb.tensor(dt, {N, C}, "b"),
               tres = alias ? ga.tensor(dt, {N, C}, "res") : gres.tensor(dt, {N, C}, "res"),
               tout = gout.tensor(dt, {N, C}, "out"), tmean = gmean.tensor(DType::f32, {N}, "mean"),
               trstd = grstd.tensor(DType::f32, {N}, "rstd"), tw = gw.tensor(DType::f32, {C}, "weight");
  const Tensor tbias = k == Kind::layernorm_bias ? gbias.tensor(DType::f32, {C}, "bias") : Tensor();
  if (fused) {
    if (ln) residual_layernorm_forward(tres, tout, tmean, trstd, ta, tb, tw, tbias, kEps);
    else residual_rmsnorm_forward(tres, tout, trstd, ta, tb, tw, kEps);
  } else {
    residual_forward(tres, ta, tb);
    if (ln) layernorm_forward(tout, tmean, trstd, tres, tw, tbias, kEps);
    else rmsnorm_forward(tout, trstd, tres, tw, kEps);
  }
  const DeviceBuffer& res_buf = alias ? ga : gres;
  FusedResult r;
  r.res = bf ? test::from_bf16(res_buf.download<bf16>()) : res_buf.download<float>();
  r.out = bf ? test::from_bf16(gout.download<bf16>()) : gout.download<float>();
  r.mean = ln ? gmean.download<float>() : std::vector<float>(static_cast<size_t>(N), 0.0f);
  r.rstd = grstd.download<float>();
  return r;
}

// The CPU reference: norm(res) for the given res (f32), as the two unfused CPU ops.
FusedResult cpu_norm_of(Kind k, int64_t N, int64_t C, std::vector<float> res, std::vector<float> w,
                        std::vector<float> bias) {
  FusedResult r;
  r.out.resize(res.size());
  r.mean.assign(static_cast<size_t>(N), 0.0f);
  r.rstd.resize(static_cast<size_t>(N));
  if (k != Kind::rmsnorm)
    layernorm_forward(tensor_of(r.out, {N, C}, "out"), tensor_of(r.mean, {N}, "mean"), tensor_of(r.rstd, {N}, "rstd"),
                      tensor_of(res, {N, C}, "res"), tensor_of(w, {C}, "weight"),
                      k == Kind::layernorm_bias ? tensor_of(bias, {C}, "bias") : Tensor(), kEps);
  else
    rmsnorm_forward(tensor_of(r.out, {N, C}, "out"), tensor_of(r.rstd, {N}, "rstd"), tensor_of(res, {N, C}, "res"),
                    tensor_of(w, {C}, "weight"), kEps);
  r.res = std::move(res);
  return r;
}

void expect_fused_bitwise(const FusedResult& a, const FusedResult& b, const std::string& what) {
  EXPECT_TRUE(bitwise_equal(a.res, b.res)) << "res " << what;
  EXPECT_TRUE(bitwise_equal(a.out, b.out)) << "out " << what;
  EXPECT_TRUE(bitwise_equal(a.mean, b.mean)) << "mean " << what;
  EXPECT_TRUE(bitwise_equal(a.rstd, b.rstd)) << "rstd " << what;
}

TEST(CudaNorm, FusedResidualNormBf16) {
  LMF_REQUIRE_GPU();
  Worst worst;  // out, out (rounded ref), mean, rstd
  for (Kind k : {Kind::layernorm_bias, Kind::layernorm, Kind::rmsnorm})
    for (int64_t N : kBf16Ns)
      for (int64_t C : kBf16Cs) {
        const uint64_t seed = test::fresh_seed();
        const std::string what = std::string("bf16 fused ") + kind_name(k) + " N=" + std::to_string(N) +
                                 " C=" + std::to_string(C) + " seed=" + std::to_string(seed);
        const size_t n = static_cast<size_t>(N * C);
        const auto a = test::round_bf16(randn(n, seed)), b = test::round_bf16(randn(n, seed + 1, 0.5f));
        auto w = randn(static_cast<size_t>(C), seed + 2, 0.3f);
        for (float& v : w) v += 1.0f;
        const auto bias = randn(static_cast<size_t>(C), seed + 3, 0.3f);
        // res = bf16(a + b) on the host; the reference normalises exactly those values
        std::vector<float> sum(n);
        for (size_t i = 0; i < n; ++i) sum[i] = a[i] + b[i];
        const FusedResult ref = cpu_norm_of(k, N, C, test::round_bf16(sum), w, bias);
        const FusedResult gpu = run_fused_gpu(k, DType::bf16, true, false, N, C, a, b, w, bias);
        EXPECT_TRUE(bitwise_equal(gpu.res, ref.res)) << "res != bf16(a + b) " << what;
        const auto [e_out, e_out_r] = check_bf16_output("out " + what, gpu.out, ref.out);
        const double e_mean = test::rel_l2_error(gpu.mean, ref.mean), e_rstd = test::rel_l2_error(gpu.rstd, ref.rstd);
        if (k != Kind::rmsnorm) EXPECT_LE(e_mean, kBf16StatBound) << "mean " << what;
        EXPECT_LE(e_rstd, kBf16StatBound) << "rstd " << what;
        int i = 0;
        for (double e : {e_out, e_out_r, e_mean, e_rstd}) worst.take(i++, e);
        expect_fused_bitwise(run_fused_gpu(k, DType::bf16, true, false, N, C, a, b, w, bias), gpu,
                             "not deterministic " + what);
        expect_fused_bitwise(run_fused_gpu(k, DType::bf16, false, false, N, C, a, b, w, bias), gpu,
                             "fused != residual_forward + norm " + what);
        expect_fused_bitwise(run_fused_gpu(k, DType::bf16, true, true, N, C, a, b, w, bias), gpu,
                             "res aliasing a differs " + what);
      }
  std::printf("[ measured ] bf16 fused residual + norm, worst rel_l2: out %.3g (vs bf16-rounded ref %.3g; bounds "
              "%.3g, %.3g), mean %.3g, rstd %.3g (bound %.3g); res bitwise bf16(a + b)\n",
              worst.v[0], worst.v[1], kBf16Bound, kBf16RoundedBound, worst.v[2], worst.v[3], kBf16StatBound);
}

TEST(CudaNorm, FusedResidualNormF32) {
  LMF_REQUIRE_GPU();
  for (Kind k : {Kind::layernorm_bias, Kind::layernorm, Kind::rmsnorm})
    for (int64_t N : kBf16Ns)
      for (int64_t C : {int64_t{1}, int64_t{7}, int64_t{768}, int64_t{3080}, int64_t{13000}}) {  // 13000: 1 row/block
        const uint64_t seed = test::fresh_seed();
        const std::string what = std::string("f32 fused ") + kind_name(k) + " N=" + std::to_string(N) +
                                 " C=" + std::to_string(C) + " seed=" + std::to_string(seed);
        const size_t n = static_cast<size_t>(N * C);
        auto a = randn(n, seed), b = randn(n, seed + 1, 0.5f), w = randn(static_cast<size_t>(C), seed + 2, 0.3f),
             bias = randn(static_cast<size_t>(C), seed + 3, 0.3f);
        for (float& v : w) v += 1.0f;
        // CPU fused op (= residual_forward + norm, tests/test_ops_norm.cpp)
        std::vector<float> res(n), out(n), mean(static_cast<size_t>(N), 0.0f), rstd(static_cast<size_t>(N));
        if (k != Kind::rmsnorm)
          residual_layernorm_forward(tensor_of(res, {N, C}, "res"), tensor_of(out, {N, C}, "out"),
                                     tensor_of(mean, {N}, "mean"), tensor_of(rstd, {N}, "rstd"),
                                     tensor_of(a, {N, C}, "a"), tensor_of(b, {N, C}, "b"), tensor_of(w, {C}, "w"),
                                     k == Kind::layernorm_bias ? tensor_of(bias, {C}, "bias") : Tensor(), kEps);
        else
          residual_rmsnorm_forward(tensor_of(res, {N, C}, "res"), tensor_of(out, {N, C}, "out"),
                                   tensor_of(rstd, {N}, "rstd"), tensor_of(a, {N, C}, "a"), tensor_of(b, {N, C}, "b"),
                                   tensor_of(w, {C}, "w"), kEps);
        const FusedResult gpu = run_fused_gpu(k, DType::f32, true, false, N, C, a, b, w, bias);
        EXPECT_TRUE(bitwise_equal(gpu.res, res)) << "res " << what;  // one fp32 add
        EXPECT_TRUE(all_close("out " + what, gpu.out, to_double(out), kFwdAtol, kFwdRtol));
        if (k != Kind::rmsnorm) EXPECT_TRUE(all_close("mean " + what, gpu.mean, to_double(mean), kStatAtol, kStatRtol));
        EXPECT_TRUE(all_close("rstd " + what, gpu.rstd, to_double(rstd), kStatAtol, kStatRtol));
        expect_fused_bitwise(run_fused_gpu(k, DType::f32, false, false, N, C, a, b, w, bias), gpu,
                             "fused != residual_forward + norm " + what);
        expect_fused_bitwise(run_fused_gpu(k, DType::f32, true, true, N, C, a, b, w, bias), gpu,
                             "res aliasing a differs " + what);
      }
}

// Time per call at the GPT-2 124M training shape (N = B T = 16384, C = 768), printed only, in f32 and
// bf16 rows: layernorm forward, fused residual + layernorm forward, layernorm backward (with dbias),
// rmsnorm backward. The outputs must at least be finite. Memory moved per call (bf16): forward 2, fused
// forward 4, backward 4 (dout, inp, dinp read and written) times N C elements.
TEST(CudaNorm, Gpt2Throughput) {
  LMF_REQUIRE_GPU();
  const int64_t N = 16384, C = 768;
  const uint64_t seed = test::fresh_seed();
  const size_t n = static_cast<size_t>(N * C);
  auto w = randn(static_cast<size_t>(C), seed + 1, 0.3f);
  for (float& v : w) v += 1.0f;
  const auto bias = randn(static_cast<size_t>(C), seed + 2, 0.3f);
  cuda_reserve_workspace(norm_backward_cuda_workspace(N, C));
  for (DType dt : {DType::bf16, DType::f32}) {
    const bool bf = dt == DType::bf16;
    auto buffer = [&](const std::vector<float>& v) { return bf ? DeviceBuffer(test::to_bf16(v)) : DeviceBuffer(v); };
    DeviceBuffer ga = buffer(randn(n, seed)), gb = buffer(randn(n, seed + 3, 0.5f)), gdy = buffer(randn(n, seed + 4)),
                 gdx = buffer(std::vector<float>(n, 0.0f)), gres(n * dtype_size(dt)), gout(n * dtype_size(dt)),
                 gmean(static_cast<size_t>(N) * 4), grstd(static_cast<size_t>(N) * 4), gw(w), gbias(bias),
                 gdw(std::vector<float>(static_cast<size_t>(C), 0.0f)),
                 gdb(std::vector<float>(static_cast<size_t>(C), 0.0f));
    const Tensor ta = ga.tensor(dt, {N, C}, "a"), tb = gb.tensor(dt, {N, C}, "b"), tres = gres.tensor(dt, {N, C}, "res"),
                 tout = gout.tensor(dt, {N, C}, "out"), tdy = gdy.tensor(dt, {N, C}, "dout"),
                 tdx = gdx.tensor(dt, {N, C}, "dinp"), tmean = gmean.tensor(DType::f32, {N}, "mean"),
                 trstd = grstd.tensor(DType::f32, {N}, "rstd"), tw = gw.tensor(DType::f32, {C}, "weight"),
                 tbias = gbias.tensor(DType::f32, {C}, "bias"), tdw = gdw.tensor(DType::f32, {C}, "dweight"),
                 tdb = gdb.tensor(DType::f32, {C}, "dbias");
    // res is written by the first op; the others read it
    const std::pair<const char*, std::function<void()>> ops[] = {
        {"residual_layernorm_forward",
         [&] { residual_layernorm_forward(tres, tout, tmean, trstd, ta, tb, tw, tbias, kEps); }},
        {"layernorm_forward", [&] { layernorm_forward(tout, tmean, trstd, tres, tw, tbias, kEps); }},
        {"layernorm_backward", [&] { layernorm_backward(tdx, tdw, tdb, tdy, tres, tw, tmean, trstd); }},
        {"rmsnorm_backward", [&] { rmsnorm_backward(tdx, tdw, tdy, tres, tw, trstd); }},
    };
    std::vector<void*> ev = cuda_event_pool_create(2);
    constexpr int kWarm = 3, kIters = 25;
    for (const auto& [name, op] : ops) {
      for (int i = 0; i < kWarm; ++i) op();
      cuda_event_record(ev[0]);
      for (int i = 0; i < kIters; ++i) op();
      cuda_event_record(ev[1]);
      device_synchronize();
      const double us = 1e3 * cuda_event_elapsed_ms(ev[0], ev[1]) / kIters;
      std::printf("[ measured ] %s %s N=%lld C=%lld: %.1f us per call\n", bf ? "bf16" : "f32", name,
                  static_cast<long long>(N), static_cast<long long>(C), us);
    }
    cuda_event_pool_destroy(ev);
    auto widened = [&](const DeviceBuffer& g) { return bf ? test::from_bf16(g.download<bf16>()) : g.download<float>(); };
    for (const DeviceBuffer* g : {&gout, &gdx}) {
      const std::vector<float> v = widened(*g);
      EXPECT_TRUE(std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); }));
    }
    for (const DeviceBuffer* g : {&gdw, &gdb}) {
      const std::vector<float> v = g->download<float>();
      EXPECT_TRUE(std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); }));
    }
  }
}

TEST(CudaNorm, Bf16DtypeMixesAreErrors) {
  LMF_REQUIRE_GPU();
  const int64_t N = 3, C = 8;
  DeviceBuffer x(N * C * 4), out(N * C * 4), stat(N * 4), w(C * 4);
  try {  // a bf16 weight: always f32 (the master)
    rmsnorm_forward(out.tensor(DType::bf16, {N, C}, "out"), stat.tensor(DType::f32, {N}, "rstd"),
                    x.tensor(DType::bf16, {N, C}, "inp"), w.tensor(DType::bf16, {C}, "rms.weight"), kEps);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'rms.weight'"), std::string::npos) << e.what();
  }
  try {  // bf16 inp with an f32 out
    layernorm_forward(out.tensor(DType::f32, {N, C}, "ln.out"), stat.tensor(DType::f32, {N}, "mean"),
                      stat.tensor(DType::f32, {N}, "rstd"), x.tensor(DType::bf16, {N, C}, "inp"),
                      w.tensor(DType::f32, {C}, "w"), Tensor(), kEps);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'ln.out'"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace lmf
