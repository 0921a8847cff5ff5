#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <iostream>
#include <memory>
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

using test::write_synthetic;

TEST(Dataset, LoadsAndDecodes) {
  testing::TempDir dir;
  auto files = write_synthetic(dir.path(), "train", 7, 3, 4, 5, true);
  auto ds = Dataset::load(files.images, files.labels, 5);
  ASSERT_EQ(ds->size(), 7);
  EXPECT_EQ(ds->channels(), 1);
  EXPECT_EQ(ds->height(), 3);
  EXPECT_EQ(ds->width(), 4);
  EXPECT_EQ(ds->sample_numel(), 12);
  EXPECT_EQ(ds->num_classes(), 5);
  EXPECT_EQ(ds->images_path(), files.images);
  EXPECT_EQ(ds->images().size(), 7u * 12u);
  for (int64_t i = 0; i < 7; ++i) {
    EXPECT_EQ(ds->label(i), i % 5);
    auto img = ds->image(i);
    ASSERT_EQ(img.size(), 12u);
    for (size_t j = 0; j < 12; ++j) {
      float expected = static_cast<float>((i * 31 + static_cast<int64_t>(j)) % 256) / 255.0f;
      EXPECT_EQ(img[j], expected);
    }
  }
  EXPECT_THROW(ds->image(7), InvalidArgument);
  EXPECT_THROW(ds->label(-1), InvalidArgument);
}

TEST(Dataset, PixelsAreByteOver255) {
  testing::TempDir dir;
  std::vector<uint8_t> all(256), labels = {0};
  for (int v = 0; v < 256; ++v) all[static_cast<size_t>(v)] = static_cast<uint8_t>(v);
  const std::vector<uint32_t> idims = {1, 16, 16}, ldims = {1};
  write_idx(dir.path() + "/i", idims, all, false);
  write_idx(dir.path() + "/l", ldims, labels, false);
  auto ds = Dataset::load(dir.path() + "/i", dir.path() + "/l", 10);
  for (int v = 0; v < 256; ++v) EXPECT_EQ(ds->images()[static_cast<size_t>(v)], v / 255.0f);
  EXPECT_EQ(ds->images()[0], 0.0f);
  EXPECT_EQ(ds->images()[255], 1.0f);
}

TEST(Dataset, CacheDecodesOnce) {
  testing::TempDir dir;
  auto files = write_synthetic(dir.path(), "train", 9, 2, 2, 3, false);
  Dataset::clear_cache();
  auto a = Dataset::load(files.images, files.labels, 3);
  auto b = Dataset::load(dir.path() + "/./" + "train-images-idx3-ubyte", files.labels, 3);
  EXPECT_EQ(a.get(), b.get());
  EXPECT_EQ(Dataset::cache_size(), 1u);
  // Another number of classes is another dataset.
  auto c = Dataset::load(files.images, files.labels, 4);
  EXPECT_NE(a.get(), c.get());
  EXPECT_EQ(Dataset::cache_size(), 2u);

  // Concurrent loads of new files decode once.
  auto other = write_synthetic(dir.path(), "t10k", 50, 8, 8, 10, true);
  std::vector<const Dataset*> seen(8);
  std::vector<std::shared_ptr<const Dataset>> hold(8);
  testing::run_ranks_ok(8, [&](int r) {
    hold[static_cast<size_t>(r)] = Dataset::load(other.images, other.labels, 10);
    seen[static_cast<size_t>(r)] = hold[static_cast<size_t>(r)].get();
  });
  for (auto* p : seen) EXPECT_EQ(p, seen[0]);
  EXPECT_EQ(Dataset::cache_size(), 3u);

  // A rewritten file is decoded again.
  auto rewritten = write_synthetic(dir.path(), "train", 11, 2, 2, 3, false);
  auto d = Dataset::load(rewritten.images, rewritten.labels, 3);
  EXPECT_EQ(d->size(), 11);
  EXPECT_EQ(a->size(), 9);  // still valid

  Dataset::clear_cache();
  EXPECT_EQ(Dataset::cache_size(), 0u);
  auto e = Dataset::load(other.images, other.labels, 10);
  EXPECT_NE(e.get(), seen[0]);
  // Failed loads are not cached.
  EXPECT_THROW(Dataset::load(other.images, other.labels + ".missing", 10), DataError);
  EXPECT_EQ(Dataset::cache_size(), 1u);
  Dataset::clear_cache();
}

