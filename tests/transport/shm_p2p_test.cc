// Point-to-point through the communicator, ranks as threads, over shared
// memory with single copy, over shared memory through the rings only
// (WEFT_SHM_CMA=0) and over TCP only, with the same expectations: sizes from
// 0 to 64 MiB arrive intact, many tags in flight complete out of order,
// early messages, FIFO per tag, mismatched sizes, back-pressure, a peer
// that leaves with receives pending; mixed worlds (two "hosts"); nothing
// left behind (no memfd descriptor, no mapping, nothing in /dev/shm).
#include <dirent.h>
#include <gtest/gtest.h>

#include <fstream>
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

using namespace std::chrono_literals;
using testing::dev_shm;
using testing::run_ranks_ok;

struct Mode {
  const char* name;
  bool shm;
  bool cma;
};

const Mode kModes[] = {{"shm", true, true}, {"shm_ring", true, false}, {"tcp", false, false}};

class ShmP2P : public ::testing::TestWithParam<Mode> {
 protected:
  CommOptions options(Timeout t = 60s) const {
    CommOptions o;
    o.timeout = t;
    o.job_token = "shm-p2p-token";
    o.shm = GetParam().shm;
    o.shm_single_copy = GetParam().cma;
    return o;
  }
};

std::vector<uint8_t> pattern(size_t n, uint32_t seed) {
  std::vector<uint8_t> v(n);
  std::mt19937 gen(seed);
  for (size_t i = 0; i < n; i += 4) {
    uint32_t x = gen();
    std::memcpy(v.data() + i, &x, std::min<size_t>(4, n - i));
  }
  return v;
}

using testing::inbound;
using testing::wait_inbound;

ConstBuffer cbuf(const std::vector<uint8_t>& v) { return {v.data(), v.size(), DType::UInt8}; }
Buffer buf(std::vector<uint8_t>& v) { return {v.data(), v.size(), DType::UInt8}; }

TEST_P(ShmP2P, SizesFromZeroTo64MiBBothWays) {
  auto store = std::make_shared<MemoryStore>();
  const std::vector<size_t> sizes = {0,
                                     1,
                                     63,
                                     64,
                                     65,
                                     4095,
                                     4096,
                                     (32u << 10) - 1,
                                     32u << 10,
                                     (32u << 10) + 1,
                                     65536 + 7,
                                     1u << 20,
                                     (1u << 20) + 13,
                                     3u << 20,
                                     64u << 20};
  run_ranks_ok(2, [&](int r) {
    auto c = Communicator::create(r, 2, store, options());
    EXPECT_EQ(c->transports(), GetParam().shm ? "tcp+shm" : "tcp");
    const int peer = 1 - r;
    for (size_t i = 0; i < sizes.size(); ++i) {
      auto mine = pattern(sizes[i], static_cast<uint32_t>(2 * i + r));
      auto expect = pattern(sizes[i], static_cast<uint32_t>(2 * i + peer));
      std::vector<uint8_t> got(sizes[i], 0xee);
      auto rw = c->recv(buf(got), peer, static_cast<uint32_t>(i));
      auto sw = c->send(cbuf(mine), peer, static_cast<uint32_t>(i));
      rw->wait();
      sw->wait();
      ASSERT_TRUE(got == expect) << "size " << sizes[i];
    }
  });
}

TEST_P(ShmP2P, ManyTagsInFlightCompleteOutOfOrder) {
  auto store = std::make_shared<MemoryStore>();
  constexpr int kMessages = 64;
  auto size_of = [](int i) { return static_cast<size_t>((i * 7919) % 200000 + (i % 3) * 40000); };
  run_ranks_ok(2, [&](int r) {
    auto c = Communicator::create(r, 2, store, options());
    if (r == 0) {
      std::vector<std::vector<uint8_t>> data;
      for (int i = 0; i < kMessages; ++i)
        data.push_back(pattern(size_of(i), static_cast<uint32_t>(i)));
      std::vector<WorkPtr> w;
      for (int i = 0; i < kMessages; ++i)
        w.push_back(c->send(cbuf(data[i]), 1, static_cast<uint32_t>(100 + i)));
      for (auto& x : w) x->wait();
    } else {
      std::vector<std::vector<uint8_t>> got(kMessages);
      std::vector<WorkPtr> w(kMessages);
      std::vector<int> order(kMessages);
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), std::mt19937(5));
      for (int i : order) {
        got[i].assign(size_of(i), 0);
        w[i] = c->recv(buf(got[i]), 0, static_cast<uint32_t>(100 + i));
      }
      for (int i : order) {
        w[i]->wait();
        ASSERT_TRUE(got[i] == pattern(size_of(i), static_cast<uint32_t>(i))) << "message " << i;
      }
    }
    c->barrier();
  });
}

