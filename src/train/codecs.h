// The codecs behind weft/compress.h, one factory per file, and what they
// share: the wire-byte models of the collectives they use and a timer.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>

#include "weft/compress.h"

namespace weft::train::codecs {

// codec_dense.cc: fp16 and bf16 (bf16 == true).
std::unique_ptr<GradientCodec> make_half(const CompressionOptions& options,
                                         const CodecLayout& layout, int world_size, bool bf16);
// codec_dense.cc: int8 with a scale per chunk and stochastic rounding.
std::unique_ptr<GradientCodec> make_int8(const CompressionOptions& options,
                                         const CodecLayout& layout, int world_size);
// codec_dense.cc: 1 bit per value with a scale per chunk.
std::unique_ptr<GradientCodec> make_sign(const CompressionOptions& options,
                                         const CodecLayout& layout, int world_size);
// codec_topk.cc: top-k with error feedback (and DGC momentum correction).
std::unique_ptr<GradientCodec> make_topk(const CompressionOptions& options,
                                         const CodecLayout& layout, int world_size);
// codec_powersgd.cc: PowerSGD of rank r with warm start.
std::unique_ptr<GradientCodec> make_powersgd(const CompressionOptions& options,
                                             const CodecLayout& layout, int world_size);
// codec_powersgd.cc: the largest rank any matrix of `layout` allows (the
// largest r whose factors are smaller than the matrix: r (rows + cols) <
// rows cols; 0 when the bucket holds no such matrix), and the name and
// shape of that matrix (for messages).
size_t powersgd_max_rank(const CodecLayout& layout, std::string* which = nullptr);

// Bytes each rank sends in a ring allreduce of `bytes` on n ranks.
inline uint64_t ring_allreduce_bytes(uint64_t bytes, int n) {
  return n <= 1 ? 0 : 2 * bytes * static_cast<uint64_t>(n - 1) / static_cast<uint64_t>(n);
}
// Bytes each rank sends in an allgather of `bytes` per rank on n ranks.
inline uint64_t allgather_bytes(uint64_t bytes, int n) {
  return n <= 1 ? 0 : bytes * static_cast<uint64_t>(n - 1);
}
// Bytes each rank sends in an alltoall of `bytes` in all (n blocks) on n ranks.
inline uint64_t alltoall_bytes(uint64_t bytes, int n) {
  return n <= 1 ? 0 : bytes * static_cast<uint64_t>(n - 1) / static_cast<uint64_t>(n);
}

// Seconds since construction or the last lap().
class Stopwatch {
 public:
  double lap() {
    const auto now = std::chrono::steady_clock::now();
    const double s = std::chrono::duration<double>(now - t0_).count();
    t0_ = now;
    return s;
  }

 private:
  std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
};

}  // namespace weft::train::codecs
