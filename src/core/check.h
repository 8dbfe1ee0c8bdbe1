// check.h: errors that are loud and specific (DESIGN.md section 4).
//
// LMF_CHECK(cond, values...) stays on in release builds. On failure it throws lmf::Error with
// "file:line: check `cond` failed: " followed by the streamed values, so the message names the
// offending shapes/sizes. User-facing input errors (config, data, checkpoint, flags) use
// LMF_FAIL / lmf::fail with a message that names the file or flag and the problem; the CLI prints
// the message on one line and exits non-zero.
//
// checked_add / checked_mul: size arithmetic on values a user can reach (config sizes, tensor shapes,
// file offsets) never overflows silently: on overflow they throw naming the thing being sized.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace lmf {

namespace detail {
// msg with every control character escaped (\n, \r, \xNN): a name or value taken from user input
// (a JSON key, a tensor name) cannot break an error message into several lines.
std::string one_line(const std::string& msg);
}  // namespace detail

// Every error lmforge raises. The message is one line (control characters are escaped). The kind says
// whose fault it is, for callers that map errors to their own (the Python package: ValueError,
// FileNotFoundError, RuntimeError): bad input (a flag, a config, a file's contents; fail()), a path
// that does not exist (fail_not_found()), or a broken invariant or a failed device/system call
// (LMF_CHECK, CUDA errors).
struct Error : std::runtime_error {
  enum class Kind { input, not_found, internal };
  explicit Error(const std::string& msg, Kind k = Kind::input) : std::runtime_error(detail::one_line(msg)), kind(k) {}
  Kind kind;
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

// The same for a file or directory that does not exist (the message names it).
template <class... Args>
[[noreturn]] void fail_not_found(const Args&... args) {
  throw Error(detail::concat(args...), Error::Kind::not_found);
}

// a + b and a * b for integer sizes; on overflow throws lmf::Error "<what...>: a * b overflows".
template <class T, class... What>
T checked_add(T a, T b, const What&... what) {
  T r;
  if (__builtin_add_overflow(a, b, &r)) fail(what..., ": ", a, " + ", b, " overflows ", 8 * sizeof(T), "-bit sizes");
  return r;
}
template <class T, class... What>
T checked_mul(T a, T b, const What&... what) {
  T r;
  if (__builtin_mul_overflow(a, b, &r)) fail(what..., ": ", a, " * ", b, " overflows ", 8 * sizeof(T), "-bit sizes");
  return r;
}

}  // namespace lmf

#define LMF_CHECK(cond, ...)                                                                   \
  do {                                                                                         \
    if (!(cond)) [[unlikely]]                                                                  \
      ::lmf::detail::throw_check_failure(__FILE__, __LINE__, #cond,                            \
                                         ::lmf::detail::concat("" __VA_OPT__(, ) __VA_ARGS__)); \
  } while (0)
