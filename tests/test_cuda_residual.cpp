// CUDA residual add against the CPU reference (exact: one fp32 add per element), f32 and bf16.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "ops/residual.h"
#include "support/gpu_util.h"
#include "support/test_util.h"

namespace lmf {
namespace {

TEST(CudaResidual, ForwardAndBackwardMatchCpuExactly) {
  LMF_REQUIRE_GPU();
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{111}, int64_t{1} << 20}) {
    const uint64_t seed = test::fresh_seed();
    std::vector<float> a = test::randn(n, seed), b = test::randn(n, seed + 1), out(n);
    residual_forward(test::tensor_of(out, {n}, "out"), test::tensor_of(a, {n}, "a"), test::tensor_of(b, {n}, "b"));
    test::DeviceBuffer da(a), db(b), dout(n * 4);
    dout.poison();
    residual_forward(dout.tensor(DType::f32, {n}, "out"), da.tensor(DType::f32, {n}, "a"),
                     db.tensor(DType::f32, {n}, "b"));
    EXPECT_EQ(dout.download<float>(), out) << "n=" << n << " seed=" << seed;
    // backward: da += g, db += g
    std::vector<float> g = test::randn(n, seed + 2), ra = a, rb = b;
    residual_backward(test::tensor_of(ra, {n}, "da"), test::tensor_of(rb, {n}, "db"), test::tensor_of(g, {n}, "g"));
    test::DeviceBuffer dg(g);
    residual_backward(da.tensor(DType::f32, {n}, "da"), db.tensor(DType::f32, {n}, "db"), dg.tensor(DType::f32, {n}, "g"));
    EXPECT_EQ(da.download<float>(), ra);
    EXPECT_EQ(db.download<float>(), rb);
  }
}

TEST(CudaResidual, ScaleMatchesCpuExactly) {
  LMF_REQUIRE_GPU();
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{111}, int64_t{1} << 20}) {
    const uint64_t seed = test::fresh_seed();
    std::vector<float> in = test::randn(n, seed), out(n);
    scale_forward(test::tensor_of(out, {n}, "out"), test::tensor_of(in, {n}, "in"), -1.0f);
    test::DeviceBuffer din(in), dout(n * 4);
    dout.poison();
    scale_forward(dout.tensor(DType::f32, {n}, "out"), din.tensor(DType::f32, {n}, "in"), -1.0f);
    EXPECT_EQ(dout.download<float>(), out) << "n=" << n << " seed=" << seed;
  }
}

TEST(CudaResidual, DeviceMismatchIsAnError) {
  LMF_REQUIRE_GPU();
  std::vector<float> a(4);
  test::DeviceBuffer d(16);
  EXPECT_THROW(residual_forward(d.tensor(DType::f32, {4}, "out"), test::tensor_of(a, {4}, "a"),
                                d.tensor(DType::f32, {4}, "b")),
               Error);
}

// ---- bf16 (docs/MIXED_PRECISION.md): all tensors bf16. The reference is the CPU fp32 op on the same
// bf16-rounded inputs, rounded to bf16. The GPU widens both operands exactly, adds once in fp32 (the
// CPU's add, correctly rounded) and rounds once to nearest even (as lmf::bf16): the result must equal
// the rounded reference bitwise, so the bound on rel_l2_error against it is 0 (against the unrounded
// fp32 reference it is bf16's unit roundoff 2^-8, the rounding alone). Sizes cover the 128-bit path
// (n % 8 == 0, aligned), the scalar path (odd n) and a misaligned view (offset by one element).

bool bitwise_equal(const std::vector<bf16>& a, const std::vector<bf16>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(bf16)) == 0;
}

// A bf16 view of n elements starting `offset` elements into buf.
Tensor bf16_view(const test::DeviceBuffer& buf, int64_t offset, int64_t n, const char* name) {
  return Tensor(static_cast<bf16*>(buf.data()) + offset, DType::bf16, {n}, name, Device::cuda);
}

