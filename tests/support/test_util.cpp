#include "support/test_util.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <sstream>

#include "core/rng.h"

namespace lmf::test {

std::vector<float> randn(size_t n, uint64_t seed, float scale) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = scale * rng_normal(seed, 0x7e57, i);
  return v;
}

std::vector<float> uniform(size_t n, uint64_t seed, float lo, float hi) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = lo + (hi - lo) * rng_uniform(seed, 0x7e58, i);
  return v;
}

std::vector<int32_t> randint(size_t n, uint64_t seed, int32_t hi) {
  std::vector<int32_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<int32_t>(rng_u64(seed, 0x7e59, i) % static_cast<uint64_t>(hi));
  return v;
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }
std::vector<float> to_float(const std::vector<double>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = static_cast<float>(v[i]);
  return r;
}

Tensor tensor_of(std::vector<float>& v, std::initializer_list<int64_t> shape, const char* name) {
  Tensor t(v.data(), DType::f32, shape, name);
  LMF_CHECK(static_cast<size_t>(t.numel()) == v.size(), "tensor_of: shape ", t.shape_str(), " vs ", v.size());
  return t;
}

Tensor tensor_of(std::vector<int32_t>& v, std::initializer_list<int64_t> shape, const char* name) {
  Tensor t(v.data(), DType::i32, shape, name);
  LMF_CHECK(static_cast<size_t>(t.numel()) == v.size(), "tensor_of: shape ", t.shape_str(), " vs ", v.size());
  return t;
}

::testing::AssertionResult close_to_tensor_scale(const std::string& what, const float* actual, const double* ref,
                                                 size_t n, double rel, double floor, double* worst) {
  double mx = 0, err = 0;
  for (size_t i = 0; i < n; ++i) {
    mx = std::max(mx, std::fabs(ref[i]));
    err = std::max(err, std::fabs(actual[i] - ref[i]));
  }
  if (worst) *worst = err / std::max(mx, 1e-30);
  return all_close(what, actual, ref, n, rel * mx + floor, 0.0);
}

::testing::AssertionResult all_close(const std::string& what, const float* actual, const double* ref, size_t n,
                                     double atol, double rtol) {
  double max_abs = 0, max_rel = 0, worst_used = 0;
  size_t worst = 0;
  bool nan = false;
  for (size_t i = 0; i < n; ++i) {
    double a = actual[i], r = ref[i];
    if (std::isnan(a) != std::isnan(r)) { nan = true; worst = i; break; }
    double err = std::fabs(a - r);
    double used = err / (atol + rtol * std::fabs(r));
    max_abs = std::max(max_abs, err);
    if (std::fabs(r) > 0) max_rel = std::max(max_rel, err / std::fabs(r));
    if (used > worst_used) { worst_used = used; worst = i; }
  }
  if (!nan && worst_used <= 1.0) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os << what << ": " << (nan ? "NaN mismatch" : "out of tolerance") << " at index " << worst << " of " << n
     << ": value " << actual[worst] << " reference " << ref[worst] << "; max abs err " << max_abs
     << ", max rel err " << max_rel << ", tolerance used " << worst_used * 100 << "% (atol " << atol << ", rtol "
     << rtol << ")";
  return ::testing::AssertionFailure() << os.str();
}

std::vector<double> finite_diff(const std::function<double(const std::vector<double>&)>& f, std::vector<double> x,
                                double h) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    double x0 = x[i], step = h * std::max(1.0, std::fabs(x0));
    x[i] = x0 + step;
    double fp = f(x);
    x[i] = x0 - step;
    double fm = f(x);
    x[i] = x0;
    g[i] = (fp - fm) / (2 * step);
  }
  return g;
}

std::vector<TensorSpec> model_like_specs(int layers, int64_t C) {
  std::vector<TensorSpec> s{{"wte", {37, C}}, {"wpe", {11, C}}, {"empty2d", {0, C}}};
  for (int l = 0; l < layers; ++l) {
    const std::string h = "h" + std::to_string(l) + ".";
    s.push_back({h + "ln1.w", {C}});
    s.push_back({h + "ln1.b", {C}});
    s.push_back({h + "attn.w", {C, 3 * C}});
    s.push_back({h + "attn.b", {3 * C}});
    s.push_back({h + "proj.w", {C, C}});
    s.push_back({h + "fc.w", {C, 4 * C}});  // right after proj.w: one merged range
    s.push_back({h + "empty1d", {0}});
    s.push_back({h + "fc.b", {4 * C}});
    s.push_back({h + "fc2.w", {4 * C, C}});
  }
  s.push_back({"cube", {2, 3, C}});
  s.push_back({"lnf.w", {C}});
  s.push_back({"scale", {1}});
  s.push_back({"head.w", {C, 29}});  // last tensor 2-D: its range ends at the arena's last element
  return s;
}

const char* lmforge_binary() { return LMF_BINARY; }
std::string fixture_path(const std::string& name) { return std::string(LMF_TEST_FIXTURES) + "/" + name; }

std::string smollm2_path() {
  const std::filesystem::path p = std::filesystem::path(LMF_TEST_FIXTURES) / ".." / ".." / "third_party" / "smollm2" /
                                  "SmolLM2-135M-Instruct.Q4_1.gguf";
  return std::filesystem::exists(p) ? p.lexically_normal().string() : "";
}

std::string make_temp_dir(const std::string& tag) {
  namespace fs = std::filesystem;
  std::string tmpl = (fs::temp_directory_path() / ("lmforge_" + tag + "_XXXXXX")).string();
  char* p = mkdtemp(tmpl.data());
  LMF_CHECK(p != nullptr, "mkdtemp failed for ", tmpl);
  return tmpl;
}

}  // namespace lmf::test
