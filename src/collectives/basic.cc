// Simple, correct collectives: dissemination barrier, binomial-tree
// broadcast, ring allreduce (reduce-scatter + allgather).
#include <fmt/format.h>

#include <algorithm>
#include <vector>

#include "collectives/collectives.h"
#include "collectives/reduce_kernels.h"
#include "weft/errors.h"

namespace weft::coll {

using comm::collective_tag;

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::Barrier: return "barrier";
    case Kind::Broadcast: return "broadcast";
    case Kind::Allreduce: return "allreduce";
    case Kind::Reduce: return "reduce";
    case Kind::Allgather: return "allgather";
    case Kind::Allgatherv: return "allgatherv";
    case Kind::ReduceScatter: return "reduce_scatter";
    case Kind::Gather: return "gather";
    case Kind::Scatter: return "scatter";
    case Kind::Alltoall: return "alltoall";
    case Kind::Alltoallv: return "alltoallv";
  }
  return "collective";
}

transport::OpDesc make_desc(Kind kind, uint64_t seq, DType dtype, size_t count, ReduceOp op,
                            int root) {
  transport::OpDesc d;
  d.kind = static_cast<uint8_t>(kind);
  d.dtype = static_cast<uint8_t>(dtype);
  d.op = static_cast<uint8_t>(op);
  d.root = static_cast<uint32_t>(root);
  d.count = count;
  d.seq = seq;
  return d;
}

std::string describe(Kind kind, uint64_t seq, DType dtype, size_t count, ReduceOp op, int root) {
  switch (kind) {
    case Kind::Barrier: return fmt::format("barrier #{}", seq);
    case Kind::Broadcast:
      return fmt::format("broadcast #{} ({} x {}, root {})", seq, dtype_name(dtype), count, root);
    default:
      return fmt::format("{} #{} ({} x {}, {})", kind_name(kind), seq, dtype_name(dtype), count,
                         reduce_op_name(op));
  }
}

void barrier(comm::Group& g, uint64_t seq, const Deadline& deadline) {
  const int n = g.size(), r = g.rank();
  const auto desc = make_desc(Kind::Barrier, seq, DType::UInt8, 0);
  uint32_t step = 0;
  for (int k = 1; k < n; k <<= 1, ++step) {
    auto rr = g.irecv((r - k + n) % n, collective_tag(seq, step), nullptr, 0, desc, "barrier");
    auto sr = g.isend((r + k) % n, collective_tag(seq, step), nullptr, 0, desc, "barrier");
    g.wait(rr, deadline);
    g.wait(sr, deadline);
  }
}

void broadcast(comm::Group& g, Buffer buf, int root, uint64_t seq, const Deadline& deadline) {
  const int n = g.size();
  if (n == 1) return;
  const int vr = (g.rank() - root + n) % n;
  const auto desc = make_desc(Kind::Broadcast, seq, buf.dtype(), buf.count(), ReduceOp::Sum, root);
  const uint64_t tag = collective_tag(seq, 0);
  int mask = 1;
  while (mask < n) {
    if (vr & mask) {
      auto rr = g.irecv((vr - mask + root) % n, tag, buf.data(), buf.bytes(), desc, "broadcast");
      g.wait(rr, deadline);
      break;
    }
    mask <<= 1;
  }
  std::vector<transport::RequestPtr> sends;
  for (mask >>= 1; mask > 0; mask >>= 1) {
    if (vr + mask < n) {
      sends.push_back(
          g.isend((vr + mask + root) % n, tag, buf.data(), buf.bytes(), desc, "broadcast"));
    }
  }
  for (auto& s : sends) g.wait(s, deadline);
}

namespace {

// Ring allreduce of n elements of a (non-16-bit) dtype, in place.
void ring_allreduce(comm::Group& g, void* data, size_t count, DType dtype, ReduceOp op,
                    const transport::OpDesc& desc, uint64_t seq, const Deadline& deadline) {
  const int n = g.size(), r = g.rank();
  const size_t esize = dtype_size(dtype);
  auto* base = static_cast<uint8_t*>(data);
  auto chunk_begin = [&](int c) { return count * static_cast<size_t>(c) / static_cast<size_t>(n); };
  auto chunk_count = [&](int c) { return chunk_begin(c + 1) - chunk_begin(c); };
  size_t max_chunk = 0;
  for (int c = 0; c < n; ++c) max_chunk = std::max(max_chunk, chunk_count(c));
  std::vector<uint8_t> tmp(max_chunk * esize);
  const int right = (r + 1) % n, left = (r - 1 + n) % n;
  const ReduceOp kernel_op = op == ReduceOp::Avg ? ReduceOp::Sum : op;
  uint32_t step = 0;
  // Reduce-scatter: after n-1 steps this rank holds the full reduction of chunk (r + 1) % n.
  for (int s = 0; s < n - 1; ++s, ++step) {
    int send_c = (r - s + n) % n, recv_c = (r - s - 1 + 2 * n) % n;
    auto rr = g.irecv(left, collective_tag(seq, step), tmp.data(), chunk_count(recv_c) * esize,
                      desc, "allreduce");
    auto sr = g.isend(right, collective_tag(seq, step), base + chunk_begin(send_c) * esize,
                      chunk_count(send_c) * esize, desc, "allreduce");
    g.wait(rr, deadline);
    reduce(base + chunk_begin(recv_c) * esize, tmp.data(), chunk_count(recv_c), dtype, kernel_op);
    g.wait(sr, deadline);
  }
  // Allgather of the reduced chunks, received in place.
  for (int s = 0; s < n - 1; ++s, ++step) {
    int send_c = (r + 1 - s + n) % n, recv_c = (r - s + n) % n;
    auto rr = g.irecv(left, collective_tag(seq, step), base + chunk_begin(recv_c) * esize,
                      chunk_count(recv_c) * esize, desc, "allreduce");
    auto sr = g.isend(right, collective_tag(seq, step), base + chunk_begin(send_c) * esize,
                      chunk_count(send_c) * esize, desc, "allreduce");
    g.wait(rr, deadline);
    g.wait(sr, deadline);
  }
}

}  // namespace

void allreduce(comm::Group& g, Buffer buf, ReduceOp op, uint64_t seq, const Deadline& deadline) {
  const int n = g.size();
  const auto desc = make_desc(Kind::Allreduce, seq, buf.dtype(), buf.count(), op);
  if (buf.dtype() == DType::Float16 || buf.dtype() == DType::BFloat16) {
    // Accumulate in float32: every partial sum travels as float32, rounded once at the end.
    std::vector<float> acc(buf.count());
    convert(acc.data(), DType::Float32, buf.data(), buf.dtype(), buf.count());
    if (n > 1) ring_allreduce(g, acc.data(), acc.size(), DType::Float32, op, desc, seq, deadline);
    if (op == ReduceOp::Avg) {
      finalize_avg_f32(buf.data(), buf.dtype(), acc.data(), acc.size(), n);
    } else {
      convert(buf.data(), buf.dtype(), acc.data(), DType::Float32, buf.count());
    }
    return;
  }
  if (n > 1) ring_allreduce(g, buf.data(), buf.count(), buf.dtype(), op, desc, seq, deadline);
  if (op == ReduceOp::Avg) divide(buf.data(), buf.count(), buf.dtype(), n);
}

}  // namespace weft::coll
