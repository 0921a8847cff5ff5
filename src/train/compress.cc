// Compression options, their names and checks, the codec factory, the
// uncompressed codec and the automatic choice (see weft/compress.h).
#include "weft/compress.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>

#include "train/codecs.h"
#include "weft/errors.h"

namespace weft::train {
namespace {

// The float32 allreduce (Avg) the engine does without compression, as a
// codec (for the automatic choice, which may switch to and from it).
class NoneCodec final : public GradientCodec {
 public:
  explicit NoneCodec(const CodecLayout& layout) : residual_(layout.numel, 0.0f) {}
  // A residual moved here from another codec (the automatic choice switched
  // to none) is sent with the next call's gradient.
  std::string name() const override { return "none"; }
  void average(Communicator& comm, std::span<float> grad, Timeout timeout) override {
    codecs::Stopwatch watch;
    for (size_t i = 0; i < grad.size(); ++i) {
      grad[i] += residual_[i];
      residual_[i] = 0.0f;
    }
    comm.allreduce(Buffer(grad.data(), grad.size(), DType::Float32),
                   AllreduceOptions{ReduceOp::Avg, timeout});
    stats_.calls += 1;
    stats_.comm_seconds += watch.lap();
    stats_.bytes_sent += codecs::ring_allreduce_bytes(grad.size_bytes(), comm.size());
  }
  uint64_t wire_bytes(int world_size) const override {
    return codecs::ring_allreduce_bytes(residual_.size() * sizeof(float), world_size);
  }
  // Nothing is ever left behind.
  std::span<float> residual() override { return residual_; }
  void reset() override { std::fill(residual_.begin(), residual_.end(), 0.0f); }
  CodecStats stats() const override { return stats_; }

