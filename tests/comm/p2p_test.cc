// Point-to-point over the TCP transport, ranks as threads: sizes from 0 to
// 64 MiB arrive intact, many tags in flight, completions out of order,
// messages that arrive before their receive, back-pressure.
#include <gtest/gtest.h>

#include <numeric>
#include <random>
#include <thread>

#include "api/access.h"
#include "comm/group.h"
#include "comm/world.h"
#include "testing/inbound.h"
#include "testing/testing.h"
#include "weft/weft.h"

namespace weft {
namespace {

using testing::wait_inbound;

using namespace std::chrono_literals;
using testing::run_ranks_ok;

CommOptions test_options() {
  CommOptions o;
  o.timeout = 60s;
  o.job_token = "p2p-token";
  o.shm = false;  // the TCP transport (tests/transport covers shared memory)
  return o;
}

std::vector<uint8_t> pattern(size_t n, uint32_t seed) {
  std::vector<uint8_t> v(n);
  std::mt19937 gen(seed);
  for (auto& b : v) b = static_cast<uint8_t>(gen());
  return v;
}

uint64_t checksum(const std::vector<uint8_t>& v) {
  uint64_t h = 1469598103934665603ull;
  for (uint8_t b : v) h = (h ^ b) * 1099511628211ull;
  return h;
}

class P2P : public ::testing::TestWithParam<int> {};  // sockets per peer

TEST_P(P2P, SizesFromZeroTo64MiB) {
  auto store = std::make_shared<MemoryStore>();
  std::vector<size_t> sizes = {
      0, 1, 63, 64, 65, 4095, 4096, 8191, 65536, 1 << 20, (1 << 20) + 13, 64u << 20};
  run_ranks_ok(2, [&](int r) {
    auto o = test_options();
    o.sockets_per_peer = GetParam();
    auto c = Communicator::create(r, 2, store, o);
    for (size_t i = 0; i < sizes.size(); ++i) {
      auto expect = pattern(sizes[i], static_cast<uint32_t>(i));
      if (r == 0) {
        c->send(ConstBuffer(expect.data(), expect.size(), DType::UInt8), 1,
                static_cast<uint32_t>(i))
            ->wait();
      } else {
        std::vector<uint8_t> got(sizes[i], 0xee);
        c->recv(Buffer(got.data(), got.size(), DType::UInt8), 0, static_cast<uint32_t>(i))->wait();
        ASSERT_EQ(checksum(got), checksum(expect)) << "size " << sizes[i];
      }
    }
  });
}

TEST_P(P2P, ManyTagsInFlightCompleteOutOfOrder) {
  auto store = std::make_shared<MemoryStore>();
  constexpr int kTags = 64;
  run_ranks_ok(2, [&](int r) {
    auto o = test_options();
    o.sockets_per_peer = GetParam();
    auto c = Communicator::create(r, 2, store, o);
    std::vector<std::vector<uint8_t>> bufs(kTags);
    std::vector<WorkPtr> works;
    if (r == 0) {
      for (int t = 0; t < kTags; ++t) {
        bufs[t] = pattern(static_cast<size_t>(1 + t * 3001), static_cast<uint32_t>(t));
        works.push_back(c->send(ConstBuffer(bufs[t].data(), bufs[t].size(), DType::UInt8), 1,
                                static_cast<uint32_t>(t)));
      }
    } else {
      // Receives posted in reverse order of the sends.
      for (int t = kTags - 1; t >= 0; --t) {
        bufs[t].resize(static_cast<size_t>(1 + t * 3001));
        works.push_back(c->recv(Buffer(bufs[t].data(), bufs[t].size(), DType::UInt8), 0,
                                static_cast<uint32_t>(t)));
      }
    }
    for (auto& w : works) w->wait();
    if (r == 1) {
      for (int t = 0; t < kTags; ++t) {
        ASSERT_EQ(checksum(bufs[t]), checksum(pattern(bufs[t].size(), static_cast<uint32_t>(t))))
            << t;
      }
    }
  });
}

TEST_P(P2P, SameTagIsMatchedInOrder) {
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(2, [&](int r) {
    auto o = test_options();
    o.sockets_per_peer = GetParam();
    auto c = Communicator::create(r, 2, store, o);
    constexpr int kMsgs = 50;
    if (r == 0) {
      std::vector<std::vector<int32_t>> v(kMsgs);
      std::vector<WorkPtr> w;
      for (int i = 0; i < kMsgs; ++i) {
        v[i].assign(100, i);
        w.push_back(c->send(v[i], 1, 7));
      }
      for (auto& x : w) x->wait();
    } else {
      c->barrier();  // let the messages arrive before the receives are posted (unexpected path)
    }
    if (r == 0) c->barrier();
    if (r == 1) {
      for (int i = 0; i < kMsgs; ++i) {
        std::vector<int32_t> got(100);
        c->recv(got, 0, 7)->wait();
        ASSERT_EQ(got[0], i);
        ASSERT_EQ(got[99], i);
      }
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Sockets, P2P, ::testing::Values(1, 3));

TEST(P2PBackPressure, EarlyMessagesBeyondTheBudgetWaitInTheStream) {
  // With a 1 MiB budget for early messages, 16 MiB sent before the receives
  // are posted all arrive: the connection pauses instead of buffering them.
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(2, [&](int r) {
    auto o = test_options();
    o.max_unexpected_bytes = 1u << 20;
    auto c = Communicator::create(r, 2, store, o);
    constexpr int kMsgs = 16;
    if (r == 0) {
      std::vector<std::vector<uint8_t>> v(kMsgs);
      std::vector<WorkPtr> w;
      for (int i = 0; i < kMsgs; ++i) {
        v[i] = pattern(1 << 20, static_cast<uint32_t>(100 + i));
        w.push_back(c->send(ConstBuffer(v[i].data(), v[i].size(), DType::UInt8), 1,
                            static_cast<uint32_t>(i)));
      }
      for (auto& x : w) x->wait();
    } else {
      // The budget is full and reading has stopped before any receive is posted.
      ASSERT_TRUE(wait_inbound(c, [](const auto& s) { return s.paused >= 1; }));
      for (int i = 0; i < kMsgs; ++i) {
        std::vector<uint8_t> got(1 << 20);
        c->recv(Buffer(got.data(), got.size(), DType::UInt8), 0, static_cast<uint32_t>(i))->wait();
        ASSERT_EQ(checksum(got), checksum(pattern(1 << 20, static_cast<uint32_t>(100 + i)))) << i;
      }
    }
  });
}

TEST(P2PBackPressure, OutOfOrderBeyondTheBudgetTimesOutInsteadOfBuffering) {
  // The documented limit: a receive that needs more than the budget of
  // earlier messages read first cannot be satisfied. It must end in a
  // TimeoutError at its deadline, not in unbounded memory or a hang.
  auto store = std::make_shared<MemoryStore>();
  auto errors = testing::run_ranks(2, [&](int r) {
    auto o = test_options();
    o.max_unexpected_bytes = 1u << 20;
    o.timeout = 2s;
    auto c = Communicator::create(r, 2, store, o);
    std::vector<std::vector<uint8_t>> v(4, std::vector<uint8_t>(1 << 20));
    if (r == 0) {
      std::vector<WorkPtr> w;
      for (int i = 0; i < 4; ++i)
        w.push_back(c->send(ConstBuffer(v[i].data(), v[i].size(), DType::UInt8), 1,
                            static_cast<uint32_t>(i)));
      for (auto& x : w) {
        try {
          x->wait();  // sends may complete: the bytes sit in the kernel's buffers
        } catch (const CommError&) {
        }
      }
      EXPECT_THROW(c->barrier(), CommError);  // rank 1's timeout aborted the communicator
    } else {
      EXPECT_THROW(c->recv(Buffer(v[3].data(), v[3].size(), DType::UInt8), 0, 3)->wait(),
                   TimeoutError);
    }
  });
  for (auto& e : errors) EXPECT_EQ(e, nullptr);
}

TEST(P2PBackPressure, WrongSizeIsAMismatch) {
  auto store = std::make_shared<MemoryStore>();
  auto errors = testing::run_ranks(2, [&](int r) {
    auto c = Communicator::create(r, 2, store, test_options());
    std::vector<float> v(r == 0 ? 10 : 20);
    if (r == 0) {
      c->send(v, 1, 1)->wait();
      EXPECT_THROW(c->barrier(), CommError);
    } else {
      EXPECT_THROW(c->recv(v, 0, 1)->wait(), MismatchError);
    }
  });
  for (auto& e : errors) EXPECT_EQ(e, nullptr);
}

}  // namespace
}  // namespace weft
