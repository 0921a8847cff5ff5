#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "weft/data.h"
#include "weft/errors.h"

namespace weft::data {
namespace {

// The algorithm exactly as weft/data.h documents it, written out again.
std::vector<int64_t> reference_permutation(int64_t n, uint64_t seed, int64_t epoch) {
  auto mix64 = [](uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  };
  uint64_t state = seed ^ mix64(static_cast<uint64_t>(epoch));
  auto next = [&] {
    state += 0x9E3779B97F4A7C15ull;
    return mix64(state);
  };
  auto uniform = [&](uint64_t m) {
    uint64_t threshold = (~m + 1) % m;
    for (;;) {
      uint64_t r = next();
      if (r >= threshold) return r % m;
    }
  };
  std::vector<int64_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), 0);
  for (int64_t i = n - 1; i >= 1; --i) {
    std::swap(p[static_cast<size_t>(i)], p[uniform(static_cast<uint64_t>(i) + 1)]);
  }
  return p;
}

bool is_permutation_of_range(std::vector<int64_t> p) {
  std::sort(p.begin(), p.end());
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] != static_cast<int64_t>(i)) return false;
  }
  return true;
}

TEST(Shuffle, MatchesTheDocumentedAlgorithm) {
  for (int64_t n : {0, 1, 2, 10, 1000, 60000}) {
    for (uint64_t seed : {0ull, 1ull, 42ull, 0xdeadbeefcafef00dull}) {
      for (int64_t epoch : {0, 1, 7}) {
        auto p = shuffled_indices(n, seed, epoch);
        ASSERT_EQ(p, reference_permutation(n, seed, epoch)) << n << " " << seed << " " << epoch;
        ASSERT_TRUE(is_permutation_of_range(p));
      }
    }
  }
  // Pinned values: a change here changes every training run's sample order.
  EXPECT_EQ(shuffled_indices(10, 0, 0), (std::vector<int64_t>{6, 3, 2, 9, 8, 1, 4, 7, 0, 5}));
  EXPECT_EQ(shuffled_indices(10, 42, 3), (std::vector<int64_t>{3, 8, 0, 4, 6, 9, 5, 1, 7, 2}));
}

TEST(Shuffle, EpochsAndSeedsDiffer) {
  const auto e0 = shuffled_indices(1000, 7, 0);
  EXPECT_NE(e0, shuffled_indices(1000, 7, 1));
  EXPECT_NE(e0, shuffled_indices(1000, 8, 0));
  EXPECT_EQ(e0, shuffled_indices(1000, 7, 0));
  std::vector<int64_t> identity(1000);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_NE(e0, identity);
  EXPECT_THROW(shuffled_indices(10, 0, -1), InvalidArgument);
  EXPECT_THROW(shuffled_indices(-1, 0, 0), InvalidArgument);
}

// The shards of every rank, each computed by its own sampler object.
std::vector<std::vector<int64_t>> all_shards(int64_t n, int w, SamplerOptions o, int64_t epoch) {
  std::vector<std::vector<int64_t>> out;
  for (int r = 0; r < w; ++r) out.push_back(DistributedSampler(n, w, r, o).shard(epoch));
  return out;
}

const int64_t kSizes[] = {0, 1, 2, 5, 7, 8, 10, 13, 64, 100, 101, 997, 1000};

TEST(Sampler, SpreadCoversEverySampleExactlyOnce) {
  for (int64_t n : kSizes) {
    for (int w = 1; w <= 8; ++w) {
      for (int64_t epoch : {0, 1, 2}) {
        SamplerOptions o{.seed = 123};
        auto shards = all_shards(n, w, o, epoch);
        std::vector<int> count(static_cast<size_t>(n));
        std::vector<int64_t> concat;
        for (int r = 0; r < w; ++r) {
          const auto& s = shards[static_cast<size_t>(r)];
          EXPECT_EQ(static_cast<int64_t>(s.size()), n / w + (r < n % w ? 1 : 0)) << n << " " << w;
          EXPECT_EQ(static_cast<int64_t>(s.size()), DistributedSampler(n, w, r, o).shard_size());
          for (int64_t i : s) ++count[static_cast<size_t>(i)];
          concat.insert(concat.end(), s.begin(), s.end());
        }
        EXPECT_TRUE(std::all_of(count.begin(), count.end(), [](int c) { return c == 1; }))
            << "N=" << n << " W=" << w;
        // The shards are the consecutive blocks of the epoch's permutation.
        EXPECT_EQ(concat, shuffled_indices(n, 123, epoch));
      }
    }
  }
}

