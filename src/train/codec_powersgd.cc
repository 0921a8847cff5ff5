// The PowerSGD codec (see weft/compress.h; Vogels et al., 2019): each
// matrix of the bucket (a tensor of 2 or more dimensions, rows = shape[0],
// cols = the rest) for which rank r saves something is replaced by a rank-r
// approximation P Q^T found with one power iteration, warm-started from the
// last step's Q:
//
//   M = grad + residual          (this rank's, per matrix)
//   P = M Q                      allreduce (Avg) of every P, packed together
//                                with the tensors sent uncompressed
//   P = orthonormal columns of P (Gram-Schmidt)
//   Q = M^T P                    allreduce (Avg) of every Q, packed
//   grad = P Q^T, residual = M - P Q^T
//
// P and Q are averages, the same on every rank, and so is every value
// computed from them: every rank ends with the same bits. The first Q comes
// from options.seed alone (the same on every rank). A column of Q that
// comes back zero (the matrix had less than rank r this step) is drawn
// again, from the seed and a counter, so that later steps use all r.
//
// What holds: summed over the ranks, the residuals plus n times the sum of
// the averages equal the sum of the gradients (the average of the Q's is
// the Q of the average M, since Q is linear in M for the shared P).
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>

#include "train/codecs.h"
#include "weft/errors.h"

namespace weft::train::codecs {

size_t powersgd_max_rank(const CodecLayout& layout, std::string* which) {
  size_t best = 0;
  for (const CodecTensor& t : layout.tensors) {
    if (t.shape.size() < 2) continue;
    const auto rows = static_cast<size_t>(t.shape[0]);
    const size_t cols = rows == 0 ? 0 : t.numel() / rows;
    if (rows == 0 || cols == 0) continue;
    // The largest r with r (rows + cols) < rows cols (the codec sends the
    // others uncompressed), which is also below min(rows, cols).
    const size_t r = (rows * cols - 1) / (rows + cols);
    if (r > best) {
      best = r;
      if (which != nullptr) *which = fmt::format("{} [{}]", t.name, fmt::join(t.shape, ", "));
    }
  }
  return best;
}

namespace {

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Uniform values in [-1, 1) from (seed, stream): the same on every rank and
// every platform.
void fill_random(float* out, size_t n, size_t stride, uint64_t seed, uint64_t stream) {
  uint64_t state = seed ^ (stream * 0xd1b54a32d192ed03ull);
  for (size_t i = 0; i < n; ++i) {
    const uint64_t bits = splitmix64(state) >> 40;  // 24 bits
    out[i * stride] = static_cast<float>(bits) * (2.0f / 16777216.0f) - 1.0f;
  }
}

struct Matrix {
  std::string name;
  size_t offset = 0;  // in the bucket
  size_t rows = 0;
  size_t cols = 0;
  size_t p_offset = 0;  // in packed_p_ (rows x r, row-major)
  size_t q_offset = 0;  // in q_ (cols x r, row-major)
};

struct Range {
  size_t offset = 0;  // in the bucket
  size_t size = 0;
  size_t packed = 0;  // in packed_p_
};

class PowerSgdCodec final : public GradientCodec {
 public:
  PowerSgdCodec(const CompressionOptions& options, const CodecLayout& layout)
      : rank_(static_cast<size_t>(options.powersgd_rank)),
        seed_(options.seed),
        numel_(layout.numel),
        residual_(layout.numel, 0.0f) {
    const size_t r = rank_;
    std::vector<const CodecTensor*> sorted;
    for (const CodecTensor& t : layout.tensors) sorted.push_back(&t);
    std::stable_sort(sorted.begin(), sorted.end(), [](const CodecTensor* a, const CodecTensor* b) {
      return a->offset < b->offset;
    });
    size_t p_size = 0;
    size_t q_size = 0;
    size_t end = 0;  // of the last tensor, to find overlaps
    for (const CodecTensor* t : sorted) {
      const size_t numel = t->numel();
      if (t->offset > numel_ || numel > numel_ - t->offset) {
        throw InvalidArgument(fmt::format(
            "powersgd codec: tensor {} (offset {}, {} values) lies outside its bucket of {} values",
            t->name, t->offset, numel, numel_));
      }
      if (t->offset < end && numel > 0) {
        throw InvalidArgument(
            fmt::format("powersgd codec: tensor {} overlaps the one before it", t->name));
      }
      if (numel > 0) end = t->offset + numel;
      if (t->shape.size() < 2 || t->shape[0] <= 0) continue;
      const auto rows = static_cast<size_t>(t->shape[0]);
      const size_t cols = numel / rows;
      if (r > std::min(rows, cols) || r * (rows + cols) >= rows * cols) continue;
      matrices_.push_back(Matrix{t->name, t->offset, rows, cols, p_size, q_size});
      p_size += rows * r;
      q_size += cols * r;
    }
    // Everything outside the compressed matrices is sent as it is, packed
    // after the P factors.
    size_t at = 0;
    auto add_range = [&](size_t from, size_t to) {
      if (to > from) {
        ranges_.push_back(Range{from, to - from, p_size});
        p_size += to - from;
      }
    };
    for (const Matrix& m : matrices_) {
      add_range(at, m.offset);
      at = m.offset + m.rows * m.cols;
    }
    add_range(at, numel_);
    packed_p_.assign(p_size, 0.0f);
    q_.assign(q_size, 0.0f);
    init_q();
  }

