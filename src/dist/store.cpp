// store.cpp: see store.h.
//
// Wire format, both directions: op (1 byte), key length (u32), key, value length (u64), value.
// Requests: 'H' hello (value: rank, 4 bytes; key "watch" for a watchdog's connection), 'S' set,
// 'G' get (value: timeout in ms, 8 bytes), 'T' try-get, 'F' finish. Replies: 'K' ok / found (value),
// 'N' not found (get timed out, try-get missed).
#include "dist/store.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "core/check.h"

namespace lmf {

namespace {

using Clock = std::chrono::steady_clock;

bool write_all(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = ::send(fd, c, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    c += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool read_all(int fd, void* p, size_t n) {
  char* c = static_cast<char*>(p);
  while (n > 0) {
    const ssize_t r = ::recv(fd, c, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    c += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

struct Message {
  char op = 0;
  std::string key;
  std::vector<char> value;
};

bool send_msg(int fd, const Message& m) {
  const uint32_t kl = static_cast<uint32_t>(m.key.size());
  const uint64_t vl = m.value.size();
  return write_all(fd, &m.op, 1) && write_all(fd, &kl, 4) && write_all(fd, m.key.data(), kl) &&
         write_all(fd, &vl, 8) && write_all(fd, m.value.data(), vl);
}

bool recv_msg(int fd, Message& m) {
  uint32_t kl = 0;
  uint64_t vl = 0;
  if (!read_all(fd, &m.op, 1) || !read_all(fd, &kl, 4) || kl > (1u << 20)) return false;
  m.key.resize(kl);
  if (!read_all(fd, m.key.data(), kl) || !read_all(fd, &vl, 8) || vl > (uint64_t{1} << 32)) return false;
  m.value.resize(vl);
  return read_all(fd, m.value.data(), vl);
}

std::vector<char> bytes_of(uint64_t v) {
  std::vector<char> b(8);
  std::memcpy(b.data(), &v, 8);
  return b;
}

uint64_t u64_of(const std::vector<char>& b) {
  uint64_t v = 0;
  std::memcpy(&v, b.data(), std::min<size_t>(8, b.size()));
  return v;
}

std::string where(const DistEnv& e) { return e.master_addr + ":" + std::to_string(e.master_port); }

}  // namespace

// Rank 0's server: one thread accepts, one thread per connection serves it.
struct TcpStore::Server {
  int listen_fd = -1;
  int world = 1;
  std::atomic<bool> stopping{false};
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::string, std::vector<char>> kv;
  std::set<int> finished;
  std::multiset<int> open;  // the ranks whose main connection is open
  std::vector<std::thread> threads;
  std::thread acceptor;
  std::vector<int> conns;

  void serve(int fd) {
    int rank = -1;
    bool watcher = false, done = false;
    Message m;
    while (recv_msg(fd, m)) {
      Message reply{'K', "", {}};
      if (m.op == 'H') {
        rank = static_cast<int>(u64_of(m.value));
        watcher = m.key == "watch";
        if (!watcher) {
          std::lock_guard<std::mutex> g(mu);
          open.insert(rank);
        }
      } else if (m.op == 'S') {
        std::lock_guard<std::mutex> g(mu);
        kv[m.key] = m.value;
        cv.notify_all();
      } else if (m.op == 'G' || m.op == 'T') {
        std::unique_lock<std::mutex> g(mu);
        const auto deadline = Clock::now() + std::chrono::milliseconds(m.op == 'G' ? u64_of(m.value) : 0);
        cv.wait_until(g, deadline, [&] { return kv.count(m.key) > 0 || stopping.load(); });
        auto it = kv.find(m.key);
        if (it == kv.end()) reply.op = 'N';
        else reply.value = it->second;
      } else if (m.op == 'F') {  // reply first: once every rank is marked, rank 0 may stop the server
        done = true;
        const bool sent = send_msg(fd, reply);
        std::lock_guard<std::mutex> g(mu);
        finished.insert(rank);
        cv.notify_all();
        if (!sent) break;
        continue;
      }
      if (!send_msg(fd, reply)) break;
    }
    ::close(fd);
    if (watcher || rank < 0) return;
    std::lock_guard<std::mutex> g(mu);
    open.erase(open.find(rank));
    if (!done && !stopping.load() && !kv.count("lmf/dead"))  // a rank's main connection closed unannounced
      kv["lmf/dead"] = bytes_of(static_cast<uint64_t>(rank));
    cv.notify_all();
  }

  // Rank 0 is leaving because another rank died: keep serving until the others have left too (or
  // `timeout`), so each reads which rank died instead of seeing only that the rendezvous closed.
  void linger_after_a_death(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> g(mu);
    if (!kv.count("lmf/dead")) return;
    cv.wait_for(g, timeout, [&] { return std::all_of(open.begin(), open.end(), [](int r) { return r == 0; }); });
  }

  void start(int port) {
    listen_fd = ::socket(AF_INET6, SOCK_STREAM, 0);
    bool v6 = listen_fd >= 0;
    if (!v6) listen_fd = ::socket(AF_INET, SOCK_STREAM, 0);
    LMF_CHECK(listen_fd >= 0, "rendezvous: socket(): ", std::strerror(errno));
    int one = 1, zero = 0;
    ::setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    int rc;
    if (v6) {
      ::setsockopt(listen_fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
      sockaddr_in6 a{};
      a.sin6_family = AF_INET6;
      a.sin6_addr = in6addr_any;
      a.sin6_port = htons(static_cast<uint16_t>(port));
      rc = ::bind(listen_fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    } else {
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_addr.s_addr = htonl(INADDR_ANY);
      a.sin_port = htons(static_cast<uint16_t>(port));
      rc = ::bind(listen_fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    }
    if (rc != 0 || ::listen(listen_fd, 256) != 0) {
      const std::string why = std::strerror(errno);
      ::close(listen_fd);
      fail("rendezvous: rank 0 cannot listen on port ", port, " (MASTER_PORT): ", why,
           " (another run on this port? pick another MASTER_PORT)");
    }
    acceptor = std::thread([this] {
      while (!stopping.load()) {
        const int fd = ::accept(listen_fd, nullptr, nullptr);
        if (fd < 0) {
          if (errno == EINTR) continue;
          break;  // the listening socket was shut down
        }
        int one = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        std::lock_guard<std::mutex> g(mu);
        conns.push_back(fd);
        threads.emplace_back([this, fd] { serve(fd); });
      }
    });
  }

  // Waits until every rank finished (or the timeout), then stops.
  void stop(std::chrono::milliseconds timeout) {
    {
      std::unique_lock<std::mutex> g(mu);
      cv.wait_for(g, timeout, [&] { return static_cast<int>(finished.size()) >= world; });
    }
    stopping = true;
    cv.notify_all();
    ::shutdown(listen_fd, SHUT_RDWR);
    ::close(listen_fd);
    if (acceptor.joinable()) acceptor.join();
    {
      std::lock_guard<std::mutex> g(mu);
      for (int fd : conns) ::shutdown(fd, SHUT_RDWR);
    }
    for (auto& t : threads)
      if (t.joinable()) t.join();
  }
};

TcpStore::TcpStore(const DistEnv& env, std::chrono::milliseconds timeout) : TcpStore(env, timeout, false) {}

TcpStore::TcpStore(const DistEnv& env, std::chrono::milliseconds timeout, bool watcher)
    : env_(env), timeout_(timeout), watcher_(watcher) {
  LMF_CHECK(env.launched(), "rendezvous: no MASTER_ADDR/MASTER_PORT to meet at");
  if (env.rank == 0 && !watcher) {
    server_ = std::make_shared<Server>();
    server_->world = env.world_size;
    server_->start(env.master_port);
  }
  // connect, retrying: rank 0's server may not be up yet
  const auto deadline = Clock::now() + timeout;
  std::string last = "no attempt";
  while (fd_ < 0) {
    addrinfo hints{}, *res = nullptr;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    const std::string& host = env.master_addr;
    const int g = ::getaddrinfo(host.c_str(), std::to_string(env.master_port).c_str(), &hints, &res);
    if (g != 0) {
      last = std::string("cannot resolve MASTER_ADDR '") + host + "': " + gai_strerror(g);
    } else {
      for (addrinfo* a = res; a && fd_ < 0; a = a->ai_next) {
        const int fd = ::socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd < 0) continue;
        if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
          int one = 1;
          ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          fd_ = fd;
        } else {
          last = std::strerror(errno);
          ::close(fd);
        }
      }
      ::freeaddrinfo(res);
    }
    if (fd_ >= 0) break;
    if (Clock::now() > deadline) {
      if (server_) server_->stop(std::chrono::milliseconds(0));
      fail("rendezvous: rank ", env.rank, " could not reach rank 0 at ", where(env), " within ",
           timeout.count() / 1000.0, " s (", last, "); is rank 0 running, and MASTER_ADDR/MASTER_PORT right?");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  request('H', watcher ? "watch" : "", bytes_of(static_cast<uint64_t>(env.rank)));
}

TcpStore::~TcpStore() {
  if (fd_ >= 0) ::close(fd_);
  if (server_) {
    server_->linger_after_a_death(kLingerAfterADeath);
    server_->stop(std::chrono::milliseconds(0));
  }
}

void TcpStore::linger_after_a_death() {
  if (server_) server_->linger_after_a_death(kLingerAfterADeath);
}

std::vector<char> TcpStore::request(char op, const std::string& key, const std::vector<char>& value) {
  Message reply;
  if (!send_msg(fd_, {op, key, value}) || !recv_msg(fd_, reply))
    fail("rendezvous: rank ", env_.rank, " lost its connection to rank 0 at ", where(env_),
         " (rank 0 exited or died)");
  if (reply.op == 'N') throw std::out_of_range(key);
  return reply.value;
}

void TcpStore::set(const std::string& key, const std::vector<char>& value) { request('S', key, value); }

std::vector<char> TcpStore::get(const std::string& key) { return get(key, timeout_); }

std::vector<char> TcpStore::get(const std::string& key, std::chrono::milliseconds timeout) {
  try {
    return request('G', key, bytes_of(static_cast<uint64_t>(timeout.count())));
  } catch (const std::out_of_range&) {
    fail("rendezvous: rank ", env_.rank, " waited ", timeout.count() / 1000.0, " s for '", key,
         "' from the other ranks (a rank is missing, stuck, or was launched with another world size)");
  }
}

std::optional<std::vector<char>> TcpStore::try_get(const std::string& key) {
  try {
    return request('T', key, {});
  } catch (const std::out_of_range&) {
    return std::nullopt;
  }
}

std::unique_ptr<TcpStore> TcpStore::another_connection() const {
  return std::unique_ptr<TcpStore>(new TcpStore(env_, timeout_, true));
}

void TcpStore::finish() {
  try {
    request('F', "", {});
  } catch (const Error&) {
    // rank 0 stopped its server right after recording this rank's finish: the reply may be cut off
  }
  if (server_) server_->stop(timeout_);
}

}  // namespace lmf
