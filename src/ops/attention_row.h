// attention_row.h: the per-row arithmetic of causal attention on the CPU, shared by the training
// forward (attention.cpp) and serving's paged attention (paged_attention.cpp), so that a row's output
// is bitwise the same in both: the trainer's log-probabilities are the sampler's (docs/SERVING.md).
#pragma once
#include <cmath>
#include <cstdint>

#include "ops/cpu_math.h"

namespace lmf {

// 1/sqrt(HS) in fp32, the one scale every attention kernel uses (CPU and GPU).
inline float attention_scale(int64_t HS) { return 1.0f / std::sqrt(static_cast<float>(HS)); }

// In place on p[0, t] (scores of query row t): p = softmax(p) (max-subtracted, float sum, each in the
// fixed order of cpu_math.h); then zeros in p[t+1, width).
inline void softmax_causal_row(float* p, int64_t t, int64_t width) {
  const int64_t n = t + 1;
  const float mx = cpu_math::row_max(p, n);
  for (int64_t s = 0; s < n; ++s) p[s] = cpu_math::exp_nonpos(p[s] - mx);
  const float inv = 1.0f / cpu_math::row_sum(p, n);
  for (int64_t s = 0; s < n; ++s) p[s] *= inv;
  for (int64_t s = n; s < width; ++s) p[s] = 0.0f;
}

}  // namespace lmf
