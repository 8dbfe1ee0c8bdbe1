// run.cpp: see run.h.
#include "dist/run.h"

#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <vector>

#include "core/check.h"
#include "dist/gloo_comm.h"
#include "dist/nccl_comm.h"

namespace lmf {

namespace {

std::vector<char> to_bytes(const std::string& s) { return {s.begin(), s.end()}; }
std::string to_string(const std::vector<char>& b) { return {b.begin(), b.end()}; }

// The first line where a and b differ ("<missing>" past the end of one).
std::string first_difference(const std::string& a, const std::string& b) {
  std::istringstream sa(a), sb(b);
  std::string la, lb;
  while (true) {
    const bool ga = static_cast<bool>(std::getline(sa, la)), gb = static_cast<bool>(std::getline(sb, lb));
    if (!ga && !gb) return "?";
    if (!ga) la = "<missing>";
    if (!gb) lb = "<missing>";
    if (la != lb) return "'" + lb + "' where rank 0 has '" + la + "'";
  }
}

}  // namespace

DistRun::DistRun(const DistEnv& env, std::chrono::milliseconds timeout, bool gpu)
    : env_(env), timeout_(timeout), gpu_(gpu) {
  // a peer that dies mid-transfer must surface as an error on this rank, never as a silent SIGPIPE death
  std::signal(SIGPIPE, SIG_IGN);
  store_ = std::make_unique<TcpStore>(env, timeout);
  comm_ = gpu ? make_nccl_communicator(*store_) : make_gloo_communicator(*store_, timeout);
  std::vector<int> world(static_cast<size_t>(env.world_size));
  for (int r = 0; r < env.world_size; ++r) world[static_cast<size_t>(r)] = r;
  all_connected("world", world);
  std::shared_ptr<TcpStore> watch(store_->another_connection().release());
  const int me = env.rank;
  watchdog_ = std::thread([this, watch, me] {
    while (!stop_.load()) {
      std::optional<std::vector<char>> dead;
      try {
        dead = watch->try_get("lmf/dead");
      } catch (const std::exception&) {
        if (stop_.load()) return;
        std::fprintf(stderr, "lmforge: error: rank %d: rank 0 died or exited (the rendezvous at %s:%d closed); "
                     "this rank stops\n", me, env_.master_addr.c_str(), env_.master_port);
        std::fflush(stderr);
        std::_Exit(3);
      }
      if (dead && !stop_.load()) {
        uint64_t r = 0;
        std::memcpy(&r, dead->data(), std::min<size_t>(8, dead->size()));
        std::fprintf(stderr, "lmforge: error: rank %d: rank %llu died or exited with an error (its connection to "
                     "the rendezvous closed); this rank stops\n", me, static_cast<unsigned long long>(r));
        std::fflush(stderr);
        store_->linger_after_a_death();
        std::_Exit(3);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  });
}

DistRun::~DistRun() {
  stop_ = true;
  if (watchdog_.joinable()) watchdog_.join();
}

void DistRun::agree(const std::string& what, const std::string& fingerprint) {
  const std::string prefix = "lmf/agree/" + std::to_string(agreements_++) + "/";
  store_->set(prefix + std::to_string(env_.rank), to_bytes(fingerprint));
  if (env_.rank == 0) {
    std::string verdict = "ok";
    for (int r = 1; r < env_.world_size && verdict == "ok"; ++r) {
      const std::string other = to_string(store_->get(prefix + std::to_string(r)));
      if (other != fingerprint)
        verdict = "rank " + std::to_string(r) + "'s " + what + " differs from rank 0's: " +
                  first_difference(fingerprint, other);
    }
    store_->set(prefix + "verdict", to_bytes(verdict));
    if (verdict != "ok") fail(verdict, " (launch every rank with the same config, flags and data)");
  } else {
    const std::string verdict = to_string(store_->get(prefix + "verdict"));
    if (verdict != "ok") fail(verdict, " (launch every rank with the same config, flags and data)");
  }
}

Communicator& DistRun::group(const std::string& name, const std::vector<int>& ranks) {
  groups_.push_back(gpu_ ? make_nccl_communicator(*store_, name, ranks)
                         : make_gloo_communicator(*store_, timeout_, name, ranks));
  all_connected(name, ranks);
  return *groups_.back();
}

// No member of a group goes on before every member has connected: a rank that fails right after (a
// config error every rank hits) must not close its sockets under a peer still connecting, which would
// then report the lost connection instead of its own error.
void DistRun::all_connected(const std::string& name, const std::vector<int>& ranks) {
  const std::string prefix = "lmf/connected/" + name + "/";
  store_->set(prefix + std::to_string(env_.rank), to_bytes("1"));
  for (const int r : ranks) (void)store_->get(prefix + std::to_string(r));
}

void DistRun::finish() {
  if (finished_) return;
  finished_ = true;
  stop_ = true;
  if (watchdog_.joinable()) watchdog_.join();
  store_->finish();
}

}  // namespace lmf
