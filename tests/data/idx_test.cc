#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <future>
#include <string>
#include <vector>

#include "data/data_testing.h"
#include "testing/testing.h"
#include "weft/data.h"
#include "weft/errors.h"

namespace weft::data {
namespace {

using test::expect_data_error;
using test::idx_bytes;
using test::write_gz;
using test::write_raw;

std::vector<uint8_t> iota_bytes(size_t n, uint8_t start = 0) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(start + i * 7);
  return v;
}

TEST(Idx, ReadsHandWrittenRawAndGzip) {
  testing::TempDir dir;
  const auto payload = iota_bytes(3 * 2 * 5);
  const auto bytes = idx_bytes(kIdxImagesMagic, {3, 2, 5}, payload);
  write_raw(dir.path() + "/images", bytes);
  write_gz(dir.path() + "/images.gz", bytes);
  for (const char* name : {"/images", "/images.gz"}) {
    IdxArray a = read_idx(dir.path() + name, kIdxImagesMagic);
    EXPECT_EQ(a.magic, kIdxImagesMagic);
    EXPECT_EQ(a.dims, (std::vector<uint32_t>{3, 2, 5}));
    EXPECT_EQ(a.values, payload);
  }
  // The kind is told by content, not by name.
  std::filesystem::rename(dir.path() + "/images.gz", dir.path() + "/other");
  EXPECT_EQ(read_idx(dir.path() + "/other").values, payload);
}

TEST(Idx, WriteReadRoundTrip) {
  testing::TempDir dir;
  const std::vector<uint32_t> dims = {4, 3, 2, 1};
  const auto values = iota_bytes(24, 3);
  for (bool gz : {false, true}) {
    const std::string path = dir.path() + (gz ? "/a.gz" : "/a");
    write_idx(path, dims, values, gz);
    IdxArray a = read_idx(path);
    EXPECT_EQ(a.magic, 0x00000804u);
    EXPECT_EQ(a.dims, dims);
    EXPECT_EQ(a.values, values);
  }
  // The raw file is exactly the IDX bytes.
  EXPECT_EQ(std::filesystem::file_size(dir.path() + "/a"), 4u + 16u + 24u);
  const std::vector<uint32_t> labels_dims = {5};
  write_idx(dir.path() + "/l", labels_dims, iota_bytes(5), false);
  EXPECT_EQ(read_idx(dir.path() + "/l", kIdxLabelsMagic).dims, labels_dims);
  EXPECT_THROW(write_idx(dir.path() + "/bad", dims, iota_bytes(23), false), InvalidArgument);
  expect_data_error([&] { write_idx(dir.path() + "/no/such/dir/x", dims, values, true); },
                    {"/no/such/dir/x", "cannot write"});
}

TEST(Idx, MissingFile) {
  testing::TempDir dir;
  const std::string path = dir.path() + "/train-images-idx3-ubyte.gz";
  expect_data_error([&] { read_idx(path); }, {path, "No such file"});
  expect_data_error([&] { read_idx(dir.path()); }, {dir.path(), "Is a directory"});
}

// A FIFO where a data file should be is refused at once: opening it must
// not wait for a writer that never comes.
TEST(Idx, FifoIsRefusedWithoutBlocking) {
  testing::TempDir dir;
  const std::string path = dir.path() + "/train-images-idx3-ubyte";
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  auto result = std::async(std::launch::async, [&] {
    try {
      read_idx(path);
    } catch (const DataError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  });
  if (result.wait_for(std::chrono::seconds(30)) != std::future_status::ready) {
    // Blocked in open(): a writer that opens and closes releases it.
    int w = ::open(path.c_str(), O_WRONLY | O_NONBLOCK);
    if (w >= 0) ::close(w);
    FAIL() << "read_idx blocked on a FIFO";
  }
  const std::string what = result.get();
  EXPECT_NE(what.find(path), std::string::npos) << what;
  EXPECT_NE(what.find("FIFO"), std::string::npos) << what;
}

TEST(Idx, WrongMagic) {
  testing::TempDir dir;
  const std::string path = dir.path() + "/gif";
  write_raw(path, {'G', 'I', 'F', '8', '9', 'a', 0, 0, 0, 0});
  expect_data_error([&] { read_idx(path); }, {path, "not an IDX file (magic 0x47494638)"});
  // A gzip file compressed twice: after one decompression it still is gzip.
  const std::string twice = dir.path() + "/twice.gz";
  write_raw(twice, test::gzip_bytes(test::gzip_bytes(idx_bytes(kIdxLabelsMagic, {1}, {1}))));
  expect_data_error([&] { read_idx(twice); }, {twice, "not an IDX file (magic 0x1f8b0800)"});
  // Unsupported element type (0x0D: float32) and number of dimensions.
  const std::string f32 = dir.path() + "/f32";
  write_raw(f32, idx_bytes(0x00000D01, {1}, {0, 0, 0, 0}));
  expect_data_error([&] { read_idx(f32); }, {f32, "unsupported IDX element type 0x0d"});
  const std::string dims9 = dir.path() + "/dims9";
  write_raw(dims9, idx_bytes(0x00000809, {}, {}));
  expect_data_error([&] { read_idx(dims9); }, {dims9, "unsupported number of dimensions 9"});
  // A labels file where images are expected.
  const std::string labels = dir.path() + "/labels";
  write_raw(labels, idx_bytes(kIdxLabelsMagic, {2}, {1, 2}));
  expect_data_error(
      [&] { read_idx(labels, kIdxImagesMagic); },
      {labels, "expected magic 0x00000803", "found 0x00000801 (unsigned bytes, 1 dimension)"});
}

TEST(Idx, TruncatedHeader) {
  testing::TempDir dir;
  const std::string path = dir.path() + "/short";
  write_raw(path, {0, 0});
  expect_data_error([&] { read_idx(path); }, {path, "truncated: 2 bytes"});
  write_raw(path, {});
  expect_data_error([&] { read_idx(path); }, {path, "truncated: 0 bytes"});
  write_raw(path, {0, 0, 8, 3, 0, 0, 0, 1, 0, 0});
  expect_data_error([&] { read_idx(path); }, {path, "truncated header: 10 bytes", "needs 16"});
}

TEST(Idx, TruncatedPayload) {
  testing::TempDir dir;
  const auto bytes = idx_bytes(kIdxImagesMagic, {3, 2, 2}, iota_bytes(5));
  const std::string raw = dir.path() + "/t10k-images-idx3-ubyte";
  write_raw(raw, bytes);
  expect_data_error([&] { read_idx(raw); },
                    {raw, "truncated: header says 3 x 2 x 2 = 12 bytes, file has 5"});
  const std::string gz = raw + ".gz";
  write_gz(gz, bytes);
  expect_data_error([&] { read_idx(gz); },
                    {gz, "truncated: header says 3 x 2 x 2 = 12 bytes, file has 5 (decompressed)"});
}

TEST(Idx, TrailingData) {
  testing::TempDir dir;
  const auto bytes = idx_bytes(kIdxImagesMagic, {3, 2, 2}, iota_bytes(15));
  const std::string raw = dir.path() + "/raw";
  write_raw(raw, bytes);
  expect_data_error([&] { read_idx(raw); },
                    {raw, "trailing data: header says 3 x 2 x 2 = 12 bytes, file has 15"});
  const std::string gz = dir.path() + "/gz";
  write_gz(gz, bytes);
  expect_data_error([&] { read_idx(gz); },
                    {gz, "trailing data: header says 3 x 2 x 2 = 12 bytes, file has 15"});
}

TEST(Idx, AbsurdDimensionsAreRejectedBeforeAllocating) {
  testing::TempDir dir;
  const std::string path = dir.path() + "/huge";
  // 2^31 x 2^31 x 1 = 2^62 bytes: allocating would throw std::bad_alloc, not DataError.
  write_raw(path, idx_bytes(kIdxImagesMagic, {1u << 31, 1u << 31, 1}, {1, 2, 3}));
  expect_data_error([&] { read_idx(path); },
                    {path, "dimensions too large: header says 2147483648 x 2147483648 x 1 bytes",
                     "limit of 1073741824"});
  // The product overflows 64 bits.
  write_raw(path, idx_bytes(0x00000804, {0xffffffffu, 0xffffffffu, 0xffffffffu, 2}, {}));
  expect_data_error([&] { read_idx(path); }, {path, "dimensions too large"});
  // Just over 1 GiB, and over a caller's limit.
  write_raw(path, idx_bytes(kIdxImagesMagic, {70000, 200, 200}, {}));
  expect_data_error([&] { read_idx(path); }, {path, "dimensions too large"});
  write_raw(path, idx_bytes(kIdxImagesMagic, {10, 10, 10}, iota_bytes(1000)));
  expect_data_error([&] { read_idx(path, 0, 999); }, {path, "limit of 999 bytes"});
  EXPECT_EQ(read_idx(path, 0, 1000).values.size(), 1000u);
  // A zero dimension.
  write_raw(path, idx_bytes(kIdxImagesMagic, {10, 0, 10}, {}));
  expect_data_error([&] { read_idx(path); }, {path, "dimension 1 is 0"});
}

TEST(Idx, CorruptGzip) {
  testing::TempDir dir;
  // Compressible payload, so the damage lands in Huffman-coded data.
  std::vector<uint8_t> payload(100 * 28 * 28);
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<uint8_t>((i * i) % 13 * 19);
  auto gz = test::gzip_bytes(idx_bytes(kIdxImagesMagic, {100, 28, 28}, payload));
  ASSERT_GT(gz.size(), 200u);
  const std::string path = dir.path() + "/corrupt.gz";

  auto flipped = gz;
  for (size_t i = gz.size() / 2; i < gz.size() / 2 + 16; ++i) flipped[i] ^= 0x5a;
  write_raw(path, flipped);
  expect_data_error([&] { read_idx(path); }, {path, "corrupt gzip stream"});

  // Damaged CRC only: decompresses fine, fails the check at the end.
  auto crc = gz;
  crc[crc.size() - 8] ^= 1;
  write_raw(path, crc);
  expect_data_error([&] { read_idx(path); }, {path, "corrupt gzip stream", "incorrect data check"});

  // Cut short: the gzip stream ends in the middle.
  write_raw(path, std::vector<uint8_t>(gz.begin(), gz.begin() + static_cast<long>(gz.size() / 2)));
  expect_data_error([&] { read_idx(path); }, {path, "corrupt gzip stream", "truncated"});

  // Garbage after the gzip magic.
  write_raw(path, {0x1f, 0x8b, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42});
  expect_data_error([&] { read_idx(path); }, {path, "corrupt gzip stream"});
}

}  // namespace
}  // namespace weft::data
