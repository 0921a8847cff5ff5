// EtcdStore against a real 3-member etcd cluster on loopback (the shared
// contract tests of store_test.cc run on it too): failover when the member a
// client talks to dies, exactly-once add across a member's death, waits woken
// by another process, the value limit, bad URLs, unreachable and misbehaving
// endpoints, and a Communicator rendezvous over etcd.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <thread>

#include "store/store_testing.h"
#include "weft/errors.h"
#include "weft/weft.h"

namespace weft::store_test {
namespace {

bool etcd_installed() { return !EtcdCluster::binary().empty(); }

#define SKIP_WITHOUT_ETCD()                                           \
  if (!etcd_installed())                                              \
  GTEST_SKIP() << "etcd is not installed (Debian: etcd-server); set " \
                  "WEFT_TEST_ETCD to an etcd binary to run this test"

bool contains(const std::string& s, std::string_view part) {
  return s.find(part) != std::string::npos;
}

TEST(EtcdUrl, Parses) {
  auto o = parse_etcd_url("etcd://h1:2379,10.0.0.2:2380,[::1]:2381/jobs/42", "WEFT_STORE");
  EXPECT_EQ(o.endpoints, (std::vector<std::string>{"h1:2379", "10.0.0.2:2380", "[::1]:2381"}));
  EXPECT_EQ(o.prefix, "jobs/42");
  EXPECT_EQ(parse_etcd_url("etcd://h:1", "X").prefix, "weft");
  EXPECT_EQ(parse_etcd_url("etcd://h:1/p/", "X").prefix, "p");
  EXPECT_TRUE(is_etcd_url("etcd://h:1"));
  EXPECT_FALSE(is_etcd_url("h:1"));
}

TEST(EtcdUrl, RejectsBadUrlsNamingTheVariable) {
  for (const char* bad : {"h:1", "etcd://", "etcd:///p", "etcd://h", "etcd://h:0", "etcd://h:1,",
                          "etcd://h:1,,h:2", "etcd://h:99999", "etcd://h:1/", "etcd://h:1/a b"}) {
    try {
      parse_etcd_url(bad, "WEFT_STORE");
      ADD_FAILURE() << bad << " was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_TRUE(contains(e.what(), "WEFT_STORE")) << e.what();
      EXPECT_TRUE(contains(e.what(), "etcd://HOST:PORT")) << e.what();
    }
  }
  EXPECT_THROW(EtcdStore(EtcdStoreOptions{}), InvalidArgument);  // no endpoint
  EtcdStoreOptions o;
  o.endpoints = {"127.0.0.1:1"};
  o.prefix = "";
  EXPECT_THROW(EtcdStore{o}, InvalidArgument);
}

TEST(EtcdStore, UnreachableClusterIsAStoreErrorNamingEveryEndpoint) {
  EtcdStoreOptions o;
  const int a = testing::free_port(), b = testing::free_port();
  o.endpoints = {fmt::format("127.0.0.1:{}", a), fmt::format("127.0.0.1:{}", b)};
  EtcdStore s(o);
  auto start = std::chrono::steady_clock::now();
  try {
    s.set("k", "v", 500ms);
    FAIL() << "set() succeeded without etcd";
  } catch (const StoreError& e) {
    EXPECT_TRUE(contains(e.what(), o.endpoints[0])) << e.what();
    EXPECT_TRUE(contains(e.what(), o.endpoints[1])) << e.what();
    EXPECT_TRUE(contains(e.what(), "set('k')")) << e.what();
  }
  EXPECT_LT(seconds_since(start), 5.0);
  EXPECT_THROW(s.connect(300ms), StoreError);
}

// A member that answers HTTP 200 with `body` (repeated `times` times) to
// every request, on a port of its own.
class FakeMember {
 public:
  FakeMember(std::string body, size_t times) : body_(std::move(body)), times_(times) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    EXPECT_EQ(listen(fd_, 8), 0);
    socklen_t len = sizeof addr;
    getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { serve(); });
  }
  ~FakeMember() {
    stop_ = true;
    shutdown(fd_, SHUT_RDWR);
    close(fd_);
    thread_.join();
  }
  std::string endpoint() const { return fmt::format("127.0.0.1:{}", port_); }

