// The shard queue (weft/shard_queue.h): every sample exactly once per epoch
// under random and changing shares, released workers, abandoned steps,
// resizes; the committed state's round trip and its refusal of bad bytes;
// bad arguments; determinism; and a literal model of the documented rules
// run side by side with the queue.
#include "weft/shard_queue.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "testing/expect_error.h"
#include "weft/data.h"
#include "weft/errors.h"

namespace weft::data {
namespace {

using HandOut = std::vector<std::vector<int64_t>>;

using testing::expect_error;

std::vector<int64_t> permutation_of(int64_t n, const ShardQueueOptions& o, int64_t epoch) {
  if (o.shuffle) return shuffled_indices(n, o.seed, epoch);
  std::vector<int64_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), int64_t{0});
  return p;
}

// Counts how often each sample is trained in an epoch, and checks the
// queue's own accounting against it after every operation.
class Ledger {
 public:
  Ledger(int64_t n, const ShardQueueOptions& o, int64_t epoch)
      : shard_samples_(o.shard_samples), count_(static_cast<size_t>(n), 0), shard_of_(n) {
    const auto perm = permutation_of(n, o, epoch);
    for (int64_t pos = 0; pos < n; ++pos) {
      shard_of_[static_cast<size_t>(perm[static_cast<size_t>(pos)])] = pos / o.shard_samples;
    }
  }

  void trained(const HandOut& out) {
    for (const auto& samples : out) {
      for (int64_t i : samples) {
        ASSERT_GE(i, 0);
        ASSERT_LT(i, static_cast<int64_t>(count_.size()));
        ++count_[static_cast<size_t>(i)];
        ++total_;
      }
    }
  }

  // Done shards (every sample trained) as the ledger sees them.
  int64_t shards_done() const {
    const int64_t n = static_cast<int64_t>(count_.size());
    const int64_t shards = (n + shard_samples_ - 1) / shard_samples_;
    std::vector<int64_t> trained(static_cast<size_t>(shards), 0);
    for (size_t i = 0; i < count_.size(); ++i) {
      if (count_[i] > 0) ++trained[static_cast<size_t>(shard_of_[i])];
    }
    int64_t done = 0;
    for (int64_t s = 0; s < shards; ++s) {
      if (trained[static_cast<size_t>(s)] == std::min(shard_samples_, n - s * shard_samples_)) {
        ++done;
      }
    }
    return done;
  }

  void expect_consistent(const ShardQueue& q) const {
    EXPECT_EQ(q.trained(), total_);
    EXPECT_EQ(q.remaining(), q.num_samples() - total_);
    int64_t held = q.todo_size();
    for (int w = 0; w < q.workers(); ++w) held += q.pool_size(w);
    if (!q.step_open()) {
      EXPECT_EQ(held, q.remaining());
    }
    const auto c = q.counts();
    EXPECT_EQ(c.todo + c.doing + c.done, q.num_shards());
    EXPECT_GE(c.todo, 0);
    EXPECT_GE(c.doing, 0);
    EXPECT_EQ(c.done, shards_done());
    EXPECT_EQ(q.epoch_done(), total_ == q.num_samples());
  }

  void expect_each_once() const {
    for (size_t i = 0; i < count_.size(); ++i) {
      ASSERT_EQ(count_[i], 1) << "sample " << i << " trained " << count_[i] << " times";
    }
  }
  bool never_twice() const {
    return std::all_of(count_.begin(), count_.end(), [](int c) { return c <= 1; });
  }

 private:
  int64_t shard_samples_;
  std::vector<int> count_;
  std::vector<int64_t> shard_of_;
  int64_t total_ = 0;
};

int64_t total(const HandOut& out) {
  int64_t n = 0;
  for (const auto& s : out) n += static_cast<int64_t>(s.size());
  return n;
}

// Runs steps until the epoch is done (wants from `next_want`), checking the
// ledger after each; fails at the first inconsistency, or when 50 steps in a
// row that want samples get none (a stalled queue).
void run_to_end(ShardQueue& q, Ledger& ledger,
                const std::function<std::vector<int64_t>()>& next_want) {
  int idle = 0;
  while (!q.epoch_done()) {
    const auto want = next_want();
    const HandOut out = q.take_step(want);
    ASSERT_EQ(out.size(), want.size());
    bool short_take = false;
    for (size_t w = 0; w < want.size(); ++w) {
      ASSERT_LE(static_cast<int64_t>(out[w].size()), want[w]);
      short_take = short_take || static_cast<int64_t>(out[w].size()) < want[w];
    }
    q.complete_step();
    // Tail sharing: a worker gets less than it wants only when nothing is
    // left, so a short take ends the epoch.
    if (short_take) {
      ASSERT_TRUE(q.epoch_done()) << "a short take with " << q.remaining() << " samples left";
    }
    ledger.trained(out);
    ASSERT_TRUE(ledger.never_twice());
    ledger.expect_consistent(q);
    ASSERT_FALSE(::testing::Test::HasFailure());
    const bool wanted = std::any_of(want.begin(), want.end(), [](int64_t x) { return x > 0; });
    if (total(out) > 0) {
      idle = 0;
    } else if (wanted) {
      ++idle;
    }
    ASSERT_LT(idle, 50) << "the queue stalls with " << q.remaining() << " samples left";
  }
  ledger.expect_each_once();
}