TEST(CudaResidual, Bf16MatchesRoundedCpuExactly) {
  LMF_REQUIRE_GPU();
  double worst_fwd = 0, worst_bwd = 0, worst_raw = 0;
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{5 * 768}, int64_t{333 * 7}, int64_t{333 * 3080}})
    for (int64_t offset : {int64_t{0}, int64_t{1}}) {
      const uint64_t seed = test::fresh_seed();
      const std::string what = "n=" + std::to_string(n) + " offset=" + std::to_string(offset) +
                               " seed=" + std::to_string(seed);
      // inputs: bf16 values (some large and small magnitudes, so the sum rounds in various binades)
      std::vector<float> a = test::round_bf16(test::randn(n, seed)), b = test::round_bf16(test::randn(n, seed + 1, 3.0f));
      std::vector<float> g = test::round_bf16(test::randn(n, seed + 2)), da0 = test::round_bf16(test::randn(n, seed + 3));
      const auto db0 = test::round_bf16(test::randn(n, seed + 4, 0.01f));
      // CPU fp32 op on the rounded values
      std::vector<float> out(n), da = da0, db = db0;
      residual_forward(test::tensor_of(out, {n}, "out"), test::tensor_of(a, {n}, "a"), test::tensor_of(b, {n}, "b"));
      residual_backward(test::tensor_of(da, {n}, "da"), test::tensor_of(db, {n}, "db"), test::tensor_of(g, {n}, "g"));
      // GPU, twice (bitwise repeat)
      std::vector<bf16> first[3];
      for (int run = 0; run < 2; ++run) {
        auto padded = [&](const std::vector<float>& v) {
          std::vector<bf16> h(static_cast<size_t>(n + offset), bf16(0.0f));
          const auto r = test::to_bf16(v);
          std::copy(r.begin(), r.end(), h.begin() + offset);
          return test::DeviceBuffer(h);
        };
        test::DeviceBuffer ga = padded(a), gb = padded(b), gg = padded(g), gda = padded(da0), gdb = padded(db0),
                           gout((n + offset) * sizeof(bf16));
        gout.poison();
        residual_forward(bf16_view(gout, offset, n, "out"), bf16_view(ga, offset, n, "a"),
                         bf16_view(gb, offset, n, "b"));
        residual_backward(bf16_view(gda, offset, n, "da"), bf16_view(gdb, offset, n, "db"),
                          bf16_view(gg, offset, n, "g"));
        std::vector<bf16> got[3] = {gout.download<bf16>(), gda.download<bf16>(), gdb.download<bf16>()};
        for (auto& v : got) v.erase(v.begin(), v.begin() + offset);
        if (run == 0) {
          EXPECT_TRUE(bitwise_equal(got[0], test::to_bf16(out))) << "out != bf16(a + b) " << what;
          EXPECT_TRUE(bitwise_equal(got[1], test::to_bf16(da))) << "da != bf16(da0 + g) " << what;
          EXPECT_TRUE(bitwise_equal(got[2], test::to_bf16(db))) << "db != bf16(db0 + g) " << what;
          worst_fwd = std::max(worst_fwd, test::rel_l2_error(test::from_bf16(got[0]), test::round_bf16(out)));
          worst_bwd = std::max({worst_bwd, test::rel_l2_error(test::from_bf16(got[1]), test::round_bf16(da)),
                                test::rel_l2_error(test::from_bf16(got[2]), test::round_bf16(db))});
          const double raw = test::rel_l2_error(test::from_bf16(got[0]), out);
          EXPECT_LE(raw, 1.0 / 256) << "out vs the fp32 reference " << what;
          worst_raw = std::max(worst_raw, raw);
          for (int i = 0; i < 3; ++i) first[i] = std::move(got[i]);
        } else {
          for (int i = 0; i < 3; ++i) EXPECT_TRUE(bitwise_equal(got[i], first[i])) << "not deterministic " << what;
        }
      }
    }
  std::printf("[ measured ] bf16 residual, worst rel_l2 vs the bf16-rounded CPU result: forward %.3g, backward %.3g "
              "(bound 0: bitwise); forward vs the fp32 result %.3g (bound 2^-8)\n",
              worst_fwd, worst_bwd, worst_raw);
}

TEST(CudaResidual, Bf16DtypeMixIsAnError) {
  LMF_REQUIRE_GPU();
  test::DeviceBuffer d(64);
  try {
    residual_forward(d.tensor(DType::bf16, {4}, "out"), d.tensor(DType::bf16, {4}, "a"),
                     d.tensor(DType::f32, {4}, "res_b"));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'res_b'"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace lmf
