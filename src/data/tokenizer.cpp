#include "data/tokenizer.h"

#include "core/check.h"

namespace lmf {

std::vector<uint16_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<uint16_t> out(text.size());
  for (size_t i = 0; i < text.size(); ++i) out[i] = static_cast<unsigned char>(text[i]);
  return out;
}

std::string ByteTokenizer::decode(uint16_t token) const {
  LMF_CHECK(token < 256, "byte tokenizer cannot decode token ", token);
  return std::string(1, static_cast<char>(token));
}

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& name) {
  if (name == "byte") return std::make_unique<ByteTokenizer>();
  fail("--tokenizer: unknown tokenizer '", name, "' (known: byte)");
}

}  // namespace lmf
