// CUDA batched sampling (ops/sampling.cu) against the CPU op (ops/sampling.cpp) on the same logits:
// f32 logits rounded to bf16, so the bf16 and f32 GPU paths and the CPU see identical values.
// - Every launcher branch: bf16 and f32 rows, 16-byte vectors and the scalar path (odd W), rows
//   cached in shared memory and rows read from global memory (bf16 152,064; f32 152,064), V in
//   {61, 1000, 50257, 152064}, M in {1, 7, 64}, parameters mixing greedy, temperature without cut,
//   top_k 1/5/40/1000, top_p 0.5/0.9/0.95/0.999 and both together.
// - Tokens must be equal. The GPU and CPU compute the same float Gumbel scores with libm's and CUDA's
//   logf (both within an ulp), and the top_p masses in fp32/fixed point against double, so a token may
//   only differ where two scores are within a few ulp or a prefix mass is within 1e-5 of the top_p
//   target: a mismatch is diagnosed (printed) and tolerated only when it is such a genuine near-tie.
// - logprob of the GPU's token within 1e-4 of log-softmax in double; top ids equal, top logprobs
//   within 1e-4 of the CPU's.
// - Ties (groups of equal logits, -inf logits): argmax, top_k/top_n and top_p cuts inside a group by
//   id; batch invariance (a row alone and in a batch: bitwise); determinism (two runs: bitwise); the
//   GPU's draw frequencies over 20,000 positions against softmax(l / T) cut by top_p; top_n limits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "ops/sampling.h"
#include "support/gpu_util.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::DeviceBuffer;
using test::tensor_of;

constexpr float kPad = 1000.0f;  // padded columns V..W-1: would win every draw if used

struct Sampled {
  std::vector<int32_t> tokens, top_ids;
  std::vector<float> logprobs, top_lps;
};

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// (M, W) logits ~ N(0, 3^2) rounded to bf16; padded columns kPad.
std::vector<float> make_logits(int64_t M, int64_t W, int64_t V, uint64_t seed) {
  std::vector<float> l = test::round_bf16(test::randn(static_cast<size_t>(M * W), seed, 3.0f));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = V; j < W; ++j) l[static_cast<size_t>(m * W + j)] = kPad;
  return l;
}

std::vector<int32_t> param_words(const std::vector<SampleParams>& ps) {
  std::vector<int32_t> w(ps.size() * kSampleParamWords);
  std::memcpy(w.data(), ps.data(), ps.size() * sizeof(SampleParams));
  return w;
}

Sampled run_cpu(std::vector<float> logits, int64_t W, int64_t V, const std::vector<SampleParams>& ps, int64_t top_n) {
  const int64_t M = static_cast<int64_t>(ps.size());
  Sampled s;
  s.tokens.assign(static_cast<size_t>(M), -1);
  s.logprobs.assign(static_cast<size_t>(M), 0.0f);
  s.top_ids.assign(static_cast<size_t>(M * std::max<int64_t>(top_n, 1)), -1);
  s.top_lps.assign(s.top_ids.size(), 0.0f);
  std::vector<int32_t> order(static_cast<size_t>(M * V)), words = param_words(ps);
  sample_tokens(tensor_of(s.tokens, {M}, "tokens"), tensor_of(s.logprobs, {M}, "logprobs"),
                top_n ? tensor_of(s.top_ids, {M, top_n}, "top_ids") : Tensor(),
                top_n ? tensor_of(s.top_lps, {M, top_n}, "top_logprobs") : Tensor(), tensor_of(logits, {M, W}, "logits"),
                tensor_of(words, {M, kSampleParamWords}, "params"), V, tensor_of(order, {M, V}, "order"));
  if (top_n == 0) s.top_ids.clear(), s.top_lps.clear();
  return s;
}

