#include "comm/world.h"

#include <fmt/format.h>
#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <nlohmann/json.hpp>

#include "comm/rendezvous.h"
#include "core/bytes.h"
#include "core/describe.h"
#include "core/log.h"
#include "core/settings.h"
#include "core/socket.h"
#include "weft/errors.h"
#include "weft/types.h"

namespace weft::comm {

using transport::AbortKind;

namespace {

// How long shutdown waits for each transport to flush its goodbye (and
// queued acknowledgements): peers that still read take milliseconds; one
// that does not read any more must not hold the exit for long.
constexpr auto kGoodbyeLimit = std::chrono::seconds(2);
// How long writing the abort record to the store may take (its own thread):
// best effort, since the abort frames carry the same news to every
// connected peer; a store that does not answer within 2 s is gone.
constexpr Timeout kAbortRecordLimit = std::chrono::seconds(2);

std::string read_first_line(const char* path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

std::string local_hostname() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof buf - 1) != 0) return "unknown";
  return buf;
}

Timeout remaining_ms(const Deadline& d) {
  auto ms = std::chrono::duration_cast<Timeout>(d.remaining());
  return std::max(ms, Timeout(1));
}

// Why `member` cannot name a store key weft/evict/<member> ("" when it can).
std::string member_problem(const std::string& member) {
  if (member.size() > 128) return fmt::format("member id of {} bytes (at most 128)", member.size());
  for (char c : member) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '-' && c != '_') {
      return fmt::format("member id '{}' has a character other than letters, digits, '.', '-', '_'",
                         member);
    }
  }
  return {};
}

RankInfo parse_rank_info(int rank, const std::string& text) {
  try {
    auto j = nlohmann::json::parse(text);
    RankInfo info;
    info.address = j.at("address").get<std::string>();
    info.host_id = j.at("host_id").get<std::string>();
    info.hostname = j.at("hostname").get<std::string>();
    info.pid = j.value("pid", 0);
    info.shm_address = j.value("shm", std::string());
    info.shm_key = j.value("shm_key", std::string());
    info.heartbeat = j.value("hb", std::string());
    info.member = j.value("member", std::string());
    if (info.address.empty() || info.address.size() > 256 || info.host_id.size() > 512 ||
        info.hostname.size() > 256 || info.shm_address.size() > 100 || info.shm_key.size() > 128 ||
        info.heartbeat.size() > 256) {
      throw std::runtime_error("field out of bounds");
    }
    if (std::string why = member_problem(info.member); !why.empty()) throw std::runtime_error(why);
    if (!info.heartbeat.empty()) net::split_host_port(info.heartbeat, "hb");
    return info;
  } catch (const std::exception& e) {
    throw StoreError(fmt::format("the rendezvous record of rank {} is invalid ({}): '{}'", rank,
                                 e.what(), text.substr(0, 200)));
  }
}

}  // namespace

std::string default_host_id() {
  std::string boot = read_first_line("/proc/sys/kernel/random/boot_id");
  if (boot.empty()) boot = local_hostname();
  struct stat st {};
  std::string netns = "?";
  if (::stat("/proc/self/ns/net", &st) == 0) netns = std::to_string(st.st_ino);
  return boot + "/netns:" + netns;
}

World::World(int rank, int size, std::shared_ptr<Store> store, std::shared_ptr<Store> root_store,
             CommOptions options, uint32_t generation)
    : rank_(rank),
      size_(size),
      options_(std::move(options)),
      generation_(generation),
      store_(std::move(store)),
      root_store_(std::move(root_store)) {
  std::string ident = fmt::format("{}\n{}", options_.name, generation_);
  id_ = bytes::fnv1a64(ident.data(), ident.size());
}

