// The data layer: reading IDX files (the format of MNIST and Fashion-MNIST),
// an in-memory image classification Dataset with batch assembly, and a
// deterministic DistributedSampler that splits every epoch into per-rank
// shards.
//
// Plain buffers only (no tensor library): images are float32 in NCHW order,
// labels int64, ready to be wrapped by a tensor without a copy.
//
// Errors: a missing, truncated or corrupt input file throws weft::DataError
// whose message names the file and the problem; a bad argument from the
// caller (a sample index out of range, a rank >= world size, a buffer of the
// wrong size) throws weft::InvalidArgument.
//
// Thread safety: every function here may be called from several threads at
// once. Dataset and DistributedSampler objects are immutable once built, so
// their const methods are safe to call concurrently.
//
// Typical use in a synchronous data-parallel training loop:
//
//   auto train = weft::data::Dataset::load(images_path, labels_path, /*num_classes=*/10);
//   weft::data::DistributedSampler sampler(train->size(), world, rank, {.seed = 42});
//   const int64_t steps = sampler.common_steps_per_epoch(batch, /*drop_last_batch=*/false);
//   for (int64_t epoch = 0; epoch < epochs; ++epoch) {
//     std::vector<int64_t> shard = sampler.shard(epoch);
//     for (int64_t k = 0; k < steps; ++k) {       // same count on every rank
//       auto idx = weft::data::batch_indices(shard, batch, k);
//       weft::data::Batch b = train->batch(idx);  // [B,1,H,W] floats, [B] labels
//       ... forward, backward, allreduce gradients ...
//     }
//   }
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace weft::data {

// ---------------------------------------------------------------------------
// IDX files
// ---------------------------------------------------------------------------
//
// An IDX file is a big-endian header followed by the elements in row-major
// order: a 4-byte magic 0x0000TTNN (TT: element type, NN: number of
// dimensions), then NN dimensions as big-endian uint32, then the payload.
// Only unsigned-byte elements (TT = 0x08) with 1 to 4 dimensions are
// supported, which covers (Fashion-)MNIST:
//   images: magic 0x00000803, dimensions [N, rows, cols]
//   labels: magic 0x00000801, dimensions [N]
//
// Files may be gzip-compressed or raw; the reader tells them apart by their
// content (the gzip magic 1f 8b), not by their name.

inline constexpr uint32_t kIdxImagesMagic = 0x00000803;
inline constexpr uint32_t kIdxLabelsMagic = 0x00000801;
// Default limit on the payload of one IDX file (after decompression).
inline constexpr uint64_t kMaxIdxBytes = uint64_t{1} << 30;

// The content of an IDX file.
struct IdxArray {
  uint32_t magic = 0;           // e.g. kIdxImagesMagic
  std::vector<uint32_t> dims;   // from the header, each > 0
  std::vector<uint8_t> values;  // row-major payload: product(dims) bytes
};

// Reads an IDX file, raw or gzip-compressed.
//
// The header is validated before anything is allocated: the magic (and, when
// expected_magic is not 0, that it equals expected_magic), every dimension
// > 0, and the payload size product(dims), computed with overflow checks, at
// most max_bytes. Then the payload must be exactly that size: a file that
// ends early ("truncated") or has bytes after it ("trailing data") is
// rejected, as is a gzip stream that does not decompress or fails its CRC.
//
// Throws weft::DataError with the path and the problem, e.g.
//   "IDX file /d/train-images-idx3-ubyte.gz: truncated: header says
//    60000 x 28 x 28 = 47040000 bytes, file has 1200000 (decompressed)"
//   "IDX file /d/x: not an IDX file (magic 0x1f8b0808)"
//   "IDX file /d/x: No such file or directory"
IdxArray read_idx(const std::string& path, uint32_t expected_magic = 0,
                  uint64_t max_bytes = kMaxIdxBytes);

// Writes an unsigned-byte IDX file (gzip-compressed when gzip is true), e.g.
// to build small synthetic datasets for tests. values.size() must equal the
// product of dims (else weft::InvalidArgument); I/O failures throw
// weft::DataError naming the file.
void write_idx(const std::string& path, std::span<const uint32_t> dims,
               std::span<const uint8_t> values, bool gzip);

// ---------------------------------------------------------------------------
// Dataset
// ---------------------------------------------------------------------------

// Where a particular dataset lives, how its files are named and what its
// classes are called is the application's business (examples/fashion_mnist
// finds Fashion-MNIST); the library loads any pair of IDX files.

// One batch, assembled by copying samples: images [size, C, H, W] float32
// (contiguous, NCHW), labels [size] int64.
struct Batch {
  int64_t size = 0;
  std::vector<float> images;
  std::vector<int64_t> labels;
};

// A labelled image classification dataset (single channel), decoded once
// into memory: pixels as float32 in [0, 1] (byte value / 255, the same as
// the reference PyTorch script's ToTensor), labels as int64 in
// [0, num_classes).
//
// Loading is cached per process: the loaders keep every dataset they decoded
// in a process-wide cache keyed by the files' absolute paths (plus their size
// and modification time, so a rewritten file is decoded again) and the
// number of classes. Loading the same files again, from any thread, returns
// the same object without reading or decoding anything; concurrent loads of
// the same files decode once. The cache holds its datasets until
// clear_cache() (60000 images of 28x28 are ~190 MB of floats).
class Dataset {
 public:
  // Loads an images IDX file (magic 0x803, [N, rows, cols]) and a labels IDX
  // file (magic 0x801, [N]). Checks that both hold the same N and that every
  // label is < num_classes. Throws weft::DataError naming the offending file.
  static std::shared_ptr<const Dataset> load(const std::string& images_path,
                                             const std::string& labels_path, int num_classes);

  // Drops the cache's references (datasets still held by callers live on).
  static void clear_cache();
  // Number of datasets in the cache.
  static size_t cache_size();

  Dataset(const Dataset&) = delete;
  Dataset& operator=(const Dataset&) = delete;

  int64_t size() const { return size_; }  // number of samples
  int channels() const { return 1; }
  int height() const { return height_; }
  int width() const { return width_; }
  int64_t sample_numel() const { return int64_t{height_} * width_; }  // C*H*W floats
  int num_classes() const { return num_classes_; }
  const std::string& images_path() const { return images_path_; }
  const std::string& labels_path() const { return labels_path_; }

  // Sample i (0 <= i < size(), else weft::InvalidArgument).
  std::span<const float> image(int64_t i) const;
  int64_t label(int64_t i) const;
  // Every sample: images [size, C, H, W], labels [size].
  std::span<const float> images() const { return images_; }
  std::span<const int64_t> labels() const { return labels_; }

  // Assembles the samples `indices` (in that order, repeats allowed) into
  // caller-provided buffers: images must hold indices.size() * sample_numel()
  // floats and labels indices.size() values, else weft::InvalidArgument.
  // One memcpy per sample. An index out of range throws
  // weft::InvalidArgument before anything is written.
  void fill_batch(std::span<const int64_t> indices, std::span<float> images,
                  std::span<int64_t> labels) const;
  // Same, into a newly allocated Batch.
  Batch batch(std::span<const int64_t> indices) const;

 private:
  Dataset() = default;
  friend struct DatasetLoader;

  int64_t size_ = 0;
  int height_ = 0;
  int width_ = 0;
  int num_classes_ = 0;
  std::string images_path_;
  std::string labels_path_;
  std::vector<float> images_;
  std::vector<int64_t> labels_;
};

// ---------------------------------------------------------------------------
// Deterministic shuffling
// ---------------------------------------------------------------------------
//
// The permutation of epoch e under seed s is defined exactly, so that every
// rank computes the same one on its own, on any platform and standard
// library (std::shuffle and the std:: distributions are not portable):
//
//   1. state = s ^ mix64(e), where mix64 is the SplitMix64 finalizer
//        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
//        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
//        z =  z ^ (z >> 31)
//   2. next() is SplitMix64: state += 0x9E3779B97F4A7C15; return mix64(state).
//   3. uniform(n), an unbiased value in [0, n): draw r = next() until
//      r >= (2^64 - n) % n, return r % n.
//   4. Fisher-Yates: p = [0, 1, ..., N-1]; for i = N-1 down to 1:
//      swap(p[i], p[uniform(i + 1)]).
//
// Changing any of this changes which samples every rank sees: don't.

// The permutation of [0, n) for (seed, epoch) defined above. epoch >= 0.
std::vector<int64_t> shuffled_indices(int64_t n, uint64_t seed, int64_t epoch);

// ---------------------------------------------------------------------------
// Distributed sampling
// ---------------------------------------------------------------------------

// What to do with the N % W samples left over when the N samples of an
// epoch do not divide evenly among W ranks.
enum class Remainder {
  // Recommended default. Every sample is seen exactly once per epoch: the
  // first N % W ranks get floor(N/W) + 1 samples, the others floor(N/W)
  // (shard sizes differ by at most 1). Ranks can then have different numbers
  // of batches: use common_steps_per_epoch() to stay in lockstep.
  Spread,
  // Every rank gets floor(N/W) samples; the last N % W samples of the
  // epoch's permutation are not seen this epoch (with shuffling, a different
  // set each epoch). When N < W every shard is empty.
  DropLast,
  // Every rank gets ceil(N/W) samples: the permutation is extended by
  // wrapping around to its start (p[0], p[1], ...) until it holds
  // W * ceil(N/W) indices, so W * ceil(N/W) - N samples are seen twice this
  // epoch (more than twice only when N < W). This is what PyTorch's
  // DistributedSampler does by default.
  Pad,
};

struct SamplerOptions {
  uint64_t seed = 0;    // same on every rank
  bool shuffle = true;  // false: the identity permutation every epoch
  Remainder remainder = Remainder::Spread;
};

// Number of batches of batch_size (> 0) in a shard of shard_size samples:
// ceil(shard_size / batch_size), or floor(...) when drop_last_batch is true
// (a short last batch is dropped).
int64_t num_batches(int64_t shard_size, int64_t batch_size, bool drop_last_batch);

// The indices of batch `step` (0-based) of a shard: shard[step * batch_size,
// min((step + 1) * batch_size, shard.size())). The last batch may be
// shorter. step out of range (no index in it) throws weft::InvalidArgument.
std::span<const int64_t> batch_indices(std::span<const int64_t> shard, int64_t batch_size,
                                       int64_t step);

// Splits each epoch's permutation of [0, num_samples) into world_size
// disjoint contiguous shards, one per rank: rank r gets the r-th block (see
// Remainder for the block sizes). With Spread, the shards of one epoch
// together hold every index exactly once; with DropLast, at most once; with
// Pad, every index at least once.
//
// Every rank builds its own sampler with the same num_samples, world_size
// and options; no communication is needed because the permutation depends
// only on (seed, epoch). Changing the world size (elastic resize) changes
// the split from the next shard() call on.
//
// Synchronous training needs every rank to run the same number of steps
// (each step is an allreduce every rank must join). With Spread and
// N % W != 0 the shards differ by one sample, so the step counts of ranks
// can differ by one; call common_steps_per_epoch() and run exactly that many
// steps on every rank: a rank with a longer shard then skips its last batch
// (those samples are not seen this epoch; with shuffling a different few each
// epoch). The value depends only on the sampler's parameters, so every rank
// computes it without communication. DropLast and Pad give every rank the
// same shard size, hence the same step count; with drop_last_batch = true as
// well, every step is a full batch of the same size on every rank (with
// false, the last batch is short, equally on every rank).
//
// For dynamic assignment (load balancing, elastic training) see
// weft::data::ShardQueue in weft/shard_queue.h: the epoch's permutation cut
// into small shards, handed to each worker as its share of each step asks,
// every sample trained exactly once per epoch across re-plans, failures and
// resizes. A worker trains the indices it is handed with
// Dataset::fill_batch(), exactly as with a static shard.
class DistributedSampler {
 public:
  // num_samples >= 0, world_size >= 1, 0 <= rank < world_size, else
  // weft::InvalidArgument.
  DistributedSampler(int64_t num_samples, int world_size, int rank, SamplerOptions options = {});

  int64_t num_samples() const { return num_samples_; }
  int world_size() const { return world_size_; }
  int rank() const { return rank_; }
  const SamplerOptions& options() const { return options_; }

  // Samples per epoch of this rank / of any rank (the same every epoch).
  int64_t shard_size() const { return shard_size(rank_); }
  int64_t shard_size(int rank) const;

  // The whole permutation of epoch (>= 0): shuffled_indices(num_samples,
  // seed, epoch), or 0..N-1 when shuffle is false.
  std::vector<int64_t> permutation(int64_t epoch) const;
  // This rank's / any rank's sample indices for epoch, in order. O(N).
  std::vector<int64_t> shard(int64_t epoch) const { return shard(epoch, rank_); }
  std::vector<int64_t> shard(int64_t epoch, int rank) const;

  // Batches per epoch of this rank / of any rank.
  int64_t steps_per_epoch(int64_t batch_size, bool drop_last_batch) const {
    return steps_per_epoch(batch_size, drop_last_batch, rank_);
  }
  int64_t steps_per_epoch(int64_t batch_size, bool drop_last_batch, int rank) const;
  // The minimum of steps_per_epoch over all ranks: the number of steps every
  // rank must run each epoch to stay in lockstep (see the class comment).
  int64_t common_steps_per_epoch(int64_t batch_size, bool drop_last_batch) const;

 private:
  void check_rank(int rank) const;

  int64_t num_samples_;
  int world_size_;
  int rank_;
  SamplerOptions options_;
};

}  // namespace weft::data
