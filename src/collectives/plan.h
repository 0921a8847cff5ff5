// Plans: algorithms as objects, built once per communicator and algorithm
// and run many times. A plan keeps what does not change from call to call
// (the ranks it talks to, its schedule) and its scratch buffers, which only
// grow, so that steady-state calls allocate nothing.
//
// A plan is used by one call at a time: the cache hands out an idle plan (or
// builds one) and takes it back when the call is done, so that a blocking
// collective and an asynchronous one can run at the same time.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "collectives/collectives.h"
#include "collectives/reduce_kernels.h"
#include "comm/group.h"
#include "core/mutex.h"

namespace weft::coll {

class Plan {
 public:
  virtual ~Plan() = default;
  virtual void run(comm::Group& g, const Call& call) = 0;
};

// Builds the plan of an algorithm for a kind (null: not supported).
std::unique_ptr<Plan> make_plan(Kind kind, Algorithm algorithm, comm::Group& g);

// Per-group cache of idle plans, and the group's topology.
class PlanCache {
 public:
  explicit PlanCache(Topology topo) : topo_(std::move(topo)) {}
  std::unique_ptr<Plan> acquire(Kind kind, Algorithm algorithm, comm::Group& g);
  void release(Kind kind, Algorithm algorithm, std::unique_ptr<Plan> plan);
  const Topology& topology() const { return topo_; }

 private:
  const Topology topo_;
  Mutex mu_;
  std::map<std::pair<Kind, Algorithm>, std::vector<std::unique_ptr<Plan>>> idle_ GUARDED_BY(mu_);
};

// A scratch buffer that only grows.
class Scratch {
 public:
  uint8_t* get(size_t bytes) {
    if (buf_.size() < bytes) buf_.resize(bytes);
    return buf_.data();
  }

 private:
  std::vector<uint8_t> buf_;
};

// Elements [begin(i), begin(i+1)) of n nearly equal parts of count.
inline size_t part_begin(size_t count, size_t parts, size_t i) { return count * i / parts; }

// Arithmetic of a reduction, including the float32 accumulation of 16-bit
// types: their partial results travel and are combined as float32
// ("wire" type), and are rounded once at the end.
struct Reduction {
  DType dtype = DType::Float32;
  ReduceOp op = ReduceOp::Sum;
  int ranks = 1;

  Reduction(DType d, ReduceOp o, int n) : dtype(d), op(o), ranks(n) {}
  bool widened() const { return dtype == DType::Float16 || dtype == DType::BFloat16; }
  DType wire() const { return widened() ? DType::Float32 : dtype; }
  size_t wire_size() const { return dtype_size(wire()); }
  ReduceOp kernel_op() const { return op == ReduceOp::Avg ? ReduceOp::Sum : op; }

  // partial(wire) = op(partial, own(dtype)), k elements.
  void accumulate(void* partial, const void* own, size_t k) const {
    if (widened()) {
      accumulate_f32(static_cast<float*>(partial), own, k, dtype, kernel_op());
    } else {
      reduce(partial, own, k, dtype, kernel_op());
    }
  }
  // dst(wire) = op(a(wire), b(wire)), k elements (dst may alias a or b).
  void combine(void* dst, const void* a, const void* b, size_t k) const {
    reduce3(dst, a, b, k, wire(), kernel_op());
  }
  // dst(wire) = op(received(wire), own(dtype)).
  void combine_own(void* dst, const void* received, const void* own, size_t k) const {
    if (widened()) {
      if (dst != received) std::memcpy(dst, received, k * sizeof(float));
      accumulate_f32(static_cast<float*>(dst), own, k, dtype, kernel_op());
    } else {
      reduce3(dst, received, own, k, dtype, kernel_op());
    }
  }
  // own(dtype) -> wire.
  void to_wire(void* dst, const void* own, size_t k) const {
    if (widened()) {
      convert(dst, DType::Float32, own, dtype, k);
    } else if (dst != own) {
      std::memcpy(dst, own, k * dtype_size(dtype));
    }
  }
  // The final value: out(dtype) = finalize(partial(wire)): rounding of
  // 16-bit types, division for Avg. out may alias partial for non-widened types.
  void finalize(void* out, const void* partial, size_t k) const {
    if (widened()) {
      if (op == ReduceOp::Avg) {
        finalize_avg_f32(out, dtype, static_cast<const float*>(partial), k, ranks);
      } else {
        convert(out, dtype, partial, DType::Float32, k);
      }
      return;
    }
    if (out != partial) std::memcpy(out, partial, k * dtype_size(dtype));
    if (op == ReduceOp::Avg) divide(out, k, dtype, ranks);
  }
};

// Requests of a call still in flight, all waited for before the call
// returns (sends read the caller's buffers until they complete).
class Pending {
 public:
  explicit Pending(comm::Group& g, const Deadline& d) : g_(g), d_(d) {}
  void add(transport::RequestPtr r) {
    if (!r->done())
      reqs_.push_back(std::move(r));
    else if (!r->ok())
      std::rethrow_exception(r->error());
  }
  void wait_all() {
    for (auto& r : reqs_) g_.wait(r, d_);
    reqs_.clear();
  }

 private:
  comm::Group& g_;
  const Deadline& d_;
  std::vector<transport::RequestPtr> reqs_;
};

// Segment size of pipelined algorithms for a chunk of `bytes`: fixed by
// WEFT_SEGMENT_BYTES when set. Otherwise, over TCP, a quarter of the chunk
// within [256 KiB, 2 MiB]: four segments keep a pipeline of send, receive
// and reduction busy, and fewer, larger ones cost fewer system calls and
// wake-ups per byte, which is what decides large messages. Over shared
// memory (shm: every link of the pipeline is), half the chunk within
// [1 MiB, 8 MiB]: a large message there is one single-copy read, whose
// cost is per call and per page touched, not per byte on a wire.
size_t segment_bytes(size_t bytes, bool shm = false);

// Segments a chunk of `bytes` is cut into (at least one).
inline size_t segments_for(size_t bytes, bool shm = false) {
  const size_t seg = segment_bytes(bytes, shm);
  return std::max<size_t>(1, (bytes + seg - 1) / seg);
}

}  // namespace weft::coll
