// PLACEHOLDER until the dense codecs land (fp16, bf16, int8, sign).
#include "train/codecs.h"
#include "weft/errors.h"

namespace weft::train::codecs {

std::unique_ptr<GradientCodec> make_half(const CompressionOptions&, const CodecLayout&, bool) {
  throw InvalidArgument("--compress fp16/bf16: not built yet");
}
std::unique_ptr<GradientCodec> make_int8(const CompressionOptions&, const CodecLayout&, int) {
  throw InvalidArgument("--compress int8: not built yet");
}
std::unique_ptr<GradientCodec> make_sign(const CompressionOptions&, const CodecLayout&, int) {
  throw InvalidArgument("--compress sign: not built yet");
}

}  // namespace weft::train::codecs
