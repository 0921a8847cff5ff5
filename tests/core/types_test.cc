#include "weft/types.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

namespace weft {
namespace {

TEST(Types, HalfRoundTripsEveryValue) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    Half h{static_cast<uint16_t>(bits)};
    float f = half_to_float(h);
    if (std::isnan(f)) continue;
    EXPECT_EQ(float_to_half(f).bits, h.bits) << bits;
  }
}

TEST(Types, HalfRounding) {
  EXPECT_EQ(half_to_float(float_to_half(1.0f)), 1.0f);
  EXPECT_EQ(half_to_float(float_to_half(65504.0f)), 65504.0f);
  EXPECT_TRUE(std::isinf(half_to_float(float_to_half(70000.0f))));
  EXPECT_EQ(half_to_float(float_to_half(1.0f + 1.0f / 4096)), 1.0f);          // ties to even
  EXPECT_EQ(half_to_float(float_to_half(5.96046448e-08f)), 5.96046448e-08f);  // smallest subnormal
}

TEST(Types, BFloat16) {
  EXPECT_EQ(bfloat16_to_float(float_to_bfloat16(1.5f)), 1.5f);
  EXPECT_EQ(bfloat16_to_float(float_to_bfloat16(-2.0f)), -2.0f);
  EXPECT_TRUE(
      std::isnan(bfloat16_to_float(float_to_bfloat16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(Types, BufferViews) {
  std::vector<float> v(10);
  Buffer b(v);
  EXPECT_EQ(b.count(), 10u);
  EXPECT_EQ(b.bytes(), 40u);
  EXPECT_EQ(b.dtype(), DType::Float32);
  EXPECT_EQ(b.slice(2, 3).data(), v.data() + 2);
  const std::vector<int64_t> c(4);
  ConstBuffer cb(c);
  EXPECT_EQ(cb.dtype(), DType::Int64);
  EXPECT_EQ(dtype_name(DType::BFloat16), "bfloat16");
}

}  // namespace
}  // namespace weft
