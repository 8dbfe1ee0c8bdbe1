// launch_cmd.h: `lmforge launch -n N -- train ...` (docs/DISTRIBUTED.md): N ranks of an lmforge command
// on this host, without Python: the environment torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK,
// LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), a free port, Ctrl-C passed on to every rank, and when a
// rank fails, one line naming it, the others stopped (they exit on their own through their watchdog;
// after a grace period they are terminated) and its exit code returned.
#pragma once
#include <CLI/CLI.hpp>
#include <string>
#include <vector>

namespace lmf {

struct LaunchCommand {
  CLI::App* app = nullptr;
  int nproc = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 0;  // 0: a free one
  double grace = 30;    // seconds the other ranks get to exit after one fails
};

void add_launch_command(CLI::App& app, LaunchCommand& cmd);
// argv0: this executable (each rank runs it); args: the command after `--`.
int run_launch(const LaunchCommand& cmd, const std::string& argv0, const std::vector<std::string>& args);

}  // namespace lmf
