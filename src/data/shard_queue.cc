// The shard queue (weft/shard_queue.h): a replicated ledger of the epoch's
// samples, as pieces of the permutation's positions moving todo -> pool ->
// open step -> done (or back).
#include "weft/shard_queue.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <numeric>
#include <utility>

#include "weft/data.h"
#include "weft/errors.h"

namespace weft::data {
namespace {

constexpr char kMagic[4] = {'W', 'F', 'S', 'Q'};
constexpr uint32_t kVersion = 1;
constexpr size_t kPieceBytes = 16;

uint64_t fnv1a(std::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char c : bytes) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001b3ull;
  }
  return h;
}

class Writer {
 public:
  void bytes(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  void u8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void u32(uint32_t v) {
    for (int i = 0; i < 4; ++i) u8(static_cast<uint8_t>(v >> (8 * i)));
  }
  void u64(uint64_t v) {
    for (int i = 0; i < 8; ++i) u8(static_cast<uint8_t>(v >> (8 * i)));
  }
  void i64(int64_t v) { u64(static_cast<uint64_t>(v)); }
  std::string& str() { return out_; }

 private:
  std::string out_;
};

[[noreturn]] void bad_state(const std::string& what) {
  throw DataError("shard queue state: " + what);
}

class Reader {
 public:
  explicit Reader(std::string_view in) : in_(in) {}
  size_t pos() const { return pos_; }
  size_t left() const { return in_.size() - pos_; }
  void need(size_t n, const char* what) const {
    if (left() < n) {
      bad_state(fmt::format("truncated at byte {} (reading {})", in_.size(), what));
    }
  }
  uint8_t u8(const char* what) {
    need(1, what);
    return static_cast<uint8_t>(in_[pos_++]);
  }
  uint32_t u32(const char* what) {
    need(4, what);
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= uint32_t{static_cast<uint8_t>(in_[pos_++])} << (8 * i);
    return v;
  }
  uint64_t u64(const char* what) {
    need(8, what);
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= uint64_t{static_cast<uint8_t>(in_[pos_++])} << (8 * i);
    return v;
  }
  int64_t i64(const char* what) { return static_cast<int64_t>(u64(what)); }

 private:
  std::string_view in_;
  size_t pos_ = 0;
};

std::vector<int64_t> permutation(int64_t n, const ShardQueueOptions& o, int64_t epoch) {
  if (o.shuffle) return shuffled_indices(n, o.seed, epoch);
  std::vector<int64_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), int64_t{0});
  return p;
}

// The heap order of tail sharing: larger surplus first, then lower worker.
bool larger_surplus_first(const std::pair<int64_t, size_t>& a,
                          const std::pair<int64_t, size_t>& b) {
  return a.first != b.first ? a.first < b.first : a.second > b.second;
}

}  // namespace

// Reading a state: the private members, checked one by one.
struct ShardQueueCodec {
  using Piece = ShardQueue::Piece;

  // A count of pieces, bounded by the samples and by the bytes left (16 per
  // piece) before anything is allocated.
  static uint64_t piece_count(Reader& r, const ShardQueue& q, const std::string& where) {
    const uint64_t n = r.u64(where.c_str());
    if (n > static_cast<uint64_t>(q.num_samples_)) {
      bad_state(fmt::format("{} pieces of {} out of range (at most {}, the samples)", n, where,
                            q.num_samples_));
    }
    r.need(n * kPieceBytes, fmt::format("{} pieces of {}", n, where).c_str());
    return n;
  }

  static Piece piece(Reader& r, const ShardQueue& q, const std::string& where) {
    Piece p;
    p.begin = r.i64(where.c_str());
    p.end = r.i64(where.c_str());
    if (p.begin < 0 || p.begin >= p.end || p.end > q.num_samples_ ||
        q.shard_of(p.begin) != q.shard_of(p.end - 1)) {
      bad_state(fmt::format(
          "a piece of {} out of range: [{}, {}) is not a non-empty range within one shard of "
          "{} samples among {}",
          where, p.begin, p.end, q.options_.shard_samples, q.num_samples_));
    }
    return p;
  }

