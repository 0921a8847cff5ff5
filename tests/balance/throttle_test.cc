// Real overloaded workers under `weft run`, doing real CPU work per sample
// (balance_worker):
// * a straggler: rank 1 of 2 runs in a cgroup with a CPU quota of a tenth
//   of a core (../shared/guide/MACHINE.md). Its share of the global batch
//   must fall well below the unthrottled rank's, and the balancer must see
//   the throttling.
// * memory pressure: rank 1 of 2 runs in a memory cgroup whose limit its
//   resident memory nearly fills. It must be seen shedding work and its
//   share must fall, though it computes as fast as rank 0.
// Skipped where no such cgroup can be made (not root, no hierarchy).
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <nlohmann/json.hpp>
#include <sstream>

#include "testing/cgroup.h"
#include "testing/testing.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Process;

// The JSON line rank 0 printed.
nlohmann::json result_of(const std::string& output) {
  std::istringstream in(output);
  std::string line;
  while (std::getline(in, line)) {
    const auto brace = line.find("{\"shares\"");
    if (brace != std::string::npos) return nlohmann::json::parse(line.substr(brace));
  }
  return {};
}

TEST(BalanceUnderWeftRun, ThrottledWorkersShareFalls) {
  const std::string why = testing::CpuQuotaGroup::unavailable();
  if (!why.empty()) GTEST_SKIP() << why;
  auto group = testing::CpuQuotaGroup::create(fmt::format("weft-balance-test-{}", getpid()), 10000);
  Process p({testing::bin_dir() + "/weft", "run", "-n", "2", "--",
             testing::bin_dir() + "/balance_worker", "--steps", "60", "--global-batch", "64",
             "--work-per-sample", "150000", "--slow-rank", "1", "--cgroup", group->path()});
  ASSERT_TRUE(p.wait(240s)) << p.output();
  ASSERT_EQ(p.exit_code(), 0) << p.output();
  const auto r = result_of(p.output());
  ASSERT_TRUE(r.contains("shares")) << p.output();
  const auto s0 = r["shares"][0].get<int64_t>(), s1 = r["shares"][1].get<int64_t>();
  EXPECT_EQ(s0 + s1, 64);
  // A tenth of a core against a full one: the balanced share is about a
  // tenth of the batch; anything below 0.7 of the other's shows it moved.
  // (A quarter of a core was too close: on a machine loaded by other jobs,
  // the unthrottled rank got no more CPU than that.)
  EXPECT_LT(static_cast<double>(s1), 0.7 * static_cast<double>(s0)) << r.dump();
  EXPECT_GE(r["decisions"].get<int>(), 1) << r.dump();
  // What the planner used for it (its measured rate, bounded by what its
  // quota sustains) is below the other's rate. The measured rate alone need
  // not be: with a share of a few samples, its compute fits in the part of
  // each quota period in which it runs, and it is stopped in the rest of
  // the step instead.
  EXPECT_LT(std::min(r["rates"][1].get<double>(), r["quota_rate"][1].get<double>()),
            r["rates"][0].get<double>())
      << r.dump();
  // Every rank sees the throttled worker's quota, and the rate it sustains
  // (a positive bound); the other worker has none.
  EXPECT_NEAR(r["cpu_quota"][1].get<double>(), 0.1, 1e-9) << r.dump();
  EXPECT_GT(r["quota_rate"][1].get<double>(), 0) << r.dump();
  EXPECT_EQ(r["cpu_quota"][0].get<double>(), 0) << r.dump();
  EXPECT_EQ(r["quota_rate"][0].get<double>(), 0) << r.dump();
  EXPECT_FALSE(r["quota_bound"][0].get<bool>()) << r.dump();
}

TEST(BalanceUnderWeftRun, WorkerNearItsMemoryLimitShedsWork) {
  const std::string why = testing::MemoryLimitGroup::unavailable();
  if (!why.empty()) GTEST_SKIP() << why;
  // No limit until the worker sets one from its own resident memory.
  auto group = testing::MemoryLimitGroup::create(fmt::format("weft-memory-test-{}", getpid()), -1);
  Process p({testing::bin_dir() + "/weft",
             "run",
             "-n",
             "2",
             "--",
             testing::bin_dir() + "/balance_worker",
             "--steps",
             "60",
             "--global-batch",
             "64",
             "--work-per-sample",
             "20000",
             "--slow-rank",
             "1",
             "--memory-cgroup",
             group->path(),
             "--ballast-mb",
             "64",
             "--memory-fill",
             "0.93"});
  ASSERT_TRUE(p.wait(240s)) << p.output();
  ASSERT_EQ(p.exit_code(), 0) << p.output();
  const auto r = result_of(p.output());
  ASSERT_TRUE(r.contains("shedding")) << p.output();
  EXPECT_FALSE(r["shedding"][0].get<bool>()) << r.dump();
  EXPECT_TRUE(r["shedding"][1].get<bool>()) << r.dump();
  EXPECT_GE(r["memory_pressure"][1].get<double>(), 0.9) << r.dump();
  EXPECT_LT(r["memory_pressure"][1].get<double>(), 1.0) << r.dump();
  const auto s0 = r["shares"][0].get<int64_t>(), s1 = r["shares"][1].get<int64_t>();
  EXPECT_EQ(s0 + s1, 64);
  // Planned at half its rate: its share against rank 0's is about half
  // the ratio of their rates (a third of the batch against two thirds when
  // they run alike). Without shedding the shares follow the rates (the
  // ratio of the shares near that of the rates). Compared with the rates
  // measured, because a loaded machine can run one worker much faster than
  // the other (seen: 26808 against 15298 samples/s).
  const double r0 = r["rates"][0].get<double>(), r1 = r["rates"][1].get<double>();
  ASSERT_GT(r0, 0) << r.dump();
  EXPECT_LT(static_cast<double>(s1) / static_cast<double>(s0), 0.8 * r1 / r0) << r.dump();
  EXPECT_GE(r["decisions"].get<int>(), 1) << r.dump();
}

}  // namespace
}  // namespace weft
