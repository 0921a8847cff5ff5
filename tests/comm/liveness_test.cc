// Liveness with real processes (src/comm/heartbeat.h): a stopped rank is
// declared silent and evicted within the heartbeat timeout, long before the
// call's deadline; a rank that is only slow (a long compute step, 10% of a
// CPU, a large transfer over a 10 Mbit/s link) is never declared dead; a
// host cut off from the network is found the same way; strangers' datagrams
// on the heartbeat socket are dropped and logged, rate-limited. The
// heartbeat timeout is 2 s here (default 4 s), so that the tests are short.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <regex>
#include <thread>

#include "core/auth.h"
#include "core/bytes.h"
#include "core/socket.h"
#include "job.h"
#include "testing/cgroup.h"
#include "testing/testing.h"
#include "weft/weft.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using test_job::Job;
using testing::Process;

const std::map<std::string, std::string> kFastHeartbeat = {{"WEFT_HEARTBEAT_TIMEOUT", "2"},
                                                           {"WEFT_HEARTBEAT_INTERVAL", "0.25"}};

bool has(const std::string& text, const std::string& what) {
  return text.find(what) != std::string::npos;
}

// The seconds of "ALLREDUCE <s> s rank <rank>" in out (-1 when absent).
double allreduce_seconds(const std::string& out, int rank) {
  std::smatch m;
  const std::regex re(fmt::format("ALLREDUCE ([0-9.]+) s rank {}", rank));
  return std::regex_search(out, m, re) ? std::stod(m[1]) : -1;
}

// Every rank of a compute job ends with OK and no rank was declared silent.
void expect_all_ok(Job& job, int n, std::chrono::seconds limit) {
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(job.proc(r).wait(limit)) << "rank " << r << " hangs:\n" << job.proc(r).output();
    const std::string out = job.proc(r).output();
    EXPECT_EQ(job.proc(r).exit_code(), 0) << out;
    EXPECT_TRUE(has(out, "OK")) << out;
    EXPECT_FALSE(has(out, "silent")) << out;
  }
}

TEST(Liveness, StoppedRankIsDeclaredSilentAndEvicted) {
  const int n = 3, victim = 1;
  Job job(n, {"allreduce-loop", "0", "100000"}, 120, kFastHeartbeat);
  job.wait_ready(60s, "RUNNING");
  const auto t0 = std::chrono::steady_clock::now();
  job.proc(victim).signal(SIGSTOP);
  for (int r = 0; r < n; ++r) {
    if (r == victim) continue;
    ASSERT_TRUE(job.proc(r).wait(60s)) << "rank " << r << " hangs:\n" << job.proc(r).output();
    const std::string out = job.proc(r).output();
    EXPECT_EQ(job.proc(r).exit_code(), 3) << out;
    EXPECT_TRUE(has(out, "ERROR PeerError rank=1")) << out;
    EXPECT_TRUE(has(out, "rank 1 (host ")) << out;
    EXPECT_TRUE(std::regex_search(out, std::regex(R"(silent for \d+\.\d s)"))) << out;
  }
  // Found by the heartbeat, not by the 120 s deadline of the blocked allreduce.
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 60s);
  // The detecting rank evicted it (the launcher that owns it kills it).
  const std::string evicted = job.store().get("weft/evict/" + Job::member(victim), 10s);
  EXPECT_TRUE(std::regex_match(
      evicted, std::regex(R"(silent for \d+\.\d s \(declared by rank [02] on host .+\))")))
      << evicted;
  EXPECT_FALSE(job.store().try_get("weft/evict/" + Job::member(0), 5s).has_value());
  EXPECT_FALSE(job.store().try_get("weft/evict/" + Job::member(2), 5s).has_value());
  job.proc(victim).signal(SIGKILL);
  job.proc(victim).wait(10s);
}

// The training thread of rank 1 computes for 10 s (five heartbeat timeouts)
// while the others wait for it in an allreduce: slow, not dead.
TEST(Liveness, LongComputeStepIsNotDeath) {
  const int n = 3;
  Job job(n, {"compute", "1", "10", "1000"}, 120, kFastHeartbeat);
  expect_all_ok(job, n, 90s);
  EXPECT_TRUE(has(job.proc(1).output(), "SPUN")) << job.proc(1).output();
  // Rank 0 did wait for the compute step (else this test proves nothing).
  EXPECT_GT(allreduce_seconds(job.proc(0).output(), 0), 4.0) << job.proc(0).output();
}

