// test_util.h: shared helpers for every lmforge test (STYLE.md practice 4).
//
// - random inputs from the counter-based RNG (fresh per seed, reproducible per seed)
// - all_close(): compares an fp32 result against an fp64 reference with an absolute + relative
//   tolerance; on failure reports the worst index, value, reference, max abs/rel error and how much
//   of the tolerance was used
// - finite_diff(): central differences of a scalar fp64 function, the ground truth for backward
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/arena.h"
#include "core/tensor.h"

namespace lmf::test {

// n values ~ N(0, scale^2) (or U(lo, hi) with uniform()).
std::vector<float> randn(size_t n, uint64_t seed, float scale = 1.0f);
std::vector<float> uniform(size_t n, uint64_t seed, float lo, float hi);
std::vector<int32_t> randint(size_t n, uint64_t seed, int32_t hi);  // in [0, hi)
std::vector<double> to_double(const std::vector<float>& v);
std::vector<float> to_float(const std::vector<double>& v);

// Tensor descriptor over a std::vector (no copy).
Tensor tensor_of(std::vector<float>& v, std::initializer_list<int64_t> shape, const char* name = "t");
Tensor tensor_of(std::vector<int32_t>& v, std::initializer_list<int64_t> shape, const char* name = "t");

// |actual - ref| <= atol + rtol * |ref| everywhere.
::testing::AssertionResult all_close(const std::string& what, const float* actual, const double* ref, size_t n,
                                     double atol, double rtol);
// One tolerance per tensor, scaled to its largest reference element: |actual - ref| <= rel max|ref| +
// floor everywhere (for gradients whose elements span orders of magnitude). *worst, when given,
// receives max |actual - ref| / max |ref|. Failures report as all_close's.
::testing::AssertionResult close_to_tensor_scale(const std::string& what, const float* actual, const double* ref,
                                                 size_t n, double rel, double floor, double* worst = nullptr);
inline ::testing::AssertionResult all_close(const std::string& what, const std::vector<float>& actual,
                                            const std::vector<double>& ref, double atol, double rtol) {
  if (actual.size() != ref.size())
    return ::testing::AssertionFailure() << what << ": size " << actual.size() << " vs reference " << ref.size();
  return all_close(what, actual.data(), ref.data(), actual.size(), atol, rtol);
}

// Central finite differences d f / d x_i, step h * max(1, |x_i|).
std::vector<double> finite_diff(const std::function<double(const std::vector<double>&)>& f, std::vector<double> x,
                                double h = 1e-6);

// A GPT-like spec list: embeddings (2-D), per layer 1-D norm gains/biases between 2-D weights, some
// 2-D weights next to each other (their ranges merge), a 3-D tensor (not decayed), empty tensors,
// a scalar. C odd so that most tensors end off the 16-float alignment (padding between them).
std::vector<TensorSpec> model_like_specs(int layers, int64_t C);

// The awkward sizes every op is tested on.
inline const std::vector<int64_t>& awkward_sizes() {
  static const std::vector<int64_t> s{1, 7, 19, 111};
  return s;
}

// Path to the lmforge binary and the fixtures folder (set by CMake).
const char* lmforge_binary();
std::string fixture_path(const std::string& name);
// The SmolLM2-135M-Instruct GGUF that scripts/fetch_smollm2.sh puts in third_party/smollm2/ (CI has it:
// scripts/install_deps.sh runs the script), or "" when it is not there.
std::string smollm2_path();

// A fresh empty temporary directory (removed by the caller if wanted).
std::string make_temp_dir(const std::string& tag);

}  // namespace lmf::test
