// test_cuda_rope.cpp: CUDA RoPE forward/backward (ops/rope.h) against the CPU reference on awkward
// sizes, MHA/GQA layouts, odd and realistic head sizes and position offsets; the table is built on the
// CPU and copied, as the model does. RoPE transforms in place, so instead of a poisoned output the
// whole qkv row is compared (v must come back untouched); bitwise determinism.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
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

}  // namespace
}  // namespace lmf