TEST(ShardQueue, EverySampleOnceUnderRandomWants) {
  std::mt19937_64 rng(1234);
  for (int64_t n : {0, 1, 63, 64, 65, 1000, 1237}) {
    for (int64_t s : {1, 7, 64, 1000}) {
      for (int w : {1, 3, 5}) {
        const ShardQueueOptions o{.shard_samples = s, .seed = rng(), .shuffle = (n % 2) == 1};
        ShardQueue q(n, w, o);
        EXPECT_EQ(q.num_shards(), (n + s - 1) / s);
        for (int64_t epoch : {0, 1}) {
          SCOPED_TRACE(::testing::Message()
                       << "n=" << n << " s=" << s << " w=" << w << " epoch=" << epoch);
          q.start_epoch(epoch);
          Ledger ledger(n, o, epoch);
          ledger.expect_consistent(q);
          EXPECT_EQ(q.counts().todo, q.num_shards());
          run_to_end(q, ledger, [&] {
            std::vector<int64_t> want(static_cast<size_t>(w));
            for (auto& x : want) {
              const auto r = rng() % 10;
              // Zero, small, a shard or two, and far more than is left.
              x = r < 2 ? 0 : r < 8 ? static_cast<int64_t>(rng() % (2 * s + 1)) : n + 5;
            }
            return want;
          });
          EXPECT_EQ(q.counts(), (ShardQueue::Counts{0, 0, q.num_shards()}));
          // After the end every step is empty.
          const HandOut empty = q.take_step(std::vector<int64_t>(static_cast<size_t>(w), 10));
          EXPECT_EQ(total(empty), 0);
          q.complete_step();
        }
      }
    }
  }
}

TEST(ShardQueue, PinnedHandOut) {
  // shuffled_indices(10, 42, 3) is {3, 8, 0, 4, 6, 9, 5, 1, 7, 2} (pinned in
  // sampler_test.cc); shards of 3 positions: {3,8,0} {4,6,9} {5,1,7} {2}.
  ShardQueue q(10, 2, {.shard_samples = 3, .seed = 42});
  q.start_epoch(3);
  // Worker 0 gets shard 0 and takes 2; worker 1 needs shards 1 and 2 for 4.
  EXPECT_EQ(q.take_step({2, 4}), (HandOut{{3, 8}, {4, 6, 9, 5}}));
  EXPECT_EQ(q.counts(), (ShardQueue::Counts{1, 3, 0}));
  q.complete_step();
  EXPECT_EQ(q.pool_size(0), 1);
  EXPECT_EQ(q.pool_size(1), 2);
  EXPECT_EQ(q.counts(), (ShardQueue::Counts{1, 2, 1}));
  // Worker 0's pool (position 2, sample 0) is short: the last shard
  // (position 9, sample 2) joins it; todo is then empty and worker 0 is still
  // short, so it takes worker 1's surplus (pool 2 less want 1): the back of
  // worker 1's pool, position 8 (sample 7). Worker 1 takes position 7.
  EXPECT_EQ(q.take_step({5, 1}), (HandOut{{0, 2, 7}, {1}}));
  EXPECT_EQ(q.pool_size(0), 0);
  EXPECT_EQ(q.pool_size(1), 0);
  q.complete_step();
  EXPECT_TRUE(q.epoch_done());
  EXPECT_EQ(q.counts(), (ShardQueue::Counts{0, 0, 4}));
  EXPECT_EQ(q.take_step({0, 7}), (HandOut{{}, {}}));
  q.complete_step();
}

// Tail sharing: a worker with a small share holds a whole shard it would
// drain for 16 steps; once todo is empty the others take its surplus, so no
// worker that wants samples gets fewer while another holds a surplus, and
// the epoch takes ceil(N / sum of wants) steps, not a slow tail more.
TEST(ShardQueue, TailIsSharedWithTheFastWorkers) {
  const ShardQueueOptions o{.shard_samples = 64, .seed = 17};
  for (int64_t n : {5000, 4999, 2560, 130, 3}) {
    ShardQueue q(n, 3, o);
    for (int64_t epoch : {0, 1}) {
      SCOPED_TRACE(::testing::Message() << "n=" << n << " epoch=" << epoch);
      q.start_epoch(epoch);
      Ledger ledger(n, o, epoch);
      const std::vector<int64_t> want{60, 60, 4};
      int64_t steps = 0;
      while (!q.epoch_done()) {
        ASSERT_LT(steps, n);
        const HandOut out = q.take_step(want);
        ++steps;
        for (size_t w = 0; w < want.size(); ++w) {
          if (static_cast<int64_t>(out[w].size()) == want[w]) continue;
          // Short: nothing is left anywhere (the pools hold what their
          // workers do not take in this step, their surplus).
          EXPECT_EQ(q.todo_size(), 0) << "worker " << w;
          for (int v = 0; v < 3; ++v) {
            EXPECT_EQ(q.pool_size(v), 0) << "worker " << w << " got " << out[w].size()
                                         << " while worker " << v << " holds a surplus";
          }
        }
        q.complete_step();
        ledger.trained(out);
        ASSERT_TRUE(ledger.never_twice());
        ledger.expect_consistent(q);
        ASSERT_FALSE(::testing::Test::HasFailure());
      }
      EXPECT_EQ(steps, (n + 123) / 124);
      ledger.expect_each_once();
    }
  }

  // A worker whose share drops to 0 with a pool: once todo is empty the
  // others train its pool.
  ShardQueue q(1000, 3, o);
  q.start_epoch(0);
  Ledger ledger(1000, o, 0);
  for (int step = 0; step < 5; ++step) {
    const HandOut out = q.take_step({60, 60, 4});
    q.complete_step();
    ledger.trained(out);
  }
  EXPECT_EQ(q.pool_size(2), 44);
  int64_t steps = 0;
  run_to_end(q, ledger, [&] {
    ++steps;
    return std::vector<int64_t>{60, 60, 0};
  });
  EXPECT_EQ(steps, 4);  // ceil((1000 - 5 * 124) / 120)
}

