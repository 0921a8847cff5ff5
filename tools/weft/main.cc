// The `weft` command:
//   weft run -n N [options] [--] PROGRAM [ARGS...]   start a job on this machine
//   weft run --nnodes K --node-rank I --master ADDR:PORT --nproc-per-node L
//            [options] [--] PROGRAM [ARGS...]        one node of a multi-node job
//   weft config                                      the WEFT_* settings
//   weft --version
// This file only parses the command line; launching lives in src/launch.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "core/log.h"
#include "core/settings.h"
#include "launch/run.h"
#include "weft/errors.h"
#include "weft/store.h"
#include "weft/version.h"

namespace {

constexpr const char* kRunFooter =
    R"(Single node: `weft run -n N PROG` starts N workers (ranks 0..N-1) and serves
the rendezvous store on 127.0.0.1 with a fresh job token.

Several nodes (torchrun style), one launcher per node:
  weft run --nnodes K --node-rank I --master ADDR:PORT --nproc-per-node L PROG
Node 0's launcher serves the store at ADDR:PORT (it binds that address);
every node's launcher and workers connect there, so ADDR must be an address
of node 0 that the other nodes reach. Node I's ranks follow those of nodes
0..I-1 (I*L .. I*L+L-1 when every node has L workers; nodes may have
different numbers). Every node must be given the same job token: set
WEFT_JOB_TOKEN in the launcher's environment or pass --token-file FILE (e.g.
made once with `head -c 32 /dev/urandom | base64 > FILE`), or pass
--allow-unauthenticated on a trusted network. When a worker fails on any
node, the first failure is recorded in the store and every node's launcher
stops its workers and prints it; node 0 keeps serving the store until the
other nodes' workers are done (at most 60 s).

Each worker gets the environment of the launcher, the --env variables, and:
  WEFT_RANK, WEFT_WORLD_SIZE       its rank and the number of ranks
  WEFT_LOCAL_RANK, WEFT_LOCAL_SIZE its rank and the number of ranks on this node
  WEFT_NNODES, WEFT_NODE_RANK      the number of nodes and this node's index
  WEFT_STORE                       host:port of the rendezvous store
  WEFT_JOB_TOKEN                   the job's secret (fresh for every single-node job)
  WEFT_MEMBER                      n<node>.s<slot>.r<restart>: this process incarnation
  WEFT_ELASTIC                     MIN:MAX (elastic jobs only)
Workers run in process groups of their own with stdin from /dev/null. When a
worker ends, what it started in its group is killed; orphans left when the
job ends are killed; if the launcher dies (even by SIGKILL) a guardian
process kills every worker's group. When a worker exits non-zero or is
killed, the others are stopped and weft run exits with its code (128 + signal
if killed; 1 on the nodes that stopped because the job failed on another
node). A worker whose key weft/evict/<WEFT_MEMBER> appears in the store is
killed (SIGKILL of its group). SIGINT, SIGTERM and SIGHUP are forwarded to
the workers; a second one kills them.

Elastic (single node): `weft run --elastic MIN:MAX [--max-restarts R] PROG`
starts MAX workers. A failed worker does not stop the others: weft run
writes weft/elastic/dead/<member>, then restarts its slot with a new
WEFT_MEMBER after a back-off (1 s, doubling, at most 30 s; a slot that failed
3 times within 60 s waits a 60 s cool-down) while the job has used fewer
than R restarts (default 3). Workers that exit 0 are not restarted; weft run
exits when all have exited: 0 if every slot's last run exited 0.

