// Multi-node jobs: one `weft run --nnodes K --node-rank I --master ...` per
// node.
//  * MultiNodeLaunch: every node on this machine's loopback (no privileges):
//    rank numbering, tokens, rendezvous errors, failure propagation.
//  * EmulatedCluster: 2 hosts as network namespaces on a bridge with 1 Gbit/s
//    links (scripts/cluster.sh; root), the collective case matrix across
//    them, even and uneven, and a worker killed on one host; elastic jobs
//    (--nnodes 1:2) that lose a whole host, or gain one. Skipped, with the
//    reason, where namespaces cannot be made.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "testing/testing.h"

namespace weft::testing {
namespace {

using namespace std::chrono_literals;

std::string weft_bin() { return bin_dir() + "/weft"; }
std::string cluster_script() { return std::string(WEFT_SOURCE_DIR) + "/scripts/cluster.sh"; }
const std::string kToken = "cluster-test-token-0123456789";

// Runs a command to completion; returns its exit code and output.
std::pair<int, std::string> run_cmd(const std::vector<std::string>& argv,
                                    std::chrono::milliseconds timeout = 60s) {
  Process p(argv);
  if (!p.wait(timeout)) return {-1, p.output() + "\n(timed out)"};
  return {p.exit_code(), p.output()};
}

// The groups of every match of re in text.
std::vector<std::vector<std::string>> matches(const std::string& text, const std::regex& re) {
  std::vector<std::vector<std::string>> out;
  for (std::sregex_iterator it(text.begin(), text.end(), re), end; it != end; ++it) {
    std::vector<std::string> groups;
    for (const auto& g : *it) groups.push_back(g.str());
    out.push_back(std::move(groups));
  }
  return out;
}

// One node's launcher, started with `prefix` (e.g. {"ip", "netns", "exec",
// NS}) in front of `weft run`.
// `nnodes`: K, or MIN:MAX (elastic).
std::unique_ptr<Process> start_node(const std::vector<std::string>& prefix,
                                    const std::string& nnodes, int node, int nproc,
                                    const std::string& master,
                                    const std::vector<std::string>& worker,
                                    std::map<std::string, std::string> env = {},
                                    std::vector<std::string> extra = {}) {
  std::vector<std::string> argv = prefix;
  for (const std::string& a :
       {weft_bin(), std::string("run"), std::string("--nnodes"), nnodes, std::string("--node-rank"),
        std::to_string(node), std::string("--master"), master, std::string("--nproc-per-node"),
        std::to_string(nproc), std::string("--timeout"), std::string("60"), std::string("--grace"),
        std::string("2")})
    argv.push_back(a);
  if (std::find(extra.begin(), extra.end(), "--rdzv-timeout") == extra.end()) {
    argv.push_back("--rdzv-timeout");
    argv.push_back("60");
  }
  argv.insert(argv.end(), extra.begin(), extra.end());
  argv.insert(argv.end(), worker.begin(), worker.end());
  if (!env.count("WEFT_JOB_TOKEN")) env["WEFT_JOB_TOKEN"] = kToken;
  return std::make_unique<Process>(argv, env);
}
std::unique_ptr<Process> start_node(const std::vector<std::string>& prefix, int nnodes, int node,
                                    int nproc, const std::string& master,
                                    const std::vector<std::string>& worker,
                                    std::map<std::string, std::string> env = {},
                                    std::vector<std::string> extra = {}) {
  return start_node(prefix, std::to_string(nnodes), node, nproc, master, worker, std::move(env),
                    std::move(extra));
}

// Waits until pred(output) or the process ends.
bool wait_output(Process& p, const std::function<bool(const std::string&)>& pred,
                 std::chrono::milliseconds timeout = 60s) {
  auto until = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < until) {
    if (pred(p.output())) return true;
    if (p.wait(0ms)) return pred(p.output());
    std::this_thread::sleep_for(20ms);
  }
  return false;
}

// ---- every node on loopback -------------------------------------------

std::string loopback_master() { return "127.0.0.1:" + std::to_string(free_port()); }

TEST(MultiNodeLaunch, RanksFollowTheNodesWithUnevenCounts) {
  const std::string master = loopback_master();
  const std::vector<std::string> probe = {bin_dir() + "/launch_probe", "env"};
  auto n1 = start_node({}, 2, 1, 1, master, probe);  // before node 0: it waits for the store
  auto n0 = start_node({}, 2, 0, 2, master, probe);
  ASSERT_TRUE(n0->wait(60s)) << n0->output();
  ASSERT_TRUE(n1->wait(60s)) << n1->output();
  EXPECT_EQ(n0->exit_code(), 0) << n0->output();
  EXPECT_EQ(n1->exit_code(), 0) << n1->output();
  std::regex re(
      R"(rank=(\d) size=(\d) local_rank=(\d) local_size=(\d) nnodes=2 node_rank=(\d) store=([^ ]+) token_len=(\d+))");
  auto m0 = matches(n0->output(), re), m1 = matches(n1->output(), re);
  ASSERT_EQ(m0.size(), 2u) << n0->output();
  ASSERT_EQ(m1.size(), 1u) << n1->output();
  std::set<std::string> ranks0;
  for (auto& m : m0) {
    ranks0.insert(m[1]);
    EXPECT_EQ(m[2], "3");
    EXPECT_EQ(m[3], m[1]);  // local rank == rank on node 0
    EXPECT_EQ(m[4], "2");
    EXPECT_EQ(m[5], "0");
    EXPECT_EQ(m[6], master);
    EXPECT_EQ(m[7], std::to_string(kToken.size()));
  }
  EXPECT_EQ(ranks0, (std::set<std::string>{"0", "1"}));
  EXPECT_EQ(m1[0][1], "2");
  EXPECT_EQ(m1[0][3], "0");
  EXPECT_EQ(m1[0][4], "1");
  EXPECT_EQ(m1[0][5], "1");
}

TEST(MultiNodeLaunch, NeedsTheSameTokenOnEveryNode) {
  const std::string master = loopback_master();
  const std::vector<std::string> probe = {bin_dir() + "/launch_probe", "env"};
  // No token at all: a usage error naming the ways to give one.
  auto none = start_node({}, 2, 0, 1, master, probe, {{"WEFT_JOB_TOKEN", ""}});
  ASSERT_TRUE(none->wait(30s));
  EXPECT_EQ(none->exit_code(), 2) << none->output();
  EXPECT_NE(none->output().find("--token-file"), std::string::npos) << none->output();
  // A token file on one node, the environment on the other: the same token.
  TempDir dir;
  const std::string file = dir.path() + "/token";
  std::ofstream(file) << kToken << "\n";
  auto n0 =
      start_node({}, 2, 0, 1, master, probe, {{"WEFT_JOB_TOKEN", ""}}, {"--token-file", file});
  auto n1 = start_node({}, 2, 1, 1, master, probe);
  ASSERT_TRUE(n0->wait(60s) && n1->wait(60s));
  EXPECT_EQ(n0->exit_code(), 0) << n0->output();
  EXPECT_EQ(n1->exit_code(), 0) << n1->output();
  // A different token cannot join.
  const std::string master2 = loopback_master();
  auto a = start_node({}, 2, 0, 1, master2, probe);
  auto b = start_node({}, 2, 1, 1, master2, probe, {{"WEFT_JOB_TOKEN", "another-token"}},
                      {"--rdzv-timeout", "3"});
  ASSERT_TRUE(b->wait(60s));
  EXPECT_NE(b->exit_code(), 0) << b->output();
  a->signal(SIGTERM);
  ASSERT_TRUE(a->wait(30s));
}

TEST(MultiNodeLaunch, RendezvousErrors) {
  const std::vector<std::string> probe = {bin_dir() + "/launch_probe", "env"};
  const std::vector<std::string> sleeper = {bin_dir() + "/launch_probe", "sleep"};
  // Node 0 never comes: node 1 gives up after --rdzv-timeout.
  auto alone = start_node({}, 2, 1, 1, loopback_master(), probe, {}, {"--rdzv-timeout", "2"});
  ASSERT_TRUE(alone->wait(30s));
  EXPECT_EQ(alone->exit_code(), 1) << alone->output();
  EXPECT_NE(alone->output().find("cannot reach the rendezvous store"), std::string::npos)
      << alone->output();
  const std::string master = loopback_master();
  auto n0 = start_node({}, 2, 0, 1, master, sleeper);
  auto n1 = start_node({}, 2, 1, 1, master, sleeper);
  ASSERT_TRUE(wait_output(*n1, [](const std::string& o) {
    return o.find("ready") != std::string::npos;
  })) << n1->output();
  // A second node 0 cannot serve the store; a second node 1 finds its rank
  // taken; a node with another --nnodes is refused.
  auto dup0 = start_node({}, 2, 0, 1, master, probe);
  ASSERT_TRUE(dup0->wait(30s));
  EXPECT_EQ(dup0->exit_code(), 1) << dup0->output();
  EXPECT_NE(dup0->output().find("cannot serve the rendezvous store"), std::string::npos)
      << dup0->output();
  auto dup1 = start_node({}, 2, 1, 1, master, probe);
  ASSERT_TRUE(dup1->wait(30s));
  EXPECT_EQ(dup1->exit_code(), 2) << dup1->output();
  EXPECT_NE(dup1->output().find("node rank 1 is already taken"), std::string::npos)
      << dup1->output();
  auto other = start_node({}, 3, 2, 1, master, probe);
  ASSERT_TRUE(other->wait(30s));
  EXPECT_EQ(other->exit_code(), 2) << other->output();
  EXPECT_NE(other->output().find("--nnodes 3"), std::string::npos) << other->output();
  n0->signal(SIGTERM);
  n1->signal(SIGTERM);
  ASSERT_TRUE(n0->wait(30s) && n1->wait(30s));
}

TEST(MultiNodeLaunch, AWorkerKilledOnOneNodeStopsEveryNode) {
  const std::string master = loopback_master();
  const std::vector<std::string> sleeper = {bin_dir() + "/launch_probe", "sleep"};
  auto n0 = start_node({}, 2, 0, 2, master, sleeper);
  auto n1 = start_node({}, 2, 1, 1, master, sleeper);
  std::smatch m;
  std::regex ready(R"(\[2\] ready pid=(\d+))");
  ASSERT_TRUE(wait_output(*n1, [&](const std::string& o) { return std::regex_search(o, ready); }))
      << n1->output();
  ASSERT_TRUE(wait_output(*n0, [&](const std::string& o) {
    return o.find("[0] ready") != std::string::npos && o.find("[1] ready") != std::string::npos;
  })) << n0->output();
  std::string out1 = n1->output();
  ASSERT_TRUE(std::regex_search(out1, m, ready));
  const pid_t victim = std::stoi(m[1]);
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(victim, SIGKILL), 0);
  ASSERT_TRUE(n1->wait(30s)) << n1->output();
  ASSERT_TRUE(n0->wait(30s)) << n0->output();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 20s);
  EXPECT_EQ(n1->exit_code(), 128 + SIGKILL) << n1->output();
  EXPECT_EQ(n0->exit_code(), 1) << n0->output();
  const std::string cause = "rank 2 (node 1, host ";
  EXPECT_NE(n0->output().find("the job failed on another node: " + cause), std::string::npos)
      << n0->output();
  EXPECT_NE(n1->output().find("job failed: " + cause), std::string::npos) << n1->output();
  for (auto* p : {n0.get(), n1.get()}) {
    EXPECT_NE(p->output().find("was killed by signal 9 (SIGKILL)"), std::string::npos)
        << p->output();
  }
}

