// The dense codecs of weft/compress.h: fp16 and bf16 (each value rounded
// to 16 bits), int8 (a scale per chunk, stochastic rounding) and sign (1
// bit per value, a scale per chunk). All keep error feedback: what a rank
// rounded away stays in its residual and is added to its next gradient.
// With a momentum factor m > 0 each also keeps the velocity u = m u + grad
// and compresses u (plus the residual) in the gradient's place, so that the
// optimizer applies no momentum of its own to a compressed average.
//
// All four reduce in two stages so that the bytes on the wire are the
// compressed ones in both directions (a 16-bit allreduce would send float32
// partial sums in its reduce-scatter):
//   1. x = grad + residual is compressed chunk by chunk; residual = x -
//      decoded(x). The bucket is split into n slices on chunk boundaries
//      (slice j, owned by rank j, holds chunks [j * C / n, (j + 1) * C / n)
//      of the C chunks; some may be empty), and an alltoallv sends slice j
//      of every rank to rank j.
//   2. The owner of a slice decodes the n contributions, sums them in
//      float32 (in rank order) and divides by n, compresses that average
//      again and adds n times the rounding error of that second compression
//      to its own residual on the slice. An allgatherv of the compressed
//      slices then gives every rank the same bytes, which every rank
//      (owner included) decodes into grad: the result is bitwise identical
//      on every rank.
// Invariant (up to float rounding): summed over the ranks, the residuals
// plus n times the sum over steps of the averages equal the sum over ranks
// and steps of the gradients (of the velocities, with momentum). Stage 1
// leaves sum_r residual_r = sum_r x_r - n * avg; stage 2 adds n * (avg -
// decoded2), so that sum_r residual_r = sum_r x_r - n * decoded2, and
// decoded2 is what grad becomes.
//
// A block of the wire (one slice of one rank) is the slice's chunk scales
// (int8 and sign: float32, native byte order like every float Weft sends;
// fp16 and bf16 have none) followed by its values chunk after chunk, each
// chunk starting on a byte (fp16, bf16: two bytes each; int8: one; sign: 8
// per byte, bit k of byte b of a chunk is its value 8b + k, 1 for >= 0).
// Block sizes follow from the layout and the world size alone, and the
// collectives check the counts; what is checked here is the content a peer
// sent: every scale must be a number >= 0 (infinity is allowed: it is what
// an infinite gradient gives, and an uncompressed allreduce would spread it
// too) and an int8 value must not be -128. Every 16-bit pattern is a value
// (NaN and inf included: what an overflowed gradient gives).
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "train/codecs.h"
#include "weft/errors.h"

namespace weft::train::codecs {
namespace {

void check_grad(std::string_view codec, std::span<const float> grad, size_t numel) {
  if (grad.size() != numel) {
    throw InvalidArgument(
        fmt::format("{}: gradient of {} values given to the codec of a bucket of {}", codec,
                    grad.size(), numel));
  }
}

// ---- fp16 / bf16 -----------------------------------------------------------

// float32 value of every fp16 bit pattern (256 KiB, built once): decoding a
// bucket is then one load per value.
const float* half_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t b = 0; b < 65536; ++b) t[b] = half_to_float(Half{static_cast<uint16_t>(b)});
    return t;
  }();
  return table.data();
}

