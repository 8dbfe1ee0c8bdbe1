// test_ops_optim.cpp: grad_global_norm against a float64 reference (and thread-count independence),
// adamw_update over several steps against a float64 reimplementation of torch.optim.AdamW with
// clipping on/off and weight decay on/off, determinism and shape errors; adamw_update_flat over real
// arenas against adamw_update per tensor (bitwise), its decay table and its argument errors.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "core/arena.h"
#include "ops/optim.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::randn;
using test::model_like_specs;
using test::tensor_of;

double ref_norm(const std::vector<float>& g) {
  double s = 0;
  for (float v : g) s += static_cast<double>(v) * v;
  return std::sqrt(s);
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

float op_norm(std::vector<float>& g) {
  std::vector<float> norm(1, -1.0f);
  grad_global_norm(tensor_of(norm, {1}, "norm"), tensor_of(g, {static_cast<int64_t>(g.size())}, "grads"));
  return norm[0];
}

void expect_error_naming(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one naming '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

// Sizes: awkward small ones, exactly one block (2^14), and 70 blocks + 123 (crosses the 64-block
// group boundary of the CPU kernel and ends in a partial block).
TEST(OpsOptim, GradGlobalNormMatchesReference) {
  uint64_t seed = 1;
  std::vector<int64_t> sizes = test::awkward_sizes();
  sizes.push_back(1 << 14);
  sizes.push_back(70 * (1 << 14) + 123);
  for (int64_t n : sizes) {
    auto g = randn(n, seed++, 0.3f);
    // The sum is exact to ~1e-15 in double; only the final rounding to fp32 (6e-8) remains.
    const double ref = ref_norm(g);
    const float got = op_norm(g);
    EXPECT_NEAR(got, ref, 2e-7 * ref) << "n=" << n;
  }
  // Any shape is accepted: the norm is over every element.
  auto g = randn(7 * 19 * 3, 77);
  std::vector<float> norm(1);
  grad_global_norm(tensor_of(norm, {1}, "norm"), tensor_of(g, {7, 19, 3}, "grads"));
  EXPECT_NEAR(norm[0], ref_norm(g), 2e-7 * ref_norm(g));
  // Huge values whose squares overflow fp32 but not double.
  std::vector<float> big{3e20f, -4e20f};
  EXPECT_NEAR(op_norm(big), 5e20, 5e20 * 2e-7);
}

TEST(OpsOptim, GradGlobalNormIndependentOfThreadCount) {
  auto g = randn(70 * (1 << 14) + 123, 5);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const float one = op_norm(g);
  omp_set_num_threads(3);
  const float three = op_norm(g);
  omp_set_num_threads(saved);
  const float dflt = op_norm(g);
  EXPECT_EQ(std::memcmp(&one, &three, sizeof(float)), 0) << one << " vs " << three;
  EXPECT_EQ(std::memcmp(&one, &dflt, sizeof(float)), 0) << one << " vs " << dflt;
}

// float64 torch.optim.AdamW (single-tensor path), after clip_grad_norm_-style clipping with the
// header's clip factor min(1, max_norm / (norm + 1e-6)):
//   param *= 1 - lr wd; m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g^2
//   param -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
struct RefAdamW {
  std::vector<double> p, m, v;
  void step(const std::vector<float>& grad, double max_norm, double lr, double b1, double b2, double eps, double wd,
            int64_t t) {
    double norm = 0;
    for (float g : grad) norm += static_cast<double>(g) * g;
    norm = std::sqrt(norm);
    const double clip = max_norm > 0 ? std::min(1.0, max_norm / (norm + 1e-6)) : 1.0;
    const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
    for (size_t i = 0; i < p.size(); ++i) {
      const double g = clip * grad[i];
      p[i] *= 1 - lr * wd;
      m[i] += (1 - b1) * (g - m[i]);
      v[i] = b2 * v[i] + (1 - b2) * g * g;
      p[i] -= lr / bc1 * m[i] / (std::sqrt(v[i]) / std::sqrt(bc2) + eps);
    }
  }
};

// Several steps; (max_norm, weight_decay) = clipping active + decay, clipping inactive (max_norm
// above the norm) without decay, clipping off (max_norm = 0, norm tensor absent) + decay.
TEST(OpsOptim, AdamWMatchesTorchFormula) {
  struct Case {
    float max_norm, wd;
    bool pass_norm;
  };
  const std::vector<Case> cases{{1.0f, 0.1f, true}, {1e6f, 0.0f, true}, {0.0f, 0.1f, false}, {0.0f, 0.1f, true}};
  // lr large against |param| ~ 0.1 so that the update itself is checked, not just the fp32 rounding
  // of param.
  const float lr = 2e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
  uint64_t seed = 10;
  for (const Case& c : cases)
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{19}, int64_t{111}, int64_t{40000}}) {
      auto p = randn(n, seed++, 0.1f), m = std::vector<float>(n, 0.0f), v = std::vector<float>(n, 0.0f);
      RefAdamW ref{test::to_double(p), std::vector<double>(n, 0.0), std::vector<double>(n, 0.0)};
      for (int64_t t = 1; t <= 6; ++t) {
        // Gradients of varying scale; every 5th element always ~1e-8 (sqrt(v) ~ eps: eps matters);
        // at t = 3 every 3rd gradient is exactly 0.
        auto g = randn(n, seed++, t % 2 ? 2.0f : 0.05f);
        for (int64_t i = 0; i < n; i += 5) g[i] *= 1e-8f;
        if (t == 3)
          for (int64_t i = 1; i < n; i += 3) g[i] = 0.0f;
        std::vector<float> norm(1);
        grad_global_norm(tensor_of(norm, {1}, "norm"), tensor_of(g, {n}, "grads"));
        adamw_update(tensor_of(p, {n}, "param"), tensor_of(m, {n}, "m"), tensor_of(v, {n}, "v"),
                     tensor_of(g, {n}, "grad"), c.pass_norm ? tensor_of(norm, {1}, "norm") : Tensor(), c.max_norm, lr,
                     b1, b2, eps, c.wd, t);
        ref.step(g, c.max_norm, lr, b1, b2, eps, c.wd, t);
        const std::string what = "n=" + std::to_string(n) + " step=" + std::to_string(t) +
                                 " max_norm=" + std::to_string(c.max_norm) + " wd=" + std::to_string(c.wd);
        // fp32 per-element arithmetic, ~1e-7 relative per operation, a handful of operations per step;
        // the clip factor carries the fp32 rounding of the norm. m = b1 m + (1 - b1) g cancels when m
        // and g have opposite signs, so the error is relative to the array's scale, not per element:
        // atol = 1e-5 (param, v) or 1e-4 (m) times max |ref|. Observed: 2.7e-7 (param), 1.6e-7 (v) and
        // 5e-6 (m, n = 1 where m cancels to a fraction of its terms) of the scale. A wrong eps, bias
        // correction, clip or decay shows up at >= 1e-3 of the scale.
        EXPECT_TRUE(all_close("param " + what, p, ref.p, 1e-5 * max_abs(ref.p), 1e-5));
        EXPECT_TRUE(all_close("m " + what, m, ref.m, 1e-4 * max_abs(ref.m), 1e-5));
        EXPECT_TRUE(all_close("v " + what, v, ref.v, 1e-5 * max_abs(ref.v), 1e-5));
      }
    }
}

