// The top-k codec (see weft/compress.h): each rank sends, in every tensor
// of the bucket, the fraction F of its values with the largest magnitudes
// of its gradient plus residual as (index, bfloat16 value) pairs and keeps
// the rest, and the rounding error of what it sent, for the next
// step (error feedback). With momentum m > 0 it applies DGC's momentum
// correction: u = m u + grad, v = v + u, v is what is selected from and the
// residual, and the sent entries are cleared from v and u.
//
// Two ways to average, chosen once from numel, k and the world size (the
// same on every rank):
//   sparse  the indices as LEB128 varint gaps, then the 16-bit values, in
//           one byte payload per rank: an allgather of the payload sizes,
//           an allgatherv of the payloads, and every rank decodes every
//           rank's pairs into a zeroed vector in rank order and divides by
//           n, so every rank ends with the same bits.
//   dense   a float32 allreduce (Avg) of the vector holding the selected
//           values (rounded as the sparse path would send them) and zeros
//           elsewhere: when the pairs of n - 1 ranks would not be smaller
//           than what a ring allreduce sends.
//
// What holds (the error-feedback invariant): without momentum, summed over
// the ranks, the residuals plus n times the sum of the averages equal the
// sum of every rank's gradients over the steps (up to float rounding of
// the average). With momentum, the same holds with the gradients replaced
// by the velocities u added to v at each step (after the masking of the
// previous steps): v_t = v_{t-1} + u_t - sent_t.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "train/codecs.h"
#include "weft/errors.h"

namespace weft::train::codecs {
namespace {

// Bytes of the LEB128 varint of v.
size_t varint_size(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    ++n;
  }
  return n;
}

void put_varint(std::vector<uint8_t>& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<uint8_t>(v | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<uint8_t>(v));
}

// Reads a varint from [*pos, end); throws DataError naming `what` on a
// truncated or overlong one.
uint64_t get_varint(const uint8_t* data, size_t size, size_t* pos, const std::string& what) {
  uint64_t v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (*pos >= size) throw DataError(fmt::format("{}: truncated varint", what));
    const uint8_t b = data[(*pos)++];
    if (shift == 63 && (b & 0x7e) != 0) {
      throw DataError(fmt::format("{}: varint overflows 64 bits", what));
    }
    v |= static_cast<uint64_t>(b & 0x7f) << shift;
    if ((b & 0x80) == 0) return v;
  }
  throw DataError(fmt::format("{}: varint longer than 10 bytes", what));
}

// The value as sent: bfloat16 (float32's range, so only infinities need
// clamping; a NaN stays a NaN so that a diverging run shows).
BFloat16 encode_value(float x) {
  BFloat16 b = float_to_bfloat16(x);
  // A finite value that rounds up to inf is clamped to the largest finite
  // bfloat16; an inf (an overflowed gradient) is sent as inf, so that the
  // application sees it.
  if (!std::isinf(x) && std::isinf(bfloat16_to_float(b)))
    b.bits = static_cast<uint16_t>((b.bits & 0x8000u) | 0x7f7fu);
  return b;
}

class TopKCodec final : public GradientCodec {
 public:
  TopKCodec(const CompressionOptions& options, const CodecLayout& layout, int world_size)
      : fraction_(options.topk_fraction),
        momentum_(options.momentum),
        numel_(layout.numel),
        world_size_(world_size),
        residual_(layout.numel, 0.0f),
        velocity_(options.momentum > 0 ? layout.numel : 0, 0.0f) {
    // One segment per tensor when the tensors tile the bucket (in order,
    // no gap), else the whole bucket as one.
    std::vector<std::pair<size_t, size_t>> segs;
    size_t at = 0;
    for (const CodecTensor& t : layout.tensors) {
      if (t.offset != at || t.numel() > numel_ - at) break;
      if (t.numel() > 0) segs.emplace_back(at, t.numel());
      at += t.numel();
    }
    if (at != numel_ || segs.empty()) segs.assign(1, {0, numel_});
    k_ = 0;
    for (const auto& [begin, len] : segs) {
      const double want = std::ceil(fraction_ * static_cast<double>(len));
      const size_t k = std::min(len, std::max<size_t>(1, static_cast<size_t>(want)));
      segments_.push_back(Segment{begin, len, k});
      k_ += k;
    }
  }

