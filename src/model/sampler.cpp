#include "model/sampler.h"

#include <algorithm>
#include <cmath>

#include "core/check.h"
#include "core/rng.h"

namespace lmf {

namespace {
constexpr uint64_t kSampleStream = 0x5a3b;
}

void sampler_validate(const SamplerOptions& o) {
  if (!(o.temperature >= 0)) fail("--temperature=", o.temperature, " must be >= 0");
  if (o.top_k < 0) fail("--top-k=", o.top_k, " must be >= 0");
  if (!(o.top_p > 0 && o.top_p <= 1)) fail("--top-p=", o.top_p, " must be in (0, 1]");
}

Sampler::Sampler(const SamplerOptions& o, int64_t vocab_size) : o_(o), V_(vocab_size) {
  sampler_validate(o);
  cand_.resize(static_cast<size_t>(vocab_size));
}

int32_t Sampler::sample(const float* logits, uint64_t index) {
  if (o_.temperature == 0) return static_cast<int32_t>(std::max_element(logits, logits + V_) - logits);
  float mx = *std::max_element(logits, logits + V_);
  for (int64_t i = 0; i < V_; ++i) cand_[i] = {(logits[i] - mx) / o_.temperature, static_cast<int32_t>(i)};
  // sort by descending logit, ties by token id: a fixed order, so the draw is reproducible
  std::sort(cand_.begin(), cand_.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  size_t n = cand_.size();
  if (o_.top_k > 0) n = std::min(n, static_cast<size_t>(o_.top_k));
  double sum = 0;
  for (size_t i = 0; i < n; ++i) {
    cand_[i].first = std::exp(cand_[i].first);
    sum += cand_[i].first;
  }
  if (o_.top_p < 1) {
    double cum = 0;
    size_t keep = n;
    for (size_t i = 0; i < n; ++i) {
      cum += cand_[i].first / sum;
      if (cum >= o_.top_p) { keep = i + 1; break; }
    }
    n = keep;
    sum = 0;
    for (size_t i = 0; i < n; ++i) sum += cand_[i].first;
  }
  double u = rng_uniform(o_.seed, kSampleStream, index) * sum;
  double cum = 0;
  for (size_t i = 0; i < n; ++i) {
    cum += cand_[i].first;
    if (u < cum) return cand_[i].second;
  }
  return cand_[n - 1].second;
}

}  // namespace lmf
