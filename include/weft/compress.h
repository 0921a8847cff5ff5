// Gradient compression: codecs that average a gradient bucket over the
// ranks while sending less than its float32 values, each with error
// feedback, and the choice of codec (one named by the user, or `auto`,
// which measures the link and each codec at start and again now and then,
// and compresses only where that shortens the step).
//
// A codec belongs to one bucket of the engine (weft/train.h) and lives as
// long as the engine: it keeps what it could not send (the residual) and
// adds it to the next step's gradient, so that over the steps everything a
// rank computed is sent, only later. Codecs:
//
//   none       the float32 allreduce (Avg) of the engine
//   fp16, bf16 each value rounded to 16 bits; reduced in two stages: an
//              alltoall of 16-bit slices, a local sum in float32 by the
//              slice's owner, and an allgather of the rounded averages
//              (the owner of a slice keeps that rounding error in its own
//              residual), so that 16 bits per value cross the wire both
//              ways
//   int8       a scale per chunk of `chunk` values, values rounded
//              stochastically to int8; reduced in two stages like fp16
//   sign       1 bit per value and one scale per chunk (signSGD with
//              scale and error feedback), reduced like fp16
//   topk:F     in each tensor of the bucket, its ceil(F * numel) largest
//              magnitudes of (gradient + residual) (per tensor, as DGC
//              selects per layer), as (index, value) pairs: allgatherv of every rank's pairs,
//              summed locally; the cost model falls back to a dense
//              allreduce of the sparse vector when that sends fewer bytes.
//              With `momentum` > 0 it applies DGC's momentum correction
//              (the velocity is accumulated before selection and the sent
//              entries are cleared from it): the optimizer must then not
//              apply momentum itself. fp16, bf16, int8 and sign take
//              `momentum` too: they compress the velocity u = m u + grad
//              in the gradient's place (signSGD with momentum, whose 1-bit
//              average is otherwise amplified by the optimizer's momentum).
//   powersgd:R rank-R approximation P Q^T of each matrix of the bucket
//              (a tensor of 2 or more dimensions, seen as shape[0] x rest)
//              with one power iteration warm-started from the last step's
//              Q: two allreduces of the packed P and Q factors. Tensors for
//              which rank R saves nothing (R * (rows + cols) >= rows *
//              cols), and 1-D ones, are allreduced uncompressed.
//
// Parameters can also be averaged as compressed deltas (local SGD, see
// DataParallelOptions::parameter_compression): each rank sends the change
// of its parameters since the last average through a codec whose residual
// carries forward what was not sent, so nothing is dropped for good (the
// first average after construction, a restore or BSP steps is sent whole).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "weft/communicator.h"
#include "weft/timeout.h"
#include "weft/types.h"

namespace weft::train {

enum class CodecKind : uint8_t { None, Fp16, Bf16, Int8, TopK, Sign, PowerSgd };

// "none", "fp16", "bf16", "int8", "topk", "sign", "powersgd".
std::string_view codec_kind_name(CodecKind kind);

struct CompressionOptions {
  // The codec of every float32 bucket, unless `automatic`.
  CodecKind codec = CodecKind::None;
  // `auto`: measure at start (and every `recheck_steps` steps) and pick,
  // for the whole model, the most faithful of none, fp16, int8 and
  // powersgd:4 that is not clearly slower than the fastest (see
  // choose_codec()).
  bool automatic = false;
  // TopK: fraction of each bucket's elements sent per step, in (0, 1].
  double topk_fraction = 0.01;
  // PowerSgd: the rank of the approximation, >= 1.
  int powersgd_rank = 4;
  // Momentum applied inside the codec, before compression, in [0, 1); 0:
  // none (the optimizer's own). TopK: DGC's momentum correction; fp16,
  // bf16, int8, sign: the velocity is compressed. Refused for none,
  // powersgd and auto.
  double momentum = 0.0;
  // Int8 and Sign: values per scale, >= 1.
  size_t chunk = 1024;
  // Int8's stochastic rounding and PowerSgd's initial Q: seeded from this
  // and the rank, so that runs repeat.
  uint64_t seed = 0x5eed;
  // Auto: steps between re-measurements (0: only at start).
  int64_t recheck_steps = 2000;

