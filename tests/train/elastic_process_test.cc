// Elastic training with real processes under `weft run --elastic`: a worker
// killed in the middle of training (the survivors go on in the same
// processes, the launcher restarts it and it joins again), two killed at
// once, a stopped one (evicted by liveness), and falling below MIN. The job
// is tests/train/elastic_worker.cc, whose committed ledger says after each
// epoch whether every sample was trained exactly once.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <csignal>
#include <map>
#include <string>
#include <vector>

#include "testing/testing.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Process;

struct JobRun {
  int code = -1;
  std::string out;
};

JobRun run_job(std::vector<std::string> launcher_args, std::vector<std::string> worker_args,
               std::map<std::string, std::string> env = {}) {
  std::vector<std::string> argv{testing::bin_dir() + "/weft", "run"};
  argv.insert(argv.end(), launcher_args.begin(), launcher_args.end());
  argv.push_back("--");
  argv.push_back(testing::bin_dir() + "/elastic_worker");
  argv.insert(argv.end(), worker_args.begin(), worker_args.end());
  Process p(argv, env);
  const bool ended = p.wait(240s);
  EXPECT_TRUE(ended) << "the job did not end:\n" << p.output();
  if (!ended) p.signal(SIGKILL);
  return {p.exit_code(), p.output()};
}

int count(const std::string& text, const std::string& what) {
  int n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// Every epoch's ledger line says exactly once, and the job finished.
void expect_exactly_once(const JobRun& r, int epochs) {
  EXPECT_EQ(count(r.out, "\"exactly_once\": true"), epochs) << r.out;
  EXPECT_EQ(count(r.out, "\"exactly_once\": false"), 0) << r.out;
  EXPECT_EQ(count(r.out, "\"done\": true"), 1) << r.out;
}

TEST(ElasticProcessTest, KilledWorkerIsRestartedAndJoinsAgain) {
  const JobRun r = run_job(
      {"-n", "3", "--elastic", "2:3", "--max-restarts", "2"},
      {"--epochs", "4", "--step-ms", "25", "--die-member", "n0.s1.r0", "--die-at-step", "15"});
  EXPECT_EQ(r.code, 0) << r.out;
  expect_exactly_once(r, 4);
  // The survivors formed generation 2 without the dead worker...
  EXPECT_NE(r.out.find("generation 2 formed"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("left [n0.s1.r0]"), std::string::npos) << r.out;
  // ...and its restarted incarnation joined at a step boundary.
  EXPECT_NE(r.out.find("joined [n0.s1.r1]"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"workers\": 3, \"changes\""), std::string::npos) << r.out;
}

TEST(ElasticProcessTest, TwoFailuresAtOnce) {
  const JobRun r = run_job({"-n", "4", "--elastic", "2:4", "--max-restarts", "0"},
                           {"--epochs", "2", "--die-member", "n0.s1.r0", "--die-member", "n0.s3.r0",
                            "--die-at-step", "10"});
  EXPECT_EQ(r.code, 0) << r.out;
  expect_exactly_once(r, 2);
  EXPECT_NE(r.out.find("\"done\": true"), std::string::npos);
  EXPECT_NE(r.out.find("\"workers\": 2, \"changes\""), std::string::npos) << r.out;
}

// A stopped worker (SIGSTOP: a hung driver, a frozen VM) is declared dead
// by the survivors' liveness, evicted (its launcher kills it) and replaced;
// training goes on without waiting for any collective's deadline.
TEST(ElasticProcessTest, StoppedWorkerIsEvictedAndTrainingGoesOn) {
  const JobRun r = run_job(
      {"-n", "3", "--elastic", "2:3", "--max-restarts", "1"},
      {"--epochs", "3", "--step-ms", "10", "--stop-member", "n0.s2.r0", "--stop-at-step", "10"},
      {{"WEFT_HEARTBEAT_TIMEOUT", "2"}});
  EXPECT_EQ(r.code, 0) << r.out;
  expect_exactly_once(r, 3);
  EXPECT_NE(r.out.find("silent for"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("left [n0.s2.r0]"), std::string::npos) << r.out;
}

TEST(ElasticProcessTest, BelowMinFailsSayingWhy) {
  const JobRun r = run_job({"-n", "2", "--elastic", "2:2", "--max-restarts", "0"},
                           {"--epochs", "2", "--die-member", "n0.s1.r0", "--die-at-step", "5"},
                           {{"WEFT_ELASTIC_SETTLE", "1"}, {"WEFT_ELASTIC_MIN_WAIT", "2"}});
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("1 of the minimum 2 workers"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("n0.s1.r0"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace weft
