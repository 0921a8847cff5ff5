// Runs the collective case matrix in one process of a `weft run` job:
//   weft run -n N build/bin/coll_worker [--large] [--only allreduce,broadcast,...]
//       [--expect-auto ALGO|flat] [--loop]
// Prints "RANK r LOCAL l/L HOSTS h" (h: hosts told apart by their host id), then "CASES <n>
// FAILURES <f>" and each failure; exits 0 only if none.
//   --only         run the cases of these collectives only
//   --expect-auto  fail unless Auto picks ALGO (or any non-hierarchical
//                  algorithm, for "flat") for a 16 MiB float32 allreduce
//   --loop         no cases: print "ready pid=P", then allreduce 1 MiB in a
//                  loop until the job fails (for failure tests), printing
//                  "allreduces done: 3" after the third
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "api/access.h"
#include "collectives/cases.h"
#include "collectives/collectives.h"
#include "weft/weft.h"

namespace {

std::vector<weft::Collective> parse_only(const std::string& list) {
  std::vector<weft::Collective> out;
  size_t b = 0;
  while (b <= list.size()) {
    size_t e = list.find(',', b);
    std::string name = list.substr(b, e == std::string::npos ? std::string::npos : e - b);
    for (int k = 1; k <= 11; ++k) {
      if (name == weft::collective_name(static_cast<weft::Collective>(k)))
        out.push_back(static_cast<weft::Collective>(k));
    }
    if (e == std::string::npos) break;
    b = e + 1;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  weft::testing::CaseOptions o;
  std::string expect_auto;
  bool loop = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--large") == 0) o.large = true;
    if (std::strcmp(argv[i], "--loop") == 0) loop = true;
    if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc) o.only = parse_only(argv[++i]);
    if (std::strcmp(argv[i], "--expect-auto") == 0 && i + 1 < argc) expect_auto = argv[++i];
  }
  try {
    auto comm = weft::init();
    std::printf("RANK %d LOCAL %d/%d HOSTS %d\n", comm->rank(), comm->local_rank(),
                comm->local_size(),
                weft::coll::topology(*weft::api::CommunicatorAccess::group(*comm)).num_hosts());
    std::fflush(stdout);
    if (loop) {
      std::printf("ready pid=%d\n", static_cast<int>(::getpid()));
      std::fflush(stdout);
      std::vector<float> v(1u << 18, 1.0f);
      for (int done = 1;; ++done) {
        comm->allreduce(v, weft::ReduceOp::Max);
        if (done == 3) {
          std::printf("allreduces done: %d\n", done);
          std::fflush(stdout);
        }
      }
    }
    int bad_selection = 0;
    if (!expect_auto.empty()) {
      auto a =
          comm->selected_algorithm(weft::Collective::Allreduce, 4u << 20, weft::DType::Float32);
      bool ok = expect_auto == "flat" ? a != weft::Algorithm::Hierarchical
                                      : a == weft::parse_algorithm(expect_auto);
      std::printf("AUTO allreduce 16 MiB: %s%s\n", weft::algorithm_name(a),
                  ok ? "" : (" (expected " + expect_auto + ")").c_str());
      bad_selection = ok ? 0 : 1;
    }
    auto report = weft::testing::run_collective_cases(*comm, o);
    // Every rank's verdict, so that rank 0 can report the job's.
    std::vector<int64_t> failures{static_cast<int64_t>(report.failures.size()) + bad_selection};
    comm->allreduce(failures, weft::ReduceOp::Sum);
    for (auto& f : report.failures) std::printf("FAIL %s\n", f.c_str());
    std::printf("CASES %d FAILURES %lld (job total %lld)\n", report.cases,
                static_cast<long long>(report.failures.size()) + bad_selection,
                static_cast<long long>(failures[0]));
    return failures[0] == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::printf("ERROR %s\n", e.what());
    return 2;
  }
}
