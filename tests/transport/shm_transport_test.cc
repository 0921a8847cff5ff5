// The shared-memory transport on its own: segment validation (truncated,
// wrong magic, wrong version, another world, unsealed), the set-up refusing
// strangers, a corrupt ring failing the peer with a clear error, and the
// single-copy probe.
#include "transport/shm/shm_transport.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstddef>
#include <cstring>
#include <fstream>
#include <mutex>
#include <thread>

#include "weft/errors.h"

namespace weft::transport::shm {
namespace {

using namespace std::chrono_literals;

SegmentSpec spec_for(uint64_t ring = kMinRingBytes) {
  SegmentSpec s;
  s.world_id = 0x1234;
  s.generation = 3;
  s.world_size = 4;
  s.lo_rank = 1;
  s.hi_rank = 2;
  s.ring_bytes = ring;
  return s;
}

SegmentHeader good_header(uint64_t ring = kMinRingBytes) {
  SegmentSpec s = spec_for(ring);
  SegmentHeader h{};
  h.magic = kSegmentMagic;
  h.version = kSegmentVersion;
  h.header_bytes = kSegmentHeaderBytes;
  h.world_id = s.world_id;
  h.generation = s.generation;
  h.world_size = s.world_size;
  h.lo_rank = s.lo_rank;
  h.hi_rank = s.hi_rank;
  h.ring_bytes = ring;
  h.total_bytes = segment_bytes(ring);
  return h;
}

// A memfd holding `h`, `bytes` long, sealed (or not).
net::Fd make_segment_file(const SegmentHeader& h, uint64_t bytes, bool seal = true) {
  net::Fd fd(::memfd_create("weft-test", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  EXPECT_TRUE(fd.valid());
  EXPECT_EQ(::ftruncate(fd.get(), static_cast<off_t>(bytes)), 0);
  if (bytes >= sizeof h) {
    EXPECT_EQ(::pwrite(fd.get(), &h, sizeof h, 0), ssize_t(sizeof h));
  }
  if (seal) {
    EXPECT_EQ(::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW), 0);
  }
  return fd;
}

std::string open_error(const net::Fd& fd, const SegmentSpec& spec) {
  try {
    open_segment(fd.get(), spec, "rank 1");
  } catch (const ProtocolError& e) {
    return e.what();
  }
  return "";
}

TEST(ShmSegment, CreatedSegmentOpensAndIsSealed) {
  auto [fd, map] = create_segment(spec_for(1u << 20));
  EXPECT_EQ(map.ring_bytes(), 1u << 20);
  Mapping other = open_segment(fd.get(), spec_for(), "rank 1");
  EXPECT_EQ(other.ring_bytes(), 1u << 20);
  // Both mappings see the same memory.
  map.control(0)->head.store(64);
  EXPECT_EQ(other.control(0)->head.load(), 64u);
  // Nobody can shrink or grow it any more.
  EXPECT_NE(::ftruncate(fd.get(), 4096), 0);
  EXPECT_NE(::ftruncate(fd.get(), static_cast<off_t>(segment_bytes(2u << 20))), 0);
}

TEST(ShmSegment, WrongMagicIsRejected) {
  auto h = good_header();
  h.magic = 0x1122334455667788ull;
  auto fd = make_segment_file(h, segment_bytes(kMinRingBytes));
  EXPECT_NE(open_error(fd, spec_for()).find("not a Weft shared-memory segment"), std::string::npos);
}

TEST(ShmSegment, WrongVersionIsRejected) {
  auto h = good_header();
  h.version = kSegmentVersion + 1;
  auto fd = make_segment_file(h, segment_bytes(kMinRingBytes));
  std::string e = open_error(fd, spec_for());
  EXPECT_NE(e.find("protocol version 2"), std::string::npos) << e;
  EXPECT_NE(e.find("from rank 1"), std::string::npos) << e;
}

TEST(ShmSegment, TruncatedSegmentIsRejected) {
  auto h = good_header(1u << 20);
  // Its header announces 1 MiB rings, but the file is shorter.
  auto fd = make_segment_file(h, segment_bytes(kMinRingBytes));
  std::string e = open_error(fd, spec_for());
  EXPECT_NE(e.find("truncated"), std::string::npos) << e;
  // Shorter than the header itself.
  auto tiny = make_segment_file(h, 100);
  e = open_error(tiny, spec_for());
  EXPECT_NE(e.find("shorter than its 4096-byte header"), std::string::npos) << e;
}

TEST(ShmSegment, AnotherWorldGenerationOrPairIsRejected) {
  auto fd = make_segment_file(good_header(), segment_bytes(kMinRingBytes));
  auto s = spec_for();
  s.world_id = 99;
  EXPECT_NE(open_error(fd, s).find("another job"), std::string::npos);
  s = spec_for();
  s.generation = 4;
  EXPECT_NE(open_error(fd, s).find("stale generation"), std::string::npos);
  s = spec_for();
  s.hi_rank = 3;
  EXPECT_NE(open_error(fd, s).find("expected ranks 1 and 3"), std::string::npos);
  EXPECT_EQ(open_error(fd, spec_for()), "");
}

TEST(ShmSegment, BadRingSizeAndUnsealedFilesAreRejected) {
  auto h = good_header();
  h.ring_bytes = 100000;  // not a power of two
  auto fd = make_segment_file(h, segment_bytes(kMinRingBytes));
  EXPECT_NE(open_error(fd, spec_for()).find("power of two"), std::string::npos);
  auto unsealed = make_segment_file(good_header(), segment_bytes(kMinRingBytes), false);
  EXPECT_NE(open_error(unsealed, spec_for()).find("not sealed"), std::string::npos);
}

TEST(ShmSegment, RecordValidation) {
  RecordHeader r{};
  r.magic = kRecordMagic;
  r.type = static_cast<uint8_t>(RecordType::Data);
  r.length = 100;
  EXPECT_EQ(validate_record(r), "");
  r.length = kMaxMessageBytes + 1;
  EXPECT_NE(validate_record(r).find("announcing"), std::string::npos);
  r.length = 0;
  r.type = 9;
  EXPECT_NE(validate_record(r).find("unknown type 9"), std::string::npos);
  r.type = static_cast<uint8_t>(RecordType::Ack);
  r.magic = 0;
  EXPECT_NE(validate_record(r).find("magic"), std::string::npos);
  EXPECT_EQ(record_bytes(RecordType::Data, 1), 128u);
  EXPECT_EQ(record_bytes(RecordType::Data, 64), 128u);
  EXPECT_EQ(record_bytes(RecordType::Data, 0), 64u);
  EXPECT_EQ(record_bytes(RecordType::DataCma, 1u << 30), 128u);
}

// ---------------------------------------------------------------------------
// Two transports in this process (ranks 0 and 1 of a world of 2).

struct Side {
  std::unique_ptr<Engine> engine = std::make_unique<Engine>();
  std::unique_ptr<ShmTransport> t;
  std::mutex mu;
  std::vector<std::string> failures;  // on_peer_failure messages

  Side(int rank, bool cma) {
    ShmOptions o;
    o.rank = rank;
    o.size = 2;
    o.world_id = 77;
    o.generation = 1;
    o.cma = cma;
    o.ring_bytes = kMinRingBytes;
    o.handshake_timeout = 5s;
    ShmEvents ev;
    ev.on_peer_failure = [this](int, std::exception_ptr e) {
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& x) {
        std::lock_guard<std::mutex> lk(mu);
        failures.push_back(x.what());
      }
    };
    t = std::make_unique<ShmTransport>(*engine, o, ev);
  }
  ~Side() {
    t.reset();
    engine->stop();
  }
  ShmPeer as_peer(int rank) const {
    return {rank, t->address(), t->key(), "host" + std::to_string(rank)};
  }
  bool wait(const RequestPtr& r, Timeout limit = 10s) {
    return engine->wait([&] { return r->done(); }, Deadline::after(limit));
  }
  size_t failure_count() {
    std::lock_guard<std::mutex> lk(mu);
    return failures.size();
  }
};

void connect(Side& a, Side& b) {
  std::exception_ptr err;
  std::thread th([&] {
    try {
      a.t->connect_all({b.as_peer(1)}, Deadline::after(20s));
    } catch (...) {
      err = std::current_exception();
    }
  });
  b.t->connect_all({a.as_peer(0)}, Deadline::after(20s));
  th.join();
  if (err) std::rethrow_exception(err);
}

RequestPtr send_req(int peer, uint64_t tag, const std::vector<uint8_t>& v) {
  auto r = std::make_shared<Request>(true, peer, 5, tag, v.size());
  r->send_data = v.data();
  return r;
}

RequestPtr recv_req(int peer, uint64_t tag, std::vector<uint8_t>& v) {
  auto r = std::make_shared<Request>(false, peer, 5, tag, v.size());
  r->recv_data = v.data();
  return r;
}

// Where the (one) live segment of this process is mapped.
uint8_t* find_segment() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    if (line.find("memfd:weft-shm") == std::string::npos) continue;
    return reinterpret_cast<uint8_t*>(std::stoull(line.substr(0, line.find('-')), nullptr, 16));
  }
  return nullptr;
}

