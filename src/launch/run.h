// `weft run`: on a single node, a fresh job token, the rendezvous store
// served by the launcher itself on loopback, and the workers; on several
// nodes, one launcher per node, the store served by node 0's launcher at
// the master address, and a launcher rendezvous through it that numbers
// the ranks and propagates failures between nodes.
#pragma once

#include <string>

#include "launch/local_launcher.h"
#include "weft/timeout.h"

namespace weft::launch {

// Key of the abort record: when a worker fails, the launcher stores
// "rank R (host H, pid P) exited with code C" (or "was killed by signal N
// (SIGNAME)") under it, so that the surviving ranks can tell which rank
// failed and why.
inline constexpr const char* kAbortKey = "weft/abort";
// Eviction (shared contract of issue 11): a survivor that declares a member
// dead writes kEvictPrefix + member (a one-line reason); the launcher that
// owns the member SIGKILLs the member's process group as soon as it sees
// the key: at once where it serves the store (TcpStoreServer::on_write), by
// polling every kEvictPoll on the other nodes.
inline constexpr const char* kEvictPrefix = "weft/evict/";
inline constexpr std::chrono::milliseconds kEvictPoll{200};
// Elastic mode: when a worker fails, its launcher writes kDeadPrefix +
// member = WorkerExit::death() ("exited with code 3", "killed by SIGKILL",
// "evicted: REASON").
inline constexpr const char* kDeadPrefix = "weft/elastic/dead/";

// Generates the job token, serves a TcpStore on an ephemeral port of
// 127.0.0.1 (authenticated with the token), starts options.nproc workers as
// ranks 0..nproc-1 of a one-node job and supervises them. Returns the
// launcher's exit code (LocalLauncher::run). Throws LaunchError when the
// launch cannot start. Elastic mode (options.elastic_min > 0): failures are
// recorded under kDeadPrefix and restarted (LocalLauncher), not published
// as the abort record.
// With store = "etcd://HOST:PORT[,...]/PREFIX" the store is that etcd
// cluster instead (under PREFIX/<a fresh job id>) and the launcher serves none.
int run_local(WorkerOptions options, const std::string& store = {});

// One node of a multi-node job (torchrun style: one `weft run` per node).
struct NodeOptions {
  int nnodes = 1;
  int node_rank = 0;  // 0..nnodes-1; node 0 serves the store
  // Elastic (--nnodes MIN:MAX) when > 0: nnodes is MAX, and the job starts
  // once MIN nodes have joined (all MAX, or MIN and then
  // WEFT_ELASTIC_SETTLE). The workers are elastic (WorkerOptions::
  // elastic_min/elastic_max over all nodes); a node that fails or stops
  // leaves the job without stopping the others (no abort record); a failed
  // worker is restarted by its own node's launcher.
  int nnodes_min = 0;
  // "host:port" of the store: node 0 binds it, every node connects to it.
  std::string master;
  // "etcd://HOST:PORT[,...]/PREFIX": the store is that etcd cluster (the same
  // on every node, a PREFIX of the job's own); no node serves one, and
  // master is not used.
  std::string store;
  // The job's shared secret: the same on every node (nodes cannot agree on
  // a fresh one before they can authenticate each other). Empty only with
  // allow_unauthenticated.
  std::string job_token;
  bool allow_unauthenticated = false;
  // How long to wait for every node to join (and, on node 0, for the store
  // to be reachable by the others).
  Timeout rendezvous_timeout = std::chrono::seconds(300);
};

// The job token in a file: its content without trailing whitespace.
// Throws LaunchError (exit code 2) naming the file when it cannot be read,
// is not a regular file (a directory, a FIFO: refused without blocking), or
// holds a token that check_job_token refuses.
std::string read_token_file(const std::string& path);
// Refuses (LaunchError, exit code 2) a job token that is empty, shorter
// than settings::kMinTokenBytes (16) or longer than 4096 bytes; `from` says
// where it came from ("the token file 'F'", "WEFT_JOB_TOKEN").
void check_job_token(const std::string& token, const std::string& from);

// Checks the WEFT_* variables that `weft run --env K=V` gives the workers
// (weft::settings declarations): throws LaunchError (exit code 2) naming an
// invalid one; an undeclared WEFT_ name gets a warning.
void check_worker_env(const std::vector<std::pair<std::string, std::string>>& env);

// Key prefix of the launchers' own records in the store.
inline constexpr const char* kLaunchPrefix = "weft-launch/";

// Runs this node's part of the job:
//  1. node 0 serves the store at options.master (authenticated with the
//     token); every node connects to it;
//  2. each launcher registers its node rank and its number of workers and
//     waits for all nodes; node I's ranks follow those of nodes 0..I-1
//     (ranks I*L .. I*L+L-1 when every node has L workers; uneven counts
//     are allowed); a node rank taken twice or a different --nnodes is an
//     error;
//  3. the workers run with WEFT_STORE = master, WEFT_NNODES, WEFT_NODE_RANK
//     and the local rank and size of this node;
//  4. the first failure anywhere is recorded under kAbortKey (first writer
//     wins); every launcher watches that record and stops its own workers
//     when it appears, and prints it when the job failed;
//  5. node 0 keeps serving the store until every node reported that its
//     workers ended (at most 60 s after its own).
// Returns the exit code: as run_local, or 1 when the workers were stopped
// because the job failed on another node.
int run_node(WorkerOptions options, NodeOptions node);

}  // namespace weft::launch
