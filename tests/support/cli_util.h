// cli_util.h: running the real lmforge binary from a test (header-only): its exit code and output,
// a snapshot of a directory's files, and the "exactly one stderr line naming X" check.
#pragma once
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/check.h"

#include "core/fsutil.h"
#include "support/test_util.h"

namespace lmf::test {

struct RunResult {
  int exit_code;
  std::string out, err;
};

// `lmforge ARGS` (ARGS may start with environment assignments: "LMF_FAULT=kill@3 train ...").
inline RunResult run_cli(const std::string& args, const std::string& dir, const std::string& env = "") {
  namespace fs = std::filesystem;
  std::string out = dir + "/stdout.txt", err = dir + "/stderr.txt";
  std::string cmd = env + (env.empty() ? "" : " ") + std::string(lmforge_binary()) + " " + args + " >" + out + " 2>" + err;
  int st = std::system(cmd.c_str());
  RunResult r{WIFEXITED(st) ? WEXITSTATUS(st) : -1, read_file(out), read_file(err)};
  fs::remove(out);
  fs::remove(err);
  return r;
}

// Every file under `dir` and its bytes.
inline std::map<std::string, std::string> snapshot(const std::string& dir) {
  namespace fs = std::filesystem;
  std::map<std::string, std::string> m;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) m[e.path().string()] = read_file(e.path().string());
  return m;
}

inline ::testing::AssertionResult one_line_error(const RunResult& r, std::initializer_list<const char*> must_contain) {
  if (r.exit_code == 0) return ::testing::AssertionFailure() << "exit code 0; stderr: " << r.err;
  size_t lines = std::count(r.err.begin(), r.err.end(), '\n');
  if (lines != 1 || r.err.back() != '\n')
    return ::testing::AssertionFailure() << "expected exactly one stderr line, got " << lines << ": " << r.err;
  for (const char* s : must_contain)
    if (r.err.find(s) == std::string::npos)
      return ::testing::AssertionFailure() << "stderr lacks '" << s << "': " << r.err;
  return ::testing::AssertionSuccess() << r.err;
}

// The in-process form: fn throws one lmf::Error, one line, holding every string of must_contain.
inline ::testing::AssertionResult one_line_error(const std::function<void()>& fn, const std::vector<std::string>& must_contain) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string m = e.what();
    if (m.find('\n') != std::string::npos) return ::testing::AssertionFailure() << "message has a newline: " << m;
    for (const std::string& s : must_contain)
      if (m.find(s) == std::string::npos) return ::testing::AssertionFailure() << "message lacks '" << s << "': " << m;
    return ::testing::AssertionSuccess() << m;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "not an lmf::Error: " << e.what();
  }
  return ::testing::AssertionFailure() << "no error";
}

}  // namespace lmf::test
