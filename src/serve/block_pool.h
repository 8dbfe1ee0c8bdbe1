// block_pool.h: the accounting of a paged KV cache (the serving issue): `total` blocks of `block_size`
// positions each, planned once at start; a sequence holds a block table (the blocks that hold its
// positions 0, block_size, 2 block_size, ...). Pure bookkeeping: the tensors live elsewhere. A block
// is in at most one table; releasing a block twice, or one the pool never gave, is an error.
#pragma once
#include <cstdint>
#include <vector>

namespace lmf {

class BlockPool {
 public:
  BlockPool(int32_t total, int32_t block_size);

  int32_t total() const { return total_; }
  int32_t block_size() const { return block_size_; }
  int32_t free_blocks() const { return static_cast<int32_t>(free_.size()); }
  // Blocks a sequence of `positions` cached positions needs.
  int32_t blocks_for(int64_t positions) const;
  // Appends n free blocks to `table`; throws (and changes nothing) when fewer than n are free.
  void allocate(std::vector<int32_t>& table, int32_t n);
  // Returns every block of `table` to the pool and clears it.
  void release(std::vector<int32_t>& table);

 private:
  int32_t total_, block_size_;
  std::vector<int32_t> free_;   // a stack: the most recently freed block is reused first
  std::vector<uint8_t> used_;   // per block
};

}  // namespace lmf