TEST(ShardQueue, EmptyDatasetAndBeforeTheFirstEpoch) {
  ShardQueue q(0, 2);
  EXPECT_EQ(q.epoch(), -1);
  EXPECT_FALSE(q.epoch_done());
  EXPECT_EQ(q.remaining(), 0);
  EXPECT_EQ(q.counts(), ShardQueue::Counts{});
  expect_error<InvalidArgument>([&] { q.take_step({1, 1}); }, {"no epoch started"});
  q.start_epoch(0);
  EXPECT_TRUE(q.epoch_done());
  EXPECT_EQ(q.take_step({5, 5}), (HandOut{{}, {}}));
  q.complete_step();
}

// A worker released mid-epoch with a non-empty pool: the rest of its shard
// goes to the front of todo and the next worker that runs short gets it.
TEST(ShardQueue, ReleasedWorkersSamplesAreHandedOutAgain) {
  const ShardQueueOptions o{.shard_samples = 50, .shuffle = false};
  ShardQueue q(1000, 4, o);
  q.start_epoch(0);
  Ledger ledger(1000, o, 0);
  HandOut out = q.take_step({30, 30, 30, 30});
  auto range = [](int64_t b, int64_t e) {
    std::vector<int64_t> v(static_cast<size_t>(e - b));
    std::iota(v.begin(), v.end(), b);
    return v;
  };
  ASSERT_EQ(out, (HandOut{range(0, 30), range(50, 80), range(100, 130), range(150, 180)}));
  q.complete_step();
  ledger.trained(out);
  EXPECT_EQ(q.pool_size(2), 20);
  const int64_t todo_before = q.todo_size();
  q.release(2);
  EXPECT_TRUE(q.released(2));
  EXPECT_EQ(q.pool_size(2), 0);
  EXPECT_EQ(q.todo_size(), todo_before + 20);
  ledger.expect_consistent(q);
  // Shard 2 is partly done and nobody holds the rest: todo again.
  EXPECT_EQ(q.counts(), (ShardQueue::Counts{17, 3, 0}));

  out = q.take_step({30, 30, 0, 30});
  std::vector<int64_t> w0 = range(30, 50);
  for (int64_t i : range(130, 140)) w0.push_back(i);
  std::vector<int64_t> w1 = range(80, 100);
  for (int64_t i : range(200, 210)) w1.push_back(i);
  std::vector<int64_t> w3 = range(180, 200);
  for (int64_t i : range(250, 260)) w3.push_back(i);
  EXPECT_EQ(out, (HandOut{w0, w1, {}, w3}));
  q.complete_step();
  ledger.trained(out);
  ledger.expect_consistent(q);
  expect_error<InvalidArgument>(
      [&] {
        q.take_step({1, 1, 1, 1});
      },
      {"worker 2", "released", "must be 0"});
  EXPECT_FALSE(q.step_open());
  std::mt19937_64 rng(7);
  run_to_end(q, ledger, [&] {
    return std::vector<int64_t>{static_cast<int64_t>(rng() % 40), static_cast<int64_t>(rng() % 40),
                                0, 1 + static_cast<int64_t>(rng() % 40)};
  });
}

// Releases at random points of random epochs: every sample still once.
TEST(ShardQueue, RandomReleasesKeepExactlyOnce) {
  std::mt19937_64 rng(99);
  for (int round = 0; round < 40; ++round) {
    const int w = 2 + static_cast<int>(rng() % 5);
    const int64_t n = 1 + static_cast<int64_t>(rng() % 3000);
    const ShardQueueOptions o{.shard_samples = 1 + static_cast<int64_t>(rng() % 100),
                              .seed = rng()};
    ShardQueue q(n, w, o);
    q.start_epoch(round);
    Ledger ledger(n, o, round);
    std::vector<bool> gone(static_cast<size_t>(w), false);
    int live = w;
    for (int step = 0; !q.epoch_done(); ++step) {
      // Every live worker wants >= 1 and released pools are empty: each step
      // trains at least one sample.
      ASSERT_LT(step, 5000);
      ASSERT_FALSE(::testing::Test::HasFailure());
      if (live > 1 && rng() % 8 == 0) {
        const int victim = static_cast<int>(rng() % static_cast<uint64_t>(w));
        if (!gone[static_cast<size_t>(victim)]) {
          q.release(victim);
          gone[static_cast<size_t>(victim)] = true;
          --live;
        }
      } else if (live < w && rng() % 16 == 0) {
        for (int v = 0; v < w; ++v) {
          if (gone[static_cast<size_t>(v)]) {
            q.rejoin(v);
            gone[static_cast<size_t>(v)] = false;
            ++live;
            break;
          }
        }
      }
      ledger.expect_consistent(q);
      std::vector<int64_t> want(static_cast<size_t>(w));
      for (int v = 0; v < w; ++v) {
        want[static_cast<size_t>(v)] =
            gone[static_cast<size_t>(v)] ? 0 : 1 + static_cast<int64_t>(rng() % 50);
      }
      const HandOut out = q.take_step(want);
      q.complete_step();
      ledger.trained(out);
      ASSERT_TRUE(ledger.never_twice());
    }
    ledger.expect_each_once();
  }
}

TEST(ShardQueue, AbandonedStepIsRetakenIdentically) {
  const ShardQueueOptions o{.shard_samples = 16, .seed = 5};
  ShardQueue q(500, 3, o);
  q.start_epoch(2);
  Ledger ledger(500, o, 2);
  std::mt19937_64 rng(3);
  for (int step = 0; !q.epoch_done(); ++step) {
    ASSERT_LT(step, 10000);
    ASSERT_FALSE(::testing::Test::HasFailure());
    std::vector<int64_t> want(3);
    for (auto& x : want) x = static_cast<int64_t>(rng() % 40);
    const HandOut first = q.take_step(want);
    const auto counts = q.counts();
    EXPECT_TRUE(q.step_open());
    if (rng() % 3 == 0) {
      q.abandon_step();
      EXPECT_FALSE(q.step_open());
      ledger.expect_consistent(q);
      // The same wants again: the same samples, the same shard states.
      const HandOut again = q.take_step(want);
      ASSERT_EQ(again, first);
      EXPECT_EQ(q.counts(), counts);
      if (rng() % 2 == 0) {
        // Abandoned again, then other wants: nothing lost or repeated.
        q.abandon_step();
        for (auto& x : want) x = static_cast<int64_t>(rng() % 40);
        const HandOut other = q.take_step(want);
        q.complete_step();
        ledger.trained(other);
        ASSERT_TRUE(ledger.never_twice());
        ledger.expect_consistent(q);
        continue;
      }
    }
    q.complete_step();
    ledger.trained(first);
    ASSERT_TRUE(ledger.never_twice());
    ledger.expect_consistent(q);
  }
  ledger.expect_each_once();
}