// --nnodes MIN:MAX: bad bounds, a node rank beyond MAX, --elastic beside
// it, and nodes started with different shapes are refused, naming what is
// wrong.
TEST(MultiNodeLaunch, ElasticNodeOptionsThatCannotWork) {
  const std::vector<std::string> probe = {bin_dir() + "/launch_probe", "env"};
  const std::string master = loopback_master();
  auto refused = [&](const std::string& nnodes, int node, std::vector<std::string> extra,
                     const std::string& expect) {
    auto p = start_node({}, nnodes, node, 1, master, probe, {}, std::move(extra));
    ASSERT_TRUE(p->wait(30s)) << p->output();
    EXPECT_EQ(p->exit_code(), 2) << p->output();
    EXPECT_NE(p->output().find(expect), std::string::npos) << p->output();
  };
  refused("3:2", 0, {}, "the minimum is above the maximum");
  refused("0:2", 0, {}, "the minimum must be at least 1");
  refused("1:2", 2, {}, "--node-rank 2 is out of range for --nnodes 1:2");
  refused("1:2", 0, {"--elastic", "2:4"}, "an elastic multi-node job is --nnodes MIN:MAX");
  refused("1:2", 0, {"--max-restarts", "-1"}, "must be 0 or more");
  // Node 0 elastic, node 1 not: node 1 is refused, naming both shapes.
  auto n0 = start_node({}, "1:2", 0, 1, master, {bin_dir() + "/launch_probe", "sleep"},
                       {{"WEFT_ELASTIC_SETTLE", "60"}});
  std::this_thread::sleep_for(500ms);
  refused("2", 1, {}, "this node was started with --nnodes 2 but another with --nnodes 1:2");
  n0->signal(SIGTERM);
  ASSERT_TRUE(n0->wait(30s)) << n0->output();
}

