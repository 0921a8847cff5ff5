// Matching of messages with receives, shared by the transports (TCP, shared
// memory), so that every transport matches exactly alike:
//  * per peer, a message goes to the oldest posted receive with the same
//    (communicator id, tag), in the order the peer sent them (FIFO per tag);
//  * a message that arrives before its receive is held ("unexpected") and
//    given to the first receive posted for its key later;
//  * a message never overtakes an older held message of the same key;
//  * sizes and operation descriptors must agree, else a MismatchError that
//    names both calls.
// The queues are not thread-safe: the transport guards them with its
// per-peer mutex.
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/mutex.h"
#include "transport/request.h"
#include "transport/transport.h"

namespace weft::transport {

// What a message says about itself (the matching part of a frame or record).
struct MessageHeader {
  uint64_t comm_id = 0;
  uint64_t tag = 0;
  uint64_t length = 0;  // payload bytes
  OpDesc desc;
};

// "mismatched operations: rank 0 called <mine> but rank 2 (host h) called
// <theirs>"; the sizes are added when the two calls read the same.
std::exception_ptr mismatch_error(int my_rank, const OpDesc& mine, uint64_t my_bytes, int peer,
                                  const std::string& peer_host, const OpDesc& theirs,
                                  uint64_t their_bytes, const DescribeOp& describe);

// A PeerError for a request that cannot go on because of its peer:
// "<request>: rank 3 (host h) <why>".
std::exception_ptr request_peer_error(const Request& req, const std::string& peer_host,
                                      const std::string& why);

// True when a held message of a collective contradicts the collective
// (comm_id, desc) this rank runs at the same sequence number.
inline bool conflicts(uint64_t msg_comm, const OpDesc& msg_desc, uint64_t comm_id,
                      const OpDesc& desc) {
  return msg_comm == comm_id && msg_desc.kind != 0 && msg_desc.seq == desc.seq &&
         !(msg_desc == desc);
}

// The posted receives and held messages of one peer. U is the transport's
// record of a held message: it has `header` (with comm_id, tag, length,
// desc) and `complete` (all of its payload has arrived).
template <typename U>
struct MatchQueues {
  std::deque<RequestPtr> posted;
  std::deque<std::unique_ptr<U>> unexpected;  // arrival order
  size_t unexpected_bytes = 0;

  // The oldest held message for the key, or unexpected.end().
  auto find_unexpected(uint64_t comm_id, uint64_t tag) {
    return std::find_if(unexpected.begin(), unexpected.end(), [&](const auto& u) {
      return u->header.comm_id == comm_id && u->header.tag == tag;
    });
  }

  // A new message for the key arrives: the posted receive it belongs to, if
  // any (removed from the queue), else null. Never when an older message of
  // the key is still held: the new one then waits behind it.
  RequestPtr take_posted(uint64_t comm_id, uint64_t tag) {
    if (find_unexpected(comm_id, tag) != unexpected.end()) return nullptr;
    for (auto it = posted.begin(); it != posted.end(); ++it) {
      if ((*it)->comm_id() == comm_id && (*it)->tag() == tag) {
        RequestPtr r = std::move(*it);
        posted.erase(it);
        return r;
      }
    }
    return nullptr;
  }

  // A receive is posted: the complete held message it takes (removed), or
  // null (then the caller queues the receive in `posted`).
  std::unique_ptr<U> take_unexpected(const Request& req) {
    auto it = find_unexpected(req.comm_id(), req.tag());
    if (it == unexpected.end() || !(*it)->complete) return nullptr;
    std::unique_ptr<U> u = std::move(*it);
    unexpected.erase(it);
    unexpected_bytes -= held_bytes(*u);
    return u;
  }

  // Pairs posted receives (oldest first) with complete held messages of
  // their key; returns the pairs, removed from the queues.
  std::vector<std::pair<RequestPtr, std::unique_ptr<U>>> take_deliverable() {
    std::vector<std::pair<RequestPtr, std::unique_ptr<U>>> out;
    for (auto pit = posted.begin(); pit != posted.end();) {
      auto uit = find_unexpected((*pit)->comm_id(), (*pit)->tag());
      if (uit == unexpected.end() || !(*uit)->complete) {
        ++pit;
        continue;
      }
      std::unique_ptr<U> u = std::move(*uit);
      unexpected.erase(uit);
      unexpected_bytes -= held_bytes(*u);
      out.emplace_back(std::move(*pit), std::move(u));
      pit = posted.erase(pit);
    }
    return out;
  }

  // The first held collective message that contradicts (comm_id, desc), or null.
  const U* find_conflict(uint64_t comm_id, const OpDesc& desc) const {
    for (const auto& u : unexpected) {
      if (conflicts(u->header.comm_id, u->header.desc, comm_id, desc)) return u.get();
    }
    return nullptr;
  }

  // Drops every held message; returns the posted receives (to be failed).
  std::vector<RequestPtr> clear() {
    std::vector<RequestPtr> failed(posted.begin(), posted.end());
    posted.clear();
    unexpected.clear();
    unexpected_bytes = 0;
    return failed;
  }

  // Memory a held message accounts for (U::held_bytes() when it has one,
  // else its payload length).
  static size_t held_bytes(const U& u) {
    if constexpr (requires { u.held_bytes(); }) {
      return u.held_bytes();
    } else {
      return u.header.length;
    }
  }
};

// Memory for held messages, kept for reuse. A large early message held in
// a fresh allocation costs a page fault per 4 KiB each time the allocator
// has given the previous one back to the system (glibc maps blocks from
// 128 KiB on, and trims its heap), which for a collective whose messages
// often arrive before their receive is most calls. Blocks of at least
// kMinKept bytes are rounded up to one of 8 sizes per power of two and
// kept after use, up to `keep_bytes` in all; smaller ones, and ones that
// could never be kept, are allocated at their size and freed. Thread-safe.
class HoldBuffers {
 public:
  static constexpr size_t kMinKept = 64u << 10;
  struct Block {
    std::unique_ptr<uint8_t[]> data;
    size_t capacity = 0;
    uint8_t* get() const { return data.get(); }
  };
  explicit HoldBuffers(size_t keep_bytes = 32u << 20) : keep_bytes_(keep_bytes) {}
  // A block of at least n bytes (at least 1).
  Block get(size_t n) EXCLUDES(mu_);
  // Returns a block once its message was delivered (kept or freed).
  void put(Block b) EXCLUDES(mu_);
  size_t kept_bytes() const EXCLUDES(mu_);

 private:
  const size_t keep_bytes_;
  mutable Mutex mu_;
  std::map<size_t, std::vector<std::unique_ptr<uint8_t[]>>> free_ GUARDED_BY(mu_);  // by capacity
  size_t kept_ GUARDED_BY(mu_) = 0;
};

// Checks a message against the receive it is matched with: a MismatchError
// when the sizes or descriptors differ, else null.
template <typename Header>
std::exception_ptr check_match(int my_rank, int peer, const std::string& peer_host,
                               const Request& req, const Header& h, const DescribeOp& describe) {
  if (req.bytes() == h.length && req.desc == h.desc) return nullptr;
  return mismatch_error(my_rank, req.desc, req.bytes(), peer, peer_host, h.desc, h.length,
                        describe);
}

}  // namespace weft::transport
