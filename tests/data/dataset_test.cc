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

// A synthetic dataset of n h x w images: pixel j of sample i is (i * 31 + j) % 256,
// label i % classes.
struct Synthetic {
  std::string images, labels;
};

Synthetic write_synthetic(const std::string& dir, const std::string& prefix, uint32_t n, uint32_t h,
                          uint32_t w, uint32_t classes, bool gz) {
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

TEST(Dataset, FashionMnistLayoutAndErrors) {
  testing::TempDir dir;
  expect_data_error([&] { Dataset::fashion_mnist(Split::Train, dir.path() + "/none"); },
                    {dir.path() + "/none", "No such file", "dataset-fashion-mnist"});
  expect_data_error(
      [&] { Dataset::fashion_mnist(Split::Test, dir.path()); },
      {dir.path() + "/t10k-images-idx3-ubyte.gz", "No such file", "dataset-fashion-mnist"});
  // Gzipped train files, uncompressed test files: both are found.
  write_synthetic(dir.path(), "train", 20, 28, 28, 10, true);
  write_synthetic(dir.path(), "t10k", 10, 28, 28, 10, false);
  auto train = Dataset::fashion_mnist(Split::Train, dir.path());
  auto test = Dataset::fashion_mnist(Split::Test, dir.path());
  EXPECT_EQ(train->size(), 20);
  EXPECT_EQ(test->size(), 10);
  EXPECT_EQ(test->images_path(), dir.path() + "/t10k-images-idx3-ubyte");
  // Not 28x28.
  testing::TempDir other;
  write_synthetic(other.path(), "train", 2, 28, 27, 10, true);
  expect_data_error([&] { Dataset::fashion_mnist(Split::Train, other.path()); },
                    {"train-images-idx3-ubyte.gz", "28x28", "28x27"});
  EXPECT_EQ(fashion_mnist_class_name(0), "T-shirt/top");
  EXPECT_EQ(fashion_mnist_class_name(9), "Ankle boot");
  EXPECT_EQ(fashion_mnist_class_name(10), "?");
  Dataset::clear_cache();
}

TEST(Dataset, RealFashionMnist) {
  const std::string dir(kFashionMnistDir);
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    GTEST_SKIP() << dir << " not found (Debian package dataset-fashion-mnist; `make test` "
                 << "installs it through scripts/deps.sh)";
  }
  Dataset::clear_cache();
  auto t0 = std::chrono::steady_clock::now();
  auto train = Dataset::fashion_mnist(Split::Train);
  auto t1 = std::chrono::steady_clock::now();
  auto test = Dataset::fashion_mnist(Split::Test);
  auto t2 = std::chrono::steady_clock::now();
  auto again = Dataset::fashion_mnist(Split::Train);
  auto t3 = std::chrono::steady_clock::now();
  auto ms = [](auto a, auto b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
  std::cout << "Fashion-MNIST load: train " << ms(t0, t1) << " ms, test " << ms(t1, t2)
            << " ms, train again (cached) " << ms(t2, t3) << " ms\n";
  EXPECT_EQ(again.get(), train.get());

  ASSERT_EQ(train->size(), 60000);
  ASSERT_EQ(test->size(), 10000);
  for (const auto& ds : {train, test}) {
    EXPECT_EQ(ds->height(), 28);
    EXPECT_EQ(ds->width(), 28);
    EXPECT_EQ(ds->images().size(), static_cast<size_t>(ds->size()) * 784);
    auto [lo, hi] = std::minmax_element(ds->images().begin(), ds->images().end());
    EXPECT_EQ(*lo, 0.0f);
    EXPECT_EQ(*hi, 1.0f);
    std::array<int64_t, 10> hist{};
    for (int64_t l : ds->labels()) {
      ASSERT_GE(l, 0);
      ASSERT_LT(l, 10);
      ++hist[static_cast<size_t>(l)];
    }
    for (int c = 0; c < 10; ++c) {
      EXPECT_EQ(hist[static_cast<size_t>(c)], ds->size() / 10) << fashion_mnist_class_name(c);
    }
  }
  // Known first labels of the original files: train starts 9 (Ankle boot), 0, 0, 3;
  // test starts 9, 2, 1, 1.
  EXPECT_EQ(train->label(0), 9);
  EXPECT_EQ(train->label(3), 3);
  EXPECT_EQ(test->label(1), 2);

  // Batch assembly speed: a whole epoch in batches of 64.
  DistributedSampler sampler(train->size(), 1, 0, {.seed = 1});
  auto shard = sampler.shard(0);
  Batch b;
  b.images.resize(64 * 784);
  b.labels.resize(64);
  auto t4 = std::chrono::steady_clock::now();
  const int64_t steps = sampler.steps_per_epoch(64, true);
  for (int64_t k = 0; k < steps; ++k)
    train->fill_batch(batch_indices(shard, 64, k), b.images, b.labels);
  auto t5 = std::chrono::steady_clock::now();
  std::cout << "Fashion-MNIST: " << steps << " batches of 64 assembled in " << ms(t4, t5)
            << " ms\n";
  Dataset::clear_cache();
}

}  // namespace
}  // namespace weft::data