TEST(Sampler, DropLast) {
  for (int64_t n : kSizes) {
    for (int w = 1; w <= 8; ++w) {
      SamplerOptions o{.seed = 5, .remainder = Remainder::DropLast};
      auto shards = all_shards(n, w, o, 4);
      std::vector<int> count(static_cast<size_t>(n));
      for (const auto& s : shards) {
        EXPECT_EQ(static_cast<int64_t>(s.size()), n / w);
        for (int64_t i : s) ++count[static_cast<size_t>(i)];
      }
      // Disjoint; exactly the last N % W samples of the permutation are left out.
      const auto perm = shuffled_indices(n, 5, 4);
      for (size_t k = 0; k < perm.size(); ++k) {
        const bool dropped = static_cast<int64_t>(k) >= n - n % w;
        EXPECT_EQ(count[static_cast<size_t>(perm[k])], dropped ? 0 : 1) << n << " " << w;
      }
    }
  }
}

TEST(Sampler, Pad) {
  for (int64_t n : kSizes) {
    for (int w = 1; w <= 8; ++w) {
      SamplerOptions o{.seed = 5, .remainder = Remainder::Pad};
      auto shards = all_shards(n, w, o, 2);
      const int64_t per_rank = (n + w - 1) / w;
      std::vector<int64_t> concat;
      for (const auto& s : shards) {
        EXPECT_EQ(static_cast<int64_t>(s.size()), per_rank);
        concat.insert(concat.end(), s.begin(), s.end());
      }
      // The permutation, wrapped around to its start.
      const auto perm = shuffled_indices(n, 5, 2);
      ASSERT_EQ(static_cast<int64_t>(concat.size()), per_rank * w);
      for (size_t k = 0; k < concat.size(); ++k) {
        EXPECT_EQ(concat[k], perm[k % perm.size()]) << n << " " << w;
      }
      std::vector<int> count(static_cast<size_t>(n));
      for (int64_t i : concat) ++count[static_cast<size_t>(i)];
      EXPECT_TRUE(std::all_of(count.begin(), count.end(), [](int c) { return c >= 1; }));
    }
  }
  // 10 over 4 ranks: 3 each, the first two samples of the permutation twice.
  auto shards = all_shards(10, 4, {.seed = 1, .remainder = Remainder::Pad}, 0);
  const auto perm = shuffled_indices(10, 1, 0);
  EXPECT_EQ(shards[3], (std::vector<int64_t>{perm[9], perm[0], perm[1]}));
}

TEST(Sampler, EpochsDifferSameEverywhere) {
  DistributedSampler a(1000, 4, 2, {.seed = 99});
  DistributedSampler b(1000, 4, 2, {.seed = 99});
  EXPECT_EQ(a.shard(3), b.shard(3));
  EXPECT_EQ(a.shard(3), DistributedSampler(1000, 4, 0, {.seed = 99}).shard(3, 2));
  EXPECT_NE(a.shard(3), a.shard(4));
  EXPECT_NE(a.shard(3), DistributedSampler(1000, 4, 2, {.seed = 100}).shard(3));
  EXPECT_EQ(a.permutation(5), shuffled_indices(1000, 99, 5));
}