std::shared_ptr<World> World::create(int rank, int size, std::shared_ptr<Store> store,
                                     CommOptions options, const std::string& store_host) {
  settings::validate_environment();  // every entry point refuses an invalid WEFT_* variable
  if (size < 1) throw InvalidArgument(fmt::format("world size must be at least 1 (got {})", size));
  if (rank < 0 || rank >= size) {
    throw InvalidArgument(
        fmt::format("rank {} is out of range for a world of size {}", rank, size));
  }
  if (!store) throw InvalidArgument("Communicator::create needs a store");
  if (options.job_token.empty() && !options.allow_unauthenticated) {
    throw InvalidArgument(
        "no job token: set WEFT_JOB_TOKEN (weft run does), or allow unauthenticated connections "
        "explicitly with WEFT_ALLOW_UNAUTHENTICATED=1");
  }
  if (options.job_token.empty()) {
    WEFT_WARN(
        "rank {}: running UNAUTHENTICATED (no job token): any process that reaches this "
        "job's ports can join it or inject data",
        rank);
  }
  if (options.name.empty() || options.name.find('/') != std::string::npos) {
    throw InvalidArgument(fmt::format("invalid communicator name '{}'", options.name));
  }
  const size_t ring = options.shm_ring_bytes;
  if (!transport::valid_shm_ring_bytes(ring)) {
    throw InvalidArgument(fmt::format(
        "shared-memory ring size {} (WEFT_SHM_RING) must be 0 or a power of two from 64K to 64M",
        ring));
  }
  if (std::string why = member_problem(options.member); !why.empty()) {
    throw InvalidArgument(fmt::format("WEFT_MEMBER is invalid: {}", why));
  }
  if (options.heartbeat_timeout.count() < 0 || options.heartbeat_interval.count() <= 0 ||
      (options.heartbeat_timeout.count() > 0 &&
       2 * options.heartbeat_interval > options.heartbeat_timeout)) {
    throw InvalidArgument(fmt::format(
        "the heartbeat interval ({}, WEFT_HEARTBEAT_INTERVAL) must be positive and at most half "
        "the heartbeat timeout ({}, WEFT_HEARTBEAT_TIMEOUT; 0 turns liveness off)",
        format_timeout(options.heartbeat_interval), format_timeout(options.heartbeat_timeout)));
  }
  const Deadline deadline = Deadline::after(options.timeout);
  uint32_t generation = options.generation;
  if (generation == 0) {
    // The k-th time these ranks create a communicator of this name, each of them gets generation k.
    int64_t joins =
        store->add(fmt::format("weft/{}/joins", options.name), 1, remaining_ms(deadline));
    generation = static_cast<uint32_t>((joins - 1) / size + 1);
  }
  auto prefixed =
      std::make_shared<PrefixStore>(fmt::format("weft/{}/g{}", options.name, generation), store);
  std::shared_ptr<World> w(
      new World(rank, size, prefixed, std::move(store), std::move(options), generation));
  w->bootstrap(store_host, deadline);
  return w;
}

std::string advertised_address(const CommOptions& options, const std::string& store_host) {
  std::string ip = options.address;
  if (ip.empty() && !options.ifname.empty()) ip = net::interface_address(options.ifname);
  if (ip.empty()) {
    ip = "127.0.0.1";
    if (!store_host.empty()) {
      auto addrs = net::resolve(store_host, 1);
      if (!addrs.front().is_loopback())
        ip = net::route_source_address(addrs.front());
      else if (addrs.front().family() == AF_INET6)
        ip = "::1";
    }
  }
  return ip;
}

