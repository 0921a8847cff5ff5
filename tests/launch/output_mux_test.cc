// Unit tests of the line splitting behind the rank prefixes.
#include "launch/output_mux.h"

#include <gtest/gtest.h>
#include <unistd.h>

namespace weft::launch {
namespace {

std::string feed_all(LinePrefixer& p, std::initializer_list<std::string_view> pieces) {
  std::string out;
  for (auto piece : pieces) p.feed(piece, out);
  return out;
}

TEST(LinePrefixer, PrefixesWholeLines) {
  LinePrefixer p("[3] ");
  EXPECT_EQ(feed_all(p, {"a\nbc\n\nd\n"}), "[3] a\n[3] bc\n[3] \n[3] d\n");
  EXPECT_EQ(p.held(), 0u);
}

TEST(LinePrefixer, JoinsLinesSplitAcrossReads) {
  LinePrefixer p("[0] ");
  EXPECT_EQ(feed_all(p, {"hel", "lo wo", "rld\nnext"}), "[0] hello world\n");
  EXPECT_EQ(p.held(), 4u);
  std::string out;
  p.feed("\n", out);
  EXPECT_EQ(out, "[0] next\n");
}

TEST(LinePrefixer, FinishWritesThePartialLine) {
  LinePrefixer p("[1] ");
  EXPECT_EQ(feed_all(p, {"done\nno newline"}), "[1] done\n");
  std::string out;
  p.finish(out);
  EXPECT_EQ(out, "[1] no newline\n");
  out.clear();
  p.finish(out);  // nothing held any more
  EXPECT_EQ(out, "");
}

TEST(LinePrefixer, CutsLongLinesAndBoundsMemory) {
  LinePrefixer p("> ", 8);
  std::string out = feed_all(p, {"0123456789", "abcdefghij", "XY"});
  EXPECT_EQ(out, "> 01234567\n> 89abcdef\n");
  EXPECT_LE(p.held(), 8u);
  out.clear();
  p.feed("\n", out);
  EXPECT_EQ(out, "> ghijXY\n");
}

TEST(LinePrefixer, LineOfExactlyTheLimitStaysWhole) {
  LinePrefixer p("", 4);
  EXPECT_EQ(feed_all(p, {"abcd", "\nabcde\n"}), "abcd\nabcd\ne\n");
}

TEST(LinePrefixer, DoesNotCutInsideUtf8) {
  // "aé" + "€€": a (1) é (2) € (3) € (3); a cut at 4 would split the first €.
  LinePrefixer p("", 4);
  std::string out = feed_all(p, {"a\xC3\xA9\xE2\x82\xAC\xE2\x82\xAC\n"});
  EXPECT_EQ(out, "a\xC3\xA9\n\xE2\x82\xAC\n\xE2\x82\xAC\n");
}

TEST(StreamRelay, RelaysAndFlushesAtEnd) {
  int in[2], out[2];
  ASSERT_EQ(::pipe(in), 0);
  ASSERT_EQ(::pipe(out), 0);
  net::Fd out_r(out[0]), out_w(out[1]);
  StreamRelay relay(net::Fd(in[0]), out_w.get(), "[2] ");
  ASSERT_EQ(::write(in[1], "x\ny", 3), 3);
  EXPECT_TRUE(relay.on_readable());
  ::close(in[1]);
  relay.drain();
  EXPECT_FALSE(relay.is_open());
  char buf[64] = {0};
  ssize_t n = ::read(out_r.get(), buf, sizeof buf);
  EXPECT_EQ(std::string(buf, static_cast<size_t>(n)), "[2] x\n[2] y\n");
}

}  // namespace
}  // namespace weft::launch
