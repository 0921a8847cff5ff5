#include "core/settings.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include "core/socket.h"
#include "weft/errors.h"

namespace weft {
namespace {

TEST(Settings, Bytes) {
  EXPECT_EQ(settings::parse_bytes("4096", "X"), 4096u);
  EXPECT_EQ(settings::parse_bytes("64K", "X"), 65536u);
  EXPECT_EQ(settings::parse_bytes("4M", "X"), 4u << 20);
  EXPECT_EQ(settings::parse_bytes("1G", "X"), 1u << 30);
  EXPECT_THROW(settings::parse_bytes("4Q", "X"), InvalidArgument);
  EXPECT_THROW(settings::parse_bytes("-1", "X"), InvalidArgument);
  EXPECT_THROW(settings::parse_bytes("", "X"), InvalidArgument);
}

TEST(Settings, SecondsAndIntsFromEnvironment) {
  setenv("WEFT_TEST_SECONDS", "2.5", 1);
  EXPECT_EQ(settings::get_seconds("WEFT_TEST_SECONDS", std::chrono::seconds(1)).count(), 2500);
  setenv("WEFT_TEST_SECONDS", "abc", 1);
  try {
    settings::get_seconds("WEFT_TEST_SECONDS", std::chrono::seconds(1));
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("WEFT_TEST_SECONDS"), std::string::npos);
  }
  setenv("WEFT_TEST_INT", "17", 1);
  EXPECT_EQ(settings::get_int("WEFT_TEST_INT", 1, 0, 100), 17);
  EXPECT_THROW(settings::get_int("WEFT_TEST_INT", 1, 0, 10), InvalidArgument);
  unsetenv("WEFT_TEST_INT");
  EXPECT_EQ(settings::get_int("WEFT_TEST_INT", 3, 0, 10), 3);
}

TEST(Settings, EveryVariableIsDocumented) {
  for (const auto& s : settings::all()) {
    EXPECT_EQ(s.env.substr(0, 5), "WEFT_");
    EXPECT_FALSE(s.doc.empty()) << s.env;
  }
}

TEST(Net, HostPort) {
  EXPECT_EQ(net::split_host_port("127.0.0.1:29500", "X"), std::make_pair(std::string("127.0.0.1"), uint16_t(29500)));
  EXPECT_EQ(net::split_host_port("[::1]:80", "X"), std::make_pair(std::string("::1"), uint16_t(80)));
  EXPECT_EQ(net::split_host_port("node-1:1", "X").first, "node-1");
  EXPECT_THROW(net::split_host_port("nohost", "X"), InvalidArgument);
  EXPECT_THROW(net::split_host_port("h:0", "X"), InvalidArgument);
  EXPECT_THROW(net::split_host_port("h:99999", "X"), InvalidArgument);
  EXPECT_EQ(net::join_host_port("::1", 5), "[::1]:5");
}

}  // namespace
}  // namespace weft
