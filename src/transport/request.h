// A point-to-point request (one send or one receive) and the descriptor of
// the operation it belongs to.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>

#include "core/mutex.h"

namespace weft::transport {

class Engine;

// What a message belongs to, carried in every data frame so that a receiver
// can tell that two ranks disagree about the operation (MismatchError) and
// name both calls. kind 0 means plain point-to-point.
struct OpDesc {
  uint8_t kind = 0;   // collective kind (collectives layer numbering); 0: p2p
  uint8_t dtype = 0;  // weft::DType
  uint8_t op = 0;     // weft::ReduceOp
  uint8_t flags = 0;
  uint32_t root = 0;
  uint64_t count = 0;  // element count of the call
  uint64_t seq = 0;    // position in the communicator's sequence of collectives

  bool operator==(const OpDesc&) const = default;
};

// One send or receive. Created by the issuing thread, completed by whichever
// thread makes progress (see Engine). Thread-safe state transitions.
class Request {
 public:
  enum class State : uint8_t { Pending = 0, Done = 1, Failed = 2 };

  Request(bool is_send, int peer, uint64_t comm_id, uint64_t tag, size_t bytes)
      : is_send_(is_send), peer_(peer), comm_id_(comm_id), tag_(tag), bytes_(bytes) {}

  bool is_send() const { return is_send_; }
  int peer() const { return peer_; }  // world rank of the peer
  uint64_t comm_id() const { return comm_id_; }
  uint64_t tag() const { return tag_; }
  size_t bytes() const { return bytes_; }

  // Sequentially consistent: waiters and completers use the Dekker pattern
  // (publish "I sleep" / "done", then look at the other side), see Engine.
  State state() const { return state_.load(std::memory_order_seq_cst); }
  bool done() const { return state() != State::Pending; }
  bool ok() const { return state() == State::Done; }
  std::exception_ptr error() const { return done() ? error_ : nullptr; }

  // Transitions Pending -> Done / Failed; later calls are ignored. Return
  // whether this call made the transition. The engine wakes waiters.
  bool complete();
  bool fail(std::exception_ptr error);

  // Description used in error messages: "send to rank 3 (tag 7, 4096 bytes)".
  std::string describe() const;

  // Receive side: where the payload goes, and the descriptor expected.
  void* recv_data = nullptr;
  // Receive side, optional: uses the payload while it arrives, when it is
  // still in cache (a reduction). A transport that moves the payload in
  // pieces may hand each piece to it instead of storing it in recv_data,
  // on the progress thread and before completing the request: bytes [from,
  // to) of the payload are at `data` (the transport's memory, valid during
  // the call), in order, from 0, on 64-byte boundaries except at the end of
  // the payload. `consumed` is then the end of the last piece: recv_data
  // holds only [consumed, bytes()), which the issuer handles itself once
  // the request is done. Transports that do not move payloads in pieces
  // never call it. Must not throw, and must not refer to anything that
  // dies before the request (a failed call may leave the request in a
  // transport until the world's failure reaches it).
  using Consumer = std::function<void(size_t from, size_t to, const void* data)>;
  Consumer consume;
  size_t consumed = 0;  // written before completion, read after it
  // Send side: the payload.
  const void* send_data = nullptr;
  OpDesc desc;
  // Name of the operation the request belongs to, for messages ("allreduce #3").
  std::string op_name;

 private:
  const bool is_send_;
  const int peer_;
  const uint64_t comm_id_;
  const uint64_t tag_;
  const size_t bytes_;
  std::atomic<State> state_{State::Pending};
  std::atomic<bool> claimed_{false};
  std::exception_ptr error_;
};

using RequestPtr = std::shared_ptr<Request>;

// The error that failed a whole transport (fail_all): the first one set
// wins and stays. failed() is a cheap check for hot paths. Thread-safe.
class FirstError {
 public:
  // Records error unless one is recorded already.
  void set(std::exception_ptr error) EXCLUDES(mu_) {
    MutexLock lk(&mu_);
    if (!failed_.load()) {
      error_ = std::move(error);
      failed_.store(true);
    }
  }
  bool failed() const { return failed_.load(); }
  // The recorded error (null while none is).
  std::exception_ptr get() const EXCLUDES(mu_) {
    MutexLock lk(&mu_);
    return error_;
  }

 private:
  mutable Mutex mu_;
  std::exception_ptr error_ GUARDED_BY(mu_);
  std::atomic<bool> failed_{false};
};

}  // namespace weft::transport
