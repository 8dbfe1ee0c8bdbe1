#include "serve/block_pool.h"

#include "core/check.h"

namespace lmf {

BlockPool::BlockPool(int32_t total, int32_t block_size) : total_(total), block_size_(block_size) {
  if (total < 1) fail("KV cache: ", total, " blocks; it needs at least 1 (raise --kv-cache-gb)");
  if (block_size < 1) fail("KV cache: block size ", block_size, " must be >= 1");
  free_.reserve(static_cast<size_t>(total));
  for (int32_t b = total - 1; b >= 0; --b) free_.push_back(b);  // block 0 on top
  used_.assign(static_cast<size_t>(total), 0);
}

int32_t BlockPool::blocks_for(int64_t positions) const {
  LMF_CHECK(positions >= 0, "BlockPool::blocks_for: positions=", positions);
  return static_cast<int32_t>((positions + block_size_ - 1) / block_size_);
}

void BlockPool::allocate(std::vector<int32_t>& table, int32_t n) {
  LMF_CHECK(n >= 0 && n <= free_blocks(), "BlockPool::allocate: ", n, " blocks asked, ", free_blocks(), " free of ",
            total_);
  for (int32_t i = 0; i < n; ++i) {
    const int32_t b = free_.back();
    free_.pop_back();
    used_[static_cast<size_t>(b)] = 1;
    table.push_back(b);
  }
}

void BlockPool::release(std::vector<int32_t>& table) {
  for (int32_t b : table)  // all checked first: a bad table changes nothing
    LMF_CHECK(b >= 0 && b < total_ && used_[static_cast<size_t>(b)], "BlockPool::release: block ", b,
              " is not in use (total ", total_, ")");
  for (int32_t b : table) {
    LMF_CHECK(used_[static_cast<size_t>(b)], "BlockPool::release: block ", b, " twice in one table");
    used_[static_cast<size_t>(b)] = 0;
    free_.push_back(b);
  }
  table.clear();
}

}  // namespace lmf
