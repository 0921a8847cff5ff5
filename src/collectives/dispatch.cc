// Validation of calls, and running them with a plan from the group's cache.
#include <fmt/format.h>

#include <algorithm>
#include <map>

#include "collectives/collectives.h"
#include "collectives/plan.h"
#include "core/describe.h"
#include "core/enforce.h"
#include "weft/errors.h"

namespace weft::coll {

bool supports(Kind k, Algorithm a);
std::unique_ptr<Plan> make_ring_plan(comm::Group& g);
std::unique_ptr<Plan> make_doubling_plan(comm::Group& g, bool halving);
std::unique_ptr<Plan> make_tree_plan(comm::Group& g, Algorithm algo);
std::unique_ptr<Plan> make_hierarchical_plan(comm::Group& g);

std::string Call::describe() const {
  return describe_collective(kind, seq, dtype, count, op, root, algorithm);
}

transport::OpDesc Call::desc() const {
  transport::OpDesc d;
  d.kind = static_cast<uint8_t>(kind);
  d.dtype = static_cast<uint8_t>(dtype);
  d.op = static_cast<uint8_t>(op);
  d.flags = static_cast<uint8_t>(algorithm);
  d.root = static_cast<uint32_t>(root);
  // alltoallv counts legitimately differ between ranks: sizes are checked per message.
  d.count = kind == Kind::Alltoallv ? 0 : count;
  d.seq = seq;
  return d;
}

namespace {

bool rooted(Kind k) {
  return k == Kind::Broadcast || k == Kind::Reduce || k == Kind::Gather || k == Kind::Scatter;
}
bool reducing(Kind k) {
  return k == Kind::Allreduce || k == Kind::Reduce || k == Kind::ReduceScatter;
}

// [a, a + an) and [b, b + bn) share bytes.
bool overlap(const void* a, size_t an, const void* b, size_t bn) {
  if (an == 0 || bn == 0) return false;
  auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  return pa < pb + bn && pb < pa + an;
}

}  // namespace

void validate(const Call& c, int n, int r) {
  const std::string what = collective_name(c.kind);
  if (static_cast<int>(c.dtype) >= kNumDTypes) {
    throw InvalidArgument(fmt::format("{}: unknown dtype {}", what, static_cast<int>(c.dtype)));
  }
  if (reducing(c.kind)) {
    if (static_cast<int>(c.op) >= kNumReduceOps) {
      throw InvalidArgument(fmt::format("{}: unknown reduce op {}", what, static_cast<int>(c.op)));
    }
    if (c.op == ReduceOp::Avg && !dtype_is_floating(c.dtype)) {
      throw InvalidArgument(
          fmt::format("{}: avg is not defined for integer type {} (use sum and divide)", what,
                      dtype_name(c.dtype)));
    }
  }
  if (rooted(c.kind) && (c.root < 0 || c.root >= n)) {
    throw InvalidArgument(
        fmt::format("{}: root {} is out of range for a communicator of size {}", what, c.root, n));
  }
  if (c.algorithm != Algorithm::Auto && !supports(c.kind, c.algorithm)) {
    throw InvalidArgument(fmt::format("{}: algorithm {} is not available for this collective", what,
                                      algorithm_name(c.algorithm)));
  }
  const size_t es = c.esize();
  const size_t un = static_cast<size_t>(n);
  // Bytes read from in and written to out on this rank.
  size_t in_bytes = 0, out_bytes = 0;
  switch (c.kind) {
    case Kind::Barrier: break;
    case Kind::Broadcast: in_bytes = out_bytes = c.count * es; break;
    case Kind::Allreduce: in_bytes = out_bytes = c.count * es; break;
    case Kind::Reduce:
      in_bytes = c.count * es;
      out_bytes = r == c.root ? c.count * es : 0;
      break;
    case Kind::ReduceScatter:
      in_bytes = c.count * un * es;
      out_bytes = c.count * es;
      break;
    case Kind::Allgather:
      in_bytes = c.count * es;
      out_bytes = c.count * un * es;
      break;
    case Kind::Allgatherv: {
      if (c.counts.size() != un) {
        throw InvalidArgument(
            fmt::format("allgatherv: {} counts for {} ranks", c.counts.size(), n));
      }
      size_t total = 0;
      for (size_t x : c.counts) total += x;
      WEFT_ENFORCE_EQ(total, c.count, "allgatherv: the sum of the counts");
      in_bytes = c.counts[r] * es;
      out_bytes = total * es;
      break;
    }
    case Kind::Gather:
      in_bytes = c.count * es;
      out_bytes = r == c.root ? c.count * un * es : 0;
      break;
    case Kind::Scatter:
      in_bytes = r == c.root ? c.count * un * es : 0;
      out_bytes = c.count * es;
      break;
    case Kind::Alltoall: in_bytes = out_bytes = c.count * un * es; break;
    case Kind::Alltoallv: {
      if (c.counts.size() != un || c.recv_counts.size() != un) {
        throw InvalidArgument(
            fmt::format("alltoallv: {} send counts and {} receive counts for {} ranks",
                        c.counts.size(), c.recv_counts.size(), n));
      }
      for (size_t x : c.counts) in_bytes += x * es;
      for (size_t x : c.recv_counts) out_bytes += x * es;
      break;
    }
  }
  if (in_bytes > 0 && c.in == nullptr)
    throw InvalidArgument(fmt::format("{}: null input buffer", what));
  if (out_bytes > 0 && c.out == nullptr)
    throw InvalidArgument(fmt::format("{}: null output buffer", what));
  // Buffers must not overlap, except in the documented in-place forms.
  bool in_place = false;
  switch (c.kind) {
    case Kind::Broadcast:
    case Kind::Allreduce:
    case Kind::Reduce: in_place = c.in == c.out; break;
    case Kind::ReduceScatter:
      in_place = c.out == static_cast<const uint8_t*>(c.in) + static_cast<size_t>(r) * c.count * es;
      break;
    case Kind::Allgather:
      in_place = c.in == static_cast<uint8_t*>(c.out) + static_cast<size_t>(r) * c.count * es;
      break;
    case Kind::Allgatherv: {
      size_t off = 0;
      for (int j = 0; j < r; ++j) off += c.counts[j];
      in_place = c.in == static_cast<uint8_t*>(c.out) + off * es;
      break;
    }
    case Kind::Gather:
      in_place = r == c.root &&
                 c.in == static_cast<uint8_t*>(c.out) + static_cast<size_t>(r) * c.count * es;
      break;
    case Kind::Scatter:
      in_place = r == c.root &&
                 c.out == static_cast<const uint8_t*>(c.in) + static_cast<size_t>(r) * c.count * es;
      break;
    default: break;
  }
  if (!in_place && overlap(c.in, in_bytes, c.out, out_bytes)) {
    throw InvalidArgument(fmt::format(
        "{}: the input and output buffers overlap (and this is not the in-place form)", what));
  }
}

std::unique_ptr<Plan> make_plan(Kind kind, Algorithm algorithm, comm::Group& g) {
  switch (algorithm) {
    case Algorithm::Ring: return make_ring_plan(g);
    case Algorithm::HalvingDoubling: return make_doubling_plan(g, true);
    case Algorithm::RecursiveDoubling: return make_doubling_plan(g, false);
    case Algorithm::Tree:
    case Algorithm::Linear:
    case Algorithm::Pairwise:
    case Algorithm::Dissemination: return make_tree_plan(g, algorithm);
    case Algorithm::Hierarchical: return make_hierarchical_plan(g);
    case Algorithm::Auto: break;
  }
  WEFT_UNREACHABLE("no plan for {} with {}", collective_name(kind), algorithm_name(algorithm));
}

std::unique_ptr<Plan> PlanCache::acquire(Kind kind, Algorithm algorithm, comm::Group& g) {
  {
    MutexLock lk(&mu_);
    auto& v = idle_[{kind, algorithm}];
    if (!v.empty()) {
      auto p = std::move(v.back());
      v.pop_back();
      return p;
    }
  }
  return make_plan(kind, algorithm, g);
}

void PlanCache::release(Kind kind, Algorithm algorithm, std::unique_ptr<Plan> plan) {
  MutexLock lk(&mu_);
  idle_[{kind, algorithm}].push_back(std::move(plan));
}

namespace {
// Registers the call with its world for the duration of the run, so that a
// peer's message for the same collective number that disagrees is caught
// even if this rank never posts a receive for it.
class ActiveCall {
 public:
  ActiveCall(comm::Group& g, const Call& c) : g_(g), id_(g.id()), seq_(c.seq) {
    g_.world().begin_collective(id_, c.desc());
  }
  ~ActiveCall() { g_.world().end_collective(id_, seq_); }
  ActiveCall(const ActiveCall&) = delete;
  ActiveCall& operator=(const ActiveCall&) = delete;

