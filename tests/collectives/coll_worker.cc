// Runs the collective case matrix in one process of a `weft run` job:
//   weft run -n N build/bin/coll_worker [--large]
// Prints "CASES <n> FAILURES <f>" and each failure; exits 0 only if none.
#include <cstdio>
#include <cstring>

#include "collectives/cases.h"
#include "weft/weft.h"

int main(int argc, char** argv) {
  weft::testing::CaseOptions o;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--large") == 0) o.large = true;
  }
  try {
    auto comm = weft::init();
    auto report = weft::testing::run_collective_cases(*comm, o);
    // Every rank's verdict, so that rank 0 can report the job's.
    std::vector<int64_t> failures{static_cast<int64_t>(report.failures.size())};
    comm->allreduce(failures, weft::ReduceOp::Sum);
    for (auto& f : report.failures) std::printf("FAIL %s\n", f.c_str());
    std::printf("CASES %d FAILURES %lld (job total %lld)\n", report.cases,
                static_cast<long long>(report.failures.size()),
                static_cast<long long>(failures[0]));
    return failures[0] == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::printf("ERROR %s\n", e.what());
    return 2;
  }
}
