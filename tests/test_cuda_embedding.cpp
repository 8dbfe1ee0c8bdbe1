// test_cuda_embedding.cpp: CUDA embedding forward/backward (ops/embedding.h) against the CPU
// reference: awkward and realistic sizes, with and without position embeddings, position offsets,
// skewed token distributions (one token everywhere, two tokens, a vocabulary of 3); outputs poisoned,
// gradients prefilled (accumulation), bitwise determinism; and the bf16 out/dout path (mixed
// precision) against the CPU fp32 op on the same bf16-rounded dout.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/device.h"
#include "ops/embedding.h"
#include "support/gpu_util.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::DeviceBuffer;
using test::randn;
using test::tensor_of;
using test::to_double;

// Exact: the forward is one fp32 add per element, and both backward passes add the same dout rows to
// the prefilled gradient in the same order as the CPU (increasing (b, t) per token; increasing b per
// position), so the results are bitwise equal to the CPU's.
constexpr double kAtol = 0.0, kRtol = 0.0;

enum class Tokens { uniform, one, two };

struct Case {
  int64_t B, T, C, Vp;
  bool wpe;
  int64_t pos_offset;
  Tokens tokens;
  std::string str() const {
    return "B=" + std::to_string(B) + " T=" + std::to_string(T) + " C=" + std::to_string(C) +
           " Vp=" + std::to_string(Vp) + (wpe ? " wpe" : " no-wpe") + " pos_offset=" + std::to_string(pos_offset) +
           " tokens=" + (tokens == Tokens::uniform ? "uniform" : tokens == Tokens::one ? "one" : "two");
  }
};

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void check_case(const Case& c) {
  const uint64_t seed = test::fresh_seed();
  const std::string what = c.str() + " seed=" + std::to_string(seed);
  const int64_t B = c.B, T = c.T, C = c.C, Vp = c.Vp, N = B * T, maxT = c.pos_offset + T + 2;
  std::vector<int32_t> tok = test::randint(static_cast<size_t>(N), seed, static_cast<int32_t>(Vp));
  if (c.tokens == Tokens::one)
    for (auto& v : tok) v = static_cast<int32_t>(Vp - 1);
  if (c.tokens == Tokens::two)
    for (auto& v : tok) v = v % 2 == 0 ? 0 : static_cast<int32_t>(Vp - 1);
  auto wte = randn(static_cast<size_t>(Vp * C), seed + 1);
  auto wpe = randn(static_cast<size_t>(maxT * C), seed + 2);
  auto dout = randn(static_cast<size_t>(N * C), seed + 3);
  const auto dwte0 = randn(wte.size(), seed + 4, 0.5f), dwpe0 = randn(wpe.size(), seed + 5, 0.5f);

  // CPU reference
  std::vector<float> out(static_cast<size_t>(N * C)), dwte = dwte0, dwpe = dwpe0;
  embedding_forward(tensor_of(out, {B, T, C}, "out"), tensor_of(tok, {B, T}, "tokens"), tensor_of(wte, {Vp, C}, "wte"),
                    c.wpe ? tensor_of(wpe, {maxT, C}, "wpe") : Tensor(), c.pos_offset);
  embedding_backward(tensor_of(dwte, {Vp, C}, "dwte"), c.wpe ? tensor_of(dwpe, {maxT, C}, "dwpe") : Tensor(),
                     tensor_of(dout, {B, T, C}, "dout"), tensor_of(tok, {B, T}, "tokens"));

  cuda_reserve_workspace(embedding_backward_cuda_workspace(N, Vp));
  DeviceBuffer gtok(tok), gwte(wte), gwpe(wpe), gdout(dout), gout(out.size() * sizeof(float)), gdwte(dwte0),
      gdwpe(dwpe0);
  std::vector<float> first_out, first_dwte, first_dwpe;
  for (int run = 0; run < 2; ++run) {
    gout.poison();
    gdwte.upload(dwte0);
    gdwpe.upload(dwpe0);
    embedding_forward(gout.tensor(DType::f32, {B, T, C}, "out"), gtok.tensor(DType::i32, {B, T}, "tokens"),
                      gwte.tensor(DType::f32, {Vp, C}, "wte"),
                      c.wpe ? gwpe.tensor(DType::f32, {maxT, C}, "wpe") : Tensor(), c.pos_offset);
    embedding_backward(gdwte.tensor(DType::f32, {Vp, C}, "dwte"),
                       c.wpe ? gdwpe.tensor(DType::f32, {maxT, C}, "dwpe") : Tensor(),
                       gdout.tensor(DType::f32, {B, T, C}, "dout"), gtok.tensor(DType::i32, {B, T}, "tokens"));
    auto o = gout.download<float>(), dw = gdwte.download<float>(), dp = gdwpe.download<float>();
    if (run == 0) {
      EXPECT_TRUE(all_close("embedding out " + what, o, to_double(out), kAtol, kRtol));
      EXPECT_TRUE(all_close("embedding dwte " + what, dw, to_double(dwte), kAtol, kRtol));
      // without wpe the prefilled dwpe must come back untouched (dwpe == dwpe0 on the CPU side)
      EXPECT_TRUE(all_close("embedding dwpe " + what, dp, to_double(dwpe), kAtol, kRtol));
      first_out = std::move(o);
      first_dwte = std::move(dw);
      first_dwpe = std::move(dp);
    } else {
      EXPECT_TRUE(bitwise_equal(o, first_out)) << "embedding out not deterministic " << what;
      EXPECT_TRUE(bitwise_equal(dw, first_dwte)) << "embedding dwte not deterministic " << what;
      EXPECT_TRUE(bitwise_equal(dp, first_dwpe)) << "embedding dwpe not deterministic " << what;
    }
  }
}

