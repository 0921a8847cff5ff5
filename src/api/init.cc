// weft::init(): reads the launcher's environment and builds the world.
#include "weft/init.h"

#include <fmt/format.h>

#include <numeric>

#include "api/access.h"
#include "comm/group.h"
#include "comm/world.h"
#include "core/auth.h"
#include "core/log.h"
#include "core/settings.h"
#include "core/socket.h"
#include "weft/errors.h"
#include "weft/store.h"

namespace weft {
namespace {

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
    env.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0, 0, kMaxRanks, false);
    env.local_size = env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1, 1, kMaxRanks, false);
  } else if (settings::get("SLURM_PROCID")) {
    env.launcher = "slurm";
    env.size = env_int("SLURM_NTASKS", 1, 1, kMaxRanks, true);
    env.rank = env_int("SLURM_PROCID", 0, 0, env.size - 1, true);
    env.local_rank = env_int("SLURM_LOCALID", 0, 0, kMaxRanks, false);
    if (settings::get("SLURM_NTASKS_PER_NODE")) {
      env.local_size = env_int("SLURM_NTASKS_PER_NODE", 1, 1, kMaxRanks, false);
    } else {
      env.local_size = slurm_first_node_tasks(settings::get_string("SLURM_TASKS_PER_NODE", "1"));
    }
  } else if (settings::get("RANK") && settings::get("WORLD_SIZE")) {
    env.launcher = "torchrun";
    env.size = env_int("WORLD_SIZE", 1, 1, kMaxRanks, true);
    env.rank = env_int("RANK", 0, 0, env.size - 1, true);
    env.local_rank = env_int("LOCAL_RANK", 0, 0, kMaxRanks, false);
    env.local_size = env_int("LOCAL_WORLD_SIZE", 1, 1, kMaxRanks, false);
  } else {
    env.launcher = "none";  // a world of one process
    return env;
  }
  if (auto store = settings::get("WEFT_STORE")) {
    auto [host, port] = net::split_host_port(*store, "WEFT_STORE");
    env.store_host = host;
    env.store_port = port;
    return env;
  }
  if (env.launcher == "weft") throw InvalidArgument("WEFT_STORE is not set (weft run sets it)");
  auto master = settings::get("MASTER_ADDR");
  auto master_port = settings::get("MASTER_PORT");
  if (!master || !master_port) {
    throw InvalidArgument(
        fmt::format("under {} Weft needs to know where rank 0 serves the rendezvous store: set "
                    "WEFT_STORE=HOST:PORT "
                    "(or MASTER_ADDR and MASTER_PORT)",
                    env.launcher));
  }
  int mport = env_int("MASTER_PORT", 0, 1, 65535, true);
  // torchrun's own agent listens on MASTER_PORT: Weft's store takes the next port.
  int def_port = env.launcher == "torchrun" ? mport + 1 : mport;
  if (def_port > 65535) def_port = mport - 1;
  env.store_host = *master;
  env.store_port = static_cast<uint16_t>(env_int("WEFT_STORE_PORT", def_port, 1, 65535, false));
  env.serve_store = true;
  return env;
}

std::shared_ptr<Communicator> init(CommOptions options) {
  settings::validate_environment();
  LaunchEnvironment env = detect_launch_environment();
  log::set_rank(env.rank);
  std::shared_ptr<Store> store;
  std::shared_ptr<TcpStoreServer> server;
  if (env.launcher == "none") {
    // One process on its own: nothing to rendezvous with.
    if (options.job_token.empty()) options.job_token = auth::generate_token();
    store = std::make_shared<MemoryStore>();
  } else {
    TcpStoreOptions so;
    so.timeout = settings::get(settings::kStoreTimeout);
    so.job_token = options.job_token;
    so.allow_unauthenticated = options.allow_unauthenticated;
    if (env.serve_store && env.rank == 0) {
      server = std::make_shared<TcpStoreServer>("", env.store_port, so);
      WEFT_INFO("serving the rendezvous store on port {}", server->port());
    }
    store = std::make_shared<TcpStore>(env.store_host, env.store_port, so);
  }
  auto world = comm::World::create(env.rank, env.size, store, std::move(options), env.store_host);
  if (server) world->keep_alive(server);
  std::vector<int> members(static_cast<size_t>(env.size));
  std::iota(members.begin(), members.end(), 0);
  auto group = std::make_shared<comm::Group>(world, std::move(members), world->id());
  return api::CommunicatorAccess::make(std::move(group), true);
}

}  // namespace weft