TEST_P(ShmP2P, EarlyMessagesAreHeldAndSameTagIsFifo) {
  auto store = std::make_shared<MemoryStore>();
  constexpr int kMessages = 20;
  run_ranks_ok(2, [&](int r) {
    auto c = Communicator::create(r, 2, store, options());
    if (r == 0) {
      std::vector<std::vector<uint8_t>> data;
      std::vector<WorkPtr> w;
      for (int i = 0; i < kMessages; ++i) {
        data.push_back(pattern(i % 2 ? 100000 : 1000, static_cast<uint32_t>(i)));
        w.push_back(c->send(cbuf(data.back()), 1, 7));  // one tag
      }
      for (auto& x : w) x->wait();
    } else {
      // Everything arrives before its receive: held, every one of them.
      // (Counted from 0: rank 0 may send before this rank looks; nothing
      // else reaches this rank before these messages.)
      ASSERT_TRUE(wait_inbound(c, [&](const auto& s) { return s.held >= kMessages; }))
          << "held " << inbound(c).held << " of " << kMessages << " (paused " << inbound(c).paused
          << ", direct " << inbound(c).direct << ", discarded " << inbound(c).discarded << ")";
      for (int i = 0; i < kMessages; ++i) {
        std::vector<uint8_t> got(i % 2 ? 100000 : 1000);
        c->recv(buf(got), 0, 7)->wait();
        ASSERT_TRUE(got == pattern(got.size(), static_cast<uint32_t>(i))) << "message " << i;
      }
      EXPECT_EQ(inbound(c).from_held, static_cast<uint64_t>(kMessages));  // each from its copy
    }
    c->barrier();
  });
}

TEST_P(ShmP2P, SimultaneousLargeExchangesDoNotDeadlock) {
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(3, [&](int r) {
    auto c = Communicator::create(r, 3, store, options());
    // Everyone sends 8 MiB to everyone before receiving anything.
    std::vector<std::vector<uint8_t>> out(3), in(3);
    std::vector<WorkPtr> w;
    for (int p = 0; p < 3; ++p) {
      if (p == r) continue;
      out[p] = pattern(8u << 20, static_cast<uint32_t>(10 * r + p));
      w.push_back(c->send(cbuf(out[p]), p, 1));
    }
    for (int p = 0; p < 3; ++p) {
      if (p == r) continue;
      in[p].assign(8u << 20, 0);
      c->recv(buf(in[p]), p, 1)->wait();
      ASSERT_TRUE(in[p] == pattern(8u << 20, static_cast<uint32_t>(10 * p + r)));
    }
    for (auto& x : w) x->wait();
  });
}