// A peer dies inside a step's allreduce: the step is abandoned on every
// survivor, the dead worker released, the step retaken without it.
TEST(ShardQueue, PeerDiesMidStep) {
  const ShardQueueOptions o{.shard_samples = 10, .shuffle = false};
  ShardQueue q(100, 3, o);
  q.start_epoch(0);
  Ledger ledger(100, o, 0);
  const HandOut lost = q.take_step({4, 4, 4});
  EXPECT_EQ(lost[1], (std::vector<int64_t>{10, 11, 12, 13}));
  expect_error<InvalidArgument>([&] { q.release(1); }, {"release", "step is open"});
  q.abandon_step();
  q.release(1);
  // Worker 1's shard [10, 20) went back to the front of todo: worker 0's pool
  // (its own shard) is short of 14, so it gets it next.
  const HandOut out = q.take_step({14, 0, 4});
  EXPECT_EQ(out[0], (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13}));
  EXPECT_EQ(out[2], (std::vector<int64_t>{20, 21, 22, 23}));
  q.complete_step();
  ledger.trained(out);
  run_to_end(q, ledger, [] { return std::vector<int64_t>{3, 0, 5}; });
}

// The balancer's shares change every step (a global batch of 96 split
// differently each time): no sample is ever handed out twice.
TEST(ShardQueue, NoSampleTwiceAcrossReplans) {
  std::mt19937_64 rng(2026);
  for (int64_t s : {1, 8, 32, 200}) {
    const ShardQueueOptions o{.shard_samples = s, .seed = 11};
    ShardQueue q(5000, 4, o);
    for (int64_t epoch = 0; epoch < 3; ++epoch) {
      q.start_epoch(epoch);
      Ledger ledger(5000, o, epoch);
      run_to_end(q, ledger, [&] {
        // Random shares with a floor of 1, summing to 96.
        std::vector<int64_t> want(4, 1);
        for (int k = 0; k < 92; ++k) ++want[rng() % 4];
        return want;
      });
    }
  }
}

TEST(ShardQueue, ResizeAndRejoin) {
  const ShardQueueOptions o{.shard_samples = 8, .seed = 1};
  ShardQueue q(400, 3, o);
  q.start_epoch(0);
  Ledger ledger(400, o, 0);
  auto step = [&](std::vector<int64_t> want) {
    const HandOut out = q.take_step(want);
    q.complete_step();
    ledger.trained(out);
    ledger.expect_consistent(q);
    return out;
  };
  step({5, 5, 5});
  expect_error<InvalidArgument>([&] { q.resize(1); }, {"worker(s) 1, 2", "released first"});
  q.release(2);
  expect_error<InvalidArgument>([&] { q.resize(1); }, {"worker(s) 1 ", "released first"});
  q.resize(2);
  EXPECT_EQ(q.workers(), 2);
  expect_error<InvalidArgument>([&] { q.take_step({1, 1, 1}); }, {"3 wants for 2 workers"});
  step({5, 5});
  // Worker 1 leaves and comes back.
  q.release(1);
  expect_error<InvalidArgument>([&] { q.take_step({1, 1}); }, {"worker 1", "released"});
  step({6, 0});
  q.rejoin(1);
  EXPECT_FALSE(q.released(1));
  const HandOut back = step({6, 6});
  EXPECT_EQ(back[1].size(), 6u);
  // Growing: the new workers start empty and get work.
  q.resize(4);
  EXPECT_EQ(q.pool_size(2), 0);
  EXPECT_EQ(q.pool_size(3), 0);
  EXPECT_FALSE(q.released(3));
  const HandOut grown = step({1, 1, 1, 9});
  EXPECT_EQ(grown[3].size(), 9u);
  EXPECT_GT(q.pool_size(3), 0);
  // Shrinking from 4 to 3 with worker 3's pool non-empty: released first,
  // its samples go to the others.
  q.release(3);
  q.resize(3);
  std::mt19937_64 rng(8);
  run_to_end(q, ledger, [&] {
    return std::vector<int64_t>{static_cast<int64_t>(rng() % 9),
                                1 + static_cast<int64_t>(rng() % 9),
                                static_cast<int64_t>(rng() % 9)};
  });
  expect_error<InvalidArgument>([&] { q.resize(0); }, {"0 workers out of range"});
}

// Elastic generations: 3 workers, then 2 (one died mid-step), then 4 (two
// joined). Every pool goes back to todo at each change; the ledger sees
// every sample trained exactly once.
TEST(ShardQueue, RegroupAcrossGenerations) {
  const ShardQueueOptions o{.shard_samples = 16, .seed = 5};
  ShardQueue q(700, 3, o);
  q.start_epoch(0);
  Ledger ledger(700, o, 0);
  auto step = [&](std::vector<int64_t> want) {
    const HandOut out = q.take_step(want);
    q.complete_step();
    ledger.trained(out);
    ledger.expect_consistent(q);
  };
  step({7, 7, 7});
  step({7, 7, 7});
  q.take_step({7, 7, 7});
  expect_error<InvalidArgument>([&] { q.regroup(2); }, {"regroup", "step is open"});
  q.abandon_step();
  q.regroup(2);
  EXPECT_EQ(q.workers(), 2);
  EXPECT_EQ(q.pool_size(0), 0);
  EXPECT_EQ(q.pool_size(1), 0);
  EXPECT_EQ(q.todo_size(), 700 - 42);
  step({10, 11});
  q.regroup(4);
  EXPECT_EQ(q.workers(), 4);
  for (int w = 0; w < 4; ++w) EXPECT_FALSE(q.released(w));
  run_to_end(q, ledger, [] { return std::vector<int64_t>{5, 5, 5, 6}; });
  expect_error<InvalidArgument>([&] { q.regroup(0); }, {"0 workers"});
}

