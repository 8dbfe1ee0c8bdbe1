// test_ops_embedding.cpp: token + learned position embedding (ops/embedding.h) against a float64
// reference and finite differences, on awkward sizes; position offsets; accumulation into prefilled
// gradients; the summation order of repeated tokens; bitwise determinism across calls and thread
// counts; bad token ids and shapes.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <cstring>
#include <string>
#include <vector>

#include "ops/embedding.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::awkward_sizes;
using test::randint;
using test::randn;
using test::tensor_of;
using test::to_double;

// out[b,t] = wte[tokens[b,t]] + wpe[pos_offset + t] (wpe empty = none). tokens: (B, T); wte: (Vp, C);
// wpe: (maxT, C). Returns (B, T, C), float64.
std::vector<double> embedding_ref(const std::vector<int32_t>& tokens, const std::vector<double>& wte,
                                  const std::vector<double>& wpe, int64_t B, int64_t T, int64_t C,
                                  int64_t pos_offset) {
  std::vector<double> out(static_cast<size_t>(B * T * C));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < C; ++i) {
        double v = wte[tokens[b * T + t] * C + i];
        if (!wpe.empty()) v += wpe[(pos_offset + t) * C + i];
        out[(b * T + t) * C + i] = v;
      }
  return out;
}

std::string case_name(int64_t T, int64_t C) { return "T=" + std::to_string(T) + " C=" + std::to_string(C); }

constexpr int64_t kB = 2, kVp = 13;

// Forward: one fp32 add of two exact values (half an ulp, 6e-8 relative); a bare lookup is exact.
constexpr double kFwdAtol = 0.0, kFwdRtol = 6.0e-8;
// Backward: prefill + a sequential fp32 sum of the rows sharing a token (~17 values ~N(0, 1) at
// B*T = 222, Vp = 13); observed worst 2e-6 absolute. The FD gradient of this linear loss is exact up
// to ~1e-9.
constexpr double kBwdAtol = 1e-5, kBwdRtol = 1e-5;

TEST(OpsEmbedding, ForwardAwkwardSizesWithAndWithoutPositions) {
  for (int64_t T : awkward_sizes())
    for (int64_t C : awkward_sizes())
      for (int64_t pos_offset : {int64_t{0}, int64_t{3}}) {
        const int64_t maxT = T + 3;
        auto tokens = randint(static_cast<size_t>(kB * T), 1, kVp);
        auto wte = randn(static_cast<size_t>(kVp * C), 2), wpe = randn(static_cast<size_t>(maxT * C), 3);
        std::vector<float> out(static_cast<size_t>(kB * T * C), -7.0f);
        embedding_forward(tensor_of(out, {kB, T, C}, "out"), tensor_of(tokens, {kB, T}, "tokens"),
                          tensor_of(wte, {kVp, C}, "wte"), tensor_of(wpe, {maxT, C}, "wpe"), pos_offset);
        EXPECT_TRUE(all_close("embedding out " + case_name(T, C) + " offset " + std::to_string(pos_offset), out,
                              embedding_ref(tokens, to_double(wte), to_double(wpe), kB, T, C, pos_offset), kFwdAtol,
                              kFwdRtol));
        // no position embedding (RoPE models): an exact copy of the token rows
        embedding_forward(tensor_of(out, {kB, T, C}, "out"), tensor_of(tokens, {kB, T}, "tokens"),
                          tensor_of(wte, {kVp, C}, "wte"), Tensor(), pos_offset);
        EXPECT_TRUE(all_close("embedding out no wpe " + case_name(T, C), out,
                              embedding_ref(tokens, to_double(wte), {}, kB, T, C, 0), 0.0, 0.0));
      }
}

