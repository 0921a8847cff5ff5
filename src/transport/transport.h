// What the communicator layer sees of the transports: the interface of a
// transport that moves the data of requests between this rank and some of
// its peers, the events it reports upward, and the factories that make the
// two kinds the World uses. The communicator layer includes this header
// only, never tcp/ or shm/ (docs/ARCHITECTURE.md, "Layers").
//
// The mesh transport (TCP) connects every pair of ranks and also carries
// control frames (aborts, goodbyes) and failure detection; a local
// transport (shared memory between the ranks of one host; later UCX or
// CUDA) carries the data of the peers it was chosen for, and the World
// routes each request to the transport of its peer.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/auth.h"
#include "core/deadline.h"
#include "transport/request.h"

namespace weft::transport {

class Engine;

// Why a world is aborting, as told to the peers (the flags of an Abort
// frame on the wire, docs/PROTOCOL.md).
enum class AbortKind : uint16_t { PeerFailure = 1, Timeout = 2, Aborted = 3, Mismatch = 4 };

// Formats an operation descriptor for messages ("allreduce #3 of float32 x 1000...").
using DescribeOp = std::function<std::string(const OpDesc&)>;

// Upcalls into the communicator layer, one set for every transport. They
// run on the progress thread and must not block for long; a transport
// calls only those that apply to it.
struct TransportEvents {
  // A peer failed (connection reset or closed without goodbye, protocol
  // violation, a peer that vanished under a transfer). `error` is a PeerError.
  std::function<void(int peer, std::exception_ptr error)> on_peer_failure;
  // A peer reported that the world is aborting (mesh transport).
  std::function<void(int from, AbortKind kind, int failed_rank, std::string reason)> on_abort;
  // Two ranks disagree about an operation (MismatchError).
  std::function<void(std::exception_ptr error)> on_mismatch;
  // A collective's message arrived before its receive was posted: a
  // MismatchError if it contradicts the collective this rank runs.
  std::function<std::exception_ptr(int peer, uint64_t comm_id, const OpDesc& desc)>
      check_unexpected;
  // A peer closed its communicator (said goodbye on the mesh); called
  // before its pending requests on the mesh transport are failed.
  std::function<void(int peer)> on_peer_departed;
  // Formats an operation descriptor for mismatch messages.
  DescribeOp describe_op;
};

// What became of the messages a transport received (counted since it was
// made): which path of the inbound logic (inbound.h) each one took. For
// tests and diagnostics.
struct InboundStats {
  uint64_t direct = 0;     // went straight into a receive posted before it
  uint64_t held = 0;       // arrived first and was held ("unexpected")
  uint64_t from_held = 0;  // receives completed from a held message
  uint64_t discarded = 0;  // dropped (mismatch, failed peer or transport)
  uint64_t paused = 0;     // times reading stopped for want of budget
  uint64_t goodbyes = 0;   // peers that closed their communicator (mesh transport)
};

class Transport {
 public:
  virtual ~Transport() = default;

  // "tcp", "shm"...
  virtual const char* name() const = 0;

  // Starts a send / posts a receive (world ranks). Never blocks for long; a
  // request that cannot be started fails at once.
  virtual void isend(const RequestPtr& req) = 0;
  virtual void irecv(const RequestPtr& req) = 0;

  // Fails every pending request with `error` and every later one; returns
  // once no buffer of a failed request can be touched any more. When the
  // progress thread cannot be reached for that within kFailAllLimit, the
  // process ends (fatal log naming the transport): a request that may still
  // write into a caller's buffer is never left behind a returned call.
  virtual void fail_all(std::exception_ptr error) = 0;

  // A MismatchError if a message already received for the collective
  // (comm_id, desc.seq) carries another descriptor; else null.
  virtual std::exception_ptr find_conflict(uint64_t comm_id, const OpDesc& desc) = 0;

  // Graceful shutdown: flush what is queued, within the deadline.
  virtual void close(const Deadline& deadline) = 0;

  // The peer closed its communicator gracefully (said goodbye on the mesh,
  // after everything it sent on this transport): requests still pending
  // with it fail and the peer is reported failed; messages it sent before
  // leaving can still be received. Called on the progress thread.
  virtual void peer_departed(int peer) { (void)peer; }

