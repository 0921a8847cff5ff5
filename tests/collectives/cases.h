// The matrix of collective test cases, checked against a reference computed
// locally: every collective x dtype x op x size class x algorithm. Used by
// the thread tests (collectives_test) and by the worker program that the
// multi-process tests start with `weft run` (coll_worker), so that one
// launch runs many cases.
#pragma once

#include <string>
#include <vector>

#include "weft/weft.h"

namespace weft::testing {

struct CaseOptions {
  // Also run the 64 MiB cases (float32 allreduce and allgather).
  bool large = false;
  // Only these collectives (empty: all).
  std::vector<Collective> only;
};

struct CaseReport {
  int cases = 0;
  std::vector<std::string> failures;  // one line per failed case
};

// Runs every case on comm. All ranks must call it with the same options.
// Wrong results are reported, not thrown; communication errors throw.
CaseReport run_collective_cases(Communicator& comm, const CaseOptions& options);

}  // namespace weft::testing