void World::bootstrap(const std::string& store_host, const Deadline& deadline) {
  const std::string ip = advertised_address(options_, store_host);

  // Liveness first: the transports' events may reach it as soon as they exist.
  if (size_ > 1 && options_.heartbeat_timeout.count() > 0) {
    HeartbeatOptions ho;
    ho.rank = rank_;
    ho.size = size_;
    ho.world_id = id_;
    ho.generation = generation_;
    ho.token = options_.job_token;
    ho.listen_ip = ip;
    ho.interval = options_.heartbeat_interval;
    ho.timeout = options_.heartbeat_timeout;
    heartbeat_ = std::make_unique<Heartbeat>(
        ho, [this] { return error() == nullptr; },
        [this](const std::vector<std::pair<int, Timeout>>& silent) { declare_silent(silent); });
  }

  transport::EngineOptions eo;
  eo.spin = std::chrono::microseconds(settings::get(settings::kSpinUs));
  engine_ = std::make_unique<transport::Engine>(eo);

  transport::TcpOptions to;
  to.rank = rank_;
  to.size = size_;
  to.world_id = id_;
  to.generation = generation_;
  to.credentials = {options_.job_token, options_.allow_unauthenticated};
  to.sockets_per_peer = options_.sockets_per_peer;
  to.socket_buffer_bytes = options_.socket_buffer_bytes;
  to.max_unexpected_bytes = options_.max_unexpected_bytes;
  to.listen_ip = ip;
  to.handshake_timeout = std::min<Timeout>(options_.timeout, transport::kHandshakeLimit);

  // One set of upcalls for every transport.
  transport::TransportEvents ev;
  ev.on_peer_failure = [this](int peer, std::exception_ptr err) {
    std::string what;
    try {
      std::rethrow_exception(err);
    } catch (const std::exception& e) {
      what = e.what();
    }
    abort(err, AbortKind::PeerFailure, peer, fmt::format("rank {}: {}", rank_, what), true);
  };
  ev.on_abort = [this](int from, AbortKind kind, int failed_rank, std::string reason) {
    std::string host = failed_rank >= 0 && failed_rank < size_ ? hostname(failed_rank) : "?";
    // The reason names the rank that reported it ("rank 3: ... timed out ...").
    const std::string& text = reason;
    std::exception_ptr err;
    switch (kind) {
      case AbortKind::Timeout:
        err = std::make_exception_ptr(TimeoutError(text, failed_rank, ""));
        break;
      case AbortKind::Mismatch: err = std::make_exception_ptr(MismatchError(text)); break;
      case AbortKind::Aborted: {
        // The rank that aborted (the report may have been forwarded by another).
        int who = failed_rank >= 0 && failed_rank < size_ ? failed_rank : from;
        err = std::make_exception_ptr(PeerError(text, who, hostname(who), ""));
        break;
      }
      case AbortKind::PeerFailure:
      default: err = std::make_exception_ptr(PeerError(text, failed_rank, host, "")); break;
    }
    abort(err, kind, failed_rank, text, false);
  };
  ev.on_mismatch = [this](std::exception_ptr err) {
    std::string what;
    try {
      std::rethrow_exception(err);
    } catch (const std::exception& e) {
      what = e.what();
    }
    abort(err, AbortKind::Mismatch, -1, what, true);
  };
  ev.describe_op = [](const transport::OpDesc& d) {
    if (d.kind == 0) return std::string("send/recv");
    return describe_collective(static_cast<Collective>(d.kind), d.seq, static_cast<DType>(d.dtype),
                               d.count, static_cast<ReduceOp>(d.op), static_cast<int>(d.root),
                               static_cast<Algorithm>(d.flags));
  };
  ev.check_unexpected = [this](int peer, uint64_t comm_id, const transport::OpDesc& desc) {
    return check_unexpected(peer, comm_id, desc);
  };
  ev.on_peer_departed = [this](int peer) {
    // Also while the shared-memory set-up is still running (it keeps the
    // departure for when it is done).
    if (shm_) shm_->peer_departed(peer);
    if (heartbeat_) heartbeat_->departed(peer);
  };
  tcp_ = transport::make_tcp_transport(*engine_, to, ev);

  RankInfo me;
  me.address = tcp_->listen_address();
  me.host_id = options_.host_id.empty() ? default_host_id() : options_.host_id;
  me.hostname = local_hostname();
  me.pid = static_cast<int>(getpid());
  if (heartbeat_) me.heartbeat = heartbeat_->address();
  me.member = options_.member;
  if (options_.shm && size_ > 1) {
    // Listens now, so that its address goes into the rank record.
    transport::ShmOptions so;
    so.rank = rank_;
    so.size = size_;
    so.world_id = id_;
    so.generation = generation_;
    so.cma = options_.shm_single_copy;
    so.cma_min_bytes = options_.shm_single_copy_min_bytes;
    so.ring_bytes = options_.shm_ring_bytes;
    so.max_unexpected_bytes = options_.max_unexpected_bytes;
    so.handshake_timeout = to.handshake_timeout;
    shm_ = transport::make_shm_transport(*engine_, so, ev);
    me.shm_address = shm_->address();
    me.shm_key = shm_->key();
  }
  nlohmann::json j = {{"address", me.address}, {"host_id", me.host_id}, {"hostname", me.hostname},
                      {"pid", me.pid},         {"shm", me.shm_address}, {"shm_key", me.shm_key},
                      {"hb", me.heartbeat},    {"member", me.member}};
  store_->set(fmt::format("rank/{}", rank_), j.dump(), remaining_ms(deadline));
  WEFT_DEBUG("rank {}: listening on {} (host {})", rank_, me.address, me.host_id);

  std::vector<std::string> keys;
  for (int r = 0; r < size_; ++r) keys.push_back(fmt::format("rank/{}", r));
  wait_for_ranks(*store_, rank_, size_, deadline);  // reports who is missing
  ranks_.resize(static_cast<size_t>(size_));
  for (int r = 0; r < size_; ++r) {
    ranks_[static_cast<size_t>(r)] =
        r == rank_
            ? me
            : parse_rank_info(r, store_->get(keys[static_cast<size_t>(r)], remaining_ms(deadline)));
  }
  local_rank_ = 0;
  local_size_ = 0;
  for (int r = 0; r < size_; ++r) {
    if (ranks_[static_cast<size_t>(r)].host_id == me.host_id) {
      if (r < rank_) ++local_rank_;
      ++local_size_;
    }
  }
  // More ranks of this job on the host than CPUs it may run on: a waiter's
  // bounded poll would hold a CPU that the peer it waits for needs, so the
  // poll yields the CPU on every round instead.
  cpu_set_t cpus;
  if (sched_getaffinity(0, sizeof cpus, &cpus) == 0 && local_size_ > CPU_COUNT(&cpus)) {
    engine_->set_spin(std::chrono::microseconds(settings::get(settings::kSpinYieldUs)), true);
    WEFT_DEBUG("{} ranks on this host share {} CPUs: the bounded poll yields", local_size_,
               CPU_COUNT(&cpus));
  }
  std::vector<std::string> addresses, hosts;
  for (auto& ri : ranks_) {
    addresses.push_back(ri.address);
    hosts.push_back(ri.hostname);
  }
  tcp_->connect_all(addresses, hosts, deadline);
  add_transport(tcp_.get());
  route_.assign(static_cast<size_t>(size_), tcp_.get());
  connect_shm(me, deadline);
  if (heartbeat_) {
    std::vector<std::string> beats;
    std::vector<int> quiet;
    for (int r = 0; r < size_; ++r) {
      beats.push_back(ranks_[static_cast<size_t>(r)].heartbeat);
      if (r != rank_ && beats.back().empty()) quiet.push_back(r);
    }
    if (!quiet.empty()) {
      WEFT_INFO("rank {}: {} {} no heartbeat (WEFT_HEARTBEAT_TIMEOUT=0 there): not watched", rank_,
                quiet.size() == 1 ? "rank" : "ranks", format_ranks(quiet),
                quiet.size() == 1 ? "sends" : "send");
    }
    heartbeat_->start(beats);
  }
}

