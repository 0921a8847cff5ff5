// The shard queue: dynamic hand-out of an epoch's samples to workers whose
// shares of each step differ and change (load balancing), so that every
// sample is trained exactly once per epoch across re-plans, failures, joins
// and world-size changes (elastic training).
//
// A replicated, deterministic ledger. There is no coordinator: every rank
// holds an identical ShardQueue and applies the same operations, with the
// same arguments, in the same order. The balancer knows every worker's share
// of each step, so each rank computes every worker's hand-out itself; rank r
// trains the samples take_step() returns for worker r. Nothing is sent, so
// the queue adds no round trip and no single point of failure; its committed
// state (serialize()) is part of a checkpoint and is restored on a survivor
// or a joiner with deserialize().
//
// The epoch's permutation (shuffled_indices of weft/data.h) is cut into
// shards of shard_samples consecutive positions. Each worker has a pool: the
// pieces of shards it has been handed and not yet trained ("doing"). A step
// gives worker w want[w] samples: w's pool is topped up with whole pieces from
// the front of the todo list, then w takes the first want[w] samples of its
// pool. At the tail of an epoch, once todo is empty, a worker still short
// takes samples from the back of other workers' pools, from what those will
// not train in this step (tail sharing), so that a slow worker with a small
// share does not drain its last pieces alone while the others idle: every
// step but an epoch's last gives every worker its whole want. A step's
// samples count as done once complete_step() says they were trained on every
// rank (the step's allreduce succeeded); abandon_step() puts them back,
// untrained. A worker that leaves (release()) gives its untrained samples
// back to the front of the todo list, where the next takers find them.
//
//   weft::data::ShardQueue queue(train->size(), world, {.shard_samples = 64, .seed = 42});
//   for (int64_t epoch = 0; epoch < epochs; ++epoch) {
//     queue.start_epoch(epoch);
//     while (!queue.epoch_done()) {
//       std::vector<int64_t> want = balancer_shares();   // the same on every rank
//       auto hand_out = queue.take_step(want);
//       weft::data::Batch b = train->batch(hand_out[rank]);
//       ... forward, backward, allreduce gradients weighted by share ...
//       queue.complete_step();   // or, on a PeerError: abandon_step(), release(dead), ...
//     }
//   }
//
// Errors: a bad argument (a negative want, a want for a released worker, an
// operation out of order) throws weft::InvalidArgument naming the problem;
// bytes that are not a valid state throw weft::DataError naming the problem.
//
// Thread safety: none. A ShardQueue is one rank's replica, used from one
// thread (the training loop); const methods may run concurrently with each
// other only.
#pragma once

#include <cstdint>
#include <deque>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace weft::data {

struct ShardQueueOptions {
  int64_t shard_samples = 64;  // samples per shard (the last shard may be shorter); >= 1
  uint64_t seed = 0;           // the permutation's seed, as SamplerOptions::seed
  bool shuffle = true;         // false: the identity permutation every epoch
};

class ShardQueue {
 public:
  // Limits, checked by the constructor, resize() and deserialize(): the
  // permutation is held in memory (8 bytes per sample).
  static constexpr int kMaxWorkers = 1 << 20;
  static constexpr int64_t kMaxSamples = int64_t{1} << 32;

  // 0 <= num_samples <= kMaxSamples, 1 <= workers <= kMaxWorkers,
  // shard_samples >= 1, else weft::InvalidArgument. No epoch is started.
  ShardQueue(int64_t num_samples, int workers, ShardQueueOptions options = {});

  int workers() const { return static_cast<int>(pools_.size()); }
  int64_t num_samples() const { return num_samples_; }
  int64_t num_shards() const { return num_shards_; }
  const ShardQueueOptions& options() const { return options_; }
  int64_t epoch() const { return epoch_; }  // -1 before the first start_epoch

  // Starts epoch e >= 0 (any e, also one already run): the permutation is
  // shuffled_indices(num_samples, seed, e) (identity when shuffle is false),
  // cut into shards of shard_samples consecutive positions; every shard is
  // todo, in order, and every pool empty. Released workers stay released.
  // O(num_samples). Throws weft::InvalidArgument while a step is open.
  void start_epoch(int64_t epoch);

