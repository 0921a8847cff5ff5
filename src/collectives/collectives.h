// The collectives layer: one description of a call (Call), its validation,
// the choice of an algorithm (cost model, select.cc), and the algorithms
// themselves, as plans built once per communicator and run many times
// (plan.h).
//
// Every rank of a group runs the same Call (same kind, counts, dtype, op,
// root and algorithm) with the same sequence number (Group::next_seq(),
// taken when the application issued the call). Messages of a call carry its
// descriptor (Call::desc()), so that ranks that disagree fail with
// MismatchError instead of exchanging garbage.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/group.h"
#include "core/deadline.h"
#include "transport/request.h"
#include "weft/communicator.h"
#include "weft/types.h"

namespace weft::coll {

using Kind = Collective;

struct Call {
  Kind kind = Kind::Barrier;
  const void* in = nullptr;
  void* out = nullptr;
  // Elements: the whole buffer for broadcast, allreduce and reduce; the
  // per-rank block for reduce_scatter, allgather, gather, scatter and
  // alltoall; the total for allgatherv (counts[] holds the blocks).
  size_t count = 0;
  DType dtype = DType::UInt8;
  ReduceOp op = ReduceOp::Sum;
  int root = 0;
  std::vector<size_t> counts;       // allgatherv: per rank; alltoallv: send counts
  std::vector<size_t> recv_counts;  // alltoallv
  Algorithm algorithm = Algorithm::Auto;
  uint64_t seq = 0;
  Deadline deadline;

  size_t esize() const { return dtype_size(dtype); }
  // "allreduce #12 (float32 x 1024, sum, ring)".
  std::string describe() const;
  // The descriptor carried by every message of the call.
  transport::OpDesc desc() const;
};

// Throws InvalidArgument naming what is wrong (sizes, dtype, op, root, an
// algorithm the collective does not support, overlapping buffers).
void validate(const Call& call, int size, int rank);

// The algorithm Auto resolves to (WEFT_<KIND>_ALGO first, then the cost model).
Algorithm select(const Call& call, int size);

// Runs the call on this rank (call.algorithm may be Auto). Throws the
// failure (PeerError, TimeoutError, MismatchError...).
void run(comm::Group& group, Call call);

// Size in bytes that the cost model reasons about for this call.
size_t model_bytes(const Call& call, int size);

}  // namespace weft::coll