// Rank 1, held to 10% of a CPU by a cgroup quota (every thread of it,
// heartbeat included), computes for 20 s while the others wait.
TEST(Liveness, RankAtTenPercentOfACpuIsNotDeath) {
  if (const std::string why = testing::CpuQuotaGroup::unavailable(); !why.empty()) {
    GTEST_SKIP() << "no CPU quota group here: " << why;
  }
  auto group = testing::CpuQuotaGroup::create(fmt::format("weft-liveness-{}", ::getpid()), 10000);
  const int n = 3;
  Job job(n, {"compute", "1", "20", "1000"}, 120, kFastHeartbeat);
  job.wait_ready(60s, "READY");
  group->add(job.proc(1).pid());
  expect_all_ok(job, n, 120s);
  EXPECT_TRUE(has(job.proc(1).output(), "SPUN")) << job.proc(1).output();
  EXPECT_GT(allreduce_seconds(job.proc(0).output(), 0), 4.0) << job.proc(0).output();
}

// A heartbeat datagram as docs/PROTOCOL.md describes it, with the MAC of `token`.
std::vector<uint8_t> datagram(const std::string& token, uint64_t world, uint32_t generation,
                              uint32_t from, uint32_t to, uint64_t seq) {
  std::vector<uint8_t> d(72, 0);
  bytes::put_u32(d.data(), 0x42484657);
  bytes::put_u16(d.data() + 4, 1);
  bytes::put_u16(d.data() + 6, 1);
  bytes::put_u64(d.data() + 8, world);
  bytes::put_u32(d.data() + 16, generation);
  bytes::put_u32(d.data() + 20, from);
  bytes::put_u32(d.data() + 24, to);
  bytes::put_u64(d.data() + 32, seq);
  auto mac = auth::hmac(token, "weft heartbeat v1", std::span<const uint8_t>(d.data(), 40),
                        std::span<const uint8_t>());
  std::copy(mac.begin(), mac.end(), d.begin() + 40);
  return d;
}

TEST(Liveness, StrangersDatagramsAreDroppedAndLoggedRateLimited) {
  const int n = 3;
  Job job(n, {"allreduce-loop", "20", "100000", "--wait-go"}, 60, kFastHeartbeat);
  job.wait_ready();
  auto record = nlohmann::json::parse(job.store().get("weft/world/g1/rank/0", 10s));
  auto [host, port] = net::split_host_port(record.at("hb").get<std::string>(), "hb");
  auto addr = net::resolve(host, port).front();
  net::Fd fd(::socket(addr.family(), SOCK_DGRAM | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(fd.valid());
  auto send = [&](const void* p, size_t len) {
    (void)::sendto(fd.get(), p, len, 0, addr.sa(), addr.length);
  };
  const uint64_t world = bytes::fnv1a64("world\n1", 7);
  std::vector<std::vector<uint8_t>> junk;
  junk.push_back({});                                 // empty
  junk.push_back(std::vector<uint8_t>(200, 0x5a));    // garbage
  junk.push_back(std::vector<uint8_t>(65000, 0xa5));  // too large (truncated when read)
  auto forged = datagram("not-the-token-of-this-job", world, 1, 1, 0, 1);
  junk.push_back(forged);                                        // wrong MAC
  junk.push_back(datagram(job.token(), world + 1, 1, 1, 0, 1));  // another world
  junk.push_back(datagram(job.token(), world, 7, 1, 0, 1));      // another generation
  junk.push_back(datagram(job.token(), world, 1, 9, 0, 1));      // rank out of range
  junk.push_back(datagram(job.token(), world, 1, 0, 0, 1));      // from itself
  junk.push_back(datagram(job.token(), world, 1, 1, 2, 1));      // for another rank
  auto truncated = datagram(job.token(), world, 1, 1, 0, 1);
  truncated.resize(71);
  junk.push_back(truncated);
  // Each kind once, then a flood: the log must not follow it line by line.
  for (int round = 0; round < 300; ++round) {
    for (const auto& d : junk) send(d.data(), d.size());
  }
  // Rank 0 is still alive and well: the job completes.
  job.store().set("test/go", "1", 10s);
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(job.proc(r).wait(120s)) << job.proc(r).output();
    EXPECT_EQ(job.proc(r).exit_code(), 0) << job.proc(r).output();
    EXPECT_TRUE(has(job.proc(r).output(), "OK")) << job.proc(r).output();
  }
  const std::string out = job.proc(0).output();
  EXPECT_TRUE(has(out, "dropped a datagram from 127.0.0.1:")) << out;
  size_t lines = 0;
  for (size_t at = out.find("dropped a datagram"); at != std::string::npos;
       at = out.find("dropped a datagram", at + 1)) {
    ++lines;
  }
  EXPECT_GE(lines, 1u);
  EXPECT_LE(lines, 11u) << out;  // 10 a minute, and the count of those held back
  EXPECT_TRUE(has(out, "more dropped heartbeat datagrams were not logged")) << out;
}

// ---- two emulated hosts (network namespaces, scripts/cluster.sh) ----------

std::pair<int, std::string> run_cmd(const std::vector<std::string>& argv) {
  Process p(argv);
  if (!p.wait(60s)) return {-1, p.output() + "\n(timed out)"};
  return {p.exit_code(), p.output()};
}

std::string cluster_script() { return std::string(WEFT_SOURCE_DIR) + "/scripts/cluster.sh"; }

// 2 hosts whose links are shaped to 10 Mbit/s (tbf, both directions).
class LivenessAcrossHosts : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto [code, out] = run_cmd({cluster_script(), "check"});
    if (code != 0) {
      skip_ = "network namespaces are not available here: " + out;
      return;
    }
    prefix_ = fmt::format("wlv{}", ::getpid());
    run_cmd({cluster_script(), "gc"});
    std::tie(code, out) = run_cmd({cluster_script(), "up", prefix_, "2", "10mbit"});
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

  // Rank `rank` of 2 on host rank+1; rank 0 serves the store on host 1 (the
  // torchrun variables: no launcher needed inside the namespaces).
  std::unique_ptr<Process> start(int rank, int port, const std::vector<std::string>& args) {
    std::vector<std::string> argv = {cluster_script(), "exec", prefix_, std::to_string(rank + 1),
                                     testing::bin_dir() + "/comm_worker"};
    argv.insert(argv.end(), args.begin(), args.end());
    std::map<std::string, std::string> env = {{"RANK", std::to_string(rank)},
                                              {"WORLD_SIZE", "2"},
                                              {"LOCAL_RANK", "0"},
                                              {"LOCAL_WORLD_SIZE", "1"},
                                              {"MASTER_ADDR", "10.77.0.1"},
                                              {"MASTER_PORT", std::to_string(port)},
                                              {"TORCHELASTIC_USE_AGENT_STORE", "False"},
                                              {"WEFT_JOB_TOKEN", token_},
                                              {"WEFT_TIMEOUT", "120"},
                                              {"WEFT_MEMBER", fmt::format("n{}.s0.r0", rank)},
                                              {"WEFT_LOG_LEVEL", "info"}};
    for (const auto& [k, v] : kFastHeartbeat) env[k] = v;
    return std::make_unique<Process>(argv, env);
  }

  static bool wait_output(Process& p, const std::string& what, std::chrono::seconds limit) {
    return testing::wait_until([&] { return has(p.output(), what) || p.wait(0ms); },
                               std::chrono::duration_cast<std::chrono::milliseconds>(limit)) &&
           has(p.output(), what);
  }

  static inline std::string skip_, failed_, prefix_;
  const std::string token_ = auth::generate_token();
};