  std::string name() const override {
    return fmt::format("topk:{}({})", fraction_, sparse(world_size_) ? "sparse" : "dense");
  }

  void average(Communicator& comm, std::span<float> grad, Timeout timeout) override {
    if (grad.size() != numel_) {
      throw InvalidArgument(fmt::format(
          "topk codec: bucket of {} values, the codec's layout has {}", grad.size(), numel_));
    }
    stats_.calls += 1;
    if (numel_ == 0) return;
    const int n = comm.size();
    Stopwatch watch;
    accumulate(grad);
    select();
    if (sparse(n)) {
      average_sparse(comm, grad, timeout, watch);
    } else {
      average_dense(comm, grad, timeout, watch);
    }
    stats_.codec_seconds += watch.lap();
  }

  uint64_t wire_bytes(int world_size) const override {
    if (sparse(world_size)) {
      return allgather_bytes(sizeof(uint64_t), world_size) +
             allgather_bytes(expected_payload(), world_size);
    }
    return ring_allreduce_bytes(numel_ * sizeof(float), world_size);
  }

  std::span<float> residual() override { return residual_; }
  void reset() override {
    std::fill(residual_.begin(), residual_.end(), 0.0f);
    std::fill(velocity_.begin(), velocity_.end(), 0.0f);
  }
  CodecStats stats() const override { return stats_; }

 private:
  // The payload of k pairs by the model: a varint of the count, 2 bytes of
  // value per pair and the expected varint size of the gaps, taken as
  // geometric with mean numel / k: a gap takes 1 + the number of powers of
  // 128 it reaches, P(gap >= 128^j) = exp(-128^j k / numel).
  uint64_t expected_payload() const {
    const double mean = static_cast<double>(numel_) / static_cast<double>(std::max<size_t>(k_, 1));
    double gap_bytes = 1.0;
    for (double t = 128.0; t < 1e19; t *= 128.0) gap_bytes += std::exp(-t / mean);
    return varint_size(k_) +
           static_cast<uint64_t>(std::ceil(static_cast<double>(k_) * (2.0 + gap_bytes)));
  }
  // The cost model: sparse while n - 1 ranks' pairs (and the size exchange)
  // are fewer bytes than a ring allreduce of the float32 bucket. One rank
  // decides as two would (it sends nothing either way).
  bool sparse(int world_size) const {
    const int n = std::max(world_size, 2);
    return allgather_bytes(sizeof(uint64_t), n) + allgather_bytes(expected_payload(), n) <
           ring_allreduce_bytes(numel_ * sizeof(float), n);
  }

  // residual_ += grad, or with momentum u = m u + grad, v += u.
  void accumulate(std::span<const float> grad) {
    if (momentum_ > 0) {
      const auto m = static_cast<float>(momentum_);
      for (size_t i = 0; i < numel_; ++i) {
        velocity_[i] = m * velocity_[i] + grad[i];
        residual_[i] += velocity_[i];
      }
    } else {
      for (size_t i = 0; i < numel_; ++i) residual_[i] += grad[i];
    }
  }

  // indices_: in each tensor, its k largest |residual_| (ties to the lower
  // index), sorted; values_: their bfloat16 values; the residual keeps the
  // rest and the rounding error; sent entries are cleared from the
  // velocity. Per tensor, as DGC selects per layer: a layer of small
  // gradients (a convolution next to a large fully connected layer) still
  // sends its share every step instead of waiting in the residual.
  void select() {
    key_.resize(numel_);
    for (size_t i = 0; i < numel_; ++i) {
      const float a = std::fabs(residual_[i]);
      key_[i] = std::isnan(a) ? std::numeric_limits<float>::infinity() : a;
    }
    order_.resize(numel_);
    std::iota(order_.begin(), order_.end(), uint32_t{0});
    indices_.clear();
    for (const Segment& seg : segments_) {
      const auto first = order_.begin() + static_cast<std::ptrdiff_t>(seg.begin);
      const auto last = first + static_cast<std::ptrdiff_t>(seg.len);
      const auto kth = first + static_cast<std::ptrdiff_t>(seg.k);
      if (seg.k < seg.len) {
        std::nth_element(first, kth, last, [this](uint32_t a, uint32_t b) {
          return key_[a] > key_[b] || (key_[a] == key_[b] && a < b);
        });
      }
      const size_t from = indices_.size();
      indices_.insert(indices_.end(), first, kth);
      std::sort(indices_.begin() + static_cast<std::ptrdiff_t>(from), indices_.end());
    }
    values_.resize(k_);
    for (size_t j = 0; j < k_; ++j) {
      const uint32_t i = indices_[j];
      values_[j] = encode_value(residual_[i]);
      const float sent = bfloat16_to_float(values_[j]);
      // x - round(x) is exact in float32: nothing is lost.
      residual_[i] = std::isfinite(sent) ? residual_[i] - sent : 0.0f;
      if (!velocity_.empty()) velocity_[i] = 0.0f;
    }
  }

