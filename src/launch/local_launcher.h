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
//  * The launcher owns every process of the job. Each worker leads a process
//    group of its own (so that a terminal's Ctrl-C reaches the launcher
//    only), with stdin from /dev/null and PR_SET_PDEATHSIG = SIGKILL. When a
//    worker ends, its whole group (what it started) is killed with SIGKILL.
//    The launcher is a child subreaper (PR_SET_CHILD_SUBREAPER): orphans of
//    the workers come back to it, and those still running when the job ends
//    are killed. A guardian process, forked before anything else, learns
//    every worker's group over a pipe and kills them all when the launcher
//    dies, even by SIGKILL (the pipe closes). A process that leaves its
//    worker's group (setsid, setpgid) escapes the guardian: only a cgroup
//    would catch it.
//  * Every worker has a member id (WEFT_MEMBER), `n<node>.s<slot>.r<restart>`.
//    evict() (a survivor declared the member dead: weft/evict/<member>)
//    SIGKILLs the member's process group.
//  * Elastic mode (WorkerOptions::elastic_min > 0): a failed worker does not
//    stop the others. Its slot is restarted with a new member id after a
//    back-off (restart_backoff, doubling per slot, capped at max_backoff)
//    while the job has restarts left (max_restarts); a slot that failed
//    3 times within 60 s waits a cool-down first. The job ends when every
//    worker has exited.
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
  // Start more than kMaxWorkersPerCpu workers per CPU anyway (refused
  // otherwise; more workers than CPUs gives a warning unless this is set).
  bool oversubscribe = false;
  // Elastic mode when elastic_min > 0: --elastic MIN:MAX, nproc == MAX.
  // Under --nnodes MIN:MAX, the job's bounds over all nodes: elastic_min =
  // MIN x L and elastic_max = MAX x L (0: nproc, one node).
  int elastic_min = 0;
  int elastic_max = 0;
  int max_restarts = 0;
  std::chrono::milliseconds restart_backoff = std::chrono::seconds(1);
  std::chrono::milliseconds max_backoff = std::chrono::seconds(30);
  // A slot that failed kCoolDownFailures times within kCoolDownWindow is
  // restarted only after this cool-down.
  std::chrono::milliseconds cool_down = std::chrono::seconds(60);
};

// Workers per CPU above which -n is refused without --oversubscribe.
inline constexpr int kMaxWorkersPerCpu = 64;
// File descriptors the launcher keeps per worker (two output relays and the
// worker's store connection), and those it needs besides.
inline constexpr int kFdsPerWorker = 4;
inline constexpr int kFdsBase = 64;
// Elastic cool-down: this many failures of one slot within the window.
inline constexpr int kCoolDownFailures = 3;
inline constexpr std::chrono::seconds kCoolDownWindow{60};

// Throws LaunchError (exit code 2) when `nproc` workers cannot fit the
// open-file limit (RLIMIT_NOFILE: the soft limit is raised up to the hard
// one when that is enough), or are more than kMaxWorkersPerCpu per CPU of
// `cpus` without `oversubscribe`. Returns a warning ("" if none) when there
// are more workers than CPUs.
std::string check_worker_count(int nproc, int cpus, bool prefix_output, bool oversubscribe);

// "n0.s2.r1": the member id of restart `restart` of slot `slot` on node `node`.
std::string member_id(int node, int slot, int restart);

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
  std::string member;   // WEFT_MEMBER of the worker
  std::string evicted;  // the eviction's reason, when it was evicted

  bool failed() const { return signal != 0 || exit_code != 0; }
  // "exited with code 3", "was killed by signal 9 (SIGKILL)", followed by
  // "; rank 1 (pid 42) is stopped (state T, e.g. by SIGSTOP): the likely
  // cause" when `stopped` is set.
  std::string describe() const;
  // The launcher's exit code for this failure: the code, or 128 + signal.
  int launcher_exit_code() const { return signal != 0 ? 128 + signal : exit_code; }
  // The value of weft/elastic/dead/<member>: "exited with code 3", "killed
  // by SIGKILL" or "evicted: REASON".
  std::string death() const;
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
  // Elastic mode: called for every failed worker (before its restart is
  // planned). Exceptions it throws are reported and ignored.
  void on_member_failed(std::function<void(const WorkerExit&)> callback);

  // Thread-safe: the member ids of the workers running now.
  std::vector<std::string> live_members() const;
  // Thread-safe: SIGKILLs the process group of `member` (if it runs), whose
  // death then counts as a failure "evicted: reason".
  void evict(const std::string& member, const std::string& reason);

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
