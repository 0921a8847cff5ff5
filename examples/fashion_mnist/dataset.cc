// Fashion-MNIST: finding its files, checking their shape, naming its classes.
#include "dataset.h"

#include <fmt/format.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>

#include "weft/errors.h"

namespace fashion_mnist {
namespace {

constexpr std::array<std::string_view, kClasses> kNames = {
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};

bool exists(const std::string& path) {
  std::error_code ec;
  return std::filesystem::exists(path, ec);
}

}  // namespace

std::string_view class_name(int64_t label) {
  if (label < 0 || label >= static_cast<int64_t>(kNames.size())) return "?";
  return kNames[static_cast<size_t>(label)];
}

std::shared_ptr<const weft::data::Dataset> load(Split split, std::string_view dir) {
  const std::string base(dir);
  const char* hint =
      "install the Debian package dataset-fashion-mnist, or pass the directory that holds "
      "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
      "t10k-labels-idx1-ubyte.gz";
  if (!exists(base)) {
    throw weft::DataError(
        fmt::format("Fashion-MNIST directory {}: {} ({})", base, std::strerror(ENOENT), hint));
  }
  const std::string prefix = split == Split::Train ? "train" : "t10k";
  auto find = [&](const std::string& name) {
    std::string path = base + "/" + name;
    if (exists(path + ".gz")) return path + ".gz";
    if (exists(path)) return path;
    throw weft::DataError(
        fmt::format("Fashion-MNIST file {}.gz: {} ({})", path, std::strerror(ENOENT), hint));
  };
  const std::string images = find(prefix + "-images-idx3-ubyte");
  const std::string labels = find(prefix + "-labels-idx1-ubyte");
  auto ds = weft::data::Dataset::load(images, labels, kClasses);
  if (ds->height() != kImageSide || ds->width() != kImageSide) {
    throw weft::DataError(
        fmt::format("IDX file {}: Fashion-MNIST images are {}x{}, these are {}x{}",
                    ds->images_path(), kImageSide, kImageSide, ds->height(), ds->width()));
  }
  return ds;
}

}  // namespace fashion_mnist