  static ShardQueue read(std::string_view bytes, int64_t max_samples) {
    Reader r(bytes);
    r.need(sizeof kMagic, "the magic");
    if (std::memcmp(bytes.data(), kMagic, sizeof kMagic) != 0) {
      bad_state("not a shard queue state (bad magic)");
    }
    for (size_t i = 0; i < sizeof kMagic; ++i) r.u8("the magic");
    const uint32_t version = r.u32("the version");
    if (version != kVersion) {
      bad_state(fmt::format("format version {} is not supported (this Weft reads version {})",
                            version, kVersion));
    }
    ShardQueueOptions o;
    o.shard_samples = r.i64("shard_samples");
    o.seed = r.u64("the seed");
    const uint8_t shuffle = r.u8("the shuffle flag");
    const int64_t num_samples = r.i64("num_samples");
    const uint32_t workers = r.u32("the number of workers");
    const int64_t epoch = r.i64("the epoch");
    if (o.shard_samples < 1)
      bad_state(fmt::format("shard_samples {} is not >= 1", o.shard_samples));
    if (shuffle > 1) bad_state(fmt::format("shuffle flag {} is not 0 or 1", shuffle));
    o.shuffle = shuffle == 1;
    if (num_samples < 0 || num_samples > ShardQueue::kMaxSamples) {
      bad_state(
          fmt::format("num_samples {} out of range [0, {}]", num_samples, ShardQueue::kMaxSamples));
    }
    if (num_samples > max_samples) {
      bad_state(fmt::format("num_samples {} is more than the {} expected (the dataset's size)",
                            num_samples, max_samples));
    }
    if (workers < 1 || workers > static_cast<uint32_t>(ShardQueue::kMaxWorkers)) {
      bad_state(fmt::format("workers {} out of range [1, {}]", workers, ShardQueue::kMaxWorkers));
    }
    if (epoch < -1) bad_state(fmt::format("epoch {} is not >= -1", epoch));
    // Each worker has a released flag and a count of pool pieces: the data
    // must hold them before a queue of that many workers is built.
    r.need(size_t{workers} * 9, "the released flags and pools");

    ShardQueue q(num_samples, static_cast<int>(workers), o);
    for (uint32_t w = 0; w < workers; ++w) {
      const uint8_t flag = r.u8("the released flags");
      if (flag > 1) bad_state(fmt::format("released flag of worker {} is {}, not 0 or 1", w, flag));
      q.released_[w] = static_cast<char>(flag);
    }
    const uint64_t ntodo = piece_count(r, q, "the todo list");
    for (uint64_t i = 0; i < ntodo; ++i) q.todo_.push_back(piece(r, q, "the todo list"));
    for (uint32_t w = 0; w < workers; ++w) {
      const std::string where = fmt::format("the pool of worker {}", w);
      const uint64_t n = piece_count(r, q, where);
      if (n > 0 && q.released_[w]) bad_state(fmt::format("released worker {} holds pieces", w));
      for (uint64_t i = 0; i < n; ++i) q.pools_[w].push_back(piece(r, q, where));
    }
    const uint64_t nshards = r.u64("the number of shards");
    const uint64_t expect_shards = epoch < 0 ? 0 : static_cast<uint64_t>(q.num_shards_);
    if (nshards != expect_shards) {
      bad_state(fmt::format("{} done counts, expected {} (shards of epoch {})", nshards,
                            expect_shards, epoch));
    }
    r.need(nshards * 8, "the done counts");
    std::vector<int64_t> done(nshards);
    for (uint64_t s = 0; s < nshards; ++s) {
      done[s] = r.i64("the done counts");
      const int64_t size = q.shard_size(static_cast<int64_t>(s));
      if (done[s] < 0 || done[s] > size) {
        bad_state(fmt::format("done count {} of shard {} out of range [0, {}]", done[s], s, size));
      }
    }
    const size_t body = r.pos();
    const uint64_t sum = r.u64("the checksum");
    if (r.left() != 0) {
      bad_state(fmt::format("{} bytes of trailing data after the checksum", r.left()));
    }
    if (sum != fnv1a(bytes.substr(0, body))) {
      bad_state(fmt::format("checksum mismatch (stored {:#018x}, computed {:#018x})", sum,
                            fnv1a(bytes.substr(0, body))));
    }

    // The ledger: pieces disjoint, and every sample of a shard either in a
    // piece or done.
    std::vector<Piece> all(q.todo_.begin(), q.todo_.end());
    for (const auto& pool : q.pools_) all.insert(all.end(), pool.begin(), pool.end());
    if (epoch < 0 && !all.empty()) bad_state("pieces before the first epoch");
    std::sort(all.begin(), all.end(),
              [](const Piece& a, const Piece& b) { return a.begin < b.begin; });
    std::vector<int64_t> covered(nshards, 0);
    for (size_t i = 0; i < all.size(); ++i) {
      if (i > 0 && all[i].begin < all[i - 1].end) {
        bad_state(fmt::format("pieces [{}, {}) and [{}, {}) overlap", all[i - 1].begin,
                              all[i - 1].end, all[i].begin, all[i].end));
      }
      covered[static_cast<size_t>(q.shard_of(all[i].begin))] += all[i].size();
    }
    for (uint64_t s = 0; s < nshards; ++s) {
      const int64_t size = q.shard_size(static_cast<int64_t>(s));
      if (covered[s] + done[s] != size) {
        bad_state(
            fmt::format("shard {} of {} samples: {} untrained in pieces and {} done do not add up",
                        s, size, covered[s], done[s]));
      }
    }

    q.epoch_ = epoch;
    if (epoch >= 0) {
      try {
        q.perm_ = permutation(num_samples, o, epoch);
      } catch (const std::bad_alloc&) {
        bad_state(fmt::format("no memory for the permutation of {} samples", num_samples));
      }
      q.done_.assign(nshards, 0);
      q.active_.assign(nshards, 0);
      for (uint64_t s = 0; s < nshards; ++s) {
        q.account(static_cast<int64_t>(s), 0, done[s]);
        q.trained_ += done[s];
      }
      for (size_t w = 0; w < q.pools_.size(); ++w) {
        for (const Piece& p : q.pools_[w]) {
          q.pool_samples_[w] += p.size();
          q.account(q.shard_of(p.begin), p.size(), 0);
        }
      }
      for (const Piece& p : q.todo_) q.todo_samples_ += p.size();
    }
    return q;
  }
};

