// tokenizer.h: the tokenizer interface `lmforge prepare` and `lmforge generate` use.
// The byte-level tokenizer (vocab 256, token = byte value) is the one implemented now; BPE plugs in
// behind the same interface.
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
  virtual int64_t vocab_size() const = 0;
  virtual std::vector<uint16_t> encode(std::string_view text) const = 0;
  // Bytes of one token (may be a partial UTF-8 sequence; concatenation is always correct).
  virtual std::string decode(uint16_t token) const = 0;
};

class ByteTokenizer final : public Tokenizer {
 public:
  const char* name() const override { return "byte"; }
  int64_t vocab_size() const override { return 256; }
  std::vector<uint16_t> encode(std::string_view text) const override;
  std::string decode(uint16_t token) const override;
};

// "byte" (more later); throws naming the unknown tokenizer.
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& name);

}  // namespace lmf