TEST(Sampler, NoShuffle) {
  DistributedSampler s(10, 3, 1, {.shuffle = false});
  EXPECT_EQ(s.shard(0), (std::vector<int64_t>{4, 5, 6}));
  EXPECT_EQ(s.shard(7), s.shard(0));
  EXPECT_EQ(s.shard(0, 0), (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(s.shard(0, 2), (std::vector<int64_t>{7, 8, 9}));
}

TEST(Sampler, Batches) {
  EXPECT_EQ(num_batches(10, 3, false), 4);
  EXPECT_EQ(num_batches(10, 3, true), 3);
  EXPECT_EQ(num_batches(9, 3, false), 3);
  EXPECT_EQ(num_batches(9, 3, true), 3);
  EXPECT_EQ(num_batches(0, 3, false), 0);
  EXPECT_EQ(num_batches(2, 3, true), 0);
  EXPECT_THROW(num_batches(10, 0, false), InvalidArgument);

  const std::vector<int64_t> shard = {5, 3, 8, 1, 9, 0, 2};
  std::vector<int64_t> concat;
  for (int64_t k = 0; k < num_batches(7, 3, false); ++k) {
    auto b = batch_indices(shard, 3, k);
    EXPECT_EQ(b.size(), k < 2 ? 3u : 1u);
    concat.insert(concat.end(), b.begin(), b.end());
  }
  EXPECT_EQ(concat, shard);
  EXPECT_EQ(batch_indices(shard, 3, 1)[0], 1);
  EXPECT_THROW(batch_indices(shard, 3, 3), InvalidArgument);
  EXPECT_THROW(batch_indices(shard, 3, -1), InvalidArgument);
  EXPECT_THROW(batch_indices(shard, 0, 0), InvalidArgument);
}

TEST(Sampler, StepsPerEpochAndCommonSteps) {
  // 10 over 3 ranks (Spread): 4, 3, 3 samples.
  DistributedSampler s(10, 3, 0);
  EXPECT_EQ(s.steps_per_epoch(2, false), 2);
  EXPECT_EQ(s.steps_per_epoch(2, false, 1), 2);
  EXPECT_EQ(s.steps_per_epoch(2, true, 0), 2);
  EXPECT_EQ(s.steps_per_epoch(2, true, 1), 1);
  EXPECT_EQ(s.common_steps_per_epoch(2, false), 2);
  EXPECT_EQ(s.common_steps_per_epoch(2, true), 1);
  EXPECT_EQ(s.steps_per_epoch(3, false), 2);  // 4 samples: 3 + 1
  EXPECT_EQ(s.common_steps_per_epoch(3, false), 1);

  // The common count is the minimum over ranks, and the same on every rank.
  for (int64_t n : kSizes) {
    for (int w = 1; w <= 8; ++w) {
      for (auto rem : {Remainder::Spread, Remainder::DropLast, Remainder::Pad}) {
        for (int64_t b : {1, 3, 8, 32}) {
          for (bool dlb : {false, true}) {
            int64_t lo = INT64_MAX;
            std::vector<int64_t> common;
            for (int r = 0; r < w; ++r) {
              DistributedSampler d(n, w, r, {.remainder = rem});
              lo = std::min(lo, d.steps_per_epoch(b, dlb));
              EXPECT_EQ(d.steps_per_epoch(b, dlb), num_batches(d.shard_size(), b, dlb));
              common.push_back(d.common_steps_per_epoch(b, dlb));
            }
            for (int64_t c : common) EXPECT_EQ(c, lo) << n << " " << w << " " << b;
          }
        }
      }
    }
  }
}

TEST(Sampler, InvalidArguments) {
  EXPECT_THROW(DistributedSampler(-1, 1, 0), InvalidArgument);
  EXPECT_THROW(DistributedSampler(10, 0, 0), InvalidArgument);
  EXPECT_THROW(DistributedSampler(10, 2, 2), InvalidArgument);
  EXPECT_THROW(DistributedSampler(10, 2, -1), InvalidArgument);
  DistributedSampler s(10, 2, 1);
  EXPECT_THROW(s.shard(0, 2), InvalidArgument);
  EXPECT_THROW(s.shard(-1), InvalidArgument);
  EXPECT_THROW(s.shard_size(5), InvalidArgument);
  EXPECT_THROW(DistributedSampler(10, 2, 1, {.shuffle = false}).shard(-1), InvalidArgument);
}

}  // namespace
}  // namespace weft::data
