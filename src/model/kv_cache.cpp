#include "model/kv_cache.h"

#include <cstring>

#include "core/check.h"

namespace lmf {

KvCache::KvCache(const ModelConfig& c, int64_t ctx)
    : ctx_(ctx), q_dim_(c.n_head * c.head_size()), kv_dim_(c.n_kv_head * c.head_size()) {
  if (ctx < 1 || ctx > c.context_length) fail("KV cache of ", ctx, " positions: must be in [1, context_length=", c.context_length, "]");
  arena_ = Arena("kv_cache", {{"k", {c.n_layer, ctx, kv_dim_}}, {"v", {c.n_layer, ctx, kv_dim_}}, {"scores", {c.n_head, ctx}}});
  k_ = arena_.get("k");
  v_ = arena_.get("v");
  scores_ = arena_.get("scores");
}

void KvCache::append(int layer, int64_t pos, Tensor qkv) {
  if (pos < 0 || pos >= ctx_) fail("decode position ", pos, " outside the KV cache of ", ctx_);
  LMF_CHECK(qkv.numel() == q_dim_ + 2 * kv_dim_, "KvCache::append: qkv ", qkv.describe(), " is not one row");
  const float* row = qkv.f32();
  std::memcpy(k(layer).f32() + pos * kv_dim_, row + q_dim_, sizeof(float) * kv_dim_);
  std::memcpy(v(layer).f32() + pos * kv_dim_, row + q_dim_ + kv_dim_, sizeof(float) * kv_dim_);
}

Tensor KvCache::k(int layer) const {
  return Tensor(k_.f32() + layer * ctx_ * kv_dim_, DType::f32, {ctx_, kv_dim_}, "k_cache");
}

Tensor KvCache::v(int layer) const {
  return Tensor(v_.f32() + layer * ctx_ * kv_dim_, DType::f32, {ctx_, kv_dim_}, "v_cache");
}

}  // namespace lmf