// weft::float_to_half of f clamped to [-65504, 65504] (the finite fp16
// range; NaN stays NaN), round to nearest even, bit-exact with it (tested).
// Written with masks instead of branches and selects, so that GCC neither
// branches around the float addition (which -ftrapping-math then forbids
// to if-convert) nor keeps the loop scalar.
uint16_t half_bits_saturated(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a0 = u & 0x7fffffffu;
  // Finite values beyond 65504 saturate; inf stays inf (below).
  const uint32_t a = a0 > 0x477fe000u ? 0x477fe000u : a0;  // 65504
  // Normal: rebias the exponent 127 -> 15 and round the 13 dropped bits.
  const uint32_t normal = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
  // Subnormal (|f| < 2^-14): adding 0.5 lines the half's last bit up with
  // the float's, and the FPU rounds to nearest even.
  float af;
  std::memcpy(&af, &a, sizeof af);
  const float shifted = af + 0.5f;
  uint32_t su;
  std::memcpy(&su, &shifted, sizeof su);
  const uint32_t sub = su - 0x3f000000u;
  const uint32_t is_sub = 0u - static_cast<uint32_t>(a < 0x38800000u);
  const uint32_t h = (sub & is_sub) | (normal & ~is_sub);
  const uint32_t is_nan = 0u - static_cast<uint32_t>(a0 > 0x7f800000u);
  const uint32_t is_inf = 0u - static_cast<uint32_t>(a0 == 0x7f800000u);
  return static_cast<uint16_t>(sign | (h & ~is_nan & ~is_inf) | (0x7e00u & is_nan) |
                               (0x7c00u & is_inf));
}

// weft::float_to_bfloat16 of f clamped to the finite bfloat16 range (NaN
// stays NaN), bit-exact with it, branch-free like half_bits_saturated().
uint16_t bfloat16_bits_saturated(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a0 = u & 0x7fffffffu;
  // Finite values beyond the largest finite bfloat16 saturate; inf stays inf.
  const uint32_t a = a0 > 0x7f7f0000u && a0 < 0x7f800000u ? 0x7f7f0000u : a0;
  const uint32_t h = (a + 0x7fffu + ((a >> 16) & 1u)) >> 16;
  const uint32_t is_nan = 0u - static_cast<uint32_t>(a0 > 0x7f800000u);
  return static_cast<uint16_t>(sign | (h & ~is_nan) | (((u >> 16) | 0x40u) & is_nan));
}

// fp16 / bf16: each value rounded to 16 bits (finite values clamped to the
// finite range, so that none becomes inf; an inf stays inf: an overflow
// the application must see). No scale: every bit pattern is a value.
template <bool kBf16>
struct HalfScheme {
  static constexpr const char* kName = kBf16 ? "bf16" : "fp16";
  static constexpr size_t kScaleBytes = 0;
  static size_t value_bytes(size_t len) { return 2 * len; }

  static float decode_one(uint16_t h) {
    if constexpr (kBf16) {
      return bfloat16_to_float(BFloat16{h});
    } else {
      return half_table()[h];
    }
  }

  static float encode(float* __restrict x, size_t len, uint8_t* __restrict out, bool, uint32_t,
                      uint32_t) {
    for (size_t i = 0; i < len; ++i) {
      const uint16_t h = kBf16 ? bfloat16_bits_saturated(x[i]) : half_bits_saturated(x[i]);
      std::memcpy(out + 2 * i, &h, sizeof h);
      x[i] -= decode_one(h);
    }
    return 0.0f;
  }

  template <bool kAdd>
  static bool decode(const uint8_t* __restrict in, size_t len, float, float* __restrict out) {
    for (size_t i = 0; i < len; ++i) {
      uint16_t h;
      std::memcpy(&h, in + 2 * i, sizeof h);
      if constexpr (kAdd) {
        out[i] += decode_one(h);
      } else {
        out[i] = decode_one(h);
      }
    }
    return true;
  }
};

// ---- int8 and sign -----------------------------------------------------------

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A uniform number in [0, 1) from (key, i): a counter-based hash, so that
// the stream needs no state and the loop has no dependency between values.
inline float uniform01(uint32_t key, uint32_t i) {
  uint32_t x = key ^ (i * 0x9e3779b9u);
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return static_cast<float>(x >> 8) * (1.0f / 16777216.0f);
}