void World::connect_shm(const RankInfo& me, const Deadline& deadline) {
  if (!shm_) return;
  // A pair uses shared memory only when both ranks enabled it: every rank
  // decides from the same records, so the routes agree on both sides.
  std::vector<transport::LocalPeer> peers;
  for (int r = 0; r < size_; ++r) {
    const RankInfo& ri = ranks_[static_cast<size_t>(r)];
    if (r == rank_ || ri.host_id != me.host_id || ri.shm_address.empty()) continue;
    peers.push_back({r, ri.shm_address, ri.shm_key, ri.hostname});
  }
  shm_->connect_all(peers, deadline);
  if (peers.empty()) return;  // unused (kept: the progress thread may be looking at it)
  add_transport(shm_.get());
  for (const auto& p : peers) route_[static_cast<size_t>(p.rank)] = shm_.get();
}

std::string World::transport_names() const {
  std::string names;
  for (auto* t : transports()) {
    if (!names.empty()) names += '+';
    names += t->name();
  }
  return names;
}

transport::InboundStats World::inbound_stats() const {
  transport::InboundStats sum;
  for (auto* t : transports()) {
    const transport::InboundStats s = t->inbound_stats();
    sum.direct += s.direct;
    sum.held += s.held;
    sum.from_held += s.from_held;
    sum.discarded += s.discarded;
    sum.paused += s.paused;
    sum.goodbyes += s.goodbyes;
  }
  return sum;
}

World::~World() { shutdown(); }

void World::shutdown() {
  std::call_once(shutdown_once_, [this] { shutdown_once(); });
}