TEST(ShmTransport, SingleCopyIsProbedAndCanBeDisabled) {
  // Each direction: single copy only if its receiver allows it.
  for (auto [cma_a, cma_b] : {std::pair{true, true}, {false, false}, {true, false}}) {
    Side a(0, cma_a), b(1, cma_b);
    connect(a, b);
    EXPECT_EQ(a.t->single_copy_to(1), cma_b);
    EXPECT_EQ(b.t->single_copy_to(0), cma_a);
    // Large and small messages both ways.
    for (size_t n : {size_t(10), size_t(200000)}) {
      std::vector<uint8_t> x(n, 7), y(n, 0), z(n, 9), w(n, 0);
      auto r1 = recv_req(0, 1, y), r2 = recv_req(1, 1, w);
      b.t->irecv(r1);
      a.t->irecv(r2);
      auto s1 = send_req(1, 1, x), s2 = send_req(0, 1, z);
      a.t->isend(s1);
      b.t->isend(s2);
      ASSERT_TRUE(b.wait(r1));
      ASSERT_TRUE(a.wait(r2));
      ASSERT_TRUE(a.wait(s1));
      ASSERT_TRUE(b.wait(s2));
      EXPECT_TRUE(r1->ok() && r2->ok() && s1->ok() && s2->ok());
      EXPECT_EQ(x, y);
      EXPECT_EQ(z, w);
    }
  }
}

