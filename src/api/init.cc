// weft::init(): reads the launcher's environment and builds the world.
#include "weft/init.h"

#include <fmt/format.h>
#include <sys/socket.h>
#include <unistd.h>

#include <numeric>
#include <optional>

#include "api/access.h"
#include "api/launch_store.h"
#include "comm/group.h"
#include "comm/world.h"
#include "core/auth.h"
#include "core/launcher_watch.h"
#include "core/log.h"
#include "core/settings.h"
#include "core/socket.h"
#include "weft/errors.h"
#include "weft/store.h"

namespace weft {
namespace {

// A shell line that makes a token, for advice in messages.
constexpr const char* kMakeToken =
    "export WEFT_JOB_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')";

int env_int(const char* name, int def, int min, int max, bool required) {
  if (required && !settings::get(name)) {
    throw InvalidArgument(fmt::format("{} is not set", name));
  }
  return static_cast<int>(settings::get_int(name, def, min, max));
}

// Slurm's SLURM_TASKS_PER_NODE looks like "4(x2),3": tasks on the first node.
int slurm_first_node_tasks(const std::string& s) {
  int v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') break;
    v = v * 10 + (c - '0');
  }
  return v > 0 ? v : 1;
}

// The launcher's variables that give the rank count, for messages.
std::string size_variable(const std::string& launcher) {
  if (launcher == "mpirun") return "OMPI_COMM_WORLD_SIZE";
  if (launcher == "slurm") return "SLURM_NTASKS";
  if (launcher == "torchrun") return "WORLD_SIZE";
  return "WEFT_WORLD_SIZE";
}

// The first host of a Slurm hostlist: "node[07-09,12],gpu1" -> "node07".
std::string slurm_first_host(const std::string& list) {
  std::string host;
  bool bracket = false, in_range = false;
  for (char c : list) {
    if (!bracket && c == ',') break;
    if (c == '[') {
      bracket = true;
      continue;
    }
    if (bracket) {
      if (c == ']') {
        bracket = false;
        in_range = false;
      } else if (c == '-' || c == ',') {
        in_range = true;  // the rest of the range is other hosts
      } else if (!in_range) {
        host += c;
      }
      continue;
    }
    host += c;
  }
  return host;
}

// Two variables of one launcher that must agree.
void check_same(const char* a, int value, const char* b) {
  if (!settings::get(b)) return;
  int other = env_int(b, 0, 0, INT32_MAX, false);
  if (other != value) {
    throw InvalidArgument(
        fmt::format("the launcher's rank counts disagree: {}={} but {}={}", a, value, b, other));
  }
}

// How to give every rank the token under each launcher.
std::string token_advice(const std::string& launcher) {
  if (launcher == "mpirun") {
    return fmt::format(
        "no job token: every rank needs the same WEFT_JOB_TOKEN; under mpirun: {} and pass it "
        "with `mpirun -x WEFT_JOB_TOKEN ...` (or run unauthenticated with -x "
        "WEFT_ALLOW_UNAUTHENTICATED=1)",
        kMakeToken);
  }
  if (launcher == "slurm") {
    return fmt::format(
        "no job token: every rank needs the same WEFT_JOB_TOKEN; {} before srun (srun passes "
        "the environment on), or run unauthenticated with WEFT_ALLOW_UNAUTHENTICATED=1",
        kMakeToken);
  }
  return fmt::format(
      "no job token: every rank needs the same WEFT_JOB_TOKEN; {} before torchrun (the same "
      "token on every node), or run unauthenticated with WEFT_ALLOW_UNAUTHENTICATED=1",
      kMakeToken);
}

// Where to put the store, under each launcher.
std::string store_advice(const std::string& launcher) {
  if (launcher == "mpirun") {
    return "under mpirun Weft needs the address where rank 0 serves the rendezvous store: pass "
           "WEFT_STORE=HOST:PORT, HOST an address of rank 0's host (127.0.0.1 on one host) and "
           "PORT a free port, e.g. `mpirun -x WEFT_JOB_TOKEN -x WEFT_STORE=127.0.0.1:29500 ...` "
           "(or MASTER_ADDR and MASTER_PORT); rank 0 serves it there";
  }
  return fmt::format(
      "under {} Weft needs the address where rank 0 serves the rendezvous store: export "
      "WEFT_STORE=HOST:PORT, HOST an address of rank 0's host (the first node) and PORT a free "
      "port (or MASTER_ADDR and MASTER_PORT{}); rank 0 serves it there",
      launcher,
      launcher == "slurm" ? ", or leave them unset with SLURM_STEP_NODELIST set, as srun does"
                          : "");
}

// True when `host` names an address of this machine (one it can bind).
bool is_local_address(const net::SocketAddress& addr) {
  if (addr.is_loopback()) return true;
  net::Fd fd(::socket(addr.family(), SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return true;  // cannot tell: let the bind decide
  net::SocketAddress any = addr;
  if (addr.family() == AF_INET) {
    reinterpret_cast<sockaddr_in*>(&any.storage)->sin_port = 0;
  } else {
    reinterpret_cast<sockaddr_in6*>(&any.storage)->sin6_port = 0;
  }
  return ::bind(fd.get(), any.sa(), any.length) == 0 || errno != EADDRNOTAVAIL;
}

std::string this_host() {
  char buf[256] = {0};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "?";
  return buf;
}

// Rank 0 serves the store where the others will look for it.
std::shared_ptr<TcpStoreServer> serve_store(const LaunchEnvironment& env,
                                            const TcpStoreOptions& so) {
  const std::string where = net::join_host_port(env.store_host, env.store_port);
  std::vector<net::SocketAddress> addrs;
  try {
    addrs = net::resolve(env.store_host, env.store_port);
  } catch (const Error& e) {
    throw InvalidArgument(fmt::format("{}: rank 0 cannot resolve {}: {}", env.store_variable,
                                      env.store_host, e.what()));
  }
  bool local = false;
  for (const auto& a : addrs) local = local || is_local_address(a);
  if (!local) {
    throw InvalidArgument(fmt::format(
        "{} gives {} for the rendezvous store, which rank 0 serves, but {} is not an address of "
        "rank 0's host ({}): give an address of the host rank 0 runs on, or set "
        "WEFT_STORE_EXTERNAL=1 if a store already runs at {}",
        env.store_variable, where, env.store_host, this_host(), where));
  }
  // Every interface of the address's family: the others may reach this host
  // by another of its names.
  const std::string bind = addrs.front().family() == AF_INET6 ? "::" : "";
  try {
    return std::make_shared<TcpStoreServer>(bind, env.store_port, so);
  } catch (const Error& e) {
    throw StoreError(fmt::format(
        "rank 0 cannot serve the rendezvous store on port {} ({}): {}; is another job using "
        "that port? Give each job a port of its own",
        env.store_port, env.store_variable, e.what()));
  }
}

// Every rank of a job records the job's identity and size in the store: a
// rank of another job (given the same store address) or a rank count that
// disagrees is an error at once, not a wait until the deadline.
void check_job(Store& store, const LaunchEnvironment& env, const std::string& where) {
  const std::string mine = fmt::format("{} job {} size {}", env.launcher, env.job_id, env.size);
  // With a store of its own a job owns the key; a shared store (external)
  // keeps one key per job.
  // So does a job under an etcd prefix (etcd://HOSTS/PREFIX).
  const std::string key = env.serve_store || !env.store_url.empty()
                              ? "weft/launch/job"
                              : fmt::format("weft/launch/job/{}", env.job_id);
  auto r = store.compare_set(key, std::nullopt, mine);
  if (r.swapped || r.current == mine) return;
  const std::string theirs = r.current.value_or("?");
  const std::string prefix = fmt::format("{} job {} ", env.launcher, env.job_id);
  if (theirs.rfind(prefix, 0) == 0) {
    throw InvalidArgument(fmt::format(
        "the launcher's rank counts disagree: this rank has {}={} but a rank of the same job that "
        "joined the store at {} first has '{}'",
        size_variable(env.launcher), env.size, where, theirs));
  }
  throw InvalidArgument(fmt::format(
      "the rendezvous store at {} ({}) belongs to another job ('{}'; this is '{}'): two jobs were "
      "given the same store address; give each job {} of its own",
      where, env.store_variable, theirs, mine,
      env.store_url.empty() ? "a port" : "an etcd PREFIX (etcd://HOSTS/PREFIX)"));
}

// The etcd cluster of WEFT_STORE=etcd://...: a client of every endpoint,
// checked to answer (and, outside weft run, to hold no other job's keys).
std::shared_ptr<Store> connect_etcd(const LaunchEnvironment& env, Timeout timeout) {
  EtcdStoreOptions o = parse_etcd_url(env.store_url, "WEFT_STORE");
  o.timeout = timeout;
  auto etcd = std::make_shared<EtcdStore>(o);
  WEFT_INFO("connecting to the rendezvous store: etcd at {} (WEFT_STORE)",
            fmt::join(o.endpoints, ", "));
  try {
    etcd->connect();
  } catch (const StoreError& e) {
    throw StoreError(fmt::format("rank {}: cannot reach the etcd cluster of WEFT_STORE: {}",
                                 env.rank, e.what()));
  }
  if (env.launcher != "weft") check_job(*etcd, env, env.store_url);
  return etcd;
}

}  // namespace

LaunchEnvironment detect_launch_environment() {
  LaunchEnvironment env;
  constexpr int kMaxRanks = 1 << 20;
  if (settings::get("WEFT_RANK")) {
    env.launcher = "weft";
    env.size = env_int("WEFT_WORLD_SIZE", 1, 1, kMaxRanks, true);
    env.rank = env_int("WEFT_RANK", 0, 0, env.size - 1, true);
    env.local_rank = env_int("WEFT_LOCAL_RANK", 0, 0, kMaxRanks, false);
    env.local_size = env_int("WEFT_LOCAL_SIZE", 1, 1, kMaxRanks, false);
  } else if (settings::get("OMPI_COMM_WORLD_RANK")) {
    env.launcher = "mpirun";
    env.size = env_int("OMPI_COMM_WORLD_SIZE", 1, 1, kMaxRanks, true);
    env.rank = env_int("OMPI_COMM_WORLD_RANK", 0, 0, env.size - 1, true);
    env.local_size = env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1, 1, env.size, false);
    env.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0, 0, env.local_size - 1, false);
    check_same("OMPI_COMM_WORLD_SIZE", env.size, "OMPI_MCA_orte_ess_num_procs");
    env.job_id = settings::get_string("OMPI_MCA_ess_base_jobid",
                                      settings::get_string("PMIX_NAMESPACE", "?"));
  } else if (settings::get("SLURM_PROCID")) {
    env.launcher = "slurm";
    env.size = env_int("SLURM_NTASKS", 1, 1, kMaxRanks, true);
    env.rank = env_int("SLURM_PROCID", 0, 0, env.size - 1, true);
    check_same("SLURM_NTASKS", env.size, "SLURM_NPROCS");
    check_same("SLURM_NTASKS", env.size, "SLURM_STEP_NUM_TASKS");
    if (settings::get("SLURM_NTASKS_PER_NODE")) {
      env.local_size = env_int("SLURM_NTASKS_PER_NODE", 1, 1, kMaxRanks, false);
    } else {
      env.local_size = slurm_first_node_tasks(settings::get_string("SLURM_TASKS_PER_NODE", "1"));
    }
    env.local_rank = env_int("SLURM_LOCALID", 0, 0, kMaxRanks, false);
    env.job_id = fmt::format("{}.{}", settings::get_string("SLURM_JOB_ID", "?"),
                             settings::get_string("SLURM_STEP_ID", "?"));
  } else if (settings::get("RANK") && settings::get("WORLD_SIZE")) {
    env.launcher = "torchrun";
    env.size = env_int("WORLD_SIZE", 1, 1, kMaxRanks, true);
    env.rank = env_int("RANK", 0, 0, env.size - 1, true);
    env.local_size = env_int("LOCAL_WORLD_SIZE", 1, 1, env.size, false);
    env.local_rank = env_int("LOCAL_RANK", 0, 0, env.local_size - 1, false);
    // The agent's store address tells concurrent jobs apart.
    env.job_id = fmt::format("{}@{}:{}", settings::get_string("TORCHELASTIC_RUN_ID", "?"),
                             settings::get_string("MASTER_ADDR", "?"),
                             settings::get_string("MASTER_PORT", "?"));
  } else {
    env.launcher = "none";  // a world of one process
    return env;
  }
  const bool external = settings::get(settings::kStoreExternal);
  if (auto store = settings::get("WEFT_STORE"); store && is_etcd_url(*store)) {
    auto etcd = parse_etcd_url(*store, "WEFT_STORE");
    std::tie(env.store_host, env.store_port) =
        net::split_host_port(etcd.endpoints.front(), "WEFT_STORE");
    env.store_url = *store;
    env.store_variable = "WEFT_STORE";
    return env;  // an etcd cluster: nobody serves it
  }
  if (auto store = settings::get("WEFT_STORE")) {
    auto [host, port] = net::split_host_port(*store, "WEFT_STORE");
    env.store_host = host;
    env.store_port = port;
    env.store_variable = "WEFT_STORE";
    // Under weft run the launcher serves it; elsewhere rank 0 does, unless
    // a store already runs there.
    env.serve_store = env.launcher != "weft" && !external;
    return env;
  }
  if (env.launcher == "weft") throw InvalidArgument("WEFT_STORE is not set (weft run sets it)");
  if (external) {
    throw InvalidArgument(
        "WEFT_STORE_EXTERNAL=1 says a store already runs at WEFT_STORE, but WEFT_STORE is not set");
  }
  auto master = settings::get("MASTER_ADDR");
  auto master_port = settings::get("MASTER_PORT");
  if (env.launcher == "slurm" && !master) {
    // Rank 0 runs on the step's first node (srun's block and cyclic
    // distributions); the port comes from the job and step ids, so that
    // steps and jobs sharing a node differ, unless WEFT_STORE_PORT says.
    const char* list_var = settings::get("SLURM_STEP_NODELIST")  ? "SLURM_STEP_NODELIST"
                           : settings::get("SLURM_JOB_NODELIST") ? "SLURM_JOB_NODELIST"
                                                                 : "SLURM_NODELIST";
    std::string first = slurm_first_host(settings::get_string(list_var, ""));
    if (first.empty()) throw InvalidArgument(store_advice(env.launcher));
    const int64_t job = settings::get_int("SLURM_JOB_ID", 0, 0, INT64_MAX);
    const int64_t step = settings::get_int("SLURM_STEP_ID", 0, 0, INT64_MAX);
    const int derived = 20000 + static_cast<int>((job * 7 + step) % 10000);
    env.store_host = first;
    env.store_port = static_cast<uint16_t>(env_int("WEFT_STORE_PORT", derived, 1, 65535, false));
    env.store_variable = fmt::format("{} (first node) and {}", list_var,
                                     settings::get("WEFT_STORE_PORT")
                                         ? "WEFT_STORE_PORT"
                                         : "a port from SLURM_JOB_ID and SLURM_STEP_ID");
    env.serve_store = true;
    return env;
  }
  if (!master || !master_port) throw InvalidArgument(store_advice(env.launcher));
  int mport = env_int("MASTER_PORT", 0, 1, 65535, true);
  // torchrun's agent serves its own (c10d) store on MASTER_PORT under its
  // static rendezvous (TORCHELASTIC_USE_AGENT_STORE=True): Weft's store takes
  // the next port. Under c10d rendezvous MASTER_PORT is free for Weft.
  const bool agent_holds_port =
      env.launcher == "torchrun" &&
      settings::get_string("TORCHELASTIC_USE_AGENT_STORE", "True") != std::string_view("False");
  int def_port = agent_holds_port ? mport + 1 : mport;
  if (def_port > 65535) def_port = mport - 1;
  env.store_host = *master;
  env.store_port = static_cast<uint16_t>(env_int("WEFT_STORE_PORT", def_port, 1, 65535, false));
  env.store_variable = settings::get("WEFT_STORE_PORT") ? "MASTER_ADDR and WEFT_STORE_PORT"
                                                        : "MASTER_ADDR and MASTER_PORT";
  env.serve_store = true;
  return env;
}

