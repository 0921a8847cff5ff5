// The Store contract, run on every implementation: MemoryStore, FileStore,
// TcpStore and PrefixStore over TcpStore.
#include "weft/store.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <thread>

#include "store/store_testing.h"
#include "weft/errors.h"

namespace weft::store_test {
namespace {

class StoreTest : public ::testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    if (!backend.available()) GTEST_SKIP() << "etcd is not installed (Debian: etcd-server)";
  }
  StoreBackend backend{GetParam()};
};

TEST_P(StoreTest, SetGetTryGet) {
  auto s = backend.client();
  EXPECT_EQ(s->try_get("a"), std::nullopt);
  s->set("a", "1");
  EXPECT_EQ(s->get("a"), "1");
  EXPECT_EQ(s->try_get("a"), "1");
  s->set("a", "two");
  EXPECT_EQ(s->get("a"), "two");
  // Another client sees it.
  auto other = backend.client();
  EXPECT_EQ(other->get("a"), "two");
}

TEST_P(StoreTest, GetWaitsUntilAnotherClientSets) {
  auto waiter = backend.client();
  auto setter = backend.client();
  std::string got;
  std::thread t([&] { got = waiter->get("late", 20s); });
  // The get is blocked on the missing key before the set.
  EXPECT_TRUE(backend.wait_blocked(1));
  setter->set("late", "here");
  t.join();
  EXPECT_EQ(got, "here");
  EXPECT_EQ(backend.wait_stats().waiting, 0u);
}

TEST_P(StoreTest, GetTimesOut) {
  auto s = backend.client();
  auto start = std::chrono::steady_clock::now();
  try {
    s->get("missing", 200ms);
    FAIL() << "get() returned";
  } catch (const TimeoutError& e) {
    EXPECT_EQ(e.rank(), -1);
    EXPECT_NE(e.op().find("get("), std::string::npos) << e.op();
    EXPECT_NE(std::string(e.what()).find("missing"), std::string::npos) << e.what();
  }
  EXPECT_GE(seconds_since(start), 0.1);
  EXPECT_LT(seconds_since(start), 2.0);
  // The store is still usable afterwards.
  s->set("after", "ok");
  EXPECT_EQ(s->get("after", 5s), "ok");
}

TEST_P(StoreTest, WaitForSeveralKeys) {
  auto waiter = backend.client();
  auto setter = backend.client();
  std::atomic<bool> done{false};
  std::thread t([&] {
    waiter->wait({"x", "y", "z"}, 20s);
    done = true;
  });
  EXPECT_TRUE(backend.wait_blocked(1));
  // After each write of one of its keys the wait looks again, and waits on.
  EXPECT_TRUE(backend.write_then_wait_for_a_look([&] { setter->set("x", "1"); }));
  EXPECT_TRUE(backend.write_then_wait_for_a_look([&] { setter->set("z", ""); }));
  EXPECT_EQ(backend.wait_stats().waiting, 1u);
  EXPECT_FALSE(done.load());
  setter->set("y", "2");
  t.join();
  EXPECT_TRUE(done.load());
  waiter->wait({}, 1s);  // nothing to wait for
}

TEST_P(StoreTest, WaitTimesOutNamingTheMissingKey) {
  auto s = backend.client();
  s->set("present", "1");
  auto start = std::chrono::steady_clock::now();
  try {
    s->wait({"present", "absent"}, 200ms);
    FAIL() << "wait() returned";
  } catch (const TimeoutError& e) {
    EXPECT_NE(e.op().find("wait("), std::string::npos) << e.op();
    EXPECT_NE(std::string(e.what()).find("absent'"), std::string::npos) << e.what();
  }
  EXPECT_LT(seconds_since(start), 2.0);
}

TEST_P(StoreTest, DefaultTimeoutApplies) {
  auto s = backend.client(300ms);
  EXPECT_EQ(s->default_timeout(), 300ms);
  auto start = std::chrono::steady_clock::now();
  EXPECT_THROW(s->get("never"), TimeoutError);
  EXPECT_THROW(s->wait({"never"}), TimeoutError);
  EXPECT_LT(seconds_since(start), 4.0);
}

TEST_P(StoreTest, AddIsAtomicUnderContention) {
  constexpr int kThreads = 8, kAdds = 200;
  std::vector<std::vector<int64_t>> seen(kThreads);
  testing::run_ranks_ok(kThreads, [&](int rank) {
    auto s = backend.client();
    for (int i = 0; i < kAdds; ++i) seen[static_cast<size_t>(rank)].push_back(s->add("counter", 1));
  });
  auto s = backend.client();
  EXPECT_EQ(s->get("counter"), std::to_string(kThreads * kAdds));
  // Every add returned a distinct intermediate value.
  std::vector<int64_t> all;
  for (auto& v : seen) all.insert(all.end(), v.begin(), v.end());
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i < all.size(); ++i) ASSERT_EQ(all[i], static_cast<int64_t>(i + 1));
}

