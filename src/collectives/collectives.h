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

// Where the ranks of a group live. Hosts are numbered in the order of their
// lowest group rank; each host's ranks are listed in ascending group rank,
// and a rank's local index is its position in that list. Every rank of a
// group computes the same topology (from the host ids published at
// rendezvous).
struct Topology {
  std::vector<int> host_of;             // group rank -> host index
  std::vector<int> local_of;            // group rank -> local index on its host
  std::vector<std::vector<int>> hosts;  // host index -> its group ranks
  int min_local = 1, max_local = 1;     // fewest and most ranks on a host

  int size() const { return static_cast<int>(host_of.size()); }
  int num_hosts() const { return static_cast<int>(hosts.size()); }
  // Every host has the same number of ranks.
  bool even() const { return min_local == max_local; }
  // n ranks on one host (or on n hosts of one rank each).
  static Topology single_host(int n);
  static Topology one_per_host(int n);
  static Topology of(comm::Group& g);
};

// The topology of g, computed on first use and cached with g's plans.
const Topology& topology(comm::Group& g);

// Throws InvalidArgument naming what is wrong (sizes, dtype, op, root, an
// algorithm the collective does not support, overlapping buffers).
void validate(const Call& call, int size, int rank);

// The algorithm Auto resolves to (WEFT_<KIND>_ALGO first, then the cost
// model, which knows how the ranks are spread over hosts).
Algorithm select(const Call& call, const Topology& topo);
// The cost model's choice among the flat (non-hierarchical) algorithms, with
// no environment override: what a hierarchical plan runs inside.
Algorithm select_flat(const Call& call, const Topology& topo);

// Runs the call on this rank (call.algorithm may be Auto). Throws the
// failure (PeerError, TimeoutError, MismatchError...).
void run(comm::Group& group, Call call);

// Size in bytes that the cost model reasons about for this call.
size_t model_bytes(const Call& call, int size);

}  // namespace weft::coll
