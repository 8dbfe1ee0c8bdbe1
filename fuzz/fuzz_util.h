// fuzz_util.h: what every fuzz target checks besides the sanitizers (ASan, UBSan: any finding aborts).
//
// fuzz_run(fn): runs one input through a parser. Refusing the input is fine, but only as lmf::Error
// (or, for the request parser, HttpError) with a one-line message: any other exception escaping a
// parser (a raw nlohmann type_error, std::out_of_range, std::bad_alloc ...) is a finding, as is a
// message with a newline. fuzz_check(cond, what) aborts when an invariant of an accepted input fails.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/check.h"

namespace lmf::fuzz {

[[noreturn]] inline void fuzz_abort(const char* what, const char* detail) {
  std::fprintf(stderr, "fuzz finding: %s: %s\n", what, detail);
  std::abort();
}

inline void fuzz_check(bool cond, const char* what) {
  if (!cond) fuzz_abort("invariant failed", what);
}

template <class F>
void fuzz_run(F&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    if (std::strchr(e.what(), '\n')) fuzz_abort("multi-line error message", e.what());
  }
}

}  // namespace lmf::fuzz