// An allreduce of 16 MB between the hosts takes many heartbeat timeouts at
// 10 Mbit/s: the heartbeats do not queue behind it.
TEST_F(LivenessAcrossHosts, LargeTransferOnASlowLinkIsNotDeath) {
  const std::vector<std::string> args = {"compute", "-1", "0", std::to_string(4u << 20)};
  auto a = start(0, 29611, args);
  auto b = start(1, 29611, args);
  for (auto* p : {a.get(), b.get()}) {
    ASSERT_TRUE(p->wait(120s)) << p->output();
    EXPECT_EQ(p->exit_code(), 0) << p->output();
    EXPECT_TRUE(has(p->output(), "OK")) << p->output();
    EXPECT_FALSE(has(p->output(), "silent")) << p->output();
  }
  // The link was slow (else this test proves nothing): two timeouts at least.
  EXPECT_GT(allreduce_seconds(a->output(), 0), 4.0) << a->output();
}

// Host 2's link goes down under a running job: each side declares the other
// silent; rank 0 (with the store on its host) evicts rank 1.
TEST_F(LivenessAcrossHosts, PartitionedHostIsDeclaredSilent) {
  const std::vector<std::string> args = {"allreduce-loop", "0", "1000"};
  auto a = start(0, 29612, args);
  auto b = start(1, 29612, args);
  ASSERT_TRUE(wait_output(*a, "RUNNING", 60s)) << a->output();
  ASSERT_TRUE(wait_output(*b, "RUNNING", 60s)) << b->output();
  auto [code, out] =
      run_cmd({cluster_script(), "exec", prefix_, "2", "ip", "link", "set", "eth0", "down"});
  ASSERT_EQ(code, 0) << out;
  ASSERT_TRUE(a->wait(60s)) << a->output();
  ASSERT_TRUE(b->wait(60s)) << b->output();
  run_cmd({cluster_script(), "exec", prefix_, "2", "ip", "link", "set", "eth0", "up"});
  EXPECT_EQ(a->exit_code(), 3) << a->output();
  EXPECT_TRUE(has(a->output(), "ERROR PeerError rank=1")) << a->output();
  EXPECT_TRUE(has(a->output(), "rank 1 (host ")) << a->output();
  EXPECT_TRUE(has(a->output(), "silent for")) << a->output();
  EXPECT_TRUE(has(a->output(), "evicted: weft/evict/n1.s0.r0 = 'silent for")) << a->output();
  EXPECT_EQ(b->exit_code(), 3) << b->output();
  EXPECT_TRUE(has(b->output(), "ERROR PeerError rank=0")) << b->output();
  EXPECT_TRUE(has(b->output(), "silent for")) << b->output();
}

}  // namespace
}  // namespace weft