Sampled run_gpu(const std::vector<float>& logits, int64_t W, int64_t V, const std::vector<SampleParams>& ps,
                int64_t top_n, DType dt) {
  const int64_t M = static_cast<int64_t>(ps.size());
  DeviceBuffer l = dt == DType::bf16 ? DeviceBuffer(test::to_bf16(logits)) : DeviceBuffer(logits);
  DeviceBuffer params(param_words(ps)), tokens(static_cast<size_t>(M) * 4), logprobs(static_cast<size_t>(M) * 4),
      top_ids(static_cast<size_t>(M * std::max<int64_t>(top_n, 1)) * 4),
      top_lps(static_cast<size_t>(M * std::max<int64_t>(top_n, 1)) * 4);
  tokens.poison();
  logprobs.poison();
  top_ids.poison();
  top_lps.poison();
  sample_tokens(tokens.tensor(DType::i32, {M}, "tokens"), logprobs.tensor(DType::f32, {M}, "logprobs"),
                top_n ? top_ids.tensor(DType::i32, {M, top_n}, "top_ids") : Tensor(),
                top_n ? top_lps.tensor(DType::f32, {M, top_n}, "top_logprobs") : Tensor(),
                l.tensor(dt, {M, W}, "logits"), params.tensor(DType::i32, {M, kSampleParamWords}, "params"), V,
                Tensor());
  Sampled s{tokens.download<int32_t>(), top_ids.download<int32_t>(), logprobs.download<float>(),
            top_lps.download<float>()};
  if (top_n == 0) s.top_ids.clear(), s.top_lps.clear();
  return s;
}

// The parameter mix: row m takes kind m % 13 with its own seed and position.
std::vector<SampleParams> param_mix(int64_t M, uint64_t seed) {
  static const SampleParams kinds[] = {
      {0.0f, 0, 1.0f},     {0.7f, 0, 1.0f},    {1.0f, 0, 1.0f},    {1.0f, 1, 1.0f},   {0.8f, 5, 1.0f},
      {1.2f, 40, 1.0f},    {1.0f, 0, 0.5f},    {1.0f, 0, 0.9f},    {0.7f, 0, 0.95f},  {0.7f, 40, 0.9f},
      {1.0f, 5, 0.5f},     {1.5f, 1000, 0.95f}, {0.5f, 0, 0.999f}};
  std::vector<SampleParams> ps(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) {
    SampleParams p = kinds[(m + static_cast<int64_t>(seed % 13)) % 13];
    p.seed = rng_u64(seed, 1, static_cast<uint64_t>(m));
    p.index = rng_u64(seed, 2, static_cast<uint64_t>(m)) % 100000;
    ps[static_cast<size_t>(m)] = p;
  }
  return ps;
}

double log_sum_exp(const float* l, int64_t V) {
  const double mx = *std::max_element(l, l + V);
  double s = 0;
  for (int64_t i = 0; i < V; ++i) s += std::exp(static_cast<double>(l[i]) - mx);
  return mx + std::log(s);
}

// The CPU's float Gumbel score of token t (sampling.cpp's expression, FMA as x86-64-v3 builds it).
float gumbel_score(const float* l, int32_t t, const SampleParams& p) {
  const float inv = 1.0f / p.temperature;
  return std::fma(l[t], inv, -std::log(-std::log(sample_uniform(p.seed, p.index, t))));
}

