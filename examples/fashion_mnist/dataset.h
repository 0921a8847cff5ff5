// Fashion-MNIST as the example job finds it: the directory where the Debian
// package dataset-fashion-mnist installs it, the file names of its two
// splits, and the names of its ten classes. The library only reads IDX files
// and holds datasets (weft/data.h); everything that is particular to this
// dataset lives here.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>

#include "weft/data.h"

namespace fashion_mnist {

// Where the Debian package dataset-fashion-mnist installs Fashion-MNIST:
// train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
// t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz.
inline constexpr std::string_view kDefaultDir = "/usr/share/datasets/fashion-mnist";
inline constexpr int kClasses = 10;
inline constexpr int kImageSide = 28;

// "T-shirt/top", "Trouser", ..., "Ankle boot" for labels 0..9; "?" otherwise.
std::string_view class_name(int64_t label);

enum class Split { Train, Test };

// Fashion-MNIST (60000 train / 10000 test samples, 28x28, 10 classes) from
// dir, through weft::data::Dataset::load() (so decoded once per process).
// Uses the .gz files, or the uncompressed ones (same names without .gz) when
// only those exist. A missing directory or file throws weft::DataError that
// says which package provides the data; images that are not 28x28 throw
// weft::DataError naming the file.
std::shared_ptr<const weft::data::Dataset> load(Split split, std::string_view dir = kDefaultDir);

}  // namespace fashion_mnist
