// fsutil.h: file helpers. Every write that replaces user data is atomic: a temporary file in the
// same directory, fsync, rename over the target, fsync of the directory. A crash at any point
// leaves either the old file or the new one, never a torn one.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <string_view>

namespace lmf {

void write_file_atomic(const std::string& path, const std::string& data);
// The whole file (a FIFO or /dev/stdin too: `--config <(...)` works); a directory is an error.
std::string read_file(const std::string& path, const char* what = "file");
void fsync_dir(const std::string& dir);
// rename(2), checked: throws naming both paths.
void rename_path(const std::string& from, const std::string& to);

// Why `dir` may not be (re)written as a whole ("" when it may): it exists and is not a directory, or is a
// non-empty directory and not overwrite. write_dir_atomic checks it; commands call it first to refuse
// before any work.
std::string replace_dir_problem(const std::string& dir, bool overwrite);
// Writes a whole directory atomically: `fill` writes its files into a fresh temporary directory beside
// `dir`, which is then fsynced and renamed to `dir`. An existing non-empty `dir` is refused
// (replace_dir_problem) unless overwrite; it is then moved aside once the new one is complete and
// removed after the new one took its place. When `fill` throws, the temporary directory is removed and `dir` is
// untouched.
void write_dir_atomic(const std::string& dir, bool overwrite, const std::function<void(const std::string& tmp)>& fill);

// Fault injection for the crash-consistency script (tools/crash_test.sh), off unless LMF_FAULT is
// set: "kill@N" sends SIGKILL to this process at the N-th fault point, "enospc@N" makes the N-th
// fault point fail as a full disk would. Every write and rename of checkpoints and metrics passes
// one. Returns normally when no fault fires here.
void fault_point(const char* where);
// Fault points passed so far (for the script's log).
long fault_points_passed();
// Tests: replace LMF_FAULT's spec ("" = none) and restart the count.
void set_fault_injection(const std::string& spec);

// An advisory lock (flock) on <dir>/.lmforge.lock for as long as the object lives: one trainer per
// out-dir. A second taker fails with one line naming the PID the holder wrote with write_pid()
// (called once the holder has decided to use the directory, so a refused taker changes no byte).
class DirLock {
 public:
  DirLock() = default;
  explicit DirLock(const std::string& dir);
  ~DirLock();
  DirLock(const DirLock&) = delete;
  DirLock& operator=(const DirLock&) = delete;
  DirLock(DirLock&& o) noexcept : fd_(o.fd_), path_(std::move(o.path_)) { o.fd_ = -1; }
  DirLock& operator=(DirLock&& o) noexcept;
  void write_pid();

 private:
  int fd_ = -1;
  std::string path_;
};

// Files that must be regular files (data shards, checkpoint files): opened without blocking, so a FIFO
// or a device given by mistake is one clear line ("<path>: <what> is a FIFO, not a regular file")
// instead of a process waiting forever for a writer. open_regular_file returns the descriptor (the
// caller closes it) and the file's size.
int open_regular_file(const std::string& path, const char* what, size_t* size);
std::string read_regular_file(const std::string& path, const char* what);

// A file's bytes, read-only: memory-mapped (a large checkpoint is read from the page cache as it is
// used, never copied into a buffer first), or a string already in memory. Shared by its readers.
class FileBytes {
 public:
  // Opens `path` as read_regular_file() does (same errors) and maps it.
  static std::shared_ptr<const FileBytes> map(const std::string& path, const char* what);
  static std::shared_ptr<const FileBytes> own(std::string bytes);
  ~FileBytes();
  FileBytes(const FileBytes&) = delete;
  FileBytes& operator=(const FileBytes&) = delete;
  std::string_view view() const { return {data_, size_}; }

 private:
  FileBytes() = default;
  std::string owned_;
  void* map_ = nullptr;
  const char* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace lmf
