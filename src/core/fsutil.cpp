#include "core/fsutil.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/check.h"

namespace lmf {

namespace fs = std::filesystem;

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
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    fail(path, ": rename from ", tmp, " failed (", std::strerror(e), ")");
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
  if (fd < 0) fail(path, ": cannot open ", what, " (", std::strerror(errno), ")");
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

std::string read_file(const std::string& path, const char* what) {
  if (std::error_code ec; fs::is_directory(path, ec)) fail(path, ": ", what, " is a directory, not a file");
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(path, ": cannot open ", what);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace lmf