// With clipping active the result differs from clipping off (the clip is really applied).
TEST(OpsOptim, AdamWClipChangesTheUpdate) {
  const int64_t n = 19;
  auto p0 = randn(n, 1), g = randn(n, 2, 10.0f);
  std::vector<float> norm(1);
  grad_global_norm(tensor_of(norm, {1}, "norm"), tensor_of(g, {n}, "grads"));
  ASSERT_GT(norm[0], 1.0f);
  std::vector<float> results[2];
  for (int k = 0; k < 2; ++k) {
    auto p = p0, m = randn(n, 3), v = randn(n, 4, 0.0f);
    for (auto& x : v) x = 0.01f;
    adamw_update(tensor_of(p, {n}, "param"), tensor_of(m, {n}, "m"), tensor_of(v, {n}, "v"), tensor_of(g, {n}, "grad"),
                 tensor_of(norm, {1}, "norm"), k == 0 ? 1.0f : 0.0f, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.0f, 5);
    results[k] = p;
  }
  EXPECT_NE(results[0], results[1]);
}

TEST(OpsOptim, AdamWDeterministic) {
  const int64_t n = 100003;
  auto p0 = randn(n, 1), g = randn(n, 2);
  std::vector<float> norm(1);
  grad_global_norm(tensor_of(norm, {1}, "norm"), tensor_of(g, {n}, "grads"));
  std::vector<float> out[2];
  for (int k = 0; k < 2; ++k) {
    auto p = p0;
    std::vector<float> m(n, 0.1f), v(n, 0.2f);
    adamw_update(tensor_of(p, {n}, "param"), tensor_of(m, {n}, "m"), tensor_of(v, {n}, "v"), tensor_of(g, {n}, "grad"),
                 tensor_of(norm, {1}, "norm"), 1.0f, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 3);
    out[k] = p;
  }
  EXPECT_EQ(std::memcmp(out[0].data(), out[1].data(), n * sizeof(float)), 0);
}

