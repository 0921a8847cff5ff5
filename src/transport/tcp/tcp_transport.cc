// The TCP transport: starting sends and posting receives.
#include "transport/tcp/connection.h"

namespace weft::transport::tcp {
namespace {

// How long reporting a mismatch found on the caller's thread (irecv) may
// wait for the progress thread. Best effort: the receive has already
// failed with the error, and its waiter aborts the world with it anyway.
constexpr auto kReportLimit = std::chrono::seconds(5);

}  // namespace

// ---------------------------------------------------------------------------
// Sending and receiving.

TcpTransport::Connection* TcpTransport::connection_for(Peer& peer, uint64_t tag) {
  size_t k = peer.conns.size();
  size_t idx = k == 1 ? 0 : static_cast<size_t>((tag ^ (tag >> 29) ^ (tag >> 47)) % k);
  return peer.conns[idx].get();
}

std::exception_ptr TcpTransport::peer_error(const Peer& peer, const std::string& reason) const {
  return std::make_exception_ptr(
      PeerError(fmt::format("rank {} (host {}) {}", peer.rank, host_of(peer.rank), reason),
                peer.rank, host_of(peer.rank), ""));
}

void TcpTransport::isend(const RequestPtr& req) {
  if (first_error_.failed()) {
    req->fail(first_error_.get());
    return;
  }
  Peer& peer = *peers_[static_cast<size_t>(req->peer())];
  {
    MutexLock lk(&peer.mu);
    if (peer.failed || peer.departed) {
      req->fail(request_peer_error(*req, host_of(peer.rank),
                                   peer.failed ? peer.failure : "has closed its communicator"));
      return;
    }
  }
  FrameHeader h;
  h.type = FrameType::Data;
  h.generation = options_.generation;
  h.src_rank = static_cast<uint32_t>(options_.rank);
  h.comm_id = req->comm_id();
  h.tag = req->tag();
  h.length = req->bytes();
  h.desc = req->desc;
  Connection* c = connection_for(peer, req->tag());
  if (c == nullptr || !c->send(req, h, {})) {
    req->fail(std::make_exception_ptr(
        PeerError(fmt::format("{}: connection to rank {} (host {}) is broken", req->describe(),
                              peer.rank, host_of(peer.rank)),
                  peer.rank, host_of(peer.rank), req->op_name)));
  }
  engine_.wake();
}

void TcpTransport::irecv(const RequestPtr& req) {
  if (first_error_.failed()) {
    req->fail(first_error_.get());
    return;
  }
  Peer& peer = *peers_[static_cast<size_t>(req->peer())];
  auto host = [&] { return host_of(peer.rank); };
  if (std::unique_ptr<Unexpected> matched = inbound_.post(peer, host, req)) {
    if (auto err = inbound_.deliver_held(req, *matched, peer.rank, host)) {
      if (events_.on_mismatch) {
        engine_.run_in_progress([this, err] { events_.on_mismatch(err); },
                                Deadline::after(kReportLimit));
      }
    }
  } else if (req->state() == Request::State::Failed) {
    return;  // refused (the peer failed or left)
  }
  for (auto& c : peer.conns) {
    if (c) c->resume_if_paused();
  }
  engine_.wake();
}

void TcpTransport::deliver_held(
    Peer& peer, std::vector<std::pair<RequestPtr, std::unique_ptr<Unexpected>>> ready) {
  // For each posted receive (oldest first), the oldest held message with
  // its key may now be complete.
  auto host = [&] { return host_of(peer.rank); };
  for (auto& [req, u] : ready) {
    if (auto err = inbound_.deliver_held(req, *u, peer.rank, host)) {
      if (events_.on_mismatch) events_.on_mismatch(err);
    }
  }
}

std::exception_ptr TcpTransport::find_conflict(uint64_t comm_id, const OpDesc& desc) {
  for (auto& p : peers_) {
    if (p->rank == options_.rank) continue;
    MutexLock lk(&p->mu);
    if (const Unexpected* u = p->q.find_conflict(comm_id, desc)) {
      return mismatch_error(options_.rank, desc, 0, p->rank, host_of(p->rank), u->header.desc,
                            u->header.length, events_.describe_op);
    }
  }
  return nullptr;
}

}  // namespace weft::transport::tcp
