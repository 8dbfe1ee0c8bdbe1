#include "model/decoder.h"

#include "model/token_ends.h"

namespace lmf {

namespace {
ModelPlan decode_plan() {
  ModelPlan p;
  p.B = p.T = 1;
  p.training = false;
  p.decode = true;
  return p;
}
}  // namespace

Decoder::Decoder(const ModelConfig& c, Parameters& params, int64_t ctx)
    : model_(c, decode_plan(), params, nullptr, std::make_unique<TokenEnds>(c)),
      cache_(c, ctx),
      io_("decode io", {{"token", {1, 1}, DType::i32}, {"logits", {1, 1, c.vocab_size}}}) {
  token_ = io_.get("token");
  logits_ = io_.get("logits");
}

const float* Decoder::step(int32_t token, int64_t pos) {
  if (pos < 0 || pos >= cache_.ctx()) fail("decode position ", pos, " outside the KV cache of ", cache_.ctx());
  token_.i32()[0] = token;
  model_.forward_decode(logits_, token_, pos, cache_);
  return logits_.f32();
}

}  // namespace lmf
