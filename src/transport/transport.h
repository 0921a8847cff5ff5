// What the communicator layer needs from a transport that moves the data
// of requests between this rank and some of its peers. The TCP transport
// connects every pair of ranks and also carries control frames (aborts,
// goodbyes) and failure detection; other transports (shared memory between
// the ranks of one host, later UCX or CUDA) carry the data of the peers
// they were chosen for, and the World routes each request to the transport
// of its peer.
#pragma once

#include <cstdint>
#include <exception>
#include <string>

#include "core/deadline.h"
#include "transport/request.h"

namespace weft::transport {

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
  // once no buffer of a failed request can be touched any more.
  virtual void fail_all(std::exception_ptr error) = 0;

  // A MismatchError if a message already received for the collective
  // (comm_id, desc.seq) carries another descriptor; else null.
  virtual std::exception_ptr find_conflict(uint64_t comm_id, const OpDesc& desc) = 0;

  // Graceful shutdown: flush what is queued, within the deadline.
  virtual void close(const Deadline& deadline) = 0;

  // The peer closed its communicator gracefully (said goodbye on the TCP
  // mesh, after everything it sent on this transport): requests still
  // pending with it fail and the peer is reported failed; messages it sent
  // before leaving can still be received. Called on the progress thread.
  virtual void peer_departed(int peer) { (void)peer; }
};

}  // namespace weft::transport
