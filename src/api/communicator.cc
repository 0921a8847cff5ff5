// weft::Communicator: validates the caller's arguments, numbers the
// collectives, and dispatches into comm/ (point-to-point, groups, failure)
// and collectives/ (the algorithms), on the caller's thread for blocking
// calls and on the world's collective thread for _async ones.
#include "weft/communicator.h"

#include <fmt/format.h>

#include <numeric>

#include "api/access.h"
#include "collectives/collectives.h"
#include "comm/group.h"
#include "comm/work.h"
#include "core/error_context.h"
#include "weft/errors.h"

namespace weft {

namespace {

void check_buffer(const ConstBuffer& b, const char* op, const char* which) {
  if (!b.device().is_cpu()) {
    throw InvalidArgument(
        fmt::format("{}: the {} buffer is not CPU memory (no CUDA transport yet)", op, which));
  }
  if (b.data() == nullptr && b.count() > 0) {
    throw InvalidArgument(fmt::format("{}: null {} buffer with {} elements", op, which, b.count()));
  }
  if (static_cast<int>(b.dtype()) >= kNumDTypes) {
    throw InvalidArgument(fmt::format("{}: unknown dtype {}", op, static_cast<int>(b.dtype())));
  }
}

void check_root(int root, int size, const char* what) {
  if (root < 0 || root >= size) {
    throw InvalidArgument(
        fmt::format("{}: root {} is out of range for a communicator of size {}", what, root, size));
  }
}

// The call of a collective with an input and an output buffer of one dtype.
coll::Call make_call(Collective kind, ConstBuffer in, Buffer out, Algorithm algorithm) {
  const char* what = collective_name(kind);
  check_buffer(in, what, "input");
  check_buffer(out, what, "output");
  if (in.count() > 0 && out.count() > 0 && in.dtype() != out.dtype()) {
    throw InvalidArgument(fmt::format("{}: input is {} but output is {}", what,
                                      dtype_name(in.dtype()), dtype_name(out.dtype())));
  }
  coll::Call c;
  c.kind = kind;
  c.in = in.data();
  c.out = out.data();
  c.dtype = in.count() > 0 ? in.dtype() : out.dtype();
  c.algorithm = algorithm;
  return c;
}

void expect_count(const char* what, const char* which, size_t got, size_t expected) {
  if (got != expected) {
    throw InvalidArgument(
        fmt::format("{}: the {} buffer has {} elements, expected {}", what, which, got, expected));
  }
}

// Runs a collective on the caller's thread, naming it (what(), only
// formatted on failure) in any error. A collective that fails part-way
// leaves requests in flight on its buffers and its peers out of step: the
// communicator is aborted (every rank learns it) before the error reaches
// the caller and the buffers are freed.
template <typename What, typename Fn>
void run_blocking(comm::Group& g, What&& what, Fn&& fn) {
  try {
    g.world().throw_if_failed();
    fn();
  } catch (const Error&) {
    g.world().abort_with(std::current_exception());
    rethrow_with_context(std::current_exception(), what());
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

// Validates, numbers and runs (or queues) a collective call.
void Communicator::run_call(coll::Call& call, Timeout timeout) {
  coll::validate(call, size(), rank());
  call.seq = group_->next_seq();
  call.deadline = group_->deadline(timeout);
  run_blocking(
      *group_, [&] { return call.describe(); }, [&] { coll::run(*group_, call); });
}

WorkPtr Communicator::submit_call(coll::Call& call, Timeout timeout) {
  coll::validate(call, size(), rank());
  call.seq = group_->next_seq();
  call.deadline = group_->deadline(timeout);
  auto g = group_;
  return run_async(g, call.describe(), call.deadline, [g, call] { coll::run(*g, call); });
}

std::shared_ptr<Communicator> Communicator::create(int rank, int size, std::shared_ptr<Store> store,
                                                   CommOptions options) {
  auto world = comm::World::create(rank, size, std::move(store), std::move(options));
  std::vector<int> members(static_cast<size_t>(size));
  std::iota(members.begin(), members.end(), 0);
  auto group = std::make_shared<comm::Group>(world, std::move(members), world->id());
  return api::CommunicatorAccess::make(std::move(group), true);
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
std::string Communicator::transports() const { return group_->world().transport_names(); }

WorkPtr Communicator::send(ConstBuffer buf, int dst, uint32_t tag, const SendOptions& opts) {
  check_buffer(buf, "send", "message");
  Deadline d = group_->deadline(opts.timeout);
  auto req = group_->isend(dst, comm::user_tag(tag), buf.data(), buf.bytes());
  return std::make_shared<comm::P2PWork>(group_, std::move(req), d);
}

WorkPtr Communicator::recv(Buffer buf, int src, uint32_t tag, const SendOptions& opts) {
  check_buffer(buf, "recv", "message");
  Deadline d = group_->deadline(opts.timeout);
  auto req = group_->irecv(src, comm::user_tag(tag), buf.data(), buf.bytes());
  return std::make_shared<comm::P2PWork>(group_, std::move(req), d);
}

namespace {
coll::Call barrier_call() {
  coll::Call c;
  c.kind = Collective::Barrier;
  return c;
}
}  // namespace

void Communicator::barrier(const BarrierOptions& opts) {
  auto c = barrier_call();
  run_call(c, opts.timeout);
}

WorkPtr Communicator::barrier_async(const BarrierOptions& opts) {
  auto c = barrier_call();
  return submit_call(c, opts.timeout);
}

namespace {
coll::Call broadcast_call(Buffer buf, const BroadcastOptions& o) {
  auto c = make_call(Collective::Broadcast, buf, buf, o.algorithm);
  c.count = buf.count();
  c.root = o.root;
  return c;
}
}  // namespace

void Communicator::broadcast(Buffer buf, const BroadcastOptions& opts) {
  auto c = broadcast_call(buf, opts);
  run_call(c, opts.timeout);
}

WorkPtr Communicator::broadcast_async(Buffer buf, const BroadcastOptions& opts) {
  auto c = broadcast_call(buf, opts);
  return submit_call(c, opts.timeout);
}

namespace {
coll::Call allreduce_call(ConstBuffer in, Buffer out, const AllreduceOptions& o) {
  auto c = make_call(Collective::Allreduce, in, out, o.algorithm);
  expect_count("allreduce", "output", out.count(), in.count());
  c.count = in.count();
  c.op = o.op;
  return c;
}
coll::Call reduce_call(ConstBuffer in, Buffer out, const ReduceOptions& o, int rank, int size) {
  check_root(o.root, size, "reduce");
  auto c = make_call(Collective::Reduce, in, out, o.algorithm);
  if (rank == o.root) expect_count("reduce", "output", out.count(), in.count());
  c.count = in.count();
  c.op = o.op;
  c.root = o.root;
  return c;
}
coll::Call reduce_scatter_call(ConstBuffer in, Buffer out, const ReduceScatterOptions& o,
                               int size) {
  auto c = make_call(Collective::ReduceScatter, in, out, o.algorithm);
  expect_count("reduce_scatter", "input", in.count(), out.count() * static_cast<size_t>(size));
  c.count = out.count();
  c.op = o.op;
  return c;
}
coll::Call allgather_call(ConstBuffer in, Buffer out, const CollectiveOptions& o, int size) {
  auto c = make_call(Collective::Allgather, in, out, o.algorithm);
  expect_count("allgather", "output", out.count(), in.count() * static_cast<size_t>(size));
  c.count = in.count();
  return c;
}
coll::Call allgatherv_call(ConstBuffer in, Buffer out, std::span<const size_t> counts,
                           const CollectiveOptions& o, int rank, int size) {
  auto c = make_call(Collective::Allgatherv, in, out, o.algorithm);
  if (counts.size() != static_cast<size_t>(size)) {
    throw InvalidArgument(fmt::format("allgatherv: {} counts for {} ranks", counts.size(), size));
  }
  c.counts.assign(counts.begin(), counts.end());
  size_t total = 0;
  for (size_t x : counts) total += x;
  expect_count("allgatherv", "input", in.count(), counts[static_cast<size_t>(rank)]);
  expect_count("allgatherv", "output", out.count(), total);
  c.count = total;
  return c;
}
coll::Call rooted_call(Collective kind, ConstBuffer in, Buffer out, const RootedOptions& o,
                       int rank, int size) {
  const char* what = collective_name(kind);
  check_root(o.root, size, what);
  auto c = make_call(kind, in, out, o.algorithm);
  c.root = o.root;
  if (kind == Collective::Gather) {
    if (rank == o.root)
      expect_count(what, "output", out.count(), in.count() * static_cast<size_t>(size));
    c.count = in.count();
  } else {
    if (rank == o.root)
      expect_count(what, "input", in.count(), out.count() * static_cast<size_t>(size));
    c.count = out.count();
  }
  return c;
}
coll::Call alltoall_call(ConstBuffer in, Buffer out, const CollectiveOptions& o, int size) {
  auto c = make_call(Collective::Alltoall, in, out, o.algorithm);
  expect_count("alltoall", "output", out.count(), in.count());
  if (in.count() % static_cast<size_t>(size) != 0) {
    throw InvalidArgument(
        fmt::format("alltoall: {} elements do not split into {} equal blocks", in.count(), size));
  }
  c.count = in.count() / static_cast<size_t>(size);
  return c;
}
coll::Call alltoallv_call(ConstBuffer in, std::span<const size_t> send_counts, Buffer out,
                          std::span<const size_t> recv_counts, const CollectiveOptions& o,
                          int size) {
  auto c = make_call(Collective::Alltoallv, in, out, o.algorithm);
  if (send_counts.size() != static_cast<size_t>(size) ||
      recv_counts.size() != static_cast<size_t>(size)) {
    throw InvalidArgument(
        fmt::format("alltoallv: {} send counts and {} receive counts for {} ranks",
                    send_counts.size(), recv_counts.size(), size));
  }
  size_t s = 0, r = 0;
  for (size_t x : send_counts) s += x;
  for (size_t x : recv_counts) r += x;
  if (s > in.count())
    throw InvalidArgument(
        fmt::format("alltoallv: send counts add up to {} but the input has {}", s, in.count()));
  if (r > out.count())
    throw InvalidArgument(fmt::format(
        "alltoallv: receive counts add up to {} but the output has {}", r, out.count()));
  c.counts.assign(send_counts.begin(), send_counts.end());
  c.recv_counts.assign(recv_counts.begin(), recv_counts.end());
  c.count = s;
  return c;
}
}  // namespace

void Communicator::allreduce(ConstBuffer in, Buffer out, const AllreduceOptions& opts) {
  auto c = allreduce_call(in, out, opts);
  run_call(c, opts.timeout);
}
WorkPtr Communicator::allreduce_async(ConstBuffer in, Buffer out, const AllreduceOptions& opts) {
  auto c = allreduce_call(in, out, opts);
  return submit_call(c, opts.timeout);
}
void Communicator::reduce(ConstBuffer in, Buffer out, const ReduceOptions& opts) {
  auto c = reduce_call(in, out, opts, rank(), size());
  run_call(c, opts.timeout);
}
WorkPtr Communicator::reduce_async(ConstBuffer in, Buffer out, const ReduceOptions& opts) {
  auto c = reduce_call(in, out, opts, rank(), size());
  return submit_call(c, opts.timeout);
}
void Communicator::reduce_scatter(ConstBuffer in, Buffer out, const ReduceScatterOptions& opts) {
  auto c = reduce_scatter_call(in, out, opts, size());
  run_call(c, opts.timeout);
}
WorkPtr Communicator::reduce_scatter_async(ConstBuffer in, Buffer out,
                                           const ReduceScatterOptions& opts) {
  auto c = reduce_scatter_call(in, out, opts, size());
  return submit_call(c, opts.timeout);
}
void Communicator::allgather(ConstBuffer in, Buffer out, const CollectiveOptions& opts) {
  auto c = allgather_call(in, out, opts, size());
  run_call(c, opts.timeout);
}
WorkPtr Communicator::allgather_async(ConstBuffer in, Buffer out, const CollectiveOptions& opts) {
  auto c = allgather_call(in, out, opts, size());
  return submit_call(c, opts.timeout);
}
void Communicator::allgatherv(ConstBuffer in, Buffer out, std::span<const size_t> counts,
                              const CollectiveOptions& opts) {
  auto c = allgatherv_call(in, out, counts, opts, rank(), size());
  run_call(c, opts.timeout);
}
WorkPtr Communicator::allgatherv_async(ConstBuffer in, Buffer out, std::span<const size_t> counts,
                                       const CollectiveOptions& opts) {
  auto c = allgatherv_call(in, out, counts, opts, rank(), size());
  return submit_call(c, opts.timeout);
}
void Communicator::gather(ConstBuffer in, Buffer out, const RootedOptions& opts) {
  auto c = rooted_call(Collective::Gather, in, out, opts, rank(), size());
  run_call(c, opts.timeout);
}
WorkPtr Communicator::gather_async(ConstBuffer in, Buffer out, const RootedOptions& opts) {
  auto c = rooted_call(Collective::Gather, in, out, opts, rank(), size());
  return submit_call(c, opts.timeout);
}
void Communicator::scatter(ConstBuffer in, Buffer out, const RootedOptions& opts) {
  auto c = rooted_call(Collective::Scatter, in, out, opts, rank(), size());
  run_call(c, opts.timeout);
}
WorkPtr Communicator::scatter_async(ConstBuffer in, Buffer out, const RootedOptions& opts) {
  auto c = rooted_call(Collective::Scatter, in, out, opts, rank(), size());
  return submit_call(c, opts.timeout);
}
void Communicator::alltoall(ConstBuffer in, Buffer out, const CollectiveOptions& opts) {
  auto c = alltoall_call(in, out, opts, size());
  run_call(c, opts.timeout);
}
WorkPtr Communicator::alltoall_async(ConstBuffer in, Buffer out, const CollectiveOptions& opts) {
  auto c = alltoall_call(in, out, opts, size());
  return submit_call(c, opts.timeout);
}
void Communicator::alltoallv(ConstBuffer in, std::span<const size_t> send_counts, Buffer out,
                             std::span<const size_t> recv_counts, const CollectiveOptions& opts) {
  auto c = alltoallv_call(in, send_counts, out, recv_counts, opts, size());
  run_call(c, opts.timeout);
}
WorkPtr Communicator::alltoallv_async(ConstBuffer in, std::span<const size_t> send_counts,
                                      Buffer out, std::span<const size_t> recv_counts,
                                      const CollectiveOptions& opts) {
  auto c = alltoallv_call(in, send_counts, out, recv_counts, opts, size());
  return submit_call(c, opts.timeout);
}

Algorithm Communicator::selected_algorithm(Collective kind, size_t count, DType dtype) const {
  coll::Call c;
  c.kind = kind;
  c.count = count;
  c.dtype = dtype;
  return coll::select(c, coll::topology(*group_));
}

std::shared_ptr<Communicator> Communicator::split(int color, const SplitOptions& opts) {
  Deadline d = group_->deadline(opts.timeout);
  const int key = opts.key;
  std::shared_ptr<comm::Group> child;
  run_blocking(
      *group_, [] { return std::string("split"); }, [&] { child = group_->split(color, key, d); });
  if (!child) return nullptr;
  return api::CommunicatorAccess::make(std::move(child), false);
}

void Communicator::abort(const std::string& reason) { comm::abort_world(*group_, reason); }

std::exception_ptr Communicator::error() const { return group_->world().error(); }

}  // namespace weft