// True (with the reason in *why) when the GPU's token `got` differs from the CPU's `want` only through
// rounding: the two Gumbel scores within 4 ulp, or a top_p cut whose target lies within 1e-5 of the
// total from a prefix mass, with `got` the draw of a neighbouring prefix.
bool near_tie(const float* l, int64_t V, const SampleParams& p, int32_t got, int32_t want, std::string* why) {
  if (p.temperature == 0 || got < 0 || got >= V) return false;
  std::vector<int32_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return l[a] != l[b] ? l[a] > l[b] : a < b; });
  int64_t n = (p.top_k > 0 && p.top_k < V) ? p.top_k : V;
  std::vector<int64_t> allowed{n};
  if (p.top_p < 1) {
    const double mx = l[order[0]], inv_t = 1.0 / static_cast<double>(p.temperature);
    std::vector<double> cum(static_cast<size_t>(n) + 1, 0.0);
    for (int64_t i = 0; i < n; ++i)
      cum[static_cast<size_t>(i) + 1] = cum[static_cast<size_t>(i)] + std::exp((l[order[i]] - mx) * inv_t);
    const double target = p.top_p * cum[static_cast<size_t>(n)];
    int64_t np = n;
    for (int64_t i = 1; i <= n; ++i)
      if (cum[static_cast<size_t>(i)] >= target) {
        np = i;
        break;
      }
    allowed = {np};
    const double tol = 1e-5 * cum[static_cast<size_t>(n)];
    if (std::fabs(cum[static_cast<size_t>(np)] - target) <= tol && np + 1 <= n) allowed.push_back(np + 1);
    if (np > 1 && std::fabs(cum[static_cast<size_t>(np) - 1] - target) <= tol) allowed.push_back(np - 1);
    n = np;
  }
  auto draw = [&](int64_t k) {
    int32_t best = -1;
    float bs = -INFINITY;
    for (int64_t i = 0; i < k; ++i) {
      const float s = gumbel_score(l, order[i], p);
      if (s > bs || (s == bs && order[i] < best)) bs = s, best = order[i];
    }
    return best;
  };
  for (int64_t k : allowed)
    if (k != n && draw(k) == got) {
      *why = "top_p boundary: prefix " + std::to_string(k) + " instead of " + std::to_string(n);
      return true;
    }
  const bool inside = std::find(order.begin(), order.begin() + n, got) != order.begin() + n;
  const float a = gumbel_score(l, got, p), b = gumbel_score(l, want, p);
  const float big = std::max(std::fabs(a), std::fabs(b)), ulp = std::nextafter(big, INFINITY) - big;
  if (inside && std::fabs(a - b) <= 4 * ulp) {
    *why = "Gumbel scores " + std::to_string(a) + " and " + std::to_string(b) + " within 4 ulp";
    return true;
  }
  return false;
}

// GPU against CPU on (M, W) logits: tokens (near-ties diagnosed), logprobs, top ids and logprobs.
// Returns the number of tolerated near-ties.
int compare(const std::string& what, const Sampled& g, const Sampled& c, const std::vector<float>& logits, int64_t W,
            int64_t V, const std::vector<SampleParams>& ps, int64_t top_n) {
  int ties = 0;
  for (size_t m = 0; m < ps.size(); ++m) {
    const float* l = logits.data() + m * static_cast<size_t>(W);
    const std::string row = what + " row " + std::to_string(m) + " (T=" + std::to_string(ps[m].temperature) +
                            " top_k=" + std::to_string(ps[m].top_k) + " top_p=" + std::to_string(ps[m].top_p) + ")";
    if (g.tokens[m] != c.tokens[m]) {
      std::string why;
      if (near_tie(l, V, ps[m], g.tokens[m], c.tokens[m], &why)) {
        ++ties;
        std::printf("note: %s: GPU token %d, CPU token %d: %s\n", row.c_str(), g.tokens[m], c.tokens[m], why.c_str());
      } else {
        ADD_FAILURE() << row << ": GPU token " << g.tokens[m] << ", CPU token " << c.tokens[m];
        continue;
      }
    }
    if (g.tokens[m] < 0 || g.tokens[m] >= V) {
      ADD_FAILURE() << row << ": token " << g.tokens[m];
      continue;
    }
    const double ref = l[g.tokens[m]] - log_sum_exp(l, V);
    EXPECT_NEAR(g.logprobs[m], ref, 1e-4) << row << ": logprob of token " << g.tokens[m];
    for (int64_t j = 0; j < top_n; ++j) {
      const size_t k = m * static_cast<size_t>(top_n) + static_cast<size_t>(j);
      EXPECT_EQ(g.top_ids[k], c.top_ids[k]) << row << ": top " << j;
      EXPECT_NEAR(g.top_lps[k], c.top_lps[k], 1e-4) << row << ": top logprob " << j;
    }
  }
  return ties;
}

bool bitwise_equal(const Sampled& a, const Sampled& b) {
  auto same = [](const auto& x, const auto& y) {
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(x[0])) == 0;
  };
  return same(a.tokens, b.tokens) && same(a.logprobs, b.logprobs) && same(a.top_ids, b.top_ids) &&
         same(a.top_lps, b.top_lps);
}

