// Collectives against a locally computed reference: ranks as threads (1 to 8)
// and as processes (1 to 5, under weft run), every collective, dtype, op,
// size class and algorithm; mismatch detection; many collectives in flight.
#include <gtest/gtest.h>

#include <thread>

#include "collectives/cases.h"
#include "testing/testing.h"
#include "weft/weft.h"

namespace weft {
namespace {

using namespace std::chrono_literals;

CommOptions options(Timeout t = 120s) {
  CommOptions o;
  o.timeout = t;
  o.job_token = "coll-token";
  return o;
}

class ThreadRanks : public ::testing::TestWithParam<int> {};

TEST_P(ThreadRanks, EveryCollectiveMatchesTheReference) {
  const int n = GetParam();
  auto store = std::make_shared<MemoryStore>();
  std::vector<testing::CaseReport> reports(static_cast<size_t>(n));
  testing::run_ranks_ok(n, [&](int r) {
    auto c = Communicator::create(r, n, store, options());
    reports[static_cast<size_t>(r)] = testing::run_collective_cases(*c, {});
  });
  for (auto& rep : reports) {
    EXPECT_GT(rep.cases, 1000);
    for (auto& f : rep.failures) ADD_FAILURE() << f;
  }
}

INSTANTIATE_TEST_SUITE_P(World, ThreadRanks, ::testing::Values(1, 2, 3, 4, 5, 8));

class ProcessRanks : public ::testing::TestWithParam<int> {};

TEST_P(ProcessRanks, EveryCollectiveMatchesTheReference) {
  const int n = GetParam();
  std::vector<std::string> argv = {
      testing::bin_dir() + "/weft",       "run", "-n", std::to_string(n), "--timeout", "120",
      testing::bin_dir() + "/coll_worker"};
  if (n == 2 || n == 3) argv.push_back("--large");  // the 64 MiB cases
  testing::Process p(argv);
  ASSERT_TRUE(p.wait(600s)) << p.output();
  EXPECT_EQ(p.exit_code(), 0) << p.output();
  EXPECT_NE(p.output().find("FAILURES 0 (job total 0)"), std::string::npos) << p.output();
}

INSTANTIATE_TEST_SUITE_P(World, ProcessRanks, ::testing::Values(1, 2, 3, 4, 5));

// Runs fn on 3 thread ranks and expects every rank to fail with a
// MismatchError whose message names the disagreement: in the mismatched
// call, or, for a rank whose part of it completed before the disagreement
// was detected elsewhere, in its next call.
void expect_mismatch(const std::function<void(Communicator&, int)>& fn, const std::string& needle) {
  const int n = 3;
  auto store = std::make_shared<MemoryStore>();
  auto errors = testing::run_ranks(n, [&](int r) {
    auto c = Communicator::create(r, n, store, options(30s));
    auto t0 = std::chrono::steady_clock::now();
    auto check = [&](const MismatchError& e) {
      std::string what = e.what();
      EXPECT_NE(what.find("mismatched operations"), std::string::npos) << what;
      EXPECT_NE(what.find(needle), std::string::npos) << what;
    };
    try {
      fn(*c, r);
      try {
        c->barrier();
        ADD_FAILURE() << "rank " << r << ": the mismatch went unnoticed";
      } catch (const MismatchError& e) {
        check(e);
      }
    } catch (const MismatchError& e) {
      check(e);
    }
    // Detected, not timed out.
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 20s);
    // The communicator stays broken.
    EXPECT_THROW(c->barrier(), CommError);
  });
  for (auto& e : errors) EXPECT_EQ(e, nullptr);
}

TEST(Mismatch, DifferentCounts) {
  expect_mismatch(
      [](Communicator& c, int r) {
        std::vector<float> v(r == 1 ? 1000 : 1001, 1.0f);
        c.allreduce(v);
      },
      "x 1000");
}

TEST(Mismatch, DifferentDtypes) {
  expect_mismatch(
      [](Communicator& c, int r) {
        if (r == 2) {
          std::vector<double> v(64, 1.0);
          c.allreduce(v);
        } else {
          std::vector<float> v(128, 1.0f);
          c.allreduce(v);
        }
      },
      "float64");
}

TEST(Mismatch, DifferentOps) {
  expect_mismatch(
      [](Communicator& c, int r) {
        std::vector<int32_t> v(100, 1);
        c.allreduce(v, r == 0 ? ReduceOp::Max : ReduceOp::Sum);
      },
      "max");
}

TEST(Mismatch, DifferentCollectivesAtTheSamePosition) {
  expect_mismatch(
      [](Communicator& c, int r) {
        std::vector<float> v(256, 1.0f);
        if (r == 1) {
          c.broadcast(v, 0);
        } else {
          c.allreduce(v);
        }
      },
      "broadcast");
}

TEST(Mismatch, DifferentRoots) {
  expect_mismatch(
      [](Communicator& c, int r) {
        std::vector<float> v(256, 1.0f);
        c.broadcast(v, r == 2 ? 1 : 0);
      },
      "root");
}

TEST(Mismatch, DifferentAlgorithms) {
  expect_mismatch(
      [](Communicator& c, int r) {
        std::vector<float> v(4096, 1.0f);
        c.allreduce(v, AllreduceOptions{ReduceOp::Sum, kDefaultTimeout,
                                        r == 0 ? Algorithm::Ring : Algorithm::RecursiveDoubling});
      },
      "ring");
}

TEST(InFlight, ManyCollectivesAtOnce) {
  const int n = 4;
  auto store = std::make_shared<MemoryStore>();
  testing::run_ranks_ok(n, [&](int r) {
    auto c = Communicator::create(r, n, store, options());
    constexpr int kOps = 24;
    std::vector<std::vector<float>> a(kOps);
    std::vector<std::vector<int32_t>> gin(kOps), gout(kOps);
    std::vector<WorkPtr> works;
    for (int k = 0; k < kOps; ++k) {
      a[k].assign(static_cast<size_t>(1000 + 5000 * k), static_cast<float>(r + k));
      works.push_back(c->allreduce_async(a[k], ReduceOp::Sum));
      gin[k].assign(static_cast<size_t>(k + 1), r * 1000 + k);
      gout[k].assign(static_cast<size_t>((k + 1) * n), -1);
      works.push_back(c->allgather_async(gin[k], gout[k]));
    }
    // Blocking collectives interleaved with the asynchronous ones.
    std::vector<int64_t> b{r};
    c->allreduce(b, ReduceOp::Max);
    EXPECT_EQ(b[0], n - 1);
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

TEST(Selection, CostModelPicksByMessageSize) {
  auto store = std::make_shared<MemoryStore>();
  testing::run_ranks_ok(4, [&](int r) {
    auto c = Communicator::create(r, 4, store, options());
    EXPECT_EQ(c->selected_algorithm(Collective::Allreduce, 1024, DType::Float32),
              Algorithm::RecursiveDoubling);
    EXPECT_EQ(c->selected_algorithm(Collective::Allreduce, 16u << 20, DType::Float32),
              Algorithm::Ring);
    EXPECT_EQ(c->selected_algorithm(Collective::Barrier, 0, DType::UInt8),
              Algorithm::Dissemination);
    EXPECT_EQ(c->selected_algorithm(Collective::Alltoall, 100, DType::Float32),
              Algorithm::Pairwise);
    std::vector<float> v(10);
    // An algorithm the collective does not have.
    EXPECT_THROW(
        c->allreduce(v, AllreduceOptions{ReduceOp::Sum, kDefaultTimeout, Algorithm::Pairwise}),
        InvalidArgument);
    c->barrier();
  });
}

TEST(Validation, BadCallsAreRejectedBeforeAnythingIsSent) {
  auto store = std::make_shared<MemoryStore>();
  auto c = Communicator::create(0, 1, store, options());
  std::vector<float> a(8), b(9);
  std::vector<int32_t> ints(8);
  EXPECT_THROW(c->allreduce(ConstBuffer(a), Buffer(b)), InvalidArgument);     // sizes
  EXPECT_THROW(c->allreduce(ConstBuffer(a), Buffer(ints)), InvalidArgument);  // dtypes
  EXPECT_THROW(c->allreduce(ints, ReduceOp::Avg), InvalidArgument);           // avg on ints
  EXPECT_THROW(c->allgather(ConstBuffer(a), Buffer(b)), InvalidArgument);     // 8 x 1 != 9
  EXPECT_THROW(c->reduce(ConstBuffer(a), Buffer(a), ReduceOptions{ReduceOp::Sum, 3}),
               InvalidArgument);  // root
  EXPECT_THROW(c->allreduce(ConstBuffer(a.data() + 1, 4, DType::Float32),
                            Buffer(a.data(), 4, DType::Float32)),
               InvalidArgument);  // overlap
  std::vector<size_t> counts{3, 4};
  EXPECT_THROW(c->allgatherv(ConstBuffer(a), Buffer(b), counts),
               InvalidArgument);  // counts for 2 ranks
  c->barrier();                   // nothing was started: the communicator still works
}

}  // namespace
}  // namespace weft
