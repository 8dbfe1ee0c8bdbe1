// fsutil.h: file helpers. Every write that replaces user data is atomic: a temporary file in the
// same directory, fsync, rename over the target, fsync of the directory. A crash at any point
// leaves either the old file or the new one, never a torn one.
#pragma once
#include <string>

namespace lmf {

void write_file_atomic(const std::string& path, const std::string& data);
// The whole file (a FIFO or /dev/stdin too: `--config <(...)` works); a directory is an error.
std::string read_file(const std::string& path, const char* what = "file");
void fsync_dir(const std::string& dir);

// Files that must be regular files (data shards, checkpoint files): opened without blocking, so a FIFO
// or a device given by mistake is one clear line ("<path>: <what> is a FIFO, not a regular file")
// instead of a process waiting forever for a writer. open_regular_file returns the descriptor (the
// caller closes it) and the file's size.
int open_regular_file(const std::string& path, const char* what, size_t* size);
std::string read_regular_file(const std::string& path, const char* what);

}  // namespace lmf
