// Deterministic shuffling (SplitMix64 + Fisher-Yates) and per-rank shards.
// The algorithm is specified in weft/data.h; keep the two in sync.
#include <fmt/format.h>

#include <algorithm>
#include <numeric>
#include <utility>

#include "weft/data.h"
#include "weft/errors.h"

namespace weft::data {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

constexpr uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t state) : state_(state) {}
  uint64_t next() { return mix64(state_ += kGolden); }
  // Unbiased value in [0, n), n > 0.
  uint64_t uniform(uint64_t n) {
    const uint64_t threshold = (0 - n) % n;  // (2^64 - n) % n
    for (;;) {
      uint64_t r = next();
      if (r >= threshold) return r % n;
    }
  }

 private:
  uint64_t state_;
};

void check_epoch(int64_t epoch) {
  if (epoch < 0) throw InvalidArgument(fmt::format("epoch {} is negative", epoch));
}

}  // namespace

std::vector<int64_t> shuffled_indices(int64_t n, uint64_t seed, int64_t epoch) {
  check_epoch(epoch);
  if (n < 0) throw InvalidArgument(fmt::format("shuffled_indices: n = {} is negative", n));
  std::vector<int64_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), int64_t{0});
  SplitMix64 rng(seed ^ mix64(static_cast<uint64_t>(epoch)));
  for (size_t i = p.size(); i-- > 1;) std::swap(p[i], p[rng.uniform(i + 1)]);
  return p;
}

int64_t num_batches(int64_t shard_size, int64_t batch_size, bool drop_last_batch) {
  if (batch_size <= 0) throw InvalidArgument(fmt::format("batch size {} is not > 0", batch_size));
  if (shard_size < 0) throw InvalidArgument(fmt::format("shard size {} is negative", shard_size));
  return drop_last_batch ? shard_size / batch_size : (shard_size + batch_size - 1) / batch_size;
}

std::span<const int64_t> batch_indices(std::span<const int64_t> shard, int64_t batch_size,
                                       int64_t step) {
  const auto size = static_cast<int64_t>(shard.size());
  const int64_t steps = num_batches(size, batch_size, false);
  if (step < 0 || step >= steps) {
    throw InvalidArgument(fmt::format(
        "batch_indices: step {} out of range: a shard of {} with batch size {} has {} batches",
        step, size, batch_size, steps));
  }
  const int64_t begin = step * batch_size;
  return shard.subspan(static_cast<size_t>(begin),
                       static_cast<size_t>(std::min(batch_size, size - begin)));
}

DistributedSampler::DistributedSampler(int64_t num_samples, int world_size, int rank,
                                       SamplerOptions options)
    : num_samples_(num_samples), world_size_(world_size), rank_(rank), options_(options) {
  if (num_samples < 0) {
    throw InvalidArgument(
        fmt::format("DistributedSampler: num_samples {} is negative", num_samples));
  }
  if (world_size < 1) {
    throw InvalidArgument(fmt::format("DistributedSampler: world size {} is not >= 1", world_size));
  }
  check_rank(rank);
}

void DistributedSampler::check_rank(int rank) const {
  if (rank < 0 || rank >= world_size_) {
    throw InvalidArgument(
        fmt::format("DistributedSampler: rank {} out of range [0, {})", rank, world_size_));
  }
}

int64_t DistributedSampler::shard_size(int rank) const {
  check_rank(rank);
  const int64_t q = num_samples_ / world_size_;
  const int64_t rem = num_samples_ % world_size_;
  switch (options_.remainder) {
    case Remainder::Spread: return q + (rank < rem ? 1 : 0);
    case Remainder::DropLast: return q;
    case Remainder::Pad: return q + (rem > 0 ? 1 : 0);
  }
  return q;
}

std::vector<int64_t> DistributedSampler::permutation(int64_t epoch) const {
  if (options_.shuffle) return shuffled_indices(num_samples_, options_.seed, epoch);
  check_epoch(epoch);
  std::vector<int64_t> p(static_cast<size_t>(num_samples_));
  std::iota(p.begin(), p.end(), int64_t{0});
  return p;
}

std::vector<int64_t> DistributedSampler::shard(int64_t epoch, int rank) const {
  const int64_t size = shard_size(rank);
  // Offset of the rank's block in the (possibly padded) permutation.
  int64_t begin = int64_t{rank} * (num_samples_ / world_size_);
  if (options_.remainder == Remainder::Spread) {
    begin += std::min<int64_t>(rank, num_samples_ % world_size_);
  } else if (options_.remainder == Remainder::Pad) {
    begin = int64_t{rank} * size;
  }
  const std::vector<int64_t> p = permutation(epoch);
  std::vector<int64_t> out(static_cast<size_t>(size));
  for (int64_t k = 0; k < size; ++k) {
    out[static_cast<size_t>(k)] = p[static_cast<size_t>((begin + k) % num_samples_)];
  }
  return out;
}

int64_t DistributedSampler::steps_per_epoch(int64_t batch_size, bool drop_last_batch,
                                            int rank) const {
  return num_batches(shard_size(rank), batch_size, drop_last_batch);
}

int64_t DistributedSampler::common_steps_per_epoch(int64_t batch_size, bool drop_last_batch) const {
  // Batches grow with the shard size, and the last rank's shard is the smallest.
  return steps_per_epoch(batch_size, drop_last_batch, world_size_ - 1);
}

}  // namespace weft::data
