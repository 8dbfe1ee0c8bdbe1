// check.h: errors that are loud and specific (DESIGN.md section 4).
//
// LMF_CHECK(cond, values...) stays on in release builds. On failure it throws lmf::Error with
// "file:line: check `cond` failed: " followed by the streamed values, so the message names the
// offending shapes/sizes. User-facing input errors (config, data, checkpoint, flags) use
// LMF_FAIL / lmf::fail with a message that names the file or flag and the problem; the CLI prints
// the message on one line and exits non-zero.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace lmf {

// Every error lmforge raises. The message is one line.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
[[noreturn]] void throw_check_failure(const char* file, int line, const char* cond, const std::string& msg);
}  // namespace detail

// Throws lmf::Error whose message is the streamed arguments.
template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(detail::concat(args...));
}

}  // namespace lmf

#define LMF_CHECK(cond, ...)                                                                   \
  do {                                                                                         \
    if (!(cond)) [[unlikely]]                                                                  \
      ::lmf::detail::throw_check_failure(__FILE__, __LINE__, #cond,                            \
                                         ::lmf::detail::concat("" __VA_OPT__(, ) __VA_ARGS__)); \
  } while (0)