TEST(ShardQueue, BadArguments) {
  expect_error<InvalidArgument>([] { ShardQueue(-1, 1); }, {"num_samples -1"});
  expect_error<InvalidArgument>([] { ShardQueue(10, 0); }, {"workers 0"});
  expect_error<InvalidArgument>([] { ShardQueue(10, 2, {.shard_samples = 0}); },
                                {"shard_samples 0"});
  expect_error<InvalidArgument>([] { ShardQueue(ShardQueue::kMaxSamples + 1, 2); },
                                {"num_samples"});
  ShardQueue q(100, 2);
  expect_error<InvalidArgument>([&] { q.start_epoch(-1); }, {"epoch -1 is negative"});
  q.start_epoch(0);
  expect_error<InvalidArgument>([&] { q.take_step({1, -3}); }, {"want -3 of worker 1 is negative"});
  expect_error<InvalidArgument>([&] { q.take_step({1}); }, {"1 wants for 2 workers"});
  expect_error<InvalidArgument>([&] { q.complete_step(); }, {"complete_step", "no step is open"});
  expect_error<InvalidArgument>([&] { q.abandon_step(); }, {"abandon_step", "no step is open"});
  // A refused step changed nothing.
  EXPECT_FALSE(q.step_open());
  EXPECT_EQ(q.remaining(), 100);
  EXPECT_EQ(q.todo_size(), 100);
  q.take_step({1, 1});
  expect_error<InvalidArgument>([&] { q.take_step({1, 1}); }, {"take_step", "a step is open"});
  expect_error<InvalidArgument>([&] { q.start_epoch(1); }, {"start_epoch", "a step is open"});
  expect_error<InvalidArgument>([&] { (void)q.serialize(); }, {"serialize", "a step is open"});
  expect_error<InvalidArgument>([&] { q.resize(3); }, {"resize", "a step is open"});
  q.complete_step();
  expect_error<InvalidArgument>([&] { q.release(2); }, {"worker 2 out of range [0, 2)"});
  expect_error<InvalidArgument>([&] { q.release(-1); }, {"worker -1 out of range"});
  expect_error<InvalidArgument>([&] { q.rejoin(0); }, {"worker 0 is not released"});
  expect_error<InvalidArgument>([&] { (void)q.pool_size(5); }, {"pool_size", "worker 5"});
  q.release(0);
  expect_error<InvalidArgument>([&] { q.release(0); }, {"worker 0 is already released"});
}

// The same operations on two replicas give the same hand-outs and states.
TEST(ShardQueue, Deterministic) {
  const ShardQueueOptions o{.shard_samples = 13, .seed = 77};
  ShardQueue a(2000, 5, o);
  ShardQueue b(2000, 5, o);
  std::mt19937_64 rng(4);
  for (int64_t epoch = 0; epoch < 2; ++epoch) {
    a.start_epoch(epoch);
    b.start_epoch(epoch);
    for (int step = 0; !a.epoch_done(); ++step) {
      ASSERT_LT(step, 2000);  // every want >= 1: at least 5 samples a step
      std::vector<int64_t> want(5);
      for (auto& x : want) x = 1 + static_cast<int64_t>(rng() % 30);
      ASSERT_EQ(a.take_step(want), b.take_step(want));
      a.complete_step();
      b.complete_step();
      ASSERT_EQ(a.serialize(), b.serialize());
    }
    EXPECT_TRUE(b.epoch_done());
  }
}

// ---------------------------------------------------------------------------
// The committed state
// ---------------------------------------------------------------------------

// FNV-1a 64, as the format documents, to forge states with a valid checksum.
uint64_t fnv1a(const std::string& bytes, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) {
    h ^= static_cast<uint8_t>(bytes[i]);
    h *= 0x100000001b3ull;
  }
  return h;
}

void put_le(std::string& bytes, size_t at, uint64_t v, int width) {
  for (int i = 0; i < width; ++i)
    bytes[at + static_cast<size_t>(i)] = static_cast<char>(v >> (8 * i));
}

// Rewrites the checksum after an edit.
void reseal(std::string& bytes) {
  put_le(bytes, bytes.size() - 8, fnv1a(bytes, bytes.size() - 8), 8);
}

// Offsets of the layout documented in weft/shard_queue.h.
constexpr size_t kVersionAt = 4, kShardSamplesAt = 8, kShuffleAt = 24, kNumSamplesAt = 25,
                 kWorkersAt = 33, kEpochAt = 37, kReleasedAt = 45;

// A queue in the middle of an epoch, with a released worker, partial pools
// and a partly done shard back in todo.
ShardQueue mid_epoch_queue() {
  ShardQueue q(300, 3, {.shard_samples = 16, .seed = 9});
  q.start_epoch(4);
  q.take_step({20, 7, 3});
  q.complete_step();
  q.take_step({5, 20, 1});
  q.complete_step();
  q.release(1);
  return q;
}

