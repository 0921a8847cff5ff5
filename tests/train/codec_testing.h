// What the codec tests share: a one-tensor bucket layout and seeded
// gradient-like values.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "weft/compress.h"

namespace weft::testing {

// A bucket of one 1-D float32 tensor of numel values.
inline train::CodecLayout flat_layout(size_t numel, const std::string& name = "w") {
  train::CodecLayout l;
  l.numel = numel;
  l.tensors.push_back(train::CodecTensor{name, 0, {static_cast<int64_t>(numel)}});
  return l;
}

// n values drawn from N(0, scale^2), the same for the same seed.
inline std::vector<float> random_values(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

}  // namespace weft::testing