  std::string name() const override {
    return fmt::format("powersgd:{}({} of {} values in {} matrices)", rank_, compressed_values(),
                       numel_, matrices_.size());
  }

  void average(Communicator& comm, std::span<float> grad, Timeout timeout) override {
    if (grad.size() != numel_) {
      throw InvalidArgument(fmt::format(
          "powersgd codec: bucket of {} values, the codec's layout has {}", grad.size(), numel_));
    }
    stats_.calls += 1;
    const size_t r = rank_;
    Stopwatch watch;
    // M = grad + residual (kept in the residual), P = M Q.
    for (const Matrix& m : matrices_) {
      float* M = residual_.data() + m.offset;
      const float* g = grad.data() + m.offset;
      for (size_t i = 0; i < m.rows * m.cols; ++i) M[i] += g[i];
      const float* Q = q_.data() + m.q_offset;
      float* P = packed_p_.data() + m.p_offset;
      acc_.assign(r, 0.0);
      for (size_t i = 0; i < m.rows; ++i) {
        std::fill(acc_.begin(), acc_.end(), 0.0);
        const float* row = M + i * m.cols;
        for (size_t c = 0; c < m.cols; ++c) {
          const double v = row[c];
          const float* q = Q + c * r;
          for (size_t j = 0; j < r; ++j) acc_[j] += v * q[j];
        }
        for (size_t j = 0; j < r; ++j) P[i * r + j] = static_cast<float>(acc_[j]);
      }
    }
    for (const Range& u : ranges_) {
      for (size_t i = 0; i < u.size; ++i) {
        packed_p_[u.packed + i] = grad[u.offset + i] + residual_[u.offset + i];
        residual_[u.offset + i] = 0.0f;
      }
    }
    stats_.codec_seconds += watch.lap();
    allreduce(comm, packed_p_, timeout);
    stats_.comm_seconds += watch.lap();
    for (const Range& u : ranges_) {
      std::copy_n(packed_p_.begin() + static_cast<std::ptrdiff_t>(u.packed), u.size,
                  grad.begin() + static_cast<std::ptrdiff_t>(u.offset));
    }
    if (matrices_.empty()) {
      stats_.codec_seconds += watch.lap();
      return;
    }
    // Orthonormal P, Q = M^T P.
    for (const Matrix& m : matrices_) {
      float* P = packed_p_.data() + m.p_offset;
      orthonormalize(P, m.rows);
      const float* M = residual_.data() + m.offset;
      float* Q = q_.data() + m.q_offset;
      std::fill(Q, Q + m.cols * r, 0.0f);
      for (size_t i = 0; i < m.rows; ++i) {
        const float* row = M + i * m.cols;
        const float* p = P + i * r;
        for (size_t c = 0; c < m.cols; ++c) {
          const float v = row[c];
          float* q = Q + c * r;
          for (size_t j = 0; j < r; ++j) q[j] += v * p[j];
        }
      }
    }
    stats_.codec_seconds += watch.lap();
    allreduce(comm, q_, timeout);
    stats_.comm_seconds += watch.lap();
    // grad = P Q^T, residual = M - P Q^T; redraw the zero columns of Q.
    for (size_t k = 0; k < matrices_.size(); ++k) {
      const Matrix& m = matrices_[k];
      const float* P = packed_p_.data() + m.p_offset;
      float* Q = q_.data() + m.q_offset;
      float* M = residual_.data() + m.offset;
      float* g = grad.data() + m.offset;
      for (size_t i = 0; i < m.rows; ++i) {
        const float* p = P + i * r;
        for (size_t c = 0; c < m.cols; ++c) {
          const float* q = Q + c * r;
          float a = 0.0f;
          for (size_t j = 0; j < r; ++j) a += p[j] * q[j];
          g[i * m.cols + c] = a;
          M[i * m.cols + c] -= a;
        }
      }
      for (size_t j = 0; j < r; ++j) {
        bool zero = true;
        for (size_t c = 0; c < m.cols && zero; ++c) zero = Q[c * r + j] == 0.0f;
        if (zero) fill_random(Q + j, m.cols, r, seed_, (k << 32) + 0x10000 + redraws_++);
      }
    }
    stats_.codec_seconds += watch.lap();
  }

