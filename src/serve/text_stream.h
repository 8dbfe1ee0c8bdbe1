// text_stream.h: generated tokens -> text, cut at the first stop string (serve/server.h's responses and
// serve/offline.h's batch generation). Text that could still become a stop string, or ends inside a
// UTF-8 character, is held back until it can't.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace lmf {

// Length of the longest prefix of s that does not end inside a UTF-8 sequence.
size_t utf8_complete(const std::string& s);

// A token's text ("" for ids the tokenizer does not have and for special tokens: markup).
std::string token_text(const Tokenizer& tok, int32_t token);

// The generated text of one request.
class TextStream {
 public:
  TextStream(const Tokenizer& tok, std::vector<std::string> stops);
  // Appends a token; returns the text that became final (possibly empty).
  std::string push(int32_t token);
  std::string finish() { return take(text_.size()); }  // the end of generation: everything held back
  bool stopped() const { return stopped_; }
  std::string token_text(int32_t token) const { return lmf::token_text(tok_, token); }
  const std::string& text() const { return text_; }

 private:
  std::string take(size_t upto);
  const Tokenizer& tok_;
  std::vector<std::string> stops_;
  std::string text_;
  size_t emitted_ = 0, hold_ = 0;
  bool stopped_ = false;
};

}  // namespace lmf
