// shard.h: token shards in llm.c's .bin format, so shards prepared for llm.c or modded-nanogpt
// load as they are:
//   header: 256 x int32 little-endian; [0] = 20240520 (magic), [1] = 1 (version), [2] = token count
//   body:   token count x uint16
// Reading validates magic, version and the exact file size and names the file in every error.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace lmf {

constexpr int32_t kShardMagic = 20240520;
constexpr int32_t kShardVersion = 1;
constexpr size_t kShardHeaderBytes = 256 * sizeof(int32_t);

// Validates a shard's bytes (magic, version, a token count in [0, 2^31) and the exact size it implies)
// and returns the token count; errors name `name` (the path) and the field.
int64_t shard_token_count(const void* data, size_t bytes, const std::string& name);

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

  const uint16_t* tokens() const { return tokens_; }
  int64_t size() const { return n_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const uint16_t* tokens_ = nullptr;
  int64_t n_ = 0;
};

// Writes a shard atomically (temporary file, fsync, rename).
void write_shard(const std::string& path, const std::vector<uint16_t>& tokens);

}  // namespace lmf