  // One synchronous step. want.size() == workers(), every want[w] >= 0, 0
  // for a released worker; an epoch started; no step open. Else
  // weft::InvalidArgument naming the problem, and nothing changes.
  // For w = 0..W-1 in order: while w's pool holds fewer than want[w] samples
  // and a piece is todo, the front todo piece moves whole to the back of w's
  // pool. Then, tail sharing: while w's pool still holds fewer than want[w]
  // samples (so todo is empty) and another worker has a surplus, the last
  // min(surplus, want[w] - pool size) samples of the pool of the worker v
  // with the largest surplus (ties: the lowest v) move, in their order, to
  // the back of w's pool; the surplus of v is its pool size for v < w
  // (served already) and its pool size less want[v] for v > w (what it will
  // not take). Moved samples stay doing; they change pools only. Then w
  // takes min(want[w], pool size) samples from the front of its pool.
  // Returns, per worker, the dataset indices (values of the permutation) it
  // trains in this step, in order. A worker gets fewer than it wants only
  // when nothing is left for it: after such a step, every untrained sample
  // of the epoch is in the step. The step stays open until complete_step() or
  // abandon_step(). O(workers + samples taken + pieces moved), plus
  // O(workers log workers) in a step that shares the tail.
  std::vector<std::vector<int64_t>> take_step(std::span<const int64_t> want);
  std::vector<std::vector<int64_t>> take_step(std::initializer_list<int64_t> want) {
    return take_step(std::span<const int64_t>(want.begin(), want.size()));
  }

  // The open step's samples were trained on every rank: they are done.
  // Throws weft::InvalidArgument when no step is open.
  void complete_step();
  // The open step failed (e.g. a peer died in its allreduce): its samples go
  // back, untrained, to the front of the pools of the workers that took
  // them, in their order, as if the step had not been taken; samples that
  // tail sharing moved stay in their new pool (the same wants again give the
  // same hand-out). Throws weft::InvalidArgument when no step is open.
  void abandon_step();

  // Worker w is gone (failed or removed): the untrained samples of its pool
  // go back to the front of the todo list, in order, to be handed out again.
  // From now on its want must be 0 until rejoin(w). Requires no open step
  // (abandon it first), 0 <= w < workers() and w not released, else
  // weft::InvalidArgument.
  void release(int worker);
  // Worker w takes part again (a returning worker), with an empty pool.
  // Requires no open step and w released, else weft::InvalidArgument.
  void rejoin(int worker);
  bool released(int worker) const;
  // Elastic resize to 1 <= new_workers <= kMaxWorkers. Shrinking drops the
  // workers >= new_workers, which must have been released first (else
  // weft::InvalidArgument naming them); growing adds workers with empty pools,
  // not released. Requires no open step. Worker ids are positions: the
  // caller maps its dense ranks onto them.
  void resize(int new_workers);

  // Elastic: the set of workers changed (a new generation after a failure
  // or a join; positions are the new dense ranks). The untrained samples of
  // every pool go back to the front of the todo list, every worker is
  // released, then the queue has `new_workers` workers, none released, all
  // with empty pools. What is done stays done, so every sample is still
  // trained exactly once in the epoch. Requires no open step (abandon it
  // first) and 1 <= new_workers <= kMaxWorkers, else weft::InvalidArgument.
  void regroup(int new_workers);

  // Samples of the current epoch trained (done); 0 before the first epoch.
  int64_t trained() const { return trained_; }
  // Samples of the current epoch not done: todo, in pools or in the open
  // step. 0 before the first epoch.
  int64_t remaining() const { return epoch_ < 0 ? 0 : num_samples_ - trained_; }
  // Every sample of the current epoch trained. False before the first epoch.
  bool epoch_done() const { return epoch_ >= 0 && remaining() == 0; }

  // Shards by state: done when all its samples are done; doing when any of
  // its samples is in a pool or the open step (and it is not done); todo
  // otherwise (also a shard partly done whose rest went back to todo). Before
  // the first epoch all are 0. O(1).
  struct Counts {
    int64_t todo = 0, doing = 0, done = 0;
    bool operator==(const Counts&) const = default;
  };
  Counts counts() const;