TEST(ShardQueueState, RoundTripGivesIdenticalHandOuts) {
  std::mt19937_64 rng(55);
  ShardQueue a = mid_epoch_queue();
  const std::string bytes = a.serialize();
  ShardQueue b = ShardQueue::deserialize(bytes);
  EXPECT_EQ(b.serialize(), bytes);
  EXPECT_EQ(b.workers(), 3);
  EXPECT_EQ(b.epoch(), 4);
  EXPECT_EQ(b.num_samples(), 300);
  EXPECT_EQ(b.options().seed, 9u);
  EXPECT_TRUE(b.released(1));
  EXPECT_EQ(b.trained(), a.trained());
  EXPECT_EQ(b.counts(), a.counts());
  EXPECT_EQ(b.todo_size(), a.todo_size());
  for (int w = 0; w < 3; ++w) EXPECT_EQ(b.pool_size(w), a.pool_size(w));
  // Side by side to the end of this epoch and through the next, with a
  // round trip of b every few steps.
  for (int epoch = 0; epoch < 2; ++epoch) {
    for (int step = 0; !a.epoch_done(); ++step) {
      ASSERT_LT(step, 10000);
      const std::vector<int64_t> want{static_cast<int64_t>(rng() % 25), 0,
                                      static_cast<int64_t>(rng() % 25)};
      ASSERT_EQ(a.take_step(want), b.take_step(want));
      if (rng() % 4 == 0) {
        a.abandon_step();
        b.abandon_step();
      } else {
        a.complete_step();
        b.complete_step();
      }
      if (rng() % 3 == 0) b = ShardQueue::deserialize(b.serialize());
      ASSERT_EQ(a.counts(), b.counts());
    }
    EXPECT_TRUE(b.epoch_done());
    a.start_epoch(5);
    b.start_epoch(5);
  }
  // Before the first epoch, too.
  ShardQueue fresh(10, 2, {.shard_samples = 4, .seed = 1, .shuffle = false});
  ShardQueue copy = ShardQueue::deserialize(fresh.serialize());
  EXPECT_EQ(copy.epoch(), -1);
  EXPECT_FALSE(copy.options().shuffle);
  EXPECT_EQ(copy.serialize(), fresh.serialize());
}

TEST(ShardQueueState, EveryTruncationAndEveryFlippedByteIsRefused) {
  const std::string bytes = mid_epoch_queue().serialize();
  ASSERT_GT(bytes.size(), 100u);
  for (size_t len = 0; len < bytes.size(); ++len) {
    try {
      (void)ShardQueue::deserialize(std::string_view(bytes).substr(0, len));
      ADD_FAILURE() << "a state truncated to " << len << " bytes was accepted";
    } catch (const DataError& e) {
      EXPECT_NE(std::string(e.what()).find("shard queue state: "), std::string::npos) << e.what();
    }
  }
  expect_error<DataError>([&] { (void)ShardQueue::deserialize(bytes.substr(0, 120)); },
                          {"truncated at byte 120"});
  expect_error<DataError>([&] { (void)ShardQueue::deserialize(bytes + "x"); },
                          {"1 bytes of trailing data"});
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (uint8_t mask : {uint8_t{0x01}, uint8_t{0x80}, uint8_t{0xff}}) {
      std::string bad = bytes;
      bad[i] = static_cast<char>(static_cast<uint8_t>(bad[i]) ^ mask);
      EXPECT_THROW((void)ShardQueue::deserialize(bad), DataError) << "byte " << i;
    }
  }
}

TEST(ShardQueueState, ForgedStatesAreRefusedBeforeAllocating) {
  const ShardQueue q = mid_epoch_queue();
  const std::string good = q.serialize();
  ASSERT_NO_THROW((void)ShardQueue::deserialize(good));
  auto refused = [&](const std::function<void(std::string&)>& edit,
                     const std::vector<std::string>& parts) {
    std::string bad = good;
    edit(bad);
    reseal(bad);
    expect_error<DataError>([&] { (void)ShardQueue::deserialize(bad); }, parts);
  };
  const size_t todo_at = kReleasedAt + 3;
  refused([](std::string& b) { b[0] = 'X'; }, {"not a shard queue state"});
  refused([](std::string& b) { put_le(b, kVersionAt, 2, 4); }, {"format version 2"});
  refused([](std::string& b) { put_le(b, kShardSamplesAt, 0, 8); }, {"shard_samples 0"});
  refused([](std::string& b) { b[kShuffleAt] = 2; }, {"shuffle flag 2"});
  refused([](std::string& b) { put_le(b, kNumSamplesAt, uint64_t{1} << 62, 8); },
          {"num_samples 4611686018427387904 out of range"});
  refused([](std::string& b) { put_le(b, kNumSamplesAt, uint64_t(-5), 8); },
          {"num_samples -5 out of range"});
  refused([](std::string& b) { put_le(b, kWorkersAt, 0, 4); }, {"workers 0 out of range"});
  refused([](std::string& b) { put_le(b, kWorkersAt, 0x7fffffff, 4); },
          {"workers 2147483647 out of range"});
  // A plausible number of workers the bytes cannot hold.
  refused([](std::string& b) { put_le(b, kWorkersAt, 1 << 20, 4); }, {"truncated"});
  refused([](std::string& b) { put_le(b, kEpochAt, uint64_t(-2), 8); }, {"epoch -2"});
  refused([](std::string& b) { b[kReleasedAt] = 7; }, {"released flag of worker 0 is 7"});
  refused([&](std::string& b) { put_le(b, todo_at, uint64_t{1} << 60, 8); },
          {"pieces of the todo list out of range"});
  refused([&](std::string& b) { put_le(b, todo_at, 299, 8); },
          {"truncated at byte", "(reading 299 pieces of the todo list)"});
  // The first todo piece: an end past the samples, an empty range, a range
  // across two shards, then a piece that overlaps the second.
  refused([&](std::string& b) { put_le(b, todo_at + 16, 301, 8); },
          {"a piece of the todo list out of range"});
  refused([&](std::string& b) { put_le(b, todo_at + 16, 0, 8); },
          {"a piece of the todo list out of range"});
  {
    // Read the first two todo pieces to edit them meaningfully.
    auto get = [&](size_t at) {
      uint64_t v = 0;
      for (int i = 0; i < 8; ++i) v |= uint64_t{static_cast<uint8_t>(good[at + i])} << (8 * i);
      return static_cast<int64_t>(v);
    };
    const int64_t b0 = get(todo_at + 8), b1 = get(todo_at + 24), e1 = get(todo_at + 32);
    ASSERT_GE(b1, 0);
    ASSERT_LT(b1, e1);
    refused([&](std::string& b) { put_le(b, todo_at + 16, static_cast<uint64_t>(b0 + 17), 8); },
            {"within one shard"});
    // The first piece replaced by a copy of the second: an overlap.
    refused(
        [&](std::string& b) {
          put_le(b, todo_at + 8, static_cast<uint64_t>(b1), 8);
          put_le(b, todo_at + 16, static_cast<uint64_t>(e1), 8);
        },
        {"overlap"});
  }
  // The done counts are the last shards x 8 bytes before the checksum.
  const size_t last_done = good.size() - 16;
  refused([&](std::string& b) { put_le(b, last_done, 1000, 8); }, {"done count 1000"});
  refused([&](std::string& b) { put_le(b, last_done - 8, 5, 8); }, {"do not add up"});
  refused([&](std::string& b) { put_le(b, good.size() - 8 - 8 - 8 * 19, 3, 8); },
          {"3 done counts, expected 19"});
}

