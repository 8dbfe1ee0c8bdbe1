// sampler.h: next-token sampling with temperature, top-k and top-p (nucleus), reproducible from a
// seed through the counter RNG: the draw for generated token i is rng_uniform(seed, kSampleStream, i).
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

namespace lmf {

struct SamplerOptions {
  float temperature = 0.8f;  // 0 = greedy (argmax)
  int64_t top_k = 0;         // 0 = off
  float top_p = 1.0f;        // 1 = off
  uint64_t seed = 1337;
};

// Validates the options; throws naming the flag.
void sampler_validate(const SamplerOptions& o);

class Sampler {
 public:
  Sampler(const SamplerOptions& o, int64_t vocab_size);
  // logits: (V). `index` is the number of tokens generated so far.
  int32_t sample(const float* logits, uint64_t index);

 private:
  SamplerOptions o_;
  int64_t V_;
  std::vector<std::pair<float, int32_t>> cand_;  // planned once: (probability, token)
};

}  // namespace lmf