  void encode() {
    payload_.clear();
    payload_.reserve(varint_size(k_) + k_ * 4);
    put_varint(payload_, k_);
    uint64_t prev = 0;
    for (size_t j = 0; j < k_; ++j) {
      const uint64_t idx = indices_[j];
      put_varint(payload_, j == 0 ? idx : idx - prev - 1);
      prev = idx;
    }
    for (const BFloat16& v : values_) {
      payload_.push_back(static_cast<uint8_t>(v.bits & 0xff));
      payload_.push_back(static_cast<uint8_t>(v.bits >> 8));
    }
  }

  // Adds the pairs of `data` (rank `rank`'s payload) into sum_; throws
  // DataError on anything out of bounds.
  void decode_add(const uint8_t* data, size_t size, int rank) {
    const std::string what = fmt::format("topk payload of rank {} ({} bytes)", rank, size);
    size_t pos = 0;
    const uint64_t count = get_varint(data, size, &pos, what);
    if (count > numel_) {
      throw DataError(fmt::format("{}: {} pairs for a bucket of {} values", what, count, numel_));
    }
    // Each pair takes at least 3 bytes (a 1-byte gap and a 2-byte value).
    if (count > (size - pos) / 3) {
      throw DataError(fmt::format("{}: {} pairs cannot fit in {} bytes", what, count, size - pos));
    }
    decoded_.resize(count);
    uint64_t next = 0;  // the smallest index the next pair may have
    for (uint64_t j = 0; j < count; ++j) {
      const uint64_t gap = get_varint(data, size, &pos, what);
      if (next >= numel_ || gap >= numel_ - next) {
        throw DataError(
            fmt::format("{}: pair {} has an index beyond the bucket's {} values", what, j, numel_));
      }
      decoded_[j] = static_cast<uint32_t>(next + gap);
      next = next + gap + 1;
    }
    if (size - pos != count * 2) {
      throw DataError(fmt::format("{}: {} bytes of values for {} pairs (expected {})", what,
                                  size - pos, count, count * 2));
    }
    for (uint64_t j = 0; j < count; ++j) {
      BFloat16 b;
      b.bits = static_cast<uint16_t>(data[pos] | (data[pos + 1] << 8));
      pos += 2;
      sum_[decoded_[j]] += bfloat16_to_float(b);
    }
  }

