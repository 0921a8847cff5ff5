// Communicators with ranks as threads of one process: creation, collectives,
// groups, generations, aborts, timeouts, authentication.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <atomic>
#include <nlohmann/json.hpp>
#include <numeric>
#include <thread>

#include "api/access.h"
#include "comm/group.h"
#include "comm/world.h"
#include "core/settings.h"
#include "testing/inbound.h"
#include "testing/testing.h"
#include "weft/weft.h"

namespace weft {
namespace {

using testing::wait_inbound;

using namespace std::chrono_literals;
using testing::run_ranks;
using testing::run_ranks_ok;

CommOptions test_options(Timeout timeout = 30s) {
  CommOptions o;
  o.timeout = timeout;
  o.job_token = "test-token";
  return o;
}

TEST(Communicator, WorldOfOne) {
  auto store = std::make_shared<MemoryStore>();
  auto c = Communicator::create(0, 1, store, test_options());
  EXPECT_EQ(c->size(), 1);
  std::vector<float> v{1, 2, 3};
  c->allreduce(v, ReduceOp::Sum);
  EXPECT_EQ(v, (std::vector<float>{1, 2, 3}));
  c->barrier();
  c->broadcast(v, 0);
}

class Worlds : public ::testing::TestWithParam<int> {};

TEST_P(Worlds, BarrierBroadcastAllreduce) {
  const int n = GetParam();
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(n, [&](int r) {
    auto c = Communicator::create(r, n, store, test_options());
    EXPECT_EQ(c->rank(), r);
    EXPECT_EQ(c->size(), n);
    EXPECT_EQ(c->local_size(), n);  // one host
    EXPECT_EQ(c->local_rank(), r);
    c->barrier();
    for (int root = 0; root < n; ++root) {
      std::vector<int64_t> b(1000, r == root ? 7 + root : -1);
      c->broadcast(b, root);
      for (auto x : b) ASSERT_EQ(x, 7 + root);
    }
    for (size_t count : {0ul, 1ul, 3ul, 1000ul, 100003ul}) {
      std::vector<float> v(count);
      for (size_t i = 0; i < count; ++i)
        v[i] = static_cast<float>(r + 1) * static_cast<float>(i % 7);
      c->allreduce(v, ReduceOp::Sum);
      float total = static_cast<float>(n * (n + 1) / 2);
      for (size_t i = 0; i < count; ++i) ASSERT_EQ(v[i], total * static_cast<float>(i % 7)) << i;
      std::vector<int32_t> m(count, r);
      c->allreduce(m, ReduceOp::Max);
      for (auto x : m) ASSERT_EQ(x, n - 1);
      std::vector<double> a(count, static_cast<double>(r));
      c->allreduce(a, ReduceOp::Avg);
      for (auto x : a) ASSERT_DOUBLE_EQ(x, (n - 1) / 2.0);
    }
  });
}

TEST_P(Worlds, AsyncCollectivesInFlight) {
  const int n = GetParam();
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(n, [&](int r) {
    auto c = Communicator::create(r, n, store, test_options());
    std::vector<std::vector<float>> bufs(8, std::vector<float>(4099));
    std::vector<WorkPtr> works;
    for (size_t k = 0; k < bufs.size(); ++k) {
      std::fill(bufs[k].begin(), bufs[k].end(), static_cast<float>(k + r));
      works.push_back(c->allreduce_async(bufs[k], ReduceOp::Sum));
    }
    c->barrier();  // a blocking collective while the async ones run
    for (size_t k = works.size(); k-- > 0;) works[k]->wait();
    for (size_t k = 0; k < bufs.size(); ++k) {
      float expect = static_cast<float>(n * static_cast<int>(k) + n * (n - 1) / 2);
      for (float x : bufs[k]) ASSERT_EQ(x, expect);
      EXPECT_TRUE(works[k]->test());
      EXPECT_EQ(works[k]->error(), nullptr);
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Sizes, Worlds, ::testing::Values(2, 3, 4, 5, 8));

TEST(Communicator, Float16AccumulatesInFloat32) {
  const int n = 4;
  auto store = std::make_shared<MemoryStore>();
  std::vector<std::vector<uint16_t>> results(n);
  run_ranks_ok(n, [&](int r) {
    auto c = Communicator::create(r, n, store, test_options());
    // 2048 + 1 + 1 + 1 is not representable step by step in fp16 (2049 rounds to 2048),
    // but the float32 sum 2051 rounds to 2052.
    std::vector<Half> v(17, float_to_half(r == 0 ? 2048.0f : 1.0f));
    c->allreduce(v, ReduceOp::Sum);
    for (auto h : v) EXPECT_EQ(half_to_float(h), 2052.0f);
    for (auto h : v) results[static_cast<size_t>(r)].push_back(h.bits);
  });
  for (int r = 1; r < n; ++r) EXPECT_EQ(results[static_cast<size_t>(r)], results[0]);
}

TEST(Communicator, AvgOnIntegersIsRejected) {
  auto store = std::make_shared<MemoryStore>();
  auto c = Communicator::create(0, 1, store, test_options());
  std::vector<int32_t> v(4);
  EXPECT_THROW(c->allreduce(v, ReduceOp::Avg), InvalidArgument);
}

TEST(Communicator, Split) {
  const int n = 6;
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(n, [&](int r) {
    auto c = Communicator::create(r, n, store, test_options());
    // Even and odd ranks, ordered by descending world rank; rank 5 opts out.
    auto sub = c->split(r == 5 ? -1 : r % 2, {.key = -r, .timeout = 30s});
    // The default options keep the world's order.
    auto same_order = c->split(r == 5 ? -1 : r % 2);
    if (r == 5) {
      EXPECT_EQ(sub, nullptr);
      EXPECT_EQ(same_order, nullptr);
      c->barrier();
      return;
    }
    ASSERT_NE(same_order, nullptr);
    EXPECT_EQ(same_order->rank(), r / 2);
    ASSERT_NE(sub, nullptr);
    const int expect_size = r % 2 == 0 ? 3 : 2;
    EXPECT_EQ(sub->size(), expect_size);
    std::vector<int32_t> v{r};
    sub->allreduce(v, ReduceOp::Sum);
    EXPECT_EQ(v[0], r % 2 == 0 ? 0 + 2 + 4 : 1 + 3);
    // Highest world rank first.
    std::vector<int32_t> who{sub->rank() == 0 ? r : -1};
    sub->broadcast(who, 0);
    EXPECT_EQ(who[0], r % 2 == 0 ? 4 : 3);
    c->barrier();
  });
}

TEST(Communicator, NewGenerationInTheSameProcess) {
  const int n = 3;
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(n, [&](int r) {
    for (uint32_t gen = 1; gen <= 3; ++gen) {
      auto c = Communicator::create(r, n, store, test_options());
      EXPECT_EQ(c->generation(), gen);
      std::vector<float> v{1.0f};
      c->allreduce(v);
      EXPECT_EQ(v[0], 3.0f);
    }
  });
}

TEST(Communicator, AbortWakesEveryRankWithThePeerNamed) {
  const int n = 4;
  auto store = std::make_shared<MemoryStore>();
  auto errors = run_ranks(n, [&](int r) {
    auto c = Communicator::create(r, n, store, test_options(60s));
    c->barrier();
    if (r == 2) {
      // A message that no receive has taken is held: a neighbour's first
      // allreduce message (the barrier's were all taken), so the others
      // are inside the allreduce.
      EXPECT_TRUE(wait_inbound(c, [](const auto& s) { return s.held > s.from_held; }));
      c->abort("test abort");
      return;
    }
    std::vector<float> v(1 << 16, 1.0f);
    auto t0 = std::chrono::steady_clock::now();
    try {
      c->allreduce(v);  // rank 2 never joins
      ADD_FAILURE() << "rank " << r << ": allreduce returned";
    } catch (const PeerError& e) {
      EXPECT_EQ(e.rank(), 2) << e.what();
      EXPECT_NE(std::string(e.what()).find("allreduce"), std::string::npos) << e.what();
    }
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 30s);
    EXPECT_NE(c->error(), nullptr);
    // Later operations fail at once.
    EXPECT_THROW(c->barrier(), CommError);
  });
  for (auto& e : errors) EXPECT_EQ(e, nullptr);
}

TEST(Communicator, TimeoutNamesThePeer) {
  const int n = 2;
  auto store = std::make_shared<MemoryStore>();
  auto errors = run_ranks(n, [&](int r) {
    auto c = Communicator::create(r, n, store, test_options(30s));
    if (r == 1) {
      // Rank 1 waits for a message rank 0 never sends.
      std::vector<uint8_t> buf(16);
      auto w = c->recv(buf, 0, 99);
      auto t0 = std::chrono::steady_clock::now();
      try {
        w->wait(500ms);
        ADD_FAILURE() << "recv completed";
      } catch (const TimeoutError& e) {
        EXPECT_EQ(e.rank(), 0) << e.what();
        EXPECT_NE(std::string(e.what()).find("recv from rank 0"), std::string::npos) << e.what();
      }
      EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
    } else {
      // Rank 0 learns of rank 1's timeout through the abort.
      std::vector<uint8_t> buf(16);
      auto w = c->recv(buf, 1, 5);
      EXPECT_THROW(w->wait(20s), CommError);
    }
  });
  for (auto& e : errors) EXPECT_EQ(e, nullptr);
}

TEST(Communicator, MismatchedCollectivesFailOnEveryRank) {
  const int n = 3;
  auto store = std::make_shared<MemoryStore>();
  auto errors = run_ranks(n, [&](int r) {
    auto c = Communicator::create(r, n, store, test_options(20s));
    std::vector<float> v(r == 1 ? 100 : 200, 1.0f);
    // Every rank learns of the disagreement: in the call, or (if its part
    // completed first) in its next one.
    try {
      c->allreduce(v);
      c->barrier();
      ADD_FAILURE() << "rank " << r << ": mismatched allreduce went unnoticed";
    } catch (const MismatchError& e) {
      std::string what = e.what();
      EXPECT_NE(what.find("mismatch"), std::string::npos) << what;
    }
  });
  for (auto& e : errors) EXPECT_EQ(e, nullptr);
}

TEST(Communicator, WrongTokenIsRefused) {
  const int n = 2;
  auto store = std::make_shared<MemoryStore>();
  auto errors = run_ranks(n, [&](int r) {
    auto o = test_options(3s);
    if (r == 1) o.job_token = "another-token";
    auto c = Communicator::create(r, n, store, o);
  });
  ASSERT_NE(errors[0], nullptr);
  ASSERT_NE(errors[1], nullptr);
  try {
    std::rethrow_exception(errors[1]);
  } catch (const ProtocolError& e) {
    EXPECT_NE(std::string(e.what()).find("job token"), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "rank 1: unexpected " << e.what();
  }
  try {
    std::rethrow_exception(errors[0]);
  } catch (const TimeoutError& e) {
    EXPECT_NE(std::string(e.what()).find("1"), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "rank 0: unexpected " << e.what();
  }
}

TEST(Communicator, NoTokenNeedsExplicitConsent) {
  auto store = std::make_shared<MemoryStore>();
  CommOptions o;
  o.timeout = 5s;
  EXPECT_THROW(Communicator::create(0, 1, store, o), InvalidArgument);
  o.allow_unauthenticated = true;
  EXPECT_NO_THROW(Communicator::create(0, 1, store, o));
}

TEST(Communicator, BadArguments) {
  auto store = std::make_shared<MemoryStore>();
  EXPECT_THROW(Communicator::create(2, 2, store, test_options()), InvalidArgument);
  EXPECT_THROW(Communicator::create(0, 0, store, test_options()), InvalidArgument);
  auto c = Communicator::create(0, 1, store, test_options());
  std::vector<float> v(4);
  EXPECT_THROW(c->broadcast(v, 1), InvalidArgument);
  EXPECT_THROW(c->send(v, 1, 0), InvalidArgument);
  EXPECT_THROW(c->send(v, 0, 0), InvalidArgument);  // to itself
  Buffer gpu(v.data(), v.size(), DType::Float32, Device{DeviceType::CUDA, 0, nullptr});
  EXPECT_THROW(c->allreduce(gpu), InvalidArgument);
}

// ---- liveness (src/comm/heartbeat.h; with real processes: liveness_test.cc) ----

comm::World& world_of(const Communicator& c) { return api::CommunicatorAccess::group(c)->world(); }

CommOptions fast_heartbeat(Timeout timeout = 30s) {
  CommOptions o = test_options(timeout);
  o.heartbeat_interval = 50ms;
  o.heartbeat_timeout = 1s;
  return o;
}

// Heartbeats flow between every pair; a rank that closes its communicator
// says goodbye, and the others, still running long past the heartbeat
// timeout, do not declare it dead.
TEST(Liveness, HeartbeatsFlowAndAGoodbyeIsNotDeath) {
  const int n = 3;
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(n, [&](int r) {
    auto c = Communicator::create(r, n, store, fast_heartbeat());
    comm::World& w = world_of(*c);
    EXPECT_FALSE(w.ranks()[static_cast<size_t>(r)].heartbeat.empty());
    ASSERT_TRUE(testing::wait_until([&] { return w.heartbeat_stats().received >= 4; }));
    c->barrier();
    if (r == 2) return;  // closes its communicator (goodbye) and leaves
    // Twice the heartbeat timeout, counted in rank 0's / rank 1's heartbeats.
    const uint64_t base = w.heartbeat_stats().received;
    ASSERT_TRUE(testing::wait_until([&] { return w.heartbeat_stats().received >= base + 40; }));
    EXPECT_EQ(c->error(), nullptr);
    std::vector<int32_t> v(10, r);
    if (r == 0) {
      c->send(v, 1, 7)->wait();
    } else {
      c->recv(v, 0, 7)->wait();
      EXPECT_EQ(v[0], 0);
    }
    EXPECT_EQ(w.heartbeat_stats().dropped, 0u);
  });
}

TEST(Liveness, OffWithATimeoutOfZero) {
  EXPECT_EQ(settings::problem(settings::kHeartbeatTimeout, "0"), "");
  EXPECT_NE(settings::problem(settings::kHeartbeatTimeout, "-1").find("0 (off)"),
            std::string::npos);
  EXPECT_NE(settings::problem(settings::kTimeout, "0"), "");  // other durations stay positive
  const int n = 2;
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(n, [&](int r) {
    CommOptions o = fast_heartbeat();
    o.heartbeat_timeout = 0s;
    auto c = Communicator::create(r, n, store, o);
    c->barrier();
    comm::World& w = world_of(*c);
    for (const auto& info : w.ranks()) EXPECT_TRUE(info.heartbeat.empty());
    auto record = nlohmann::json::parse(store->get(fmt::format("weft/world/g1/rank/{}", r), 5s));
    EXPECT_EQ(record.value("hb", std::string("?")), "");
    EXPECT_EQ(w.heartbeat_stats().sent, 0u);
  });
}

TEST(Liveness, BadSettingsAreRefusedByName) {
  auto store = std::make_shared<MemoryStore>();
  CommOptions o = test_options();
  o.heartbeat_interval = 3s;
  o.heartbeat_timeout = 4s;
  try {
    Communicator::create(0, 1, store, o);
    ADD_FAILURE() << "an interval above half the timeout was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("WEFT_HEARTBEAT_INTERVAL"), std::string::npos) << e.what();
  }
  o = test_options();
  o.member = "n0/../s1";
  try {
    Communicator::create(0, 1, store, o);
    ADD_FAILURE() << "a member id with '/' was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("WEFT_MEMBER"), std::string::npos) << e.what();
  }
  o.member = "n0.s1.r2";
  EXPECT_NO_THROW(Communicator::create(0, 1, store, o));
}

}  // namespace
}  // namespace weft