ShardQueue::ShardQueue(int64_t num_samples, int workers, ShardQueueOptions options)
    : num_samples_(num_samples), options_(options), num_shards_(0) {
  if (num_samples < 0 || num_samples > kMaxSamples) {
    throw InvalidArgument(
        fmt::format("ShardQueue: num_samples {} out of range [0, {}]", num_samples, kMaxSamples));
  }
  if (workers < 1 || workers > kMaxWorkers) {
    throw InvalidArgument(
        fmt::format("ShardQueue: workers {} out of range [1, {}]", workers, kMaxWorkers));
  }
  if (options.shard_samples < 1) {
    throw InvalidArgument(
        fmt::format("ShardQueue: shard_samples {} is not >= 1", options.shard_samples));
  }
  num_shards_ =
      num_samples / options.shard_samples + (num_samples % options.shard_samples != 0 ? 1 : 0);
  const auto w = static_cast<size_t>(workers);
  pools_.resize(w);
  pool_samples_.assign(w, 0);
  released_.assign(w, 0);
  open_.resize(w);
}

int64_t ShardQueue::shard_size(int64_t shard) const {
  const int64_t begin = shard * options_.shard_samples;
  return std::min(options_.shard_samples, num_samples_ - begin);
}

void ShardQueue::check_worker(int worker, const char* op) const {
  if (worker < 0 || worker >= workers()) {
    throw InvalidArgument(
        fmt::format("ShardQueue::{}: worker {} out of range [0, {})", op, worker, workers()));
  }
}