// A state of a few bytes claiming one huge shard (the permutation is
// recomputed, 8 bytes per sample), under a forged checksum: refused by the
// caller's bound on the samples before anything is allocated.
TEST(ShardQueueState, HugeSampleCountIsBoundedByTheCaller) {
  ShardQueue q(300, 2, {.shard_samples = 1 << 30, .seed = 9});
  q.start_epoch(0);
  q.take_step({100, 100});
  q.complete_step();
  const std::string good = q.serialize();
  EXPECT_EQ(ShardQueue::deserialize(good, 300).serialize(), good);
  std::string bad = good;
  put_le(bad, kNumSamplesAt, uint64_t{1} << 32, 8);
  // The single shard's done count, so that the ledger adds up.
  put_le(bad, bad.size() - 16, uint64_t{1} << 32, 8);
  reseal(bad);
  expect_error<DataError>([&] { (void)ShardQueue::deserialize(bad, 60000); },
                          {"num_samples 4294967296 is more than the 60000 expected"});
  expect_error<DataError>([&] { (void)ShardQueue::deserialize(good, 299); },
                          {"num_samples 300 is more than the 299 expected"});
}

// Each forged count is checked against the bytes left, so no forged state
// makes the reader allocate more than a small multiple of its input: every
// count below is huge and refused.
TEST(ShardQueueState, HugeCountsInEveryPoolAreRefused) {
  const std::string good = mid_epoch_queue().serialize();
  // Walk the layout to each pool's count.
  auto get = [&](size_t at) {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= uint64_t{static_cast<uint8_t>(good[at + i])} << (8 * i);
    return v;
  };
  size_t at = kReleasedAt + 3;
  std::vector<size_t> counts{at};
  at += 8 + 16 * get(at);
  for (int w = 0; w < 3; ++w) {
    counts.push_back(at);
    at += 8 + 16 * get(at);
  }
  EXPECT_EQ(get(at), 19u);  // the number of shards: 300 samples of 16
  for (size_t c : counts) {
    for (uint64_t huge : {uint64_t{1} << 40, ~uint64_t{0}, uint64_t{300}}) {
      std::string bad = good;
      put_le(bad, c, huge, 8);
      reseal(bad);
      EXPECT_THROW((void)ShardQueue::deserialize(bad), DataError) << "count at " << c;
    }
  }
}

// ---------------------------------------------------------------------------
// A literal model of the documented rules, run beside the queue
// ---------------------------------------------------------------------------

// Positions one by one: todo as pieces of positions, pools as flat lists. A
// released pool goes back as maximal runs of consecutive positions of one
// shard, merged with the front todo piece when it continues it.
class Model {
 public:
  Model(int64_t n, int w, ShardQueueOptions o)
      : n_(n),
        o_(o),
        pools_(static_cast<size_t>(w)),
        open_(static_cast<size_t>(w)),
        released_(static_cast<size_t>(w), false) {}

  void start_epoch(int64_t e) {
    perm_ = permutation_of(n_, o_, e);
    todo_.clear();
    for (int64_t b = 0; b < n_; b += o_.shard_samples) {
      std::vector<int64_t> piece;
      for (int64_t p = b; p < std::min(n_, b + o_.shard_samples); ++p) piece.push_back(p);
      todo_.push_back(piece);
    }
    for (auto& pool : pools_) pool.clear();
    done_.assign(static_cast<size_t>(n_), false);
  }

  HandOut take_step(const std::vector<int64_t>& want) {
    HandOut out(pools_.size());
    for (size_t w = 0; w < pools_.size(); ++w) {
      while (static_cast<int64_t>(pools_[w].size()) < want[w] && !todo_.empty()) {
        for (int64_t p : todo_.front()) pools_[w].push_back(p);
        todo_.pop_front();
      }
      // Tail sharing: the largest surplus among the others, recomputed from
      // its definition for every move.
      while (static_cast<int64_t>(pools_[w].size()) < want[w] && todo_.empty()) {
        size_t from = w;
        int64_t best = 0;
        for (size_t v = 0; v < pools_.size(); ++v) {
          const auto size = static_cast<int64_t>(pools_[v].size());
          const int64_t surplus = v < w ? size : size - want[v];
          if (v != w && surplus > best) {
            best = surplus;
            from = v;
          }
        }
        if (from == w) break;
        const int64_t k = std::min(best, want[w] - static_cast<int64_t>(pools_[w].size()));
        auto& src = pools_[from];
        const auto first = src.end() - static_cast<std::ptrdiff_t>(k);
        pools_[w].insert(pools_[w].end(), first, src.end());
        src.erase(first, src.end());
      }
      for (int64_t k = 0; k < want[w] && !pools_[w].empty(); ++k) {
        open_[w].push_back(pools_[w].front());
        out[w].push_back(perm_[static_cast<size_t>(pools_[w].front())]);
        pools_[w].pop_front();
      }
    }
    return out;
  }