// The largest |x[i]|, in 8 lanes so that the loop vectorizes; *finite:
// whether every x[i] is finite (x * 0 is NaN for inf and NaN).
float abs_max(const float* __restrict x, size_t len, bool* finite) {
  float m[8] = {};
  float z[8] = {};
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    for (size_t k = 0; k < 8; ++k) {
      const float a = std::fabs(x[i + k]);
      m[k] = m[k] < a ? a : m[k];
      z[k] += x[i + k] * 0.0f;
    }
  }
  for (; i < len; ++i) {
    m[0] = std::max(m[0], std::fabs(x[i]));
    z[0] += x[i] * 0.0f;
  }
  float r = 0.0f;
  float zs = 0.0f;
  for (size_t k = 0; k < 8; ++k) {
    r = std::max(r, m[k]);
    zs += z[k];
  }
  *finite = zs == 0.0f;
  return r;
}

// int8: scale = absmax / 127, q = round(x / scale) in [-127, 127].
struct Int8Scheme {
  static constexpr const char* kName = "int8";
  static constexpr size_t kScaleBytes = sizeof(float);
  // Bytes of the values of a chunk of len values.
  static size_t value_bytes(size_t len) { return len; }

  static int clamp127(int q) {
    q = q < -127 ? -127 : q;
    return q > 127 ? 127 : q;
  }

  // Compresses x[0, len) (one chunk) into out (value bytes) and returns the
  // scale; x becomes x - decoded. stochastic: rounding up with probability
  // the fraction (key, first: the random stream), else to nearest.
  static float encode(float* __restrict x, size_t len, uint8_t* __restrict out, bool stochastic,
                      uint32_t key, uint32_t first) {
    bool finite = true;
    const float absmax = abs_max(x, len, &finite);
    if (!finite) {
      // A non-finite gradient: the scale is infinite and the values 0, so
      // that the average is NaN there, as an uncompressed allreduce's
      // would be (and so is the residual).
      std::memset(out, 0, len);
      const float inf = std::numeric_limits<float>::infinity();
      for (size_t i = 0; i < len; ++i) x[i] -= 0.0f * inf;
      return inf;
    }
    float scale = absmax / 127.0f;
    const float inv = 127.0f / absmax;
    // 127 * scale may round above the largest float: take the float below.
    if (std::isinf(127.0f * scale)) scale = std::nextafter(scale, 0.0f);
    if (scale == 0.0f || std::isinf(inv)) {
      // Zeros, or values so small (subnormal) that no scale represents
      // them: all of x stays in the residual.
      std::memset(out, 0, len);
      return 0.0f;
    }
    // |x * inv| <= 127 (and a rounding): floor(v + u) is the truncation of
    // v + u + 128 >= 0, then clamped to [-127, 127] as an integer.
    if (stochastic) {
      for (size_t i = 0; i < len; ++i) {
        const float u = uniform01(key, first + static_cast<uint32_t>(i));
        const int q = clamp127(static_cast<int>(x[i] * inv + u + 128.0f) - 128);
        out[i] = static_cast<uint8_t>(q);
        x[i] -= static_cast<float>(q) * scale;
      }
    } else {
      for (size_t i = 0; i < len; ++i) {
        const int q = clamp127(static_cast<int>(x[i] * inv + 128.5f) - 128);
        out[i] = static_cast<uint8_t>(q);
        x[i] -= static_cast<float>(q) * scale;
      }
    }
    return scale;
  }

  // out[i] (+)= decoded value i; returns false when a value is malformed.
  template <bool kAdd>
  static bool decode(const uint8_t* __restrict in, size_t len, float scale, float* __restrict out) {
    unsigned bad = 0;
    for (size_t i = 0; i < len; ++i) {
      bad |= in[i] == 0x80u;
      const float d = static_cast<float>(static_cast<int8_t>(in[i])) * scale;
      if constexpr (kAdd) {
        out[i] += d;
      } else {
        out[i] = d;
      }
    }
    return bad == 0;
  }
};

// +1 or -1 for each bit of every byte: bit k of byte b is table[b][k].
const std::array<std::array<float, 8>, 256>& sign_table() {
  static const auto table = [] {
    std::array<std::array<float, 8>, 256> t{};
    for (size_t b = 0; b < 256; ++b) {
      for (size_t k = 0; k < 8; ++k) t[b][k] = ((b >> k) & 1u) ? 1.0f : -1.0f;
    }
    return t;
  }();
  return table;
}

