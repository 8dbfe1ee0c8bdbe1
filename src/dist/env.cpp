// env.cpp: see env.h.
#include "dist/env.h"

#include <cerrno>
#include <cstdlib>

#include "core/check.h"

extern char** environ;

namespace lmf {

namespace {

// The integer value of variable `name` in [lo, hi]; absent: `fallback`.
int int_var(const std::map<std::string, std::string>& env, const char* name, int lo, int hi, int fallback) {
  auto it = env.find(name);
  if (it == env.end()) return fallback;
  const std::string& s = it->second;
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno != 0 || v < lo || v > hi)
    fail("environment: ", name, "='", s, "' is not an integer in [", lo, ", ", hi, "]");
  return static_cast<int>(v);
}

}  // namespace

DistEnv dist_env_from(const std::map<std::string, std::string>& env) {
  DistEnv d;
  const bool torch_style = env.count("WORLD_SIZE") || env.count("RANK");
  const bool slurm = !torch_style && env.count("SLURM_NTASKS") && env.count("SLURM_PROCID");
  constexpr int kMaxWorld = 1 << 16;
  if (torch_style) {
    if (!env.count("WORLD_SIZE") || !env.count("RANK"))
      fail("environment: ", env.count("RANK") ? "RANK" : "WORLD_SIZE", " is set but ",
           env.count("RANK") ? "WORLD_SIZE" : "RANK", " is not (a launcher sets both)");
    d.world_size = int_var(env, "WORLD_SIZE", 1, kMaxWorld, 1);
    d.rank = int_var(env, "RANK", 0, kMaxWorld, 0);
    d.local_rank = int_var(env, "LOCAL_RANK", 0, kMaxWorld, d.rank);
    d.launcher = "torchrun-style environment";
  } else if (slurm) {
    d.world_size = int_var(env, "SLURM_NTASKS", 1, kMaxWorld, 1);
    d.rank = int_var(env, "SLURM_PROCID", 0, kMaxWorld, 0);
    d.local_rank = int_var(env, "SLURM_LOCALID", 0, kMaxWorld, 0);
    d.launcher = "Slurm";
  }
  const char* rank_var = slurm ? "SLURM_PROCID" : "RANK";
  if (d.rank >= d.world_size)
    fail("environment: ", rank_var, "=", d.rank, " is not below ", slurm ? "SLURM_NTASKS" : "WORLD_SIZE", "=",
         d.world_size);
  if (!torch_style && !slurm) return d;
  auto addr = env.find("MASTER_ADDR");
  if (addr == env.end() || addr->second.empty()) {
    if (!d.distributed()) return d;  // one rank and no rendezvous: a single process
    fail("environment: MASTER_ADDR is not set; ", d.world_size,
         " ranks need rank 0's host to meet at (torchrun and lmforge launch set it; under Slurm export "
         "MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1))");
  }
  d.master_addr = addr->second;
  d.master_port = int_var(env, "MASTER_PORT", 1, 65535, slurm ? 29500 : -1);
  if (d.master_port < 0) fail("environment: MASTER_PORT is not set (rank 0's rendezvous port)");
  return d;
}

DistEnv dist_env() {
  std::map<std::string, std::string> env;
  for (char** e = environ; e && *e; ++e) {
    const std::string kv = *e;
    const size_t eq = kv.find('=');
    if (eq != std::string::npos) env.emplace(kv.substr(0, eq), kv.substr(eq + 1));
  }
  return dist_env_from(env);
}

}  // namespace lmf
