// test_cuda_rope.cpp: CUDA RoPE forward/backward (ops/rope.h) against the CPU reference on awkward
// sizes, MHA/GQA layouts, odd and realistic head sizes and position offsets; the table is built on the
// CPU and copied, as the model does. RoPE transforms in place, so instead of a poisoned output the
// whole qkv row is compared (v must come back untouched); bitwise determinism. Then bf16 qkv (mixed
// precision) against the CPU fp32 op on the same bf16-rounded inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "ops/rope.h"
#include "support/gpu_util.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::DeviceBuffer;
using test::randn;
using test::tensor_of;
using test::to_double;

// Same fp32 expressions (x1 c - x2 s) on the same table; only FMA contraction may differ between
// the compilers: 1 ulp of values ~N(0, 1).
constexpr double kAtol = 1e-6, kRtol = 1e-6;

struct Case {
  int64_t B, T, NH, NKV, HS, pos_offset;
  std::string str() const {
    return "B=" + std::to_string(B) + " T=" + std::to_string(T) + " NH=" + std::to_string(NH) +
           " NKV=" + std::to_string(NKV) + " HS=" + std::to_string(HS) + " pos_offset=" + std::to_string(pos_offset);
  }
};

TEST(CudaRope, ForwardAndBackwardMatchCpu) {
  LMF_REQUIRE_GPU();
  const Case cases[] = {{1, 1, 1, 1, 2, 0},   {1, 7, 2, 2, 6, 3},     {3, 19, 4, 2, 38, 0},  {2, 111, 3, 1, 14, 5},
                        {7, 7, 6, 3, 64, 1},  {4, 1024, 12, 4, 64, 0}, {1, 19, 2, 1, 222, 100}};
  for (const Case& c : cases) {
    const uint64_t seed = test::fresh_seed();
    const std::string what = c.str() + " seed=" + std::to_string(seed);
    const int64_t half = c.HS / 2, row = (c.NH + 2 * c.NKV) * c.HS, maxT = c.pos_offset + c.T + 3;
    std::vector<float> freqs(static_cast<size_t>(maxT * half * 2));
    rope_table_init(tensor_of(freqs, {maxT, half, 2}, "freqs"), 10000.0f);
    const auto x0 = randn(static_cast<size_t>(c.B * c.T * row), seed);
    // CPU: forward of x0, backward of x0 (as a gradient)
    std::vector<float> fwd = x0, bwd = x0;
    rope_forward(tensor_of(fwd, {c.B, c.T, row}, "qkv"), tensor_of(freqs, {maxT, half, 2}, "freqs"), int(c.NH),
                 int(c.NKV), c.pos_offset);
    rope_backward(tensor_of(bwd, {c.B, c.T, row}, "dqkv"), tensor_of(freqs, {maxT, half, 2}, "freqs"), int(c.NH),
                  int(c.NKV), c.pos_offset);
    DeviceBuffer gfreqs(freqs), gx(x0);
    std::vector<float> first_fwd, first_bwd;
    for (int run = 0; run < 2; ++run) {
      gx.upload(x0);
      rope_forward(gx.tensor(DType::f32, {c.B, c.T, row}, "qkv"), gfreqs.tensor(DType::f32, {maxT, half, 2}, "freqs"),
                   int(c.NH), int(c.NKV), c.pos_offset);
      auto f = gx.download<float>();
      gx.upload(x0);
      rope_backward(gx.tensor(DType::f32, {c.B, c.T, row}, "dqkv"),
                    gfreqs.tensor(DType::f32, {maxT, half, 2}, "freqs"), int(c.NH), int(c.NKV), c.pos_offset);
      auto b = gx.download<float>();
      if (run == 0) {
        EXPECT_TRUE(all_close("rope forward " + what, f, to_double(fwd), kAtol, kRtol));
        EXPECT_TRUE(all_close("rope backward " + what, b, to_double(bwd), kAtol, kRtol));
        first_fwd = f;
        first_bwd = b;
      } else {
        EXPECT_EQ(0, std::memcmp(f.data(), first_fwd.data(), f.size() * sizeof(float)))
            << "rope forward not deterministic " << what;
        EXPECT_EQ(0, std::memcmp(b.data(), first_bwd.data(), b.size() * sizeof(float)))
            << "rope backward not deterministic " << what;
      }
    }
  }
}

TEST(CudaRope, TableInitOnTheGpuIsAnError) {
  LMF_REQUIRE_GPU();
  DeviceBuffer g(7 * 4 * 2 * sizeof(float));
  EXPECT_THROW(rope_table_init(g.tensor(DType::f32, {7, 4, 2}, "freqs"), 10000.0f), Error);
}

// ---- bf16 qkv / dqkv (docs/MIXED_PRECISION.md), f32 table. The reference is the CPU fp32 op on the
// same bf16-rounded qkv; errors are rel_l2_error = ||gpu - ref|| / ||ref|| over the whole tensor.
// The GPU evaluates the CPU's fp32 expressions (x1 c - x2 s) on the same inputs and table, so its fp32
// values are within ~1 ulp (FMA contraction) of the CPU's; the stored bf16 adds one rounding.
// u = 2^-8 is bf16's unit roundoff (8 significant bits: <= u relative per element, ~2^-9.2 rms).
// - v (and dv) are not rotated: bitwise the input.
// - against the fp32 reference: u + 2e-5 at any size (a hard bound: the rounding alone);
// - against the reference rounded to bf16: equal except for one-ulp flips at rounding ties (~1e-5 of
//   the elements), so on tensors of >= 4096 elements the bound is u / 16. Measured on an H200: 0
//   against the rounded reference, 1.5e-3 against the fp32 one.
// Cases: HS/2 a multiple of 8 (128-bit path) and not (scalar path), MHA and GQA, position offsets.
constexpr double kU = 1.0 / 256;
constexpr double kBf16Bound = kU + 2e-5, kBf16RoundedBound = kU / 16;
constexpr size_t kMinRoundedCheck = 4096;

