// The TCP transport, failures and control: a failed or departed peer,
// failing everything (fail_all), abort frames, the goodbye.
#include "transport/tcp/connection.h"

namespace weft::transport::tcp {

void TcpTransport::peer_failed(Peer& peer, const std::string& reason, bool report) {
  std::vector<RequestPtr> failed;
  {
    MutexLock lk(&peer.mu);
    if (peer.failed) return;
    peer.failed = true;
    peer.failure = reason;
    failed = peer.q.clear();
  }
  auto error_for = [&](const Request& r) {
    return request_peer_error(r, host_of(peer.rank), "failed: " + reason);
  };
  for (auto& c : peer.conns) {
    if (c) c->kill(error_for);
  }
  for (auto& r : failed) r->fail(error_for(*r));
  engine_.wake();
  if (report && !first_error_.failed() && events_.on_peer_failure) {
    events_.on_peer_failure(peer.rank, peer_error(peer, "failed: " + reason));
  }
}

void TcpTransport::peer_said_bye(Peer& peer) {
  bool pending = false;
  {
    MutexLock lk(&peer.mu);
    // Data sent before the goodbye precedes it on each connection: the peer
    // has left once every one of its connections said goodbye.
    if (++peer.byes < static_cast<int>(peer.conns.size())) return;
    peer.departed = true;
    pending = !peer.q.posted.empty();
  }
  WEFT_DEBUG("rank {} closed its communicator", peer.rank);
  inbound_.note_goodbye();
  if (events_.on_peer_departed) events_.on_peer_departed(peer.rank);
  if (pending)
    peer_failed(peer, "closed its communicator while operations with it were pending", true);
}

void TcpTransport::fail_all(std::exception_ptr error) {
  first_error_.set(error);
  // Runs on the progress thread, so that no handler is filling a buffer of a
  // request while it fails; returns once done (by this call or an earlier one).
  engine_.run_in_progress_or_die([this] { fail_all_in_progress(); }, "tcp: fail every request");
}

void TcpTransport::fail_all_in_progress() {
  if (fail_done_) return;
  const std::exception_ptr error = first_error_.get();
  auto error_for = [&](const Request&) { return error; };
  for (auto& p : peers_) {
    std::vector<RequestPtr> failed;
    {
      MutexLock lk(&p->mu);
      failed = p->q.clear();
    }
    for (auto& c : p->conns) {
      if (!c) continue;
      c->fail_current_receive(error);
      c->fail_sends(error_for);
      c->resume_if_paused();
    }
    for (auto& r : failed) r->fail(error);
  }
  fail_done_ = true;
  engine_.wake();
}

void TcpTransport::broadcast_abort(AbortKind kind, int failed_rank, const std::string& reason) {
  FrameHeader h;
  h.type = FrameType::Abort;
  h.flags = static_cast<uint16_t>(kind);
  h.generation = options_.generation;
  h.src_rank = static_cast<uint32_t>(options_.rank);
  h.tag = failed_rank < 0 ? ~0ull : static_cast<uint64_t>(failed_rank);
  std::string text = reason.substr(0, kMaxControlBytes);
  h.length = text.size();
  for (auto& p : peers_) {
    if (p->rank == options_.rank) continue;
    {
      MutexLock lk(&p->mu);
      if (p->failed || p->departed) continue;
    }
    if (p->conns.empty() || !p->conns[0]) continue;
    p->conns[0]->send(nullptr, h, text);
  }
}

void TcpTransport::close(const Deadline& deadline) {
  FrameHeader h;
  h.type = FrameType::Bye;
  h.generation = options_.generation;
  h.src_rank = static_cast<uint32_t>(options_.rank);
  for (auto& p : peers_) {
    if (p->rank == options_.rank) continue;
    for (auto& c : p->conns) {
      if (c) c->send(nullptr, h, {});
    }
  }
  engine_.wait(
      [&] {
        for (auto& p : peers_) {
          for (auto& c : p->conns) {
            if (c && !c->send_idle()) return false;
          }
        }
        return true;
      },
      deadline);
}

}  // namespace weft::transport::tcp