TEST(CudaEmbedding, AwkwardSizesMatchCpu) {
  LMF_REQUIRE_GPU();
  for (int64_t T : test::awkward_sizes())
    for (int64_t C : test::awkward_sizes())
      for (bool wpe : {true, false}) {
        check_case({1, T, C, 50, wpe, 0, Tokens::uniform});
        check_case({3, T, C, 1000, wpe, wpe ? 5 : 0, Tokens::uniform});
      }
}

TEST(CudaEmbedding, SkewedTokensMatchCpu) {
  LMF_REQUIRE_GPU();
  for (Tokens k : {Tokens::one, Tokens::two}) {
    check_case({1, 1, 7, 1, true, 0, k});
    check_case({7, 111, 19, 3, true, 0, k});
    check_case({4, 1024, 768, 50304, true, 0, k});
  }
  check_case({19, 111, 111, 3, false, 0, Tokens::uniform});  // a vocabulary of 3: long runs of each
  // 16-byte column packs (C % 4 == 0): a few packs per row, and more packs than threads (C / 4 > 1024)
  check_case({3, 17, 24, 7, false, 0, Tokens::uniform});
  check_case({2, 33, 4100, 5, true, 0, Tokens::uniform});
}

TEST(CudaEmbedding, RealisticSizeMatchesCpu) {
  LMF_REQUIRE_GPU();
  check_case({2, 256, 128, 151936, false, 0, Tokens::uniform});  // Qwen2's vocabulary: ids above 65,535
  check_case({4, 1024, 768, 50304, true, 0, Tokens::uniform});
  check_case({4, 1024, 768, 50304, false, 0, Tokens::uniform});
}

// bf16 out / dout (docs/MIXED_PRECISION.md), wte/wpe/dwte/dwpe f32. The reference is the CPU fp32 op
// with dout rounded to bf16 (the values the GPU reads). Bounds on rel_l2_error (||gpu - ref|| / ||ref||):
// - out: the GPU adds in fp32 (the CPU's expression) and rounds once, so out == bf16(ref) bitwise,
//   and the error is that one rounding: <= 2^-8 relative per element (bf16 has 8 significant bits;
//   u = 2^-8), about 2^-9.2 as an rms over random values. Bound: 2^-8, plus the bitwise check.
// - dwte, dwpe: dout widens to fp32 exactly and is added to the prefilled f32 gradient in the f32
//   path's order (the CPU's): bitwise equal, bound 0.
struct Bf16Worst {
  double out = 0, dwte = 0, dwpe = 0;
};

constexpr double kBf16OutBound = 1.0 / 256;  // 2^-8

bool bitwise_equal_bf16(const std::vector<bf16>& a, const std::vector<bf16>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(bf16)) == 0;
}

