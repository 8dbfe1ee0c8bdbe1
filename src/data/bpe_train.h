// bpe_train.h: `lmforge tokenizer train`: learns a byte-level BPE on a text corpus and writes it as a
// Hugging Face tokenizer.json (which `tokenizers`, transformers and lmforge's BpeTokenizer read).
//
// The corpus is cut into pieces by the style's pre-tokenizer (the same code that encodes), pieces are
// counted, and merges are learned greedily: each round merges the most frequent adjacent pair (ties:
// the pair whose tokens' ids are smaller), until the vocabulary holds vocab_size tokens
// (special tokens + 256 bytes + merges) or no pair occurs twice. Deterministic: the same corpus and
// options give the same file, byte for byte, on any thread count.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace lmf {

struct BpeTrainOptions {
  int64_t vocab_size = 8192;
  std::string style = "gpt2";                // gpt2 (ByteLevel's regex) | llama3 (Llama-3's Split regex, ignore_merges)
  std::vector<std::string> special_tokens;   // ids 0.. in this order; default per style
  int64_t min_frequency = 2;                 // a pair must occur this often to be merged
};

// Returns the tokenizer.json text. `progress(merges_done, merges_wanted)` is called now and then.
std::string train_bpe(const std::string& corpus, const BpeTrainOptions& o,
                      const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace lmf