TEST_P(StoreTest, AddSemantics) {
  auto s = backend.client();
  EXPECT_EQ(s->add("n", 5), 5);
  EXPECT_EQ(s->add("n", -7), -2);
  EXPECT_EQ(s->add("n", 0), -2);
  EXPECT_EQ(s->get("n"), "-2");
  s->set("text", "abc");
  EXPECT_THROW(s->add("text", 1), StoreError);
  EXPECT_EQ(s->get("text"), "abc");
  s->set("big", std::to_string(INT64_MAX));
  EXPECT_THROW(s->add("big", 1), StoreError);
  s->set("padded", "12 ");
  EXPECT_THROW(s->add("padded", 1), StoreError);
  // The store keeps working after refusing.
  EXPECT_EQ(s->add("n", 3), 1);
}

TEST_P(StoreTest, CompareSet) {
  auto s = backend.client();
  // Absent expected on an absent key: swaps.
  auto r = s->compare_set("k", std::nullopt, "v1");
  EXPECT_TRUE(r.swapped);
  EXPECT_EQ(r.current, "v1");
  // Absent expected on a present key: no swap, reports the value.
  r = s->compare_set("k", std::nullopt, "v2");
  EXPECT_FALSE(r.swapped);
  EXPECT_EQ(r.current, "v1");
  // Mismatch.
  r = s->compare_set("k", std::string("other"), "v2");
  EXPECT_FALSE(r.swapped);
  EXPECT_EQ(r.current, "v1");
  EXPECT_EQ(s->get("k"), "v1");
  // Match: swaps.
  r = s->compare_set("k", std::string("v1"), "v2");
  EXPECT_TRUE(r.swapped);
  EXPECT_EQ(r.current, "v2");
  EXPECT_EQ(s->get("k"), "v2");
  // An expected value on an absent key: no swap, still absent.
  r = s->compare_set("nokey", std::string(""), "x");
  EXPECT_FALSE(r.swapped);
  EXPECT_EQ(r.current, std::nullopt);
  EXPECT_EQ(s->try_get("nokey"), std::nullopt);
  // Empty values compare like any other.
  s->set("empty", "");
  r = s->compare_set("empty", std::string(""), "full");
  EXPECT_TRUE(r.swapped);
  EXPECT_EQ(s->get("empty"), "full");
}

TEST_P(StoreTest, CompareSetHasOneWinner) {
  constexpr int kThreads = 8;
  std::atomic<int> winners{0};
  testing::run_ranks_ok(kThreads, [&](int rank) {
    auto s = backend.client();
    auto r = s->compare_set("leader", std::nullopt, std::to_string(rank));
    if (r.swapped) ++winners;
    ASSERT_TRUE(r.current.has_value());
  });
  EXPECT_EQ(winners.load(), 1);
}

TEST_P(StoreTest, GetWakesOnCompareSetAndAdd) {
  auto waiter = backend.client();
  auto setter = backend.client();
  std::string a, b;
  std::atomic<bool> got_a{false};
  std::thread t([&] {
    a = waiter->get("by_cas", 20s);
    got_a = true;
    b = waiter->get("by_add", 20s);
  });
  EXPECT_TRUE(backend.wait_blocked(1));
  setter->compare_set("by_cas", std::nullopt, "cas");
  // The first get has returned (no longer counted): the one counted is the second.
  EXPECT_TRUE(testing::wait_until([&] { return got_a && backend.wait_stats().waiting == 1; }));
  setter->add("by_add", 42);
  t.join();
  EXPECT_EQ(a, "cas");
  EXPECT_EQ(b, "42");
}

TEST_P(StoreTest, Remove) {
  auto s = backend.client();
  s->set("r", "1");
  EXPECT_TRUE(s->remove("r"));
  EXPECT_EQ(s->try_get("r"), std::nullopt);
  EXPECT_FALSE(s->remove("r"));
  EXPECT_THROW(s->get("r", 100ms), TimeoutError);
  s->set("r", "again");
  EXPECT_EQ(s->get("r"), "again");
}

TEST_P(StoreTest, BinaryKeysAndValues) {
  auto s = backend.client();
  std::string all_bytes;
  for (int i = 0; i < 256; ++i) all_bytes += static_cast<char>(i);
  const std::string nul_value("a\0b\0\0c", 6);
  std::string odd_key("dir/../sub/key with spaces\0and nul", 34);
  odd_key.append("\xff\xfe%41");
  s->set(odd_key, nul_value);
  s->set("all", all_bytes);
  s->set("empty", "");
  s->set("", "empty key");
  EXPECT_EQ(s->get(odd_key), nul_value);
  EXPECT_EQ(s->get("all"), all_bytes);
  EXPECT_EQ(s->get("empty"), "");
  EXPECT_EQ(s->try_get("empty"), std::string());
  EXPECT_EQ(s->get(""), "empty key");
  // Keys that differ only in bytes an encoding could confuse stay distinct.
  s->set("a/b", "slash");
  s->set("a%2Fb", "percent");
  s->set("A/B", "upper");
  EXPECT_EQ(s->get("a/b"), "slash");
  EXPECT_EQ(s->get("a%2Fb"), "percent");
  EXPECT_EQ(s->get("A/B"), "upper");
  s->wait({odd_key, "all", "empty", ""}, 5s);
}

