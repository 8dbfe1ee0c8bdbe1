// tokenizer.h: the tokenizer interface `lmforge prepare`, `generate` and `serve` use. Token ids are
// 32-bit (vocabularies of Llama-3 and Qwen2 are above 65,536).
//   "byte"  ByteTokenizer: vocab 256, token = byte value
//   a path  a Hugging Face tokenizer.json holding a byte-level BPE (data/bpe.h)
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace lmf {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual const char* name() const = 0;
  virtual int64_t vocab_size() const = 0;  // one more than the largest id
  // Text -> ids, without the special tokens a template would add (special_prefix()). Text that is
  // not valid UTF-8 is read as Python's bytes.decode("utf-8", "replace") reads it.
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // Bytes of one token (may be a partial UTF-8 sequence; concatenation is always correct). An id
  // outside [0, vocab_size()) is an error.
  virtual std::string decode(int32_t token) const = 0;
  // The ids an encoding of a whole text starts with (a BOS token), empty when none.
  virtual std::vector<int32_t> special_prefix() const { return {}; }
  // The id of the token whose text is `content` (an added/special token or a vocabulary entry), -1
  // when there is none.
  virtual int32_t token_id(std::string_view content) const { return -1; }
  // encode() of a large text on `threads` threads, the same ids.
  virtual std::vector<int32_t> encode_parallel(std::string_view text, int threads) const { return encode(text); }
  // Special tokens that end a text or a turn (<|endoftext|>, <|im_end|>, <|eot_id|>, </s>, ...):
  // generation stops after one.
  virtual std::vector<int32_t> end_tokens() const { return {}; }
  // Whether `token` is a special token (its text is markup: not shown in generated text).
  virtual bool is_special(int32_t token) const { return false; }
  // The texts a chat template knows as bos_token and eos_token: the special prefix's first token and
  // the first end token ("" when there is none).
  std::string bos_token_text() const;
  std::string eos_token_text() const;
  // Text of a sequence of ids.
  std::string decode(const std::vector<int32_t>& tokens) const;
};

class ByteTokenizer final : public Tokenizer {
 public:
  const char* name() const override { return "byte"; }
  int64_t vocab_size() const override { return 256; }
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(int32_t token) const override;
  using Tokenizer::decode;  // and of a sequence
};

// "byte", or the path of a tokenizer.json; throws naming the unknown tokenizer or the file's problem.
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& name_or_path);
// The tokenizer for a model: "auto" is the model's own (`tokenizer_json`: the text of the tokenizer.json
// that came with it, from a checkpoint, a Hugging Face directory or a GGUF file; `where` names it in
// errors) when it has one, else byte; anything else is make_tokenizer(name_or_path).
std::unique_ptr<Tokenizer> make_model_tokenizer(const std::string& name_or_path, const std::string& tokenizer_json,
                                                const std::string& where);

}  // namespace lmf