 private:
  void serve() {
    while (!stop_) {
      int c = accept(fd_, nullptr, nullptr);
      if (c < 0) return;
      char buf[4096];
      (void)!read(c, buf, sizeof buf);  // the request (small: one read is enough here)
      std::string head = fmt::format(
          "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
          body_.size() * times_);
      bool ok = write(c, head.data(), head.size()) == static_cast<ssize_t>(head.size());
      for (size_t i = 0; ok && i < times_ && !stop_; ++i) {
        ok = write(c, body_.data(), body_.size()) == static_cast<ssize_t>(body_.size());
      }
      close(c);
    }
  }
  std::string body_;
  size_t times_;
  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

TEST(EtcdStore, GarbageAndEndlessAnswersAreErrorsNamingTheEndpoint) {
  FakeMember garbage("this is not json", 1);
  EtcdStoreOptions o;
  o.endpoints = {garbage.endpoint()};
  try {
    EtcdStore(o).try_get("k", 2s);
    FAIL() << "a garbage answer was accepted";
  } catch (const StoreError& e) {
    EXPECT_TRUE(contains(e.what(), garbage.endpoint())) << e.what();
    EXPECT_TRUE(contains(e.what(), "invalid JSON")) << e.what();
  }
  // 64 MiB of answer: refused once past the bound, not read to the end.
  FakeMember endless(std::string(1 << 20, ' '), 64);
  o.endpoints = {endless.endpoint()};
  try {
    EtcdStore(o).try_get("k", 10s);
    FAIL() << "an oversize answer was accepted";
  } catch (const StoreError& e) {
    EXPECT_TRUE(contains(e.what(), endless.endpoint())) << e.what();
    EXPECT_TRUE(contains(e.what(), "more than")) << e.what();
  }
  // A value that is not base64.
  FakeMember bad_value(R"({"kvs":[{"key":"eA==","mod_revision":"2","value":"%%%"}]})", 1);
  o.endpoints = {bad_value.endpoint()};
  EXPECT_THROW(EtcdStore(o).try_get("k", 2s), StoreError);
}

class EtcdClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_ETCD();
    cluster = std::make_unique<EtcdCluster>(3);
  }
  std::unique_ptr<EtcdCluster> cluster;
};

TEST_F(EtcdClusterTest, KillingTheMemberTheClientTalksToLosesNothing) {
  const EtcdStoreOptions o = cluster->options();
  EtcdStore s(o);
  s.set("before", "kept");
  EXPECT_EQ(s.add("counter", 5), 5);
  EXPECT_TRUE(s.compare_set("leader", std::nullopt, "me").swapped);
  s.set("doomed", "x");
  const int victim = cluster->member_of(s.current_endpoint());
  ASSERT_GE(victim, 0);
  cluster->kill(victim);
  const uint64_t failovers = s.failovers();

  // Every operation still works, with what was stored before the kill.
  EXPECT_EQ(s.get("before"), "kept");
  EXPECT_NE(cluster->member_of(s.current_endpoint()), victim);
  EXPECT_GT(s.failovers(), failovers);
  EXPECT_EQ(s.try_get("before"), "kept");
  EXPECT_EQ(s.add("counter", 2), 7);
  auto r = s.compare_set("leader", std::string("me"), "still me");
  EXPECT_TRUE(r.swapped);
  EXPECT_EQ(s.compare_set("leader", std::nullopt, "other").current, "still me");
  s.set("after", "new");
  s.wait({"before", "after", "counter"}, 10s);
  EXPECT_TRUE(s.remove("doomed"));
  EXPECT_FALSE(s.remove("doomed"));
  EXPECT_THROW(s.get("doomed", 200ms), TimeoutError);
  // New clients started after the kill (each starts at a random member,
  // the dead one included).
  for (int i = 0; i < 6; ++i) EXPECT_EQ(EtcdStore(o).get("before"), "kept");

  // With a second member gone there is no quorum: calls fail within their
  // deadline, naming the call; nothing hangs.
  for (int i = 0; i < cluster->size(); ++i) {
    if (i != victim) {
      cluster->kill(i);
      break;
    }
  }
  auto start = std::chrono::steady_clock::now();
  try {
    s.set("no quorum", "x", 2s);
    FAIL() << "set() succeeded without quorum";
  } catch (const TimeoutError& e) {
    EXPECT_TRUE(contains(e.what(), "set('no quorum')")) << e.what();
    EXPECT_TRUE(contains(e.what(), "etcd at 127.0.0.1:")) << e.what();
  }
  EXPECT_LT(seconds_since(start), 10.0);
}