  bool enabled() const { return automatic || codec != CodecKind::None; }
};

// Parses a `--compress` value: "auto", "none", "fp16", "bf16", "int8",
// "topk:FRACTION" (topk alone is topk:0.01), "sign", "powersgd:RANK"
// (powersgd alone is powersgd:4). Throws weft::InvalidArgument naming the
// value and what is wrong (an unknown name, a fraction outside (0, 1], a
// rank below 1, trailing text). `base` supplies the other fields.
CompressionOptions parse_compression(std::string_view spec, CompressionOptions base = {});
// The spec of `options`, as parse_compression() reads it: "topk:0.01".
std::string compression_name(const CompressionOptions& options);

// One tensor of a bucket: its name, its offset (in elements) in the
// bucket's flat buffer and its shape.
struct CodecTensor {
  std::string name;
  size_t offset = 0;
  std::vector<int64_t> shape;
  size_t numel() const;
};

// What a codec sees of its bucket.
struct CodecLayout {
  DType dtype = DType::Float32;
  size_t numel = 0;
  std::vector<CodecTensor> tensors;  // in the order of the flat buffer
};

// Counters of one codec since construction.
struct CodecStats {
  int64_t calls = 0;         // average() calls
  uint64_t bytes_sent = 0;   // payload this rank sent, by the codec's model of its collectives
  double codec_seconds = 0;  // encoding and decoding (not waiting for the network)
  double comm_seconds = 0;   // waiting for collectives
};

// One bucket's compressor. Not thread-safe: one thread calls it at a time.
class GradientCodec {
 public:
  virtual ~GradientCodec() = default;
  // "int8(chunk=1024)", "topk:0.01(sparse)".
  virtual std::string name() const = 0;
  // Replaces grad (the bucket, layout.numel float32 values) by the average
  // over comm's ranks of what each rank sends for grad + its residual, and
  // keeps in the residual what this rank did not send. Collective: every
  // rank calls it for the same bucket, in the same order, with the same
  // layout. Throws what the communicator throws (the codec stays usable
  // only with a new communicator after a failure: call reset()).
  virtual void average(Communicator& comm, std::span<float> grad, Timeout timeout) = 0;
  // Bytes this rank sends per average() on `world_size` ranks, by the
  // codec's model (the cost model of the automatic choice; for a sparse
  // codec, its expected size).
  virtual uint64_t wire_bytes(int world_size) const = 0;
  // The error-feedback memory of this rank (layout.numel values; what was
  // computed and not sent yet). Codecs that reduce in two stages (int8,
  // sign) add to it the part of the second stage's rounding error that
  // belongs to the slice this rank owns, so that, summed over the ranks,
  // the residuals plus size() times the sum of the averages equal the sum
  // of every rank's gradients. Writable: the engine moves a residual
  // between codecs when the automatic choice changes.
  virtual std::span<float> residual() = 0;
  // Drops the residual and any warm-start state (a new communicator with
  // other ranks: the old residual belongs to the old average).
  virtual void reset() = 0;
  virtual CodecStats stats() const = 0;
};

// Builds the codec of options.codec for a bucket of `layout` on a
// communicator of `world_size` ranks. Throws weft::InvalidArgument naming
// the option when it cannot apply: a bucket of a dtype other than float32
// (an integer bucket is refused; float64, float16 and bfloat16 buckets are
// sent uncompressed by the engine, not through a codec), a fraction
// outside (0, 1], a rank below 1, a chunk of 0. Top-k sends at least one
// value; a bucket without a matrix PowerSGD can shrink is sent
// uncompressed by it (validate_compression() checks the whole model).
std::unique_ptr<GradientCodec> make_codec(const CompressionOptions& options,
                                          const CodecLayout& layout, int world_size);

// Checks options against a whole model before training starts (the layouts
// of its float32 buckets), raising weft::InvalidArgument with the option's
// name, e.g. "--compress powersgd:200: rank 200 is larger than any matrix of
// the model allows (the largest, fc1.weight [128, 3136], allows 122: ...)":
// a PowerSGD rank must leave some matrix's factors smaller than the matrix,
// r (rows + cols) < rows cols.
void validate_compression(const CompressionOptions& options, std::span<const CodecLayout> layouts);

// One candidate of the automatic choice, measured on the real link.
struct CodecTiming {
  CompressionOptions options;  // the candidate
  double seconds = 0;          // median time of one average() of the whole model, max over ranks
  uint64_t bytes_sent = 0;     // per rank, per step
};

// The automatic choice from measurements: candidates in order of fidelity
// (none first). Picks the first one whose time is at most `slack` (1.10:
// 10%) or `min_gain_seconds` (2 ms), whichever is more, above the fastest
// candidate's, so that a codec is used only where it clearly shortens the
// step and the most faithful of the near-fastest wins. The absolute margin
// is for fast links, where every candidate takes a few milliseconds: there
// a gain that small is within what a shared host's noise moves the
// measurement, and a small part of any real step, not worth a lossy codec.
// Pure: every rank given the same timings picks the same.
size_t choose_codec(std::span<const CodecTiming> timings, double slack = 1.10,
                    double min_gain_seconds = 0.002);

}  // namespace weft::train
