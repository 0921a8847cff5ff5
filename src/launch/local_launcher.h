// Starting and supervising the worker processes of one node.
//
// LocalLauncher forks nproc workers that exec the same command, each with
// the WEFT_* environment of its rank, relays their output with a rank
// prefix (output_mux.h) and supervises them:
//  * A worker that exits non-zero or is killed by a signal is a failure: the
//    launcher reports it (stderr, and the on_failure callback, which
//    publishes the abort record), then stops the others: SIGTERM, and
//    SIGKILL for those still running after the grace period.
//  * SIGINT, SIGTERM or SIGHUP sent to the launcher are forwarded to every
//    worker, with the same SIGKILL after the grace period; a second one
//    kills the workers at once.
//  * Each worker runs in a process group of its own (so that a terminal's
//    Ctrl-C reaches the launcher only, and signals reach the helper
//    processes a worker starts too), with stdin from /dev/null and
//    PR_SET_PDEATHSIG = SIGKILL: workers die if the launcher dies.
//
// The job's shape (JobLayout) is given by the caller, so that the same class
// serves a single node and each node of a multi-node job (run.h).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "weft/errors.h"

namespace weft::launch {

// A launch that cannot proceed; exit_code() is what the launcher exits
// with (127 when the program cannot be run, 2 for a usage error).
class LaunchError : public Error {
 public:
  LaunchError(const std::string& what, int exit_code) : Error(what), exit_code_(exit_code) {}
  int exit_code() const { return exit_code_; }

 private:
  int exit_code_;
};

// What to start on this node.
struct WorkerOptions {
  // The program (a path, or a name looked up in PATH) and its arguments.
  std::vector<std::string> command;
  // Workers on this node (>= 1).
  int nproc = 1;
  // Time between SIGTERM (or the forwarded signal) and SIGKILL when the
  // workers are stopped. Zero kills at once.
  std::chrono::milliseconds grace = std::chrono::seconds(5);
  // Prefix every line of output with the rank. When false, workers write
  // straight to the launcher's stdout and stderr.
  bool prefix_output = true;
  // Extra environment of every worker, over the launcher's own.
  std::vector<std::pair<std::string, std::string>> env;
  // CPU binding. Auto: when the launcher may run on at least as many CPUs
  // as there are workers on this node, each worker is bound to its own
  // equal share of them (local rank i gets the i-th share, in CPU order),
  // as mpirun and srun do: a worker keeps its caches and never waits behind
  // a sibling for a CPU. With more workers than CPUs nobody is bound.
  // None: workers inherit the launcher's CPUs.
  enum class Bind { Auto, None };
  Bind bind = Bind::Auto;
};

// The CPUs local rank `local_rank` of `nproc` is bound to under
// WorkerOptions::Bind::Auto, out of `allowed` (the launcher's CPUs, in
// order); empty when it is not bound.
std::vector<int> worker_cpus(const std::vector<int>& allowed, int local_rank, int nproc);

// Where this node's workers stand in the job.
struct JobLayout {
  int world_size = 1;
  int nnodes = 1;
  int node_rank = 0;
  // Global rank of this node's local rank 0.
  int first_rank = 0;
  // The rendezvous store, "host:port" (WEFT_STORE), and the job token.
  std::string store;
  std::string job_token;
};

// How a worker ended.
struct WorkerExit {
  int rank = -1;
  pid_t pid = -1;
  int exit_code = 0;  // when signal == 0
  int signal = 0;     // the signal that killed it, or 0
  // Set when another worker of this node was found stopped (process state T,
  // e.g. SIGSTOP) as this one failed: the stopped one is the likely cause
  // (its peers time out waiting for it), and describe() says so.
  std::string stopped;  // e.g. "rank 1 (pid 42)"

  bool failed() const { return signal != 0 || exit_code != 0; }
  // "exited with code 3", "was killed by signal 9 (SIGKILL)", followed by
  // "; rank 1 (pid 42) is stopped (state T, e.g. by SIGSTOP): the likely
  // cause" when `stopped` is set.
  std::string describe() const;
  // The launcher's exit code for this failure: the code, or 128 + signal.
  int launcher_exit_code() const { return signal != 0 ? 128 + signal : exit_code; }
};

// "SIGKILL" (or "signal 77" for a number without a name).
std::string signal_name(int sig);

// The path execve() gets for `program`: itself when it contains a '/',
// else the first executable regular file named so in the directories of
// `path` (PATH syntax). Throws LaunchError(127) naming the program when
// there is none, or when it is not an executable file.
std::string find_program(const std::string& program, const std::string& path);

class LocalLauncher {
 public:
  // Validates the options and finds the program (throws LaunchError), and
  // blocks SIGINT, SIGTERM, SIGHUP, SIGCHLD and SIGPIPE in the calling
  // thread to receive them through a signalfd. Construct it before starting
  // any thread (e.g. a store server), so that the threads inherit the mask.
  explicit LocalLauncher(WorkerOptions options);
  // Kills (SIGKILL) and reaps workers still running; restores the mask.
  ~LocalLauncher();
  LocalLauncher(const LocalLauncher&) = delete;
  LocalLauncher& operator=(const LocalLauncher&) = delete;

  // Called once, with the first failed worker, before the others are
  // stopped. Exceptions it throws are reported and ignored.
  void on_failure(std::function<void(const WorkerExit&)> callback);

  // Thread-safe: stops the workers because the job failed elsewhere (e.g.
  // on another node): prints `reason`, then stops them like after a
  // failure (SIGTERM, SIGKILL after the grace period), and run() returns
  // `exit_code` unless a worker failed first. Ignored once the workers are
  // being stopped; before run(), applies as soon as it starts them.
  void stop(const std::string& reason, int exit_code);

  // Starts the workers and supervises them until every one has exited.
  // Returns the launcher's exit code: 0 when all exited 0; the first failed
  // worker's exit code (128 + signal when killed); 128 + signal when the
  // launcher was told to stop by a signal; 127 when exec failed.
  int run(const JobLayout& job);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace weft::launch
