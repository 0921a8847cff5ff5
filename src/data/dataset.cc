// Dataset: decoding IDX image/label pairs into float32 once per process.
#include <sys/stat.h>

#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>

#include "core/log.h"
#include "core/mutex.h"
#include "weft/data.h"
#include "weft/errors.h"

namespace weft::data {

namespace {

struct CacheEntry {
  Mutex mu;  // held while loading
  std::shared_ptr<const Dataset> dataset GUARDED_BY(mu);
};

struct Cache {
  Mutex mu;
  std::map<std::string, std::shared_ptr<CacheEntry>> entries GUARDED_BY(mu);
};

Cache& cache() {
  static Cache c;
  return c;
}

// Absolute path plus size and modification time, or DataError naming it.
std::string file_identity(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw DataError(fmt::format("IDX file {}: {}", path, std::strerror(errno)));
  }
  std::error_code ec;
  auto abs = std::filesystem::weakly_canonical(path, ec);
  return fmt::format("{}\t{}\t{}.{}", ec ? path : abs.string(), st.st_size, st.st_mtim.tv_sec,
                     st.st_mtim.tv_nsec);
}

}  // namespace

// Builds Datasets (a friend of Dataset).
struct DatasetLoader {
  static std::shared_ptr<const Dataset> decode(const std::string& images_path,
                                               const std::string& labels_path, int num_classes) {
    auto start = std::chrono::steady_clock::now();
    IdxArray labels = read_idx(labels_path, kIdxLabelsMagic);
    IdxArray images = read_idx(images_path, kIdxImagesMagic);
    if (images.dims[0] != labels.dims[0]) {
      throw DataError(fmt::format("IDX file {}: {} labels, but {} has {} images", labels_path,
                                  labels.dims[0], images_path, images.dims[0]));
    }
    std::shared_ptr<Dataset> ds(new Dataset());
    ds->size_ = images.dims[0];
    ds->height_ = static_cast<int>(images.dims[1]);
    ds->width_ = static_cast<int>(images.dims[2]);
    ds->num_classes_ = num_classes;
    ds->images_path_ = images_path;
    ds->labels_path_ = labels_path;

    ds->labels_.resize(labels.values.size());
    for (size_t i = 0; i < labels.values.size(); ++i) {
      uint8_t l = labels.values[i];
      if (l >= num_classes) {
        throw DataError(fmt::format("IDX file {}: label {} of sample {} is out of range [0, {})",
                                    labels_path, l, i, num_classes));
      }
      ds->labels_[i] = l;
    }

    // byte / 255 in float32, exactly what dividing each pixel would give.
    std::array<float, 256> lut;
    for (int v = 0; v < 256; ++v) lut[static_cast<size_t>(v)] = static_cast<float>(v) / 255.0f;
    ds->images_.resize(images.values.size());
    const uint8_t* src = images.values.data();
    float* dst = ds->images_.data();
    for (size_t i = 0, n = images.values.size(); i < n; ++i) dst[i] = lut[src[i]];

    double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    WEFT_INFO("data: loaded {} samples of {}x{} from {} in {:.0f} ms", ds->size_, ds->height_,
              ds->width_, images_path, ms);
    return ds;
  }
};

std::shared_ptr<const Dataset> Dataset::load(const std::string& images_path,
                                             const std::string& labels_path, int num_classes) {
  if (num_classes < 1 || num_classes > 256) {
    throw InvalidArgument(
        fmt::format("Dataset::load: num_classes {} is not in [1, 256]", num_classes));
  }
  std::string key = fmt::format("{}\n{}\n{}", file_identity(images_path),
                                file_identity(labels_path), num_classes);
  Cache& c = cache();
  std::shared_ptr<CacheEntry> entry;
  {
    MutexLock lock(&c.mu);
    auto& slot = c.entries[key];
    if (!slot) slot = std::make_shared<CacheEntry>();
    entry = slot;
  }
  MutexLock lock(&entry->mu);
  if (entry->dataset) {
    WEFT_DEBUG("data: {} already decoded (cache)", images_path);
    return entry->dataset;
  }
  try {
    entry->dataset = DatasetLoader::decode(images_path, labels_path, num_classes);
  } catch (...) {
    MutexLock clock(&c.mu);
    auto it = c.entries.find(key);
    if (it != c.entries.end() && it->second == entry) c.entries.erase(it);
    throw;
  }
  return entry->dataset;
}

void Dataset::clear_cache() {
  MutexLock lock(&cache().mu);
  cache().entries.clear();
}

size_t Dataset::cache_size() {
  MutexLock lock(&cache().mu);
  return cache().entries.size();
}

std::span<const float> Dataset::image(int64_t i) const {
  if (i < 0 || i >= size_) {
    throw InvalidArgument(fmt::format("Dataset::image: index {} out of range [0, {})", i, size_));
  }
  return std::span<const float>(images_).subspan(static_cast<size_t>(i * sample_numel()),
                                                 static_cast<size_t>(sample_numel()));
}

int64_t Dataset::label(int64_t i) const {
  if (i < 0 || i >= size_) {
    throw InvalidArgument(fmt::format("Dataset::label: index {} out of range [0, {})", i, size_));
  }
  return labels_[static_cast<size_t>(i)];
}

void Dataset::fill_batch(std::span<const int64_t> indices, std::span<float> images,
                         std::span<int64_t> labels) const {
  const size_t numel = static_cast<size_t>(sample_numel());
  if (images.size() != indices.size() * numel || labels.size() != indices.size()) {
    throw InvalidArgument(fmt::format(
        "Dataset::fill_batch: {} samples need {} image floats and {} labels, got {} and {}",
        indices.size(), indices.size() * numel, indices.size(), images.size(), labels.size()));
  }
  for (size_t k = 0; k < indices.size(); ++k) {
    if (indices[k] < 0 || indices[k] >= size_) {
      throw InvalidArgument(
          fmt::format("Dataset::fill_batch: index {} (position {}) out of range "
                      "[0, {})",
                      indices[k], k, size_));
    }
  }
  const float* src = images_.data();
  for (size_t k = 0; k < indices.size(); ++k) {
    const auto i = static_cast<size_t>(indices[k]);
    std::memcpy(images.data() + k * numel, src + i * numel, numel * sizeof(float));
    labels[k] = labels_[i];
  }
}

Batch Dataset::batch(std::span<const int64_t> indices) const {
  Batch b;
  b.size = static_cast<int64_t>(indices.size());
  b.images.resize(indices.size() * static_cast<size_t>(sample_numel()));
  b.labels.resize(indices.size());
  fill_batch(indices, b.images, b.labels);
  return b;
}

}  // namespace weft::data
