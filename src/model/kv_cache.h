// kv_cache.h: the decoder's state (DESIGN.md section 2): every layer's keys and values of the
// positions fed so far, for one sequence, planned once for `ctx` positions. Owned by a Decoder
// (model/decoder.h), never by the model; the block step reads and appends through it
// (AttentionImpl::kv_cache). CPU, fp32.
#pragma once
#include <cstdint>

#include "core/arena.h"
#include "model/config.h"

namespace lmf {

class KvCache {
 public:
  KvCache(const ModelConfig& c, int64_t ctx);

  int64_t ctx() const { return ctx_; }
  // Copies the k and v heads of `qkv` (one row: (1, 1, QKV)) into layer `layer` at position `pos`.
  void append(int layer, int64_t pos, Tensor qkv);
  Tensor k(int layer) const;  // (ctx, NKV HS)
  Tensor v(int layer) const;
  Tensor scores() const { return scores_; }  // (NH, ctx): attention scratch
  size_t bytes() const { return arena_.bytes(); }

 private:
  int64_t ctx_, q_dim_, kv_dim_;
  Arena arena_;
  Tensor k_, v_, scores_;  // k_, v_: (L, ctx, NKV HS)
};

}  // namespace lmf