TEST(CudaRope, Bf16MatchesCpuOnRoundedInputs) {
  LMF_REQUIRE_GPU();
  const Case cases[] = {{1, 1, 1, 1, 2, 0},  {1, 7, 2, 2, 6, 3},    {3, 19, 4, 2, 38, 0},    {1, 5, 3, 1, 16, 2},
                        {7, 7, 6, 3, 64, 1}, {4, 333, 12, 4, 64, 0}, {1, 19, 2, 1, 222, 100}, {2, 333, 4, 4, 128, 7}};
  double worst[4] = {};  // forward, forward (rounded ref), backward, backward (rounded ref)
  for (const Case& c : cases) {
    const uint64_t seed = test::fresh_seed();
    const std::string what = "bf16 " + c.str() + " seed=" + std::to_string(seed);
    const int64_t half = c.HS / 2, row = (c.NH + 2 * c.NKV) * c.HS, maxT = c.pos_offset + c.T + 3;
    std::vector<float> freqs(static_cast<size_t>(maxT * half * 2));
    rope_table_init(tensor_of(freqs, {maxT, half, 2}, "freqs"), 10000.0f);
    const auto x0 = test::round_bf16(randn(static_cast<size_t>(c.B * c.T * row), seed));
    std::vector<float> fwd = x0, bwd = x0;
    rope_forward(tensor_of(fwd, {c.B, c.T, row}, "qkv"), tensor_of(freqs, {maxT, half, 2}, "freqs"), int(c.NH),
                 int(c.NKV), c.pos_offset);
    rope_backward(tensor_of(bwd, {c.B, c.T, row}, "dqkv"), tensor_of(freqs, {maxT, half, 2}, "freqs"), int(c.NH),
                  int(c.NKV), c.pos_offset);
    const auto x0_bf16 = test::to_bf16(x0);
    DeviceBuffer gfreqs(freqs), gx(x0_bf16);
    std::vector<bf16> first_fwd, first_bwd;
    for (int run = 0; run < 2; ++run) {
      gx.upload(x0_bf16);
      rope_forward(gx.tensor(DType::bf16, {c.B, c.T, row}, "qkv"), gfreqs.tensor(DType::f32, {maxT, half, 2}, "freqs"),
                   int(c.NH), int(c.NKV), c.pos_offset);
      auto f = gx.download<bf16>();
      gx.upload(x0_bf16);
      rope_backward(gx.tensor(DType::bf16, {c.B, c.T, row}, "dqkv"),
                    gfreqs.tensor(DType::f32, {maxT, half, 2}, "freqs"), int(c.NH), int(c.NKV), c.pos_offset);
      auto b = gx.download<bf16>();
      if (run == 0) {
        int i = 0;
        for (auto [got, ref, name] : {std::tuple{&f, &fwd, "forward"}, std::tuple{&b, &bwd, "backward"}}) {
          const auto g = test::from_bf16(*got);
          const double raw = test::rel_l2_error(g, *ref), rounded = test::rel_l2_error(g, test::round_bf16(*ref));
          EXPECT_LE(raw, kBf16Bound) << name << " (vs fp32 reference) " << what;
          if (ref->size() >= kMinRoundedCheck)
            EXPECT_LE(rounded, kBf16RoundedBound) << name << " (vs bf16-rounded reference) " << what;
          worst[i] = std::max(worst[i], raw);
          worst[i + 1] = std::max(worst[i + 1], rounded);
          i += 2;
          // v heads: untouched
          bool v_same = true;
          for (int64_t n = 0; n < c.B * c.T && v_same; ++n)
            for (int64_t j = (c.NH + c.NKV) * c.HS; j < row; ++j)
              v_same = v_same && (*got)[n * row + j].bits == x0_bf16[n * row + j].bits;
          EXPECT_TRUE(v_same) << name << ": v changed " << what;
        }
        first_fwd = f;
        first_bwd = b;
      } else {
        EXPECT_EQ(0, std::memcmp(f.data(), first_fwd.data(), f.size() * sizeof(bf16)))
            << "bf16 rope forward not deterministic " << what;
        EXPECT_EQ(0, std::memcmp(b.data(), first_bwd.data(), b.size() * sizeof(bf16)))
            << "bf16 rope backward not deterministic " << what;
      }
    }
  }
  std::printf("[ measured ] bf16 rope, worst rel_l2: forward %.3g (vs bf16-rounded ref %.3g), backward %.3g (%.3g); "
              "bounds %.3g, %.3g\n",
              worst[0], worst[1], worst[2], worst[3], kBf16Bound, kBf16RoundedBound);
}

TEST(CudaRope, Bf16TableIsAnError) {
  LMF_REQUIRE_GPU();
  DeviceBuffer q(1 * 2 * 4 * 8 * sizeof(float)), f(4 * 4 * 2 * sizeof(float));
  try {  // the table stays f32
    rope_forward(q.tensor(DType::bf16, {1, 2, 32}, "qkv"), f.tensor(DType::bf16, {4, 4, 2}, "rope.freqs"), 2, 1);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'rope.freqs'"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace lmf