TEST_P(ShmP2P, WrongSizeIsAMismatchNamingBothCalls) {
  auto store = std::make_shared<MemoryStore>();
  auto errors = testing::run_ranks(2, [&](int r) {
    auto c = Communicator::create(r, 2, store, options(20s));
    std::vector<uint8_t> v(r == 0 ? 100000 : 100001);
    if (r == 0) {
      try {
        c->send(cbuf(v), 1, 1)->wait();
      } catch (const CommError&) {
      }
      EXPECT_THROW(c->barrier(), CommError);
    } else {
      try {
        c->recv(buf(v), 0, 1)->wait();
        ADD_FAILURE() << "no mismatch";
      } catch (const MismatchError& e) {
        EXPECT_NE(std::string(e.what()).find("[100001 bytes]"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("[100000 bytes]"), std::string::npos) << e.what();
      }
    }
  });
  for (auto& e : errors) EXPECT_EQ(e, nullptr);
}

TEST_P(ShmP2P, EarlyMessagesBeyondTheBudgetWaitInsteadOfBuffering) {
  // With single copy an early message is a descriptor and costs no memory:
  // the receive of the last one completes. Copied through the rings (or
  // TCP), the budget stops reading and the receive times out, never
  // buffering without bound.
  auto store = std::make_shared<MemoryStore>();
  const bool fits = GetParam().shm && GetParam().cma;
  auto errors = testing::run_ranks(2, [&](int r) {
    auto o = options(3s);
    o.max_unexpected_bytes = 1u << 20;
    auto c = Communicator::create(r, 2, store, o);
    std::vector<std::vector<uint8_t>> v(4, std::vector<uint8_t>(1 << 20, 1));
    if (r == 0) {
      std::vector<WorkPtr> w;
      for (int i = 0; i < 4; ++i) w.push_back(c->send(cbuf(v[i]), 1, static_cast<uint32_t>(i)));
      if (fits) {
        w[3]->wait();
      } else {
        for (auto& x : w) {
          try {
            x->wait();  // the first ones may complete: their bytes are in the ring
          } catch (const CommError&) {
          }
        }
        EXPECT_THROW(c->barrier(), CommError);  // a timeout aborted the communicator
      }
    } else if (fits) {
      c->recv(buf(v[3]), 0, 3)->wait();
    } else {
      // Its own timeout, or rank 0's (whose sends wait too), reported to it.
      EXPECT_THROW(c->recv(buf(v[3]), 0, 3)->wait(), CommError);
    }
  });
  for (auto& e : errors) EXPECT_EQ(e, nullptr);
}

TEST_P(ShmP2P, LeavingWithReceivesPendingFailsThemAndEarlierMessagesArrive) {
  auto store = std::make_shared<MemoryStore>();
  std::atomic<bool> sent{false};
  auto errors = testing::run_ranks(2, [&](int r) {
    auto c = Communicator::create(r, 2, store, options(30s));
    if (r == 0) {
      std::vector<uint8_t> small(1000, 5);
      c->send(cbuf(small), 1, 1)->wait();
      sent = true;
      c.reset();  // leaves cleanly while rank 1 still expects tag 2
      return;
    }
    // Rank 0's message is held and its goodbye has arrived before the receive is posted.
    ASSERT_TRUE(wait_inbound(c, [](const auto& s) { return s.held >= 1 && s.goodbyes >= 1; }));
    EXPECT_TRUE(sent);
    std::vector<uint8_t> got(1000);
    c->recv(buf(got), 0, 1)->wait();  // sent before the goodbye: delivered
    EXPECT_EQ(got[999], 5);
    auto t0 = std::chrono::steady_clock::now();
    try {
      c->recv(buf(got), 0, 2)->wait();
      ADD_FAILURE() << "a receive from a departed rank completed";
    } catch (const PeerError& e) {
      EXPECT_EQ(e.rank(), 0);
    }
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);  // not the 30 s deadline
  });
  for (auto& e : errors) EXPECT_EQ(e, nullptr);
}

TEST_P(ShmP2P, AFailedReceiveWritesNothingIntoItsBufferAfterItReturns) {
  // A large message is streaming into rank 1's posted receive when rank 1's
  // world is aborted. Once the receive has thrown, its buffer belongs to
  // the application again: a guard pattern written there must stay intact
  // while rank 0 goes on sending. (With single copy the one read of the
  // payload usually wins the race and the receive completes whole.)
  constexpr size_t kBytes = 128u << 20;
  auto store = std::make_shared<MemoryStore>();
  std::atomic<bool> posted{false}, checked{false}, failed{false};
  auto errors = testing::run_ranks(2, [&](int r) {
    auto c = Communicator::create(r, 2, store, options(30s));
    if (r == 0) {
      std::vector<uint8_t> out(kBytes, 0x5a);
      while (!posted) std::this_thread::yield();
      while (!checked) {  // keeps sending, whatever becomes of the sends
        try {
          c->send(cbuf(out), 1, 1)->wait();
        } catch (const CommError&) {
          std::this_thread::sleep_for(1ms);
        }
      }
      return;
    }
    std::vector<uint8_t> in(kBytes, 0);
    const uint64_t direct = inbound(c).direct;
    auto w = c->recv(buf(in), 0, 1);
    posted = true;
    // The message was matched with the posted receive: its payload is
    // going into the buffer now.
    ASSERT_TRUE(wait_inbound(c, [&](const auto& s) { return s.direct > direct; }));
    c->abort("test: abort while a receive is being filled");
    try {
      w->wait();
      EXPECT_EQ(std::count(in.begin(), in.end(), 0x5a), static_cast<ptrdiff_t>(kBytes));
    } catch (const CommError&) {
      failed = true;
    }
    std::fill(in.begin(), in.end(), 0xa5);
    std::this_thread::sleep_for(500ms);  // time for a stray write to land
    const auto intact = std::count(in.begin(), in.end(), 0xa5);
    checked = true;
    EXPECT_EQ(intact, static_cast<ptrdiff_t>(kBytes))
        << kBytes - static_cast<size_t>(intact) << " bytes written after the receive returned";
  });
  for (auto& e : errors) EXPECT_EQ(e, nullptr);
  // Streamed (TCP, or through the rings), the receive cannot finish first.
  if (!GetParam().cma) {
    EXPECT_TRUE(failed) << "the receive completed before the abort";
  }
}

