// The TCP transport: a full mesh of authenticated, non-blocking TCP
// connections between the ranks of one world, driven by an Engine.
//
// Messages are framed (frame.h) and matched on the receiving side by
// (communicator id, tag) in the order they were sent (per pair of ranks and
// tag). A receive that is posted before its message arrives gets the payload
// straight from the socket into its buffer; a message that arrives first is
// held in memory up to EngineOptions::max_unexpected_bytes per peer, and
// beyond that the connection stops reading until a receive is posted
// (back-pressure on the sender, never unbounded memory).
//
// Sends are written inline on the caller's thread when the connection is
// idle; what does not fit in the socket buffer is queued and written by the
// progress owner when the socket becomes writable.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/auth.h"
#include "core/mutex.h"
#include "core/socket.h"
#include "transport/engine.h"
#include "transport/inbound.h"
#include "transport/matching.h"
#include "transport/request.h"
#include "transport/tcp/frame.h"
#include "transport/transport.h"

namespace weft::transport::tcp {

using TcpOptions = transport::TcpOptions;
using TcpEvents = transport::TransportEvents;
using transport::AbortKind;

class TcpTransport : public MeshTransport {
 public:
  // Starts listening on options.listen_ip (ephemeral port).
  TcpTransport(Engine& engine, TcpOptions options, TcpEvents events);
  // Closes every connection (without goodbye: call close() first for a
  // graceful exit) and unregisters from the engine.
  ~TcpTransport() override;
  TcpTransport(const TcpTransport&) = delete;
  TcpTransport& operator=(const TcpTransport&) = delete;

  // "ip:port" other ranks connect to.
  std::string listen_address() const override;

  // Builds the full mesh: connects to every lower rank (addresses[r] is rank
  // r's listen_address(); hosts[r] its hostname for messages) and waits for
  // every higher rank to connect. Throws TimeoutError / ProtocolError /
  // PeerError when the mesh is not complete by the deadline.
  void connect_all(const std::vector<std::string>& addresses, const std::vector<std::string>& hosts,
                   const Deadline& deadline) override;

  // Starts a send / posts a receive. Never blocks for long (an inline
  // non-blocking write at most). A request on a failed or departed peer, or
  // after fail_all(), fails at once.
  const char* name() const override { return "tcp"; }
  void isend(const RequestPtr& req) override;
  void irecv(const RequestPtr& req) override;

  // A MismatchError if a message already received from some peer for the
  // collective (comm_id, desc.seq) carries another descriptor; else null.
  std::exception_ptr find_conflict(uint64_t comm_id, const OpDesc& desc) override;

  // Fails every pending request with `error` (the first error given wins)
  // and every later one too. Returns once no handler can touch the buffers
  // of the failed requests any more.
  void fail_all(std::exception_ptr error) override;
  // Sends an Abort frame to every connected peer (best effort).
  void broadcast_abort(AbortKind kind, int failed_rank, const std::string& reason) override;
  // Graceful goodbye to every peer (Bye frames, flushed within the deadline).
  void close(const Deadline& deadline) override;
  InboundStats inbound_stats() const override { return inbound_.stats(); }

  std::string host_of(int rank) const;
  int rank() const { return options_.rank; }
  int size() const { return options_.size; }
  const TcpOptions& options() const { return options_; }

 private:
  class Connection;
  class Listener;
  class Acceptor;
  struct Peer;
  struct Unexpected;
  friend class Connection;
  friend class Listener;
  friend class Acceptor;

  Connection* connection_for(Peer& peer, uint64_t tag);
  void attach(int peer_rank, int index, net::Fd fd);
  void on_accepted(net::Fd fd, std::string remote);
  void on_handshake_done(Acceptor* acceptor, bool ok);
  std::string check_hello(const auth::Hello& hello);
  // Fails the peer's requests and closes its connections; reports upward.
  void peer_failed(Peer& peer, const std::string& reason, bool report);
  void peer_said_bye(Peer& peer);
  void fail_all_in_progress();
  std::exception_ptr peer_error(const Peer& peer, const std::string& reason) const;
  // Delivers held messages to the receives that take them; reports mismatches.
  void deliver_held(Peer& peer,
                    std::vector<std::pair<RequestPtr, std::unique_ptr<Unexpected>>> ready);

  Engine& engine_;
  TcpOptions options_;
  TcpEvents events_;
  net::Fd listen_fd_;
  std::string listen_address_;
  std::shared_ptr<Listener> listener_;

  std::vector<std::unique_ptr<Peer>> peers_;  // indexed by rank; peers_[rank()] unused
  mutable Mutex hosts_mu_;
  std::vector<std::string> hosts_ GUARDED_BY(hosts_mu_);

  Mutex mesh_mu_;  // guards acceptors_ and connection attachment (Peer::conns)
  std::vector<std::shared_ptr<Acceptor>> acceptors_ GUARDED_BY(mesh_mu_);
  std::atomic<int> connections_ready_{0};

  FirstError first_error_;  // set by fail_all
  Inbound inbound_;         // the path of arriving messages, shared with shm
  bool fail_done_ = false;  // progress thread only
};

}  // namespace weft::transport::tcp
