// TcpStore and TcpStoreServer: many clients, processes, parked waits,
// reconnection, authentication and hostile or broken peers.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <array>
#include <atomic>
#include <cstring>
#include <thread>

#include "core/auth.h"
#include "core/bytes.h"
#include "core/socket.h"
#include "store/store_testing.h"
#include "store/tcp_protocol.h"
#include "weft/errors.h"
#include "weft/store.h"

namespace weft::store_test {
namespace {

using Clock = std::chrono::steady_clock;

net::Fd raw_connect(uint16_t port) {
  auto addr = net::resolve("127.0.0.1", port).front();
  int err = 0;
  net::Fd fd = net::connect_tcp(addr, Deadline::after(5s), &err);
  EXPECT_TRUE(fd.valid()) << net::errno_string(err);
  return fd;
}

void raw_handshake(int fd, const std::string& token) {
  auth::client_handshake(fd, auth::Kind::Store, {}, {token, false}, Deadline::after(5s), "test");
}

void send_bytes(int fd, const void* data, size_t n) {
  int err = 0;
  // The server may close while we write: a failure here is fine.
  (void)net::write_all(fd, data, n, Deadline::after(5s), &err);
}

// Reads (and discards) until the peer closes; false if it is still open at the deadline.
bool closed_by_peer(int fd, Timeout timeout) {
  Deadline deadline = Deadline::after(timeout);
  std::array<char, 4096> buf{};
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    int n = ::poll(&p, 1, deadline.poll_ms());
    if (n == 0) return false;
    if (n < 0) continue;
    ssize_t r = ::recv(fd, buf.data(), buf.size(), MSG_DONTWAIT);
    if (r == 0) return true;
    if (r < 0 && errno != EAGAIN && errno != EINTR) return true;  // reset
  }
}

// Captures what the process writes to stderr (the log) during its lifetime.
class LogCapture {
 public:
  LogCapture() { ::testing::internal::CaptureStderr(); }
  ~LogCapture() {
    if (!taken_) ::testing::internal::GetCapturedStderr();
  }
  std::string take() {
    taken_ = true;
    return ::testing::internal::GetCapturedStderr();
  }

