// env.h: where this process sits in a distributed run (docs/DISTRIBUTED.md), read from the
// environment the usual launchers set, so `torchrun --no-python lmforge train ...`, `srun lmforge
// train ...` and `lmforge launch -n N -- train ...` all work unchanged:
//   torchrun / lmforge launch: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
//   Slurm (srun):              SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (+ MASTER_ADDR, MASTER_PORT,
//                              which the batch script exports; MASTER_PORT defaults to 29500)
// Nothing set: a single process (rank 0 of 1). RANK/WORLD_SIZE win over the Slurm variables.
#pragma once
#include <map>
#include <string>

namespace lmf {

struct DistEnv {
  int rank = 0, world_size = 1, local_rank = 0;
  std::string master_addr;  // rank 0's host: the rendezvous (world_size > 1)
  int master_port = 0;
  std::string launcher = "single process";  // "torchrun-style environment", "Slurm", "single process"
  bool distributed() const { return world_size > 1; }
  // A launcher started this process with a rendezvous, even a world of 1 (`lmforge launch -n 1`): the
  // run takes the distributed path (its communicator, NCCL on GPUs) with one rank.
  bool launched() const { return !master_addr.empty() && master_port > 0; }
};

// Reads the variables from `env` (the process environment when empty). Bad or inconsistent values
// (a RANK outside [0, WORLD_SIZE), WORLD_SIZE without MASTER_ADDR, a port outside [1, 65535], text
// where a number belongs) throw one line naming the variable.
DistEnv dist_env_from(const std::map<std::string, std::string>& env);
DistEnv dist_env();  // the process's environment

}  // namespace lmf
