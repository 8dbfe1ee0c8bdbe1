#include "core/fsutil.h"

#include <sys/mman.h>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdlib>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/check.h"

namespace lmf {

namespace fs = std::filesystem;

namespace {
std::atomic<long> g_fault_points{0};
std::string& fault_spec() {
  static std::string spec = std::getenv("LMF_FAULT") ? std::getenv("LMF_FAULT") : "";
  return spec;
}
}  // namespace

void set_fault_injection(const std::string& spec) {
  fault_spec() = spec;
  g_fault_points = 0;
}

void fault_point(const char* where) {
  const long n = ++g_fault_points;
  const std::string& s = fault_spec();
  if (s.empty()) return;
  const size_t at = s.find('@');
  if (at == std::string::npos) return;
  if (std::atol(s.c_str() + at + 1) != n) return;
  const std::string kind = s.substr(0, at);
  if (kind == "kill") ::kill(::getpid(), SIGKILL);
  if (kind == "enospc") fail(where, ": write failed (", std::strerror(ENOSPC), ") [injected by LMF_FAULT]");
}

long fault_points_passed() { return g_fault_points.load(); }

void rename_path(const std::string& from, const std::string& to) {
  fault_point(to.c_str());
  if (::rename(from.c_str(), to.c_str()) != 0)
    fail(to, ": rename from ", from, " failed (", std::strerror(errno), ")");
}

std::string replace_dir_problem(const std::string& dir, bool overwrite) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) return "";
  if (!fs::is_directory(dir, ec)) return dir + ": exists and is not a directory";
  if (!fs::is_empty(dir, ec) && !overwrite) return dir + ": exists and is not empty; pass --overwrite to replace it";
  return "";
}

void write_dir_atomic(const std::string& dir, bool overwrite, const std::function<void(const std::string&)>& fill) {
  if (const std::string p = replace_dir_problem(dir, overwrite); !p.empty()) fail(p);
  fs::path target = fs::absolute(dir).lexically_normal();
  if (target.filename().empty()) target = target.parent_path();  // "out/" -> "out"
  const fs::path parent = target.parent_path(), name = target.filename();
  std::error_code ec;
  const bool exists = fs::exists(target, ec);
  fs::create_directories(parent);
  const std::string pid = std::to_string(::getpid());
  std::string stem(".");
  stem.append(name.string());
  const fs::path tmp = parent / (stem + ".tmp." + pid), old = parent / (stem + ".old." + pid);
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  try {
    fill(tmp.string());
    fsync_dir(tmp.string());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  // the old one moves aside and is removed only once the new one is in its place
  if (exists) rename_path(target.string(), old.string());
  rename_path(tmp.string(), target.string());
  fsync_dir(parent.string());
  if (exists) fs::remove_all(old);
}

DirLock::DirLock(const std::string& dir) {
  const std::string path = (fs::path(dir) / ".lmforge.lock").string();
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) fail(path, ": cannot open the out-dir's lock file (", std::strerror(errno), ")");
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int e = errno;
    char buf[32] = {0};
    const ssize_t n = ::pread(fd_, buf, sizeof(buf) - 1, 0);
    ::close(fd_);
    fd_ = -1;
    std::string pid = n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string("?");
    while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
    if (e == EWOULDBLOCK)
      fail(dir, ": out-dir is in use by another lmforge run (pid ", pid, " holds ", path, ")");
    fail(path, ": cannot lock (", std::strerror(e), ")");
  }
  path_ = path;
}

void DirLock::write_pid() {
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (fd_ < 0) return;
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size()))
    fail(path_, ": cannot write the lock file (", std::strerror(errno), ")");
}

DirLock::~DirLock() {
  if (fd_ >= 0) ::close(fd_);  // closing releases the lock
}

DirLock& DirLock::operator=(DirLock&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.fd_;
    path_ = std::move(o.path_);
    o.fd_ = -1;
  }
  return *this;
}

void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) fail(dir, ": cannot open directory to sync (", std::strerror(errno), ")");
  ::fsync(fd);
  ::close(fd);
}

void write_file_atomic(const std::string& path, const std::string& data) {
  fs::path target(path);
  std::string dir = target.parent_path().string();
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) fail(path, ": cannot create temporary file ", tmp, " (", std::strerror(errno), ")");
  size_t done = 0;
  try {
    fault_point(path.c_str());
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  while (done < data.size()) {
    ssize_t w = ::write(fd, data.data() + done, data.size() - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      fail(path, ": write failed (", std::strerror(e), ")");
    }
    done += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    fail(path, ": fsync/close failed (", std::strerror(e), ")");
  }
  try {
    rename_path(tmp, path);
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  fsync_dir(dir);
}

namespace {
const char* file_kind(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISSOCK(m)) return "a socket";
  return "not a regular file";
}
}  // namespace

int open_regular_file(const std::string& path, const char* what, size_t* size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) fail_not_found(path, ": ", what, " not found");
    fail(path, ": cannot open ", what, " (", std::strerror(errno), ")");
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    fail(path, ": cannot stat ", what, " (", std::strerror(e), ")");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, ": ", what, " is ", file_kind(st.st_mode), ", not a regular file");
  }
  *size = static_cast<size_t>(st.st_size);
  return fd;
}

std::string read_regular_file(const std::string& path, const char* what) {
  size_t size = 0;
  const int fd = open_regular_file(path, what, &size);
  std::string out(size, '\0');
  size_t done = 0;
  while (done < size) {
    const ssize_t r = ::read(fd, out.data() + done, size - done);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      const std::string why = r == 0 ? "it shrank while being read" : std::strerror(errno);
      ::close(fd);
      fail(path, ": cannot read ", what, " (", why, ")");
    }
    done += static_cast<size_t>(r);
  }
  ::close(fd);
  return out;
}

std::shared_ptr<const FileBytes> FileBytes::map(const std::string& path, const char* what) {
  size_t size = 0;
  const int fd = open_regular_file(path, what, &size);
  std::shared_ptr<FileBytes> b(new FileBytes());
  if (size > 0) {
    void* m = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    const int err = errno;
    ::close(fd);
    if (m == MAP_FAILED) fail(path, ": cannot map ", what, " (", std::strerror(err), ")");
    ::madvise(m, size, MADV_WILLNEED);
    b->map_ = m;
    b->data_ = static_cast<const char*>(m);
  } else {
    ::close(fd);
    b->data_ = b->owned_.data();
  }
  b->size_ = size;
  return b;
}

std::shared_ptr<const FileBytes> FileBytes::own(std::string bytes) {
  std::shared_ptr<FileBytes> b(new FileBytes());
  b->owned_ = std::move(bytes);
  b->data_ = b->owned_.data();
  b->size_ = b->owned_.size();
  return b;
}

FileBytes::~FileBytes() {
  if (map_) ::munmap(map_, size_);
}

std::string read_file(const std::string& path, const char* what) {
  if (std::error_code ec; fs::is_directory(path, ec)) fail(path, ": ", what, " is a directory, not a file");
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    if (std::error_code ec; !fs::exists(path, ec)) fail_not_found(path, ": ", what, " not found");
    fail(path, ": cannot open ", what);
  }
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace lmf