TEST(MultiNodeLaunch, SingleNodeOptionsStayAsTheyWere) {
  auto [code, out] = run_cmd(
      {weft_bin(), "run", "-n", "2", "--nproc-per-node", "2", bin_dir() + "/launch_probe", "env"});
  EXPECT_EQ(code, 2) << out;
  std::tie(code, out) = run_cmd({weft_bin(), "run", "--nnodes", "2", "-n", "2", "--master",
                                 "127.0.0.1:1", bin_dir() + "/launch_probe", "env"});
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("--nproc-per-node"), std::string::npos) << out;
  std::tie(code, out) =
      run_cmd({weft_bin(), "run", "--nproc-per-node", "2", bin_dir() + "/launch_probe", "env"});
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("size=2"), std::string::npos) << out;
}

// ---- an emulated cluster -------------------------------------------------

class EmulatedCluster : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto [code, out] = run_cmd({cluster_script(), "check"});
    if (code != 0) {
      skip_ = "no emulated cluster here: " + out;
      return;
    }
    prefix_ = "wct" + std::to_string(::getpid());
    run_cmd({cluster_script(), "gc"});  // clusters of earlier runs that died
    std::tie(code, out) = run_cmd({cluster_script(), "up", prefix_, "2", "1gbit"});
    if (code != 0) {
      failed_ = "cluster.sh up failed: " + out;
      run_cmd({cluster_script(), "down", prefix_});
    }
  }
  static void TearDownTestSuite() {
    if (!prefix_.empty()) run_cmd({cluster_script(), "down", prefix_});
  }
  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
    ASSERT_TRUE(failed_.empty()) << failed_;
  }

  static std::vector<std::string> on(int host) {
    return {cluster_script(), "exec", prefix_, std::to_string(host)};
  }
  static std::string master() { return "10.77.0.1:" + std::to_string(29400 + port_++); }

  // Runs coll_worker with `args` on 2 hosts with n0 and n1 ranks; expects
  // success and checks that each rank saw 2 hosts and its host's ranks.
  void run_matrix(int n0, int n1, const std::vector<std::string>& args,
                  const std::map<std::string, std::string>& env = {}) {
    std::vector<std::string> worker = {bin_dir() + "/coll_worker"};
    worker.insert(worker.end(), args.begin(), args.end());
    const std::string m = master();
    auto a = start_node(on(1), 2, 0, n0, m, worker, env);
    auto b = start_node(on(2), 2, 1, n1, m, worker, env);
    ASSERT_TRUE(a->wait(240s)) << a->output();
    ASSERT_TRUE(b->wait(240s)) << b->output();
    EXPECT_EQ(a->exit_code(), 0) << a->output();
    EXPECT_EQ(b->exit_code(), 0) << b->output();
    EXPECT_NE(a->output().find("FAILURES 0 (job total 0)"), std::string::npos) << a->output();
    std::regex re(R"(RANK (\d+) LOCAL (\d+)/(\d+) HOSTS (\d+))");
    auto ma = matches(a->output(), re), mb = matches(b->output(), re);
    EXPECT_EQ(ma.size(), static_cast<size_t>(n0));
    EXPECT_EQ(mb.size(), static_cast<size_t>(n1));
    for (auto& x : ma) {
      EXPECT_EQ(x[3], std::to_string(n0));
      EXPECT_EQ(x[4], "2");
    }
    for (auto& x : mb) {
      EXPECT_EQ(x[3], std::to_string(n1));
      EXPECT_EQ(x[4], "2");
    }
  }

  static inline std::string skip_, failed_, prefix_;
  static inline int port_ = 0;
};