struct Layout {
  DType dt;
  int64_t V, W;
};

// Every branch: bf16 vectors (W % 8 == 0) cached (V <= 102,400) or not, bf16 scalar (odd W), f32
// vectors cached or not, f32 scalar cached (50257) or not; f32 10000: 40 KB of row, a total just past
// the 48 KiB of shared memory that needs no opt-in.
const std::vector<Layout>& layouts() {
  static const std::vector<Layout> l{
      {DType::bf16, 61, 61},         {DType::bf16, 61, 64},          {DType::bf16, 1000, 1024},
      {DType::bf16, 50257, 50304},   {DType::bf16, 152064, 152064},  {DType::f32, 61, 61},
      {DType::f32, 1000, 1000},      {DType::f32, 50257, 50257},     {DType::f32, 50257, 50304},
      {DType::f32, 152064, 152064},  {DType::f32, 152064, 152067}, {DType::f32, 10000, 10000}};
  return l;
}

std::string describe(const Layout& L, int64_t M, uint64_t seed) {
  return std::string(L.dt == DType::bf16 ? "bf16" : "f32") + " V=" + std::to_string(L.V) + " W=" + std::to_string(L.W) +
         " M=" + std::to_string(M) + " seed=" + std::to_string(seed);
}

TEST(CudaSampling, MatchesCpu) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  int ties = 0, rows = 0;
  for (const Layout& L : layouts())
    for (int64_t M : {1, 7, 64}) {
      const uint64_t s = seed + static_cast<uint64_t>(L.V * 131 + L.W * 7 + M);
      const int64_t top_n = M == 1 ? 0 : (M == 7 ? 5 : 20);
      const std::vector<float> logits = make_logits(M, L.W, L.V, s);
      const std::vector<SampleParams> ps = param_mix(M, s);
      const Sampled c = run_cpu(logits, L.W, L.V, ps, top_n);
      const Sampled g = run_gpu(logits, L.W, L.V, ps, top_n, L.dt);
      ties += compare(describe(L, M, seed), g, c, logits, L.W, L.V, ps, top_n);
      rows += static_cast<int>(M);
    }
  // Near-ties are rare (~1e-5 a row): more than a handful means a systematic difference.
  EXPECT_LE(ties, 3) << "near-ties among " << rows << " rows, seed=" << seed;
}