 private:
  comm::Group& g_;
  uint64_t id_, seq_;
};
}  // namespace

namespace {
PlanCache& plan_cache(comm::Group& g) {
  return g.extension<PlanCache>([&] { return std::make_shared<PlanCache>(Topology::of(g)); });
}
}  // namespace

const Topology& topology(comm::Group& g) { return plan_cache(g).topology(); }

Topology Topology::single_host(int n) {
  Topology t;
  t.hosts.emplace_back();
  for (int r = 0; r < n; ++r) {
    t.host_of.push_back(0);
    t.local_of.push_back(r);
    t.hosts[0].push_back(r);
  }
  t.min_local = t.max_local = n;
  return t;
}

Topology Topology::one_per_host(int n) {
  Topology t;
  for (int r = 0; r < n; ++r) {
    t.host_of.push_back(r);
    t.local_of.push_back(0);
    t.hosts.push_back({r});
  }
  return t;
}

Topology Topology::of(comm::Group& g) {
  Topology t;
  std::map<std::string, int> index;  // host id -> host index
  const auto& ranks = g.world().ranks();
  for (int r = 0; r < g.size(); ++r) {
    const std::string& id = ranks[static_cast<size_t>(g.world_rank(r))].host_id;
    auto [it, fresh] = index.emplace(id, static_cast<int>(t.hosts.size()));
    if (fresh) t.hosts.emplace_back();
    auto& members = t.hosts[static_cast<size_t>(it->second)];
    t.host_of.push_back(it->second);
    t.local_of.push_back(static_cast<int>(members.size()));
    members.push_back(r);
  }
  t.min_local = t.max_local = static_cast<int>(t.hosts.front().size());
  for (const auto& h : t.hosts) {
    t.min_local = std::min(t.min_local, static_cast<int>(h.size()));
    t.max_local = std::max(t.max_local, static_cast<int>(h.size()));
  }
  return t;
}

void run(comm::Group& g, Call call) {
  auto& cache = plan_cache(g);
  call.algorithm = select(call, cache.topology());
  auto plan = cache.acquire(call.kind, call.algorithm, g);
  ActiveCall active(g, call);
  try {
    plan->run(g, call);
  } catch (...) {
    // Receives of the failed call may still be in a transport, which would
    // go on writing into the plan's scratch and calling its consumers
    // (Request::consume). The world is aborted first (abort_with returns
    // once no request can be written to any more); only then is the plan
    // dropped: a plan whose call failed is not reused.
    g.world().abort_with(std::current_exception());
    throw;
  }
  cache.release(call.kind, call.algorithm, std::move(plan));
}

}  // namespace weft::coll
