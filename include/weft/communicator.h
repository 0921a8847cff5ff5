// The Communicator: a group of ranks that exchange messages and run
// collectives together.
//
// Creating one: weft::init() (init.h) builds the world communicator from the
// environment of `weft run` (or mpirun, srun, torchrun);
// Communicator::create() builds one from a rank, a size and a Store, e.g.
// ranks as threads of one process sharing a MemoryStore.
//
// Thread safety:
//  * Every method may be called from any thread.
//  * Point-to-point: send/recv between a pair of ranks with the same tag are
//    matched in the order they were issued on each side (non-overtaking);
//    operations with different tags complete in any order.
//  * Collectives: every rank of the communicator must issue the same
//    collectives, with matching arguments, in the same order. Each
//    collective takes the next number in the communicator's sequence when it
//    is issued; if several threads issue collectives at once, the
//    application must make the order the same on every rank. Ranks that
//    disagree (another collective, another dtype, count, op or root at the
//    same position) fail with weft::MismatchError on every rank involved.
//  * Asynchronous collectives run in the order they were issued; several may
//    be in flight, and each completes its own Work.
//
// Failure: when a peer dies or stops answering, every pending and later
// operation that involves it fails on every rank, within its deadline, with
// weft::PeerError or weft::TimeoutError naming the operation and the failed
// rank (and its host). The failure is propagated to every rank, including
// ranks that never talked to the failed one. After that the communicator
// only throws; destroy it and create a new one (a new generation) to go on.
#pragma once

#include <cstdint>
#include <exception>
#include <memory>
#include <string>

#include "weft/options.h"
#include "weft/store.h"
#include "weft/types.h"
#include "weft/work.h"

namespace weft {

namespace comm {
class Group;
}

struct BroadcastOptions {
  int root = 0;
  Timeout timeout = kDefaultTimeout;
};

struct AllreduceOptions {
  ReduceOp op = ReduceOp::Sum;
  Timeout timeout = kDefaultTimeout;
};

struct BarrierOptions {
  Timeout timeout = kDefaultTimeout;
};

struct SendOptions {
  Timeout timeout = kDefaultTimeout;
};

class Communicator {
 public:
  // Builds a communicator of `size` ranks in which the caller is `rank`.
  // Every rank calls it with the same size and name; it returns once all of
  // them are connected (or throws TimeoutError / PeerError / StoreError when
  // they are not within options.timeout).
  static std::shared_ptr<Communicator> create(int rank, int size, std::shared_ptr<Store> store,
                                              CommOptions options = CommOptions::from_env());

  // Fails operations still in flight with weft::AbortedError and closes the
  // connections. Peers see this rank leave (a graceful close is not a
  // failure once they have no pending operation with it).
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const;
  int size() const;
  // Rank among the ranks of the same host, and how many ranks that host has.
  int local_rank() const;
  int local_size() const;
  // Hostname of a rank (as published at rendezvous).
  const std::string& host_of(int rank) const;
  uint32_t generation() const;
  const CommOptions& options() const;

  // ---- Point-to-point ----------------------------------------------------
  // Sends buf to rank dst with a user tag. The matching recv must be posted
  // with the same byte count. The Work completes when buf may be reused.
  WorkPtr send(ConstBuffer buf, int dst, uint32_t tag, const SendOptions& opts = {});
  // Receives into buf from rank src, matching the oldest send from src with
  // the same tag. A message of another size fails with weft::MismatchError.
  WorkPtr recv(Buffer buf, int src, uint32_t tag, const SendOptions& opts = {});

  // ---- Collectives ------------------------------------------------------
  // Blocking forms return when the result is in the buffer (or throw); the
  // _async forms return at once with a Work.
  void barrier(const BarrierOptions& opts = {});
  WorkPtr barrier_async(const BarrierOptions& opts = {});

  // Copies root's buf to every rank's buf (same count and dtype everywhere).
  void broadcast(Buffer buf, const BroadcastOptions& opts = {});
  void broadcast(Buffer buf, int root) { broadcast(buf, BroadcastOptions{root}); }
  WorkPtr broadcast_async(Buffer buf, const BroadcastOptions& opts = {});

  // Reduces buf element-wise over all ranks, in place: every rank receives a
  // bitwise-identical result. Float16 and BFloat16 are accumulated in float32.
  void allreduce(Buffer buf, const AllreduceOptions& opts);
  void allreduce(Buffer buf, ReduceOp op = ReduceOp::Sum) { allreduce(buf, AllreduceOptions{op}); }
  WorkPtr allreduce_async(Buffer buf, const AllreduceOptions& opts);
  WorkPtr allreduce_async(Buffer buf, ReduceOp op = ReduceOp::Sum) {
    return allreduce_async(buf, AllreduceOptions{op});
  }

  // ---- Groups -----------------------------------------------------------
  // Collective over this communicator: ranks passing the same color form a
  // new communicator, ordered by (key, rank). A negative color returns
  // nullptr (the rank joins no group). The new communicator shares this
  // one's connections and fails with it.
  std::shared_ptr<Communicator> split(int color, int key, Timeout timeout = kDefaultTimeout);

  // ---- Failure ----------------------------------------------------------
  // Aborts the communicator: every operation in flight and every later one
  // fails with weft::AbortedError, every waiter is woken, and the peers are
  // told (they fail with weft::PeerError naming this rank).
  void abort(const std::string& reason = "aborted by the application");
  // The error that broke the communicator, or null while it is healthy.
  std::exception_ptr error() const;

  // Internal: the group behind this facade. The communicator that owns its
  // world (made by create() or init(), not by split()) closes it when
  // destroyed.
  Communicator(std::shared_ptr<comm::Group> group, bool owns_world);
  const std::shared_ptr<comm::Group>& group() const { return group_; }

 private:
  std::shared_ptr<comm::Group> group_;
  bool owns_world_ = false;
};

}  // namespace weft