void check_case_bf16(const Case& c, Bf16Worst& worst) {
  const uint64_t seed = test::fresh_seed();
  const std::string what = "bf16 " + c.str() + " seed=" + std::to_string(seed);
  const int64_t B = c.B, T = c.T, C = c.C, Vp = c.Vp, N = B * T, maxT = c.pos_offset + T + 2;
  std::vector<int32_t> tok = test::randint(static_cast<size_t>(N), seed, static_cast<int32_t>(Vp));
  if (c.tokens == Tokens::one)
    for (auto& v : tok) v = static_cast<int32_t>(Vp - 1);
  if (c.tokens == Tokens::two)
    for (auto& v : tok) v = v % 2 == 0 ? 0 : static_cast<int32_t>(Vp - 1);
  auto wte = randn(static_cast<size_t>(Vp * C), seed + 1);
  auto wpe = randn(static_cast<size_t>(maxT * C), seed + 2);
  const std::vector<bf16> dout_bf = test::to_bf16(randn(static_cast<size_t>(N * C), seed + 3));
  std::vector<float> dout = test::from_bf16(dout_bf);  // the values the GPU reads
  const auto dwte0 = randn(wte.size(), seed + 4, 0.5f), dwpe0 = randn(wpe.size(), seed + 5, 0.5f);

  // CPU fp32 reference on the rounded dout
  std::vector<float> out(static_cast<size_t>(N * C)), dwte = dwte0, dwpe = dwpe0;
  embedding_forward(tensor_of(out, {B, T, C}, "out"), tensor_of(tok, {B, T}, "tokens"), tensor_of(wte, {Vp, C}, "wte"),
                    c.wpe ? tensor_of(wpe, {maxT, C}, "wpe") : Tensor(), c.pos_offset);
  embedding_backward(tensor_of(dwte, {Vp, C}, "dwte"), c.wpe ? tensor_of(dwpe, {maxT, C}, "dwpe") : Tensor(),
                     tensor_of(dout, {B, T, C}, "dout"), tensor_of(tok, {B, T}, "tokens"));
  const std::vector<bf16> out_rounded = test::to_bf16(out);

  cuda_reserve_workspace(embedding_backward_cuda_workspace(N, Vp));
  DeviceBuffer gtok(tok), gwte(wte), gwpe(wpe), gdout(dout_bf), gout(out.size() * sizeof(bf16)), gdwte(dwte0),
      gdwpe(dwpe0);
  std::vector<bf16> first_out;
  std::vector<float> first_dwte, first_dwpe;
  for (int run = 0; run < 2; ++run) {
    gout.poison();
    gdwte.upload(dwte0);
    gdwpe.upload(dwpe0);
    embedding_forward(gout.tensor(DType::bf16, {B, T, C}, "out"), gtok.tensor(DType::i32, {B, T}, "tokens"),
                      gwte.tensor(DType::f32, {Vp, C}, "wte"),
                      c.wpe ? gwpe.tensor(DType::f32, {maxT, C}, "wpe") : Tensor(), c.pos_offset);
    embedding_backward(gdwte.tensor(DType::f32, {Vp, C}, "dwte"),
                       c.wpe ? gdwpe.tensor(DType::f32, {maxT, C}, "dwpe") : Tensor(),
                       gdout.tensor(DType::bf16, {B, T, C}, "dout"), gtok.tensor(DType::i32, {B, T}, "tokens"));
    auto o = gout.download<bf16>();
    auto dw = gdwte.download<float>(), dp = gdwpe.download<float>();
    if (run == 0) {
      const double e_out = test::rel_l2_error(test::from_bf16(o), out);
      const double e_dwte = test::rel_l2_error(dw, dwte), e_dwpe = test::rel_l2_error(dp, dwpe);
      worst.out = std::max(worst.out, e_out);
      worst.dwte = std::max(worst.dwte, e_dwte);
      worst.dwpe = std::max(worst.dwpe, e_dwpe);
      EXPECT_LE(e_out, kBf16OutBound) << "embedding bf16 out " << what;
      EXPECT_TRUE(bitwise_equal_bf16(o, out_rounded)) << "embedding bf16 out != bf16(fp32 reference) " << what;
      EXPECT_EQ(e_dwte, 0.0) << "embedding dwte from bf16 dout " << what;
      EXPECT_TRUE(all_close("embedding dwte from bf16 dout " + what, dw, to_double(dwte), kAtol, kRtol));
      // without wpe the prefilled dwpe must come back untouched (dwpe == dwpe0 on the CPU side)
      EXPECT_EQ(e_dwpe, 0.0) << "embedding dwpe from bf16 dout " << what;
      EXPECT_TRUE(all_close("embedding dwpe from bf16 dout " + what, dp, to_double(dwpe), kAtol, kRtol));
      first_out = std::move(o);
      first_dwte = std::move(dw);
      first_dwpe = std::move(dp);
    } else {
      EXPECT_TRUE(bitwise_equal_bf16(o, first_out)) << "embedding bf16 out not deterministic " << what;
      EXPECT_TRUE(bitwise_equal(dw, first_dwte)) << "embedding dwte (bf16 dout) not deterministic " << what;
      EXPECT_TRUE(bitwise_equal(dp, first_dwpe)) << "embedding dwpe (bf16 dout) not deterministic " << what;
    }
  }
}

