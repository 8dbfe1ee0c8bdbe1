#include "data/tokenizer.h"

#include <filesystem>

#include "core/check.h"
#include "data/bpe.h"

namespace lmf {

std::string Tokenizer::decode(const std::vector<int32_t>& tokens) const {
  std::string out;
  for (int32_t t : tokens) out += decode(t);
  return out;
}

std::string Tokenizer::bos_token_text() const {
  const std::vector<int32_t> p = special_prefix();
  return p.empty() ? std::string() : decode(p[0]);
}

std::string Tokenizer::eos_token_text() const {
  const std::vector<int32_t> e = end_tokens();
  return e.empty() ? std::string() : decode(e[0]);
}

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> out(text.size());
  for (size_t i = 0; i < text.size(); ++i) out[i] = static_cast<unsigned char>(text[i]);
  return out;
}

std::string ByteTokenizer::decode(int32_t token) const {
  if (token < 0 || token >= 256) fail("byte tokenizer cannot decode token ", token, " (ids are 0..255)");
  return std::string(1, static_cast<char>(token));
}

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& name_or_path) {
  if (name_or_path == "byte") return std::make_unique<ByteTokenizer>();
  if (name_or_path.find('/') != std::string::npos || name_or_path.ends_with(".json") ||
      std::filesystem::exists(name_or_path))
    return BpeTokenizer::from_file(name_or_path);
  fail("--tokenizer: unknown tokenizer '", name_or_path, "' (known: auto, byte, or the path of a tokenizer.json)");
}

std::unique_ptr<Tokenizer> make_model_tokenizer(const std::string& name_or_path, const std::string& tokenizer_json,
                                                const std::string& where) {
  if (name_or_path != "auto") return make_tokenizer(name_or_path);
  if (!tokenizer_json.empty()) return BpeTokenizer::from_json(tokenizer_json, where);
  return std::make_unique<ByteTokenizer>();
}

}  // namespace lmf
