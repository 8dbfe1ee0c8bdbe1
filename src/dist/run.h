// run.h: a distributed run's process-level pieces (docs/DISTRIBUTED.md): the rendezvous, the
// communicator over all ranks, the start-up agreement check and the watchdog.
//
//   DistRun d(dist_env(), timeout, gpu);     // every rank: meet at MASTER_ADDR:MASTER_PORT, connect
//   d.agree("the run", fingerprint);         // ranks launched with different configs: one clear error
//   ... d.comm().all_reduce_sum(grads) ...
//   d.finish();                              // clean exit: the others do not take it for a death
//
// The watchdog (a thread per rank, on its own store connection) polls the store for a rank that died
// (its connection closed without finish(): a crash, a kill, an error exit). When it sees one, or
// loses rank 0, it prints one line naming the rank and ends the process with exit code 3, so no rank
// hangs in a collective waiting for a peer that is gone. A rank that hangs instead of dying is caught
// by the collectives' timeout (the communicator throws naming the collective).
#pragma once
#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/comm.h"
#include "dist/env.h"
#include "dist/store.h"

namespace lmf {

class DistRun {
 public:
  // gpu: the communicator is NCCL's (GPU tensors, on lmforge's stream), else Gloo's (CPU tensors).
  DistRun(const DistEnv& env, std::chrono::milliseconds timeout, bool gpu = false);
  ~DistRun();
  DistRun(const DistRun&) = delete;
  DistRun& operator=(const DistRun&) = delete;

  const DistEnv& env() const { return env_; }
  int rank() const { return env_.rank; }
  int world_size() const { return env_.world_size; }
  Communicator& comm() { return *comm_; }
  // A communicator over a subset of the ranks (tensor- and data-parallel groups of a 2-D mesh): every
  // rank of the run calls it with the same names in the same order, each with the group it belongs
  // to; the run owns it.
  Communicator& group(const std::string& name, const std::vector<int>& ranks);
  TcpStore& store() { return *store_; }

  // Every rank passes its fingerprint of `what` (text: "key=value" lines); when any differs from rank
  // 0's, every rank throws one line naming the first rank that differs and the first line that does.
  void agree(const std::string& what, const std::string& fingerprint);
  // This rank ends cleanly: stops the watchdog, tells the store; rank 0 waits for the others.
  void finish();

 private:
  void all_connected(const std::string& name, const std::vector<int>& ranks);  // a store barrier of the group
  DistEnv env_;
  std::unique_ptr<TcpStore> store_;
  std::unique_ptr<Communicator> comm_;
  std::vector<std::unique_ptr<Communicator>> groups_;
  std::chrono::milliseconds timeout_;
  bool gpu_ = false;
  std::atomic<bool> stop_{false};
  std::thread watchdog_;
  int agreements_ = 0;
  bool finished_ = false;
};

}  // namespace lmf
