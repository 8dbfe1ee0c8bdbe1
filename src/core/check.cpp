#include "core/check.h"

#include <cstring>

namespace lmf::detail {

[[noreturn]] void throw_check_failure(const char* file, int line, const char* cond, const std::string& msg) {
  const char* base = std::strrchr(file, '/');
  std::string where = detail::concat(base ? base + 1 : file, ":", line);
  throw Error(detail::concat(where, ": check `", cond, "` failed", msg.empty() ? "" : ": ", msg));
}

}  // namespace lmf::detail
