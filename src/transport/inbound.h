// The inbound path every transport shares: what becomes of a message once
// its header has arrived, and of a held message once a receive takes it.
// A transport reads bytes (a socket, a shared-memory ring); this decides,
// by the matching rules of matching.h, where they go:
//  * deliver: the oldest posted receive of the key takes the payload
//    straight into its buffer (after its size and descriptor are checked);
//  * hold: no receive is posted yet, so the payload goes into a held
//    buffer ("unexpected"), within max_unexpected_bytes per peer, and a
//    collective's early message is checked against the collective this
//    rank runs (check_unexpected);
//  * discard: the message contradicts its receive (MismatchError), or the
//    peer or the transport has failed; the payload is read and dropped;
//  * pause: no receive and no room left in the budget; the transport stops
//    reading from that peer until a receive is posted.
// The counters of each path (InboundStats) let tests see which one a
// message took.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/mutex.h"
#include "transport/engine.h"
#include "transport/matching.h"
#include "transport/request.h"
#include "transport/transport.h"

namespace weft::transport {

// The part of a transport's per-peer state that the inbound path uses. U
// is the transport's record of a held message (header, data, complete; see
// MatchQueues).
template <typename U>
struct InboundPeer {
  int rank = -1;
  Mutex mu;
  MatchQueues<U> q GUARDED_BY(mu);
  bool failed GUARDED_BY(mu) = false;
  bool departed GUARDED_BY(mu) = false;
  std::string failure GUARDED_BY(mu);
};

enum class Disposition : uint8_t { Deliver, Hold, Discard, Pause };

// The decision about one arriving message.
template <typename U>
struct Arrival {
  Disposition what = Disposition::Discard;
  RequestPtr req;     // Deliver: the posted receive whose buffer takes the payload
  U* held = nullptr;  // Hold: the record in the peer's queue (payload into held->data)
  // A MismatchError the caller reports upward (on_mismatch) once its own
  // state is consistent; a receive it concerns has already failed.
  std::exception_ptr mismatch;
};

class Inbound {
 public:
  Inbound(Engine& engine, int my_rank, size_t max_unexpected_bytes, const TransportEvents& events,
          const FirstError& first_error)
      : engine_(engine),
        my_rank_(my_rank),
        max_unexpected_(max_unexpected_bytes),
        events_(events),
        first_error_(first_error) {}

  // A message's header arrived from peer p (on the progress thread).
  // `descriptor`: the message carries no payload to store, only a
  // description that a receive reads later (single copy): when held, it is
  // complete at once, costs no budget, and `describe` fills the transport's
  // fields of the record; otherwise the payload follows and a held message
  // gets a buffer of its length.
  // `host()` names the peer's host for messages (called only on errors).
  template <typename U, typename Host, typename Describe>
  Arrival<U> arrive(InboundPeer<U>& p, const Host& host, const MessageHeader& h, bool descriptor,
                    Describe&& describe) {
    Arrival<U> a;
    RequestPtr mismatched;
    {
      MutexLock lk(&p.mu);
      if (p.failed || first_error_.failed()) {
        a.what = Disposition::Discard;
      } else if ((a.req = p.q.take_posted(h.comm_id, h.tag))) {
        a.mismatch = check_match(my_rank_, p.rank, host(), *a.req, h, events_.describe_op);
        if (a.mismatch) {
          mismatched = std::move(a.req);
          a.what = Disposition::Discard;
        } else {
          a.what = Disposition::Deliver;
        }
      } else if (!descriptor && h.length > 0 && p.q.unexpected_bytes + h.length > max_unexpected_) {
        count(paused_);
        a.what = Disposition::Pause;
        return a;
      } else {
        auto u = std::make_unique<U>();
        u->header = h;
        if (descriptor) {
          u->complete = true;
          describe(*u);
        } else {
          u->data = holds_.get(h.length);
        }
        p.q.unexpected_bytes += MatchQueues<U>::held_bytes(*u);
        a.held = u.get();
        a.what = Disposition::Hold;
        p.q.unexpected.push_back(std::move(u));
      }
    }
    if (a.held && h.desc.kind != 0 && events_.check_unexpected) {
      // A collective's message that no receive waits for yet: it must agree
      // with the collective of that number if this rank is running it.
      a.mismatch = events_.check_unexpected(p.rank, h.comm_id, h.desc);
      if (a.mismatch && !descriptor) {  // its payload is not kept
        a.held = nullptr;
        a.what = Disposition::Discard;
      }
    }
    switch (a.what) {
      case Disposition::Deliver: count(direct_); break;
      case Disposition::Hold: count(held_); break;
      default: count(discarded_); break;
    }
    if (mismatched) {
      mismatched->fail(a.mismatch);
      engine_.notify_completion();
    }
    return a;
  }
  template <typename U, typename Host>
  Arrival<U> arrive(InboundPeer<U>& p, const Host& host, const MessageHeader& h) {
    return arrive(p, host, h, false, [](U&) {});
  }