TEST(ShmTransport, CorruptRingFailsThePeerWithAClearError) {
  Side a(0, true), b(1, true);
  connect(a, b);
  std::vector<uint8_t> buf(100);
  auto r = recv_req(0, 3, buf);
  b.t->irecv(r);
  uint8_t* seg = find_segment();
  ASSERT_NE(seg, nullptr);
  // Ring 0 carries rank 0 -> rank 1: a record with a wrong magic appears.
  auto* ctl = reinterpret_cast<RingControl*>(seg + kSegmentHeaderBytes);
  std::memset(seg + kRingDataOffset, 0xab, kLine);
  ctl->head.store(kLine, std::memory_order_release);
  ASSERT_TRUE(b.wait(r));
  ASSERT_FALSE(r->ok());
  try {
    std::rethrow_exception(r->error());
  } catch (const PeerError& e) {
    EXPECT_NE(std::string(e.what()).find("protocol violation in shared memory"), std::string::npos)
        << e.what();
    EXPECT_EQ(e.rank(), 0);
  }
  ASSERT_TRUE(b.engine->wait([&] { return b.failure_count() > 0; }, Deadline::after(5s)));
  EXPECT_NE(b.failures[0].find("record with magic 0xabababab"), std::string::npos) << b.failures[0];
  // Later requests with that peer fail at once.
  auto r2 = recv_req(0, 4, buf);
  b.t->irecv(r2);
  EXPECT_TRUE(r2->done() && !r2->ok());
}

TEST(ShmTransport, InvalidRingPositionFailsThePeer) {
  Side a(0, false), b(1, false);
  connect(a, b);
  uint8_t* seg = find_segment();
  ASSERT_NE(seg, nullptr);
  // Ring 1 carries rank 1 -> rank 0: a producer position beyond the ring.
  auto* ctl = reinterpret_cast<RingControl*>(seg + kSegmentHeaderBytes + kRingControlBytes);
  ctl->head.store(10 * kMinRingBytes, std::memory_order_release);
  ASSERT_TRUE(a.engine->wait([&] { return a.failure_count() > 0; }, Deadline::after(5s)));
  EXPECT_NE(a.failures[0].find("producer position"), std::string::npos) << a.failures[0];
}

