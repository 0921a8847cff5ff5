#include "core/auth.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <thread>

#include "core/socket.h"
#include "weft/errors.h"

namespace weft::auth {
namespace {

struct Pair {
  net::Fd a, b;
  Pair() {
    int fds[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, fds), 0);
    a.reset(fds[0]);
    b.reset(fds[1]);
  }
};

// Runs the server state machine with blocking reads on its end of the pair.
ServerHandshake serve(int fd, ServerHandshake hs) {
  Deadline d = Deadline::after(std::chrono::seconds(5));
  while (!hs.done()) {
    std::vector<uint8_t> in(hs.want());
    int err = 0;
    if (net::read_exact(fd, in.data(), in.size(), d, &err) != net::IoStatus::Ok) break;
    auto out = hs.feed(in);
    if (!out.empty()) net::write_all(fd, out.data(), out.size(), d, &err);
  }
  return hs;
}

TEST(Auth, SameTokenIsAccepted) {
  Pair p;
  Context ctx{};
  ctx[0] = 42;
  std::thread server([&] {
    auto hs =
        serve(p.b.get(), ServerHandshake({"secret", false}, Kind::Transport, [](const Hello& h) {
                return h.context[0] == 42 ? "" : "bad context";
              }));
    EXPECT_TRUE(hs.accepted()) << hs.error();
  });
  EXPECT_NO_THROW(client_handshake(p.a.get(), Kind::Transport, ctx, {"secret", false},
                                   Deadline::after(std::chrono::seconds(5)), "peer"));
  server.join();
}

TEST(Auth, WrongTokenIsRefusedOnBothSides) {
  Pair p;
  std::thread server([&] {
    auto hs = serve(p.b.get(), ServerHandshake({"secret", false}, Kind::Store));
    EXPECT_FALSE(hs.accepted());
  });
  try {
    client_handshake(p.a.get(), Kind::Store, {}, {"other", false},
                     Deadline::after(std::chrono::seconds(5)), "store");
    FAIL() << "expected ProtocolError";
  } catch (const ProtocolError& e) {
    EXPECT_NE(std::string(e.what()).find("job token"), std::string::npos) << e.what();
  }
  server.join();
}

TEST(Auth, MissingTokenIsRefused) {
  Pair p;
  std::thread server([&] {
    auto hs = serve(p.b.get(), ServerHandshake({"secret", false}, Kind::Store));
    EXPECT_FALSE(hs.accepted());
  });
  EXPECT_THROW(client_handshake(p.a.get(), Kind::Store, {}, {"", true},
                                Deadline::after(std::chrono::seconds(5)), "store"),
               ProtocolError);
  server.join();
}

TEST(Auth, GarbageIsRefusedWithoutReply) {
  ServerHandshake hs({"secret", false}, Kind::Store);
  std::vector<uint8_t> junk(hs.want(), 0xab);
  auto reply = hs.feed(junk);
  EXPECT_TRUE(reply.empty());
  EXPECT_TRUE(hs.done());
  EXPECT_FALSE(hs.accepted());
  EXPECT_NE(hs.error().find("not a Weft handshake"), std::string::npos) << hs.error();
}

TEST(Auth, ContextRejection) {
  Pair p;
  std::thread server([&] {
    auto hs = serve(p.b.get(), ServerHandshake({"t", false}, Kind::Transport, [](const Hello&) {
                      return std::string("stale generation");
                    }));
    EXPECT_FALSE(hs.accepted());
    EXPECT_EQ(hs.error(), "stale generation");
  });
  EXPECT_THROW(client_handshake(p.a.get(), Kind::Transport, {}, {"t", false},
                                Deadline::after(std::chrono::seconds(5)), "peer"),
               ProtocolError);
  server.join();
}

TEST(Auth, UnauthenticatedNeedsExplicitConsent) {
  EXPECT_THROW(client_handshake(-1, Kind::Store, {}, {"", false},
                                Deadline::after(std::chrono::seconds(1)), "x"),
               ProtocolError);
  Pair p;
  std::thread server([&] {
    auto hs = serve(p.b.get(), ServerHandshake({"", true}, Kind::Store));
    EXPECT_TRUE(hs.accepted()) << hs.error();
  });
  EXPECT_NO_THROW(client_handshake(p.a.get(), Kind::Store, {}, {"", true},
                                   Deadline::after(std::chrono::seconds(5)), "store"));
  server.join();
}

TEST(Auth, TokensAreRandom) {
  auto a = generate_token(), b = generate_token();
  EXPECT_EQ(a.size(), 64u);
  EXPECT_NE(a, b);
}

}  // namespace
}  // namespace weft::auth
