// weft::Communicator: validates the caller's arguments, numbers the
// collectives, and dispatches into comm/ (point-to-point, groups, failure)
// and collectives/ (the algorithms), on the caller's thread for blocking
// calls and on the world's collective thread for _async ones.
#include "weft/communicator.h"

#include <fmt/format.h>

#include <numeric>

#include "collectives/collectives.h"
#include "comm/group.h"
#include "comm/work.h"
#include "core/error_context.h"
#include "weft/errors.h"

namespace weft {

namespace {

void check_buffer(const ConstBuffer& b, const char* op) {
  if (!b.device().is_cpu()) {
    throw InvalidArgument(
        fmt::format("{}: only CPU buffers are supported (no CUDA transport yet)", op));
  }
  if (b.data() == nullptr && b.count() > 0) {
    throw InvalidArgument(fmt::format("{}: null buffer with {} elements", op, b.count()));
  }
  if (static_cast<int>(b.dtype()) >= kNumDTypes) {
    throw InvalidArgument(fmt::format("{}: unknown dtype {}", op, static_cast<int>(b.dtype())));
  }
}

void check_op(DType dtype, ReduceOp op, const char* what) {
  if (static_cast<int>(op) >= kNumReduceOps) {
    throw InvalidArgument(fmt::format("{}: unknown reduce op {}", what, static_cast<int>(op)));
  }
  if (op == ReduceOp::Avg && !dtype_is_floating(dtype)) {
    throw InvalidArgument(
        fmt::format("{}: avg is not defined for integer type {} (use sum and divide)", what,
                    dtype_name(dtype)));
  }
}

void check_root(int root, int size, const char* what) {
  if (root < 0 || root >= size) {
    throw InvalidArgument(
        fmt::format("{}: root {} is out of range for a communicator of size {}", what, root, size));
  }
}

// Runs a collective on the caller's thread, naming it in any error. A
// collective that fails part-way leaves requests in flight on its buffers
// and its peers out of step: the communicator is aborted (every rank
// learns it) before the error reaches the caller and the buffers are freed.
template <typename Fn>
void run_blocking(comm::Group& g, const std::string& what, Fn&& fn) {
  try {
    g.world().throw_if_failed();
    fn();
  } catch (const Error&) {
    g.world().abort_with(std::current_exception());
    rethrow_with_context(std::current_exception(), what);
  }
}

// Queues a collective on the world's collective thread.
template <typename Fn>
WorkPtr run_async(const std::shared_ptr<comm::Group>& g, std::string what, const Deadline& deadline,
                  Fn fn) {
  auto work = std::make_shared<comm::CollectiveWork>(g, what, deadline);
  g->world().submit([g, work, what = std::move(what), fn = std::move(fn)]() mutable {
    std::exception_ptr error;
    try {
      try {
        g->world().throw_if_failed();
        fn();
      } catch (const Error&) {
        g->world().abort_with(std::current_exception());
        rethrow_with_context(std::current_exception(), what);
      }
    } catch (...) {
      error = std::current_exception();
    }
    work->finish(error);
  });
  return work;
}

}  // namespace

std::shared_ptr<Communicator> Communicator::create(int rank, int size, std::shared_ptr<Store> store,
                                                   CommOptions options) {
  auto world = comm::World::create(rank, size, std::move(store), std::move(options));
  std::vector<int> members(static_cast<size_t>(size));
  std::iota(members.begin(), members.end(), 0);
  auto group = std::make_shared<comm::Group>(world, std::move(members), world->id());
  return std::make_shared<Communicator>(std::move(group), true);
}

Communicator::Communicator(std::shared_ptr<comm::Group> group, bool owns_world)
    : group_(std::move(group)), owns_world_(owns_world) {}

Communicator::~Communicator() {
  if (owns_world_ && group_) group_->world().shutdown();
}

int Communicator::rank() const { return group_->rank(); }
int Communicator::size() const { return group_->size(); }
int Communicator::local_rank() const { return group_->local_rank(); }
int Communicator::local_size() const { return group_->local_size(); }
const std::string& Communicator::host_of(int rank) const {
  check_root(rank, size(), "host_of");
  return group_->host_of(rank);
}
uint32_t Communicator::generation() const { return group_->world().generation(); }
const CommOptions& Communicator::options() const { return group_->world().options(); }

WorkPtr Communicator::send(ConstBuffer buf, int dst, uint32_t tag, const SendOptions& opts) {
  check_buffer(buf, "send");
  Deadline d = group_->deadline(opts.timeout);
  auto req = group_->isend(dst, comm::user_tag(tag), buf.data(), buf.bytes());
  return std::make_shared<comm::P2PWork>(group_, std::move(req), d);
}

WorkPtr Communicator::recv(Buffer buf, int src, uint32_t tag, const SendOptions& opts) {
  check_buffer(buf, "recv");
  Deadline d = group_->deadline(opts.timeout);
  auto req = group_->irecv(src, comm::user_tag(tag), buf.data(), buf.bytes());
  return std::make_shared<comm::P2PWork>(group_, std::move(req), d);
}

void Communicator::barrier(const BarrierOptions& opts) {
  uint64_t seq = group_->next_seq();
  Deadline d = group_->deadline(opts.timeout);
  run_blocking(*group_, coll::describe(coll::Kind::Barrier, seq, DType::UInt8, 0, ReduceOp::Sum, 0),
               [&] { coll::barrier(*group_, seq, d); });
}

WorkPtr Communicator::barrier_async(const BarrierOptions& opts) {
  uint64_t seq = group_->next_seq();
  Deadline d = group_->deadline(opts.timeout);
  auto g = group_;
  return run_async(g, coll::describe(coll::Kind::Barrier, seq, DType::UInt8, 0, ReduceOp::Sum, 0),
                   d, [g, seq, d] { coll::barrier(*g, seq, d); });
}

void Communicator::broadcast(Buffer buf, const BroadcastOptions& opts) {
  check_buffer(buf, "broadcast");
  check_root(opts.root, size(), "broadcast");
  uint64_t seq = group_->next_seq();
  Deadline d = group_->deadline(opts.timeout);
  run_blocking(*group_,
               coll::describe(coll::Kind::Broadcast, seq, buf.dtype(), buf.count(), ReduceOp::Sum,
                              opts.root),
               [&] { coll::broadcast(*group_, buf, opts.root, seq, d); });
}

WorkPtr Communicator::broadcast_async(Buffer buf, const BroadcastOptions& opts) {
  check_buffer(buf, "broadcast");
  check_root(opts.root, size(), "broadcast");
  uint64_t seq = group_->next_seq();
  Deadline d = group_->deadline(opts.timeout);
  auto g = group_;
  int root = opts.root;
  return run_async(
      g, coll::describe(coll::Kind::Broadcast, seq, buf.dtype(), buf.count(), ReduceOp::Sum, root),
      d, [g, buf, root, seq, d] { coll::broadcast(*g, buf, root, seq, d); });
}

void Communicator::allreduce(Buffer buf, const AllreduceOptions& opts) {
  check_buffer(buf, "allreduce");
  check_op(buf.dtype(), opts.op, "allreduce");
  uint64_t seq = group_->next_seq();
  Deadline d = group_->deadline(opts.timeout);
  run_blocking(*group_,
               coll::describe(coll::Kind::Allreduce, seq, buf.dtype(), buf.count(), opts.op, 0),
               [&] { coll::allreduce(*group_, buf, opts.op, seq, d); });
}

WorkPtr Communicator::allreduce_async(Buffer buf, const AllreduceOptions& opts) {
  check_buffer(buf, "allreduce");
  check_op(buf.dtype(), opts.op, "allreduce");
  uint64_t seq = group_->next_seq();
  Deadline d = group_->deadline(opts.timeout);
  auto g = group_;
  ReduceOp op = opts.op;
  return run_async(g, coll::describe(coll::Kind::Allreduce, seq, buf.dtype(), buf.count(), op, 0),
                   d, [g, buf, op, seq, d] { coll::allreduce(*g, buf, op, seq, d); });
}

std::shared_ptr<Communicator> Communicator::split(int color, int key, Timeout timeout) {
  Deadline d = group_->deadline(timeout);
  std::shared_ptr<comm::Group> child;
  run_blocking(*group_, "split", [&] { child = group_->split(color, key, d); });
  if (!child) return nullptr;
  return std::make_shared<Communicator>(std::move(child), false);
}

void Communicator::abort(const std::string& reason) { comm::abort_world(*group_, reason); }

std::exception_ptr Communicator::error() const { return group_->world().error(); }

}  // namespace weft