// sign: scale = mean |x|, one bit per value (1: +scale, 0: -scale).
struct SignScheme {
  static constexpr const char* kName = "sign";
  static constexpr size_t kScaleBytes = sizeof(float);
  static size_t value_bytes(size_t len) { return (len + 7) / 8; }

  static float encode(float* __restrict x, size_t len, uint8_t* __restrict out, bool, uint32_t,
                      uint32_t) {
    // Four double lanes: exact enough for any chunk, and no long chain.
    double sum[4] = {};
    size_t i = 0;
    for (; i + 4 <= len; i += 4) {
      for (size_t k = 0; k < 4; ++k) sum[k] += std::fabs(x[i + k]);
    }
    for (; i < len; ++i) sum[0] += std::fabs(x[i]);
    const double total = (sum[0] + sum[1]) + (sum[2] + sum[3]);
    float scale = len == 0 ? 0.0f : static_cast<float>(total / static_cast<double>(len));
    // A NaN gradient: an infinite scale (as int8 gives), not a NaN one, which
    // the owner would take for a malformed block.
    if (std::isnan(scale)) scale = std::numeric_limits<float>::infinity();
    const size_t full = len / 8;
    for (size_t b = 0; b < full; ++b) {
      const float* xb = x + b * 8;
      unsigned byte = 0;
      for (unsigned k = 0; k < 8; ++k) byte |= static_cast<unsigned>(xb[k] >= 0.0f) << k;
      out[b] = static_cast<uint8_t>(byte);
    }
    if (full * 8 < len) {
      unsigned byte = 0;
      for (size_t k = 0; full * 8 + k < len; ++k) {
        byte |= static_cast<unsigned>(x[full * 8 + k] >= 0.0f) << k;
      }
      out[full] = static_cast<uint8_t>(byte);
    }
    const float neg = -scale;
    for (size_t e = 0; e < len; ++e) {
      const float d = x[e] >= 0.0f ? scale : neg;  // a select: the loop vectorizes
      x[e] -= d;
    }
    return scale;
  }

  template <bool kAdd>
  static bool decode(const uint8_t* __restrict in, size_t len, float scale, float* __restrict out) {
    const auto& table = sign_table();
    const size_t full = len / 8;
    for (size_t b = 0; b < full; ++b) {
      const std::array<float, 8>& t = table[in[b]];
      float* o = out + b * 8;
      for (size_t k = 0; k < 8; ++k) {
        if constexpr (kAdd) {
          o[k] += t[k] * scale;
        } else {
          o[k] = t[k] * scale;
        }
      }
    }
    if (full * 8 < len) {
      const std::array<float, 8>& t = table[in[full]];
      for (size_t k = 0; full * 8 + k < len; ++k) {
        if constexpr (kAdd) {
          out[full * 8 + k] += t[k] * scale;
        } else {
          out[full * 8 + k] = t[k] * scale;
        }
      }
    }
    return true;
  }
};

// ---- the two stages --------------------------------------------------------

// How a bucket of numel values in chunks of `chunk` is cut into the slices
// of n ranks and laid out on the wire.
struct SlicePlan {
  int n = 0;
  size_t numel = 0;
  size_t chunk = 0;
  std::vector<size_t>
      chunk_begin;            // n + 1: slice j holds chunks [chunk_begin[j], chunk_begin[j+1])
  std::vector<size_t> block;  // n: bytes of slice j's block (scales, then values)
  std::vector<size_t> block_offset;  // n + 1: offset of block j in a buffer of all the blocks
  size_t chunks = 0;
  // (A chunk index below `chunks` times chunk is below numel: no overflow.)
  size_t elem_begin(int j) const {
    return chunk_begin[j] >= chunks ? numel : chunk_begin[j] * chunk;
  }
  size_t elem_end(int j) const { return elem_begin(j + 1); }
  size_t total() const { return block_offset.back(); }
};

