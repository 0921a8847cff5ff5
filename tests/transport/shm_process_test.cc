// Shared memory between real processes started by `weft run`: the
// collective case matrix over shared memory, over TCP only (WEFT_SHM=0),
// through the rings only (WEFT_SHM_CMA=0) and mixed (two emulated hosts);
// a rank killed in the middle of transfers over shared memory: every
// survivor fails with a PeerError naming it, no memfd stays open, every
// segment is unmapped, and nothing of the job appears in /dev/shm.
#include <gtest/gtest.h>
#include <signal.h>

#include <cstdio>
#include <thread>

#include "testing/testing.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::dev_shm;

size_t count(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

std::vector<std::string> weft_run(int n, const std::vector<std::string>& env,
                                  const std::vector<std::string>& program) {
  std::vector<std::string> argv = {testing::bin_dir() + "/weft",
                                   "run",
                                   "-n",
                                   std::to_string(n),
                                   "--timeout",
                                   "120",
                                   "--grace",
                                   "60"};
  for (const auto& e : env) {
    argv.push_back("--env");
    argv.push_back(e);
  }
  argv.push_back(testing::bin_dir() + "/shm_worker");
  argv.insert(argv.end(), program.begin(), program.end());
  return argv;
}

struct MatrixCase {
  const char* name;
  int ranks;
  std::vector<std::string> env;
  std::vector<std::string> args;
  const char* transport;  // expected on every rank
};

class CaseMatrix : public ::testing::TestWithParam<MatrixCase> {};

TEST_P(CaseMatrix, EveryCollectiveMatchesTheReference) {
  const auto& c = GetParam();
  std::vector<std::string> program = {"cases"};
  program.insert(program.end(), c.args.begin(), c.args.end());
  testing::Process p(weft_run(c.ranks, c.env, program));
  ASSERT_TRUE(p.wait(600s)) << p.output();
  EXPECT_EQ(p.exit_code(), 0) << p.output();
  EXPECT_EQ(count(p.output(), std::string("TRANSPORT ") + c.transport + " "),
            static_cast<size_t>(c.ranks))
      << p.output();
  EXPECT_NE(p.output().find("FAILURES 0 (job total 0)"), std::string::npos) << p.output();
}

INSTANTIATE_TEST_SUITE_P(
    Transports, CaseMatrix,
    ::testing::Values(MatrixCase{"shm", 3, {}, {"--large"}, "tcp+shm"},
                      MatrixCase{"shm_ring", 2, {"WEFT_SHM_CMA=0"}, {"--large"}, "tcp+shm"},
                      MatrixCase{"tcp", 3, {"WEFT_SHM=0"}, {}, "tcp"},
                      MatrixCase{"mixed", 4, {}, {"--hosts", "2"}, "tcp+shm"}),
    [](const ::testing::TestParamInfo<MatrixCase>& p) { return std::string(p.param.name); });

// ---------------------------------------------------------------------------

class KilledRank : public ::testing::TestWithParam<const char*> {};

TEST_P(KilledRank, SurvivorsNameItAndNothingIsLeftBehind) {
  const int n = 4, victim = 2;
  const auto before = dev_shm();
  // The stream workers ignore the SIGTERM the launcher sends when it sees
  // the victim die, so that what is tested is their own detection.
  testing::Process p(weft_run(n, {GetParam()}, {"stream", std::to_string(4u << 20)}));
  pid_t pid = 0;
  auto until = std::chrono::steady_clock::now() + 60s;
  while (count(p.output(), "READY") < static_cast<size_t>(n)) {
    ASSERT_FALSE(p.wait(20ms)) << "the job ended early:\n" << p.output();
    ASSERT_LT(std::chrono::steady_clock::now(), until) << p.output();
  }
  std::string out = p.output();
  for (size_t at = out.find("READY "); at != std::string::npos; at = out.find("READY ", at + 1)) {
    int r = -1, id = 0;
    if (std::sscanf(out.c_str() + at, "READY %d %d", &r, &id) == 2 && r == victim) pid = id;
  }
  ASSERT_GT(pid, 0) << out;
  while (count(p.output(), "RUNNING") < static_cast<size_t>(n)) {  // in the middle of the transfers
    ASSERT_FALSE(p.wait(20ms)) << "the job ended early:\n" << p.output();
    ASSERT_LT(std::chrono::steady_clock::now(), until) << p.output();
  }
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  ASSERT_TRUE(p.wait(90s)) << "the survivors hang:\n" << p.output();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 30s);  // not the 120 s deadline
  out = p.output();
  for (int r = 0; r < n; ++r) {
    if (r == victim) continue;
    std::string tag = "[" + std::to_string(r) + "] ";
    EXPECT_NE(out.find(tag + "ERROR PeerError rank=2"), std::string::npos) << out;
    EXPECT_NE(out.find(tag + "MEMFDS 0 MAPPED"), std::string::npos) << out;  // no descriptor leaked
    EXPECT_NE(out.find(tag + "UNMAPPED 0"), std::string::npos) << out;
  }
  EXPECT_EQ(dev_shm(), before);
}

INSTANTIATE_TEST_SUITE_P(Paths, KilledRank, ::testing::Values("WEFT_SHM_CMA=1", "WEFT_SHM_CMA=0"),
                         [](const ::testing::TestParamInfo<const char*>& p) {
                           return std::string(p.param).back() == '1' ? "SingleCopy"
                                                                     : "ThroughTheRing";
                         });

}  // namespace
}  // namespace weft