// A member that stops answering (SIGSTOP: a hung host) costs a client one
// attempt_timeout, then it goes on with another member.
TEST_F(EtcdClusterTest, AMemberThatStopsAnsweringIsLeftAfterTheAttemptTimeout) {
  EtcdStoreOptions o = cluster->options();
  o.attempt_timeout = 1s;
  EtcdStore s(o);
  s.set("before", "kept");
  const int victim = cluster->member_of(s.current_endpoint());
  ASSERT_GE(victim, 0);
  cluster->signal(victim, SIGSTOP);
  EXPECT_EQ(s.get("before", 20s), "kept");
  EXPECT_NE(cluster->member_of(s.current_endpoint()), victim);
  EXPECT_EQ(s.add("n", 1, 20s), 1);
  EXPECT_TRUE(s.compare_set("c", std::nullopt, "v", 20s).swapped);
  cluster->signal(victim, SIGCONT);
}

TEST_F(EtcdClusterTest, AddsStayExactlyOnceWhileAMemberDies) {
  constexpr int kThreads = 4, kAdds = 60;
  EtcdStoreOptions o = cluster->options();
  std::vector<std::vector<int64_t>> seen(kThreads);
  std::atomic<int> done0{0};    // adds client 0 has done
  std::atomic<int> victim{-1};  // the member client 0 talks to
  std::thread killer([&] {
    // Kill it in the middle of the traffic.
    testing::wait_until([&] { return victim >= 0 && done0.load() >= kAdds / 3; });
    if (victim >= 0) cluster->kill(victim);
  });
  testing::run_ranks_ok(kThreads, [&](int rank) {
    EtcdStore s(o);
    if (rank == 0) victim = cluster->member_of(s.current_endpoint());
    for (int i = 0; i < kAdds; ++i) {
      seen[static_cast<size_t>(rank)].push_back(s.add("counter", 1));
      if (rank == 0) ++done0;
    }
    if (rank == 0) {
      EXPECT_GT(s.failovers(), 0u);
    }
  });
  killer.join();
  ASSERT_GE(victim.load(), 0);
  EXPECT_FALSE(cluster->alive(victim));
  EtcdStore s(o);
  EXPECT_EQ(s.get("counter"), std::to_string(kThreads * kAdds));
  std::vector<int64_t> all;
  for (auto& v : seen) all.insert(all.end(), v.begin(), v.end());
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i < all.size(); ++i) ASSERT_EQ(all[i], static_cast<int64_t>(i + 1));
}

TEST_F(EtcdClusterTest, WaitWakesOnASetFromAnotherProcess) {
  EtcdStoreOptions o = cluster->options();
  EtcdStore waiter(o);
  std::atomic<bool> woke{false};
  std::thread t([&] {
    waiter.wait({"from-child", "also"}, 30s);
    woke = true;
  });
  ASSERT_TRUE(testing::wait_until([&] { return waiter.wait_stats().waiting == 1; }));
  EXPECT_FALSE(woke.load());
  pid_t child = fork_child([&] {
    EtcdStore s(o);
    s.set("from-child", "1");
    s.set("also", "2");
    return 0;
  });
  EXPECT_EQ(wait_child(child, 30000ms), 0);
  t.join();
  EXPECT_TRUE(woke.load());
  EXPECT_EQ(waiter.wait_stats().waiting, 0u);
  EXPECT_EQ(waiter.get("from-child"), "1");
}

TEST_F(EtcdClusterTest, ValuesAboveTheLimitGetAClearError) {
  EtcdStore s(cluster->options());
  s.set("max", std::string(kMaxEtcdValueBytes, 'x'));
  EXPECT_EQ(s.get("max").size(), kMaxEtcdValueBytes);
  for (auto call : {0, 1}) {
    try {
      const std::string over(kMaxEtcdValueBytes + 1, 'y');
      if (call == 0) s.set("over", over);
      if (call == 1) s.compare_set("over", std::nullopt, over);
      FAIL() << "an oversize value was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_TRUE(contains(e.what(), "etcd store's limit")) << e.what();
      EXPECT_TRUE(contains(e.what(), std::to_string(kMaxEtcdValueBytes + 1))) << e.what();
      EXPECT_TRUE(contains(e.what(), "'over'")) << e.what();
    }
  }
  EXPECT_EQ(s.try_get("over"), std::nullopt);
}

