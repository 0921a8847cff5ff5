// How a collective call is named in messages, the same everywhere (errors,
// logs, mismatch reports): "allreduce #12 (float32 x 1024, sum, ring)".
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "weft/types.h"

namespace weft {

// op is shown for reductions, root for rooted collectives, the algorithm
// unless it is Auto.
std::string describe_collective(Collective kind, uint64_t seq, DType dtype, size_t count,
                                ReduceOp op, int root, Algorithm algorithm);

}  // namespace weft
