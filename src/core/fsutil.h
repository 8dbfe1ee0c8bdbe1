// fsutil.h: file helpers. Every write that replaces user data is atomic: a temporary file in the
// same directory, fsync, rename over the target, fsync of the directory. A crash at any point
// leaves either the old file or the new one, never a torn one.
#pragma once
#include <string>

namespace lmf {

void write_file_atomic(const std::string& path, const std::string& data);
std::string read_file(const std::string& path, const char* what = "file");
void fsync_dir(const std::string& dir);

}  // namespace lmf