std::shared_ptr<Store> connect_launch_store(const LaunchEnvironment& env, CommOptions& options,
                                            std::shared_ptr<TcpStoreServer>* server) {
  if (env.launcher == "none") {
    // One process on its own: nothing to rendezvous with.
    if (options.job_token.empty()) options.job_token = auth::generate_token();
    return std::make_shared<MemoryStore>();
  }
  if (env.launcher != "weft" && options.job_token.empty() && !options.allow_unauthenticated) {
    throw InvalidArgument(token_advice(env.launcher));
  }
  if (!env.store_url.empty()) {
    // WEFT_STORE names an etcd cluster: nobody serves the store.
    return connect_etcd(env, settings::get(settings::kStoreTimeout));
  }
  TcpStoreOptions so;
  so.timeout = settings::get(settings::kStoreTimeout);
  so.job_token = options.job_token;
  so.allow_unauthenticated = options.allow_unauthenticated;
  const std::string where = net::join_host_port(env.store_host, env.store_port);
  if (env.serve_store && env.rank == 0) {
    *server = serve_store(env, so);
    WEFT_INFO("serving the rendezvous store on port {} ({})", (*server)->port(), where);
  }
  auto tcp = std::make_shared<TcpStore>(env.store_host, env.store_port, so);
  const std::string who = env.launcher == "weft" ? "served by weft run"
                          : env.serve_store      ? "served by rank 0"
                                                 : "served outside the job: WEFT_STORE_EXTERNAL=1";
  WEFT_INFO("connecting to the rendezvous store at {} ({}, {})", where, env.store_variable, who);
  try {
    tcp->connect();
  } catch (const StoreError& e) {
    throw StoreError(
        fmt::format("rank {}: cannot reach the rendezvous store at {} ({}, {}): {}{}", env.rank,
                    where, env.store_variable, who, e.what(),
                    env.serve_store ? "; is rank 0 running, on the host that address names?" : ""));
  }
  if (env.launcher != "weft") check_job(*tcp, env, where);
  return tcp;
}

std::shared_ptr<Communicator> init(CommOptions options) {
  settings::validate_environment();
  LaunchEnvironment env = detect_launch_environment();
  log::set_rank(env.rank);
  std::shared_ptr<TcpStoreServer> server;
  // While this rank waits at rendezvous it watches its launcher.
  std::optional<rendezvous::LauncherWatch> watch;
  if (env.launcher != "none") watch.emplace(env.launcher);
  auto store = connect_launch_store(env, options, &server);
  auto world = comm::World::create(env.rank, env.size, store, std::move(options), env.store_host);
  watch.reset();
  if (server) world->keep_alive(server);
  std::vector<int> members(static_cast<size_t>(env.size));
  std::iota(members.begin(), members.end(), 0);
  auto group = std::make_shared<comm::Group>(world, std::move(members), world->id());
  return api::CommunicatorAccess::make(std::move(group), true);
}

}  // namespace weft