TEST(OpsOptim, BadShapesNameTheTensor) {
  std::vector<float> p(19), m(19), v(18), g(19), norm(2);
  expect_error_naming(
      [&] {
        adamw_update(tensor_of(p, {19}, "fc.weight"), tensor_of(m, {19}, "fc.weight.m"),
                     tensor_of(v, {18}, "fc.weight.v"), tensor_of(g, {19}, "grad"), Tensor(), 0.0f, 1e-3f, 0.9f, 0.95f,
                     1e-8f, 0.0f, 1);
      },
      "fc.weight.v");
  std::vector<float> v19(19);
  expect_error_naming(
      [&] {
        adamw_update(tensor_of(p, {19}, "param"), tensor_of(m, {19}, "m"), tensor_of(v19, {19}, "v"),
                     tensor_of(g, {19}, "grad"), Tensor(), 1.0f, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.0f, 1);
      },
      "absent");
  expect_error_naming(
      [&] {
        adamw_update(tensor_of(p, {19}, "param"), tensor_of(m, {19}, "m"), tensor_of(v19, {19}, "v"),
                     tensor_of(g, {19}, "grad"), Tensor(), 0.0f, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.0f, 0);
      },
      "step=0");
  expect_error_naming([&] { grad_global_norm(tensor_of(norm, {2}, "grad_norm"), tensor_of(g, {19}, "grads")); },
                      "grad_norm");
}


// --- adamw_update_flat ----------------------------------------------------------------------------

// Fills the real elements of every tensor (padding stays 0).
void fill_arena(const Arena& a, uint64_t seed, float scale) {
  for (size_t i = 0; i < a.size(); ++i) {
    const Tensor t = a[i];
    const std::vector<float> r = randn(static_cast<size_t>(t.numel()), seed + 1000003 * i, scale);
    if (!r.empty()) std::memcpy(t.data, r.data(), r.size() * sizeof(float));
  }
}

std::vector<float> arena_values(const Arena& a) {
  const Tensor f = a.flat_f32();
  return std::vector<float>(f.f32(), f.f32() + f.numel());
}

// Which flat elements belong to no tensor (padding).
std::vector<bool> padding_mask(const Arena& a) {
  std::vector<bool> pad(static_cast<size_t>(a.flat_f32().numel()), true);
  for (size_t i = 0; i < a.size(); ++i)
    for (int64_t k = 0; k < a.spec(i).numel(); ++k) pad[a.offset_elems(i) + static_cast<size_t>(k)] = false;
  return pad;
}

::testing::AssertionResult bitwise_same(const std::string& what, const std::vector<float>& a,
                                        const std::vector<float>& b) {
  if (a.size() != b.size())
    return ::testing::AssertionFailure() << what << ": sizes " << a.size() << " vs " << b.size();
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0)
      return ::testing::AssertionFailure() << what << ": first bitwise difference at flat index " << i << " of "
                                           << a.size() << ": " << a[i] << " vs " << b[i];
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult padding_is_zero(const std::string& what, const std::vector<float>& a,
                                           const std::vector<bool>& pad) {
  const float zero = 0.0f;
  for (size_t i = 0; i < a.size(); ++i)
    if (pad[i] && std::memcmp(&a[i], &zero, sizeof(float)) != 0)
      return ::testing::AssertionFailure() << what << ": padding element " << i << " is " << a[i] << ", not +0";
  return ::testing::AssertionSuccess();
}

Tensor ranges_tensor(std::vector<int32_t>& r, const char* name = "decay_ranges") {
  return Tensor(r.data(), DType::i32, {static_cast<int64_t>(r.size() / 2), 2}, name);
}