TEST_F(EtcdClusterTest, ClearDeletesEveryKeyOfThePrefixOnly) {
  EtcdStoreOptions a = cluster->options(), b = cluster->options();
  EtcdStore sa(a), sb(b);
  sa.set("x", "1");
  sa.add("n", 1);  // and a marker
  sb.set("x", "other job");
  EXPECT_GE(sa.clear(5s), 3);
  EXPECT_EQ(sa.try_get("x"), std::nullopt);
  EXPECT_EQ(sa.try_get("n"), std::nullopt);
  EXPECT_EQ(sb.get("x"), "other job");
}

TEST_F(EtcdClusterTest, KeysOfOneStoreStayUnderItsPrefix) {
  EtcdStoreOptions a = cluster->options(), b = cluster->options();
  EtcdStore sa(a), sb(b);
  sa.set("k", "in a");
  EXPECT_EQ(sb.try_get("k"), std::nullopt);
  EXPECT_TRUE(sb.compare_set("k", std::nullopt, "in b").swapped);
  EXPECT_EQ(sa.get("k"), "in a");
}

// Two ranks, each a process with a client of its own, rendezvous over etcd
// (one member already dead) and allreduce.
TEST_F(EtcdClusterTest, CommunicatorRendezvousAndAllreduceOverEtcd) {
  cluster->kill(0);
  EtcdStoreOptions o = cluster->options();
  std::vector<pid_t> children;
  for (int rank = 0; rank < 2; ++rank) {
    children.push_back(fork_child([o, rank] {
      auto store = std::make_shared<EtcdStore>(o);
      CommOptions co;
      co.timeout = 60s;
      co.job_token = "etcd-test-token-0123456789";
      auto c = Communicator::create(rank, 2, store, co);
      std::vector<float> v(1000, static_cast<float>(rank + 1));
      c->allreduce(v);
      for (float x : v) {
        if (x != 3.0f) {
          std::fprintf(stderr, "rank %d: allreduce gave %f, expected 3\n", rank, double(x));
          return 1;
        }
      }
      return 0;
    }));
  }
  for (pid_t c : children) EXPECT_EQ(wait_child(c, 120000ms), 0);
}

// `weft run --store etcd://...`: the launcher serves no store; the workers
// rendezvous through etcd (under a fresh sub-prefix of the job) and
// allreduce.
TEST_F(EtcdClusterTest, WeftRunWithAnEtcdStore) {
  const std::string prefix = cluster->options().prefix;
  const std::string url = fmt::format("etcd://{}/{}", fmt::join(cluster->endpoints(), ","), prefix);
  testing::Process run({testing::bin_dir() + "/weft", "run", "-n", "2", "--store", url, "--",
                        "/bin/sh", "-c", "echo \"store=$WEFT_STORE\"; exec \"$0\" \"$@\"",
                        testing::bin_dir() + "/comm_worker", "allreduce-loop", "20", "1000"});
  ASSERT_TRUE(run.wait(120s)) << run.output();
  EXPECT_EQ(run.exit_code(), 0) << run.output();
  const std::string out = run.output();
  EXPECT_NE(out.find("[0] OK"), std::string::npos) << out;
  EXPECT_NE(out.find("[1] OK"), std::string::npos) << out;
  // The workers were given the cluster, under a prefix of the job's own.
  EXPECT_NE(out.find("[0] store=" + url + "/"), std::string::npos) << out;
  // The launcher deleted the job's keys at the end (etcdctl: etcd-client).
  if (access("/usr/bin/etcdctl", X_OK) == 0) {
    testing::Process ls({"/usr/bin/etcdctl", "--endpoints", cluster->endpoint(0), "get", "--prefix",
                         prefix + "/", "--keys-only"},
                        {{"ETCDCTL_API", "3"}});
    ASSERT_TRUE(ls.wait(30s));
    EXPECT_EQ(ls.exit_code(), 0) << ls.output();
    EXPECT_EQ(ls.output().find(prefix), std::string::npos) << ls.output();
  }
}