TEST(OpsEmbedding, BackwardFiniteDifferencesAccumulates) {
  for (int64_t T : awkward_sizes())
    for (int64_t C : awkward_sizes())
      for (bool with_wpe : {true, false}) {
        const int64_t Tfd = T * C > 2500 ? 5 : T, Cfd = C;  // FD cost grows with the parameter count
        const int64_t maxT = Tfd + 2;
        auto tokens = randint(static_cast<size_t>(kB * Tfd), 11, kVp);
        auto wte = randn(static_cast<size_t>(kVp * Cfd), 12), wpe = randn(static_cast<size_t>(maxT * Cfd), 13);
        auto r = randn(static_cast<size_t>(kB * Tfd * Cfd), 14);
        const auto rd = to_double(r);
        const size_t nte = wte.size();
        // loss(wte, wpe) = sum(embedding(wte, wpe) * r), parameters packed as [wte | wpe]
        std::vector<double> params = to_double(wte);
        if (with_wpe)
          for (float v : wpe) params.push_back(v);
        auto loss = [&](const std::vector<double>& p) {
          const std::vector<double> te(p.begin(), p.begin() + nte), pe(p.begin() + nte, p.end());
          const auto out = embedding_ref(tokens, te, pe, kB, Tfd, Cfd, 0);
          double s = 0;
          for (size_t i = 0; i < out.size(); ++i) s += out[i] * rd[i];
          return s;
        };
        const auto g = test::finite_diff(loss, params);
        auto dwte = randn(wte.size(), 15, 0.5f), dwpe = randn(wpe.size(), 16, 0.5f);  // prefill
        std::vector<double> want_te(dwte.size()), want_pe(dwpe.size());
        for (size_t i = 0; i < dwte.size(); ++i) want_te[i] = dwte[i] + g[i];
        // rows >= T of dwpe get no gradient; absent dwpe leaves the buffer untouched
        for (size_t i = 0; i < dwpe.size(); ++i)
          want_pe[i] = dwpe[i] + (with_wpe ? g[nte + i] : 0.0);
        embedding_backward(tensor_of(dwte, {kVp, Cfd}, "dwte"), with_wpe ? tensor_of(dwpe, {maxT, Cfd}, "dwpe") : Tensor(),
                           tensor_of(r, {kB, Tfd, Cfd}, "dout"), tensor_of(tokens, {kB, Tfd}, "tokens"));
        const std::string what = case_name(Tfd, Cfd) + (with_wpe ? "" : " no wpe");
        EXPECT_TRUE(all_close("embedding dwte " + what, dwte, want_te, kBwdAtol, kBwdRtol));
        EXPECT_TRUE(all_close("embedding dwpe " + what, dwpe, want_pe, kBwdAtol, kBwdRtol));
      }
}

// Inputs for the determinism tests: many repeated tokens, sizes large enough to run in parallel.
struct DetCase {
  static constexpr int64_t B = 4, T = 64, C = 130, Vp = 3, maxT = 70;
  std::vector<int32_t> tokens = randint(B * T, 21, Vp);
  std::vector<float> dout = randn(B * T * C, 22);
  std::vector<float> dwte0 = randn(Vp * C, 23), dwpe0 = randn(maxT * C, 24);

  // dwte and dwpe (concatenated) after one backward from the prefill, with `threads` OpenMP threads.
  std::vector<float> run(int threads) {
    auto dwte = dwte0, dwpe = dwpe0;
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    embedding_backward(tensor_of(dwte, {Vp, C}, "dwte"), tensor_of(dwpe, {maxT, C}, "dwpe"),
                       tensor_of(dout, {B, T, C}, "dout"), tensor_of(tokens, {B, T}, "tokens"));
    omp_set_num_threads(saved);
    dwte.insert(dwte.end(), dwpe.begin(), dwpe.end());
    return dwte;
  }
};

TEST(OpsEmbedding, BackwardSumsRepeatedTokensInOrder) {
  // The contract: rows sharing a token are summed into dwte in increasing (b, t) order, in fp32, and
  // dwpe[t] sums b = 0..B-1 in order. A serial fp32 loop in that order must match bit for bit.
  DetCase c;
  auto want_te = c.dwte0, want_pe = c.dwpe0;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t i = 0; i < c.C; ++i) {
        const float d = c.dout[(b * c.T + t) * c.C + i];
        want_te[c.tokens[b * c.T + t] * c.C + i] += d;
        want_pe[t * c.C + i] += d;
      }
  want_te.insert(want_te.end(), want_pe.begin(), want_pe.end());
  const auto got = c.run(omp_get_max_threads());
  ASSERT_EQ(got.size(), want_te.size());
  EXPECT_EQ(0, std::memcmp(got.data(), want_te.data(), got.size() * sizeof(float)))
      << "dwte/dwpe differ from the serial (b, t)-ordered fp32 sum";
}

TEST(OpsEmbedding, BackwardBitwiseDeterministicAcrossCallsAndThreadCounts) {
  DetCase c;
  const auto a = c.run(omp_get_max_threads()), b = c.run(omp_get_max_threads()), one = c.run(1), three = c.run(3);
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float))) << "two identical calls differ";
  EXPECT_EQ(0, std::memcmp(a.data(), one.data(), a.size() * sizeof(float))) << "1 thread differs from default";
  EXPECT_EQ(0, std::memcmp(a.data(), three.data(), a.size() * sizeof(float))) << "3 threads differ from default";
}

