// The shared-memory transport: carries the data between the ranks of one
// host (same host id, both with shared memory enabled) once the TCP mesh is
// up; TCP keeps carrying control frames and detecting dead peers.
//
// Each pair of local ranks shares one segment (segment.h) with a ring per
// direction. Set-up (connect_all): the higher rank connects to the lower
// rank's abstract Unix-domain socket, proves it read the lower rank's key
// from the store, and passes its eventfd; the lower rank creates the
// segment as a sealed memfd and passes it and its own eventfd back; both
// then close the descriptors they no longer need. Nothing has a name in
// /dev/shm, so a killed process leaves nothing behind.
//
// Messages: a message shorter than ShmOptions::cma_min_bytes, one of up to
// half the ring that fits into the ring's free space at once, or any
// message when single copy is not possible, is copied into the ring and out
// of it on the receiving side (in pieces when it is larger than the ring;
// a receive with a consumer, Request::consume, uses it in the ring).
// Others are sent as a descriptor of the sender's buffer; the receiver
// copies it straight into the posted receive with process_vm_readv (one
// copy; in pieces through a staging buffer for a consumer) and acknowledges
// it, which completes the send. Whether each
// direction may use single copy is probed at set-up (ptrace rules,
// seccomp, WEFT_SHM_CMA=0).
//
// Matching is the TCP transport's (matching.h): per peer by (comm id, tag),
// FIFO per tag, early messages held within max_unexpected_bytes (beyond
// that the ring is not read until a receive is posted), MismatchError on
// disagreeing sizes or descriptors.
//
// Progress: rings are polled by the engine (Engine::add_poller) on every
// progress round and during its bounded spin; a waiter that is going to
// block announces it in shared memory, and only then do peers signal its
// eventfd (at most one system call per wake-up; none while it polls).
//
// Every value read from shared memory is validated before use (positions,
// record headers, lengths); a violation fails the peer with a clear error.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/deadline.h"
#include "core/mutex.h"
#include "core/socket.h"
#include "transport/engine.h"
#include "transport/inbound.h"
#include "transport/matching.h"
#include "transport/request.h"
#include "transport/shm/segment.h"
#include "transport/transport.h"

namespace weft::transport::shm {

using ShmOptions = transport::ShmOptions;
using ShmEvents = transport::TransportEvents;
using ShmPeer = transport::LocalPeer;

class ShmTransport : public LocalTransport {
 public:
  // Listens on a fresh abstract socket and makes the eventfd.
  ShmTransport(Engine& engine, ShmOptions options, ShmEvents events);
  // Unregisters from the engine and unmaps every segment. Requests must
  // have completed or failed (fail_all).
  ~ShmTransport() override;
  ShmTransport(const ShmTransport&) = delete;
  ShmTransport& operator=(const ShmTransport&) = delete;

  // Published in the rank record: the socket name and the key a peer must
  // present.
  const std::string& address() const override { return address_; }
  const std::string& key() const override { return key_; }

  // Sets up a segment with every peer (all on this host): connects to the
  // lower ranks, then accepts the higher ones. Strangers (wrong key, world,
  // generation, version) are refused with a log line. Throws
  // ProtocolError / PeerError / TimeoutError if a pair cannot be set up by
  // the deadline. Then registers with the engine (not when `peers` is
  // empty: the transport is then unused).
  void connect_all(const std::vector<ShmPeer>& peers, const Deadline& deadline) override;

  // Whether large messages to `peer` go by single copy (tests, logs).
  bool single_copy_to(int peer) const;

  const char* name() const override { return "shm"; }
  void isend(const RequestPtr& req) override;
  void irecv(const RequestPtr& req) override;
  void fail_all(std::exception_ptr error) override;
  std::exception_ptr find_conflict(uint64_t comm_id, const OpDesc& desc) override;
  // Flushes queued acknowledgements within the deadline.
  void close(const Deadline& deadline) override;
  void peer_departed(int peer) override;
  InboundStats inbound_stats() const override { return inbound_.stats(); }