Elastic (several nodes): `weft run --nnodes MIN:MAX --node-rank I --master
ADDR:PORT --nproc-per-node L [--max-restarts R] PROG` on each node, I in
0..MAX-1 (each used once). The job starts when all MAX nodes have joined,
or MIN and then WEFT_ELASTIC_SETTLE (30 s); a node that comes later joins at
the workers' next step boundary. The workers are elastic over all nodes
(WEFT_ELASTIC is MIN*L:MAX*L); each node's launcher restarts its own failed
workers as above (R restarts per node). A node that fails or is stopped
leaves the job: nothing is recorded as the job's failure, and the others
form a generation without its workers (liveness names them within 5 s).
Node 0 serves the store: losing it ends the job on every node, unless the
store is an etcd cluster (--store etcd://...).

-n beyond the open-file limit (about 4 descriptors per worker) or above 64
workers per CPU (without --oversubscribe) is refused; more workers than CPUs
gives a warning. The embedded store holds at most WEFT_STORE_MAX_BYTES
(default 1G) of keys and values; a write above it is refused.)";

// "MIN:MAX" with 1 <= MIN <= MAX <= limit, or a single number N (N:N) when
// `single` is allowed. Throws LaunchError (exit code 2) naming the flag.
std::pair<int, int> parse_range(const std::string& flag, const std::string& text, bool single,
                                int limit) {
  auto number = [&](const std::string& part) {
    if (part.empty() || part.size() > 9 ||
        !std::all_of(part.begin(), part.end(), [](unsigned char c) { return std::isdigit(c); })) {
      throw weft::launch::LaunchError(
          flag + " " + text + ": '" + part + "' is not a number (expected MIN:MAX)", 2);
    }
    return std::stoi(part);
  };
  size_t colon = text.find(':');
  if (colon == std::string::npos && !single) {
    throw weft::launch::LaunchError(flag + " " + text + ": expected MIN:MAX, e.g. 2:4", 2);
  }
  int lo = number(text.substr(0, colon));
  int hi = colon == std::string::npos ? lo : number(text.substr(colon + 1));
  if (lo < 1) {
    throw weft::launch::LaunchError(flag + " " + text + ": the minimum must be at least 1", 2);
  }
  if (lo > hi) {
    throw weft::launch::LaunchError(
        flag + " " + text + ": the minimum is above the maximum (expected MIN <= MAX)", 2);
  }
  if (hi > limit) {
    throw weft::launch::LaunchError(
        flag + " " + text + ": the maximum is above " + std::to_string(limit), 2);
  }
  return {lo, hi};
}

struct RunArgs {
  weft::launch::WorkerOptions workers;
  std::string timeout;
  std::string log_level;
  double grace_seconds = 5;
  bool no_prefix = false;
  std::string bind = "auto";
  std::vector<std::string> env;
  // Multi-node.
  std::string nnodes = "1";
  int node_rank = 0;
  std::string elastic;
  int max_restarts = 3;
  bool oversubscribe = false;
  std::string master;
  std::string store;  // etcd://...
  int nproc_per_node = 0;
  std::string token_file;
  bool allow_unauthenticated = false;
  double rdzv_timeout = 300;
};