// 2 hosts x 2 ranks: Auto picks hierarchical; every collective (auto,
// forced hierarchical and every flat algorithm) matches the reference. Small
// pipeline blocks, so that the larger cases run through many of them.
TEST_F(EmulatedCluster, EvenHostsEveryCollective) {
  run_matrix(2, 2, {"--expect-auto", "hierarchical"}, {{"WEFT_HIER_BLOCK_BYTES", "64K"}});
}

// 2 + 1 ranks: Auto stays flat; forced hierarchical is the leader-based scheme.
TEST_F(EmulatedCluster, UnevenHostsEveryCollective) { run_matrix(2, 1, {"--expect-auto", "flat"}); }

// WEFT_<COLLECTIVE>_ALGO overrides the topology-aware choice.
TEST_F(EmulatedCluster, FlatForcedByTheEnvironment) {
  run_matrix(2, 2, {"--expect-auto", "ring", "--only", "allreduce,broadcast,allgather"},
             {{"WEFT_ALLREDUCE_ALGO", "ring"},
              {"WEFT_BROADCAST_ALGO", "tree"},
              {"WEFT_ALLGATHER_ALGO", "ring"}});
}

// A worker SIGKILLed on host 2 while every rank runs allreduces: both
// launchers exit non-zero, promptly, naming the killed rank.
TEST_F(EmulatedCluster, AWorkerKilledOnOneHostFailsTheJobOnBoth) {
  const std::vector<std::string> worker = {bin_dir() + "/coll_worker", "--loop"};
  const std::string m = master();
  auto a = start_node(on(1), 2, 0, 2, m, worker);
  auto b = start_node(on(2), 2, 1, 2, m, worker);
  std::regex ready(R"(\[3\] ready pid=(\d+))");
  ASSERT_TRUE(wait_output(*b, [&](const std::string& o) { return std::regex_search(o, ready); }))
      << b->output();
  // Every rank is in the loop: rank 3 finished allreduces, which need them all.
  std::regex looping(R"(\[3\] allreduces done: 3)");
  ASSERT_TRUE(wait_output(*b, [&](const std::string& o) { return std::regex_search(o, looping); }))
      << b->output();
  std::smatch mm;
  std::string out = b->output();
  ASSERT_TRUE(std::regex_search(out, mm, ready));
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(std::stoi(mm[1]), SIGKILL), 0);
  ASSERT_TRUE(b->wait(60s)) << b->output();
  ASSERT_TRUE(a->wait(60s)) << a->output();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 30s);
  EXPECT_EQ(b->exit_code(), 128 + SIGKILL) << b->output();
  EXPECT_NE(a->exit_code(), 0) << a->output();
  for (auto* p : {a.get(), b.get()}) {
    EXPECT_NE(p->output().find("job failed"), std::string::npos) << p->output();
    EXPECT_NE(p->output().find("rank 3 (node 1, host "), std::string::npos) << p->output();
    EXPECT_NE(p->output().find("was killed by signal 9 (SIGKILL)"), std::string::npos)
        << p->output();
  }
}