void World::shutdown_once() {
  {
    MutexLock lk(&exec_mu_);
    exec_stop_ = true;
  }
  exec_cv_.notify_all();
  bool healthy = error() == nullptr;
  if (tcp_) {
    // Operations still in flight fail here; peers see a goodbye, not a failure.
    {
      MutexLock lk(&error_mu_);
      if (!error_) {
        error_ = std::make_exception_ptr(
            AbortedError(fmt::format("rank {}: the communicator was destroyed", rank_)));
      }
    }
    for (auto* t : transports()) t->fail_all(error());
  }
  if (executor_.joinable()) executor_.join();
  if (tcp_) {
    if (!healthy) {
      // Repeat why this world broke before leaving, so that a peer that sees
      // the connection close has first learned the reason (on the same
      // connection), even if the original report has not reached it yet.
      MutexLock lk(&error_mu_);
      if (abort_known_) tcp_->broadcast_abort(abort_kind_, abort_culprit_, abort_reason_);
    }
    // The other transports first: the TCP goodbye must come last.
    for (auto it = transports().rbegin(); it != transports().rend(); ++it) {
      (*it)->close(Deadline::after(kGoodbyeLimit));
    }
  }
  // After the goodbye: a peer must not find this rank silent while it flushes.
  // Before the engine stops: a declaration in progress still aborts through it.
  if (heartbeat_) heartbeat_->stop();
  if (engine_) engine_->stop();
  shm_.reset();
  tcp_.reset();
  engine_.reset();
  if (abort_writer_.joinable()) abort_writer_.join();
  if (evict_writer_.joinable()) evict_writer_.join();
  heartbeat_.reset();
  keep_alive_.clear();
}

void World::start(const transport::RequestPtr& req) {
  transport::Transport& t = route(req->peer());
  if (req->is_send()) {
    t.isend(req);
  } else {
    t.irecv(req);
  }
}

void World::wait(const transport::RequestPtr& req, const Deadline& deadline) {
  if (!req->done()) {
    bool ok = engine_->wait([&] { return req->done(); }, deadline);
    if (!ok && !req->done()) fail_timeout(req->describe(), req->peer(), deadline.budget());
  }
  if (!req->ok()) std::rethrow_exception(req->error());
}

std::exception_ptr World::error() const {
  MutexLock lk(&error_mu_);
  return error_;
}

void World::throw_if_failed() const {
  auto e = error();
  if (e) std::rethrow_exception(e);
}

void World::abort(std::exception_ptr error, AbortKind kind, int culprit, const std::string& reason,
                  bool propagate) {
  bool first = false;
  {
    MutexLock lk(&error_mu_);
    if (!error_) {
      error_ = error;
      first = true;
      abort_known_ = true;
      abort_kind_ = kind;
      abort_culprit_ = culprit;
      abort_reason_ = reason;
    }
  }
  if (first) {
    WEFT_ERROR("rank {}: communicator '{}' (generation {}) aborted: {}", rank_, options_.name,
               generation_, reason);
    if (propagate && tcp_) {
      tcp_->broadcast_abort(kind, culprit, reason);
      std::string host = culprit >= 0 && culprit < size_ ? hostname(culprit) : "?";
      write_abort_record(
          fmt::format("rank {} (host {}): {} [reported by rank {}]", culprit, host, reason, rank_));
    }
  }
  // Also when already aborted: returns only once no request can be written to any more.
  for (auto* t : transports()) t->fail_all(this->error());
  if (engine_) engine_->wake();
}

void World::abort_with(std::exception_ptr error) {
  std::string what;
  AbortKind kind = AbortKind::Aborted;
  int culprit = rank_;
  try {
    std::rethrow_exception(error);
  } catch (const PeerError& e) {
    what = e.what();
    kind = AbortKind::PeerFailure;
    culprit = e.rank();
  } catch (const TimeoutError& e) {
    what = e.what();
    kind = AbortKind::Timeout;
    culprit = e.rank();
  } catch (const MismatchError& e) {
    what = e.what();
    kind = AbortKind::Mismatch;
    culprit = -1;
  } catch (const std::exception& e) {
    what = e.what();
  }
  abort(error, kind, culprit, what, true);
}

void World::write_abort_record(const std::string& record) {
  if (abort_writer_.joinable()) return;
  auto store = store_;
  abort_writer_ = std::thread([store, record] {
    try {
      store->compare_set("abort", std::nullopt, record, kAbortRecordLimit);
    } catch (const std::exception& e) {
      WEFT_DEBUG("could not write the abort record to the store: {}", e.what());
    }
  });
}

HeartbeatStats World::heartbeat_stats() const {
  return heartbeat_ ? heartbeat_->stats() : HeartbeatStats{};
}

std::optional<Timeout> World::silent_for(int peer) const {
  return heartbeat_ ? heartbeat_->silent_for(peer) : std::nullopt;
}

