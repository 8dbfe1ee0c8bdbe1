// decoder.h: generation with a KV cache (batch 1, CPU, fp32). The Decoder owns its KvCache and a
// model planned for one row per step (ModelPlan::decode), which runs the same block step as training
// with the KV-cache attention; the weights stay with their owner (Parameters).
#pragma once
#include <cstdint>

#include "model/kv_cache.h"
#include "model/model.h"

namespace lmf {

class Decoder {
 public:
  // params: the GPT's (gpt_param_specs), fp32 on the CPU; ctx: positions the cache holds (<= context_length).
  Decoder(const ModelConfig& c, Parameters& params, int64_t ctx);
  // Feeds `token` at position `pos` (0-based, < ctx; in order 0, 1, 2, ...) and returns the logits
  // (vocab_size) of the next token; valid until the next call.
  const float* step(int32_t token, int64_t pos);
  int64_t ctx() const { return cache_.ctx(); }

 private:
  Model model_;
  KvCache cache_;
  Arena io_;  // token (1, 1) i32, logits (1, 1, V) f32
  Tensor token_, logits_;
};

}  // namespace lmf
