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
  auto a = h.get(200000);  // class 256 KiB
  ASSERT_NE(a.get(), nullptr);
  EXPECT_EQ(a.capacity, 256u << 10);
  std::memset(a.get(), 1, 200000);  // the whole request is usable
  uint8_t* first = a.get();
  h.put(std::move(a));
  EXPECT_EQ(h.kept_bytes(), 256u << 10);
  auto b = h.get(150000);  // same class: the kept block
  EXPECT_EQ(b.get(), first);
  EXPECT_EQ(h.kept_bytes(), 0u);
  auto c = h.get(300000);  // another class: a new block
  EXPECT_EQ(c.capacity, 512u << 10);
  EXPECT_NE(c.get(), first);
  h.put(std::move(b));
  h.put(std::move(c));
  EXPECT_EQ(h.kept_bytes(), 768u << 10);
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