TEST(OpsOptim, AdamWDecayRangesCoverExactlyTheMatrices) {
  Arena p("params", model_like_specs(3, 13));
  std::vector<int32_t> r = adamw_decay_ranges(p);
  ASSERT_EQ(r.size() % 2, 0u);
  const int64_t n = p.flat_f32().numel();
  auto decayed = [&](int64_t i) {
    for (size_t k = 0; k < r.size(); k += 2)
      if (r[k] <= i && i < r[k + 1]) return true;
    return false;
  };
  for (size_t k = 0; k < r.size(); k += 2) {
    EXPECT_LT(r[k], r[k + 1]) << "range " << k / 2;
    EXPECT_LE(r[k + 1], n) << "range " << k / 2;
    if (k) EXPECT_LE(r[k - 1], r[k]) << "range " << k / 2;
  }
  size_t n2d = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    const TensorSpec& s = p.spec(i);
    const bool want = s.shape.size() >= 2;  // matrices and stacks of them (MoE experts)
    n2d += want && s.numel() > 0;
    for (int64_t e = 0; e < s.numel(); ++e)
      ASSERT_EQ(decayed(static_cast<int64_t>(p.offset_elems(i)) + e), want) << s.name << " element " << e;
  }
  // wte+wpe, per layer attn.w, proj.w+fc.w, fc2.w (followed by the next layer's 1-D ln1.w), head.w.
  EXPECT_EQ(r.size() / 2, 1 + 3 * 3 + 1u) << "2-D tensors: " << n2d;
  // An arena without matrices: an empty table.
  Arena b("biases", {{"a", {5}}, {"b", {2}}});
  EXPECT_TRUE(adamw_decay_ranges(b).empty());
  // Only f32 arenas have a flat view.
  Arena q("mixed", {{"w", {4, 4}}, {"ids", {3}, DType::i32}});
  expect_error_naming([&] { adamw_decay_ranges(q); }, "ids");
}

// The flat update over whole arenas equals adamw_update per tensor (decay on 2-D tensors only, as the
// trainer does) bit for bit, over several steps with clipping active, inactive and off; padding stays
// exactly +0 in param, m and v. Sizes: tiny tensors, and tensors above adamw_update's OpenMP threshold
// (2^15 elements), so both paths also run multi-threaded with their own partitions.
TEST(OpsOptim, AdamWFlatBitwiseEqualsPerTensor) {
  struct Case {
    float max_norm, wd;
    const char* what;
  };
  const Case cases[] = {{0.5f, 0.1f, "clip active"}, {1e6f, 0.1f, "clip inactive"}, {0.0f, 0.05f, "clip off"}};
  const float lr = 2e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
  uint64_t seed = 500;
  for (const auto& [layers, C] : {std::pair<int, int64_t>{2, 13}, std::pair<int, int64_t>{1, 97}})
    for (const Case& c : cases) {
      const std::vector<TensorSpec> specs = model_like_specs(layers, C);
      Arena p("params", specs), m("m", specs), v("v", specs), g("grads", specs);
      Arena p2("params2", specs), m2("m2", specs), v2("v2", specs);
      fill_arena(p, seed++, 0.1f);
      std::memcpy(p2.base(), p.base(), p.bytes());
      std::vector<int32_t> r = adamw_decay_ranges(p);
      const std::vector<bool> pad = padding_mask(p);
      ASSERT_GT(std::count(pad.begin(), pad.end(), true), 0) << "the arena should have padding";
      for (int64_t t = 1; t <= 5; ++t) {
        fill_arena(g, seed++, t % 2 ? 1.0f : 0.02f);
        std::vector<float> norm(1);
        grad_global_norm(tensor_of(norm, {1}, "norm"), g.flat_f32());
        if (c.max_norm == 0.5f) ASSERT_GT(norm[0], 2 * c.max_norm) << "clipping should be active";
        if (c.max_norm == 1e6f) ASSERT_LT(norm[0], c.max_norm) << "clipping should be inactive";
        const Tensor nt = tensor_of(norm, {1}, "norm");
        adamw_update_flat(p.flat_f32(), m.flat_f32(), v.flat_f32(), g.flat_f32(), ranges_tensor(r), nt, c.max_norm, lr,
                          b1, b2, eps, c.wd, t);
        for (size_t i = 0; i < p2.size(); ++i)
          adamw_update(p2[i], m2[i], v2[i], g[i], nt, c.max_norm, lr, b1, b2, eps,
                       p2.spec(i).shape.size() >= 2 ? c.wd : 0.0f, t);
        const std::string at = std::string(c.what) + " C=" + std::to_string(C) + " step " + std::to_string(t);
        ASSERT_TRUE(bitwise_same("param " + at, arena_values(p), arena_values(p2)));
        ASSERT_TRUE(bitwise_same("m " + at, arena_values(m), arena_values(m2)));
        ASSERT_TRUE(bitwise_same("v " + at, arena_values(v), arena_values(v2)));
        ASSERT_TRUE(padding_is_zero("param " + at, arena_values(p), pad));
        ASSERT_TRUE(padding_is_zero("m " + at, arena_values(m), pad));
        ASSERT_TRUE(padding_is_zero("v " + at, arena_values(v), pad));
      }
    }
}