void add_run_options(CLI::App* run, RunArgs& a) {
  run->add_option("-n,--nproc", a.workers.nproc,
                  "Single node: number of worker processes to start (ranks 0..N-1)")
      ->type_name("N")
      ->check(CLI::Range(1, 1 << 20));
  run->add_option("--nproc-per-node", a.nproc_per_node,
                  "Multi-node: number of workers on this node")
      ->type_name("L")
      ->check(CLI::Range(1, 1 << 20));
  run->add_option("--nnodes", a.nnodes,
                  "Multi-node: number of nodes (one weft run on each); MIN:MAX: an elastic job "
                  "of --node-rank 0..MAX-1, started once MIN have joined, that goes on while "
                  "nodes fail, leave and join (workers restarted by their node's launcher, "
                  "--max-restarts per node)")
      ->type_name("K|MIN:MAX");
  run->add_option("--elastic", a.elastic,
                  "Single node: elastic job of MIN..MAX workers: MAX start, a failed worker is "
                  "restarted (with a new WEFT_MEMBER) while the others go on")
      ->type_name("MIN:MAX");
  run->add_option("--max-restarts", a.max_restarts,
                  "Elastic: restarts of failed workers allowed in the whole job")
      ->type_name("R")
      ->capture_default_str();
  run->add_flag("--oversubscribe", a.oversubscribe,
                "Start more than 64 workers per CPU anyway (refused otherwise), and do not warn "
                "about more workers than CPUs");
  run->add_option("--node-rank", a.node_rank, "Multi-node: this node's index, 0..K-1")
      ->type_name("I")
      ->check(CLI::Range(0, (1 << 16) - 1));
  run->add_option("--master", a.master,
                  "Multi-node: address and port of the rendezvous store, which node 0 serves")
      ->type_name("ADDR:PORT");
  run->add_option("--store", a.store,
                  "The rendezvous store is this etcd cluster (it survives the loss of any host; "
                  "give each job a PREFIX of its own) instead of one served by the launcher "
                  "(node 0's under --nnodes)")
      ->type_name("etcd://HOST:PORT[,HOST:PORT...]/PREFIX")
      ->check([](const std::string& s) -> std::string {
        try {
          weft::parse_etcd_url(s, "--store");
          return {};
        } catch (const weft::Error& e) {
          return e.what();
        }
      });
  run->add_option("--token-file", a.token_file,
                  "Multi-node: file holding the job token (the same on every node, at least 16 "
                  "bytes); default: WEFT_JOB_TOKEN of the launcher's environment")
      ->type_name("FILE");
  run->add_flag("--allow-unauthenticated", a.allow_unauthenticated,
                "Multi-node: run without a job token (any process that reaches the ports can "
                "join the job)");
  run->add_option("--rdzv-timeout", a.rdzv_timeout,
                  "Multi-node: seconds to wait for every node to join")
      ->type_name("SECONDS")
      ->capture_default_str()
      ->check(CLI::Range(0.001, 1e6));
  run->add_option("--timeout", a.timeout,
                  "Deadline of every communication call in the workers, in seconds "
                  "(exported as WEFT_TIMEOUT; default 300)")
      ->type_name("SECONDS")
      ->check([](const std::string& s) {
        return weft::settings::problem(weft::settings::kTimeout, s);
      });
  run->add_option("--log-level", a.log_level,
                  "Log level of the workers and of the launcher: trace, debug, info, warn, error "
                  "or off (exported as WEFT_LOG_LEVEL; default warn)")
      ->type_name("LEVEL")
      ->check([](const std::string& s) {
        return weft::settings::problem(weft::settings::kLogLevel, s);
      });
  run->add_flag("--no-prefix", a.no_prefix,
                "Do not prefix output lines with [RANK]: workers write straight to the launcher's "
                "stdout and stderr");
  run->add_option("--grace", a.grace_seconds,
                  "Seconds between SIGTERM (or a forwarded signal) and SIGKILL when stopping the "
                  "workers; 0 kills at once")
      ->type_name("SECONDS")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1e6));
  run->add_option("--bind", a.bind,
                  "CPU binding of the workers: auto binds each worker to its own equal share of "
                  "the launcher's CPUs when there are at least as many CPUs as workers on this "
                  "node (none otherwise); none leaves them unbound")
      ->type_name("auto|none")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "none"}));
  run->add_option("--env", a.env,
                  "Set an environment variable in every worker (repeatable; the last one wins)")
      ->type_name("K=V")
      ->allow_extra_args(false)
      ->check([](const std::string& kv) {
        size_t eq = kv.find('=');
        return eq == std::string::npos || eq == 0 ? "expected K=V, got '" + kv + "'"
                                                  : std::string();
      });
  run->add_option("PROGRAM", a.workers.command,
                  "The program to start (a path, or a name looked up in PATH) and its arguments; "
                  "put '--' before it if it starts with '-'")
      ->required()
      ->type_name("[ARGS...]");
  run->positionals_at_end();
  run->footer(kRunFooter);
}