  // The payload of the held message being read is all there: the posted
  // receives that can take held messages now (oldest first), removed from
  // the queues.
  template <typename U>
  std::vector<std::pair<RequestPtr, std::unique_ptr<U>>> held_complete(InboundPeer<U>& p, U* held) {
    MutexLock lk(&p.mu);
    held->complete = true;
    return p.q.take_deliverable();
  }

  // A receive is posted (any thread): the complete held message it takes
  // (removed; the caller delivers it), else null: the receive is queued,
  // or it failed at once (the peer has failed or left, the transport failed).
  template <typename U, typename Host>
  std::unique_ptr<U> post(InboundPeer<U>& p, const Host& host, const RequestPtr& req) {
    MutexLock lk(&p.mu);
    // A message that arrived before the receive was posted (possibly before the peer left).
    std::unique_ptr<U> matched = p.q.take_unexpected(*req);
    if (matched) return matched;
    if (p.failed || p.departed) {
      req->fail(
          request_peer_error(*req, host(), p.failed ? p.failure : "has closed its communicator"));
    } else if (first_error_.failed()) {  // fail_all() ran since the caller's check
      req->fail(first_error_.get());
    } else {
      p.q.posted.push_back(req);
    }
    return nullptr;
  }

  // A receive takes held message u: null when they agree, else the
  // MismatchError with which req has failed (the caller reports it).
  template <typename U, typename Host>
  std::exception_ptr match_held(const RequestPtr& req, const U& u, int peer, const Host& host) {
    if (auto err = check_match(my_rank_, peer, host(), *req, u.header, events_.describe_op)) {
      req->fail(err);
      return err;
    }
    count(from_held_);
    return nullptr;
  }

  // Completes req with the payload held in u (matched: match_held): copies
  // it out and gives its buffer back for reuse.
  template <typename U>
  void copy_held(const RequestPtr& req, U& u) {
    if (req->bytes() > 0) std::memcpy(req->recv_data, u.data.get(), req->bytes());
    holds_.put(std::move(u.data));
    req->complete();
  }

  // match_held, then copy_held when they agree; returns the mismatch.
  template <typename U, typename Host>
  std::exception_ptr deliver_held(const RequestPtr& req, U& u, int peer, const Host& host) {
    auto err = match_held(req, u, peer, host);
    if (!err) copy_held(req, u);
    return err;
  }

  // A peer said goodbye (it sends nothing more).
  void note_goodbye() { count(goodbyes_); }

  InboundStats stats() const {
    InboundStats s;
    s.direct = direct_.load(std::memory_order_relaxed);
    s.held = held_.load(std::memory_order_relaxed);
    s.from_held = from_held_.load(std::memory_order_relaxed);
    s.discarded = discarded_.load(std::memory_order_relaxed);
    s.paused = paused_.load(std::memory_order_relaxed);
    s.goodbyes = goodbyes_.load(std::memory_order_relaxed);
    return s;
  }

 private:
  static void count(std::atomic<uint64_t>& c) { c.fetch_add(1, std::memory_order_relaxed); }

  Engine& engine_;
  const int my_rank_;
  const size_t max_unexpected_;
  const TransportEvents& events_;
  const FirstError& first_error_;
  HoldBuffers holds_;  // payloads that arrive before their receive
  std::atomic<uint64_t> direct_{0};
  std::atomic<uint64_t> held_{0};
  std::atomic<uint64_t> from_held_{0};
  std::atomic<uint64_t> discarded_{0};
  std::atomic<uint64_t> paused_{0};
  std::atomic<uint64_t> goodbyes_{0};
};

}  // namespace weft::transport
