// bpe.h: byte-level BPE, read from a Hugging Face tokenizer.json (GPT-2, Llama-3, Qwen2, SmolLM2 and
// the tokenizers `lmforge tokenizer train` writes), with the ids Hugging Face `tokenizers` gives.
//
// Encoding a text (docs/TOKENIZER.md):
//   1. invalid UTF-8 -> U+FFFD per maximal invalid subpart (as Python's decode(errors="replace"));
//   2. added tokens are split out first (leftmost-longest, with their lstrip/rstrip/single_word);
//   3. the normalizer (none or NFC, utf8proc) runs on the text between them;
//   4. the pre-tokenizer steps (Split with a regex or a string, ByteLevel with its GPT-2 regex and
//      add_prefix_space, Digits; PCRE2 with Unicode properties) cut it into pieces;
//   5. each piece's bytes are merged by rank (ties: leftmost first); with ignore_merges a piece that is
//      a vocabulary entry is taken whole. Pieces are cached per thread.
// Anything else a tokenizer.json may hold (a WordPiece or Unigram model, a Metaspace pre-tokenizer,
// other normalizers, BPE dropout, ...) is refused naming the field, never ignored. A byte without its
// byte-level token becomes its <0xNN> token (byte_fallback), the unknown token, or nothing, as there.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "data/tokenizer.h"

namespace lmf {

class BpeTokenizer final : public Tokenizer {
 public:
  // `where` names the source in errors (the file's path).
  static std::unique_ptr<BpeTokenizer> from_json(std::string_view json_text, const std::string& where);
  static std::unique_ptr<BpeTokenizer> from_file(const std::string& path);
  ~BpeTokenizer() override;

  const char* name() const override { return "bpe"; }
  int64_t vocab_size() const override { return static_cast<int64_t>(token_bytes_.size()); }
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(int32_t token) const override;
  using Tokenizer::decode;  // and of a sequence
  std::vector<int32_t> special_prefix() const override { return prefix_; }
  // Added special tokens whose text marks an end: it holds "end" or "eot" (<|endoftext|>, <|im_end|>,
  // <|end_of_text|>, <|eot_id|>, <end_of_turn>) or is </s>.
  std::vector<int32_t> end_tokens() const override;
  int32_t token_id(std::string_view content) const override;

  // encode() of a large text on `threads` threads: the text is cut where no pre-tokenizer piece can
  // cross (after a newline between two non-space characters), so the ids are encode()'s. Tokenizers
  // with other Split patterns than the known ones, a prefix space, or an added token holding a
  // newline encode on one thread.
  std::vector<int32_t> encode_parallel(std::string_view text, int threads) const override;
  // Whether `token` is an added token marked special (skipped when decoding for display).
  bool is_special(int32_t token) const override;
  // Steps 1-4 of encoding (bpe.h) without the merges: calls piece(bytes) for each pre-tokenizer piece
  // of the text between added tokens (the BPE trainer counts these).
  void pre_tokenize(std::string_view text, const std::function<void(std::string_view)>& piece) const;

  struct Impl;

 private:
  BpeTokenizer();
  std::unique_ptr<Impl> impl_;
  std::vector<std::string> token_bytes_;  // id -> bytes (vocabulary and added tokens)
  std::vector<int32_t> prefix_;
};

// Python's bytes.decode("utf-8", errors="replace"): each maximal invalid subpart -> U+FFFD.
std::string utf8_replace_invalid(std::string_view bytes);

// GPT-2's byte <-> printable character map (bytes_to_unicode): the text form of byte-level tokens.
const std::string& byte_level_char(unsigned char b);  // UTF-8 of the character standing for byte b

}  // namespace lmf
