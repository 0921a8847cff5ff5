// The matching layer shared by the transports: held-message buffers are
// reused (no fresh allocation, hence no page faults, for the early messages
// of a collective's steady state), within their budget.
#include "transport/matching.h"

#include <gtest/gtest.h>

#include <cstring>

namespace weft::transport {
namespace {

TEST(HoldBuffers, LargeBlocksAreReusedBySizeClass) {
  HoldBuffers h(1u << 20);
  // 8 classes per power of two: 200000 rounds up to 13 x 16 KiB.
  auto a = h.get(200000);
  ASSERT_NE(a.get(), nullptr);
  EXPECT_EQ(a.capacity, 13u * (16u << 10));
  std::memset(a.get(), 1, 200000);  // the whole request is usable
  uint8_t* first = a.get();
  h.put(std::move(a));
  EXPECT_EQ(h.kept_bytes(), 13u * (16u << 10));
  auto b = h.get(199000);  // same class: the kept block
  EXPECT_EQ(b.get(), first);
  EXPECT_EQ(h.kept_bytes(), 0u);
  auto c = h.get(300000);  // another class (10 x 32 KiB): a new block
  EXPECT_EQ(c.capacity, 10u * (32u << 10));
  EXPECT_NE(c.get(), first);
  auto d = h.get(256u << 10);  // a power of two is its own class
  EXPECT_EQ(d.capacity, 256u << 10);
  h.put(std::move(b));
  h.put(std::move(c));
  EXPECT_EQ(h.kept_bytes(), 13u * (16u << 10) + 10u * (32u << 10));
}

TEST(HoldBuffers, BlocksTooLargeToKeepAreNotRoundedUp) {
  HoldBuffers h(1u << 20);
  auto big = h.get((3u << 20) + 5);  // could never be kept
  EXPECT_EQ(big.capacity, (3u << 20) + 5);
  h.put(std::move(big));
  EXPECT_EQ(h.kept_bytes(), 0u);
}

TEST(HoldBuffers, SmallBlocksAreNotKeptAndTheBudgetHolds) {
  HoldBuffers h(600u << 10);
  auto s = h.get(100);
  EXPECT_EQ(s.capacity, 100u);
  h.put(std::move(s));
  EXPECT_EQ(h.kept_bytes(), 0u);
  auto z = h.get(0);  // an empty message still gets a block
  EXPECT_NE(z.get(), nullptr);
  auto a = h.get(256u << 10), b = h.get(256u << 10), c = h.get(256u << 10);
  h.put(std::move(a));
  h.put(std::move(b));
  h.put(std::move(c));  // beyond 600 KiB: freed
  EXPECT_EQ(h.kept_bytes(), 512u << 10);
  h.put(HoldBuffers::Block{});  // nothing: ignored
  EXPECT_EQ(h.kept_bytes(), 512u << 10);
}

}  // namespace
}  // namespace weft::transport