  // Untrained samples in worker w's pool, not counting the open step's.
  int64_t pool_size(int worker) const;
  // Samples in the todo list.
  int64_t todo_size() const { return todo_samples_; }
  bool step_open() const { return step_open_; }

  // The committed state as bytes: options, num_samples, workers, epoch,
  // released flags, the todo pieces in order, each pool's pieces in order,
  // the done count of every shard, and an FNV-1a 64 checksum of all of that.
  // The permutation is not stored: deserialize() recomputes it from seed and
  // epoch. Throws weft::InvalidArgument while a step is open (complete or
  // abandon it first). Layout, little-endian: "WFSQ", u32 version (1),
  // i64 shard_samples, u64 seed, u8 shuffle, i64 num_samples, u32 workers,
  // i64 epoch, workers x u8 released, u64 todo pieces, then per piece i64
  // begin, i64 end (positions in the permutation, half-open, within one
  // shard), per worker u64 pieces and its pieces, u64 shards (0 before the
  // first epoch, else num_shards) and per shard i64 done, u64 FNV-1a of
  // every byte before it.
  std::string serialize() const;
  // The queue serialize() wrote. Every field, count and range is checked
  // against the data before anything is allocated (a count of pieces cannot
  // exceed what the remaining bytes can hold), then the checksum, then the
  // ledger itself (pieces disjoint, every sample of a shard todo, in a pool
  // or done exactly once, released workers with empty pools). Any problem
  // throws weft::DataError naming it, e.g. "shard queue state: truncated at
  // byte 120 (reading 3 pieces of the pool of worker 2)", "shard queue state:
  // checksum mismatch (...)".
  //
  // The permutation (8 bytes per sample) is recomputed, not stored, so a
  // state of a few bytes can claim a huge num_samples (in one huge shard)
  // under a forged checksum: a num_samples above `max_samples` is refused
  // before anything is allocated. Pass the size of the dataset the state is
  // for (a checkpoint's ledger, a survivor's commit); the one-argument form
  // bounds it by kMaxSamples only (up to 32 GiB of permutation).
  static ShardQueue deserialize(std::string_view bytes, int64_t max_samples);
  static ShardQueue deserialize(std::string_view bytes) { return deserialize(bytes, kMaxSamples); }

 private:
  // Positions [begin, end) of the epoch's permutation, within one shard.
  struct Piece {
    int64_t begin = 0;
    int64_t end = 0;
    int64_t size() const { return end - begin; }
  };
  friend struct ShardQueueCodec;

  int64_t shard_of(int64_t position) const { return position / options_.shard_samples; }
  int64_t shard_size(int64_t shard) const;
  void check_worker(int worker, const char* op) const;
  void check_no_step(const char* op) const;
  // Moves samples of `shard` between the ledger's classes, keeping the
  // shard-state counters right.
  void account(int64_t shard, int64_t d_active, int64_t d_done);
  // Puts p at the front of d, merged with the front piece when contiguous
  // within one shard; push_back_merged likewise at the back.
  void push_front_merged(std::deque<Piece>& d, Piece p) const;
  void push_back_merged(std::deque<Piece>& d, Piece p) const;
  // Moves the last k <= pool_samples_[from] samples of pool `from`, in their
  // order, to the back of pool `to` (merged). The shards stay doing.
  void move_back(size_t from, size_t to, int64_t k);

  int64_t num_samples_;
  ShardQueueOptions options_;
  int64_t num_shards_;
  int64_t epoch_ = -1;
  std::vector<int64_t> perm_;  // the epoch's permutation
  std::deque<Piece> todo_;
  int64_t todo_samples_ = 0;
  std::vector<std::deque<Piece>> pools_;  // per worker
  std::vector<int64_t> pool_samples_;     // per worker
  std::vector<char> released_;            // per worker
  bool step_open_ = false;
  std::vector<std::vector<Piece>> open_;  // per worker: the open step's pieces
  // Per shard: samples done, and samples in a pool or the open step.
  std::vector<int64_t> done_;
  std::vector<int64_t> active_;
  int64_t trained_ = 0;
  int64_t shards_done_ = 0;
  int64_t shards_doing_ = 0;
};

}  // namespace weft::data
