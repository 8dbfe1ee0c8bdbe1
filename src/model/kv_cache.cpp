#include "model/kv_cache.h"

#include <algorithm>

#include "core/check.h"

namespace lmf {

namespace {
DType cache_dtype(Device d) { return d == Device::cpu ? DType::f32 : DType::bf16; }
}  // namespace

KvCache::KvCache(const ModelConfig& c, int64_t num_blocks, int64_t block_size, Device device)
    : blocks_(num_blocks), block_size_(block_size), kv_dim_(c.n_kv_head * c.head_size()) {
  if (num_blocks < 1) fail("KV cache of ", num_blocks, " blocks: needs at least one");
  if (block_size < 1) fail("--block-size=", block_size, ": must be >= 1");
  const DType dt = cache_dtype(device);
  const int64_t L = std::max(c.n_layer, 1);
  arena_ = Arena("kv_cache", {{"k", {L, num_blocks, block_size, kv_dim_}, dt}, {"v", {L, num_blocks, block_size, kv_dim_}, dt}},
                 device);
  k_ = arena_.get("k");
  v_ = arena_.get("v");
}

Tensor KvCache::k(int layer) const {
  Tensor t = k_.rows(layer, layer + 1).view({blocks_, block_size_, kv_dim_});
  t.name = "k_cache";
  return t;
}

Tensor KvCache::v(int layer) const {
  Tensor t = v_.rows(layer, layer + 1).view({blocks_, block_size_, kv_dim_});
  t.name = "v_cache";
  return t;
}

size_t KvCache::block_bytes(const ModelConfig& c, int64_t block_size, Device device) {
  return static_cast<size_t>(2 * std::max(c.n_layer, 1) * block_size * c.n_kv_head * c.head_size()) *
         dtype_size(cache_dtype(device));
}

}  // namespace lmf