TEST(CudaEmbedding, Bf16MatchesCpuOnRoundedInputs) {
  LMF_REQUIRE_GPU();
  Bf16Worst worst;
  for (int64_t T : test::awkward_sizes())
    for (int64_t C : test::awkward_sizes())
      for (bool wpe : {true, false}) {
        check_case_bf16({1, T, C, 50, wpe, 0, Tokens::uniform}, worst);
        check_case_bf16({3, T, C, 1000, wpe, wpe ? 5 : 0, Tokens::uniform}, worst);
      }
  for (Tokens k : {Tokens::one, Tokens::two}) {
    check_case_bf16({1, 1, 7, 1, true, 0, k}, worst);
    check_case_bf16({7, 111, 19, 3, true, 0, k}, worst);
  }
  check_case_bf16({4, 1024, 768, 50304, true, 0, Tokens::uniform}, worst);
  check_case_bf16({4, 1024, 768, 50304, false, 0, Tokens::two}, worst);
  // 16-byte column packs (C % 8 == 0): a few packs per row, and more packs than threads (C / 8 > 1024)
  check_case_bf16({3, 17, 24, 7, false, 0, Tokens::uniform}, worst);
  check_case_bf16({2, 33, 8200, 5, true, 0, Tokens::uniform}, worst);
  std::printf("embedding bf16 measured worst rel_l2: out %.3g (bound %.3g), dwte %.3g (bound 0), dwpe %.3g (bound 0)\n",
              worst.out, kBf16OutBound, worst.dwte, worst.dwpe);
}

// A bf16 activation with a wrong partner dtype fails naming the tensor.
TEST(CudaEmbedding, Bf16DtypeMixesNameTheTensor) {
  LMF_REQUIRE_GPU();
  const int64_t B = 2, T = 3, C = 5, Vp = 7;
  std::vector<int32_t> tok(static_cast<size_t>(B * T), 1);
  DeviceBuffer gtok(tok), gout(static_cast<size_t>(B * T * C) * 4), gw(static_cast<size_t>(Vp * C) * 4),
      gp(static_cast<size_t>(T * C) * 4);
  const Tensor tokens = gtok.tensor(DType::i32, {B, T}, "tokens");
  auto expect_naming = [](const std::function<void()>& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "no error; expected one naming " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_naming([&] {
    embedding_forward(gout.tensor(DType::bf16, {B, T, C}, "out"), tokens, gw.tensor(DType::bf16, {Vp, C}, "wte_bf16"),
                      Tensor());
  }, "'wte_bf16' has dtype bf16, expected f32");
  expect_naming([&] {
    embedding_forward(gout.tensor(DType::bf16, {B, T, C}, "out"), tokens, gw.tensor(DType::f32, {Vp, C}, "wte"),
                      gp.tensor(DType::bf16, {T, C}, "wpe_bf16"));
  }, "'wpe_bf16' has dtype bf16, expected f32");
  expect_naming([&] {
    embedding_backward(gw.tensor(DType::bf16, {Vp, C}, "dwte_bf16"), Tensor(),
                       gout.tensor(DType::bf16, {B, T, C}, "dout"), tokens);
  }, "'dwte_bf16' has dtype bf16, expected f32");
  expect_naming([&] {
    embedding_backward(gw.tensor(DType::f32, {Vp, C}, "dwte"), gp.tensor(DType::bf16, {T, C}, "dwpe_bf16"),
                       gout.tensor(DType::bf16, {B, T, C}, "dout"), tokens);
  }, "'dwpe_bf16' has dtype bf16, expected f32");
}

TEST(CudaEmbedding, BackwardWithoutReservedWorkspaceIsAnError) {
  LMF_REQUIRE_GPU();
  // Far more workspace than any test reserves: the call must refuse instead of allocating.
  const int64_t B = 1 << 12, T = 1 << 12, C = 1, Vp = 7;
  std::vector<int32_t> tok(static_cast<size_t>(B * T), 0);
  DeviceBuffer gtok(tok), gdout(static_cast<size_t>(B * T * C) * sizeof(float)), gdwte(Vp * C * sizeof(float));
  EXPECT_THROW(embedding_backward(gdwte.tensor(DType::f32, {Vp, C}, "dwte"), Tensor(),
                                  gdout.tensor(DType::f32, {B, T, C}, "dout"), gtok.tensor(DType::i32, {B, T}, "tokens")),
               Error);
}

}  // namespace
}  // namespace lmf