template <typename Scheme>
SlicePlan make_plan(size_t numel, size_t chunk, int n) {
  SlicePlan p;
  p.n = n;
  p.numel = numel;
  p.chunk = chunk;
  const size_t chunks = numel == 0 ? 0 : (numel - 1) / chunk + 1;
  p.chunks = chunks;
  const auto un = static_cast<size_t>(n);
  p.chunk_begin.resize(un + 1);
  for (size_t j = 0; j <= un; ++j) {
    // chunks * j / n without overflow for any chunks < 2^64 / n.
    p.chunk_begin[j] = chunks / un * j + chunks % un * j / un;
  }
  p.block.resize(un);
  p.block_offset.assign(un + 1, 0);
  for (int j = 0; j < n; ++j) {
    // Every chunk's values start on a byte boundary; all but the bucket's
    // last chunk are full.
    const size_t nch = p.chunk_begin[j + 1] - p.chunk_begin[j];
    const size_t len = p.elem_end(j) - p.elem_begin(j);
    p.block[j] = nch == 0 ? 0
                          : nch * Scheme::kScaleBytes + (nch - 1) * Scheme::value_bytes(chunk) +
                                Scheme::value_bytes(len - (nch - 1) * chunk);
    p.block_offset[j + 1] = p.block_offset[j] + p.block[j];
  }
  return p;
}

// What is left of `timeout` (one deadline for the whole average(), over
// its two collectives) since `start`; at least 1 ms, so that a late second
// collective fails by its own deadline rather than being given none.
Timeout remaining(Timeout timeout, std::chrono::steady_clock::time_point start) {
  if (timeout < Timeout::zero()) return timeout;  // kDefaultTimeout: the communicator's
  const auto spent = std::chrono::duration_cast<Timeout>(std::chrono::steady_clock::now() - start);
  return std::max(timeout - spent, Timeout(1));
}

template <typename Scheme>
class TwoStageCodec final : public GradientCodec {
 public:
  TwoStageCodec(const CompressionOptions& options, const CodecLayout& layout, int world_size)
      : chunk_(options.chunk),
        seed_(options.seed),
        stochastic_(std::is_same_v<Scheme, Int8Scheme>),
        momentum_(static_cast<float>(options.momentum)),
        residual_(layout.numel, 0.0f),
        velocity_(options.momentum > 0 ? layout.numel : 0, 0.0f) {
    plan_ = make_plan<Scheme>(layout.numel, chunk_, std::max(world_size, 1));
  }

  std::string name() const override {
    std::string n = Scheme::kScaleBytes > 0 ? fmt::format("{}(chunk={})", Scheme::kName, chunk_)
                                            : std::string(Scheme::kName);
    if (momentum_ > 0) n += fmt::format("(momentum={})", momentum_);
    return n;
  }