void ShardQueue::check_no_step(const char* op) const {
  if (step_open_) {
    throw InvalidArgument(fmt::format(
        "ShardQueue::{}: a step is open (call complete_step() or abandon_step() first)", op));
  }
}

void ShardQueue::account(int64_t shard, int64_t d_active, int64_t d_done) {
  const auto s = static_cast<size_t>(shard);
  const int64_t size = shard_size(shard);
  auto state = [&] { return done_[s] == size ? 2 : active_[s] > 0 ? 1 : 0; };
  const int before = state();
  active_[s] += d_active;
  done_[s] += d_done;
  const int after = state();
  shards_done_ += (after == 2) - (before == 2);
  shards_doing_ += (after == 1) - (before == 1);
}

void ShardQueue::push_front_merged(std::deque<Piece>& d, Piece p) const {
  if (!d.empty() && d.front().begin == p.end && shard_of(p.begin) == shard_of(d.front().begin)) {
    d.front().begin = p.begin;
  } else {
    d.push_front(p);
  }
}

void ShardQueue::push_back_merged(std::deque<Piece>& d, Piece p) const {
  if (!d.empty() && d.back().end == p.begin && shard_of(p.begin) == shard_of(d.back().begin)) {
    d.back().end = p.end;
  } else {
    d.push_back(p);
  }
}

void ShardQueue::move_back(size_t from, size_t to, int64_t k) {
  auto& src = pools_[from];
  // The last k samples of src, collected back to front, then appended in
  // their order.
  std::vector<Piece> moved;
  for (int64_t left = k; left > 0;) {
    Piece& back = src.back();
    const int64_t n = std::min(left, back.size());
    moved.push_back({back.end - n, back.end});
    if (n == back.size()) {
      src.pop_back();
    } else {
      back.end -= n;
    }
    left -= n;
  }
  for (auto it = moved.rbegin(); it != moved.rend(); ++it) push_back_merged(pools_[to], *it);
  pool_samples_[from] -= k;
  pool_samples_[to] += k;
}

void ShardQueue::start_epoch(int64_t epoch) {
  check_no_step("start_epoch");
  if (epoch < 0) {
    throw InvalidArgument(fmt::format("ShardQueue::start_epoch: epoch {} is negative", epoch));
  }
  perm_ = permutation(num_samples_, options_, epoch);
  epoch_ = epoch;
  todo_.clear();
  for (int64_t s = 0; s < num_shards_; ++s) {
    const int64_t begin = s * options_.shard_samples;
    todo_.push_back({begin, begin + shard_size(s)});
  }
  todo_samples_ = num_samples_;
  for (auto& pool : pools_) pool.clear();
  std::fill(pool_samples_.begin(), pool_samples_.end(), 0);
  done_.assign(static_cast<size_t>(num_shards_), 0);
  active_.assign(static_cast<size_t>(num_shards_), 0);
  trained_ = 0;
  shards_done_ = 0;
  shards_doing_ = 0;
}