TEST(Dataset, CountMismatch) {
  testing::TempDir dir;
  const std::string images = dir.path() + "/images.gz", labels = dir.path() + "/labels.gz";
  write_gz(images, idx_bytes(kIdxImagesMagic, {3, 2, 2}, std::vector<uint8_t>(12, 9)));
  write_gz(labels, idx_bytes(kIdxLabelsMagic, {2}, {1, 2}));
  expect_data_error([&] { Dataset::load(images, labels, 10); },
                    {labels, "2 labels", images, "3 images"});
}

TEST(Dataset, LabelOutOfRange) {
  testing::TempDir dir;
  const std::string images = dir.path() + "/images", labels = dir.path() + "/labels";
  write_raw(images, idx_bytes(kIdxImagesMagic, {3, 2, 2}, std::vector<uint8_t>(12, 9)));
  write_raw(labels, idx_bytes(kIdxLabelsMagic, {3}, {1, 9, 10}));
  expect_data_error([&] { Dataset::load(images, labels, 10); },
                    {labels, "label 10 of sample 2 is out of range [0, 10)"});
  EXPECT_EQ(Dataset::load(images, labels, 11)->label(2), 10);
  EXPECT_THROW(Dataset::load(images, labels, 0), InvalidArgument);
  // Swapped files.
  expect_data_error([&] { Dataset::load(labels, images, 10); }, {"expected magic"});
  expect_data_error([&] { Dataset::load(images, dir.path() + "/nope", 10); },
                    {dir.path() + "/nope", "No such file"});
  Dataset::clear_cache();
}

TEST(Dataset, FillBatch) {
  testing::TempDir dir;
  auto files = write_synthetic(dir.path(), "x", 10, 4, 3, 10, false);
  auto ds = Dataset::load(files.images, files.labels, 10);
  const std::vector<int64_t> idx = {3, 0, 9, 3};
  std::vector<float> images(idx.size() * 12, -1.0f);
  std::vector<int64_t> labels(idx.size(), -1);
  ds->fill_batch(idx, images, labels);
  for (size_t k = 0; k < idx.size(); ++k) {
    EXPECT_EQ(labels[k], idx[k]);
    auto img = ds->image(idx[k]);
    EXPECT_TRUE(std::equal(img.begin(), img.end(), images.begin() + static_cast<long>(k * 12)))
        << k;
  }
  Batch b = ds->batch(idx);
  EXPECT_EQ(b.size, 4);
  EXPECT_EQ(b.images, images);
  EXPECT_EQ(b.labels, labels);
  EXPECT_EQ(ds->batch({}).size, 0);

  // Wrong buffer sizes, indices out of range (nothing written).
  std::vector<float> small(idx.size() * 12 - 1);
  EXPECT_THROW(ds->fill_batch(idx, small, labels), InvalidArgument);
  std::vector<int64_t> few(3);
  EXPECT_THROW(ds->fill_batch(idx, images, few), InvalidArgument);
  std::fill(images.begin(), images.end(), -1.0f);
  const std::vector<int64_t> bad = {1, 10};
  std::vector<float> two(24, -1.0f);
  std::vector<int64_t> two_labels(2, -1);
  EXPECT_THROW(ds->fill_batch(bad, two, two_labels), InvalidArgument);
  EXPECT_TRUE(std::all_of(two.begin(), two.end(), [](float f) { return f == -1.0f; }));
  EXPECT_THROW(ds->batch(std::vector<int64_t>{-1}), InvalidArgument);
  Dataset::clear_cache();
}

}  // namespace
}  // namespace weft::data