  void average(Communicator& comm, std::span<float> grad, Timeout timeout) override {
    check_grad(name(), grad, residual_.size());
    const auto start = std::chrono::steady_clock::now();
    Stopwatch watch;
    const int n = comm.size();
    const int me = comm.rank();
    if (plan_.n != n) plan_ = make_plan<Scheme>(residual_.size(), chunk_, n);
    const SlicePlan& p = plan_;
    const uint64_t call = static_cast<uint64_t>(stats_.calls);
    const auto key = static_cast<uint32_t>(
        splitmix64(seed_ ^ splitmix64(static_cast<uint64_t>(me) ^ splitmix64(call))));

    // Stage 1: x = grad + residual (kept in the residual), compressed chunk
    // by chunk into the blocks of send_; the residual becomes x - decoded.
    // With momentum, the velocity u = m u + grad takes the gradient's place
    // (every value is sent each step, so no entry is masked as in top-k).
    float* r = residual_.data();
    const float* g = grad.data();
    if (momentum_ > 0) {
      float* u = velocity_.data();
      const float m = momentum_;
      for (size_t i = 0; i < grad.size(); ++i) {
        u[i] = m * u[i] + g[i];
        r[i] += u[i];
      }
    } else {
      for (size_t i = 0; i < grad.size(); ++i) r[i] += g[i];
    }
    send_.resize(std::max<size_t>(p.total(), 1));
    for (int j = 0; j < n; ++j) {
      encode_slice(p, j, r + p.elem_begin(j), send_.data() + p.block_offset[j], key, true);
    }

    // The blocks of slice `me` from every rank.
    const size_t mine = p.block[me];
    const uint8_t* recv = send_.data();  // one rank: its own block is all there is
    stats_.codec_seconds += watch.lap();
    if (n > 1) {
      recv_.resize(std::max<size_t>(mine * static_cast<size_t>(n), 1));
      recv_counts_.assign(static_cast<size_t>(n), mine);
      comm.alltoallv(ConstBuffer(send_.data(), p.total(), DType::UInt8), p.block,
                     Buffer(recv_.data(), mine * static_cast<size_t>(n), DType::UInt8),
                     recv_counts_, CollectiveOptions{timeout});
      stats_.comm_seconds += watch.lap();
      recv = recv_.data();
    }

    // Stage 2: the average of slice `me`, compressed again; n times its
    // rounding error goes to this rank's residual.
    const size_t b = p.elem_begin(me);
    const size_t len = p.elem_end(me) - b;
    avg_.assign(std::max<size_t>(len, 1), 0.0f);
    try {
      for (int src = 0; src < n; ++src) {
        decode_slice<true>(p, me, recv + mine * static_cast<size_t>(src), avg_.data(), src,
                           "alltoallv");
      }
    } catch (const DataError& e) {
      // The peers would wait for this rank's slice in the allgatherv: fail
      // them now, naming the reason.
      if (n > 1) comm.abort(e.what());
      throw;
    }
    const auto nf = static_cast<float>(n);
    for (size_t i = 0; i < len; ++i) avg_[i] /= nf;
    mine_.resize(std::max<size_t>(mine, 1));
    encode_slice(p, me, avg_.data(), mine_.data(), key, false);
    // encode_slice left avg - decoded2 in avg_.
    for (size_t i = 0; i < len; ++i) r[b + i] += nf * avg_[i];

    const uint8_t* all = mine_.data();
    stats_.codec_seconds += watch.lap();
    if (n > 1) {
      gather_.resize(std::max<size_t>(p.total(), 1));
      comm.allgatherv(ConstBuffer(mine_.data(), mine, DType::UInt8),
                      Buffer(gather_.data(), p.total(), DType::UInt8), p.block,
                      CollectiveOptions{remaining(timeout, start)});
      stats_.comm_seconds += watch.lap();
      all = gather_.data();
    }
    for (int j = 0; j < n; ++j) {
      decode_slice<false>(p, j, all + p.block_offset[j], grad.data() + p.elem_begin(j), j,
                          "allgatherv");
    }
    stats_.codec_seconds += watch.lap();
    stats_.calls += 1;
    stats_.bytes_sent += model_bytes(p);
  }

  uint64_t wire_bytes(int world_size) const override {
    if (world_size == plan_.n) return model_bytes(plan_);
    return model_bytes(make_plan<Scheme>(residual_.size(), chunk_, std::max(world_size, 1)));
  }
  std::span<float> residual() override { return residual_; }
  void reset() override {
    std::fill(residual_.begin(), residual_.end(), 0.0f);
    std::fill(velocity_.begin(), velocity_.end(), 0.0f);
  }
  CodecStats stats() const override { return stats_; }

 private:
  // The alltoall sends (n - 1) / n of all the blocks; the allgather of the
  // re-compressed slices sends as much again (the model's slices are equal).
  static uint64_t model_bytes(const SlicePlan& p) { return 2 * alltoall_bytes(p.total(), p.n); }