// A sender whose communicator fails gives up its single-copy sends before
// their buffers can be reused: a receiver that reads one anyway must not
// complete with what it read; it waits for its own world's abort (which
// names the real cause) or, if none comes, fails the sender.
TEST(ShmTransport, ASingleCopySendGivenUpByItsSenderIsNotDelivered) {
  for (bool abort_comes : {true, false}) {
    Side a(0, true), b(1, true);
    connect(a, b);
    std::vector<uint8_t> x(200000, 1), y(200000, 0);
    auto s = send_req(1, 5, x);
    a.t->isend(s);
    a.t->fail_all(std::make_exception_ptr(AbortedError("rank 0 gives up")));
    ASSERT_TRUE(s->done() && !s->ok());
    auto r = recv_req(0, 5, y);
    b.t->irecv(r);
    EXPECT_FALSE(b.wait(r, 500ms)) << "completed with a buffer its sender gave up";
    if (abort_comes) {
      b.t->fail_all(std::make_exception_ptr(PeerError("the world aborted", 2, "h", "")));
      ASSERT_TRUE(r->done());
      try {
        std::rethrow_exception(r->error());
      } catch (const PeerError& e) {
        EXPECT_EQ(e.rank(), 2);  // the cause, not the sender that gave up
      }
      EXPECT_EQ(b.failure_count(), 0u);
    } else {
      ASSERT_TRUE(b.wait(r, 10s));
      ASSERT_FALSE(r->ok());
      ASSERT_TRUE(b.engine->wait([&] { return b.failure_count() > 0; }, Deadline::after(5s)));
      EXPECT_NE(b.failures[0].find("gave up its message"), std::string::npos) << b.failures[0];
    }
  }
}

// A receive with a consumer is handed its payload in order, in pieces on
// 64-byte boundaries, from the ring or from a staging buffer of a
// single-copy read; the receive buffer then holds only what was not
// consumed. A payload held before the receive was posted is copied into
// the buffer as usual (consumed stays 0).
TEST(ShmTransport, ConsumerGetsThePayloadInOrderedPieces) {
  for (bool cma : {true, false}) {
    Side a(0, cma), b(1, cma);
    connect(a, b);
    for (size_t n : {size_t(1000), size_t(30000), size_t(200000), size_t((1u << 20) + 13)}) {
      std::vector<uint8_t> x(n), y(n, 0);
      for (size_t i = 0; i < n; ++i) x[i] = static_cast<uint8_t>(i * 7 + 3);
      std::vector<std::pair<size_t, size_t>> pieces;
      bool same = true;
      auto r = recv_req(0, 9, y);
      r->consume = [&](size_t from, size_t to, const void* data) {
        pieces.emplace_back(from, to);
        same = same && std::memcmp(data, x.data() + from, to - from) == 0;
      };
      b.t->irecv(r);
      auto s = send_req(1, 9, x);
      a.t->isend(s);
      ASSERT_TRUE(b.wait(r));
      ASSERT_TRUE(a.wait(s));
      ASSERT_TRUE(r->ok() && s->ok());
      EXPECT_TRUE(same) << "a piece differs from what was sent";
      ASSERT_FALSE(pieces.empty()) << "cma " << cma << " size " << n;
      size_t at = 0;
      for (auto [from, to] : pieces) {
        EXPECT_EQ(from, at);
        EXPECT_GT(to, from);
        if (to != n) {
          EXPECT_EQ(to % kLine, 0u) << to;
        }
        at = to;
      }
      EXPECT_EQ(at, r->consumed);
      EXPECT_EQ(r->consumed, n);  // the receive was posted first: all of it
      if (cma && n > 200000) {
        EXPECT_GT(pieces.size(), 1u);  // a single-copy read, in pieces
      }
    }
    // Early: held (or described) before the receive exists.
    std::vector<uint8_t> x(300000, 5), y(300000, 0);
    auto s = send_req(1, 10, x);
    const uint64_t held = b.t->inbound_stats().held;
    a.t->isend(s);
    // b makes progress until it has held the message (or its description).
    ASSERT_TRUE(b.engine->wait([&] { return b.t->inbound_stats().held == held + 1; },
                               Deadline::after(10s)));
    auto r = recv_req(0, 10, y);
    size_t got = 0;
    r->consume = [&](size_t from, size_t to, const void* data) {
      if (std::memcmp(data, x.data() + from, to - from) == 0) got += to - from;
    };
    b.t->irecv(r);
    ASSERT_TRUE(b.wait(r));
    ASSERT_TRUE(a.wait(s));
    ASSERT_TRUE(r->ok());
    EXPECT_GE(b.t->inbound_stats().from_held, 1u);  // taken from the held message
    if (cma) {  // only its description came early: it is read, and consumed, now
      EXPECT_EQ(r->consumed, x.size());
      EXPECT_EQ(got, x.size());
    } else {  // held by the transport: copied into the buffer
      EXPECT_EQ(got, 0u);
      EXPECT_EQ(r->consumed, 0u);
      EXPECT_EQ(x, y);
    }
  }
}

