// shard.h: token shards in llm.c's .bin format, so shards prepared for llm.c or modded-nanogpt
// load as they are:
//   header: 256 x int32 little-endian; [0] = 20240520 (magic), [1] = version, [2] = token count
//   body:   token count x uint16 (version 1, llm.c's) or x uint32 (version 2, lmforge's for
//           vocabularies above 65,536: a reader that knows only version 1 refuses it)
// Reading validates magic, version and the exact file size and names the file in every error.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace lmf {

constexpr int32_t kShardMagic = 20240520;
constexpr int32_t kShardVersion = 1;      // uint16 tokens
constexpr int32_t kShardVersionWide = 2;  // uint32 tokens
constexpr size_t kShardHeaderBytes = 256 * sizeof(int32_t);

// Validates a shard's bytes (magic, version, a token count in [0, 2^31) and the exact size it implies)
// and returns the token count; errors name `name` (the path) and the field.
int64_t shard_token_count(const void* data, size_t bytes, const std::string& name);
// Bytes per token of a shard whose header shard_token_count() accepted: 2 (version 1) or 4 (version 2).
int shard_token_width(const void* data);

// Tokens of either width, read as uint32.
struct TokenSpan {
  const void* data = nullptr;
  int width = 2;  // bytes per token
  int64_t n = 0;
  uint32_t operator[](int64_t i) const {
    return width == 2 ? static_cast<const uint16_t*>(data)[i] : static_cast<const uint32_t*>(data)[i];
  }
};

// A read-only, memory-mapped, validated shard. The path must be a regular file (a FIFO, a directory
// or a device is refused in one line, without waiting on it).
class Shard {
 public:
  explicit Shard(const std::string& path);
  ~Shard();
  Shard(Shard&& o) noexcept;
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;
  Shard& operator=(Shard&&) = delete;

  TokenSpan tokens() const { return {tokens_, width_, n_}; }
  int64_t size() const { return n_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const void* tokens_ = nullptr;
  int width_ = 2;
  int64_t n_ = 0;
};

// Writes a shard atomically (temporary file, fsync, rename): version 1 when every id is below 65,536
// (llm.c reads it), else version 2. Ids must be non-negative.
void write_shard(const std::string& path, const std::vector<int32_t>& tokens);
void write_shard(const std::string& path, const std::vector<uint16_t>& tokens);  // version 1

}  // namespace lmf
