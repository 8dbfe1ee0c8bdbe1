// sampling.cpp: the CPU reference of batched next-token sampling (sampling.h).
//
// Per row: the max logit and the log-sum-exp of the raw logits (logprobs), then either the argmax or
// the candidates sorted by (logit desc, id asc), cut to top_k, cut to the top_p mass (weights
// exp((logit - max) / temperature) summed in double), and the Gumbel-max draw among them. Rows are
// independent (parallel_for over them).
#include "ops/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/parallel.h"
#include "ops/cpu_math.h"
#include "ops/dispatch.h"


namespace lmf {

std::string sample_params_problem(const SampleParams& p, const std::string& prefix) {
  auto msg = [&](const char* name, const std::string& v, const char* rule) {
    return prefix + name + "=" + v + " " + rule;
  };
  if (!(p.temperature >= 0) || !std::isfinite(p.temperature))
    return msg("temperature", std::to_string(p.temperature), "must be a finite number >= 0");
  if (p.top_k < 0) return msg("top_k", std::to_string(p.top_k), "must be >= 0 (0: off)");
  if (!(p.top_p > 0 && p.top_p <= 1)) return msg("top_p", std::to_string(p.top_p), "must be in (0, 1]");
  return "";
}

namespace {

struct ByLogit {
  const float* l;
  bool operator()(int32_t a, int32_t b) const { return l[a] != l[b] ? l[a] > l[b] : a < b; }
};

int32_t draw(const float* l, int32_t* order, int64_t V, float mx, const SampleParams& p) {
  if (p.temperature == 0) return static_cast<int32_t>(std::max_element(l, l + V) - l);
  std::iota(order, order + V, 0);
  int64_t n = V;
  if (p.top_k > 0 && p.top_k < V) {
    n = p.top_k;
    std::partial_sort(order, order + n, order + V, ByLogit{l});
  } else if (p.top_p < 1) {
    std::sort(order, order + V, ByLogit{l});
  }
  const double inv_t = 1.0 / static_cast<double>(p.temperature);
  if (p.top_p < 1) {  // the shortest prefix (in sorted order) reaching the top_p mass
    auto weight = [&](int64_t i) { return std::exp((static_cast<double>(l[order[i]]) - mx) * inv_t); };
    double sum = 0, cum = 0;
    for (int64_t i = 0; i < n; ++i) sum += weight(i);
    for (int64_t i = 0; i < n; ++i) {
      cum += weight(i);
      if (cum >= p.top_p * sum) {
        n = i + 1;
        break;
      }
    }
  }
  // Gumbel-max among the candidates (ties: the lowest id)
  const float inv_tf = 1.0f / p.temperature;
  auto score_of = [&](int32_t t) {  // fma: the GPU kernel's exact expression
    return std::fma(l[t], inv_tf, -std::log(-std::log(sample_uniform(p.seed, p.index, t))));
  };
  int32_t best = order[0];  // an all -inf row draws its first candidate
  float best_score = score_of(best);
  for (int64_t i = 1; i < n; ++i) {
    const int32_t t = order[i];
    const float score = score_of(t);
    if (score > best_score || (score == best_score && t < best)) {
      best = t;
      best_score = score;
    }
  }
  return best;
}

}  // namespace

void sample_tokens(Tensor tokens, Tensor logprobs, Tensor top_ids, Tensor top_logprobs, Tensor logits, Tensor params,
                   int64_t V, Tensor scratch) {
  const char* op = "sample_tokens";
  const bool gpu = logits.defined() && logits.device == Device::cuda;
  check_dtype(logits, gpu && logits.dtype == DType::bf16 ? DType::bf16 : DType::f32, op);
  LMF_CHECK(logits.ndim == 2 && V >= 1 && V <= logits.dim(1), op, ": tensor '", logits.name, "' has shape ",
            logits.shape_str(), ", expected (M, W >= V=", V, ")");
  const int64_t M = logits.dim(0), W = logits.dim(1);
  check_dtype(tokens, DType::i32, op);
  check_shape(tokens, {M}, op);
  check_f32(logprobs, op);
  check_shape(logprobs, {M}, op);
  check_dtype(params, DType::i32, op);
  check_shape(params, {M, kSampleParamWords}, op);
  const int64_t top_n = top_ids.defined() ? top_ids.dim(1) : 0;
  if (top_n > 0) {
    check_dtype(top_ids, DType::i32, op);
    check_shape(top_ids, {M, top_n}, op);
    check_f32(top_logprobs, op);
    check_shape(top_logprobs, {M, top_n}, op);
    LMF_CHECK(top_n <= V, op, ": ", top_n, " top log-probabilities asked of a vocabulary of ", V);
  }
  check_same_device(op, {&tokens, &logprobs, &top_ids, &top_logprobs, &logits, &params, &scratch});
  if (gpu) {
    [[maybe_unused]] const auto* ps = reinterpret_cast<const SampleParams*>(params.data);
    if (logits.dtype == DType::bf16)
      LMF_CUDA_DISPATCH(op, cuda::sample_tokens(tokens.i32(), logprobs.f32(), top_n ? top_ids.i32() : nullptr,
                                                top_n ? top_logprobs.f32() : nullptr, top_n, logits.ptr<bf16>(), M, W,
                                                V, ps));
    else
      LMF_CUDA_DISPATCH(op, cuda::sample_tokens(tokens.i32(), logprobs.f32(), top_n ? top_ids.i32() : nullptr,
                                                top_n ? top_logprobs.f32() : nullptr, top_n, logits.f32(), M, W, V,
                                                ps));
    return;
  }
  check_dtype(scratch, DType::i32, op);
  check_shape(scratch, {M, V}, op);
  const auto* pp = reinterpret_cast<const SampleParams*>(params.data);
  for (int64_t m = 0; m < M; ++m) {
    const std::string problem = sample_params_problem(pp[m]);
    LMF_CHECK(problem.empty(), op, ": row ", m, ": ", problem);
  }
  parallel_for(M, 1, [&](int64_t m, int64_t) {  // one row per chunk
    const float* l = logits.f32() + m * W;
    int32_t* order = scratch.i32() + m * V;
    // log-probabilities exactly as the training loss computes them (ops/cpu_math.h): bitwise minus the
    // trainer's loss for the same row of logits
    const float mx = cpu_math::row_max(l, V);
    const double se = cpu_math::row_sum_exp_double(l, V, mx);
    const int32_t t = draw(l, order, V, mx, pp[m]);
    tokens.i32()[m] = t;
    logprobs.f32()[m] = -cpu_math::neg_log_softmax(mx, l[t], se);
    if (top_n > 0) {
      std::iota(order, order + V, 0);
      std::partial_sort(order, order + top_n, order + V, ByLogit{l});
      for (int64_t j = 0; j < top_n; ++j) {
        top_ids.i32()[m * top_n + j] = order[j];
        top_logprobs.f32()[m * top_n + j] = -cpu_math::neg_log_softmax(mx, l[order[j]], se);
      }
    }
  });
}

}  // namespace lmf