TEST_P(StoreTest, LargeValuesAndLongKeys) {
  auto s = backend.client();
  std::string big(std::min<size_t>(8u << 20, backend.max_value_bytes()), '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 131 + (i >> 11));
  s->set("big", big);
  EXPECT_EQ(s->get("big"), big);
  const std::string max_key(kMaxStoreKeyBytes - (backend.kind() == Backend::PrefixTcp ? 9 : 0),
                            'k');
  const std::string long_key = max_key.substr(0, 300);
  s->set(max_key, "max");
  s->set(long_key, "long");
  EXPECT_EQ(s->get(max_key), "max");
  EXPECT_EQ(s->get(long_key), "long");
  EXPECT_THROW(s->add(max_key, 1), StoreError);  // "max" is not an integer
}

TEST_P(StoreTest, OversizeKeysAndValuesAreRejected) {
  auto s = backend.client();
  const std::string huge_key(kMaxStoreKeyBytes + 1, 'k');
  EXPECT_THROW(s->set(huge_key, "v"), InvalidArgument);
  EXPECT_THROW(s->get(huge_key, 1s), InvalidArgument);
  EXPECT_THROW(s->try_get(huge_key), InvalidArgument);
  EXPECT_THROW(s->add(huge_key, 1), InvalidArgument);
  EXPECT_THROW(s->remove(huge_key), InvalidArgument);
  EXPECT_THROW(s->wait({"ok", huge_key}, 1s), InvalidArgument);
  const std::string huge_value(kMaxStoreValueBytes + 1, 'v');
  try {
    s->set("k", huge_value);
    FAIL() << "set() accepted an oversize value";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("limit"), std::string::npos) << e.what();
  }
  EXPECT_THROW(s->compare_set("k", std::nullopt, huge_value), InvalidArgument);
  EXPECT_THROW(s->compare_set("k", huge_value, "v"), InvalidArgument);
  EXPECT_EQ(s->try_get("k"), std::nullopt);
  // The client still works.
  s->set("k", "small");
  EXPECT_EQ(s->get("k"), "small");
}

TEST_P(StoreTest, ThreadsShareOneClient) {
  auto s = backend.client();
  testing::run_ranks_ok(8, [&](int rank) {
    for (int i = 0; i < 50; ++i) {
      std::string key = fmt::format("t{}/{}", rank, i);
      s->set(key, key);
      EXPECT_EQ(s->get(key), key);
      s->add("shared", 1);
    }
  });
  EXPECT_EQ(s->get("shared"), "400");
}

INSTANTIATE_TEST_SUITE_P(Stores, StoreTest,
                         ::testing::Values(Backend::Memory, Backend::File, Backend::Tcp,
                                           Backend::PrefixTcp, Backend::Etcd),
                         [](const auto& p) { return backend_name(p.param); });

TEST(PrefixStore, NamespacesKeys) {
  auto base = std::make_shared<MemoryStore>(5s);
  PrefixStore a("a", base), b("b", base);
  a.set("k", "in a");
  b.set("k", "in b");
  EXPECT_EQ(base->get("a/k"), "in a");
  EXPECT_EQ(base->get("b/k"), "in b");
  EXPECT_EQ(a.add("n", 2), 2);
  EXPECT_EQ(base->get("a/n"), "2");
  a.wait({"k", "n"}, 1s);
  EXPECT_THROW(b.wait({"n"}, 100ms), TimeoutError);
  EXPECT_TRUE(a.remove("k"));
  EXPECT_EQ(base->try_get("a/k"), std::nullopt);
  EXPECT_EQ(a.default_timeout(), 5s);
  PrefixStore nested("inner", std::make_shared<PrefixStore>("outer", base));
  nested.set("x", "1");
  EXPECT_EQ(base->get("outer/inner/x"), "1");
  EXPECT_THROW(PrefixStore("p", nullptr), InvalidArgument);
}

TEST(Stores, DefaultTimeoutOfTheStoreDefault) {
  EXPECT_EQ(MemoryStore(kDefaultTimeout).default_timeout(), kDefaultStoreTimeout);
  testing::TempDir dir;
  EXPECT_EQ(FileStore(dir.path(), kDefaultTimeout).default_timeout(), kDefaultStoreTimeout);
  TcpStoreOptions o;
  o.timeout = kDefaultTimeout;
  EXPECT_EQ(TcpStore("127.0.0.1", 1, o).default_timeout(), kDefaultStoreTimeout);
  EXPECT_EQ(TcpStore("127.0.0.1", 1).default_timeout(), kDefaultStoreTimeout);
}

}  // namespace
}  // namespace weft::store_test
