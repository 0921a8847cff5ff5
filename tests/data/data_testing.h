// Helpers of the data tests: writing arbitrary (also malformed) IDX bytes,
// and small synthetic datasets.
#pragma once

#include <gtest/gtest.h>
#include <zlib.h>

#include <cstdint>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "weft/data.h"
#include "weft/errors.h"

namespace weft::data::test {

// An IDX image: magic, big-endian dims, then payload (no consistency check).
inline std::vector<uint8_t> idx_bytes(uint32_t magic, const std::vector<uint32_t>& dims,
                                      const std::vector<uint8_t>& payload) {
  std::vector<uint8_t> out;
  auto put = [&](uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(v >> s));
  };
  put(magic);
  for (uint32_t d : dims) put(d);
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

inline void write_raw(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good()) << path;
}

inline std::vector<uint8_t> gzip_bytes(const std::vector<uint8_t>& bytes) {
  z_stream zs{};
  EXPECT_EQ(deflateInit2(&zs, 6, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY), Z_OK);
  std::vector<uint8_t> out(deflateBound(&zs, static_cast<uLong>(bytes.size())) + 64);
  zs.next_in = const_cast<Bytef*>(bytes.data());
  zs.avail_in = static_cast<uInt>(bytes.size());
  zs.next_out = out.data();
  zs.avail_out = static_cast<uInt>(out.size());
  EXPECT_EQ(deflate(&zs, Z_FINISH), Z_STREAM_END);
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}

inline void write_gz(const std::string& path, const std::vector<uint8_t>& bytes) {
  write_raw(path, gzip_bytes(bytes));
}

// Runs fn, expects a weft::DataError whose message contains every part.
inline void expect_data_error(const std::function<void()>& fn,
                              const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no DataError thrown; expected one mentioning " << parts.front();
  } catch (const DataError& e) {
    const std::string what = e.what();
    for (const auto& p : parts)
      EXPECT_NE(what.find(p), std::string::npos) << "\"" << p << "\" not in: " << what;
  }
}

// A synthetic dataset of n h x w images: pixel j of sample i is (i * 31 + j) % 256,
// label i % classes.
struct Synthetic {
  std::string images, labels;
};

inline Synthetic write_synthetic(const std::string& dir, const std::string& prefix, uint32_t n,
                                 uint32_t h, uint32_t w, uint32_t classes, bool gz) {
  std::vector<uint8_t> pixels(size_t{n} * h * w), labels(n);
  for (size_t i = 0; i < n; ++i) {
    labels[i] = static_cast<uint8_t>(i % classes);
    for (size_t j = 0; j < size_t{h} * w; ++j) {
      pixels[i * h * w + j] = static_cast<uint8_t>((i * 31 + j) % 256);
    }
  }
  Synthetic s{dir + "/" + prefix + "-images-idx3-ubyte", dir + "/" + prefix + "-labels-idx1-ubyte"};
  if (gz) {
    s.images += ".gz";
    s.labels += ".gz";
  }
  const std::vector<uint32_t> idims = {n, h, w}, ldims = {n};
  write_idx(s.images, idims, pixels, gz);
  write_idx(s.labels, ldims, labels, gz);
  return s;
}

}  // namespace weft::data::test