// ---- elastic jobs over the emulated hosts ------------------------------

// The elastic test job (tests/train/elastic_worker.cc): a ledger line per
// epoch from rank 0 ("exactly_once"), a membership event per generation.
std::vector<std::string> elastic_job(int epochs) {
  return {bin_dir() + "/elastic_worker",
          "--epochs",
          std::to_string(epochs),
          "--samples",
          "2400",
          "--global-batch",
          "48",
          "--step-ms",
          "20"};
}

int count(const std::string& text, const std::string& what) {
  int n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// --nnodes 1:2, 2 workers per host; host 2 dies in the middle of training
// (every process on it SIGKILLed at once, launcher and workers, as in a
// power loss): host 1's workers find them silent, form a generation of
// their own from the last commit and finish, every sample trained exactly
// once per epoch; host 1's launcher exits 0. The failure names one of the
// two dead workers; the other is not waited for either, since it is silent
// too (default settings: waiting for it would take WEFT_ELASTIC_SETTLE, 30
// s).
TEST_F(EmulatedCluster, ElasticJobGoesOnWhenAHostDies) {
  const int epochs = 4;
  const std::string m = master();
  auto a = start_node(on(1), "1:2", 0, 2, m, elastic_job(epochs));
  auto b = start_node(on(2), "1:2", 1, 2, m, elastic_job(epochs));
  ASSERT_TRUE(wait_output(*a, [](const std::string& o) {
    return o.find("\"ledger_epoch\": 0") != std::string::npos;
  })) << a->output();
  EXPECT_NE(a->output().find("\"workers\": 4"), std::string::npos) << a->output();
  const auto t0 = std::chrono::steady_clock::now();
  auto [code, out] = run_cmd({cluster_script(), "kill", prefix_, "2"});
  ASSERT_EQ(code, 0) << out;
  ASSERT_TRUE(b->wait(30s)) << b->output();
  EXPECT_EQ(b->exit_code(), 128 + SIGKILL) << b->output();
  ASSERT_TRUE(a->wait(180s)) << a->output();
  const std::string o = a->output();
  EXPECT_EQ(a->exit_code(), 0) << o;
  EXPECT_EQ(count(o, "\"exactly_once\": true"), epochs) << o;
  EXPECT_EQ(count(o, "\"exactly_once\": false"), 0) << o;
  EXPECT_NE(o.find("\"done\": true"), std::string::npos) << o;
  // The survivors formed a generation of their own after the failure.
  EXPECT_TRUE(std::regex_search(o, std::regex(R"(generation \d+ formed in [0-9.]+ s \(failure)")))
      << o;
  EXPECT_NE(o.find("\"workers\": 2"), std::string::npos) << o;
  EXPECT_NE(o.find("is silent since the failure (heartbeats): not waited for"), std::string::npos)
      << o;
  // Neither a wait for the settle time (30 s) nor a stall until a timeout.
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 25s) << o;
}

