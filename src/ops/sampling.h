// sampling.h: next-token sampling for a batch of rows, each with its own parameters (serving).
//
// Row m of logits (M, W) (the first V columns are the vocabulary) draws one token:
//   temperature 0: the argmax (ties: the lowest id);
//   else: softmax of logits / temperature, restricted to the top_k highest (0: all), then to the
//   smallest prefix, by decreasing probability (ties: lower id first), whose mass reaches top_p
//   (1: all); one uniform u = rng_uniform(seed, kSampleStream, index) picks from it.
// `index` is the position the token will take in its sequence, so a request's draws depend only on its
// seed and the positions, never on what else is in the batch (or on a preemption and recompute).
// logprob: the chosen token's log-softmax of the raw logits (the model's distribution, temperature 1);
// top (when top_n > 0): the top_n tokens by that log-probability (ties: lower id first).
#pragma once
#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace lmf {

constexpr uint64_t kSampleStream = 0x5a3b;

struct SampleParams {
  float temperature = 1.0f;  // >= 0
  int32_t top_k = 0;         // >= 0
  float top_p = 1.0f;        // (0, 1]
  uint64_t seed = 0;
  uint64_t index = 0;        // position of the token being drawn
};

// "" when valid, else one line naming the field (`prefix` + name) and the accepted values.
std::string sample_params_problem(const SampleParams& p, const std::string& prefix = "");

// logits: (M, W) f32 on the CPU; params: M entries on the host; tokens (M) i32, logprobs (M) f32;
// top_ids (M, top_n) i32 and top_logprobs (M, top_n) f32, absent when top_n == 0. V <= W columns used.
// scratch: (M, V) i32, planned by the caller (candidate orders).
void sample_tokens(Tensor tokens, Tensor logprobs, Tensor top_ids, Tensor top_logprobs, Tensor logits,
                   const SampleParams* params, int64_t V, Tensor scratch);

}  // namespace lmf