int do_run(RunArgs& a, const CLI::App* run) {
  auto& w = a.workers;
  try {
    // The launcher's environment is the workers' too: refuse an invalid
    // WEFT_* variable now rather than in every worker.
    weft::settings::validate_environment();
  } catch (const weft::Error& e) {
    std::fprintf(stderr, "weft run: %s\n", e.what());
    return 2;
  }
  w.prefix_output = !a.no_prefix;
  w.bind = a.bind == "none" ? weft::launch::WorkerOptions::Bind::None
                            : weft::launch::WorkerOptions::Bind::Auto;
  w.grace = std::chrono::milliseconds(static_cast<int64_t>(a.grace_seconds * 1000 + 0.5));
  for (const auto& kv : a.env) {
    size_t eq = kv.find('=');
    w.env.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
  }
  if (!a.timeout.empty()) w.env.emplace_back("WEFT_TIMEOUT", a.timeout);
  if (!a.log_level.empty()) {
    w.env.emplace_back("WEFT_LOG_LEVEL", a.log_level);
    weft::log::set_level(weft::log::parse_level(a.log_level));
  }
  try {
    weft::launch::check_worker_env(w.env);
    w.oversubscribe = a.oversubscribe;
    auto [nodes_min, nodes_max] = parse_range("--nnodes", a.nnodes, true, 1 << 16);
    const bool has_elastic = run->count("--elastic") > 0;
    const bool has_restarts = run->count("--max-restarts") > 0;
    if (has_restarts && a.max_restarts < 0) {
      throw weft::launch::LaunchError(
          "--max-restarts " + std::to_string(a.max_restarts) + ": must be 0 or more", 2);
    }
    const bool elastic_nodes = a.nnodes.find(':') != std::string::npos;
    if (has_restarts && !has_elastic && !elastic_nodes) {
      throw weft::launch::LaunchError(
          "--max-restarts needs --elastic MIN:MAX (or --nnodes MIN:MAX)", 2);
    }
    const int nnodes = nodes_max;
    const bool multi = nnodes > 1 || !a.master.empty() || elastic_nodes;
    const bool has_n = run->count("--nproc") > 0;
    if (has_elastic) {
      if (multi) {
        throw weft::launch::LaunchError(
            "--elastic is for single-node jobs; an elastic multi-node job is --nnodes MIN:MAX "
            "with --nproc-per-node L",
            2);
      }
      auto [lo, hi] = parse_range("--elastic", a.elastic, false, 1 << 20);
      if (has_n && w.nproc != hi) {
        throw weft::launch::LaunchError("-n " + std::to_string(w.nproc) + " and --elastic " +
                                            a.elastic +
                                            " disagree: --elastic starts MAX workers (drop -n)",
                                        2);
      }
      if (a.nproc_per_node > 0) {
        throw weft::launch::LaunchError("--elastic and --nproc-per-node: give --elastic only", 2);
      }
      w.nproc = hi;
      w.elastic_min = lo;
      w.max_restarts = a.max_restarts;
      return weft::launch::run_local(std::move(w));
    }
    if (has_n && a.nproc_per_node > 0) {
      throw weft::launch::LaunchError("give either -n (one node) or --nproc-per-node, not both", 2);
    }
    if (!multi) {
      if (a.nproc_per_node > 0) w.nproc = a.nproc_per_node;
      if (!has_n && a.nproc_per_node == 0) {
        throw weft::launch::LaunchError("-n N (the number of workers) is required", 2);
      }
      if (a.node_rank != 0) throw weft::launch::LaunchError("--node-rank needs --nnodes", 2);
      return weft::launch::run_local(std::move(w), a.store);
    }
    if (has_n) {
      throw weft::launch::LaunchError(
          "-n is for single-node jobs: give each node's number of workers with --nproc-per-node",
          2);
    }
    if (a.nproc_per_node == 0) {
      throw weft::launch::LaunchError("a multi-node job needs --nproc-per-node L", 2);
    }
    if (a.master.empty() && a.store.empty()) {
      throw weft::launch::LaunchError(
          "a multi-node job needs --master ADDR:PORT (an address of node 0)", 2);
    }
    w.nproc = a.nproc_per_node;
    weft::launch::NodeOptions node;
    node.nnodes = nnodes;
    if (elastic_nodes) {
      if (a.node_rank >= nnodes) {
        throw weft::launch::LaunchError("--node-rank " + std::to_string(a.node_rank) +
                                            " is out of range for --nnodes " + a.nnodes + " (0.." +
                                            std::to_string(nnodes - 1) + ")",
                                        2);
      }
      node.nnodes_min = nodes_min;
      w.elastic_min = nodes_min * w.nproc;
      w.elastic_max = nodes_max * w.nproc;
      w.max_restarts = a.max_restarts;
    }
    node.node_rank = a.node_rank;
    node.master = a.master;
    node.store = a.store;
    node.allow_unauthenticated = a.allow_unauthenticated;
    node.rendezvous_timeout =
        std::chrono::milliseconds(static_cast<int64_t>(a.rdzv_timeout * 1000));
    if (!a.token_file.empty() && a.allow_unauthenticated) {
      throw weft::launch::LaunchError(
          "--token-file and --allow-unauthenticated contradict each other: give one", 2);
    }
    if (!a.token_file.empty()) {
      node.job_token = weft::launch::read_token_file(a.token_file);
    } else {
      node.job_token = weft::settings::get(weft::settings::kJobToken);
      if (!node.job_token.empty()) weft::launch::check_job_token(node.job_token, "WEFT_JOB_TOKEN");
    }
    return weft::launch::run_node(std::move(w), std::move(node));
  } catch (const weft::launch::LaunchError& e) {
    std::fprintf(stderr, "weft run: %s\n", e.what());
    return e.exit_code();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "weft run: %s\n", e.what());
    return 1;
  }
}

