// kv_cache.h: serving's state on the device (docs/SERVING.md): every layer's keys and values in one
// pool of fixed-size blocks, planned once at start, and the rows a serving step computes.
//
// KvCache owns the pool (f32 on the CPU, bf16 on the GPU); which blocks belong to which sequence is
// the scheduler's business (serve/block_pool.h, serve/scheduler.h). The block step writes and reads
// it through AttentionImpl::paged (ops/paged_attention.h).
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/arena.h"
#include "model/config.h"

namespace lmf {

class KvCache {
 public:
  // num_blocks blocks of block_size positions, for every layer; f32 on the CPU, bf16 on the GPU.
  KvCache(const ModelConfig& c, int64_t num_blocks, int64_t block_size, Device device);
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  int64_t num_blocks() const { return blocks_; }
  int64_t block_size() const { return block_size_; }
  Tensor k(int layer) const;  // (num_blocks, block_size, NKV HS)
  Tensor v(int layer) const;
  size_t bytes() const { return arena_.bytes(); }
  // Bytes one block takes over all layers (keys and values).
  static size_t block_bytes(const ModelConfig& c, int64_t block_size, Device device);

 private:
  int64_t blocks_, block_size_, kv_dim_;
  Arena arena_;
  Tensor k_, v_;  // (L, num_blocks, block_size, NKV HS)
};

// The rows of one serving step (B = 1, T = N rows; i32 on the plan's device): prompt chunks and decode
// positions of many sequences, padded to the plan's N (padding rows: slot and seq -1, position 0).
struct PagedBatch {
  Tensor tokens;        // (1, N) token of each row
  Tensor positions;     // (N) its position in its sequence
  Tensor slots;         // (N) cache slot its key and value go to (block * block_size + offset), -1: padding
  Tensor seqs;          // (N) its sequence's row in block_tables, -1: padding
  Tensor block_tables;  // (S, max_blocks) each sequence's blocks, in position order
  Tensor sample_rows;   // (M) the rows whose next-token logits the step returns
};

}  // namespace lmf