// Two nodes (two launchers) with the store in etcd: no launcher serves it,
// so no launcher's host is the store's single point of failure.
TEST_F(EtcdClusterTest, TwoNodesRendezvousThroughEtcd) {
  cluster->kill(2);  // and with a member down
  const std::string url =
      fmt::format("etcd://{}/{}", fmt::join(cluster->endpoints(), ","), cluster->options().prefix);
  std::vector<std::unique_ptr<testing::Process>> nodes;
  for (int node = 0; node < 2; ++node) {
    nodes.push_back(std::make_unique<testing::Process>(
        std::vector<std::string>{
            testing::bin_dir() + "/weft", "run", "--nnodes", "2", "--node-rank",
            std::to_string(node), "--nproc-per-node", "1", "--store", url, "--rdzv-timeout", "60",
            "--", testing::bin_dir() + "/comm_worker", "allreduce-loop", "10", "100"},
        std::map<std::string, std::string>{{"WEFT_JOB_TOKEN", "etcd-two-nodes-token-12345"}}));
  }
  for (auto& p : nodes) {
    ASSERT_TRUE(p->wait(120s)) << p->output();
    EXPECT_EQ(p->exit_code(), 0) << p->output();
    EXPECT_NE(p->output().find("OK"), std::string::npos) << p->output();
  }
}

// Under mpirun (its environment, as launchers_test sets it): WEFT_STORE
// names the etcd cluster and no rank serves a store; a rank of another job
// given the same prefix is refused at once, naming the prefix as the fix.
TEST_F(EtcdClusterTest, RanksUnderMpirunRendezvousThroughEtcd) {
  const std::string url =
      fmt::format("etcd://{}/{}", fmt::join(cluster->endpoints(), ","), cluster->options().prefix);
  auto env = [&](int rank, const std::string& job) {
    return std::map<std::string, std::string>{{"OMPI_COMM_WORLD_RANK", std::to_string(rank)},
                                              {"OMPI_COMM_WORLD_SIZE", "2"},
                                              {"OMPI_COMM_WORLD_LOCAL_RANK", std::to_string(rank)},
                                              {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                                              {"OMPI_MCA_ess_base_jobid", job},
                                              {"WEFT_STORE", url},
                                              {"WEFT_JOB_TOKEN", "etcd-mpirun-token-0123456789"}};
  };
  std::vector<std::unique_ptr<testing::Process>> ranks;
  for (int rank = 0; rank < 2; ++rank) {
    ranks.push_back(std::make_unique<testing::Process>(
        std::vector<std::string>{testing::bin_dir() + "/comm_worker", "allreduce-loop", "10",
                                 "1000"},
        env(rank, "777")));
  }
  for (auto& p : ranks) {
    ASSERT_TRUE(p->wait(120s)) << p->output();
    EXPECT_EQ(p->exit_code(), 0) << p->output();
    EXPECT_NE(p->output().find("OK"), std::string::npos) << p->output();
  }
  testing::Process other({testing::bin_dir() + "/comm_worker", "allreduce-loop", "10", "1000"},
                         env(0, "778"));
  ASSERT_TRUE(other.wait(60s)) << other.output();
  EXPECT_NE(other.exit_code(), 0);
  EXPECT_NE(other.output().find("belongs to another job"), std::string::npos) << other.output();
  EXPECT_NE(other.output().find("etcd PREFIX"), std::string::npos) << other.output();
}

TEST(EtcdStore, WeftRunRefusesABadStoreUrl) {
  testing::Process run({testing::bin_dir() + "/weft", "run", "-n", "1", "--store", "etcd://nohost",
                        "--", "/bin/true"});
  ASSERT_TRUE(run.wait(30s));
  EXPECT_EQ(run.exit_code(), 2) << run.output();
  EXPECT_NE(run.output().find("--store"), std::string::npos) << run.output();
  EXPECT_NE(run.output().find("HOST:PORT"), std::string::npos) << run.output();
}

}  // namespace
}  // namespace weft::store_test