 private:
  bool taken_ = false;
};

// A normal client still works against the server.
void expect_server_works(uint16_t port) {
  TcpStore s("127.0.0.1", port, tcp_options(10s));
  s.set("health", "ok");
  EXPECT_EQ(s.get("health"), "ok");
  const int64_t n = s.add("health/n", 1);
  EXPECT_EQ(s.add("health/n", 0), n);
}

TEST(TcpStore, ManyConcurrentClients) {
  TcpStoreServer server("127.0.0.1", 0, tcp_options());
  constexpr int kClients = 16;
  std::vector<std::string> keys;
  for (int i = 0; i < kClients; ++i) keys.push_back("rank/" + std::to_string(i));
  testing::run_ranks_ok(kClients, [&](int rank) {
    TcpStore s("127.0.0.1", server.port(), tcp_options());
    s.set(keys[static_cast<size_t>(rank)], std::to_string(rank * 10));
    s.add("arrived", 1);
    s.wait(keys, 20s);
    for (int i = 0; i < kClients; ++i) {
      EXPECT_EQ(s.get(keys[static_cast<size_t>(i)]), std::to_string(i * 10));
    }
    for (int i = 0; i < 50; ++i) s.add("ops", 1);
  });
  TcpStore s("127.0.0.1", server.port(), tcp_options());
  EXPECT_EQ(s.get("arrived"), std::to_string(kClients));
  EXPECT_EQ(s.get("ops"), std::to_string(kClients * 50));
  EXPECT_EQ(server.num_keys(), static_cast<size_t>(kClients + 2));
}

TEST(TcpStore, ClientsInSeparateProcesses) {
  TcpStoreServer server("127.0.0.1", 0, tcp_options());
  const uint16_t port = server.port();
  constexpr int kProcs = 4;
  std::vector<pid_t> pids;
  for (int i = 0; i < kProcs; ++i) {
    pids.push_back(fork_child([port, i] {
      TcpStore s("127.0.0.1", port, tcp_options(20s));
      s.set("proc/" + std::to_string(i), "up");
      for (int k = 0; k < 25; ++k) s.add("proc/count", 1);
      std::vector<std::string> all;
      for (int j = 0; j < kProcs; ++j) all.push_back("proc/" + std::to_string(j));
      s.wait(all);
      return s.get("go") == "now" ? 0 : 2;
    }));
  }
  TcpStore s("127.0.0.1", port, tcp_options());
  s.wait({"proc/0", "proc/1", "proc/2", "proc/3"}, 20s);
  s.set("go", "now");
  for (pid_t pid : pids) EXPECT_EQ(wait_child(pid, 30s), 0);
  EXPECT_EQ(s.get("proc/count"), std::to_string(kProcs * 25));
}

TEST(TcpStore, ParkedWaitDoesNotBlockOtherClients) {
  TcpStoreServer server("127.0.0.1", 0, tcp_options());
  std::atomic<bool> released{false};
  std::vector<std::thread> waiters;
  for (int i = 0; i < 4; ++i) {
    waiters.emplace_back([&] {
      TcpStore w("127.0.0.1", server.port(), tcp_options());
      EXPECT_EQ(w.get("release", 30s), "go");
      released = true;
    });
  }
  ASSERT_TRUE(testing::wait_until([&] { return server.wait_stats().waiting == 4; }))
      << server.wait_stats().waiting << " of 4 gets parked";
  TcpStore s("127.0.0.1", server.port(), tcp_options());
  for (int i = 0; i < 200; ++i) {
    s.set("busy", std::to_string(i));
    EXPECT_EQ(s.get("busy"), std::to_string(i));
  }
  EXPECT_FALSE(released.load());
  s.set("release", "go");
  for (auto& t : waiters) t.join();
  EXPECT_TRUE(released.load());
}

TEST(TcpStore, WaitSeesKeysRemovedWhileParked) {
  TcpStoreServer server("127.0.0.1", 0, tcp_options());
  TcpStore waiter("127.0.0.1", server.port(), tcp_options());
  TcpStore s("127.0.0.1", server.port(), tcp_options());
  std::atomic<bool> done{false};
  std::thread t([&] {
    waiter.wait({"a", "b"}, 30s);
    done = true;
  });
  EXPECT_TRUE(testing::wait_until([&] { return server.wait_stats().waiting == 1; }));
  s.set("a", "1");
  EXPECT_TRUE(s.remove("a"));
  const uint64_t looks = server.wait_stats().looks;
  s.set("b", "1");
  // The server looked at the parked wait before answering the set of "b",
  // and left it parked.
  EXPECT_GT(server.wait_stats().looks, looks);
  EXPECT_EQ(server.wait_stats().waiting, 1u) << "wait returned while 'a' was absent";
  EXPECT_FALSE(done.load()) << "wait returned while 'a' was absent";
  s.set("a", "2");
  t.join();
  EXPECT_TRUE(done.load());
  EXPECT_EQ(server.wait_stats().waiting, 0u);
}

TEST(TcpStore, ServerAnswersParkedRequestsAtTheirDeadline) {
  // A raw client that would wait forever still gets a timeout answer.
  TcpStoreServer server("127.0.0.1", 0, tcp_options());
  net::Fd fd = raw_connect(server.port());
  raw_handshake(fd.get(), tcp_options().job_token);
  store::RequestHeader h;
  h.op = static_cast<uint8_t>(store::Op::Get);
  h.id = 7;
  h.timeout_ms = 200;
  h.key_bytes = 4;
  std::array<uint8_t, store::kRequestHeaderBytes + 4> req{};
  h.encode(req.data());
  std::memcpy(req.data() + store::kRequestHeaderBytes, "nope", 4);
  send_bytes(fd.get(), req.data(), req.size());
  std::array<uint8_t, store::kReplyHeaderBytes> buf{};
  int err = 0;
  auto start = Clock::now();
  ASSERT_EQ(net::read_exact(fd.get(), buf.data(), buf.size(), Deadline::after(10s), &err),
            net::IoStatus::Ok);
  EXPECT_LT(seconds_since(start), 5.0);
  auto reply = store::ReplyHeader::decode(buf.data());
  EXPECT_EQ(reply.magic, store::kReplyMagic);
  EXPECT_EQ(reply.id, 7u);
  EXPECT_EQ(reply.status, store::ReplyStatus::Timeout);
  EXPECT_EQ(reply.value_bytes, 4u);
}

double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

// With a parked request, an idle connection and a silent half-open handshake,
// the server sleeps in epoll_wait instead of spinning.
TEST(TcpStore, IdleServerDoesNotSpin) {
  TcpStoreServer server("127.0.0.1", 0, tcp_options());
  TcpStore waiter("127.0.0.1", server.port(), tcp_options());
  TcpStore idle("127.0.0.1", server.port(), tcp_options());
  idle.set("k", "v");
  std::thread t([&] { EXPECT_EQ(waiter.get("wake", 30s), "up"); });
  net::Fd silent = raw_connect(server.port());
  // The get is parked and the server holds the three connections.
  ASSERT_TRUE(testing::wait_until(
      [&] { return server.wait_stats().waiting == 1 && server.num_connections() == 3; }));
  const double before = cpu_seconds();
  std::this_thread::sleep_for(1s);  // the idle time measured, not an ordering
  const double used = cpu_seconds() - before;
  idle.set("wake", "up");
  t.join();
  EXPECT_LT(used, 0.1) << "the process used " << used << " s of CPU in 1 s of idling";
}

TEST(TcpStore, GarbageBeforeTheHandshakeIsDisconnected) {
  TcpStoreServer server("127.0.0.1", 0, tcp_options());
  LogCapture log;
  net::Fd fd = raw_connect(server.port());
  std::string garbage(200, '\x5a');
  send_bytes(fd.get(), garbage.data(), garbage.size());
  EXPECT_TRUE(closed_by_peer(fd.get(), 10s));
  expect_server_works(server.port());
  std::string out = log.take();
  EXPECT_NE(out.find("refused connection from 127.0.0.1:"), std::string::npos) << out;
  EXPECT_NE(out.find("not a Weft handshake"), std::string::npos) << out;
}

TEST(TcpStore, GarbageAfterTheHandshakeIsDisconnected) {
  TcpStoreServer server("127.0.0.1", 0, tcp_options());
  TcpStore other("127.0.0.1", server.port(), tcp_options());
  other.set("before", "1");
  LogCapture log;
  net::Fd fd = raw_connect(server.port());
  raw_handshake(fd.get(), tcp_options().job_token);
  std::string garbage(64, '\x7f');
  send_bytes(fd.get(), garbage.data(), garbage.size());
  EXPECT_TRUE(closed_by_peer(fd.get(), 10s));
  // The connected client and new ones are unaffected.
  EXPECT_EQ(other.get("before"), "1");
  expect_server_works(server.port());
  std::string out = log.take();
  EXPECT_NE(out.find("bad request magic"), std::string::npos) << out;
}

// A header announcing more than the limits allow closes the connection
// before anything is allocated (2^40 bytes would abort the test if it were).
TEST(TcpStore, AbsurdLengthsAreRejectedBeforeAllocating) {
  TcpStoreServer server("127.0.0.1", 0, tcp_options());
  TcpStore other("127.0.0.1", server.port(), tcp_options());
  other.set("k", "v");
  auto try_header = [&](store::RequestHeader h, const std::string& body, const char* expected_log) {
    SCOPED_TRACE(expected_log);
    LogCapture log;
    net::Fd fd = raw_connect(server.port());
    raw_handshake(fd.get(), tcp_options().job_token);
    std::vector<uint8_t> msg(store::kRequestHeaderBytes);
    h.encode(msg.data());
    msg.insert(msg.end(), body.begin(), body.end());
    send_bytes(fd.get(), msg.data(), msg.size());
    EXPECT_TRUE(closed_by_peer(fd.get(), 10s));
    EXPECT_EQ(other.get("k"), "v");
    std::string out = log.take();
    EXPECT_NE(out.find(expected_log), std::string::npos) << out;
  };
  store::RequestHeader set;
  set.op = static_cast<uint8_t>(store::Op::Set);
  set.key_bytes = 3;
  set.value_bytes = uint64_t{1} << 40;
  try_header(set, "abc", "value length 1099511627776 above the limit");
  store::RequestHeader get;
  get.op = static_cast<uint8_t>(store::Op::Get);
  get.key_bytes = 0xffffffffu;
  try_header(get, "", "key length 4294967295 above the limit of 4096");
  store::RequestHeader wait;
  wait.op = static_cast<uint8_t>(store::Op::Wait);
  wait.key_count = 1u << 30;
  wait.key_bytes = 1u << 31;
  try_header(wait, "", "above the limit");
  // A key inside a wait list longer than the list itself.
  store::RequestHeader inner;
  inner.op = static_cast<uint8_t>(store::Op::Wait);
  inner.key_count = 1;
  inner.key_bytes = 8;
  std::string list(8, 'x');
  bytes::put_u32(reinterpret_cast<uint8_t*>(list.data()), 1000000);
  try_header(inner, list, "wait key 0 has length 1000000");
  store::RequestHeader cas;
  cas.op = static_cast<uint8_t>(store::Op::CompareSet);
  cas.key_bytes = 1;
  cas.value2_bytes = ~uint64_t{0};
  try_header(cas, "k", "second value length 18446744073709551615 above the limit");
  store::RequestHeader version = set;
  version.value_bytes = 1;
  version.version = 99;
  try_header(version, "abcd", "store protocol version 99");
  store::RequestHeader op;
  op.op = 200;
  try_header(op, "", "unknown op 200");
  expect_server_works(server.port());
}

TEST(TcpStore, WrongTokenIsAClearProtocolError) {
  auto options = tcp_options();
  options.job_token = "the-real-token";
  TcpStoreServer server("127.0.0.1", 0, options);
  LogCapture log;
  auto wrong = options;
  wrong.job_token = "another-token";
  TcpStore s("127.0.0.1", server.port(), wrong);
  try {
    s.set("k", "v", 5s);
    FAIL() << "a client with the wrong token was served";
  } catch (const ProtocolError& e) {
    std::string what = e.what();
    EXPECT_NE(what.find("token"), std::string::npos) << what;
    EXPECT_NE(what.find(fmt::format("127.0.0.1:{}", server.port())), std::string::npos) << what;
  }
  // Without a token at all.
  auto none = options;
  none.job_token.clear();
  none.allow_unauthenticated = true;
  TcpStore s2("127.0.0.1", server.port(), none);
  try {
    s2.get("k", 5s);
    FAIL() << "a client without a token was served";
  } catch (const ProtocolError& e) {
    EXPECT_NE(std::string(e.what()).find("token"), std::string::npos) << e.what();
  }
  TcpStore right("127.0.0.1", server.port(), options);
  right.set("k", "v");
  EXPECT_EQ(right.get("k"), "v");
  std::string out = log.take();
  EXPECT_NE(out.find("refused connection from 127.0.0.1:"), std::string::npos) << out;
  EXPECT_NE(out.find("token"), std::string::npos) << out;
}

TEST(TcpStore, UnauthenticatedOnlyWhenBothSidesAllowIt) {
  TcpStoreOptions open;
  open.timeout = 10s;
  open.allow_unauthenticated = true;
  TcpStoreServer server("127.0.0.1", 0, open);
  TcpStore s("127.0.0.1", server.port(), open);
  s.set("k", "v");
  EXPECT_EQ(s.get("k"), "v");
  TcpStoreOptions strict;
  strict.timeout = 10s;
  TcpStore refusing("127.0.0.1", server.port(), strict);
  EXPECT_THROW(refusing.get("k"), ProtocolError);
}

// The server starts only once the client was refused and tried again.
TEST(TcpStore, ClientRetriesUntilTheServerStarts) {
  const auto port = static_cast<uint16_t>(testing::free_port());
  TcpStore s("127.0.0.1", port, tcp_options());
  std::atomic<bool> done{false};
  std::thread client([&] {
    EXPECT_NO_THROW(s.set("k", "v", 20s));
    done = true;
  });
  // A second attempt begins only after the first failed.
  EXPECT_TRUE(testing::wait_until([&] { return s.connect_attempts() >= 2 || done; }));
  EXPECT_FALSE(done.load()) << "set() returned without a server";
  auto server = std::make_unique<TcpStoreServer>("127.0.0.1", port, tcp_options());
  client.join();
  EXPECT_EQ(s.get("k"), "v");
  // connect() retries the same way, here until the server restarts.
  server.reset();
  TcpStore c("127.0.0.1", port, tcp_options());
  std::atomic<bool> connected{false};
  std::thread connecting([&] {
    EXPECT_NO_THROW(c.connect(20s));
    connected = true;
  });
  EXPECT_TRUE(testing::wait_until([&] { return c.connect_attempts() >= 2 || connected; }));
  EXPECT_FALSE(connected.load()) << "connect() returned without a server";
  server = std::make_unique<TcpStoreServer>("127.0.0.1", port, tcp_options());
  connecting.join();
  c.set("k2", "v2");
  EXPECT_EQ(c.get("k2"), "v2");
}

TEST(TcpStore, ServerThatNeverAppearsFailsByTheDeadline) {
  const auto port = static_cast<uint16_t>(testing::free_port());
  TcpStore s("127.0.0.1", port, tcp_options());
  auto start = Clock::now();
  try {
    s.add("k", 1, 500ms);
    FAIL() << "add() succeeded without a server";
  } catch (const StoreError& e) {
    EXPECT_NE(std::string(e.what()).find(fmt::format("127.0.0.1:{}", port)), std::string::npos)
        << e.what();
  } catch (const TimeoutError& e) {
    EXPECT_NE(std::string(e.what()).find(fmt::format("127.0.0.1:{}", port)), std::string::npos)
        << e.what();
  }
  EXPECT_GE(seconds_since(start), 0.4);
  EXPECT_LT(seconds_since(start), 3.0);
  EXPECT_THROW(s.connect(200ms), Error);
}

TEST(TcpStore, ReconnectsAfterTheServerRestarts) {
  const auto port = static_cast<uint16_t>(testing::free_port());
  auto server = std::make_unique<TcpStoreServer>("127.0.0.1", port, tcp_options());
  TcpStore s("127.0.0.1", port, tcp_options());
  s.set("k", "v");
  EXPECT_EQ(server->num_keys(), 1u);
  server.reset();
  server = std::make_unique<TcpStoreServer>("127.0.0.1", port, tcp_options());
  // The dead connection is noticed before sending, so even add() goes through.
  EXPECT_EQ(s.add("n", 3, 10s), 3);
  EXPECT_EQ(s.try_get("k"), std::nullopt);  // a new server starts empty
  s.set("k", "again");
  EXPECT_EQ(s.get("k"), "again");
}

TEST(TcpStore, SilentConnectionIsClosedAfterTheHandshakeTimeout) {
  TcpStoreServer server("127.0.0.1", 0, tcp_options(500ms));
  LogCapture log;
  net::Fd fd = raw_connect(server.port());
  auto start = Clock::now();
  EXPECT_TRUE(closed_by_peer(fd.get(), 10s));
  EXPECT_LT(seconds_since(start), 8.0);
  std::string out = log.take();
  EXPECT_NE(out.find("handshake not completed"), std::string::npos) << out;
  expect_server_works(server.port());
}

TEST(TcpStore, StopWithParkedWaiters) {
  auto server = std::make_unique<TcpStoreServer>("127.0.0.1", 0, tcp_options());
  TcpStore s("127.0.0.1", server->port(), tcp_options());
  std::thread t([&] { EXPECT_THROW(s.get("never", 2s), Error); });
  EXPECT_TRUE(testing::wait_until([&] { return server->wait_stats().waiting == 1; }));
  auto start = Clock::now();
  server->stop();
  EXPECT_LT(seconds_since(start), 2.0);
  server.reset();
  t.join();
}

// A peer that completes the handshake and then answers garbage.
TEST(TcpStore, GarbageAnswerIsAStoreError) {
  auto addr = net::resolve("127.0.0.1", 0, true).front();
  net::Fd listener = net::listen_tcp(addr);
  const uint16_t port = net::local_address(listener.get()).port();
  const std::string token = tcp_options().job_token;
  std::thread fake([&] {
    pollfd p{listener.get(), POLLIN, 0};
    if (::poll(&p, 1, 10000) != 1) return;
    net::Fd c(::accept4(listener.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    auth::ServerHandshake hs({token, false}, auth::Kind::Store);
    Deadline d = Deadline::after(10s);
    int err = 0;
    while (!hs.done()) {
      std::vector<uint8_t> in(hs.want());
      if (net::read_exact(c.get(), in.data(), in.size(), d, &err) != net::IoStatus::Ok) return;
      auto out = hs.feed(in);
      net::write_all(c.get(), out.data(), out.size(), d, &err);
    }
    std::array<uint8_t, store::kRequestHeaderBytes> req{};
    net::read_exact(c.get(), req.data(), req.size(), d, &err);
    std::array<uint8_t, store::kReplyHeaderBytes> junk{};
    junk.fill(0xab);
    net::write_all(c.get(), junk.data(), junk.size(), d, &err);
    closed_by_peer(c.get(), 10s);
  });
  auto s = std::make_unique<TcpStore>("127.0.0.1", port, tcp_options());
  try {
    s->try_get("k", 10s);
    ADD_FAILURE() << "garbage was accepted";
  } catch (const StoreError& e) {
    std::string what = e.what();
    EXPECT_NE(what.find("garbage"), std::string::npos) << what;
    EXPECT_NE(what.find(fmt::format("127.0.0.1:{}", port)), std::string::npos) << what;
  }
  s.reset();  // closes the connection: the fake server ends
  fake.join();
}

TEST(TcpStore, ServerBindErrorsAreStoreErrors) {
  TcpStoreServer first("127.0.0.1", 0, tcp_options());
  EXPECT_THROW(TcpStoreServer("127.0.0.1", first.port(), tcp_options()), StoreError);
}

}  // namespace
}  // namespace weft::store_test