std::vector<std::vector<int64_t>> ShardQueue::take_step(std::span<const int64_t> want) {
  if (epoch_ < 0) throw InvalidArgument("ShardQueue::take_step: no epoch started (start_epoch)");
  check_no_step("take_step");
  if (want.size() != pools_.size()) {
    throw InvalidArgument(
        fmt::format("ShardQueue::take_step: {} wants for {} workers", want.size(), pools_.size()));
  }
  for (size_t w = 0; w < want.size(); ++w) {
    if (want[w] < 0) {
      throw InvalidArgument(
          fmt::format("ShardQueue::take_step: want {} of worker {} is negative", want[w], w));
    }
    if (want[w] > 0 && released_[w]) {
      throw InvalidArgument(fmt::format(
          "ShardQueue::take_step: worker {} is released; its want must be 0, not {}", w, want[w]));
    }
  }
  std::vector<std::vector<int64_t>> out(pools_.size());
  // Tail sharing's surpluses: (samples, worker), a heap once built.
  std::vector<std::pair<int64_t, size_t>> surplus;
  bool heap_built = false;
  for (size_t w = 0; w < pools_.size(); ++w) {
    auto& pool = pools_[w];
    while (pool_samples_[w] < want[w] && !todo_.empty()) {
      const Piece p = todo_.front();
      todo_.pop_front();
      todo_samples_ -= p.size();
      pool_samples_[w] += p.size();
      account(shard_of(p.begin), p.size(), 0);
      push_back_merged(pool, p);
    }
    if (pool_samples_[w] < want[w] && todo_.empty()) {
      // Tail sharing. A worker's surplus (the samples of its pool it does not
      // take this step: its pool after its take once served, its pool less
      // its want before) only shrinks when it is stolen from, and a short
      // worker never has one, so the surpluses are computed once, when the
      // first short worker finds todo empty, and kept in a heap: largest
      // first, ties to the lowest index.
      if (!heap_built) {
        heap_built = true;
        for (size_t v = 0; v < pools_.size(); ++v) {
          const int64_t s = v < w ? pool_samples_[v] : pool_samples_[v] - want[v];
          if (v != w && s > 0) surplus.emplace_back(s, v);
        }
        std::make_heap(surplus.begin(), surplus.end(), larger_surplus_first);
      }
      while (pool_samples_[w] < want[w] && !surplus.empty()) {
        std::pop_heap(surplus.begin(), surplus.end(), larger_surplus_first);
        auto& [s, v] = surplus.back();
        const int64_t k = std::min(s, want[w] - pool_samples_[w]);
        move_back(v, w, k);
        s -= k;
        if (s == 0) {
          surplus.pop_back();
        } else {
          std::push_heap(surplus.begin(), surplus.end(), larger_surplus_first);
        }
      }
    }
    int64_t left = std::min(want[w], pool_samples_[w]);
    out[w].reserve(static_cast<size_t>(left));
    while (left > 0) {
      Piece& front = pool.front();
      const int64_t k = std::min(left, front.size());
      const Piece taken{front.begin, front.begin + k};
      if (k == front.size()) {
        pool.pop_front();
      } else {
        front.begin += k;
      }
      open_[w].push_back(taken);
      for (int64_t i = taken.begin; i < taken.end; ++i) {
        out[w].push_back(perm_[static_cast<size_t>(i)]);
      }
      pool_samples_[w] -= k;
      left -= k;
    }
  }
  step_open_ = true;
  return out;
}

void ShardQueue::complete_step() {
  if (!step_open_) throw InvalidArgument("ShardQueue::complete_step: no step is open");
  for (auto& pieces : open_) {
    for (const Piece& p : pieces) {
      account(shard_of(p.begin), -p.size(), p.size());
      trained_ += p.size();
    }
    pieces.clear();
  }
  step_open_ = false;
}

void ShardQueue::abandon_step() {
  if (!step_open_) throw InvalidArgument("ShardQueue::abandon_step: no step is open");
  for (size_t w = 0; w < open_.size(); ++w) {
    for (auto it = open_[w].rbegin(); it != open_[w].rend(); ++it) {
      push_front_merged(pools_[w], *it);
      pool_samples_[w] += it->size();
    }
    open_[w].clear();
  }
  step_open_ = false;
}

