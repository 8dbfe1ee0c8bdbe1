// sampling.h: next-token sampling for a batch of rows, each with its own parameters (serving).
//
// Row m of logits (M, W) (the first V columns are the vocabulary; f32 on the CPU, bf16 or f32 on the
// GPU) draws one token:
//   temperature 0: the argmax (ties: the lowest id);
//   else the candidates, in the order (logit desc, id asc), are cut to the first top_k (0: all), then
//   to the shortest prefix whose mass under softmax(logit / temperature) over those reaches top_p
//   (1: all); the token is the Gumbel-max draw among them: the argmax of
//   logit / temperature - log(-log(u)), u = sample_uniform(seed, index, token) (ties: the lowest id),
//   which is a draw from softmax(logit / temperature) restricted to the candidates.
// `index` is the position the token will take in its sequence, so a request's draws depend only on its
// seed, its positions and its logits, never on what else is in the batch (or on a preemption and
// recompute). Masses are summed in a fixed order: double on the CPU; fp32 weights summed as 64-bit
// fixed point on the GPU (a top_p cut may differ only where a prefix mass is within ~1e-6 of the target).
// logprob: the chosen token's log-softmax of the raw logits (the model's distribution, temperature 1);
// top (when top_n > 0): the top_n tokens by that log-probability (ties: lower id first).
#pragma once
#include <cstdint>
#include <string>

#include "core/rng.h"
#include "core/tensor.h"

namespace lmf {

constexpr uint64_t kSampleStream = 0x5a3b;

// One row's parameters: 32 bytes, the layout of a (M, kSampleParamWords) i32 tensor's row.
struct SampleParams {
  float temperature = 1.0f;  // >= 0
  int32_t top_k = 0;         // >= 0
  float top_p = 1.0f;        // (0, 1]
  uint32_t unused = 0;
  uint64_t seed = 0;
  uint64_t index = 0;        // position of the token being drawn
};
constexpr int64_t kSampleParamWords = 8;
static_assert(sizeof(SampleParams) == kSampleParamWords * 4);

// The uniform in (0, 1) of token `token` for the draw at position `index` of a request seeded `seed`.
LMF_HD inline float sample_uniform(uint64_t seed, uint64_t index, int64_t token) {
  const auto b = philox4x32(seed, (kSampleStream << 40) ^ index, static_cast<uint64_t>(token) >> 2);
  return (static_cast<float>(b[static_cast<size_t>(token & 3)] >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

// "" when valid, else one line naming the field (`prefix` + name) and the accepted values.
std::string sample_params_problem(const SampleParams& p, const std::string& prefix = "");

// logits: (M, W), V <= W columns used; params: (M, kSampleParamWords) i32 holding SampleParams; tokens
// (M) i32, logprobs (M) f32; top_ids (M, top_n) i32 and top_logprobs (M, top_n) f32, absent when top_n
// == 0; scratch: (M, V) i32 on the CPU (candidate orders), absent on the GPU. All on one device; the
// GPU does not check params (the caller validated them with sample_params_problem).
void sample_tokens(Tensor tokens, Tensor logprobs, Tensor top_ids, Tensor top_logprobs, Tensor logits, Tensor params,
                   int64_t V, Tensor scratch);

namespace cuda {  // launcher (sampling.cu); shapes as above, validated by the op entry
void sample_tokens(int32_t* tokens, float* logprobs, int32_t* top_ids, float* top_logprobs, int64_t top_n,
                   const bf16* logits, int64_t M, int64_t W, int64_t V, const SampleParams* params);
void sample_tokens(int32_t* tokens, float* logprobs, int32_t* top_ids, float* top_logprobs, int64_t top_n,
                   const float* logits, int64_t M, int64_t W, int64_t V, const SampleParams* params);
}  // namespace cuda

}  // namespace lmf
