// Training state that survives: what a run must keep to go on after a
// failure (parameters, optimizer state, step and epoch, data position, RNG
// states, learning-rate schedule position), as one self-describing,
// checksummed byte image, and on-disk checkpoints of such images.
//
//   weft::train::TrainState state;
//   state.add_engine(engine);                       // every parameter and state buffer
//   state.add_int("step", &step);
//   state.add_blob("data", [&] { return queue.serialize(); },
//                  [&](std::string_view b) { queue = ShardQueue::deserialize(b); });
//   weft::train::CheckpointWriter writer("ckpt", /*keep=*/3);
//   ...
//   if (step % 100 == 0) writer.write(state.snapshot({.step = step, .epoch = epoch}), meta);
//   ...
//   if (auto latest = weft::train::load_latest("ckpt")) state.restore(latest->second);
//
// Entries refer to live memory (tensors, integers) or to callbacks (blobs,
// e.g. an optimizer saved by its library, an RNG state, a data ledger):
// snapshot() copies them out, restore() writes them back in place. The
// memory must stay valid while the TrainState is used.
//
// The image (little-endian; docs/CHECKPOINT.md): a header (magic "WFCK",
// format version, the metadata, the number of entries, a CRC-32 of the
// header), then per entry its name, kind (tensor, int, blob), dtype, shape,
// payload length, payload and a CRC-32 of all of that. Every length read is
// bounded by the bytes present before anything is allocated.
//
// Thread safety: a TrainState is used from one thread (the training loop).
// A CheckpointWriter's write() and flush() may be called from one thread
// while its own thread writes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "weft/types.h"

namespace weft::train {

class DataParallel;

// What an image says about itself.
struct CheckpointMeta {
  int64_t step = 0;   // completed steps
  int64_t epoch = 0;  // the epoch in progress (or the last one, complete)
  int world_size = 0;
  uint32_t generation = 0;  // elastic generation (0 outside elastic runs)
  std::string membership;   // the members of the generation, free text
  // The Weft version that wrote the image (snapshot() fills in weft::version()
  // when empty).
  std::string weft_version;
  // The fingerprint of the state's layout (TrainState::fingerprint()):
  // snapshot() always writes the state's own, whatever is passed in.
  std::string model;
};

class TrainState {
 public:
  // Limits on what an image may hold (checked by add_* and on decode).
  static constexpr size_t kMaxNameBytes = 4096;
  static constexpr size_t kMaxDims = 16;

  // A contiguous, row-major tensor of `dtype` and `shape` at `data`.
  // Throws weft::InvalidArgument for an empty or duplicate name (or one
  // longer than kMaxNameBytes), a null pointer, a negative dimension or more
  // than kMaxDims dimensions.
  void add_tensor(std::string name, DType dtype, std::vector<int64_t> shape, void* data);
  // Every parameter and state buffer of the engine, under its name.
  void add_engine(const DataParallel& engine);
  // A 64-bit integer (step, epoch, a counter).
  void add_int(std::string name, int64_t* value);
  // Bytes produced and consumed by callbacks (an optimizer, an RNG state,
  // a learning-rate schedule, the shard queue's ledger). `validate`, when
  // given, is called by restore() with the image's bytes before anything is
  // written and must throw (a weft::Error naming the problem) for bytes
  // that `load` would refuse; `load` runs only after every entry has been
  // validated. A blob without `validate` whose `load` throws leaves the
  // tensors and integers unchanged (blobs are loaded first) but may leave the
  // blobs loaded before it changed.
  void add_blob(std::string name, std::function<std::string()> save,
                std::function<void(std::string_view)> load,
                std::function<void(std::string_view)> validate = {});

  // The layout: one line per entry, in the order they were added,
  // "tensor <name> <dtype> [<shape>]", "int <name>" or "blob <name>".
  // Two states with the same fingerprint can exchange images.
  std::string fingerprint() const;
  size_t size() const { return entries_.size(); }

