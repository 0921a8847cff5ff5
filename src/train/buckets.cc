// Tensor descriptions and the bucket plan (see weft/train.h).
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <limits>

#include "weft/errors.h"
#include "weft/train.h"

namespace weft::train {
namespace {

size_t numel_of(std::span<const int64_t> shape) {
  size_t n = 1;
  for (int64_t d : shape) {
    if (d < 0)
      throw InvalidArgument(
          fmt::format("negative dimension in shape [{}]", fmt::join(shape, ", ")));
    n *= static_cast<size_t>(d);
  }
  return n;
}

}  // namespace

size_t Parameter::numel() const { return numel_of(shape); }
size_t StateBuffer::numel() const { return numel_of(shape); }

std::string describe_shape(DType dtype, std::span<const int64_t> shape) {
  return fmt::format("{} [{}]", dtype_name(dtype), fmt::join(shape, ", "));
}

std::vector<Bucket> assign_buckets(std::span<const Parameter> params,
                                   const BucketOptions& options) {
  if (options.bucket_bytes == 0 || options.first_bucket_bytes == 0) {
    throw InvalidArgument("bucket sizes must be > 0 bytes");
  }
  struct Open {
    Bucket bucket;
    size_t first_index = 0;  // position (in walking order) of its first parameter
    bool used = false;
  };
  std::vector<Open> open(kNumDTypes);
  std::vector<bool> closed_one(kNumDTypes, false);
  std::vector<Open> done;
  size_t position = 0;
  for (size_t k = params.size(); k-- > 0; ++position) {
    const Parameter& p = params[k];
    if (!p.trainable) continue;
    const auto t = static_cast<size_t>(p.dtype);
    Open& o = open[t];
    if (!o.used) {
      o = Open{Bucket{p.dtype, {}, {}, 0}, position, true};
    }
    o.bucket.params.push_back(k);
    o.bucket.offsets.push_back(o.bucket.numel);
    o.bucket.numel += p.numel();
    const size_t limit = closed_one[t] ? options.bucket_bytes : options.first_bucket_bytes;
    if (o.bucket.bytes() >= limit) {
      done.push_back(std::move(o));
      o = Open{};
      closed_one[t] = true;
    }
  }
  for (Open& o : open) {
    if (o.used) done.push_back(std::move(o));
  }
  std::stable_sort(done.begin(), done.end(),
                   [](const Open& a, const Open& b) { return a.first_index < b.first_index; });
  std::vector<Bucket> out;
  out.reserve(done.size());
  for (Open& o : done) out.push_back(std::move(o.bucket));
  return out;
}

}  // namespace weft::train
