// Collective algorithms over a comm::Group. Every function is called by all
// ranks of the group with the same arguments and the same sequence number
// (Group::next_seq(), taken when the application issued the call), and
// returns when this rank's part is done, or throws the failure (PeerError,
// TimeoutError, MismatchError...).
#pragma once

#include <cstdint>

#include "comm/group.h"
#include "core/deadline.h"
#include "transport/request.h"
#include "weft/types.h"

namespace weft::coll {

// Collective kinds as carried in operation descriptors (wire protocol).
enum class Kind : uint8_t {
  Barrier = 1,
  Broadcast = 2,
  Allreduce = 3,
  Reduce = 4,
  Allgather = 5,
  Allgatherv = 6,
  ReduceScatter = 7,
  Gather = 8,
  Scatter = 9,
  Alltoall = 10,
  Alltoallv = 11,
};
const char* kind_name(Kind kind);

// The descriptor every message of a call carries (mismatch detection).
transport::OpDesc make_desc(Kind kind, uint64_t seq, DType dtype, size_t count,
                            ReduceOp op = ReduceOp::Sum, int root = 0);
// "allreduce #12 (float32 x 1024, sum)".
std::string describe(Kind kind, uint64_t seq, DType dtype, size_t count, ReduceOp op, int root);

void barrier(comm::Group& g, uint64_t seq, const Deadline& deadline);
void broadcast(comm::Group& g, Buffer buf, int root, uint64_t seq, const Deadline& deadline);
void allreduce(comm::Group& g, Buffer buf, ReduceOp op, uint64_t seq, const Deadline& deadline);

}  // namespace weft::coll
