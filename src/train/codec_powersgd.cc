// PLACEHOLDER until the PowerSGD codec lands (powersgd_max_rank is real).
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

#include "train/codecs.h"
#include "weft/errors.h"

namespace weft::train::codecs {

size_t powersgd_max_rank(const CodecLayout& layout, std::string* which) {
  size_t best = 0;
  for (const CodecTensor& t : layout.tensors) {
    if (t.shape.size() < 2) continue;
    const auto rows = static_cast<size_t>(t.shape[0]);
    const size_t cols = rows == 0 ? 0 : t.numel() / rows;
    const size_t r = std::min(rows, cols);
    if (r > best) {
      best = r;
      if (which != nullptr) *which = fmt::format("{} [{}]", t.name, fmt::join(t.shape, ", "));
    }
  }
  return best;
}

std::unique_ptr<GradientCodec> make_powersgd(const CompressionOptions&, const CodecLayout&, int) {
  throw InvalidArgument("--compress powersgd: not built yet");
}

}  // namespace weft::train::codecs
