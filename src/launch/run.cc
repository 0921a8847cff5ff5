#include "launch/run.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "core/auth.h"
#include "core/deadline.h"
#include "core/log.h"
#include "core/settings.h"
#include "core/socket.h"
#include "launch/output_mux.h"
#include "weft/errors.h"
#include "weft/store.h"

namespace weft::launch {
namespace {

// Deadline of the launcher's own store calls (the abort record).
constexpr Timeout kAbortRecordTimeout = std::chrono::seconds(5);

std::string hostname() {
  char buf[HOST_NAME_MAX + 1] = {0};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "unknown";
  return buf;
}

void say(std::string_view text) { write_fully(STDERR_FILENO, fmt::format("weft run: {}\n", text)); }

// A stop signal (SIGINT, SIGTERM, SIGHUP) received while no worker runs
// yet: they are blocked (LocalLauncher), so take one without waiting.
int take_stop_signal() {
  sigset_t set;
  sigemptyset(&set);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&set, sig);
  timespec zero{0, 0};
  int sig = ::sigtimedwait(&set, nullptr, &zero);
  return sig > 0 ? sig : 0;
}

constexpr Timeout kPoll = std::chrono::milliseconds(500);
using Clock = std::chrono::steady_clock;

// Time left before d, at least 1 ms, at most `cap`.
Timeout left(const Deadline& d, Timeout cap = Timeout::max()) {
  auto t = std::chrono::duration_cast<Timeout>(d.remaining());
  return std::clamp(t, Timeout(1), cap);
}

std::string node_key(int node) { return fmt::format("{}node/{}", kLaunchPrefix, node); }
std::string done_key(int node) { return fmt::format("{}done/{}", kLaunchPrefix, node); }
// Elastic: a node's lease, a counter its launcher bumps every second.
std::string alive_key(int node) { return fmt::format("{}alive/{}", kLaunchPrefix, node); }

// Waits until every key exists, in short slices so that a stop signal ends
// the wait. Returns the keys still missing (empty: all there).
std::vector<std::string> wait_keys(Store& store, const std::vector<std::string>& keys,
                                   const Deadline& deadline, int* signal_out) {
  std::vector<std::string> missing = keys;
  while (!missing.empty() && !deadline.expired()) {
    if (int sig = take_stop_signal()) {
      *signal_out = sig;
      break;
    }
    try {
      store.wait({missing.front()}, left(deadline, kPoll));
      missing.erase(missing.begin());
    } catch (const TimeoutError&) {
    } catch (const StoreError&) {
      // Not reachable yet (node 0 may start later): retried within the deadline.
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  return missing;
}

// Elastic (--nnodes MIN:MAX): waits until every node has joined, or at
// least `min` have and WEFT_ELASTIC_SETTLE has passed since (a node that
// comes later joins through the workers' rendezvous), or the deadline.
// Returns the keys still missing.
std::vector<std::string> wait_elastic_nodes(Store& store, const std::vector<std::string>& keys,
                                            int min, const Deadline& deadline, int* signal_out) {
  const auto settle = settings::get(settings::kElasticSettle);
  std::optional<Deadline> settled;
  std::vector<std::string> missing = keys;
  while (!missing.empty() && !deadline.expired()) {
    if (int sig = take_stop_signal()) {
      *signal_out = sig;
      break;
    }
    try {
      std::vector<std::string> still;
      for (const auto& k : missing) {
        if (!store.try_get(k, left(deadline, kPoll))) still.push_back(k);
      }
      missing = std::move(still);
    } catch (const Error&) {
      // Not reachable, or slow to answer (a TimeoutError is no StoreError):
      // asked again within the deadline, as wait_keys does.
    }
    if (static_cast<int>(keys.size() - missing.size()) >= min) {
      if (!settled) settled = Deadline::after(settle);
      if (settled->expired()) break;
    }
    if (!missing.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return missing;
}

// Node 0 of an elastic job, after its own workers: serves the store until
// every other node that joined has said it is done, or its lease has not
// moved for 3 s (the node died, or cannot reach the store), at most 60 s.
void linger_elastic(Store& store, int nnodes, int* signal_out) {
  constexpr Timeout kCall = std::chrono::seconds(2);
  constexpr auto kLapsed = std::chrono::seconds(3);
  struct Lease {
    std::string value;
    Clock::time_point moved;
  };
  std::map<int, Lease> waiting;
  const auto start = Clock::now();
  try {
    for (int i = 1; i < nnodes; ++i) {
      if (store.try_get(node_key(i), kCall)) waiting[i] = {"", start};
    }
  } catch (const Error& e) {
    WEFT_DEBUG("launcher: store unreachable after the job: {}", e.what());
    return;
  }
  const Deadline deadline = Deadline::after(std::chrono::seconds(60));
  bool said = false;
  while (!waiting.empty() && !deadline.expired()) {
    if (int sig = take_stop_signal()) {
      *signal_out = sig;
      return;
    }
    const auto now = Clock::now();
    for (auto it = waiting.begin(); it != waiting.end();) {
      try {
        if (store.try_get(done_key(it->first), kCall)) {
          it = waiting.erase(it);
          continue;
        }
        std::string v = store.try_get(alive_key(it->first), kCall).value_or("");
        if (v != it->second.value) {
          it->second = {std::move(v), now};
        } else if (now - it->second.moved > kLapsed) {
          WEFT_DEBUG("launcher: node {}'s lease lapsed: not waited for", it->first);
          it = waiting.erase(it);
          continue;
        }
      } catch (const Error&) {
      }
      ++it;
    }
    if (!waiting.empty() && !said && now - start > std::chrono::seconds(2)) {
      say(fmt::format("waiting for {} other node(s) to finish (node 0 serves the store)",
                      waiting.size()));
      said = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  if (!waiting.empty() && deadline.expired()) {
    say(fmt::format("{} node(s) did not finish within 60 s; closing the store", waiting.size()));
  }
}

// A launcher's client of the job's store: the etcd cluster of an etcd://
// URL, or the TcpStore at host:port.
std::unique_ptr<Store> store_client(const std::string& url, const std::string& host, uint16_t port,
                                    const TcpStoreOptions& so) {
  if (!is_etcd_url(url)) return std::make_unique<TcpStore>(host, port, so);
  EtcdStoreOptions o = parse_etcd_url(url, "--store");
  o.timeout = so.timeout;
  return std::make_unique<EtcdStore>(o);
}

void connect_store(Store& store, Timeout timeout) {
  if (auto* tcp = dynamic_cast<TcpStore*>(&store)) tcp->connect(timeout);
  if (auto* etcd = dynamic_cast<EtcdStore*>(&store)) etcd->connect(timeout);
}

// Elastic: a worker that fails is recorded dead (kDeadPrefix + member), so
// that the others form a generation without it at once.
void record_member_deaths(LocalLauncher& launcher, const std::string& url, const std::string& host,
                          uint16_t port, TcpStoreOptions so) {
  so.timeout = kAbortRecordTimeout;
  launcher.on_member_failed([=](const WorkerExit& e) {
    store_client(url, host, port, so)->set(std::string(kDeadPrefix) + e.member, e.death());
  });
}

// On a node that does not serve the store: polls weft/evict/<member> for
// the live workers of `launcher` every kEvictPoll, in a thread of its own,
// and evicts those that have one.
constexpr Timeout kEvictCallTimeout = std::chrono::seconds(2);

class EvictionWatcher {
 public:
  // `store`: a client of the job's store whose calls end within kEvictCallTimeout.
  EvictionWatcher(LocalLauncher& launcher, std::unique_ptr<Store> store)
      : launcher_(launcher), store_(std::move(store)) {
    thread_ = std::thread([this] {
      Store& client = *store_;
      std::set<std::string> done;
      while (!stop_) {
        for (const auto& member : launcher_.live_members()) {
          if (stop_) break;
          if (done.count(member)) continue;
          try {
            if (auto reason = client.try_get(std::string(kEvictPrefix) + member)) {
              done.insert(member);
              launcher_.evict(member, *reason);
            }
          } catch (const Error& e) {
            WEFT_DEBUG("launcher: eviction poll: {}", e.what());
            break;  // the store is unreachable: try again next round
          }
        }
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait_for(lk, kEvictPoll, [this] { return stop_.load(); });
      }
    });
  }
  ~EvictionWatcher() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  EvictionWatcher(const EvictionWatcher&) = delete;
  EvictionWatcher& operator=(const EvictionWatcher&) = delete;

 private:
  LocalLauncher& launcher_;
  std::unique_ptr<Store> store_;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;
};

// Where this launcher serves the store, eviction keys are seen as they are
// written, without polling.
void watch_evictions(TcpStoreServer& server, LocalLauncher& launcher) {
  server.on_write(kEvictPrefix, [&launcher](const std::string& key, const std::string& value) {
    launcher.evict(key.substr(std::string_view(kEvictPrefix).size()), value);
  });
}

}  // namespace

void check_job_token(const std::string& token, const std::string& from) {
  constexpr size_t kMaxTokenBytes = 4096;
  if (token.empty()) throw LaunchError(fmt::format("{} is empty", from), 2);
  if (token.size() < static_cast<size_t>(settings::kMinTokenBytes)) {
    throw LaunchError(
        fmt::format("{} holds a job token of {} bytes: a token must have at least {} (e.g. made "
                    "with `head -c 32 /dev/urandom | base64`)",
                    from, token.size(), settings::kMinTokenBytes),
        2);
  }
  if (token.size() > kMaxTokenBytes) {
    throw LaunchError(fmt::format("{} is too long (> {} bytes)", from, kMaxTokenBytes), 2);
  }
}

std::string read_token_file(const std::string& path) {
  const std::string what = fmt::format("the token file '{}'", path);
  // O_NONBLOCK: a FIFO must not block the open; the type is checked next.
  net::Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (!fd.valid())
    throw LaunchError(fmt::format("cannot read {}: {}", what, net::errno_string(errno)), 2);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    throw LaunchError(fmt::format("cannot read {}: {}", what, net::errno_string(errno)), 2);
  }
  if (S_ISDIR(st.st_mode)) throw LaunchError(fmt::format("{} is a directory", what), 2);
  if (!S_ISREG(st.st_mode)) throw LaunchError(fmt::format("{} is not a regular file", what), 2);
  std::string token;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      throw LaunchError(fmt::format("cannot read {}: {}", what, net::errno_string(errno)), 2);
    }
    if (n == 0) break;
    token.append(buf, static_cast<size_t>(n));
    if (token.size() > 2 * sizeof buf) break;  // too long either way
  }
  while (!token.empty() && std::isspace(static_cast<unsigned char>(token.back()))) token.pop_back();
  check_job_token(token, what);
  return token;
}

void check_worker_env(const std::vector<std::pair<std::string, std::string>>& env) {
  for (const auto& [k, v] : env) {
    if (!k.starts_with("WEFT_")) continue;
    const settings::Setting* s = settings::find(k);
    if (s == nullptr) {
      WEFT_WARN("--env {}: {} is not a Weft setting (`weft config` lists them)", k, k);
      continue;
    }
    if (v.empty()) continue;  // empty: unset
    if (std::string why = settings::problem(*s, v); !why.empty()) {
      throw LaunchError(fmt::format("--env {}=...: {}", k, why), 2);
    }
  }
}

int run_local(WorkerOptions options, const std::string& store_url) {
  const int nproc = options.nproc;
  const bool elastic = options.elastic_min > 0;
  std::optional<EtcdStoreOptions> etcd;
  if (!store_url.empty()) {
    try {
      etcd = parse_etcd_url(store_url, "--store");
    } catch (const Error& e) {
      throw LaunchError(e.what(), 2);
    }
  }
  // First: it blocks the signals, which the store's thread then inherits.
  LocalLauncher launcher(std::move(options));

  TcpStoreOptions store_options;
  store_options.job_token = auth::generate_token();
  const std::string host = "127.0.0.1";
  // The launcher serves the store, unless it is an etcd cluster.
  std::unique_ptr<TcpStoreServer> server;
  if (!etcd) server = std::make_unique<TcpStoreServer>(host, 0, store_options);
  const uint16_t port = server ? server->port() : 0;
  // Evictions are seen as they are written where the store is served here.
  if (server) watch_evictions(*server, launcher);

  JobLayout job;
  job.world_size = nproc;
  job.store = net::join_host_port(host, port);
  if (etcd) {
    // A key space of this job's own under the given prefix.
    job.store = fmt::format("etcd://{}/{}/{}", fmt::join(etcd->endpoints, ","), etcd->prefix,
                            auth::generate_token().substr(0, 16));
  }
  job.job_token = store_options.job_token;
  // Without a store served here (etcd), evictions are polled for.
  std::unique_ptr<EvictionWatcher> evictions;
  if (!server) {
    TcpStoreOptions eo = store_options;
    eo.timeout = kEvictCallTimeout;
    evictions =
        std::make_unique<EvictionWatcher>(launcher, store_client(job.store, host, port, eo));
  }

  launcher.on_failure([&](const WorkerExit& e) {
    TcpStoreOptions client_options = store_options;
    client_options.timeout = kAbortRecordTimeout;
    auto client = store_client(job.store, host, port, client_options);
    Store& store = *client;
    store.compare_set(
        kAbortKey, std::nullopt,
        fmt::format("rank {} (host {}, pid {}) {}", e.rank, hostname(), e.pid, e.describe()));
  });
  if (elastic) record_member_deaths(launcher, job.store, host, port, store_options);
  const int code = launcher.run(job);
  if (etcd) {
    // The job's keys in etcd are of no use after it (best effort).
    try {
      EtcdStoreOptions o = parse_etcd_url(job.store, "--store");
      EtcdStore(o).clear(kAbortRecordTimeout);
    } catch (const Error& e) {
      WEFT_WARN("could not delete the job's keys from etcd: {}", e.what());
    }
  }
  return code;
}

}  // namespace weft::launch

namespace weft::launch {

int run_node(WorkerOptions options, NodeOptions node) {
  const int nproc = options.nproc;
  const bool elastic = node.nnodes_min > 0;
  if (node.nnodes < 1) throw LaunchError("--nnodes must be at least 1", 2);
  if (elastic && (node.nnodes_min > node.nnodes || options.elastic_min < 1 ||
                  options.elastic_max < options.elastic_min)) {
    throw LaunchError(fmt::format("--nnodes {}:{}: need 1 <= MIN <= MAX, and elastic workers",
                                  node.nnodes_min, node.nnodes),
                      2);
  }
  // What every node must have been started with.
  const std::string shape =
      elastic ? fmt::format("{}:{}", node.nnodes_min, node.nnodes) : std::to_string(node.nnodes);
  if (node.node_rank < 0 || node.node_rank >= node.nnodes) {
    throw LaunchError(
        fmt::format("--node-rank {} is out of range for --nnodes {}", node.node_rank, node.nnodes),
        2);
  }
  if (node.job_token.empty() && !node.allow_unauthenticated) {
    throw LaunchError(
        "a multi-node job needs the same job token on every node: set WEFT_JOB_TOKEN or pass "
        "--token-file FILE on every node, or pass --allow-unauthenticated",
        2);
  }
  std::pair<std::string, uint16_t> master;
  const bool etcd = !node.store.empty();
  try {
    if (etcd) parse_etcd_url(node.store, "--store");
    if (!etcd) master = net::split_host_port(node.master, "--master");
  } catch (const Error& e) {
    throw LaunchError(e.what(), 2);
  }
  if (!etcd && master.second == 0) throw LaunchError("--master needs a port other than 0", 2);
  if (etcd) node.master = node.store;  // for messages
  if (node.job_token.empty()) options.env.emplace_back("WEFT_ALLOW_UNAUTHENTICATED", "1");

  // First: it blocks the signals, which the store's threads then inherit.
  LocalLauncher launcher(std::move(options));
  const std::string me = hostname();

  TcpStoreOptions so;
  so.job_token = node.job_token;
  so.allow_unauthenticated = node.allow_unauthenticated;
  so.timeout = node.rendezvous_timeout;
  std::unique_ptr<TcpStoreServer> server;
  std::unique_ptr<EvictionWatcher> evictions;
  if (node.node_rank == 0 && !etcd) {
    try {
      server = std::make_unique<TcpStoreServer>(master.first, master.second, so);
    } catch (const Error& e) {
      throw LaunchError(
          fmt::format("cannot serve the rendezvous store at {}: {}", node.master, e.what()), 1);
    }
  }
  auto store_owner = store_client(node.store, master.first, master.second, so);
  Store& store = *store_owner;
  if (server) {
    watch_evictions(*server, launcher);
  } else {
    TcpStoreOptions eo = so;
    eo.timeout = kEvictCallTimeout;
    evictions = std::make_unique<EvictionWatcher>(
        launcher, store_client(node.store, master.first, master.second, eo));
  }

  // Launcher rendezvous: register, check the job's shape, wait for every node.
  const Deadline deadline = Deadline::after(node.rendezvous_timeout);
  auto call_timeout = [&] { return left(deadline); };
  int sig = 0;
  std::vector<std::string> keys;
  for (int i = 0; i < node.nnodes; ++i) keys.push_back(node_key(i));
  try {
    // Reach the store first (node 0 may come up later), in slices so that
    // a signal stops the wait.
    for (;;) {
      if ((sig = take_stop_signal()) != 0) return 128 + sig;
      try {
        connect_store(store, left(deadline, kPoll));
        break;
      } catch (const Error& e) {
        if (deadline.expired()) {
          throw LaunchError(
              fmt::format("cannot reach the rendezvous store at {} (node 0 serves it): {}",
                          node.master, e.what()),
              1);
        }
      }
    }
    auto nn = store.compare_set(fmt::format("{}nnodes", kLaunchPrefix), std::nullopt, shape,
                                call_timeout());
    if (!nn.swapped && nn.current != shape) {
      throw LaunchError(fmt::format("this node was started with --nnodes {} but another with "
                                    "--nnodes {}",
                                    shape, nn.current.value_or("?")),
                        2);
    }
    std::string mine = fmt::format("{} {} {}", nproc, ::getpid(), me);
    auto reg = store.compare_set(node_key(node.node_rank), std::nullopt, mine, call_timeout());
    if (!reg.swapped) {
      throw LaunchError(fmt::format("node rank {} is already taken (by '{}')", node.node_rank,
                                    reg.current.value_or("?")),
                        2);
    }
    auto missing = elastic ? wait_elastic_nodes(store, keys, node.nnodes_min, deadline, &sig)
                           : wait_keys(store, keys, deadline, &sig);
    if (sig != 0) {
      say(fmt::format("received {} while waiting for the other nodes", signal_name(sig)));
      return 128 + sig;
    }
    if (elastic && static_cast<int>(keys.size() - missing.size()) < node.nnodes_min) {
      throw LaunchError(
          fmt::format("only {} of at least {} nodes joined within {}", keys.size() - missing.size(),
                      node.nnodes_min, format_timeout(node.rendezvous_timeout)),
          1);
    }
    if (!missing.empty() && !elastic) {
      std::string which;
      for (auto& k : missing) which += (which.empty() ? "" : ", ") + k.substr(k.rfind('/') + 1);
      throw LaunchError(fmt::format("node(s) {} did not join within {}", which,
                                    format_timeout(node.rendezvous_timeout)),
                        1);
    }
  } catch (const LaunchError&) {
    throw;
  } catch (const Error& e) {
    throw LaunchError(fmt::format("rendezvous through {} failed: {}", node.master, e.what()), 1);
  }

  JobLayout job;
  job.nnodes = node.nnodes;
  job.node_rank = node.node_rank;
  job.store = node.master;
  job.job_token = node.job_token;
  job.world_size = 0;
  for (int i = 0; i < node.nnodes; ++i) {
    // (Elastic: the nodes that have joined; a later one joins the job
    // through the workers' rendezvous.)
    std::optional<std::string> record = store.try_get(keys[static_cast<size_t>(i)], call_timeout());
    if (!record && elastic) continue;
    if (!record) throw LaunchError(fmt::format("the record of node {} is gone", i), 1);
    const std::string& v = *record;
    int n = 0;
    if (std::sscanf(v.c_str(), "%d", &n) != 1 || n < 1) {
      throw LaunchError(fmt::format("invalid record of node {}: '{}'", i, v.substr(0, 80)), 1);
    }
    if (i < node.node_rank) job.first_rank += n;
    job.world_size += n;
  }
  WEFT_DEBUG("launcher: node {} of {}: ranks {}..{} of {}", node.node_rank, node.nnodes,
             job.first_rank, job.first_rank + nproc - 1, job.world_size);

  // Elastic: a failed worker is restarted here; nothing stops the other nodes.
  if (elastic) record_member_deaths(launcher, node.store, master.first, master.second, so);
  // The first failure anywhere is the job's (not elastic).
  std::atomic<bool> recorded{false};
  // A worker that exits with an error code is often failing because a peer
  // on another node died (PeerError): that node's launcher records the cause
  // a moment later. Give it that moment (1 s) before recording this exit as
  // the job's failure, so that every node names the rank that really failed.
  launcher.on_failure([&](const WorkerExit& e) {
    if (e.signal == 0 && node.nnodes > 1) {
      try {
        store.wait({kAbortKey}, std::chrono::seconds(1));
        return;  // recorded elsewhere first: the watcher announces it
      } catch (const Error&) {
      }
    }
    recorded = true;  // before the record exists: the watcher must not take it for another's
    auto r = store.compare_set(kAbortKey, std::nullopt,
                               fmt::format("rank {} (node {}, host {}, pid {}) {}", e.rank,
                                           node.node_rank, me, e.pid, e.describe()),
                               std::chrono::seconds(5));
    recorded = r.swapped;
  });
  // Watch for failures elsewhere (a store client of its own: calls on one
  // client are serialized).
  std::atomic<bool> done{false};
  std::thread watcher([&] {
    if (elastic) {
      // Nodes leave an elastic job on their own: no abort to watch for.
      // The lease instead, so that node 0 serves the store at the end for
      // as long as this node runs (its workers may still be joining).
      TcpStoreOptions lo = so;
      lo.timeout = kEvictCallTimeout;
      auto w = store_client(node.store, master.first, master.second, lo);
      for (uint64_t n = 1; !done; ++n) {
        try {
          w->set(alive_key(node.node_rank), std::to_string(n));
        } catch (const Error&) {
          // Unreachable for now (a link down): the lease lapses meanwhile.
        }
        for (int i = 0; i < 10 && !done; ++i) {
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
      }
      return;
    }
    auto w = store_client(node.store, master.first, master.second, so);
    while (!done) {
      try {
        w->wait({kAbortKey}, kPoll);
        if (!recorded) {
          launcher.stop("the job failed on another node: " + w->get(kAbortKey, kPoll), 1);
        }
        return;
      } catch (const Error&) {
        // No record yet, or the store is gone (node 0 ended): keep looking
        // until our workers are done.
        if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    }
  });
  int code = 1;
  try {
    code = launcher.run(job);
  } catch (...) {
    done = true;
    watcher.join();
    throw;
  }
  done = true;
  watcher.join();

  constexpr Timeout kShort = std::chrono::seconds(5);
  try {
    if (code != 0 && !recorded && !elastic) {
      // Stopped by a signal, or by another node's failure (then the record
      // exists and stays).
      store.compare_set(kAbortKey, std::nullopt,
                        fmt::format("node {} (host {}) stopped: weft run exits with code {}",
                                    node.node_rank, me, code),
                        kShort);
    }
    // Always the last word on a failed job: the stop message above may not
    // have named the cause (a local worker's error exit can come first).
    if (code != 0 && !elastic) {
      if (auto rec = store.try_get(kAbortKey, kShort)) say("job failed: " + *rec);
    }
    store.set(done_key(node.node_rank), std::to_string(code), kShort);
  } catch (const Error& e) {
    WEFT_DEBUG("launcher: store unreachable after the job: {}", e.what());
  }
  if (server && elastic) {
    linger_elastic(store, node.nnodes, &sig);
  } else if (server) {
    // Serve the store until the other nodes' workers are done with it.
    std::vector<std::string> others;
    for (int i = 1; i < node.nnodes; ++i) others.push_back(done_key(i));
    auto linger = Deadline::after(std::chrono::seconds(60));
    auto missing = wait_keys(store, others, Deadline::after(std::chrono::seconds(2)), &sig);
    if (!missing.empty() && sig == 0) {
      say(fmt::format("waiting for {} other node(s) to finish (node 0 serves the store)",
                      missing.size()));
      missing = wait_keys(store, missing, linger, &sig);
      if (!missing.empty() && sig == 0) {
        say(fmt::format("{} node(s) did not finish within 60 s; closing the store",
                        missing.size()));
      }
    }
  }
  return code;
}

}  // namespace weft::launch