// --nnodes 1:2: host 1 starts alone (MIN is one node) and trains; host 2
// comes later and its workers join at a step boundary; both finish, every
// sample trained exactly once per epoch.
TEST_F(EmulatedCluster, ElasticNodeThatComesLaterJoinsTheJob) {
  const int epochs = 6;
  const std::string m = master();
  const std::map<std::string, std::string> env = {{"WEFT_ELASTIC_SETTLE", "1"}};
  auto a = start_node(on(1), "1:2", 0, 2, m, elastic_job(epochs), env);
  ASSERT_TRUE(wait_output(*a, [](const std::string& o) {
    return o.find("\"event\": \"membership\"") != std::string::npos;
  })) << a->output();
  EXPECT_NE(a->output().find("\"workers\": 2"), std::string::npos) << a->output();
  auto b = start_node(on(2), "1:2", 1, 2, m, elastic_job(epochs), env);
  ASSERT_TRUE(a->wait(180s)) << a->output();
  ASSERT_TRUE(b->wait(60s)) << b->output();
  const std::string o = a->output();
  EXPECT_EQ(a->exit_code(), 0) << o;
  EXPECT_EQ(b->exit_code(), 0) << b->output();
  EXPECT_EQ(count(o, "\"exactly_once\": true"), epochs) << o;
  EXPECT_EQ(count(o, "\"exactly_once\": false"), 0) << o;
  EXPECT_NE(o.find("\"workers\": 4"), std::string::npos) << o << b->output();
  EXPECT_TRUE(std::regex_search(o, std::regex(R"(generation \d+ formed in [0-9.]+ s \(join)")))
      << o;
}

}  // namespace
}  // namespace weft::testing
