#include "core/check.h"

#include <cstring>

namespace lmf::detail {

std::string one_line(const std::string& msg) {
  size_t i = 0;
  while (i < msg.size() && static_cast<unsigned char>(msg[i]) >= 0x20 && msg[i] != 0x7f) ++i;
  if (i == msg.size()) return msg;  // the common case: nothing to escape
  std::string out = msg.substr(0, i);
  static const char hex[] = "0123456789abcdef";
  for (; i < msg.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(msg[i]);
    if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7f) out += std::string("\\x") + hex[c >> 4] + hex[c & 15];
    else out += static_cast<char>(c);
  }
  return out;
}

[[noreturn]] void throw_check_failure(const char* file, int line, const char* cond, const std::string& msg) {
  const char* base = std::strrchr(file, '/');
  std::string where = detail::concat(base ? base + 1 : file, ":", line);
  throw Error(detail::concat(where, ": check `", cond, "` failed", msg.empty() ? "" : ": ", msg), Error::Kind::internal);
}

}  // namespace lmf::detail
