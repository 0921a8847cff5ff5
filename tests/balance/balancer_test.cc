// The balancer in in-process worlds (ranks are threads with a MemoryStore):
// the probe (including one that fails on one worker), the exchange of every
// worker's figures, re-plans from reported step times (the same on every
// rank), stragglers, and options that are bad or differ between ranks.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <mutex>
#include <numeric>
#include <thread>

#include "testing/testing.h"
#include "weft/balance.h"
#include "weft/weft.h"

namespace weft::balance {
namespace {

using namespace std::chrono_literals;
using testing::run_ranks;
using testing::run_ranks_ok;

std::shared_ptr<Communicator> make_comm(int rank, int size, const std::shared_ptr<Store>& store) {
  CommOptions o;
  o.timeout = 60s;
  o.job_token = "balance-test";
  return Communicator::create(rank, size, store, o);
}

int64_t sum(const std::vector<int64_t>& s) {
  return std::accumulate(s.begin(), s.end(), int64_t{0});
}

TEST(Balancer, ExchangesHostFactsAndStartsEqual) {
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(3, [&](int r) {
    Balancer b(make_comm(r, 3, store), {.mode = Mode::Dynamic, .global_batch = 30});
    EXPECT_EQ(b.shares(), (std::vector<int64_t>{10, 10, 10}));
    ASSERT_EQ(b.hosts().size(), 3u);
    for (const HostFacts& h : b.hosts()) {
      EXPECT_FALSE(h.hostname.empty());
      EXPECT_GE(h.cpus_usable, 1);
    }
    EXPECT_TRUE(b.workers().empty());  // no exchange yet
  });
}

TEST(Balancer, ProbeSharesFollowTheMeasuredSpeed) {
  // Rank 1's "model" takes four times as long per sample (sleeping, so that
  // the threads do not compete for the CPUs).
  auto store = std::make_shared<MemoryStore>();
  std::vector<std::vector<int64_t>> seen(2);
  run_ranks_ok(2, [&](int r) {
    Balancer b(make_comm(r, 2, store), {.mode = Mode::Static, .global_batch = 64});
    const auto per_sample = r == 1 ? 400us : 100us;
    b.probe([&](int64_t n) { std::this_thread::sleep_for(per_sample * n); }, 32);
    seen[static_cast<size_t>(r)] = b.shares();
    EXPECT_EQ(sum(b.shares()), 64);
    EXPECT_LT(b.shares()[1], b.shares()[0]);
    ASSERT_EQ(b.decisions().size(), 1u);
    EXPECT_NE(b.decisions()[0].reason.find("probe"), std::string::npos);
  });
  EXPECT_EQ(seen[0], seen[1]);  // every rank plans the same
}

TEST(Balancer, ProbeThatFailsOnOneWorkerFallsBackWithoutHanging) {
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(3, [&](int r) {
    Balancer b(make_comm(r, 3, store), {.mode = Mode::Dynamic, .global_batch = 30});
    b.probe(
        [&](int64_t) {
          if (r == 2) throw std::runtime_error("out of device memory");
        },
        8);
    EXPECT_EQ(sum(b.shares()), 30);
    EXPECT_GE(b.shares()[2], 1);
    EXPECT_FALSE(std::isfinite(b.workers()[2].rate));  // reported as unmeasured
    ASSERT_FALSE(b.decisions().empty());
    EXPECT_NE(b.decisions().back().reason.find("no usable rate"), std::string::npos)
        << b.decisions().back().reason;
  });
}

TEST(Balancer, ProbeWithNoUsableRateKeepsEqualShares) {
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(2, [&](int r) {
    Balancer b(make_comm(r, 2, store), {.mode = Mode::Dynamic, .global_batch = 10});
    b.probe([&](int64_t) { throw std::runtime_error("no model"); }, 4);
    EXPECT_EQ(b.shares(), (std::vector<int64_t>{5, 5}));
  });
}

// Steps whose compute time is reported (not measured): rank 2 is four times
// slower per sample. The shares converge so that compute times even out,
// every rank sees the same figures and shares, and each change is a
// recorded decision.
TEST(Balancer, DynamicSharesFollowReportedRatesOnEveryRankAlike) {
  const int n = 3;
  auto store = std::make_shared<MemoryStore>();
  std::vector<std::vector<int64_t>> final_shares(n);
  std::vector<size_t> decisions(n);
  run_ranks_ok(n, [&](int r) {
    Balancer b(make_comm(r, n, store),
               {.mode = Mode::Dynamic, .global_batch = 96, .exchange_every = 2, .warmup_steps = 1});
    const double per_sample = r == 2 ? 4e-3 : 1e-3;
    for (int s = 0; s < 60; ++s) {
      const double t = 0.002 + per_sample * static_cast<double>(b.share());
      b.end_step({.compute_seconds = t, .wait_seconds = 0.001});
    }
    final_shares[static_cast<size_t>(r)] = b.shares();
    decisions[static_cast<size_t>(r)] = b.decisions().size();
    ASSERT_EQ(b.workers().size(), 3u);
    for (const auto& w : b.workers()) {
      EXPECT_EQ(w.share, b.shares()[static_cast<size_t>(w.rank)]);
      EXPECT_GT(w.rate, 0);
      EXPECT_NEAR(w.wait_seconds_per_step, 0.001, 1e-9);
    }
    const auto& d = b.decisions().front();
    EXPECT_EQ(sum(d.old_shares), 96);
    EXPECT_EQ(sum(d.new_shares), 96);
    EXPECT_FALSE(d.reason.empty());
  });
  for (int r = 1; r < n; ++r) {
    EXPECT_EQ(final_shares[r], final_shares[0]);
    EXPECT_EQ(decisions[r], decisions[0]);
  }
  const auto& s = final_shares[0];
  EXPECT_EQ(sum(s), 96);
  // Equal compute time: rank 2's share near a quarter of the others'.
  const double t0 = 0.002 + 1e-3 * static_cast<double>(s[0]);
  const double t2 = 0.002 + 4e-3 * static_cast<double>(s[2]);
  EXPECT_LT(std::max(t0, t2) / std::min(t0, t2), 1.2) << s[0] << " " << s[1] << " " << s[2];
}

TEST(Balancer, NoneAndStaticNeverReplan) {
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(2, [&](int r) {
    for (Mode m : {Mode::None, Mode::Static}) {
      Balancer b(make_comm(r, 2, store),
                 {.mode = m, .global_batch = 20, .exchange_every = 1, .warmup_steps = 0});
      const auto before = b.shares();
      for (int s = 0; s < 10; ++s) {
        EXPECT_FALSE(b.end_step({.compute_seconds = r == 0 ? 0.001 : 0.1}));
      }
      EXPECT_EQ(b.shares(), before);
      EXPECT_EQ(b.workers().size(), 2u);  // still monitored
    }
  });
}

TEST(Balancer, AbsurdStepTimesAreNotRates) {
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(2, [&](int r) {
    Balancer b(make_comm(r, 2, store),
               {.mode = Mode::Dynamic, .global_batch = 20, .exchange_every = 1, .warmup_steps = 0});
    for (double t : {0.0, -1.0, std::nan(""), HUGE_VAL, 0.01}) {
      b.end_step({.compute_seconds = r == 1 ? t : 0.01, .wait_seconds = std::nan("")});
      EXPECT_EQ(sum(b.shares()), 20);
      for (int64_t s : b.shares()) EXPECT_GE(s, 1);
    }
  });
}

TEST(Balancer, StragglerIsReported) {
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(3, [&](int r) {
    Balancer b(make_comm(r, 3, store), {.mode = Mode::None,
                                        .global_batch = 30,
                                        .exchange_every = 1,
                                        .warmup_steps = 0,
                                        .straggler_floor = 0.1});
    b.end_step({.compute_seconds = r == 1 ? 10.0 : 0.01});
    ASSERT_EQ(b.workers().size(), 3u);
    EXPECT_FALSE(b.workers()[0].straggler);
    EXPECT_TRUE(b.workers()[1].straggler);
    EXPECT_FALSE(b.workers()[2].straggler);
  });
}

// Of 6 workers, ranks 1 and 3 are slow from the first step, rank 3 the
// slowest; rank 2 only from the third. A worker is named for dropping once
// it has been a straggler in drop_after = 3 exchanges in a row, slowest
// first, at most `max`: the same list on every rank.
TEST(Balancer, PersistentStragglersAreNamedForDropping) {
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(6, [&](int r) {
    Balancer b(make_comm(r, 6, store), {.mode = Mode::None,
                                        .global_batch = 60,
                                        .exchange_every = 1,
                                        .warmup_steps = 0,
                                        .straggler_floor = 0.1,
                                        .drop_after = 3});
    for (int step = 1; step <= 4; ++step) {
      const bool slow = r == 1 || r == 3 || (r == 2 && step >= 3);
      b.end_step({.compute_seconds = !slow ? 0.01 : r == 3 ? 20.0 : 10.0});
      const auto& w = b.workers();
      ASSERT_EQ(w.size(), 6u);
      EXPECT_EQ(w[1].straggler_exchanges, step);
      EXPECT_EQ(w[0].straggler_exchanges, 0);
      EXPECT_EQ(w[2].straggler_exchanges, std::max(0, step - 2));
      if (step < 3) {
        EXPECT_TRUE(b.stragglers_to_drop(6).empty());
      }
    }
    EXPECT_EQ(b.stragglers_to_drop(6), (std::vector<int>{3, 1}));
    EXPECT_EQ(b.stragglers_to_drop(1), (std::vector<int>{3}));
    EXPECT_TRUE(b.stragglers_to_drop(0).empty());
  });
}

TEST(Balancer, BadOptionsAreRefusedOnEveryRank) {
  auto store = std::make_shared<MemoryStore>();
  for (BalancerOptions bad : {BalancerOptions{.global_batch = 2},  // smaller than 3 workers
                              BalancerOptions{.global_batch = 30, .exchange_every = 0},
                              BalancerOptions{.global_batch = 30, .warmup_steps = -1},
                              BalancerOptions{.global_batch = 30, .straggler_floor = 1},
                              BalancerOptions{.global_batch = 30, .quota_headroom = 0},
                              BalancerOptions{.global_batch = 30, .quota_headroom = 1.5},
                              BalancerOptions{.global_batch = 30, .drop_after = 0},
                              BalancerOptions{.global_batch = 30, .planner = {.min_share = 11}}}) {
    auto errors = run_ranks(3, [&](int r) { Balancer b(make_comm(r, 3, store), bad); });
    for (auto& e : errors) {
      ASSERT_TRUE(e);
      EXPECT_THROW(std::rethrow_exception(e), InvalidArgument);
    }
    store = std::make_shared<MemoryStore>();
  }
}

// The global batch, and a planner option (ranks that damp differently
// would plan different shares): every rank refuses, naming the field with
// the other rank's value and its own.
TEST(Balancer, OptionsThatDifferBetweenRanksAreRefused) {
  struct Case {
    std::function<BalancerOptions(int)> options;
    std::string either, or_else;
  };
  const std::vector<Case> cases = {
      {[](int r) { return BalancerOptions{.global_batch = r == 0 ? 64 : 32}; },
       "global batch 32 vs 64", "global batch 64 vs 32"},
      {[](int r) {
         return BalancerOptions{.global_batch = 64, .planner = {.damping = r == 0 ? 0.5 : 0.7}};
       },
       "damping 0.7 vs 0.5", "damping 0.5 vs 0.7"},
      {[](int r) {
         return BalancerOptions{.global_batch = 64, .quota_headroom = r == 0 ? 0.8 : 0.6};
       },
       "quota headroom 0.6 vs 0.8", "quota headroom 0.8 vs 0.6"}};
  for (const Case& c : cases) {
    auto store = std::make_shared<MemoryStore>();
    auto errors = run_ranks(2, [&](int r) { Balancer b(make_comm(r, 2, store), c.options(r)); });
    for (auto& e : errors) {
      ASSERT_TRUE(e);
      try {
        std::rethrow_exception(e);
      } catch (const InvalidArgument& x) {
        const std::string what = x.what();
        EXPECT_TRUE(what.find(c.either) != std::string::npos ||
                    what.find(c.or_else) != std::string::npos)
            << what;
      }
    }
  }
}

// Two workers computing equally fast; rank 1 has a quarter-core quota and
// uses 1 ms of CPU per sample, so it sustains 0.25 x 80% / 1 ms = 200
// samples/s within its quota's headroom, far below the 1600 it measures
// while not throttled. It is planned at 200 (shares toward 1600:200 of
// 128, about 114:14), every rank says so, and the decisions name the quota.
// The other worker has no quota and no bound. Then the quota is lifted and
// the shares go back toward equal.
TEST(Balancer, AWorkerWithACpuQuotaIsPlannedAtWhatItSustains) {
  auto store = std::make_shared<MemoryStore>();
  std::vector<std::vector<int64_t>> seen(2);
  run_ranks_ok(2, [&](int r) {
    double cpu = 0, wall = 0, quota = r == 1 ? 0.25 : 0;
    BalancerOptions o{.mode = Mode::Dynamic,
                      .global_batch = 128,
                      .exchange_every = 2,
                      .warmup_steps = 0,
                      .rate_window_seconds = 0.05};
    o.process_sampler = [&] {
      ProcessSample p;
      p.wall_seconds = wall;
      p.cpu_seconds = cpu;
      p.cpu_quota_cores = quota;
      return p;
    };
    Balancer b(make_comm(r, 2, store), o);
    auto steps = [&](int count) {
      for (int s = 0; s < count; ++s) {
        const int64_t n = b.share();
        cpu += 0.001 * static_cast<double>(n);
        wall += 0.1;
        b.end_step({.compute_seconds = static_cast<double>(n) / 1600.0});  // 1600 samples/s
      }
    };
    steps(40);
    ASSERT_EQ(b.workers().size(), 2u);
    const WorkerFigures& slow = b.workers()[1];
    EXPECT_DOUBLE_EQ(slow.cpu_quota_cores, 0.25);
    EXPECT_NEAR(slow.cpu_seconds_per_sample, 0.001, 1e-9);
    EXPECT_NEAR(slow.quota_rate, 200, 1e-6);
    EXPECT_TRUE(slow.quota_bound);
    EXPECT_NEAR(slow.rate, 1600, 1);  // what it measured is still reported
    EXPECT_EQ(b.workers()[0].cpu_quota_cores, 0);
    EXPECT_EQ(b.workers()[0].quota_rate, 0);
    EXPECT_FALSE(b.workers()[0].quota_bound);
    EXPECT_NEAR(static_cast<double>(b.shares()[1]), 128.0 * 200 / 1800, 2) << b.shares()[1];
    ASSERT_FALSE(b.decisions().empty());
    EXPECT_NE(b.decisions().back().reason.find("CPU quota sustains: rank 1 at 200.0"),
              std::string::npos)
        << b.decisions().back().reason;
    seen[static_cast<size_t>(r)] = b.shares();

    quota = 0;  // lifted: read at the next exchange
    steps(40);
    EXPECT_FALSE(b.workers()[1].quota_bound);
    EXPECT_EQ(b.workers()[1].quota_rate, 0);
    EXPECT_NEAR(static_cast<double>(b.shares()[1]), 64, 2) << b.shares()[1];
  });
  EXPECT_EQ(seen[0], seen[1]);
}

// A worker that becomes 4x slower mid-run (a quota set), then fast again:
// its reported rate shows the new speed once the rate window (here 0.5 s of
// steps, at least 5 of them; a step's time is at least its compute and
// wait) holds only steps at that speed, and not before.
TEST(Balancer, RateFollowsAChangeOfSpeedWithinTheWindow) {
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(2, [&](int r) {
    // Steps of 40 ms at 64 samples (1600 samples/s).
    Balancer b(make_comm(r, 2, store), {.mode = Mode::None,
                                        .global_batch = 128,
                                        .exchange_every = 5,
                                        .warmup_steps = 0,
                                        .rate_window_seconds = 0.5});
    auto steps = [&](int count, double seconds) {
      for (int s = 0; s < count; ++s) b.end_step({.compute_seconds = seconds, .samples = 64});
    };
    steps(40, 0.04);
    EXPECT_NEAR(b.workers()[1].rate, 1600, 1);
    // Slower: 5 steps of 160 ms are 0.8 s, the whole window.
    steps(5, r == 1 ? 0.16 : 0.04);
    EXPECT_NEAR(b.workers()[1].rate, 400, 1);
    EXPECT_NEAR(b.workers()[0].rate, 1600, 1);
    // Faster again: after 5 fast steps (0.2 s) the window still holds two
    // slow ones (0.32 s); after 15 (0.6 s), none.
    steps(5, 0.04);
    EXPECT_NEAR(b.workers()[1].rate, 7 * 64 / (5 * 0.04 + 2 * 0.16), 1);
    steps(10, 0.04);
    EXPECT_NEAR(b.workers()[1].rate, 1600, 1);
  });
}

// A worker with a small share computes for a small part of each step. Its
// rate window holds the job's last 0.5 s of steps, the same steps as every
// other worker's, and not 0.5 s of its own compute, which would reach back
// over many exchanges: a speed-up shows in full at the first exchange whose
// window holds only fast steps.
TEST(Balancer, RateWindowOfASmallShareHoldsTheSameStepsAsTheOthers) {
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(2, [&](int r) {
    Balancer b(make_comm(r, 2, store), {.mode = Mode::None,
                                        .global_batch = 80,
                                        .exchange_every = 5,
                                        .warmup_steps = 0,
                                        .rate_window_seconds = 0.5});
    // Steps of 110 ms: rank 0 computes 64 samples all the while; rank 1
    // computes 16, in 80 ms (200 samples/s), then in 20 ms (800 samples/s),
    // and waits for rank 0 in the rest of the step.
    auto steps = [&](int count, double rank1_compute) {
      for (int s = 0; s < count; ++s) {
        if (r == 0) {
          b.end_step({.compute_seconds = 0.11, .wait_seconds = 0, .samples = 64});
        } else {
          b.end_step({.compute_seconds = rank1_compute,
                      .wait_seconds = 0.11 - rank1_compute,
                      .samples = 16});
        }
      }
    };
    steps(40, 0.08);
    EXPECT_NEAR(b.workers()[1].rate, 200, 1);
    // 5 fast steps are 0.55 s of the job: the whole window. (A window of
    // 0.5 s of rank 1's own compute would still hold 5 slow steps: 320.)
    steps(5, 0.02);
    EXPECT_NEAR(b.workers()[1].rate, 800, 1);
    EXPECT_NEAR(b.workers()[0].rate, 64 / 0.11, 1);
  });
}

}  // namespace
}  // namespace weft::balance