// `weft config`: a table of every setting with its current value; an
// invalid value is marked with the reason, and WEFT_ variables that are not
// settings are listed after the table. Exits 1 when any value is invalid.
int do_config() {
  struct Row {
    std::string env, value, def, doc;
  };
  std::vector<Row> rows{{"VARIABLE", "VALUE", "DEFAULT", "DESCRIPTION"}};
  int invalid = 0;
  for (const weft::settings::Setting* s : weft::settings::all()) {
    auto v = weft::settings::get(s->env);
    std::string value = !v ? "-" : (s->flags & weft::settings::kSecret) ? "(set, hidden)" : *v;
    std::string doc(s->doc);
    if (s->type == weft::settings::Type::Enum) {
      std::string choices(s->choices);
      std::replace(choices.begin(), choices.end(), '|', ' ');
      doc += ": " + choices;
    }
    if (v) {
      if (std::string why = weft::settings::problem(*s, *v); !why.empty()) {
        value += " (INVALID)";
        doc = "INVALID: " + why + "; " + doc;
        ++invalid;
      }
    }
    rows.push_back({std::string(s->env), value, weft::settings::default_text(*s), doc});
  }
  size_t w0 = 0, w1 = 0, w2 = 0;
  for (const auto& r : rows) {
    w0 = std::max(w0, r.env.size());
    w1 = std::max(w1, r.value.size());
    w2 = std::max(w2, r.def.size());
  }
  for (const auto& r : rows) {
    std::printf("%-*s  %-*s  %-*s  %s\n", static_cast<int>(w0), r.env.c_str(), static_cast<int>(w1),
                r.value.c_str(), static_cast<int>(w2), r.def.c_str(), r.doc.c_str());
  }
  for (const auto& name : weft::settings::unknown_variables()) {
    std::printf("unknown: %s is set but is not a Weft setting (ignored)\n", name.c_str());
  }
  std::fflush(stdout);
  if (invalid > 0) {
    std::fprintf(stderr, "weft config: %d invalid value%s\n", invalid, invalid == 1 ? "" : "s");
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Weft: run distributed training jobs.", "weft"};
  app.set_version_flag("--version", std::string("weft ") + weft::version());
  app.require_subcommand(1);

  RunArgs run_args;
  CLI::App* run =
      app.add_subcommand("run", "Start the worker processes of a job on this machine (or node)");
  add_run_options(run, run_args);
  CLI::App* config = app.add_subcommand(
      "config", "Print every WEFT_* setting: its value here, default and meaning");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  if (run->parsed()) return do_run(run_args, run);
  if (config->parsed()) return do_config();
  return 2;
}
