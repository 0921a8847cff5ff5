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
#include <span>
#include <string>

#include "weft/options.h"
#include "weft/store.h"
#include "weft/types.h"
#include "weft/work.h"

namespace weft {

namespace comm {
class Group;
}
namespace coll {
struct Call;
}
namespace api {
struct CommunicatorAccess;
}

// Options of the collectives. timeout: deadline of the call, counted from
// the call (kDefaultTimeout: CommOptions::timeout). algorithm: Auto or one
// the collective supports (InvalidArgument otherwise).
struct BarrierOptions {
  Timeout timeout = kDefaultTimeout;
};

struct BroadcastOptions {
  int root = 0;
  Timeout timeout = kDefaultTimeout;
  Algorithm algorithm = Algorithm::Auto;
};

struct AllreduceOptions {
  ReduceOp op = ReduceOp::Sum;
  Timeout timeout = kDefaultTimeout;
  Algorithm algorithm = Algorithm::Auto;
};

struct ReduceOptions {
  ReduceOp op = ReduceOp::Sum;
  int root = 0;
  Timeout timeout = kDefaultTimeout;
  Algorithm algorithm = Algorithm::Auto;
};

struct ReduceScatterOptions {
  ReduceOp op = ReduceOp::Sum;
  Timeout timeout = kDefaultTimeout;
  Algorithm algorithm = Algorithm::Auto;
};

// gather and scatter.
struct RootedOptions {
  int root = 0;
  Timeout timeout = kDefaultTimeout;
  Algorithm algorithm = Algorithm::Auto;
};

// allgather, allgatherv, alltoall, alltoallv.
struct CollectiveOptions {
  Timeout timeout = kDefaultTimeout;
  Algorithm algorithm = Algorithm::Auto;
};

struct SendOptions {
  Timeout timeout = kDefaultTimeout;
};

// split(). key: place in the new communicator, ordered by (key, rank of
// this communicator); the default keeps this communicator's order.
struct SplitOptions {
  int key = 0;
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
  // The transports carrying this rank's data, e.g. "tcp" or "tcp+shm".
  std::string transports() const;

  // ---- Point-to-point ----------------------------------------------------
  // Sends buf to rank dst with a user tag. The matching recv must be posted
  // with the same byte count. The Work completes when buf may be reused.
  WorkPtr send(ConstBuffer buf, int dst, uint32_t tag, const SendOptions& opts = {});
  // Receives into buf from rank src, matching the oldest send from src with
  // the same tag. A message of another size fails with weft::MismatchError.
  WorkPtr recv(Buffer buf, int src, uint32_t tag, const SendOptions& opts = {});

  // ---- Collectives ------------------------------------------------------
  // Every rank calls the same collective with matching arguments (same
  // dtype, counts, op and root). Blocking forms return when this rank's
  // result is in place (or throw); the _async forms return at once with a
  // Work and run on the communicator's collective thread, in issue order.
  //
  // Buffers: `in` is read, `out` is written; they must not overlap except in
  // the in-place forms each collective names. Counts are in elements.
  // Reductions: every rank receives a bitwise-identical result; Float16 and
  // BFloat16 are accumulated in float32 and rounded once; Avg divides the
  // sum by size() and is rejected for integer dtypes.
  //
  // A collective that fails (a peer died, a deadline passed, ranks
  // disagree) aborts the communicator before it returns, so that no
  // transfer is still writing into the caller's buffers.

  void barrier(const BarrierOptions& opts = {});
  WorkPtr barrier_async(const BarrierOptions& opts = {});

  // Copies root's buf to every rank's buf.
  void broadcast(Buffer buf, const BroadcastOptions& opts = {});
  void broadcast(Buffer buf, int root) { broadcast(buf, BroadcastOptions{root}); }
  WorkPtr broadcast_async(Buffer buf, const BroadcastOptions& opts = {});

  // out[i] = op over ranks of in[i]; in and out have the same count. In
  // place: allreduce(buf) (or in.data() == out.data()).
  void allreduce(ConstBuffer in, Buffer out, const AllreduceOptions& opts = {});
  void allreduce(Buffer buf, const AllreduceOptions& opts) { allreduce(buf, buf, opts); }
  void allreduce(Buffer buf, ReduceOp op = ReduceOp::Sum) {
    allreduce(buf, buf, AllreduceOptions{op});
  }
  WorkPtr allreduce_async(ConstBuffer in, Buffer out, const AllreduceOptions& opts = {});
  WorkPtr allreduce_async(Buffer buf, const AllreduceOptions& opts) {
    return allreduce_async(buf, buf, opts);
  }
  WorkPtr allreduce_async(Buffer buf, ReduceOp op = ReduceOp::Sum) {
    return allreduce_async(buf, buf, AllreduceOptions{op});
  }