 private:
  std::vector<float> residual_;
  CodecStats stats_;
};

double parse_number(std::string_view spec, std::string_view text) {
  double v = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (ec != std::errc() || ptr != end || text.empty()) {
    throw InvalidArgument(fmt::format("--compress {}: '{}' is not a number", spec, text));
  }
  return v;
}

// Momentum inside the codec: a factor in [0, 1), and only for the codecs
// that compress a velocity (top-k, fp16, bf16, int8, sign). none and
// powersgd send the gradient as the optimizer will use it, and auto may
// switch to either.
void check_momentum(const CompressionOptions& options) {
  const std::string spec = compression_name(options);
  if (!(options.momentum >= 0.0 && options.momentum < 1.0)) {
    throw InvalidArgument(
        fmt::format("--compress {}: the momentum correction factor must be in [0, 1), got {}", spec,
                    options.momentum));
  }
  if (options.momentum > 0.0 && (options.automatic || options.codec == CodecKind::None ||
                                 options.codec == CodecKind::PowerSgd)) {
    throw InvalidArgument(fmt::format(
        "--compress {}: momentum inside the codec ({}) is for topk, fp16, bf16, int8 and sign; "
        "with {} the optimizer applies the momentum",
        spec, options.momentum, spec));
  }
}

}  // namespace

size_t CodecTensor::numel() const {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(std::max<int64_t>(d, 0));
  return n;
}

std::string_view codec_kind_name(CodecKind kind) {
  switch (kind) {
    case CodecKind::None: return "none";
    case CodecKind::Fp16: return "fp16";
    case CodecKind::Bf16: return "bf16";
    case CodecKind::Int8: return "int8";
    case CodecKind::TopK: return "topk";
    case CodecKind::Sign: return "sign";
    case CodecKind::PowerSgd: return "powersgd";
  }
  return "?";
}

CompressionOptions parse_compression(std::string_view spec, CompressionOptions base) {
  CompressionOptions o = base;
  o.automatic = false;
  const size_t colon = spec.find(':');
  const std::string_view name = spec.substr(0, colon);
  const bool has_arg = colon != std::string_view::npos;
  const std::string_view arg = has_arg ? spec.substr(colon + 1) : std::string_view{};
  auto no_arg = [&](CodecKind kind) {
    if (has_arg) {
      throw InvalidArgument(fmt::format("--compress {}: {} takes no argument", spec, name));
    }
    o.codec = kind;
    return o;
  };
  if (name == "auto") {
    no_arg(CodecKind::None);
    o.automatic = true;
    return o;
  }
  if (name == "none") return no_arg(CodecKind::None);
  if (name == "fp16") return no_arg(CodecKind::Fp16);
  if (name == "bf16") return no_arg(CodecKind::Bf16);
  if (name == "int8") return no_arg(CodecKind::Int8);
  if (name == "sign") return no_arg(CodecKind::Sign);
  if (name == "topk") {
    o.codec = CodecKind::TopK;
    if (has_arg) {
      const double f = parse_number(spec, arg);
      if (!(f > 0.0 && f <= 1.0)) {
        throw InvalidArgument(fmt::format(
            "--compress {}: the top-k fraction must be in (0, 1] (0.01 sends 1% of the values), "
            "got {}",
            spec, arg));
      }
      o.topk_fraction = f;
    }
    return o;
  }
  if (name == "powersgd") {
    o.codec = CodecKind::PowerSgd;
    if (has_arg) {
      const double r = parse_number(spec, arg);
      if (!(r >= 1.0) || r != std::floor(r) || r > 1e6) {
        throw InvalidArgument(fmt::format(
            "--compress {}: the PowerSGD rank must be a whole number >= 1, got {}", spec, arg));
      }
      o.powersgd_rank = static_cast<int>(r);
    }
    return o;
  }
  throw InvalidArgument(
      fmt::format("--compress {}: unknown codec '{}': expected auto, none, fp16, bf16, int8, "
                  "topk:FRACTION, sign or powersgd:RANK",
                  spec, name));
}

std::string compression_name(const CompressionOptions& o) {
  if (o.automatic) return "auto";
  switch (o.codec) {
    case CodecKind::TopK: return fmt::format("topk:{}", o.topk_fraction);
    case CodecKind::PowerSgd: return fmt::format("powersgd:{}", o.powersgd_rank);
    default: return std::string(codec_kind_name(o.codec));
  }
}

std::unique_ptr<GradientCodec> make_codec(const CompressionOptions& options,
                                          const CodecLayout& layout, int world_size) {
  if (layout.dtype != DType::Float32) {
    throw InvalidArgument(fmt::format(
        "--compress {}: a bucket of {} values cannot be compressed (codecs take float32 "
        "gradients{})",
        compression_name(options), dtype_name(layout.dtype),
        dtype_is_floating(layout.dtype) ? "; other floating buckets are sent as they are"
                                        : "; gradients are never of an integer dtype"));
  }
  if (world_size < 1) {
    throw InvalidArgument(fmt::format("make_codec: world size {} < 1", world_size));
  }
  if (options.chunk == 0) {
    throw InvalidArgument(
        fmt::format("--compress {}: the chunk size must be >= 1", compression_name(options)));
  }
  check_momentum(options);
  switch (options.codec) {
    case CodecKind::None: return std::make_unique<NoneCodec>(layout);
    case CodecKind::Fp16: return codecs::make_half(options, layout, world_size, false);
    case CodecKind::Bf16: return codecs::make_half(options, layout, world_size, true);
    case CodecKind::Int8: return codecs::make_int8(options, layout, world_size);
    case CodecKind::Sign: return codecs::make_sign(options, layout, world_size);
    case CodecKind::TopK: return codecs::make_topk(options, layout, world_size);
    case CodecKind::PowerSgd: return codecs::make_powersgd(options, layout, world_size);
  }
  throw InvalidArgument("make_codec: unknown codec");
}

void validate_compression(const CompressionOptions& options, std::span<const CodecLayout> layouts) {
  const std::string spec = compression_name(options);
  if (!(options.topk_fraction > 0.0 && options.topk_fraction <= 1.0)) {
    throw InvalidArgument(fmt::format("--compress {}: the top-k fraction must be in (0, 1], got {}",
                                      spec, options.topk_fraction));
  }
  if (options.powersgd_rank < 1) {
    throw InvalidArgument(fmt::format("--compress {}: the PowerSGD rank must be >= 1, got {}", spec,
                                      options.powersgd_rank));
  }
  if (options.chunk == 0) {
    throw InvalidArgument(fmt::format("--compress {}: the chunk size must be >= 1", spec));
  }
  check_momentum(options);
  if (options.automatic) return;
  if (options.codec == CodecKind::PowerSgd) {
    size_t best = 0;
    std::string which;
    for (const CodecLayout& l : layouts) {
      std::string w;
      const size_t r = codecs::powersgd_max_rank(l, &w);
      if (r > best) {
        best = r;
        which = w;
      }
    }
    if (best == 0) {
      throw InvalidArgument(fmt::format(
          "--compress {}: the model has no float32 matrix (tensor of 2 or more dimensions) that a "
          "low-rank approximation would make smaller",
          spec));
    }
    if (static_cast<size_t>(options.powersgd_rank) > best) {
      throw InvalidArgument(fmt::format(
          "--compress {}: rank {} is larger than any matrix of the model allows (the largest, "
          "{}, allows {}: the factors of a larger rank would not be smaller than the matrix)",
          spec, options.powersgd_rank, which, best));
    }
  }
}

size_t choose_codec(std::span<const CodecTiming> timings, double slack, double min_gain_seconds) {
  if (timings.empty()) throw InvalidArgument("choose_codec: no candidate");
  double fastest = std::numeric_limits<double>::infinity();
  for (const CodecTiming& t : timings) fastest = std::min(fastest, t.seconds);
  const double bound = std::max(fastest * slack, fastest + min_gain_seconds);
  for (size_t k = 0; k < timings.size(); ++k) {
    if (timings[k].seconds <= bound) return k;
  }
  return 0;
}

}  // namespace weft::train