// An empty table is adamw_update with no decay anywhere; a table covering everything is decay
// everywhere (padding included: it is zero and stays zero). The decay really changes the result.
TEST(OpsOptim, AdamWFlatEmptyAndFullTables) {
  const std::vector<TensorSpec> specs = model_like_specs(1, 13);
  std::vector<float> results[2];
  for (int full = 0; full < 2; ++full) {
    Arena p("params", specs), m("m", specs), v("v", specs), g("grads", specs);
    Arena p2("params2", specs), m2("m2", specs), v2("v2", specs);
    fill_arena(p, 1, 0.1f);
    fill_arena(g, 2, 1.0f);
    std::memcpy(p2.base(), p.base(), p.bytes());
    const int64_t n = p.flat_f32().numel();
    std::vector<int32_t> r;
    if (full) r = {0, static_cast<int32_t>(n)};
    std::vector<float> norm(1);
    grad_global_norm(tensor_of(norm, {1}, "norm"), g.flat_f32());
    adamw_update_flat(p.flat_f32(), m.flat_f32(), v.flat_f32(), g.flat_f32(), ranges_tensor(r),
                      tensor_of(norm, {1}, "norm"), 1.0f, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 2);
    adamw_update(p2.flat_f32(), m2.flat_f32(), v2.flat_f32(), g.flat_f32(), tensor_of(norm, {1}, "norm"), 1.0f, 1e-2f,
                 0.9f, 0.95f, 1e-8f, full ? 0.1f : 0.0f, 2);
    EXPECT_TRUE(bitwise_same(full ? "full table" : "empty table", arena_values(p), arena_values(p2)));
    EXPECT_TRUE(padding_is_zero(full ? "full table" : "empty table", arena_values(p), padding_mask(p)));
    results[full] = arena_values(p);
  }
  EXPECT_NE(results[0], results[1]);
}

TEST(OpsOptim, AdamWFlatBadArgumentsNameTheTensor) {
  const int64_t n = 64;
  std::vector<float> p(n), m(n), v(n), g(n), m_short(n - 1), norm(1, 1.0f);
  auto call = [&](Tensor ranges, Tensor mt, Tensor pt) {
    adamw_update_flat(pt, mt, tensor_of(v, {n}, "flat.v"), tensor_of(g, {n}, "flat.g"), ranges,
                      tensor_of(norm, {1}, "norm"), 1.0f, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 1);
  };
  const Tensor pt = tensor_of(p, {n}, "flat.p"), mt = tensor_of(m, {n}, "flat.m");
  std::vector<int32_t> ok{0, 16, 32, 64};
  EXPECT_NO_THROW(call(ranges_tensor(ok), mt, pt));
  expect_error_naming([&] { call(ranges_tensor(ok), tensor_of(m_short, {n - 1}, "flat.m"), pt); }, "flat.m");
  expect_error_naming([&] { call(ranges_tensor(ok), mt, tensor_of(p, {8, 8}, "flat.p")); }, "1-D");
  std::vector<int32_t> unsorted{32, 48, 0, 16};
  expect_error_naming([&] { call(ranges_tensor(unsorted, "my_ranges"), mt, pt); }, "sorted");
  std::vector<int32_t> overlap{0, 20, 16, 32};
  expect_error_naming([&] { call(ranges_tensor(overlap, "my_ranges"), mt, pt); }, "my_ranges");
  std::vector<int32_t> outside{0, 16, 60, 65};
  expect_error_naming([&] { call(ranges_tensor(outside), mt, pt); }, "outside [0, 64)");
  std::vector<int32_t> negative{-1, 4};
  expect_error_naming([&] { call(ranges_tensor(negative), mt, pt); }, "range #0");
  std::vector<int32_t> empty_range{0, 16, 20, 20};
  expect_error_naming([&] { call(ranges_tensor(empty_range), mt, pt); }, "range #1");
  std::vector<int32_t> three(6);
  expect_error_naming([&] { call(Tensor(three.data(), DType::i32, {2, 3}, "my_ranges"), mt, pt); }, "(S, 2)");
  std::vector<float> as_float{0, 16};
  expect_error_naming([&] { call(tensor_of(as_float, {1, 2}, "my_ranges"), mt, pt); }, "expected i32");
  expect_error_naming([&] { call(Tensor(), mt, pt); }, "absent");
  std::vector<int32_t> too_many(2 * (kAdamWMaxDecayRanges + 1));
  expect_error_naming([&] { call(ranges_tensor(too_many, "my_ranges"), mt, pt); }, "at most");
}

}  // namespace
}  // namespace lmf
