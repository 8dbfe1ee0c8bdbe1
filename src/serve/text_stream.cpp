// text_stream.cpp: see text_stream.h.
#include "serve/text_stream.h"

#include <algorithm>

namespace lmf {

size_t utf8_complete(const std::string& s) {
  size_t n = s.size(), i = n;
  for (int back = 0; back < 4 && i > 0; ++back) {
    const unsigned char c = static_cast<unsigned char>(s[i - 1]);
    if ((c & 0xC0) != 0x80) {  // a lead byte (or ASCII) at i - 1: is its sequence complete?
      const size_t need = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
      return n - (i - 1) >= need ? n : i - 1;
    }
    --i;
  }
  return n;
}

std::string token_text(const Tokenizer& tok, int32_t token) {
  return token >= 0 && token < tok.vocab_size() && !tok.is_special(token) ? tok.decode(token) : std::string();
}

TextStream::TextStream(const Tokenizer& tok, std::vector<std::string> stops) : tok_(tok), stops_(std::move(stops)) {
  for (const std::string& s : stops_) hold_ = std::max(hold_, s.size() - 1);
}

std::string TextStream::push(int32_t token) {
  text_ += token_text(token);
  size_t end = text_.size();
  for (const std::string& s : stops_) {
    const size_t from = emitted_ > s.size() ? emitted_ - s.size() : 0;
    const size_t at = text_.find(s, from);
    if (at != std::string::npos && at < end) {
      end = at;
      stopped_ = true;
    }
  }
  if (stopped_) {
    text_.resize(end);
    return take(end);
  }
  return take(utf8_complete(text_.substr(0, end >= hold_ ? end - hold_ : 0)));
}

std::string TextStream::take(size_t upto) {
  if (upto <= emitted_) return "";
  std::string out = text_.substr(emitted_, upto - emitted_);
  emitted_ = upto;
  return out;
}

}  // namespace lmf