void World::declare_silent(const std::vector<std::pair<int, Timeout>>& silent) {
  const auto secs = [](Timeout t) { return static_cast<double>(t.count()) / 1000.0; };
  const int peer = silent.front().first;
  const std::string host = hostname(peer);
  std::string others;
  for (size_t i = 1; i < silent.size(); ++i) {
    others += fmt::format("{}rank {} (host {}) for {:.1f} s", others.empty() ? "" : ", ",
                          silent[i].first, hostname(silent[i].first), secs(silent[i].second));
  }
  const std::string msg = fmt::format(
      "rank {}: rank {} (host {}) silent for {:.1f} s: no heartbeat within {} "
      "(WEFT_HEARTBEAT_TIMEOUT); declared failed{}",
      rank_, peer, host, secs(silent.front().second), format_timeout(options_.heartbeat_timeout),
      others.empty() ? "" : fmt::format(" (also silent: {})", others));
  // Evicted first: the launcher that owns a silent process kills it, so that
  // it cannot come back and write (the key is the contract with `weft run`).
  std::vector<std::pair<std::string, std::string>> evictions;
  for (const auto& [r, t] : silent) {
    const std::string& member = ranks_[static_cast<size_t>(r)].member;
    if (member.empty()) continue;
    evictions.emplace_back("weft/evict/" + member,
                           fmt::format("silent for {:.1f} s (declared by rank {} on host {})",
                                       secs(t), rank_, hostname(rank_)));
  }
  if (!evictions.empty() && root_store_ && !evict_writer_.joinable()) {
    auto store = root_store_;
    const int me = rank_;
    evict_writer_ = std::thread([store, evictions, me] {
      for (const auto& [key, value] : evictions) {
        try {
          if (store->compare_set(key, std::nullopt, value, kAbortRecordLimit).swapped) {
            WEFT_WARN("rank {}: evicted: {} = '{}'", me, key, value);
          }
        } catch (const std::exception& e) {
          WEFT_WARN("rank {}: could not write the eviction {} to the store: {}", me, key, e.what());
        }
      }
    });
  }
  abort(std::make_exception_ptr(PeerError(msg, peer, host, "")), AbortKind::PeerFailure, peer, msg,
        true);
}

void World::fail_timeout(const std::string& op, int peer, Timeout waited) {
  std::string msg =
      fmt::format("rank {}: {} timed out after {} waiting for rank {} (host {})", rank_, op,
                  format_timeout(waited), peer, peer >= 0 && peer < size_ ? hostname(peer) : "?");
  auto err = std::make_exception_ptr(TimeoutError(msg, peer, op));
  abort(err, AbortKind::Timeout, peer, msg, true);
  std::rethrow_exception(err);
}

void World::begin_collective(uint64_t comm_id, const transport::OpDesc& desc) {
  {
    MutexLock lk(&active_mu_);
    active_[{comm_id, desc.seq}] = desc;
  }
  std::exception_ptr err;
  for (auto* t : transports()) {
    if (!err) err = t->find_conflict(comm_id, desc);
  }
  if (err) {
    end_collective(comm_id, desc.seq);
    abort_with(err);
    std::rethrow_exception(err);
  }
}

void World::end_collective(uint64_t comm_id, uint64_t seq) {
  MutexLock lk(&active_mu_);
  active_.erase({comm_id, seq});
}

std::exception_ptr World::check_unexpected(int peer, uint64_t comm_id,
                                           const transport::OpDesc& desc) {
  transport::OpDesc mine;
  {
    MutexLock lk(&active_mu_);
    auto it = active_.find({comm_id, desc.seq});
    if (it == active_.end() || it->second == desc) return nullptr;
    mine = it->second;
  }
  (void)peer;
  for (auto* t : transports()) {
    if (auto err = t->find_conflict(comm_id, mine)) return err;
  }
  return nullptr;
}

void World::submit(std::function<void()> task) {
  MutexLock lk(&exec_mu_);
  if (!executor_.joinable()) {
    executor_ = std::thread([this] { executor_loop(); });
  }
  exec_queue_.push_back(std::move(task));
  exec_cv_.notify_one();
}

void World::executor_loop() {
  pthread_setname_np(pthread_self(), "weft-collective");
  MutexLock lk(&exec_mu_);
  for (;;) {
    while (!exec_stop_ && exec_queue_.empty()) exec_cv_.wait();
    if (exec_queue_.empty()) return;  // stopping and drained
    auto task = std::move(exec_queue_.front());
    exec_queue_.pop_front();
    lk.unlock();
    task();  // tasks report their own errors through their Work
    lk.lock();
  }
}

}  // namespace weft::comm
