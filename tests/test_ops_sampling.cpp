// test_ops_sampling.cpp: the batched sampler on the CPU (ops/sampling.h): greedy and top-k with ties,
// logprobs and top-N, draw frequencies against softmax(l / T) with a top-p cut, a row's draw
// independent of the other rows, and the parameter checks naming the field.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "ops/sampling.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::tensor_of;

struct Sampled {
  std::vector<int32_t> tokens, top_ids;
  std::vector<float> logprobs, top_lps;
};

Sampled sample(std::vector<float> logits, int64_t W, int64_t V, const std::vector<SampleParams>& ps, int64_t top_n) {
  const int64_t M = static_cast<int64_t>(ps.size());
  Sampled s;
  s.tokens.assign(static_cast<size_t>(M), -1);
  s.logprobs.assign(static_cast<size_t>(M), 0.0f);
  s.top_ids.assign(static_cast<size_t>(M * std::max<int64_t>(top_n, 1)), -1);
  s.top_lps.assign(s.top_ids.size(), 0.0f);
  std::vector<int32_t> order(static_cast<size_t>(M * V)), words(static_cast<size_t>(M * kSampleParamWords));
  std::memcpy(words.data(), ps.data(), sizeof(SampleParams) * ps.size());
  sample_tokens(tensor_of(s.tokens, {M}, "tokens"), tensor_of(s.logprobs, {M}, "logprobs"),
                top_n ? tensor_of(s.top_ids, {M, top_n}, "top_ids") : Tensor(),
                top_n ? tensor_of(s.top_lps, {M, top_n}, "top_logprobs") : Tensor(), tensor_of(logits, {M, W}, "logits"),
                tensor_of(words, {M, kSampleParamWords}, "params"), V, tensor_of(order, {M, V}, "order"));
  return s;
}

TEST(OpsSampling, GreedyTopKLogprobs) {
  const int64_t V = 6, W = 8;
  std::vector<float> logits{0.5f, 2.0f, -1.0f, 2.0f, 0.0f, 1.0f, 99.0f, 99.0f};  // columns 6, 7: padding, ignored
  SampleParams greedy{0.0f, 0, 1.0f, 0, 1, 0}, top1{1.5f, 1, 1.0f, 0, 2, 0};
  std::vector<float> two(logits.begin(), logits.end());
  two.insert(two.end(), logits.begin(), logits.end());
  const Sampled s = sample(two, W, V, {greedy, top1}, 0);
  EXPECT_EQ(s.tokens[0], 1);  // ties: the lowest id
  EXPECT_EQ(s.tokens[1], 1);
  double lse = 0;
  for (int64_t i = 0; i < V; ++i) lse += std::exp(static_cast<double>(logits[static_cast<size_t>(i)]));
  lse = std::log(lse);
  EXPECT_NEAR(s.logprobs[0], 2.0 - lse, 1e-6);
  const Sampled t = sample(two, W, V, {greedy, greedy}, 3);
  EXPECT_EQ((std::vector<int32_t>{t.top_ids[0], t.top_ids[1], t.top_ids[2]}), (std::vector<int32_t>{1, 3, 5}));
  EXPECT_NEAR(t.top_lps[2], 1.0 - lse, 1e-6);
}

// Frequencies follow softmax(l / temperature) cut by top-p; a row's draw depends only on its
// (seed, index), not on the other rows.
TEST(OpsSampling, DistributionAndBatchIndependence) {
  const int64_t V = 4;
  const std::vector<float> l{1.0f, 0.0f, -1.0f, 0.5f};
  const float temp = 0.7f;
  std::vector<double> p(V);
  double sum = 0;
  for (int64_t i = 0; i < V; ++i) sum += (p[static_cast<size_t>(i)] = std::exp(l[static_cast<size_t>(i)] / temp));
  for (double& x : p) x /= sum;
  const int n = 4000;
  std::vector<float> logits;
  std::vector<SampleParams> ps;
  for (int i = 0; i < n; ++i) {
    logits.insert(logits.end(), l.begin(), l.end());
    ps.push_back(SampleParams{temp, 0, 1.0f, 0, 42, static_cast<uint64_t>(i)});
  }
  const Sampled s = sample(logits, V, V, ps, 0);
  std::vector<double> freq(V, 0.0);
  for (int32_t t : s.tokens) freq[static_cast<size_t>(t)] += 1.0 / n;
  for (int64_t i = 0; i < V; ++i) EXPECT_NEAR(freq[static_cast<size_t>(i)], p[static_cast<size_t>(i)], 0.03) << "token " << i;
  // row 123 alone draws what it drew among 4000
  const Sampled one = sample(l, V, V, {ps[123]}, 0);
  EXPECT_EQ(one.tokens[0], s.tokens[123]);
  // p = (0.56, 0.13, 0.03, 0.27): top_p = 0.7 keeps tokens 0 and 3, nothing else is ever drawn
  for (SampleParams& q : ps) q.top_p = 0.7f;
  for (int32_t t : sample(logits, V, V, ps, 0).tokens) EXPECT_TRUE(t == 0 || t == 3) << t;
}

TEST(OpsSampling, BadParamsAreNamed) {
  EXPECT_NE(sample_params_problem({-1.0f, 0, 1.0f, 0, 0, 0}).find("temperature"), std::string::npos);
  EXPECT_NE(sample_params_problem({1.0f, -2, 1.0f, 0, 0, 0}).find("top_k"), std::string::npos);
  EXPECT_NE(sample_params_problem({1.0f, 0, 0.0f, 0, 0, 0}).find("top_p"), std::string::npos);
  EXPECT_NE(sample_params_problem({1.0f, 0, 1.5f, 0, 0, 0}, "--").find("--top_p"), std::string::npos);
  EXPECT_EQ(sample_params_problem({0.0f, 5, 0.9f, 0, 0, 0}), "");
}

}  // namespace
}  // namespace lmf