  void complete_step() {
    for (auto& o : open_) {
      for (int64_t p : o) done_[static_cast<size_t>(p)] = true;
      o.clear();
    }
  }

  void abandon_step() {
    for (size_t w = 0; w < open_.size(); ++w) {
      pools_[w].insert(pools_[w].begin(), open_[w].begin(), open_[w].end());
      open_[w].clear();
    }
  }

  void release(int w) {
    auto& pool = pools_[static_cast<size_t>(w)];
    std::vector<std::vector<int64_t>> runs;
    for (int64_t p : pool) {
      if (!runs.empty() && runs.back().back() + 1 == p && shard(runs.back().back()) == shard(p)) {
        runs.back().push_back(p);
      } else {
        runs.push_back({p});
      }
    }
    for (auto it = runs.rbegin(); it != runs.rend(); ++it) {
      if (!todo_.empty() && it->back() + 1 == todo_.front().front() &&
          shard(it->back()) == shard(todo_.front().front())) {
        todo_.front().insert(todo_.front().begin(), it->begin(), it->end());
      } else {
        todo_.push_front(*it);
      }
    }
    pool.clear();
    released_[static_cast<size_t>(w)] = true;
  }
  void rejoin(int w) { released_[static_cast<size_t>(w)] = false; }
  void resize(int w) {
    pools_.resize(static_cast<size_t>(w));
    open_.resize(static_cast<size_t>(w));
    released_.resize(static_cast<size_t>(w), false);
  }
  bool released(int w) const { return released_[static_cast<size_t>(w)]; }
  int workers() const { return static_cast<int>(pools_.size()); }
  int64_t pool_size(int w) const {
    return static_cast<int64_t>(pools_[static_cast<size_t>(w)].size());
  }

  ShardQueue::Counts counts() const {
    ShardQueue::Counts c;
    for (int64_t b = 0; b < n_; b += o_.shard_samples) {
      bool all_done = true;
      for (int64_t p = b; p < std::min(n_, b + o_.shard_samples); ++p) {
        all_done = all_done && done_[static_cast<size_t>(p)];
      }
      bool active = false;
      for (size_t w = 0; w < pools_.size(); ++w) {
        for (int64_t p : pools_[w]) active = active || shard(p) == shard(b);
        for (int64_t p : open_[w]) active = active || shard(p) == shard(b);
      }
      ++(all_done ? c.done : active ? c.doing : c.todo);
    }
    return c;
  }

 private:
  int64_t shard(int64_t p) const { return p / o_.shard_samples; }

  int64_t n_;
  ShardQueueOptions o_;
  std::vector<int64_t> perm_;
  std::deque<std::vector<int64_t>> todo_;
  std::vector<std::deque<int64_t>> pools_;
  std::vector<std::vector<int64_t>> open_;
  std::vector<bool> released_;
  std::vector<bool> done_;
};

TEST(ShardQueue, MatchesALiteralModelOfTheRules) {
  std::mt19937_64 rng(31337);
  for (int round = 0; round < 60; ++round) {
    const int64_t n = static_cast<int64_t>(rng() % 400);
    int w = 1 + static_cast<int>(rng() % 4);
    const ShardQueueOptions o{.shard_samples = 1 + static_cast<int64_t>(rng() % 40),
                              .seed = rng(),
                              .shuffle = rng() % 2 == 0};
    ShardQueue q(n, w, o);
    Model m(n, w, o);
    for (int64_t epoch = 0; epoch < 2; ++epoch) {
      q.start_epoch(epoch);
      m.start_epoch(epoch);
      for (int op = 0; op < 300; ++op) {
        SCOPED_TRACE(::testing::Message()
                     << "round " << round << " epoch " << epoch << " op " << op);
        const auto r = rng() % 20;
        if (r == 0) {
          const int v = static_cast<int>(rng() % static_cast<uint64_t>(w));
          if (!m.released(v)) {
            q.release(v);
            m.release(v);
          } else {
            q.rejoin(v);
            m.rejoin(v);
          }
        } else if (r == 1) {
          // Grow by one, or shrink past the released workers at the end.
          int to = w + 1;
          if (rng() % 2 == 0) {
            to = w;
            while (to > 1 && m.released(to - 1)) --to;
          }
          if (to <= 6) {
            q.resize(to);
            m.resize(to);
            w = to;
          }
        } else if (r == 2) {
          q = ShardQueue::deserialize(q.serialize());
        } else {
          std::vector<int64_t> want(static_cast<size_t>(w));
          for (int v = 0; v < w; ++v) {
            want[static_cast<size_t>(v)] =
                m.released(v) ? 0 : static_cast<int64_t>(rng() % (2 * o.shard_samples + 3));
          }
          ASSERT_EQ(q.take_step(want), m.take_step(want));
          ASSERT_EQ(q.counts(), m.counts());
          if (rng() % 4 == 0) {
            q.abandon_step();
            m.abandon_step();
          } else {
            q.complete_step();
            m.complete_step();
          }
        }
        ASSERT_EQ(q.workers(), m.workers());
        for (int v = 0; v < w; ++v) ASSERT_EQ(q.pool_size(v), m.pool_size(v)) << "worker " << v;
        ASSERT_EQ(q.counts(), m.counts());
      }
    }
  }
}

}  // namespace
}  // namespace weft::data