  uint64_t wire_bytes(int world_size) const override {
    uint64_t bytes = ring_allreduce_bytes(packed_p_.size() * sizeof(float), world_size);
    if (!matrices_.empty()) bytes += ring_allreduce_bytes(q_.size() * sizeof(float), world_size);
    return bytes;
  }

  std::span<float> residual() override { return residual_; }
  void reset() override {
    std::fill(residual_.begin(), residual_.end(), 0.0f);
    redraws_ = 0;
    init_q();
  }
  CodecStats stats() const override { return stats_; }

 private:
  size_t compressed_values() const {
    size_t n = 0;
    for (const Matrix& m : matrices_) n += m.rows * m.cols;
    return n;
  }

  void init_q() {
    for (size_t k = 0; k < matrices_.size(); ++k) {
      const Matrix& m = matrices_[k];
      fill_random(q_.data() + m.q_offset, m.cols * rank_, 1, seed_, k);
    }
  }

  void allreduce(Communicator& comm, std::vector<float>& v, Timeout timeout) {
    if (comm.size() == 1 || v.empty()) return;
    comm.allreduce(Buffer(v.data(), v.size(), DType::Float32),
                   AllreduceOptions{ReduceOp::Avg, timeout});
    stats_.bytes_sent += ring_allreduce_bytes(v.size() * sizeof(float), comm.size());
  }

  // Modified Gram-Schmidt on the r columns of P (rows x r, row-major), in
  // double. A column with (almost) nothing outside the earlier ones is set
  // to zero: its direction is noise, and its part of M stays in the
  // residual.
  void orthonormalize(float* P, size_t rows) const {
    const size_t r = rank_;
    for (size_t j = 0; j < r; ++j) {
      double before = 0;
      for (size_t i = 0; i < rows; ++i) before += double(P[i * r + j]) * P[i * r + j];
      for (size_t l = 0; l < j; ++l) {
        double dot = 0;
        for (size_t i = 0; i < rows; ++i) dot += double(P[i * r + l]) * P[i * r + j];
        for (size_t i = 0; i < rows; ++i) {
          P[i * r + j] = static_cast<float>(P[i * r + j] - dot * P[i * r + l]);
        }
      }
      double norm = 0;
      for (size_t i = 0; i < rows; ++i) norm += double(P[i * r + j]) * P[i * r + j];
      norm = std::sqrt(norm);
      if (!(norm > 1e-4 * std::sqrt(before)) || norm < 1e-30) {
        for (size_t i = 0; i < rows; ++i) P[i * r + j] = 0.0f;
        continue;
      }
      for (size_t i = 0; i < rows; ++i) P[i * r + j] = static_cast<float>(P[i * r + j] / norm);
    }
  }

  size_t rank_;
  uint64_t seed_;
  size_t numel_;
  std::vector<float> residual_;
  std::vector<Matrix> matrices_;
  std::vector<Range> ranges_;
  std::vector<float> packed_p_;  // the P factors, then the uncompressed values
  std::vector<float> q_;         // the Q factors (the warm start of the next step)
  std::vector<double> acc_;
  uint64_t redraws_ = 0;
  CodecStats stats_;
};

}  // namespace

std::unique_ptr<GradientCodec> make_powersgd(const CompressionOptions& options,
                                             const CodecLayout& layout, int /*world_size*/) {
  if (options.powersgd_rank < 1) {
    throw InvalidArgument(fmt::format("--compress {}: the PowerSGD rank must be >= 1, got {}",
                                      compression_name(options), options.powersgd_rank));
  }
  return std::make_unique<PowerSgdCodec>(options, layout);
}

}  // namespace weft::train::codecs
