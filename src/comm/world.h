// A World: the ranks of one top-level communicator in one generation, and
// everything they share: the store, the progress engine, the transport
// connections, the host map, the failure state, and the thread that runs
// asynchronous collectives. Groups (communicators) are views on a World.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "comm/heartbeat.h"
#include "core/deadline.h"
#include "core/mutex.h"
#include "transport/engine.h"
#include "transport/request.h"
#include "transport/transport.h"
#include "weft/options.h"
#include "weft/store.h"

namespace weft::comm {

// What every rank publishes about itself at rendezvous.
struct RankInfo {
  std::string address;   // transport listen address, "ip:port"
  std::string host_id;   // ranks with the same host id share memory
  std::string hostname;  // for messages
  int pid = 0;
  // Shared memory: the abstract socket name and key of its shared-memory
  // transport (empty when the rank disabled shared memory).
  std::string shm_address;
  std::string shm_key;
  // The heartbeat socket, "ip:port" (empty when the rank runs no heartbeat:
  // WEFT_HEARTBEAT_TIMEOUT=0 there, or a world of one).
  std::string heartbeat;
  // WEFT_MEMBER of the process (empty when not set): the eviction key's name.
  std::string member;
};

// This process's host identity: WEFT_HOST_ID / options.host_id if set, else
// the boot id plus the network namespace inode (emulated hosts differ).
std::string default_host_id();

// The address a rank listens on and advertises: options.address, else
// that of options.ifname, else the local address that routes to
// `store_host` (the store's host; loopback when it is empty or loopback).
std::string advertised_address(const CommOptions& options, const std::string& store_host);

class World : public std::enable_shared_from_this<World> {
 public:
  // Rendezvous through the store and connect the full mesh. `store_host`
  // (optional) is the store's address, used to choose which local address
  // to advertise.
  static std::shared_ptr<World> create(int rank, int size, std::shared_ptr<Store> store,
                                       CommOptions options, const std::string& store_host = "");
  ~World();
  World(const World&) = delete;
  World& operator=(const World&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  uint32_t generation() const { return generation_; }
  uint64_t id() const { return id_; }
  const CommOptions& options() const { return options_; }
  const std::vector<RankInfo>& ranks() const { return ranks_; }
  const std::string& hostname(int rank) const { return ranks_[static_cast<size_t>(rank)].hostname; }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  Store& store() { return *store_; }
  const std::shared_ptr<Store>& world_store() const { return store_; }
  transport::Engine& engine() { return *engine_; }
  // The transport that carries the data between this rank and `peer`.
  transport::Transport& route(int peer) { return *route_[static_cast<size_t>(peer)]; }
  // Names of the transports in use ("tcp", "tcp+shm").
  std::string transport_names() const;
  // What became of the messages received so far, summed over the
  // transports (which path of the inbound logic each took; tests).
  transport::InboundStats inbound_stats() const;

  // Starts a point-to-point request (world ranks).
  void start(const transport::RequestPtr& req);

  // Waits for a request; on failure rethrows its error; on timeout fails it
  // with TimeoutError naming `op` and the peer, and aborts the world.
  void wait(const transport::RequestPtr& req, const Deadline& deadline);

  // ---- failure ----
  // The error that broke the world (null while healthy).
  std::exception_ptr error() const;
  void throw_if_failed() const;
  // Breaks the world with `error`: fails every pending and later request.
  // When `propagate`, peers are told (Abort frames) and an abort record is
  // written to the store so that every rank learns which rank failed.
  void abort(std::exception_ptr error, transport::AbortKind kind, int culprit,
             const std::string& reason, bool propagate);
  // Aborts (and propagates) because an operation failed with `error`; the
  // kind of abort and the culprit are taken from the error's type.
  void abort_with(std::exception_ptr error);
  // A timeout while waiting for `peer`: builds the TimeoutError and aborts.
  [[noreturn]] void fail_timeout(const std::string& op, int peer, Timeout waited);
  // What the heartbeat thread saw (zeros when it does not run).
  HeartbeatStats heartbeat_stats() const;
  // How long rank `peer` has been silent to this rank's liveness
  // (Heartbeat::silent_for: it keeps listening after an abort, until
  // shutdown); nothing without liveness or for a peer it does not watch.
  std::optional<Timeout> silent_for(int peer) const;

  // Fails what is still in flight (AbortedError), says goodbye to the peers,
  // stops the threads and closes the connections. Idempotent; the
  // destructor calls it.
  void shutdown();
  // Keeps `object` alive as long as the world (e.g. the store server rank 0 runs).
  void keep_alive(std::shared_ptr<void> object) { keep_alive_.push_back(std::move(object)); }

  // ---- collectives in progress (mismatch detection) ----
  // Registers the collective this rank is running on group comm_id; throws
  // (and aborts) if a peer already sent a message for it that disagrees.
  void begin_collective(uint64_t comm_id, const transport::OpDesc& desc);
  void end_collective(uint64_t comm_id, uint64_t seq);

  // ---- asynchronous collectives ----
  // Runs task on the collective thread, in submission order.
  void submit(std::function<void()> task);

 private:
  World(int rank, int size, std::shared_ptr<Store> store, std::shared_ptr<Store> root_store,
        CommOptions options, uint32_t generation);
  void bootstrap(const std::string& store_host, const Deadline& deadline);
  void executor_loop();
  void shutdown_once();
  std::exception_ptr check_unexpected(int peer, uint64_t comm_id, const transport::OpDesc& desc);
  void connect_shm(const RankInfo& me, const Deadline& deadline);
  void write_abort_record(const std::string& record);
  // The heartbeat thread found these peers silent past the timeout (the
  // longest silent first): evicts them and aborts the world naming the first.
  void declare_silent(const std::vector<std::pair<int, Timeout>>& silent);

  const int rank_;
  const int size_;
  const CommOptions options_;
  const uint32_t generation_;
  uint64_t id_ = 0;
  std::shared_ptr<Store> store_;       // prefixed: weft/<name>/g<generation>
  std::shared_ptr<Store> root_store_;  // unprefixed: weft/evict/<member>
  std::vector<RankInfo> ranks_;
  int local_rank_ = 0;
  int local_size_ = 1;

  std::unique_ptr<transport::Engine> engine_;
  // The mesh (TCP): every pair, control frames, failure detection.
  std::unique_ptr<transport::MeshTransport> tcp_;
  // Shared memory with the ranks of this host (null when none or disabled).
  std::unique_ptr<transport::LocalTransport> shm_;
  // Every transport, TCP first; route_[peer] is the one for that peer's data.
  // Published by a release store of the count: the progress thread may
  // read them (an abort) while the set-up adds shared memory.
  std::array<transport::Transport*, 2> transports_{};
  std::atomic<size_t> num_transports_{0};
  std::span<transport::Transport* const> transports() const {
    return {transports_.data(), num_transports_.load(std::memory_order_acquire)};
  }
  void add_transport(transport::Transport* t) {
    transports_[num_transports_.load(std::memory_order_relaxed)] = t;
    num_transports_.fetch_add(1, std::memory_order_release);
  }
  std::vector<transport::Transport*> route_;

  mutable Mutex error_mu_;
  std::exception_ptr error_ GUARDED_BY(error_mu_);
  // What the first abort said, repeated to the peers on shutdown.
  bool abort_known_ GUARDED_BY(error_mu_) = false;
  transport::AbortKind abort_kind_ GUARDED_BY(error_mu_) = transport::AbortKind::Aborted;
  int abort_culprit_ GUARDED_BY(error_mu_) = -1;
  std::string abort_reason_ GUARDED_BY(error_mu_);
  std::thread abort_writer_;  // writes the store record without blocking progress
  // Liveness (null when off or alone); made before the transports, whose
  // events may reach it, and stopped after their goodbye.
  std::unique_ptr<Heartbeat> heartbeat_;
  std::thread evict_writer_;  // writes weft/evict/<member> keys (heartbeat thread's declaration)

  Mutex active_mu_;
  std::map<std::pair<uint64_t, uint64_t>, transport::OpDesc> active_ GUARDED_BY(active_mu_);

  Mutex exec_mu_;
  CondVar exec_cv_{&exec_mu_};  // a task was queued, or exec_stop_ set
  std::deque<std::function<void()>> exec_queue_ GUARDED_BY(exec_mu_);
  bool exec_stop_ GUARDED_BY(exec_mu_) = false;
  std::thread executor_;
  std::once_flag shutdown_once_;
  std::vector<std::shared_ptr<void>> keep_alive_;
};

}  // namespace weft::comm