  void average_sparse(Communicator& comm, std::span<float> grad, Timeout timeout,
                      Stopwatch& watch) {
    const int n = comm.size();
    encode();
    sum_.assign(numel_, 0.0f);
    if (n == 1) {
      decode_add(payload_.data(), payload_.size(), 0);
      std::copy(sum_.begin(), sum_.end(), grad.begin());
      return;
    }
    stats_.codec_seconds += watch.lap();
    // The payload sizes, then the payloads.
    sizes_.assign(static_cast<size_t>(n), 0);
    const auto mine = static_cast<int64_t>(payload_.size());
    comm.allgather(ConstBuffer(&mine, 1, DType::Int64),
                   Buffer(sizes_.data(), sizes_.size(), DType::Int64), CollectiveOptions{timeout});
    // The largest payload a rank can send: the count, k = numel pairs with
    // the longest gaps, their values.
    const uint64_t limit = 10 + numel_ * (10 + sizeof(uint16_t));
    counts_.resize(static_cast<size_t>(n));
    uint64_t total = 0;
    for (int r = 0; r < n; ++r) {
      const int64_t s = sizes_[static_cast<size_t>(r)];
      if (s < 0 || static_cast<uint64_t>(s) > limit) {
        throw DataError(fmt::format(
            "topk: rank {} announces a payload of {} bytes (at most {} for a bucket of {} values)",
            r, s, limit, numel_));
      }
      counts_[static_cast<size_t>(r)] = static_cast<size_t>(s);
      total += static_cast<uint64_t>(s);
    }
    if (counts_[static_cast<size_t>(comm.rank())] != payload_.size()) {
      throw InternalError(
          "topk: the allgather of payload sizes returned another size for this rank");
    }
    received_.resize(total);
    comm.allgatherv(ConstBuffer(payload_.data(), payload_.size(), DType::UInt8),
                    Buffer(received_.data(), received_.size(), DType::UInt8), counts_,
                    CollectiveOptions{timeout});
    stats_.comm_seconds += watch.lap();
    stats_.bytes_sent += allgather_bytes(sizeof(int64_t), n) +
                         total * static_cast<uint64_t>(n - 1) / static_cast<uint64_t>(n);
    size_t at = 0;
    for (int r = 0; r < n; ++r) {
      decode_add(received_.data() + at, counts_[static_cast<size_t>(r)], r);
      at += counts_[static_cast<size_t>(r)];
    }
    const auto fn = static_cast<float>(n);
    for (size_t i = 0; i < numel_; ++i) grad[i] = sum_[i] / fn;
  }

  void average_dense(Communicator& comm, std::span<float> grad, Timeout timeout, Stopwatch& watch) {
    std::fill(grad.begin(), grad.end(), 0.0f);
    for (size_t j = 0; j < k_; ++j) grad[indices_[j]] = bfloat16_to_float(values_[j]);
    if (comm.size() == 1) return;
    stats_.codec_seconds += watch.lap();
    comm.allreduce(Buffer(grad.data(), grad.size(), DType::Float32),
                   AllreduceOptions{ReduceOp::Avg, timeout});
    stats_.comm_seconds += watch.lap();
    stats_.bytes_sent += ring_allreduce_bytes(grad.size_bytes(), comm.size());
  }

  double fraction_;
  double momentum_;
  size_t numel_;
  int world_size_;
  // A tensor of the bucket: [begin, begin + len), k values sent per step.
  struct Segment {
    size_t begin = 0;
    size_t len = 0;
    size_t k = 0;
  };
  std::vector<Segment> segments_;
  size_t k_ = 1;                 // the sum of the segments' k
  std::vector<float> residual_;  // e, or v with momentum
  std::vector<float> velocity_;  // u (momentum only)
  // Buffers kept across calls.
  std::vector<float> key_;
  std::vector<uint32_t> order_;
  std::vector<uint32_t> indices_;
  std::vector<BFloat16> values_;
  std::vector<uint8_t> payload_;
  std::vector<int64_t> sizes_;
  std::vector<size_t> counts_;
  std::vector<uint8_t> received_;
  std::vector<uint32_t> decoded_;
  std::vector<float> sum_;
  CodecStats stats_;
};

}  // namespace

std::unique_ptr<GradientCodec> make_topk(const CompressionOptions& options,
                                         const CodecLayout& layout, int world_size) {
  const std::string spec = compression_name(options);
  if (!(options.topk_fraction > 0.0 && options.topk_fraction <= 1.0)) {
    throw InvalidArgument(fmt::format("--compress {}: the top-k fraction must be in (0, 1], got {}",
                                      spec, options.topk_fraction));
  }
  // The momentum factor is checked by make_codec() (compress.cc) for every codec.
  if (layout.numel > std::numeric_limits<uint32_t>::max()) {
    throw InvalidArgument(
        fmt::format("--compress {}: a bucket of {} values is too large for 32-bit indices", spec,
                    layout.numel));
  }
  return std::make_unique<TopKCodec>(options, layout, world_size);
}

}  // namespace weft::train::codecs
