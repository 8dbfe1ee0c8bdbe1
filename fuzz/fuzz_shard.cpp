// Fuzz target: a data shard's bytes (shard_token_count: llm.c's header and the size it implies), then
// the loader over the accepted tokens. The reserved header words 3..6 choose the loader's B, T, vocab
// size and a resume position (any uint64, as a checkpoint's data_position), so batches are drawn
// from anywhere: every window must lie inside the shard (ASan) and every token below the vocab.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "data/loader.h"
#include "data/shard.h"
#include "fuzz_util.h"

using namespace lmf;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::fuzz_run([&] {
    const int64_t n = shard_token_count(data, size, "fuzz.bin");
    const int width = shard_token_width(data);
    fuzz::fuzz_check(n >= 0 && kShardHeaderBytes + static_cast<size_t>(width * n) == size, "token count matches the size");
    uint32_t words[4];
    std::memcpy(words, data + 12, sizeof(words));
    const int64_t B = 1 + words[0] % 4, T = 1 + words[1] % 64, V = 1 + words[2] % (1 << 21);
    const TokenSpan span{data + kShardHeaderBytes, width, n};
    std::vector<int32_t> tokens(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) tokens[static_cast<size_t>(i)] = static_cast<int32_t>(span[i] & 0x7FFFFFFF);
    DataLoader loader(std::move(tokens), "fuzz.bin", B, T, words[3], V);
    loader.set_position((static_cast<uint64_t>(words[3]) << 32) | words[0]);
    std::vector<int32_t> in(static_cast<size_t>(B * T)), tg(static_cast<size_t>(B * T));
    for (int k = 0; k < 3; ++k) {
      loader.next(in.data(), tg.data());
      for (size_t i = 0; i < in.size(); ++i)
        fuzz::fuzz_check(in[i] >= 0 && in[i] < V && tg[i] >= 0 && tg[i] < V, "batch tokens inside the vocabulary");
    }
  });
  return 0;
}
