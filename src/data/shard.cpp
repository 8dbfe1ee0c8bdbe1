#include "data/shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/check.h"
#include "core/fsutil.h"

namespace lmf {

Shard::Shard(const std::string& path) : path_(path) {
  size_t bytes = 0;
  const int fd = open_regular_file(path, "data shard", &bytes);  // a FIFO or directory: one line, no wait
  if (bytes < kShardHeaderBytes) {
    ::close(fd);
    fail(path, ": data shard is truncated: ", bytes, " bytes, smaller than the ", kShardHeaderBytes, "-byte header");
  }
  void* m = ::mmap(nullptr, bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) fail(path, ": cannot map data shard (", std::strerror(errno), ")");
  map_ = m;
  map_bytes_ = bytes;
  try {
    n_ = shard_token_count(m, bytes, path);
  } catch (...) {
    ::munmap(map_, map_bytes_);
    map_ = nullptr;
    throw;
  }
  tokens_ = reinterpret_cast<const uint16_t*>(static_cast<const char*>(m) + kShardHeaderBytes);
}

int64_t shard_token_count(const void* data, size_t bytes, const std::string& name) {
  if (bytes < kShardHeaderBytes)
    fail(name, ": data shard is truncated: ", bytes, " bytes, smaller than the ", kShardHeaderBytes, "-byte header");
  int32_t header[3];
  std::memcpy(header, data, sizeof(header));
  if (header[0] != kShardMagic)
    fail(name, ": not an llm.c token shard: magic ", header[0], ", expected ", kShardMagic);
  if (header[1] != kShardVersion) fail(name, ": unsupported shard version ", header[1], ", expected ", kShardVersion);
  if (header[2] < 0) fail(name, ": negative token count ", header[2], " in header");
  const size_t expect = kShardHeaderBytes + 2 * static_cast<size_t>(header[2]);  // < 2^33: no overflow
  if (bytes != expect)
    fail(name, ": ", bytes < expect ? "data shard is truncated: " : "data shard has trailing bytes: ", "header says ",
         header[2], " tokens (", expect, " bytes), file has ", bytes, " bytes");
  return header[2];
}

Shard::~Shard() {
  if (map_) ::munmap(map_, map_bytes_);
}

Shard::Shard(Shard&& o) noexcept
    : path_(std::move(o.path_)), map_(o.map_), map_bytes_(o.map_bytes_), tokens_(o.tokens_), n_(o.n_) {
  o.map_ = nullptr;
  o.tokens_ = nullptr;
  o.n_ = 0;
}

void write_shard(const std::string& path, const std::vector<uint16_t>& tokens) {
  if (tokens.size() > static_cast<size_t>(INT32_MAX)) fail(path, ": ", tokens.size(), " tokens do not fit one shard");
  std::string data(kShardHeaderBytes + 2 * tokens.size(), '\0');
  int32_t header[256] = {};
  header[0] = kShardMagic;
  header[1] = kShardVersion;
  header[2] = static_cast<int32_t>(tokens.size());
  std::memcpy(data.data(), header, sizeof(header));
  std::memcpy(data.data() + kShardHeaderBytes, tokens.data(), 2 * tokens.size());
  write_file_atomic(path, data);
}

}  // namespace lmf
