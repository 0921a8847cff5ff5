// The shared-memory transport, receiving: reading the incoming ring
// (through the shared inbound path, inbound.h), single-copy reads,
// acknowledgements, and the engine's poller.
#include "transport/shm/peer.h"

namespace weft::transport::shm {
namespace {

// How long a receive whose single-copy read failed waits for the world's
// abort before its sender is failed for it (see stall()).
constexpr auto kStallGrace = std::chrono::seconds(3);
// How long reporting an error found off the progress thread (report())
// may wait for it. Best effort: the request concerned has already failed
// with the error, and its waiter aborts the world with it anyway.
constexpr auto kReportLimit = std::chrono::seconds(5);
// Bytes of a payload copied out of a ring before the space is given back.
constexpr uint64_t kReleaseStep = 256u << 10;
// Bytes of a single-copy read handed to Request::consume at a time: small
// enough to be used while in cache, large enough that the read's cost per
// system call stays small.
constexpr size_t kConsumeStep = 256u << 10;

}  // namespace

// ---------------------------------------------------------------------------
// Receiving.

void ShmTransport::irecv(const RequestPtr& req) {
  Peer* p = admit(req);
  if (p == nullptr) return;
  if (std::unique_ptr<Unexpected> matched = inbound_.post(
          *p, [p] { return p->host; }, req)) {
    deliver(*p, req, *matched, false);
  } else if (req->state() == Request::State::Failed) {
    return;  // refused (the peer failed or left, or the transport failed)
  }
  if (p->in_paused.load(std::memory_order_acquire)) engine_.kick();  // the ring may go on now
  engine_.wake();
}

void ShmTransport::read_remote(Peer& p, const RequestPtr& req, uint64_t address, uint64_t send_id,
                               uint64_t cancels) {
  int err = 0;
  bool ok = true;
  if (!req->consume) {
    ok = req->bytes() == 0 || cma_copy(p.pid, req->recv_data, address, req->bytes(), &err);
  } else {
    // In pieces, each read into the staging buffer (which stays in cache)
    // and used there.
    if (!stage_) stage_.reset(new uint8_t[kConsumeStep]);
    for (size_t off = 0; ok && off < req->bytes();) {
      const size_t k = std::min<size_t>(req->bytes() - off, kConsumeStep);
      ok = cma_copy(p.pid, stage_.get(), address + off, k, &err);
      if (ok) {
        req->consume(off, off + k, stage_.get());
        off += k;
        req->consumed = off;
      }
    }
  }
  if (!ok) {
    return stall(p, req,
                 fmt::format("its message for {} cannot be read with process_vm_readv: {}{}",
                             req->describe(), net::errno_string(err),
                             err == ESRCH ? " (the process is gone)" : ""));
  }
  // Read after the copy: if the sender gave up its sends meanwhile (or
  // before), its buffer may have been reused under the copy.
  if (p.in_ctl->cancels.load(std::memory_order_seq_cst) != cancels) {
    return stall(
        p, req,
        fmt::format("it gave up its message for {} while it was being read", req->describe()));
  }
  req->complete();
  SendOp ack;
  ack.rec.magic = kRecordMagic;
  ack.rec.type = static_cast<uint8_t>(RecordType::Ack);
  ack.rec.aux = send_id;
  ack.total = kLine;
  submit(p, std::move(ack));  // false: the ring is broken, and the peer fails anyway
}

void ShmTransport::stall(Peer& p, const RequestPtr& req, const std::string& why) {
  // The sender is most likely failing: it is gone (its TCP connection
  // closes) or it aborted (its abort frame, which names the cause, went out
  // before it gave up its sends). Either way fail_all() fails this receive
  // with the right error soon; only if nothing comes does the peer fail.
  bool held = false;
  {
    MutexLock lk(&p.mu);
    if (!p.failed && !first_error_.failed()) {
      p.stalled.push_back(req);
      held = true;
    }
  }
  if (!held) {  // already failed: fail it like the others
    auto first = first_error_.get();
    req->fail(first ? first : request_peer_error(*req, p.host, "failed: " + why));
    return;
  }
  engine_.add_timer(Deadline::after(kStallGrace), [this, &p, r = req, why, alive = alive_] {
    if (!alive->load()) return;
    {
      MutexLock lk(&p.mu);
      auto it = std::find(p.stalled.begin(), p.stalled.end(), r);
      if (it == p.stalled.end()) return;  // failed meanwhile
      p.stalled.erase(it);
    }
    r->fail(request_peer_error(*r, p.host, "failed: " + why));
    peer_failed(p, why, true);
  });
}

bool ShmTransport::begin_data(Peer& p) {
  const RecordHeader& h = p.cur;
  p.cur_req.reset();
  p.cur_unexp = nullptr;
  auto a = inbound_.arrive(
      p, [&p] { return p.host; }, MessageHeader{h.comm_id, h.tag, h.length, h.desc});
  if (a.what == Disposition::Pause) {
    // No room: the ring is not read until a receive is posted.
    p.in_state = Peer::In::Paused;
    p.in_paused.store(true, std::memory_order_release);
    return false;
  }
  p.in_paused.store(false, std::memory_order_relaxed);
  p.discard = a.what == Disposition::Discard;
  if (a.what == Disposition::Deliver) {
    p.cur_req = std::move(a.req);
    p.target = static_cast<uint8_t*>(p.cur_req->recv_data);
  } else if (a.what == Disposition::Hold) {
    p.cur_unexp = a.held;
    p.target = a.held->data.get();
  }
  p.in_state = Peer::In::Payload;
  if (a.mismatch) report_mismatch(a.mismatch);
  return true;
}

void ShmTransport::report_mismatch(std::exception_ptr error) {
  report([this, error] {
    if (events_.on_mismatch) events_.on_mismatch(error);
  });
}

void ShmTransport::deliver(Peer& p, const RequestPtr& req, Unexpected& u, bool now) {
  if (auto err = inbound_.match_held(req, u, p.rank, [&p] { return p.host; })) {
    report_mismatch(err);
  } else if (u.cma && now) {
    read_remote(p, req, u.address, u.send_id, u.cancels);
  } else if (u.cma) {
    // Not on the caller's thread: a collective posts its receives before
    // its sends, and the peer is waiting for those.
    MutexLock lk(&p.mu);
    if (p.failed || first_error_.failed()) {
      auto first = first_error_.get();
      req->fail(first ? first : request_peer_error(*req, p.host, "failed: " + p.failure));
      return;
    }
    p.reads.push_back({req, u.address, u.send_id, u.cancels});
    p.have_reads.store(true, std::memory_order_seq_cst);
  } else {
    inbound_.copy_held(req, u);
  }
}

void ShmTransport::finish_data(Peer& p) {
  p.in_state = Peer::In::Header;
  p.discard = false;
  if (p.cur_req) {
    RequestPtr r = std::move(p.cur_req);
    r->complete();
    engine_.notify_completion();
    return;
  }
  if (!p.cur_unexp) return;
  Unexpected* u = p.cur_unexp;
  p.cur_unexp = nullptr;
  for (auto& [req, held] : inbound_.held_complete(p, u)) deliver(p, req, *held, true);
  engine_.notify_completion();
}

void ShmTransport::on_cma(Peer& p, const RecordHeader& h, const CmaBody& body) {
  if (body.length != h.length) {
    return violation(
        p, fmt::format("single-copy record of {} bytes describes {} bytes", h.length, body.length));
  }
  if (!p.read_cma) return violation(p, "single-copy record, but single copy was not agreed");
  // A descriptor: held at no cost, read from the sender when a receive takes it.
  auto a = inbound_.arrive(
      p, [&p] { return p.host; }, MessageHeader{h.comm_id, h.tag, h.length, h.desc}, true,
      [&](Unexpected& u) {
        u.cma = true;
        u.address = body.address;
        u.send_id = h.aux;
        u.cancels = body.cancels;
      });
  if (a.what == Disposition::Deliver) read_remote(p, a.req, body.address, h.aux, body.cancels);
  if (a.mismatch) report_mismatch(a.mismatch);
  engine_.notify_completion();
}

void ShmTransport::on_ack(Peer& p, uint64_t send_id) {
  RequestPtr r;
  {
    MutexLock lk(&p.out_mu);
    auto it = p.awaiting.find(send_id);
    if (it != p.awaiting.end()) {
      r = std::move(it->second);
      p.awaiting.erase(it);
    }
  }
  if (r) {
    r->complete();
    engine_.notify_completion();
    return;
  }
  bool failed;
  {
    MutexLock lk(&p.mu);
    failed = p.failed;
  }
  // After a failure the sends were failed and forgotten: a late ack is fine.
  if (!failed && !first_error_.failed())
    violation(p, fmt::format("acknowledgement of unknown send {}", send_id));
}

void ShmTransport::release_tail(Peer& p) {
  if (p.in_tail == p.in_released) return;
  p.in_ctl->tail.store(p.in_tail, std::memory_order_seq_cst);  // see signal()
  p.in_released = p.in_tail;
  signal(p, p.in_ctl->producer_sleeping);
}

int ShmTransport::poll_in(Peer& p) {
  using In = Peer::In;
  if (p.in_state == In::Dead) return 0;
  const uint64_t head = p.in_ctl->head.load(std::memory_order_acquire);
  if (head == p.in_tail && p.in_state != In::Paused) return 0;
  if (head < p.in_tail || head - p.in_tail > p.ring_bytes || head % kLine != 0) {
    violation(p, fmt::format("producer position {} is invalid (consumed {}, ring of {} bytes)",
                             head, p.in_tail, p.ring_bytes));
    return 1;
  }
  const uint64_t cap = p.ring_bytes;
  int progressed = 0;
  while (p.in_state != In::Dead) {
    if (p.in_state == In::Header) {
      if (head == p.in_tail) break;
      RecordHeader h;
      ring_get(p.in_data, cap, p.in_tail, &h, sizeof h);
      std::string why = validate_record(h);
      if (!why.empty()) {
        violation(p, why);
        break;
      }
      ++progressed;
      const auto type = static_cast<RecordType>(h.type);
      if (type == RecordType::Ack) {
        p.in_tail += kLine;
        on_ack(p, h.aux);
        continue;
      }
      if (type == RecordType::DataCma) {
        if (head - p.in_tail < 2 * kLine) {
          violation(p, "incomplete single-copy record");
          break;
        }
        CmaBody body;
        ring_get(p.in_data, cap, p.in_tail + kLine, &body, sizeof body);
        p.in_tail += 2 * kLine;
        on_cma(p, h, body);
        continue;
      }
      p.cur = h;
      p.in_tail += kLine;
      p.cur_got = 0;
      p.cur_need = round_up_line(h.length);
      p.in_state = In::Paused;  // until begin_data() finds it a place
    }
    if (p.in_state == In::Paused) {
      if (!begin_data(p)) break;
      ++progressed;
    }
    if (p.in_state == In::Payload) {
      const uint64_t n = std::min({head - p.in_tail, p.cur_need - p.cur_got, kReleaseStep});
      if (n > 0) {
        const uint64_t len = p.cur.length;
        const uint64_t useful = p.cur_got < len ? std::min(n, len - p.cur_got) : 0;
        if (!p.discard && useful > 0) {
          if (p.cur_req && p.cur_req->consume) {
            // Straight from the ring, in at most two pieces (it wraps on a line).
            const size_t at = static_cast<size_t>(p.in_tail & (cap - 1));
            const size_t first = std::min<size_t>(useful, static_cast<size_t>(cap) - at);
            p.cur_req->consume(p.cur_got, p.cur_got + first, p.in_data + at);
            if (useful > first)
              p.cur_req->consume(p.cur_got + first, p.cur_got + useful, p.in_data);
            p.cur_req->consumed = p.cur_got + useful;
          } else {
            ring_get(p.in_data, cap, p.in_tail, p.target + p.cur_got, useful);
          }
        }
        p.cur_got += n;
        p.in_tail += n;
        ++progressed;
        if (n == kReleaseStep) release_tail(p);
      }
      if (p.cur_got < p.cur_need) {
        if (head == p.in_tail) break;
        continue;
      }
      finish_data(p);
    }
  }
  release_tail(p);
  return progressed;
}

int ShmTransport::poll_all() {
  int n = 0;
  for (Peer* p : local_) {
    if (p->have_reads.load(std::memory_order_acquire)) n += run_reads(*p);
    n += poll_in(*p);
    n += flush(*p);
  }
  if (!deferred_.empty()) run_deferred();
  return n;
}

void ShmTransport::run_deferred() {
  std::vector<std::function<void()>> fns;
  fns.swap(deferred_);
  for (auto& f : fns) f();
}

void ShmTransport::report(std::function<void()> fn) {
  if (engine_.in_progress_thread()) {
    deferred_.push_back(std::move(fn));  // after the current poll round
  } else {
    engine_.run_in_progress(std::move(fn), Deadline::after(kReportLimit));
  }
}

int ShmTransport::run_reads(Peer& p) {
  std::deque<Peer::Read> reads;
  {
    MutexLock lk(&p.mu);
    reads.swap(p.reads);
    p.have_reads.store(false, std::memory_order_relaxed);
  }
  for (auto& r : reads) read_remote(p, r.req, r.address, r.send_id, r.cancels);
  if (!reads.empty()) engine_.notify_completion();
  return static_cast<int>(reads.size());
}

bool ShmTransport::prepare_block() {
  for (Peer* p : local_) {
    if (p->in_state != Peer::In::Dead)
      p->in_ctl->consumer_sleeping.store(1, std::memory_order_seq_cst);
    if (p->queued.load(std::memory_order_seq_cst))
      p->out_ctl->producer_sleeping.store(1, std::memory_order_seq_cst);
  }
  // The flags are stored before the positions are loaded again, all
  // sequentially consistent: with signal(), either the peer sees the flag,
  // or this sees what the peer published before it looked.
  bool work = !deferred_.empty();
  for (Peer* p : local_) {
    if (p->have_reads.load(std::memory_order_seq_cst)) work = true;
    if (p->in_state != Peer::In::Dead && p->in_state != Peer::In::Paused &&
        p->in_ctl->head.load(std::memory_order_seq_cst) != p->in_tail) {
      work = true;
    }
    if (p->queued.load(std::memory_order_seq_cst)) {
      MutexLock lk(&p->out_mu);
      if (!p->out_dead && p->out_ctl->tail.load(std::memory_order_seq_cst) != p->out_tail_seen)
        work = true;
    }
  }
  if (work) after_block();
  return !work;
}

void ShmTransport::after_block() {
  for (Peer* p : local_) {
    p->in_ctl->consumer_sleeping.store(0, std::memory_order_relaxed);
    p->out_ctl->producer_sleeping.store(0, std::memory_order_relaxed);
  }
}

}  // namespace weft::transport::shm