 private:
  struct Peer;
  struct Unexpected;
  struct SendOp;
  class Poll;
  class Wake;
  enum class WriteResult { Done, Partial, Corrupt };

  Peer* peer_for(int rank) const;
  // The peer of a new request, or null after failing the request (the
  // transport failed, or that rank is not reached through shared memory).
  Peer* admit(const RequestPtr& req);
  void connect_to(const ShmPeer& peer, const Deadline& deadline);
  bool accept_one(const std::vector<ShmPeer>& peers, const Deadline& deadline);
  void attach(std::unique_ptr<Peer> peer);

  // Progress (engine thread).
  int poll_all();
  bool prepare_block();
  void after_block();
  int poll_in(Peer& p);
  int flush(Peer& p);
  bool begin_data(Peer& p);
  void finish_data(Peer& p);
  void on_cma(Peer& p, const RecordHeader& h, const CmaBody& body);
  void on_ack(Peer& p, uint64_t send_id);
  void release_tail(Peer& p);
  void run_deferred();
  void fail_all_in_progress();
  // Fails everything with the peer; reports upward (deferred) if `report`.
  void peer_failed(Peer& p, const std::string& reason, bool report);
  void violation(Peer& p, const std::string& why);

  // Any thread.
  bool submit(Peer& p, SendOp op);
  // out_mu held (annotated on the definition).
  WriteResult write_some(Peer& p, SendOp& op);
  // Whether a message that may go by single copy goes through the ring
  // instead (small enough, and room for it now). out_mu held.
  bool fits_now(Peer& p, const SendOp& op);
  void signal(Peer& p, std::atomic<uint32_t>& sleeping);
  // Completes a receive with a held message: copies it, or reads it from
  // the sender and acknowledges it (`now`: here, on the progress thread;
  // else queued for it); fails it on a mismatch (reported).
  void deliver(Peer& p, const RequestPtr& req, Unexpected& u, bool now);
  // Performs the single-copy reads queued by irecv().
  int run_reads(Peer& p);
  // Reads a single-copy message into req's buffer and acknowledges it; if
  // the sender's memory cannot be read, or the sender gave up the send
  // meanwhile (`cancels` moved), stalls req instead.
  void read_remote(Peer& p, const RequestPtr& req, uint64_t address, uint64_t send_id,
                   uint64_t cancels);
  // Leaves req pending until the world fails (which names the real cause)
  // or, after a grace period, fails it and the peer with `why`.
  void stall(Peer& p, const RequestPtr& req, const std::string& why);
  // Runs a report on the progress thread (from any thread).
  void report(std::function<void()> fn);
  // Reports a MismatchError upward (on_mismatch), through report().
  void report_mismatch(std::exception_ptr error);
  std::exception_ptr peer_error(const Peer& p, const std::string& reason) const;

  Engine& engine_;
  ShmOptions options_;
  ShmEvents events_;
  net::Fd listen_fd_;
  std::string address_;
  std::string key_;
  std::shared_ptr<Wake> wake_;
  std::shared_ptr<Poll> poller_;
  bool registered_ = false;
  std::shared_ptr<std::atomic<bool>> alive_ = std::make_shared<std::atomic<bool>>(true);
  // Random bytes a peer reads with process_vm_readv to probe single copy.
  alignas(64) uint8_t probe_[32] = {};

  std::vector<std::unique_ptr<Peer>> peers_;  // by world rank; null unless local
  std::vector<Peer*> local_;                  // the non-null ones

  // Departures reported (by TCP, on the progress thread) before
  // connect_all() is done are applied when it is.
  Mutex setup_mu_;
  bool ready_ GUARDED_BY(setup_mu_) = false;
  std::vector<int> early_departures_ GUARDED_BY(setup_mu_);

  // Where single-copy pieces for a consumer land (Request::consume):
  // progress thread only.
  std::unique_ptr<uint8_t[]> stage_;
  FirstError first_error_;                       // set by fail_all
  Inbound inbound_;                              // the path of arriving messages, shared with tcp
  bool fail_done_ = false;                       // progress thread only
  std::vector<std::function<void()>> deferred_;  // progress thread only
};

}  // namespace weft::transport::shm