// Groups of equal logits: argmax (lowest id), top_k, top_n and top_p cuts inside a group by id; -inf.
TEST(CudaSampling, Ties) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  const int64_t V = 1000, W = 1024, top_n = 20;
  std::vector<std::vector<float>> rows;
  {
    std::vector<float> r(static_cast<size_t>(W), kPad);  // three levels, many equal
    const std::vector<int32_t> lv = test::randint(static_cast<size_t>(V), seed, 3);
    for (int64_t i = 0; i < V; ++i) r[static_cast<size_t>(i)] = static_cast<float>(lv[static_cast<size_t>(i)]);
    rows.push_back(r);
    std::vector<float> e(static_cast<size_t>(W), kPad);  // all equal
    std::fill(e.begin(), e.begin() + V, 0.5f);
    rows.push_back(e);
    std::vector<float> z = r;  // -0 and +0 equal; half the vocabulary masked (-inf)
    for (int64_t i = 0; i < V; ++i) {
      float& x = z[static_cast<size_t>(i)];
      if (x == 2.0f) x = (i % 2) ? -0.0f : 0.0f;
      else if (x == 0.0f) x = -INFINITY;
    }
    rows.push_back(z);
    std::vector<float> top(static_cast<size_t>(W), kPad);  // a few at the top, the rest equal
    std::fill(top.begin(), top.begin() + V, -1.0f);
    for (int64_t i : {997, 13, 500, 501, 12}) top[static_cast<size_t>(i)] = 3.0f;
    rows.push_back(top);
  }
  const SampleParams kinds[] = {{0.0f, 0, 1.0f},  {1.0f, 0, 1.0f},   {1.0f, 5, 1.0f},   {1.0f, 300, 1.0f},
                                {1.0f, 0, 0.5f},  {0.7f, 10, 0.3f},  {1.0f, 0, 0.95f},  {2.0f, 400, 0.9f},
                                {1.0f, 1, 1.0f},  {1.0f, 0, 0.001f}, {0.3f, 7, 0.999f}};
  std::vector<float> logits;
  std::vector<SampleParams> ps;
  for (const auto& r : rows)
    for (SampleParams p : kinds)
      for (uint64_t k = 0; k < 3; ++k) {
        p.seed = seed + k;
        p.index = ps.size();
        logits.insert(logits.end(), r.begin(), r.end());
        ps.push_back(p);
      }
  const int64_t M = static_cast<int64_t>(ps.size());
  const Sampled c = run_cpu(logits, W, V, ps, top_n);
  for (DType dt : {DType::bf16, DType::f32}) {
    const Sampled g = run_gpu(logits, W, V, ps, top_n, dt);
    const std::string what = std::string("ties ") + (dt == DType::bf16 ? "bf16" : "f32") + " seed=" + std::to_string(seed);
    // Equal logits give equal weights: even top_p cuts are exact here, so no near-tie is tolerated.
    EXPECT_EQ(compare(what, g, c, logits, W, V, ps, top_n), 0) << what;
    for (int64_t m = 0; m < M; ++m)
      if (ps[static_cast<size_t>(m)].temperature == 0) {
        const float* l = logits.data() + m * W;
        EXPECT_EQ(g.tokens[static_cast<size_t>(m)], std::max_element(l, l + V) - l) << what << " row " << m;
      }
  }
  // The all-equal row: top_k 5 keeps ids 0..4, top_p 0.5 ids 0..499.
  for (size_t m = 0; m < ps.size(); ++m) {
    if (m / std::size(kinds) / 3 != 1) continue;
    if (ps[m].top_k == 5 && ps[m].top_p == 1.0f) EXPECT_LT(c.tokens[m], 5);
    if (ps[m].top_k == 0 && ps[m].top_p == 0.5f) EXPECT_LT(c.tokens[m], 500);
  }
}

// A row's results are the same, bit for bit, alone and in a batch; and two runs are bitwise equal.
TEST(CudaSampling, BatchInvariantAndDeterministic) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  for (const Layout& L : {Layout{DType::bf16, 50257, 50304}, Layout{DType::f32, 152064, 152064},
                          Layout{DType::bf16, 152064, 152064}, Layout{DType::f32, 61, 61}}) {
    const int64_t M = 40, top_n = 5;
    const std::vector<float> logits = make_logits(M, L.W, L.V, seed);
    const std::vector<SampleParams> ps = param_mix(M, seed);
    const std::string what = describe(L, M, seed);
    const Sampled a = run_gpu(logits, L.W, L.V, ps, top_n, L.dt), b = run_gpu(logits, L.W, L.V, ps, top_n, L.dt);
    EXPECT_TRUE(bitwise_equal(a, b)) << what << ": two runs differ";
    for (int64_t m : {int64_t{0}, int64_t{9}, int64_t{10}, int64_t{11}, M - 1}) {
      const std::vector<float> one(logits.begin() + m * L.W, logits.begin() + (m + 1) * L.W);
      const Sampled s = run_gpu(one, L.W, L.V, {ps[static_cast<size_t>(m)]}, top_n, L.dt);
      Sampled in_batch;
      in_batch.tokens = {a.tokens[static_cast<size_t>(m)]};
      in_batch.logprobs = {a.logprobs[static_cast<size_t>(m)]};
      in_batch.top_ids.assign(a.top_ids.begin() + m * top_n, a.top_ids.begin() + (m + 1) * top_n);
      in_batch.top_lps.assign(a.top_lps.begin() + m * top_n, a.top_lps.begin() + (m + 1) * top_n);
      EXPECT_TRUE(bitwise_equal(s, in_batch)) << what << ": row " << m << " alone differs from the batch";
    }
  }
}

