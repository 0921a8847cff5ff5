// The example's Fashion-MNIST loader (examples/fashion_mnist/dataset.h): the
// file layout of its directory, the errors for a missing or misshapen
// dataset, the class names, and the real files when the Debian package
// dataset-fashion-mnist is installed.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <iostream>
#include <string>

#include "data/data_testing.h"
#include "dataset.h"
#include "testing/testing.h"
#include "weft/data.h"

namespace fashion_mnist {
namespace {

using weft::data::test::expect_data_error;
using weft::data::test::write_synthetic;
namespace testing = weft::testing;

TEST(FashionMnistDataset, LayoutAndErrors) {
  testing::TempDir dir;
  expect_data_error([&] { load(Split::Train, dir.path() + "/none"); },
                    {dir.path() + "/none", "No such file", "dataset-fashion-mnist"});
  expect_data_error(
      [&] { load(Split::Test, dir.path()); },
      {dir.path() + "/t10k-images-idx3-ubyte.gz", "No such file", "dataset-fashion-mnist"});
  // Gzipped train files, uncompressed test files: both are found.
  write_synthetic(dir.path(), "train", 20, 28, 28, 10, true);
  write_synthetic(dir.path(), "t10k", 10, 28, 28, 10, false);
  auto train = load(Split::Train, dir.path());
  auto test = load(Split::Test, dir.path());
  EXPECT_EQ(train->size(), 20);
  EXPECT_EQ(test->size(), 10);
  EXPECT_EQ(test->images_path(), dir.path() + "/t10k-images-idx3-ubyte");
  // Not 28x28.
  testing::TempDir other;
  write_synthetic(other.path(), "train", 2, 28, 27, 10, true);
  expect_data_error([&] { load(Split::Train, other.path()); },
                    {"train-images-idx3-ubyte.gz", "28x28", "28x27"});
  EXPECT_EQ(class_name(0), "T-shirt/top");
  EXPECT_EQ(class_name(9), "Ankle boot");
  EXPECT_EQ(class_name(10), "?");
  weft::data::Dataset::clear_cache();
}

TEST(FashionMnistDataset, RealFiles) {
  const std::string dir(kDefaultDir);
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    GTEST_SKIP() << dir << " not found (Debian package dataset-fashion-mnist; `make test` "
                 << "installs it through scripts/deps.sh)";
  }
  weft::data::Dataset::clear_cache();
  auto t0 = std::chrono::steady_clock::now();
  auto train = load(Split::Train);
  auto t1 = std::chrono::steady_clock::now();
  auto test = load(Split::Test);
  auto t2 = std::chrono::steady_clock::now();
  auto again = load(Split::Train);
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
      EXPECT_EQ(hist[static_cast<size_t>(c)], ds->size() / 10) << class_name(c);
    }
  }
  // Known first labels of the original files: train starts 9 (Ankle boot), 0, 0, 3;
  // test starts 9, 2, 1, 1.
  EXPECT_EQ(train->label(0), 9);
  EXPECT_EQ(train->label(3), 3);
  EXPECT_EQ(test->label(1), 2);

  // Batch assembly speed: a whole epoch in batches of 64.
  weft::data::DistributedSampler sampler(train->size(), 1, 0, {.seed = 1});
  auto shard = sampler.shard(0);
  weft::data::Batch b;
  b.images.resize(64 * 784);
  b.labels.resize(64);
  auto t4 = std::chrono::steady_clock::now();
  const int64_t steps = sampler.steps_per_epoch(64, true);
  for (int64_t k = 0; k < steps; ++k)
    train->fill_batch(weft::data::batch_indices(shard, 64, k), b.images, b.labels);
  auto t5 = std::chrono::steady_clock::now();
  std::cout << "Fashion-MNIST: " << steps << " batches of 64 assembled in " << ms(t4, t5)
            << " ms\n";
  weft::data::Dataset::clear_cache();
}

}  // namespace
}  // namespace fashion_mnist
