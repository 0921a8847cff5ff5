// The shared-memory transport, sending: records into the outgoing ring
// (inline on the caller's thread, or queued for the progress thread),
// single-copy descriptors, waking a sleeping peer.
#include "transport/shm/peer.h"

namespace weft::transport::shm {

// ---------------------------------------------------------------------------
// Sending.

void ShmTransport::signal(Peer& p, std::atomic<uint32_t>& sleeping) {
  // Called right after a sequentially consistent store of head or tail.
  // With prepare_block()'s sequentially consistent store of the flag and
  // load of the positions (a Dekker handshake), either the sleeper sees
  // what was just published, or this sees its flag.
  if (sleeping.load(std::memory_order_seq_cst) != 0 && sleeping.exchange(0) != 0) {
    uint64_t one = 1;
    ssize_t n = ::write(p.wake.get(), &one, sizeof one);
    (void)n;  // EAGAIN: the counter is saturated, the peer wakes anyway
  }
}

// out_mu is named on the definitions (Peer is incomplete in shm_transport.h).
bool ShmTransport::fits_now(Peer& p, const SendOp& op) REQUIRES(p.out_mu) {
  // Through the ring, a message costs two copies but no system call and no
  // page pinning, and both copies stay in cache (a receiver with a consumer
  // even uses the payload in the ring, without copying it out): better for
  // a message that fits at once into the ring's free space. Single copy
  // for the rest (large messages, or a ring that is busy), which would
  // otherwise wait for ring space.
  if (!p.sendq.empty() || op.rec.length > p.ring_bytes / 2) return false;
  const uint64_t t = p.out_ctl->tail.load(std::memory_order_acquire);
  if (t < p.out_tail_seen || t > p.out_head) return false;  // write_some() reports it
  p.out_tail_seen = t;
  return (p.out_head - t) + op.total <= p.ring_bytes;
}

ShmTransport::WriteResult ShmTransport::write_some(Peer& p, SendOp& op) REQUIRES(p.out_mu) {
  const uint64_t cap = p.ring_bytes;
  uint64_t free = cap - (p.out_head - p.out_tail_seen);
  const uint64_t left = op.total - op.off;
  // Records without payload are written whole; payloads may go in pieces.
  const uint64_t want = op.type() == RecordType::Data ? std::min<uint64_t>(left, kLine) : left;
  if (free < want || free < left) {
    uint64_t t = p.out_ctl->tail.load(std::memory_order_acquire);
    if (t < p.out_tail_seen || t > p.out_head) return WriteResult::Corrupt;
    p.out_tail_seen = t;
    free = cap - (p.out_head - t);
    if (free < want) return WriteResult::Partial;
  }
  uint64_t n = std::min(free, left);
  if (n < left) n &= ~static_cast<uint64_t>(kLine - 1);  // pieces end on a line
  if (n == 0) return WriteResult::Partial;
  // The record is: header line, body line (DataCma) or payload, padding.
  uint64_t pos = p.out_head, from = op.off;
  const uint64_t end = op.off + n;
  if (from < kLine) {
    const uint64_t k = std::min(end, static_cast<uint64_t>(kLine)) - from;
    ring_put(p.out_data, cap, pos, reinterpret_cast<const uint8_t*>(&op.rec) + from, k);
    pos += k;
    from += k;
  }
  if (from < end) {
    if (op.type() == RecordType::DataCma) {
      ring_put(p.out_data, cap, pos, reinterpret_cast<const uint8_t*>(&op.body) + (from - kLine),
               end - from);
    } else {
      const uint64_t len = op.rec.length;
      const uint64_t a = from - kLine, b = std::min(end - kLine, len);
      if (b > a) ring_put(p.out_data, cap, pos, op.payload + a, b - a);  // padding is not written
    }
  }
  p.out_head += n;
  op.off = end;
  p.out_ctl->head.store(p.out_head, std::memory_order_seq_cst);  // see signal()
  signal(p, p.out_ctl->consumer_sleeping);
  return op.off == op.total ? WriteResult::Done : WriteResult::Partial;
}

bool ShmTransport::submit(Peer& p, SendOp op) {
  RequestPtr done;
  bool queued = false, corrupt = false;
  {
    MutexLock lk(&p.out_mu);
    if (p.out_dead) return false;
    // A data record queued after fail_all() cleared the queues would never
    // fail: fail_all() sets the flag before it takes this lock.
    if (op.req && first_error_.failed()) {
      op.req->fail(first_error_.get());
      return true;
    }
    if (op.may_cma && !fits_now(p, op)) op.to_cma();
    if (op.type() == RecordType::DataCma) {
      op.rec.aux = p.next_send_id++;
      p.awaiting[op.rec.aux] = op.req;
      op.body.cancels =
          p.out_ctl->cancels.load(std::memory_order_relaxed);  // only this side writes it
    }
    WriteResult r = p.sendq.empty() ? write_some(p, op) : WriteResult::Partial;
    if (r == WriteResult::Corrupt) {
      p.out_dead = true;
      corrupt = true;
      if (op.type() == RecordType::DataCma) p.awaiting.erase(op.rec.aux);
    } else if (r == WriteResult::Done) {
      if (op.type() == RecordType::Data) done = std::move(op.req);
    } else {
      p.sendq.push_back(std::move(op));
      p.queued.store(true, std::memory_order_seq_cst);
      queued = true;
    }
  }
  if (corrupt) {
    report([this, &p] { violation(p, "the consumer position of the outgoing ring is invalid"); });
    return false;
  }
  if (done) done->complete();
  if (queued) {
    engine_.kick();  // someone must go on writing when space frees
    engine_.wake();
  }
  return true;
}

ShmTransport::Peer* ShmTransport::admit(const RequestPtr& req) {
  if (first_error_.failed()) {
    req->fail(first_error_.get());
    return nullptr;
  }
  Peer* p = peer_for(req->peer());
  if (p == nullptr) {
    req->fail(std::make_exception_ptr(InternalError(
        fmt::format("{}: no shared memory with rank {}", req->describe(), req->peer()))));
  }
  return p;
}

void ShmTransport::isend(const RequestPtr& req) {
  Peer* p = admit(req);
  if (p == nullptr) return;
  {
    MutexLock lk(&p->mu);
    if (p->failed || p->departed) {
      req->fail(request_peer_error(*req, p->host,
                                   p->failed ? p->failure : "has closed its communicator"));
      return;
    }
  }
  SendOp op;
  op.req = req;
  op.rec.magic = kRecordMagic;
  op.rec.comm_id = req->comm_id();
  op.rec.tag = req->tag();
  op.rec.length = req->bytes();
  op.rec.desc = req->desc;
  op.rec.type = static_cast<uint8_t>(RecordType::Data);
  op.payload = static_cast<const uint8_t*>(req->send_data);
  op.total = record_bytes(RecordType::Data, req->bytes());
  op.may_cma = req->bytes() >= options_.cma_min_bytes && p->send_cma;
  if (!submit(*p, std::move(op))) {
    req->fail(
        request_peer_error(*req, p->host, "cannot be reached: its shared-memory ring is broken"));
  }
  engine_.wake();
}

int ShmTransport::flush(Peer& p) {
  if (!p.queued.load(std::memory_order_acquire)) return 0;
  std::vector<RequestPtr> done;
  int n = 0;
  bool corrupt = false;
  {
    MutexLock lk(&p.out_mu);
    while (!p.sendq.empty() && !p.out_dead) {
      SendOp& op = p.sendq.front();
      const uint64_t before = op.off;
      WriteResult r = write_some(p, op);
      if (op.off != before) ++n;
      if (r == WriteResult::Corrupt) {
        corrupt = true;
        p.out_dead = true;
        break;
      }
      if (r == WriteResult::Partial) break;
      if (op.req && op.type() == RecordType::Data) done.push_back(std::move(op.req));
      p.sendq.pop_front();
    }
    if (p.sendq.empty() || p.out_dead) p.queued.store(false, std::memory_order_release);
  }
  for (auto& r : done) r->complete();
  if (!done.empty()) engine_.notify_completion();
  if (corrupt) violation(p, "the consumer position of the outgoing ring is invalid");
  return n;
}

}  // namespace weft::transport::shm
