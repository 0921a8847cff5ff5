// The shared-memory transport, failures: a failed or departed peer, a
// protocol violation, failing everything (fail_all), closing.
#include "transport/shm/peer.h"

namespace weft::transport::shm {

// ---------------------------------------------------------------------------
// Failures.

std::exception_ptr ShmTransport::peer_error(const Peer& p, const std::string& reason) const {
  return std::make_exception_ptr(
      PeerError(fmt::format("rank {} (host {}) {}", p.rank, p.host, reason), p.rank, p.host, ""));
}

void ShmTransport::violation(Peer& p, const std::string& why) {
  if (p.in_state == Peer::In::Dead) return;
  WEFT_ERROR("protocol violation by rank {} ({}) in shared memory: {}", p.rank, p.host, why);
  p.in_state = Peer::In::Dead;  // nothing more is read from its ring
  report([this, &p, why] { peer_failed(p, "protocol violation in shared memory: " + why, true); });
}

void ShmTransport::peer_failed(Peer& p, const std::string& reason, bool report_it) {
  std::vector<RequestPtr> failed;
  {
    MutexLock lk(&p.mu);
    if (p.failed) return;
    p.failed = true;
    p.failure = reason;
    failed = p.q.clear();
    failed.insert(failed.end(), p.stalled.begin(), p.stalled.end());
    p.stalled.clear();
    for (auto& r : p.reads) failed.push_back(r.req);
    p.reads.clear();
  }
  if (p.cur_req) failed.push_back(std::move(p.cur_req));
  p.cur_unexp = nullptr;
  p.discard = true;
  p.in_state = Peer::In::Dead;
  {
    MutexLock lk(&p.out_mu);
    for (auto& op : p.sendq) {
      if (op.req && op.type() == RecordType::Data) failed.push_back(op.req);
    }
    p.sendq.clear();
    p.queued.store(false);
    p.out_dead = true;
    // Before the sends fail (and their buffers may be reused): see RingControl::cancels.
    if (!p.awaiting.empty()) p.out_ctl->cancels.fetch_add(1, std::memory_order_seq_cst);
    for (auto& [id, r] : p.awaiting) failed.push_back(r);
    p.awaiting.clear();
  }
  for (auto& r : failed) r->fail(request_peer_error(*r, p.host, "failed: " + reason));
  engine_.wake();
  if (report_it && !first_error_.failed() && events_.on_peer_failure) {
    events_.on_peer_failure(p.rank, peer_error(p, "failed: " + reason));
  }
}

void ShmTransport::peer_departed(int rank) {
  {
    MutexLock lk(&setup_mu_);
    if (!ready_) {
      early_departures_.push_back(rank);
      return;
    }
  }
  Peer* p = peer_for(rank);
  if (p == nullptr) return;
  auto leave = [this, p] {
    // What it sent before its goodbye is in the ring: take it first.
    poll_in(*p);
    bool pending = p->cur_req != nullptr;
    {
      MutexLock lk(&p->mu);
      p->departed = true;
      pending = pending || !p->q.posted.empty() || !p->stalled.empty() || !p->reads.empty();
    }
    {
      MutexLock lk(&p->out_mu);
      for (auto& op : p->sendq) pending = pending || op.req != nullptr;
      pending = pending || !p->awaiting.empty();
    }
    run_deferred();
    if (pending)
      peer_failed(*p, "closed its communicator while operations with it were pending", true);
  };
  engine_.run_in_progress_or_die(leave, "shm: fail what is pending with a departed peer");
}

void ShmTransport::fail_all(std::exception_ptr error) {
  first_error_.set(error);
  // On the progress thread, so that no poll is filling a buffer of a request
  // while it fails; returns once done (by this call or an earlier one).
  engine_.run_in_progress_or_die([this] { fail_all_in_progress(); }, "shm: fail every request");
}

void ShmTransport::fail_all_in_progress() {
  if (fail_done_) return;
  const std::exception_ptr error = first_error_.get();
  for (Peer* p : local_) {
    std::vector<RequestPtr> failed;
    {
      MutexLock lk(&p->mu);
      failed = p->q.clear();
      failed.insert(failed.end(), p->stalled.begin(), p->stalled.end());
      p->stalled.clear();
      for (auto& r : p->reads) failed.push_back(r.req);
      p->reads.clear();
    }
    if (p->in_state == Peer::In::Payload || p->in_state == Peer::In::Paused) {
      // The rest of the message being received is dropped.
      if (p->cur_req) failed.push_back(std::move(p->cur_req));
      p->cur_unexp = nullptr;
      p->discard = true;
      if (p->in_state == Peer::In::Paused) p->in_state = Peer::In::Payload;
      p->in_paused.store(false);
    }
    {
      MutexLock lk(&p->out_mu);
      std::deque<SendOp> keep;  // acknowledgements still go out (close() flushes them)
      for (auto& op : p->sendq) {
        if (!op.req) {
          keep.push_back(std::move(op));
          continue;
        }
        // A record partly in the ring cannot be taken back, and the rest
        // must not be read from the caller's buffer any more.
        if (op.off > 0) p->out_dead = true;
        if (op.type() == RecordType::Data) failed.push_back(op.req);
      }
      p->sendq = p->out_dead ? std::deque<SendOp>() : std::move(keep);
      p->queued.store(!p->sendq.empty());
      // Before the sends fail (and their buffers may be reused): see RingControl::cancels.
      if (!p->awaiting.empty()) p->out_ctl->cancels.fetch_add(1, std::memory_order_seq_cst);
      for (auto& [id, r] : p->awaiting) failed.push_back(r);
      p->awaiting.clear();
    }
    for (auto& r : failed) r->fail(error);
  }
  fail_done_ = true;
  engine_.wake();
}

std::exception_ptr ShmTransport::find_conflict(uint64_t comm_id, const OpDesc& desc) {
  for (Peer* p : local_) {
    MutexLock lk(&p->mu);
    if (const Unexpected* u = p->q.find_conflict(comm_id, desc)) {
      return mismatch_error(options_.rank, desc, 0, p->rank, p->host, u->header.desc,
                            u->header.length, events_.describe_op);
    }
  }
  return nullptr;
}

void ShmTransport::close(const Deadline& deadline) {
  engine_.wait(
      [&] {
        for (Peer* p : local_) {
          MutexLock lk(&p->out_mu);
          if (!p->sendq.empty() && !p->out_dead) return false;
        }
        return true;
      },
      deadline);
}

}  // namespace weft::transport::shm