INSTANTIATE_TEST_SUITE_P(Transports, ShmP2P, ::testing::ValuesIn(kModes),
                         [](const ::testing::TestParamInfo<Mode>& p) {
                           return std::string(p.param.name);
                         });

// ---------------------------------------------------------------------------

TEST(ShmWorld, MixedHostsUseSharedMemoryWithinEachHostOnly) {
  // Ranks {0, 1} and {2, 3} are two "hosts": 0-1 and 2-3 over shared
  // memory, the other pairs over TCP.
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(4, [&](int r) {
    CommOptions o;
    o.timeout = 60s;
    o.job_token = "mixed";
    o.host_id = r < 2 ? "host-a" : "host-b";
    auto c = Communicator::create(r, 4, store, o);
    EXPECT_EQ(c->transports(), "tcp+shm");
    EXPECT_EQ(c->local_size(), 2);
    EXPECT_EQ(c->local_rank(), r % 2);
    for (size_t n : {size_t(1000), size_t(1u << 20), size_t(9u << 20)}) {
      std::vector<float> v(n, static_cast<float>(r + 1));
      c->allreduce(v);
      for (float x : {v.front(), v[n / 2], v.back()}) ASSERT_EQ(x, 10.0f);
      std::vector<float> all(4 * 1000);
      std::vector<float> mine(1000, static_cast<float>(r));
      c->allgather(ConstBuffer(mine), Buffer(all));
      for (int k = 0; k < 4; ++k) ASSERT_EQ(all[static_cast<size_t>(k) * 1000 + 999], k);
    }
  });
}

TEST(ShmWorld, RanksThatDisableSharedMemoryUseTcpWithEveryone) {
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(3, [&](int r) {
    CommOptions o;
    o.timeout = 60s;
    o.job_token = "half";
    o.shm = r != 2;  // rank 2 opts out: only 0-1 share memory
    auto c = Communicator::create(r, 3, store, o);
    EXPECT_EQ(c->transports(), r == 2 ? "tcp" : "tcp+shm");
    std::vector<double> v(300000, 1.0);
    c->allreduce(v);
    ASSERT_EQ(v[299999], 3.0);
  });
}

size_t count_lines(const char* path, const std::string& needle) {
  std::ifstream in(path);
  std::string line;
  size_t n = 0;
  while (std::getline(in, line)) n += line.find(needle) != std::string::npos ? 1 : 0;
  return n;
}

size_t open_memfds() {
  size_t n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  while (dirent* e = ::readdir(d)) {
    char target[256] = {};
    std::string p = std::string("/proc/self/fd/") + e->d_name;
    if (::readlink(p.c_str(), target, sizeof target - 1) > 0 &&
        std::string(target).find("memfd:weft-shm") != std::string::npos) {
      ++n;
    }
  }
  ::closedir(d);
  return n;
}

TEST(ShmWorld, NothingIsLeftBehind) {
  auto before = dev_shm();
  {
    auto store = std::make_shared<MemoryStore>();
    std::vector<std::shared_ptr<Communicator>> comms(3);
    run_ranks_ok(3, [&](int r) {
      CommOptions o;
      o.timeout = 60s;
      o.job_token = "leaks";
      comms[static_cast<size_t>(r)] = Communicator::create(r, 3, store, o);
      comms[static_cast<size_t>(r)]->barrier();
    });
    // The segments are mapped (3 pairs, 2 mappings each), but no descriptor
    // of them is open and nothing has a name.
    EXPECT_EQ(count_lines("/proc/self/maps", "memfd:weft-shm"), 6u);
    EXPECT_EQ(open_memfds(), 0u);
    EXPECT_EQ(dev_shm(), before);
    run_ranks_ok(3, [&](int r) { comms[static_cast<size_t>(r)].reset(); });
  }
  EXPECT_EQ(count_lines("/proc/self/maps", "memfd:weft-shm"), 0u);
  EXPECT_EQ(dev_shm(), before);
}

}  // namespace
}  // namespace weft
