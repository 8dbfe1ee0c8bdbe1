#include "data/shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
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
  tokens_ = static_cast<const char*>(m) + kShardHeaderBytes;
  width_ = shard_token_width(m);
}

int64_t shard_token_count(const void* data, size_t bytes, const std::string& name) {
  if (bytes < kShardHeaderBytes)
    fail(name, ": data shard is truncated: ", bytes, " bytes, smaller than the ", kShardHeaderBytes, "-byte header");
  int32_t header[3];
  std::memcpy(header, data, sizeof(header));
  if (header[0] != kShardMagic)
    fail(name, ": not an llm.c token shard: magic ", header[0], ", expected ", kShardMagic);
  if (header[1] != kShardVersion && header[1] != kShardVersionWide)
    fail(name, ": unsupported shard version ", header[1], ", expected ", kShardVersion, " (uint16 tokens) or ",
         kShardVersionWide, " (uint32 tokens)");
  if (header[2] < 0) fail(name, ": negative token count ", header[2], " in header");
  const size_t width = header[1] == kShardVersion ? 2 : 4;
  const size_t expect = kShardHeaderBytes + width * static_cast<size_t>(header[2]);  // < 2^34: no overflow
  if (bytes != expect)
    fail(name, ": ", bytes < expect ? "data shard is truncated: " : "data shard has trailing bytes: ", "header says ",
         header[2], " tokens (", expect, " bytes), file has ", bytes, " bytes");
  return header[2];
}

int shard_token_width(const void* data) {
  int32_t version;
  std::memcpy(&version, static_cast<const char*>(data) + 4, 4);
  return version == kShardVersionWide ? 4 : 2;
}

Shard::~Shard() {
  if (map_) ::munmap(map_, map_bytes_);
}

Shard::Shard(Shard&& o) noexcept
    : path_(std::move(o.path_)), map_(o.map_), map_bytes_(o.map_bytes_), tokens_(o.tokens_), width_(o.width_), n_(o.n_) {
  o.map_ = nullptr;
  o.tokens_ = nullptr;
  o.n_ = 0;
}

namespace {
template <class T>
void write_shard_as(const std::string& path, const std::vector<T>& tokens, int32_t version) {
  if (tokens.size() > static_cast<size_t>(INT32_MAX)) fail(path, ": ", tokens.size(), " tokens do not fit one shard");
  std::string data(kShardHeaderBytes + sizeof(T) * tokens.size(), '\0');
  int32_t header[256] = {};
  header[0] = kShardMagic;
  header[1] = version;
  header[2] = static_cast<int32_t>(tokens.size());
  std::memcpy(data.data(), header, sizeof(header));
  if (!tokens.empty()) std::memcpy(data.data() + kShardHeaderBytes, tokens.data(), sizeof(T) * tokens.size());
  write_file_atomic(path, data);
}
}  // namespace

void write_shard(const std::string& path, const std::vector<uint16_t>& tokens) {
  write_shard_as(path, tokens, kShardVersion);
}

void write_shard(const std::string& path, const std::vector<int32_t>& tokens) {
  int32_t max = 0;
  for (int32_t t : tokens) {
    if (t < 0) fail(path, ": token id ", t, " is negative");
    max = std::max(max, t);
  }
  if (max < 65536) {
    write_shard_as(path, std::vector<uint16_t>(tokens.begin(), tokens.end()), kShardVersion);
  } else {
    write_shard_as(path, std::vector<uint32_t>(tokens.begin(), tokens.end()), kShardVersionWide);
  }
}

}  // namespace lmf
