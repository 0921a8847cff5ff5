// PLACEHOLDER until the top-k codec lands.
#include "train/codecs.h"
#include "weft/errors.h"

namespace weft::train::codecs {

std::unique_ptr<GradientCodec> make_topk(const CompressionOptions&, const CodecLayout&, int) {
  throw InvalidArgument("--compress topk: not built yet");
}

}  // namespace weft::train::codecs