// Connects to a transport's socket as a stranger would.
net::Fd connect_raw(const std::string& name) {
  net::Fd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path + 1, name.data(), name.size());
  socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  EXPECT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), len), 0);
  return fd;
}

std::string refusal(int fd) {
  Reply r{};
  ssize_t n = ::recv(fd, &r, sizeof r, 0);
  if (n != ssize_t(sizeof r) || r.magic != kReplyMagic || r.status == 0) return "";
  return std::string(r.error);
}

TEST(ShmTransport, StrangersAreRefusedAndTheSetUpCompletes) {
  Side a(0, true);
  std::exception_ptr err;
  std::thread th;
  auto start_accepting = [&](const ShmPeer& peer) {
    th = std::thread([&a, &err, peer] {
      try {
        a.t->connect_all({peer}, Deadline::after(20s));
      } catch (...) {
        err = std::current_exception();
      }
    });
  };
  Side b(1, true);
  start_accepting(b.as_peer(1));
  {  // Garbage.
    net::Fd fd = connect_raw(a.t->address());
    ASSERT_EQ(::send(fd.get(), "hello?", 6, 0), 6);
    EXPECT_NE(refusal(fd.get()).find("not a Weft shared-memory hello"), std::string::npos);
  }
  {  // Another version of the set-up.
    net::Fd fd = connect_raw(a.t->address());
    Hello h{};
    h.magic = kHelloMagic;
    h.version = kSetupVersion + 7;
    ASSERT_EQ(::send(fd.get(), &h, sizeof h, 0), ssize_t(sizeof h));
    EXPECT_NE(refusal(fd.get()).find("set-up version 8"), std::string::npos);
  }
  {  // The right world, but not the right key.
    ShmPeer wrong = {0, a.t->address(), std::string(64, 'f'), "host0"};
    try {
      b.t->connect_all({wrong}, Deadline::after(10s));
      ADD_FAILURE() << "a wrong key was accepted";
    } catch (const ProtocolError& e) {
      EXPECT_NE(std::string(e.what()).find("does not present this rank's key"), std::string::npos)
          << e.what();
    }
  }
  // Rank 1 with the right key: the set-up completes, and it works.
  b.t->connect_all({a.as_peer(0)}, Deadline::after(10s));
  th.join();
  ASSERT_EQ(err, nullptr);
  std::vector<uint8_t> x(5000, 3), y(5000, 0);
  auto r = recv_req(1, 9, y);
  a.t->irecv(r);
  auto s = send_req(0, 9, x);
  b.t->isend(s);
  ASSERT_TRUE(a.wait(r));
  EXPECT_TRUE(r->ok());
  EXPECT_EQ(x, y);
}

}  // namespace
}  // namespace weft::transport::shm

namespace weft::transport {
namespace {

using namespace std::chrono_literals;

TEST(EngineDeathTest, AStuckProgressThreadEndsTheProcessInsteadOfReturning) {
  // fail_all() promises that no buffer of a failed request is touched once
  // it returns; when the progress thread cannot be reached to make it so,
  // the process ends with a message naming what could not be done.
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        Engine e;
        std::atomic<bool> stuck{false};
        e.post([&] {  // the background thread runs it, and is stuck in it
          stuck = true;
          std::this_thread::sleep_for(30s);
        });
        while (!stuck) std::this_thread::yield();
        e.run_in_progress_or_die([] {}, "a test task", 200ms);
      },
      "FATAL: the progress thread did not run 'a test task' within");
}

}  // namespace
}  // namespace weft::transport
