// Hierarchical collectives with ranks as threads of one process, spread over
// emulated hosts by CommOptions::host_id (no namespaces, no root): the case
// matrix on even, uneven and interleaved layouts, the topology and the
// automatic selection, and many hierarchical collectives in flight at once.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "api/access.h"
#include "collectives/cases.h"
#include "collectives/collectives.h"
#include "comm/group.h"
#include "testing/testing.h"
#include "weft/weft.h"

namespace weft {
namespace {

using namespace std::chrono_literals;

// A layout: the host of each rank, e.g. "AABB" (2 hosts x 2 ranks).
std::shared_ptr<Communicator> make(const std::shared_ptr<Store>& store, const std::string& layout,
                                   int r) {
  CommOptions o;
  o.timeout = 120s;
  o.job_token = "hier-token";
  o.host_id = std::string("host-") + layout[static_cast<size_t>(r)];
  return Communicator::create(r, static_cast<int>(layout.size()), store, o);
}

class Layouts : public ::testing::TestWithParam<std::string> {};

TEST_P(Layouts, EveryCollectiveMatchesTheReference) {
  const std::string layout = GetParam();
  const int n = static_cast<int>(layout.size());
  auto store = std::make_shared<MemoryStore>();
  std::vector<testing::CaseReport> reports(static_cast<size_t>(n));
  testing::run_ranks_ok(n, [&](int r) {
    auto c = make(store, layout, r);
    testing::CaseOptions co;
    co.only = {Collective::Broadcast, Collective::Allreduce, Collective::Allgather,
               Collective::Allgatherv};
    reports[static_cast<size_t>(r)] = testing::run_collective_cases(*c, co);
  });
  for (auto& rep : reports) {
    EXPECT_GT(rep.cases, 300);
    for (auto& f : rep.failures) ADD_FAILURE() << f;
  }
}

// Even (auto picks hierarchical); uneven with one lane (2 + 1: the
// leader-based scheme) and with two lanes and a rank beyond them (2 + 3);
// interleaved hosts; one host; one rank per host.
INSTANTIATE_TEST_SUITE_P(Hosts, Layouts,
                         ::testing::Values("AABB", "AAB", "AABBB", "ABAB", "AAA", "ABC"));

TEST(Topology, HostsInOrderOfTheirFirstRank) {
  auto store = std::make_shared<MemoryStore>();
  const std::string layout = "BAABC";
  testing::run_ranks_ok(5, [&](int r) {
    auto c = make(store, layout, r);
    const auto& t = coll::topology(*api::CommunicatorAccess::group(*c));
    ASSERT_EQ(t.num_hosts(), 3);
    EXPECT_EQ(t.hosts[0], (std::vector<int>{0, 3}));
    EXPECT_EQ(t.hosts[1], (std::vector<int>{1, 2}));
    EXPECT_EQ(t.hosts[2], (std::vector<int>{4}));
    EXPECT_EQ(t.local_of, (std::vector<int>{0, 0, 1, 1, 0}));
    EXPECT_EQ(t.min_local, 1);
    EXPECT_EQ(t.max_local, 2);
    EXPECT_FALSE(t.even());
    EXPECT_EQ(c->local_size(),
              t.hosts[static_cast<size_t>(t.host_of[static_cast<size_t>(r)])].size());
    c->barrier();
  });
}

TEST(Selection, HierarchicalOnEvenHostsOnly) {
  for (std::string layout : {"AABB", "AAB", "ABCD", "AAAA"}) {
    SCOPED_TRACE(layout);
    auto store = std::make_shared<MemoryStore>();
    const int n = static_cast<int>(layout.size());
    testing::run_ranks_ok(n, [&](int r) {
      auto c = make(store, layout, r);
      const bool even_multi = layout == "AABB";
      for (size_t bytes : {4u << 20, 16u << 20}) {
        auto a = c->selected_algorithm(Collective::Allreduce, bytes / 4, DType::Float32);
        EXPECT_EQ(a == Algorithm::Hierarchical, even_multi) << algorithm_name(a);
      }
      EXPECT_EQ(c->selected_algorithm(Collective::Allgather, 1u << 20, DType::Float32) ==
                    Algorithm::Hierarchical,
                even_multi);
      // Broadcast: a pipelined chain over host-ordered ranks crosses hosts
      // once, like the hierarchical one; the latter wins on latency.
      EXPECT_EQ(c->selected_algorithm(Collective::Broadcast, 256, DType::Float32) ==
                    Algorithm::Hierarchical,
                even_multi);
      // Collectives without a hierarchical algorithm are not affected.
      EXPECT_NE(c->selected_algorithm(Collective::Reduce, 4u << 20, DType::Float32),
                Algorithm::Hierarchical);
      std::vector<float> v(10);
      EXPECT_THROW(
          c->reduce(ConstBuffer(v), Buffer(v),
                    ReduceOptions{ReduceOp::Sum, 0, kDefaultTimeout, Algorithm::Hierarchical}),
          InvalidArgument);
      c->barrier();
    });
  }
}

// Hierarchical collectives in flight at once (async and blocking, several
// plans of the same group at the same time) never cross their messages.
TEST(InFlight, ManyHierarchicalCollectivesAtOnce) {
  const std::string layout = "AABB";
  const int n = 4;
  auto store = std::make_shared<MemoryStore>();
  testing::run_ranks_ok(n, [&](int r) {
    auto c = make(store, layout, r);
    constexpr int kOps = 12;
    const AllreduceOptions ao{ReduceOp::Sum, kDefaultTimeout, Algorithm::Hierarchical};
    const CollectiveOptions go{kDefaultTimeout, Algorithm::Hierarchical};
    std::vector<std::vector<float>> a(kOps);
    std::vector<std::vector<int32_t>> gin(kOps), gout(kOps);
    std::vector<WorkPtr> works;
    for (int k = 0; k < kOps; ++k) {
      a[k].assign(static_cast<size_t>(1000 + 7000 * k), static_cast<float>(r + k));
      works.push_back(c->allreduce_async(a[k], ao));
      gin[k].assign(static_cast<size_t>(k + 1), r * 1000 + k);
      gout[k].assign(static_cast<size_t>((k + 1) * n), -1);
      works.push_back(c->allgather_async(gin[k], gout[k], go));
      // A blocking one on this thread while the async ones run on another.
      std::vector<int64_t> b(static_cast<size_t>(3000 + k), r);
      c->allreduce(b, AllreduceOptions{ReduceOp::Max, kDefaultTimeout, Algorithm::Hierarchical});
      ASSERT_EQ(b[0], n - 1);
    }
    for (size_t i = works.size(); i-- > 0;) works[i]->wait();
    for (int k = 0; k < kOps; ++k) {
      for (float x : a[k]) ASSERT_EQ(x, static_cast<float>(n * k + n * (n - 1) / 2));
      for (int j = 0; j < n; ++j) {
        for (int i = 0; i <= k; ++i)
          ASSERT_EQ(gout[k][static_cast<size_t>(j * (k + 1) + i)], j * 1000 + k);
      }
    }
  });
}

// Ranks that disagree on the algorithm still fail with MismatchError.
TEST(Mismatch, HierarchicalAgainstRing) {
  const std::string layout = "AABB";
  auto store = std::make_shared<MemoryStore>();
  auto errors = testing::run_ranks(4, [&](int r) {
    CommOptions o;
    o.timeout = 20s;
    o.job_token = "hier-token";
    o.host_id = std::string("host-") + layout[static_cast<size_t>(r)];
    auto c = Communicator::create(r, 4, store, o);
    std::vector<float> v(4096, 1.0f);
    try {
      c->allreduce(v, AllreduceOptions{ReduceOp::Sum, kDefaultTimeout,
                                       r == 0 ? Algorithm::Ring : Algorithm::Hierarchical});
      c->barrier();
      ADD_FAILURE() << "rank " << r << ": the mismatch went unnoticed";
    } catch (const MismatchError&) {
    } catch (const CommError& e) {
      // A rank that never met the disagreement learns it from a peer.
      EXPECT_NE(std::string(e.what()).find("mismatch"), std::string::npos) << e.what();
    }
  });
  for (auto& e : errors) EXPECT_EQ(e, nullptr);
}

}  // namespace
}  // namespace weft