  // Compresses slice j (x: its values) into out (its block); x becomes x -
  // decoded.
  void encode_slice(const SlicePlan& p, int j, float* x, uint8_t* out, uint32_t key,
                    bool stochastic) {
    const size_t c0 = p.chunk_begin[j];
    const size_t nch = p.chunk_begin[j + 1] - c0;
    uint8_t* values = out + nch * Scheme::kScaleBytes;
    const size_t b = p.elem_begin(j);
    for (size_t c = 0; c < nch; ++c) {
      const size_t begin = (c0 + c) * chunk_;
      const size_t len = std::min(chunk_, p.numel - begin);
      const float scale =
          Scheme::encode(x + (begin - b), len, values + c * Scheme::value_bytes(chunk_),
                         stochastic && stochastic_, key, static_cast<uint32_t>(begin));
      if constexpr (Scheme::kScaleBytes > 0) {
        std::memcpy(out + c * Scheme::kScaleBytes, &scale, sizeof scale);
      }
    }
  }

  // Decodes (kAdd: adds) the block `in` of slice j, received from rank
  // `src` by `op`, into out[0, slice length). Checks what the peer sent.
  template <bool kAdd>
  void decode_slice(const SlicePlan& p, int j, const uint8_t* in, float* out, int src,
                    const char* op) {
    const size_t c0 = p.chunk_begin[j];
    const size_t nch = p.chunk_begin[j + 1] - c0;
    const uint8_t* values = in + nch * Scheme::kScaleBytes;
    const size_t b = p.elem_begin(j);
    for (size_t c = 0; c < nch; ++c) {
      const size_t begin = (c0 + c) * chunk_;
      const size_t len = std::min(chunk_, p.numel - begin);
      float scale = 0.0f;
      if constexpr (Scheme::kScaleBytes > 0) {
        std::memcpy(&scale, in + c * Scheme::kScaleBytes, sizeof scale);
      }
      if (Scheme::kScaleBytes > 0 && !(scale >= 0.0f)) {
        throw DataError(fmt::format(
            "{}: the {} block from rank {} (slice {}) is malformed: the scale of chunk {} is {} "
            "(expected a number >= 0)",
            name(), op, src, j, c0 + c, scale));
      }
      if (!Scheme::template decode<kAdd>(values + c * Scheme::value_bytes(chunk_), len, scale,
                                         out + (begin - b))) {
        throw DataError(fmt::format(
            "{}: the {} block from rank {} (slice {}) is malformed: chunk {} holds the value -128 "
            "(values are in [-127, 127])",
            name(), op, src, j, c0 + c));
      }
    }
  }

  size_t chunk_;
  uint64_t seed_;
  bool stochastic_;
  float momentum_;
  std::vector<float> residual_;
  std::vector<float> velocity_;  // u (momentum only)
  SlicePlan plan_;
  // Kept across calls: no allocation once the sizes are known.
  std::vector<uint8_t> send_, recv_, mine_, gather_;
  std::vector<size_t> recv_counts_;
  std::vector<float> avg_;
  CodecStats stats_;
};

}  // namespace

std::unique_ptr<GradientCodec> make_half(const CompressionOptions& options,
                                         const CodecLayout& layout, int world_size, bool bf16) {
  if (bf16) return std::make_unique<TwoStageCodec<HalfScheme<true>>>(options, layout, world_size);
  return std::make_unique<TwoStageCodec<HalfScheme<false>>>(options, layout, world_size);
}

std::unique_ptr<GradientCodec> make_int8(const CompressionOptions& options,
                                         const CodecLayout& layout, int world_size) {
  return std::make_unique<TwoStageCodec<Int8Scheme>>(options, layout, world_size);
}

std::unique_ptr<GradientCodec> make_sign(const CompressionOptions& options,
                                         const CodecLayout& layout, int world_size) {
  return std::make_unique<TwoStageCodec<SignScheme>>(options, layout, world_size);
}

}  // namespace weft::train::codecs
