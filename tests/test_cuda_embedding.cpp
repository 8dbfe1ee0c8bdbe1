// test_cuda_embedding.cpp: CUDA embedding forward/backward (ops/embedding.h) against the CPU
// reference: awkward and realistic sizes, with and without position embeddings, position offsets,
// skewed token distributions (one token everywhere, two tokens, a vocabulary of 3); outputs poisoned,
// gradients prefilled (accumulation), bitwise determinism.
#include <gtest/gtest.h>

#include <cstring>
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
}

TEST(CudaEmbedding, RealisticSizeMatchesCpu) {
  LMF_REQUIRE_GPU();
  check_case({4, 1024, 768, 50304, true, 0, Tokens::uniform});
  check_case({4, 1024, 768, 50304, false, 0, Tokens::uniform});
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
