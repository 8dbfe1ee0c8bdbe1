// store.h: the rendezvous of a distributed run (docs/DISTRIBUTED.md): a key-value store that rank 0
// serves over TCP at MASTER_ADDR:MASTER_PORT and every rank (rank 0 included) talks to.
//
// It carries what the ranks must agree on before any collective runs: the collective library's
// connection details (Gloo's pair addresses; NCCL's unique id), the run's fingerprint (config, flags,
// data) that dist/run.h compares, and the liveness of the ranks: the server knows which connection
// is which rank, and a connection that closes without finish() marks that rank dead (key
// "lmf/dead"). Every rank's watchdog (dist/run.h) polls that key, so when one rank dies the others
// exit naming it instead of hanging in a collective. If rank 0 itself dies, the server goes with it
// and the watchdogs see the connection drop.
//
// Not a data path: tensors move through the collective library (Gloo on the CPU, NCCL on GPUs).
#pragma once
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dist/env.h"

namespace lmf {

class TcpStore {
 public:
  // Rank 0 starts the server, then every rank connects (retrying until `timeout`: the ranks start in
  // any order) and says which rank it is. Throws one line naming the address on failure.
  TcpStore(const DistEnv& env, std::chrono::milliseconds timeout);
  ~TcpStore();
  TcpStore(const TcpStore&) = delete;
  TcpStore& operator=(const TcpStore&) = delete;

  void set(const std::string& key, const std::vector<char>& value);
  // Blocks until `key` is set or the timeout passes (then throws naming the key and the wait).
  std::vector<char> get(const std::string& key);
  std::vector<char> get(const std::string& key, std::chrono::milliseconds timeout);
  // Without waiting: the value, or nothing.
  std::optional<std::vector<char>> try_get(const std::string& key);
  // A second connection of the same rank (for a watchdog thread): it does not mark the rank dead.
  std::unique_ptr<TcpStore> another_connection() const;
  // This rank is done: its connection closing from now on is not a death. Rank 0 then waits (up to
  // the timeout) until every rank has said so before its server stops.
  void finish();
  // Rank 0's main store, when a rank has died: waits (up to a few seconds) until the other ranks
  // have disconnected, so each of them reads which rank died before the rendezvous closes. The
  // destructor does it too; rank 0's watchdog calls it before exiting. A no-op elsewhere.
  void linger_after_a_death();

  int rank() const { return env_.rank; }
  const DistEnv& env() const { return env_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

 private:
  struct Server;
  TcpStore(const DistEnv& env, std::chrono::milliseconds timeout, bool watcher);
  std::vector<char> request(char op, const std::string& key, const std::vector<char>& value);
  DistEnv env_;
  std::chrono::milliseconds timeout_;
  bool watcher_ = false;
  static constexpr std::chrono::milliseconds kLingerAfterADeath{10000};
  int fd_ = -1;
  std::shared_ptr<Server> server_;  // rank 0's main store only
};

}  // namespace lmf