  // Like allreduce, but only root receives the result in out (other ranks'
  // out is not written and may be empty). In place at root: in == out.
  void reduce(ConstBuffer in, Buffer out, const ReduceOptions& opts = {});
  WorkPtr reduce_async(ConstBuffer in, Buffer out, const ReduceOptions& opts = {});

  // in has size() * k elements; rank r receives in out (k elements) the
  // reduction of block r of every rank's in.
  void reduce_scatter(ConstBuffer in, Buffer out, const ReduceScatterOptions& opts = {});
  WorkPtr reduce_scatter_async(ConstBuffer in, Buffer out, const ReduceScatterOptions& opts = {});

  // out (size() * k elements) receives every rank's in (k elements) in rank
  // order. In place: in is block rank() of out.
  void allgather(ConstBuffer in, Buffer out, const CollectiveOptions& opts = {});
  WorkPtr allgather_async(ConstBuffer in, Buffer out, const CollectiveOptions& opts = {});

  // Like allgather with counts[r] elements from rank r (in has
  // counts[rank()] elements; out has their sum, packed in rank order).
  void allgatherv(ConstBuffer in, Buffer out, std::span<const size_t> counts,
                  const CollectiveOptions& opts = {});
  WorkPtr allgatherv_async(ConstBuffer in, Buffer out, std::span<const size_t> counts,
                           const CollectiveOptions& opts = {});

  // Root's out (size() * k elements) receives every rank's in (k elements)
  // in rank order; other ranks' out is not written.
  void gather(ConstBuffer in, Buffer out, const RootedOptions& opts = {});
  WorkPtr gather_async(ConstBuffer in, Buffer out, const RootedOptions& opts = {});

  // Rank r receives in out (k elements) block r of root's in (size() * k
  // elements); other ranks' in is not read.
  void scatter(ConstBuffer in, Buffer out, const RootedOptions& opts = {});
  WorkPtr scatter_async(ConstBuffer in, Buffer out, const RootedOptions& opts = {});

  // in and out have size() * k elements: block j of rank r's in goes to
  // block r of rank j's out.
  void alltoall(ConstBuffer in, Buffer out, const CollectiveOptions& opts = {});
  WorkPtr alltoall_async(ConstBuffer in, Buffer out, const CollectiveOptions& opts = {});

  // Like alltoall with send_counts[j] elements to rank j (packed in rank
  // order in in) and recv_counts[j] from rank j (packed in out). Rank j's
  // send_counts[r] must equal rank r's recv_counts[j].
  void alltoallv(ConstBuffer in, std::span<const size_t> send_counts, Buffer out,
                 std::span<const size_t> recv_counts, const CollectiveOptions& opts = {});
  WorkPtr alltoallv_async(ConstBuffer in, std::span<const size_t> send_counts, Buffer out,
                          std::span<const size_t> recv_counts, const CollectiveOptions& opts = {});

  // The algorithm Auto picks for `kind` on `count` elements of `dtype` on
  // this communicator (after WEFT_<COLLECTIVE>_ALGO), e.g. for benchmarks.
  Algorithm selected_algorithm(Collective kind, size_t count, DType dtype) const;

  // ---- Groups -----------------------------------------------------------
  // Collective over this communicator: ranks passing the same color form a
  // new communicator, ordered by (opts.key, rank). A negative color returns
  // nullptr (the rank joins no group). The new communicator shares this
  // one's connections and fails with it.
  std::shared_ptr<Communicator> split(int color, const SplitOptions& opts = {});

  // ---- Failure ----------------------------------------------------------
  // Aborts the communicator: every operation in flight and every later one
  // fails with weft::AbortedError, every waiter is woken, and the peers are
  // told (they fail with weft::PeerError naming this rank).
  void abort(const std::string& reason = "aborted by the application");
  // The error that broke the communicator, or null while it is healthy.
  std::exception_ptr error() const;

 private:
  // Built by create(), split() and weft::init() only (through
  // api::CommunicatorAccess, src/api/access.h, which also hands the group
  // behind this facade to in-tree code). The communicator that owns its
  // world (made by create() or init(), not by split()) closes it when
  // destroyed.
  friend struct api::CommunicatorAccess;
  Communicator(std::shared_ptr<comm::Group> group, bool owns_world);

  void run_call(coll::Call& call, Timeout timeout);
  WorkPtr submit_call(coll::Call& call, Timeout timeout);

  std::shared_ptr<comm::Group> group_;
  bool owns_world_ = false;
};

}  // namespace weft