void ShardQueue::release(int worker) {
  check_worker(worker, "release");
  check_no_step("release");
  const auto w = static_cast<size_t>(worker);
  if (released_[w]) {
    throw InvalidArgument(fmt::format("ShardQueue::release: worker {} is already released", w));
  }
  auto& pool = pools_[w];
  for (auto it = pool.rbegin(); it != pool.rend(); ++it) {
    account(shard_of(it->begin), -it->size(), 0);
    push_front_merged(todo_, *it);
  }
  todo_samples_ += pool_samples_[w];
  pool.clear();
  pool_samples_[w] = 0;
  released_[w] = 1;
}

void ShardQueue::rejoin(int worker) {
  check_worker(worker, "rejoin");
  check_no_step("rejoin");
  const auto w = static_cast<size_t>(worker);
  if (!released_[w]) {
    throw InvalidArgument(fmt::format("ShardQueue::rejoin: worker {} is not released", w));
  }
  released_[w] = 0;
}

void ShardQueue::regroup(int new_workers) {
  check_no_step("regroup");
  if (new_workers < 1 || new_workers > kMaxWorkers) {
    throw InvalidArgument(
        fmt::format("ShardQueue::regroup: {} workers is not in [1, {}]", new_workers, kMaxWorkers));
  }
  for (int w = 0; w < workers(); ++w) {
    if (!released(w)) release(w);
  }
  resize(new_workers);
  for (int w = 0; w < workers(); ++w) {
    if (released(w)) rejoin(w);
  }
}

bool ShardQueue::released(int worker) const {
  check_worker(worker, "released");
  return released_[static_cast<size_t>(worker)] != 0;
}

void ShardQueue::resize(int new_workers) {
  check_no_step("resize");
  if (new_workers < 1 || new_workers > kMaxWorkers) {
    throw InvalidArgument(fmt::format("ShardQueue::resize: {} workers out of range [1, {}]",
                                      new_workers, kMaxWorkers));
  }
  std::vector<int> unreleased;
  for (int w = new_workers; w < workers(); ++w) {
    if (!released_[static_cast<size_t>(w)]) unreleased.push_back(w);
  }
  if (!unreleased.empty()) {
    throw InvalidArgument(
        fmt::format("ShardQueue::resize: to {} workers, worker(s) {} must be released first",
                    new_workers, fmt::join(unreleased, ", ")));
  }
  const auto n = static_cast<size_t>(new_workers);
  pools_.resize(n);
  pool_samples_.resize(n, 0);
  released_.resize(n, 0);
  open_.resize(n);
}

ShardQueue::Counts ShardQueue::counts() const {
  if (epoch_ < 0) return {};
  return {num_shards_ - shards_done_ - shards_doing_, shards_doing_, shards_done_};
}

int64_t ShardQueue::pool_size(int worker) const {
  check_worker(worker, "pool_size");
  return pool_samples_[static_cast<size_t>(worker)];
}

std::string ShardQueue::serialize() const {
  check_no_step("serialize");
  Writer out;
  out.bytes(kMagic, sizeof kMagic);
  out.u32(kVersion);
  out.i64(options_.shard_samples);
  out.u64(options_.seed);
  out.u8(options_.shuffle ? 1 : 0);
  out.i64(num_samples_);
  out.u32(static_cast<uint32_t>(workers()));
  out.i64(epoch_);
  for (char r : released_) out.u8(r ? 1 : 0);
  auto pieces = [&](const std::deque<Piece>& d) {
    out.u64(d.size());
    for (const Piece& p : d) {
      out.i64(p.begin);
      out.i64(p.end);
    }
  };
  pieces(todo_);
  for (const auto& pool : pools_) pieces(pool);
  out.u64(done_.size());
  for (int64_t d : done_) out.i64(d);
  out.u64(fnv1a(out.str()));
  return std::move(out.str());
}

ShardQueue ShardQueue::deserialize(std::string_view bytes, int64_t max_samples) {
  return ShardQueueCodec::read(bytes, max_samples);
}

}  // namespace weft::data