// The GPU's draws over 20,000 positions of one row follow softmax(l / T) restricted to the top_p
// prefix (the prefix computed here in double), and nothing outside it is ever drawn.
TEST(CudaSampling, DrawFrequencies) {
  LMF_REQUIRE_GPU();
  const int64_t V = 12, W = 16, n = 20000;
  const std::vector<float> l = test::round_bf16({1.0f, 0.0f, -1.0f, 0.5f, 2.0f, -3.0f, 0.25f, 1.5f, -0.5f, 0.0f, 1.0f, -2.0f});
  for (const SampleParams base : {SampleParams{0.8f, 0, 0.9f}, SampleParams{1.3f, 6, 0.95f}, SampleParams{1.0f, 0, 1.0f}}) {
    std::vector<int32_t> order(static_cast<size_t>(V));
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return l[a] != l[b] ? l[a] > l[b] : a < b; });
    const int64_t nk = base.top_k > 0 ? base.top_k : V;
    std::vector<double> w(static_cast<size_t>(V), 0.0);
    double sum = 0;
    for (int64_t i = 0; i < nk; ++i) sum += (w[order[i]] = std::exp((l[order[i]] - l[order[0]]) / base.temperature));
    double cum = 0;
    int64_t np = nk;
    for (int64_t i = 0; i < nk; ++i)
      if ((cum += w[order[i]]) >= base.top_p * sum && base.top_p < 1) {
        np = i + 1;
        break;
      }
    double kept = 0;
    for (int64_t i = 0; i < V; ++i)
      if (std::find(order.begin(), order.begin() + np, i) == order.begin() + np) w[static_cast<size_t>(i)] = 0;
      else kept += w[static_cast<size_t>(i)];
    std::vector<float> logits;
    std::vector<SampleParams> ps;
    for (int64_t i = 0; i < n; ++i) {
      logits.insert(logits.end(), l.begin(), l.end());
      logits.insert(logits.end(), static_cast<size_t>(W - V), kPad);
      SampleParams p = base;
      p.seed = 77;
      p.index = static_cast<uint64_t>(i);
      ps.push_back(p);
    }
    const Sampled g = run_gpu(logits, W, V, ps, 0, DType::bf16);
    std::vector<double> freq(static_cast<size_t>(V), 0.0);
    for (int32_t t : g.tokens) {
      ASSERT_TRUE(t >= 0 && t < V) << t;
      freq[static_cast<size_t>(t)] += 1.0 / n;
    }
    for (int64_t i = 0; i < V; ++i) {
      const double p = w[static_cast<size_t>(i)] / kept;
      if (p == 0) EXPECT_EQ(freq[static_cast<size_t>(i)], 0.0) << "token " << i << " outside the cut was drawn";
      EXPECT_NEAR(freq[static_cast<size_t>(i)], p, 0.02) << "token " << i << " T=" << base.temperature
                                                          << " top_k=" << base.top_k << " top_p=" << base.top_p;
    }
  }
}

// top_n up to the GPU's limit (1024, and all of a 1000-column vocabulary) against the CPU; beyond it
// the launcher refuses with the value.
TEST(CudaSampling, LargeTopN) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  for (const auto& [L, top_n] : {std::pair{Layout{DType::bf16, 1000, 1024}, int64_t{1000}},
                                 std::pair{Layout{DType::bf16, 152064, 152064}, int64_t{1024}},
                                 std::pair{Layout{DType::f32, 50257, 50257}, int64_t{777}}}) {
    const int64_t M = 3;
    const std::vector<float> logits = make_logits(M, L.W, L.V, seed);
    const std::vector<SampleParams> ps = param_mix(M, seed);
    const Sampled c = run_cpu(logits, L.W, L.V, ps, top_n);
    const Sampled g = run_gpu(logits, L.W, L.V, ps, top_n, L.dt);
    EXPECT_LE(compare(describe(L, M, seed) + " top_n=" + std::to_string(top_n), g, c, logits, L.W, L.V, ps, top_n), 1);
  }
  const std::vector<float> logits = make_logits(1, 2048, 2000, seed);
  try {
    run_gpu(logits, 2048, 2000, param_mix(1, seed), 1025, DType::bf16);
    ADD_FAILURE() << "top_n=1025 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("top_n=1025"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace lmf
