// launch_cmd.cpp: see launch_cmd.h.
#include "cli/launch_cmd.h"

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <thread>

#include "core/check.h"

namespace lmf {

namespace {

std::atomic<int> g_forward{0};
void on_launch_signal(int sig) { g_forward = sig; }

// A port the kernel says is free now (bound to port 0, read back, released).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  LMF_CHECK(fd >= 0, "launch: socket(): ", std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    ::close(fd);
    fail("launch: no free port on this host: ", std::strerror(errno));
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

std::string describe(int status) {
  if (WIFEXITED(status)) return "exited with code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("was killed by signal ") + std::to_string(WTERMSIG(status)) + " (" +
                                  strsignal(WTERMSIG(status)) + ")";
  return "stopped";
}

}  // namespace

void add_launch_command(CLI::App& app, LaunchCommand& cmd) {
  cmd.app = app.add_subcommand("launch", "run N ranks of an lmforge command on this host (lmforge launch -n 2 -- train --dp 2 ...)");
  cmd.app->add_option("-n,--nproc-per-node", cmd.nproc, "ranks to start (1 to 1024)")->required();
  cmd.app->add_option("--master-addr", cmd.master_addr, "rank 0's address (MASTER_ADDR)")->capture_default_str();
  cmd.app->add_option("--master-port", cmd.master_port, "rendezvous port (MASTER_PORT; 0: a free one)")->capture_default_str();
  cmd.app->add_option("--grace", cmd.grace, "seconds the other ranks get to exit after one fails")->capture_default_str();
  cmd.app->footer("Everything after -- is the command each rank runs (e.g. -- train --preset tiny --device cpu).");
}

int run_launch(const LaunchCommand& cmd, const std::string& argv0, const std::vector<std::string>& args) {
  if (cmd.nproc < 1 || cmd.nproc > 1024) fail("--nproc-per-node=", cmd.nproc, " must be in [1, 1024]");
  if (args.empty()) fail("launch: no command after -- (e.g. lmforge launch -n 2 -- train --device cpu)");
  if (args[0] == "launch") fail("launch: the command after -- cannot be another launch");
  if (cmd.master_port < 0 || cmd.master_port > 65535) fail("--master-port=", cmd.master_port, " must be in [0, 65535]");
  if (!(cmd.grace >= 0 && cmd.grace <= 3600)) fail("--grace=", cmd.grace, " must be in [0, 3600] seconds");
  const int port = cmd.master_port ? cmd.master_port : free_port();
  std::vector<std::string> argvs = {argv0};
  argvs.insert(argvs.end(), args.begin(), args.end());
  std::vector<char*> cargv;
  for (std::string& a : argvs) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  std::cout << "launch: " << cmd.nproc << " ranks of `lmforge";
  for (const std::string& a : args) std::cout << " " << a;
  std::cout << "`, rendezvous at " << cmd.master_addr << ":" << port << "\n" << std::flush;

  std::vector<pid_t> pids(static_cast<size_t>(cmd.nproc), -1);
  for (int r = 0; r < cmd.nproc; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) {
      for (pid_t p : pids)
        if (p > 0) ::kill(p, SIGKILL);
      fail("launch: fork() for rank ", r, ": ", std::strerror(errno));
    }
    if (pid == 0) {
      ::setenv("RANK", std::to_string(r).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(cmd.nproc).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(cmd.nproc).c_str(), 1);
      ::setenv("MASTER_ADDR", cmd.master_addr.c_str(), 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      ::execv("/proc/self/exe", cargv.data());
      ::execvp(cargv[0], cargv.data());
      std::fprintf(stderr, "lmforge launch: rank %d: cannot run %s: %s\n", r, cargv[0], std::strerror(errno));
      std::_Exit(127);
    }
    pids[static_cast<size_t>(r)] = pid;
  }
  std::signal(SIGINT, on_launch_signal);
  std::signal(SIGTERM, on_launch_signal);

  int running = cmd.nproc, first_bad = -1, exit_code = 0;
  std::chrono::steady_clock::time_point bad_at;
  bool terminated = false;
  while (running > 0) {
    if (const int sig = g_forward.exchange(0)) {  // Ctrl-C / SIGTERM: every rank stops at the same step
      for (pid_t p : pids)
        if (p > 0) ::kill(p, sig);
    }
    int status = 0;
    const pid_t done = ::waitpid(-1, &status, WNOHANG);
    if (done > 0) {
      int r = 0;
      while (r < cmd.nproc && pids[static_cast<size_t>(r)] != done) ++r;
      if (r == cmd.nproc) continue;
      pids[static_cast<size_t>(r)] = -1;
      --running;
      const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      if (!ok && first_bad < 0) {
        first_bad = r;
        exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        bad_at = std::chrono::steady_clock::now();
        std::cerr << "lmforge launch: rank " << r << " " << describe(status) << "; the other ranks stop\n";
      }
      continue;
    }
    if (done < 0 && errno != EINTR) break;
    if (first_bad >= 0 && !terminated &&
        std::chrono::steady_clock::now() - bad_at > std::chrono::duration<double>(cmd.grace)) {
      std::cerr << "lmforge launch: ranks still running " << cmd.grace << " s after rank " << first_bad
                << " failed: terminating them\n";
      for (pid_t p : pids)
        if (p > 0) ::kill(p, SIGKILL);
      terminated = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (first_bad >= 0) {
    std::cerr << "lmforge launch: failed: rank " << first_bad << " exited first (code " << exit_code << ")\n";
    return exit_code == 0 ? 1 : exit_code;
  }
  return 0;
}

}  // namespace lmf