TEST(OpsEmbedding, RejectsTokenOutOfRangeNamingPosition) {
  const int64_t B = 2, T = 5, C = 7, Vp = 11;
  auto tokens = randint(B * T, 31, Vp);
  auto wte = randn(Vp * C, 32), wpe = randn(T * C, 33);
  std::vector<float> out(B * T * C), dout(B * T * C), dwte(Vp * C);
  tokens[1 * T + 3] = static_cast<int32_t>(Vp);  // (b=1, t=3)
  try {
    embedding_forward(tensor_of(out, {B, T, C}, "out"), tensor_of(tokens, {B, T}, "tokens"),
                      tensor_of(wte, {Vp, C}, "wte"), tensor_of(wpe, {T, C}, "wpe"));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("b=1, t=3"));
    EXPECT_THAT(e.what(), ::testing::HasSubstr("token 11"));
  }
  tokens[1 * T + 3] = 0;
  tokens[0 * T + 2] = -4;  // (b=0, t=2)
  try {
    embedding_backward(tensor_of(dwte, {Vp, C}, "dwte"), Tensor(), tensor_of(dout, {B, T, C}, "dout"),
                       tensor_of(tokens, {B, T}, "tokens"));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("b=0, t=2"));
    EXPECT_THAT(e.what(), ::testing::HasSubstr("token -4"));
  }
  // nothing was accumulated before the check failed
  for (float v : dwte) EXPECT_EQ(v, 0.0f);
}

TEST(OpsEmbedding, RejectsBadShapesAndPositionsNamingTensor) {
  const int64_t B = 2, T = 5, C = 7, Vp = 11;
  auto tokens = randint(B * T, 41, Vp);
  auto wte = randn(Vp * C, 42), wpe = randn(T * C, 43);
  std::vector<float> out(B * T * C);
  try {
    embedding_forward(tensor_of(out, {B, T * C}, "emb_out"), tensor_of(tokens, {B, T}, "tokens"),
                      tensor_of(wte, {Vp, C}, "wte"), tensor_of(wpe, {T, C}, "wpe"));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("'emb_out'"));
  }
  try {  // positions [1, 6) exceed maxT = 5
    embedding_forward(tensor_of(out, {B, T, C}, "out"), tensor_of(tokens, {B, T}, "tokens"),
                      tensor_of(wte, {Vp, C}, "wte"), tensor_of(wpe, {T, C}, "pos_emb.weight"), 1);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("'pos_emb.weight'"));
  }
  std::vector<float> dwpe((T - 1) * C), dwte(Vp * C);
  EXPECT_THROW(embedding_backward(tensor_of(dwte, {Vp, C}, "dwte"), tensor_of(dwpe, {T - 1, C}, "dwpe"),
                                  tensor_of(out, {B, T, C}, "dout"), tensor_of(tokens, {B, T}, "tokens")),
               Error);
}

// bf16 out / dout run on the GPU only: on the CPU the op fails with one line naming the tensor.
TEST(OpsEmbedding, Bf16OnCpuIsAnErrorNamingTheTensor) {
  const int64_t B = 2, T = 5, C = 7, Vp = 11;
  auto tokens = randint(B * T, 51, Vp);
  auto wte = randn(Vp * C, 52);
  std::vector<bf16> act(static_cast<size_t>(B * T * C));
  std::vector<float> dwte(Vp * C);
  try {
    embedding_forward(Tensor(act.data(), DType::bf16, {B, T, C}, "emb_out"), tensor_of(tokens, {B, T}, "tokens"),
                      tensor_of(wte, {Vp, C}, "wte"), Tensor());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "embedding_forward: bf16 tensors run on the GPU only ('emb_out')");
  }
  try {
    embedding_backward(tensor_of(dwte, {Vp, C}, "dwte"), Tensor(), Tensor(act.data(), DType::bf16, {B, T, C}, "demb"),
                       tensor_of(tokens, {B, T}, "tokens"));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "embedding_backward: bf16 tensors run on the GPU only ('demb')");
  }
  for (float v : dwte) EXPECT_EQ(v, 0.0f);
}

}  // namespace
}  // namespace lmf
