// Liveness of the ranks of a World: a thread of its own per World sends a
// small authenticated UDP datagram to every peer every interval and notes
// when each peer's last one arrived; a peer silent for longer than the
// timeout is reported (the World aborts, naming it). Neither the training
// thread nor bulk data can starve it: the thread only sends, receives and
// compares clocks, and the datagrams travel on a socket of their own, not
// behind megabytes queued on a TCP stream (wire format: docs/PROTOCOL.md,
// "Heartbeats").
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/mutex.h"
#include "core/socket.h"
#include "weft/timeout.h"

namespace weft::comm {

struct HeartbeatOptions {
  int rank = 0;
  int size = 1;
  uint64_t world_id = 0;
  uint32_t generation = 0;
  std::string token;      // the job token: datagrams carry an HMAC-SHA256 keyed with it
  std::string listen_ip;  // the address the socket binds (the transport's)
  Timeout interval = std::chrono::milliseconds(500);
  Timeout timeout = std::chrono::seconds(4);
};

// What the heartbeat thread saw (counters since it was made; for tests and logs).
struct HeartbeatStats {
  uint64_t sent = 0;      // datagrams sent
  uint64_t received = 0;  // valid heartbeats received
  uint64_t dropped = 0;   // datagrams dropped: malformed, wrong MAC, other world, replayed
};

class Heartbeat {
 public:
  // The datagram's size on the wire (fixed).
  static constexpr size_t kDatagramBytes = 72;

  // The peers silent for longer than the timeout, with how long each has
  // been silent, the longest first. Called on the heartbeat thread, once.
  using OnSilent = std::function<void(const std::vector<std::pair<int, Timeout>>& silent)>;

  // Binds the socket (an ephemeral port on options.listen_ip). Throws
  // weft::Error when it cannot. Nothing is sent before start().
  Heartbeat(HeartbeatOptions options, std::function<bool()> alive, OnSilent on_silent);
  ~Heartbeat();  // stop()
  Heartbeat(const Heartbeat&) = delete;
  Heartbeat& operator=(const Heartbeat&) = delete;

  // "ip:port" of the socket, for the rank's record at rendezvous.
  std::string address() const;

  // Starts the thread. addresses[r] is rank r's heartbeat address; an empty
  // one (a rank that runs no heartbeat) is neither sent to nor watched.
  // Peers are watched while alive() returns true.
  void start(const std::vector<std::string>& addresses);

  // The peer closed its communicator: no longer watched.
  void departed(int peer);

  // Says goodbye to the peers (so that none declares this rank dead) and
  // joins the thread. Idempotent.
  void stop();

  HeartbeatStats stats() const;

  // How long `peer` has been silent: since its last heartbeat (or since
  // start()); nothing where it is not watched (this rank, no heartbeat,
  // departed) or before start() and after stop(). Any thread. The thread
  // keeps sending and listening after the World aborted, until stop(), so
  // during a recovery a live peer stays heard and a dead one falls silent.
  std::optional<Timeout> silent_for(int peer) const;

 private:
  enum class Type : uint16_t { Beat = 1, Goodbye = 2 };
  void loop();
  void send_all(Type type);
  void drain(std::chrono::steady_clock::time_point now);
  // Why a datagram is refused ("" when it is a valid heartbeat of this world).
  std::string check(const uint8_t* data, size_t n, int* src, Type* type, uint64_t* seq) const;
  bool stopping() const;

  const HeartbeatOptions options_;
  const std::function<bool()> alive_;
  const OnSilent on_silent_;
  net::Fd sock_;
  net::Fd wake_;  // eventfd: stop() wakes the thread
  net::SocketAddress local_;

  // Set by start() before the thread runs; then the thread's alone.
  std::vector<net::SocketAddress> peers_;
  std::vector<bool> watched_;
  std::vector<std::chrono::steady_clock::time_point> last_heard_;
  // last_heard_ as steady-clock nanoseconds, for silent_for() (made by
  // start(), then written by the thread).
  std::unique_ptr<std::atomic<int64_t>[]> heard_ns_;
  std::atomic<bool> started_{false};
  std::vector<uint64_t> last_seq_;
  uint64_t seq_ = 0;

  mutable Mutex mu_;
  std::vector<bool> departed_ GUARDED_BY(mu_);
  bool stop_ GUARDED_BY(mu_) = false;

  std::atomic<uint64_t> sent_{0}, received_{0}, dropped_{0};
  std::thread thread_;
};

}  // namespace weft::comm