  // What became of the messages received so far (thread-safe).
  virtual InboundStats inbound_stats() const = 0;
};

// The transport that connects every pair of ranks (TCP).
class MeshTransport : public Transport {
 public:
  // "ip:port" other ranks connect to.
  virtual std::string listen_address() const = 0;
  // Builds the full mesh: connects to every lower rank (addresses[r] is rank
  // r's listen_address(); hosts[r] its hostname for messages) and waits for
  // every higher rank to connect. Throws TimeoutError / ProtocolError /
  // PeerError when the mesh is not complete by the deadline.
  virtual void connect_all(const std::vector<std::string>& addresses,
                           const std::vector<std::string>& hosts, const Deadline& deadline) = 0;
  // Tells every connected peer that the world is aborting (best effort).
  virtual void broadcast_abort(AbortKind kind, int failed_rank, const std::string& reason) = 0;
};

// What a local peer published at rendezvous.
struct LocalPeer {
  int rank = -1;
  std::string address;  // its abstract socket name
  std::string key;      // its secret, read from the (authenticated) store
  std::string host;     // host name, for messages
};

// A transport between the ranks of one host (shared memory).
class LocalTransport : public Transport {
 public:
  // Published in the rank record: where peers connect and the key they
  // must present.
  virtual const std::string& address() const = 0;
  virtual const std::string& key() const = 0;
  // Sets up the transport with every peer (all on this host). Throws
  // ProtocolError / PeerError / TimeoutError if a pair cannot be set up by
  // the deadline.
  virtual void connect_all(const std::vector<LocalPeer>& peers, const Deadline& deadline) = 0;
};

// Longest a connection may take to complete its handshake (TCP, and each
// shared-memory set-up exchange), at most the communicator's timeout: a
// few round trips of a few hundred bytes, which take milliseconds; 10 s
// covers a loaded host and stops a stranger that connects and stays silent
// from holding a slot for longer.
inline constexpr Timeout kHandshakeLimit = std::chrono::seconds(10);

struct TcpOptions {
  int rank = 0;
  int size = 1;
  uint64_t world_id = 0;  // identifies the world (name + generation) in handshakes
  uint32_t generation = 0;
  auth::Credentials credentials;
  int sockets_per_peer = 1;
  size_t socket_buffer_bytes = 4u << 20;
  size_t max_unexpected_bytes = 256u << 20;
  // IP address to listen on ("127.0.0.1", "10.0.0.2", "::1"...).
  std::string listen_ip = "127.0.0.1";
  // How long an accepted connection may take to complete its handshake.
  Timeout handshake_timeout = kHandshakeLimit;
};

struct ShmOptions {
  int rank = 0;
  int size = 1;
  uint64_t world_id = 0;
  uint32_t generation = 0;
  // Allow single-copy transfers (process_vm_readv) where the kernel allows
  // them (WEFT_SHM_CMA). Off: everything goes through the rings.
  bool cma = true;
  // Messages of at least this many bytes may use single copy (when the
  // ring is busy or they are large; WEFT_SHM_CMA_MIN).
  size_t cma_min_bytes = 32u << 10;
  // Bytes of each ring (per direction and pair); 0: 1 MiB, less on hosts
  // with more than 8 ranks (WEFT_SHM_RING).
  uint64_t ring_bytes = 0;
  // Bytes of early messages held per peer (WEFT_MAX_UNEXPECTED).
  size_t max_unexpected_bytes = 256u << 20;
  // How long one set-up exchange may take.
  Timeout handshake_timeout = kHandshakeLimit;
};

// The TCP mesh, listening on options.listen_ip (tcp/tcp_transport.h).
std::unique_ptr<MeshTransport> make_tcp_transport(Engine& engine, TcpOptions options,
                                                  TransportEvents events);
// Shared memory with the ranks of this host, listening on a fresh abstract
// socket (shm/shm_transport.h).
std::unique_ptr<LocalTransport> make_shm_transport(Engine& engine, ShmOptions options,
                                                   TransportEvents events);
// Whether `bytes` is a valid shared-memory ring size (WEFT_SHM_RING): 0
// (automatic) or a power of two within the bounds of segment.h.
bool valid_shm_ring_bytes(uint64_t bytes);

}  // namespace weft::transport