  // The whole state as one image (see above), with `meta`'s fields
  // (weft_version filled in when empty, model set to fingerprint()).
  std::vector<std::byte> snapshot(const CheckpointMeta& meta) const;

  // Validates the whole image first (checksums, bounds, the Weft version
  // against weft::version(), the fingerprint and every entry: present,
  // same kind, dtype and shape, payload of the right length; blob
  // validators) and only then writes it into the live memory: an image that
  // is refused changes nothing. Throws weft::DataError for a corrupt or
  // truncated image, weft::InvalidArgument for an image of another model or
  // another Weft version, each naming the entry and what is wrong.
  // Returns the image's metadata.
  CheckpointMeta restore(std::span<const std::byte> image) const;

 private:
  enum class Kind : uint8_t { Tensor = 1, Int = 2, Blob = 3 };
  struct Entry {
    std::string name;
    Kind kind = Kind::Tensor;
    DType dtype = DType::UInt8;
    std::vector<int64_t> shape;
    void* data = nullptr;  // tensor, int
    std::function<std::string()> save;
    std::function<void(std::string_view)> load;
    std::function<void(std::string_view)> validate;
    size_t bytes() const;  // tensor, int
  };
  void add(Entry e);
  std::vector<Entry> entries_;
  friend struct CheckpointCodec;
};

// The metadata of an image, after checking the header and every entry's
// bounds and checksum (the whole image is read). Throws weft::DataError
// naming what is wrong.
CheckpointMeta read_meta(std::span<const std::byte> image);

// The file name of the checkpoint of `step`: "ckpt-<step, 12 digits>.weft".
std::string checkpoint_file_name(int64_t step);

// Disk checkpoints, written off the training thread.
//
// Each image goes to <dir>/ckpt-<step 12 digits>.weft: written to a
// temporary file in dir (".ckpt-<step>.weft.tmp.<pid>"), fsync'ed, renamed
// over the final name, then the directory fsync'ed, so that a crash at any
// moment leaves either the previous set of checkpoints or the new one,
// never a partial file under a checkpoint's name. After each write only the
// newest `keep` checkpoints (by step) are kept.
//
// One write is in progress at a time and at most one waits: a write()
// while another waits replaces it (the newer state supersedes; dropped()
// counts them), so that training never blocks on a slow disk.
class CheckpointWriter {
 public:
  // Creates dir (and its parents) when missing and checks that a file can be
  // created in it; keep >= 1. Throws weft::InvalidArgument naming the
  // directory and the reason (e.g. "Permission denied") otherwise.
  explicit CheckpointWriter(std::string dir, int keep = 3);
  // Waits for the queued writes (an error is logged, not thrown).
  ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  // Queues the image of meta.step and returns at once. Rethrows the error
  // of an earlier write that failed (weft::DataError naming the file).
  void write(std::vector<std::byte> image, const CheckpointMeta& meta);
  // Waits until every queued image is on disk; rethrows the error of a
  // write that failed (weft::DataError naming the file and the reason).
  void flush();

  const std::string& dir() const;
  int64_t written() const;  // images on disk so far
  int64_t dropped() const;  // images replaced by a newer one before being written

 private:
  struct Impl;  // the queue, its lock and the writing thread (checkpoint.cc)
  std::unique_ptr<Impl> impl_;
};

// The newest valid checkpoint of dir (by step): its metadata and image. A
// corrupt or truncated checkpoint is skipped, logged, and named in
// `skipped` ("<path>: <reason>"), and the next older one tried. nullopt
// when dir does not exist or holds no valid checkpoint. Throws
// weft::DataError when dir exists but cannot be read.
std::optional<std::pair<CheckpointMeta, std::vector<std::byte>>> load_latest(
    const std::string& dir, std::vector<std::string>* skipped = nullptr);

}  // namespace weft::train
