#include "transport/shm/shm_transport.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <thread>

#include "core/auth.h"
#include "core/log.h"
#include "weft/errors.h"

namespace weft::transport::shm {
namespace {

constexpr int kMaxPassedFds = 4;
// How long a receive whose single-copy read failed waits for the world's
// abort before its sender is failed for it (see stall()).
constexpr auto kStallGrace = std::chrono::seconds(3);
// Bytes of a payload copied out of a ring before the space is given back.
constexpr uint64_t kReleaseStep = 256u << 10;
// Bytes of a single-copy read handed to Request::consume at a time: small
// enough to be used while in cache, large enough that the read's cost per
// system call stays small.
constexpr size_t kConsumeStep = 256u << 10;

std::string text_of(const char* p, size_t cap) { return std::string(p, strnlen(p, cap)); }

void copy_text(char* dst, size_t cap, const std::string& s) {
  std::memset(dst, 0, cap);
  std::memcpy(dst, s.data(), std::min(s.size(), cap - 1));
}

bool same_key(const char* field, const std::string& key) {
  return key.size() == kKeyChars && std::memcmp(field, key.data(), kKeyChars) == 0;
}

std::pair<sockaddr_un, socklen_t> abstract_address(const std::string& name) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  const size_t n = std::min(name.size(), sizeof a.sun_path - 1);
  std::memcpy(a.sun_path + 1, name.data(), n);  // sun_path[0] == 0: abstract namespace
  return {a, static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + n)};
}

void wait_fd(int fd, short events, const Deadline& d, const std::string& what) {
  for (;;) {
    pollfd p{fd, events, 0};
    int ms = d.poll_ms();
    if (ms == 0) throw TimeoutError(fmt::format("timed out {}", what), -1, "shm setup");
    int r = ::poll(&p, 1, ms);
    if (r > 0) return;
    if (r < 0 && errno != EINTR) throw Error(fmt::format("poll: {}", net::errno_string(errno)));
  }
}

void send_packet(int fd, const void* data, size_t n, const int* fds, int nfds, const Deadline& d,
                 const std::string& what) {
  iovec iov{const_cast<void*>(data), n};
  msghdr m{};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int) * kMaxPassedFds)] = {};
  if (nfds > 0) {
    m.msg_control = ctl;
    m.msg_controllen = CMSG_SPACE(sizeof(int) * static_cast<size_t>(nfds));
    cmsghdr* c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * static_cast<size_t>(nfds));
    std::memcpy(CMSG_DATA(c), fds, sizeof(int) * static_cast<size_t>(nfds));
  }
  for (;;) {
    ssize_t r = ::sendmsg(fd, &m, MSG_NOSIGNAL);
    if (r == static_cast<ssize_t>(n)) return;
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      wait_fd(fd, POLLOUT, d, what);
      continue;
    }
    throw ProtocolError(fmt::format("{}: send failed: {}", what,
                                    r < 0 ? net::errno_string(errno) : "short packet"));
  }
}

// Receives one packet (0: the other side closed) and the descriptors passed with it.
size_t recv_packet(int fd, void* buf, size_t cap, std::vector<net::Fd>* fds, const Deadline& d,
                   const std::string& what) {
  for (;;) {
    iovec iov{buf, cap};
    msghdr m{};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int) * kMaxPassedFds)] = {};
    m.msg_control = ctl;
    m.msg_controllen = sizeof ctl;
    ssize_t r = ::recvmsg(fd, &m, MSG_CMSG_CLOEXEC);
    if (r >= 0) {
      for (cmsghdr* c = CMSG_FIRSTHDR(&m); c != nullptr; c = CMSG_NXTHDR(&m, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k; ++i) {
          int f;
          std::memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof f);
          fds->emplace_back(f);  // owned (closed) whatever happens next
        }
      }
      if ((m.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0) {
        throw ProtocolError(fmt::format("{}: oversized set-up packet", what));
      }
      return static_cast<size_t>(r);
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      wait_fd(fd, POLLIN, d, what);
      continue;
    }
    throw ProtocolError(fmt::format("{}: receive failed: {}", what, net::errno_string(errno)));
  }
}

pid_t peer_pid(int fd) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return 0;
  return cred.pid;  // in this process's pid namespace (0 if not visible from it)
}

bool is_eventfd(int fd) {
  char target[64] = {};
  ssize_t n = ::readlink(fmt::format("/proc/self/fd/{}", fd).c_str(), target, sizeof target - 1);
  return n > 0 && std::string(target, static_cast<size_t>(n)) == "anon_inode:[eventfd]";
}

// Copies n bytes at `remote` in process pid to dst; false with *err set on failure.
bool cma_copy(pid_t pid, void* dst, uint64_t remote, size_t n, int* err) {
  size_t done = 0;
  while (done < n) {
    const size_t chunk = std::min<size_t>(n - done, 1u << 30);
    iovec local{static_cast<uint8_t*>(dst) + done, chunk};
    iovec far{reinterpret_cast<void*>(static_cast<uintptr_t>(remote + done)), chunk};
    ssize_t r = ::process_vm_readv(pid, &local, 1, &far, 1, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      *err = r < 0 ? errno : EFAULT;
      return false;
    }
    done += static_cast<size_t>(r);
  }
  return true;
}

// Whether this process may read the peer's memory (and the peer said what is there).
bool probe_read(pid_t pid, uint64_t address, const uint8_t* expect) {
  if (pid <= 0 || address == 0) return false;
  uint8_t got[kProbeBytes] = {};
  int err = 0;
  if (!cma_copy(pid, got, address, sizeof got, &err)) {
    WEFT_DEBUG("single copy from pid {} is not possible ({}): using the ring", pid,
               net::errno_string(err));
    return false;
  }
  return std::memcmp(got, expect, sizeof got) == 0;
}

// Copies n bytes to / from the ring at stream position pos (wrapping).
void ring_put(uint8_t* ring, uint64_t cap, uint64_t pos, const void* src, size_t n) {
  const size_t at = static_cast<size_t>(pos & (cap - 1));
  const size_t first = std::min<size_t>(n, static_cast<size_t>(cap) - at);
  std::memcpy(ring + at, src, first);
  if (n > first) std::memcpy(ring, static_cast<const uint8_t*>(src) + first, n - first);
}

void ring_get(const uint8_t* ring, uint64_t cap, uint64_t pos, void* dst, size_t n) {
  const size_t at = static_cast<size_t>(pos & (cap - 1));
  const size_t first = std::min<size_t>(n, static_cast<size_t>(cap) - at);
  std::memcpy(dst, ring + at, first);
  if (n > first) std::memcpy(static_cast<uint8_t*>(dst) + first, ring, n - first);
}

uint64_t auto_ring_bytes(int local_size) {
  if (local_size <= 8) return 1u << 20;
  uint64_t r = (8u << 20) / static_cast<uint64_t>(local_size - 1);
  uint64_t p = kMinRingBytes;
  while (p * 2 <= r && p * 2 <= (1u << 20)) p *= 2;
  return p;
}

}  // namespace

// ---------------------------------------------------------------------------

struct ShmTransport::Unexpected {
  MessageHeader header;
  HoldBuffers::Block data;  // Data: the payload
  bool complete = false;
  bool cma = false;  // DataCma: read from the sender on delivery
  uint64_t address = 0;
  uint64_t send_id = 0;
  uint64_t cancels = 0;
  size_t held_bytes() const { return cma ? 0 : header.length; }
};

struct ShmTransport::SendOp {
  RequestPtr req;  // null: an acknowledgement
  RecordHeader rec{};
  CmaBody body{};
  const uint8_t* payload = nullptr;  // Data
  uint64_t total = 0;                // bytes of the record
  uint64_t off = 0;                  // bytes of it written
  bool may_cma = false;              // a Data record that may go by single copy instead
  RecordType type() const { return static_cast<RecordType>(rec.type); }
  void to_cma() {
    rec.type = static_cast<uint8_t>(RecordType::DataCma);
    body.address = reinterpret_cast<uintptr_t>(payload);
    body.length = rec.length;
    payload = nullptr;
    total = record_bytes(RecordType::DataCma, rec.length);
  }
};

struct ShmTransport::Peer {
  int rank = -1;
  std::string host;
  pid_t pid = 0;
  Mapping map;
  uint64_t ring_bytes = 0;
  RingControl* in_ctl = nullptr;
  const uint8_t* in_data = nullptr;
  RingControl* out_ctl = nullptr;
  uint8_t* out_data = nullptr;
  net::Fd wake;           // the peer's eventfd
  bool read_cma = false;  // its large messages come as DataCma (we can read its memory)
  bool send_cma = false;  // it can read ours: our large messages go as DataCma

  std::mutex mu;
  MatchQueues<Unexpected> q;  // GUARDED_BY(mu)
  bool failed = false;        // GUARDED_BY(mu)
  bool departed = false;      // GUARDED_BY(mu)
  std::string failure;        // GUARDED_BY(mu)
  // Receives whose single-copy read failed or may have read a reused
  // buffer: they wait for the world's abort (see stall()).
  std::vector<RequestPtr> stalled;  // GUARDED_BY(mu)
  // Receives matched in irecv() with a single-copy message that arrived
  // first: the progress thread reads them (irecv() returns at once).
  struct Read {
    RequestPtr req;
    uint64_t address, send_id, cancels;
  };
  std::deque<Read> reads;  // GUARDED_BY(mu)
  std::atomic<bool> have_reads{false};

  // Inbound ring: the progress owner only.
  enum class In { Header, Paused, Payload, Dead };
  In in_state = In::Header;
  uint64_t in_tail = 0;      // consumed
  uint64_t in_released = 0;  // published as tail
  RecordHeader cur{};
  uint64_t cur_got = 0;   // payload bytes consumed (padding included)
  uint64_t cur_need = 0;  // payload bytes padded to a line
  uint8_t* target = nullptr;
  RequestPtr cur_req;
  Unexpected* cur_unexp = nullptr;
  bool discard = false;
  std::atomic<bool> in_paused{false};  // waiting for a receive to be posted

  // Outbound ring.
  std::mutex out_mu;
  std::deque<SendOp> sendq;                           // GUARDED_BY(out_mu)
  std::unordered_map<uint64_t, RequestPtr> awaiting;  // GUARDED_BY(out_mu): DataCma sends
  uint64_t next_send_id = 1;                          // GUARDED_BY(out_mu)
  uint64_t out_head = 0;                              // GUARDED_BY(out_mu)
  uint64_t out_tail_seen = 0;                         // GUARDED_BY(out_mu)
  bool out_dead = false;                              // GUARDED_BY(out_mu)
  std::atomic<bool> queued{false};                    // sendq is not empty
};

class ShmTransport::Poll : public Poller {
 public:
  explicit Poll(ShmTransport& t) : t_(t) {}
  int poll() override { return t_.poll_all(); }
  bool prepare_block() override { return t_.prepare_block(); }
  void after_block() override { t_.after_block(); }

 private:
  ShmTransport& t_;
};

// This rank's eventfd in the epoll set: peers signal it when it sleeps.
// Draining it is all the handler does; the engine polls the rings next.
class ShmTransport::Wake : public Handler {
 public:
  Wake() : fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
    if (!fd_.valid()) throw Error(fmt::format("eventfd: {}", net::errno_string(errno)));
  }
  int fd() const { return fd_.get(); }
  void on_event(uint32_t) override {
    uint64_t v;
    while (::read(fd_.get(), &v, sizeof v) > 0) {
    }
  }

 private:
  net::Fd fd_;
};

// ---------------------------------------------------------------------------
// Set-up.

ShmTransport::ShmTransport(Engine& engine, ShmOptions options, ShmEvents events)
    : engine_(engine), options_(std::move(options)), events_(std::move(events)) {
  peers_.resize(static_cast<size_t>(std::max(options_.size, 1)));
  key_ = auth::generate_token();
  auto nonce = auth::random_nonce();
  std::memcpy(probe_, nonce.data(), sizeof probe_);
  wake_ = std::make_shared<Wake>();
  listen_fd_.reset(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!listen_fd_.valid())
    throw Error(fmt::format("socket(AF_UNIX): {}", net::errno_string(errno)));
  for (int attempt = 0;; ++attempt) {
    address_ = fmt::format("weft-shm.{:016x}.{}.{}.{}", options_.world_id, options_.generation,
                           options_.rank, auth::generate_token().substr(0, 16));
    auto [addr, len] = abstract_address(address_);
    if (::bind(listen_fd_.get(), reinterpret_cast<const sockaddr*>(&addr), len) == 0) break;
    if (errno != EADDRINUSE || attempt >= 8) {
      throw Error(fmt::format("binding the shared-memory socket: {}", net::errno_string(errno)));
    }
  }
  if (::listen(listen_fd_.get(), SOMAXCONN) != 0) {
    throw Error(fmt::format("listen(AF_UNIX): {}", net::errno_string(errno)));
  }
}

ShmTransport::~ShmTransport() {
  alive_->store(false);  // timers that run later do nothing
  if (registered_) {
    engine_.remove_poller(poller_.get());
    engine_.remove(wake_->fd());
  }
  // The mappings go with the peers.
}

ShmTransport::Peer* ShmTransport::peer_for(int rank) const {
  if (rank < 0 || rank >= static_cast<int>(peers_.size())) return nullptr;
  return peers_[static_cast<size_t>(rank)].get();
}

bool ShmTransport::single_copy_to(int peer) const {
  Peer* p = peer_for(peer);
  return p != nullptr && p->send_cma;
}

void ShmTransport::connect_all(const std::vector<ShmPeer>& peers, const Deadline& deadline) {
  auto ready = [this] {
    std::vector<int> early;
    {
      std::lock_guard<std::mutex> lk(setup_mu_);
      ready_ = true;
      early.swap(early_departures_);
    }
    for (int r : early) peer_departed(r);
  };
  if (peers.empty()) {
    listen_fd_.reset();
    ready();
    return;
  }
  if (options_.ring_bytes == 0)
    options_.ring_bytes = auto_ring_bytes(static_cast<int>(peers.size()) + 1);
  std::vector<ShmPeer> lower;
  int higher = 0;
  for (const auto& p : peers) {
    if (p.rank < 0 || p.rank >= options_.size || p.rank == options_.rank) {
      throw InternalError(fmt::format("shm: invalid peer rank {}", p.rank));
    }
    if (p.rank < options_.rank)
      lower.push_back(p);
    else
      ++higher;
  }
  std::sort(lower.begin(), lower.end(),
            [](const auto& a, const auto& b) { return a.rank < b.rank; });
  // Lower ranks first: each rank connects downwards and then accepts, so
  // the set-up of the pairs cannot wait in a cycle.
  for (const auto& p : lower) connect_to(p, deadline);
  int accepted = 0;
  while (accepted < higher) {
    if (accept_one(peers, deadline)) ++accepted;
  }
  listen_fd_.reset();
  for (auto& p : peers_) {
    if (p) local_.push_back(p.get());
  }
  poller_ = std::make_shared<Poll>(*this);
  engine_.add(wake_->fd(), EPOLLIN, wake_);
  engine_.add_poller(poller_);
  registered_ = true;
  ready();
  std::string how;
  for (Peer* p : local_) {
    how += fmt::format(" {}{}", p->rank, p->send_cma ? "" : "(ring)");
  }
  WEFT_DEBUG("rank {}: shared memory with ranks{} ({}-byte rings)", options_.rank, how,
             options_.ring_bytes);
}

void ShmTransport::connect_to(const ShmPeer& peer, const Deadline& deadline) {
  const std::string who = fmt::format("rank {} (host {})", peer.rank, peer.host);
  const std::string what =
      fmt::format("rank {}: setting up shared memory with {}", options_.rank, who);
  net::Fd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) throw Error(fmt::format("socket(AF_UNIX): {}", net::errno_string(errno)));
  auto [addr, len] = abstract_address(peer.address);
  for (auto backoff = std::chrono::milliseconds(1);;
       backoff = std::min(backoff * 2, std::chrono::milliseconds(50))) {
    if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), len) == 0) break;
    if (errno == EINTR) continue;
    if (errno == EAGAIN && !deadline.expired()) {  // its backlog is full: it is busy accepting
      std::this_thread::sleep_for(backoff);
      continue;
    }
    throw PeerError(
        fmt::format("{}: cannot reach its socket: {} (the two ranks have the same host id; if "
                    "they do not share a network namespace, give them different WEFT_HOST_ID "
                    "values, or set WEFT_SHM=0)",
                    what, net::errno_string(errno)),
        peer.rank, peer.host, "shm setup");
  }
  Hello h{};
  h.magic = kHelloMagic;
  h.version = kSetupVersion;
  h.world_id = options_.world_id;
  h.generation = options_.generation;
  h.size = static_cast<uint32_t>(options_.size);
  h.src = static_cast<uint32_t>(options_.rank);
  h.dst = static_cast<uint32_t>(peer.rank);
  std::memcpy(h.key, peer.key.data(), std::min(peer.key.size(), kKeyChars));
  h.probe_address = reinterpret_cast<uintptr_t>(probe_);
  std::memcpy(h.probe, probe_, sizeof h.probe);
  int mine[1] = {wake_->fd()};
  send_packet(fd.get(), &h, sizeof h, mine, 1, deadline, what);

  Reply r{};
  std::vector<net::Fd> got;
  size_t n = recv_packet(fd.get(), &r, sizeof r, &got, deadline, what);
  if (n == 0)
    throw PeerError(fmt::format("{}: it closed the connection", what), peer.rank, peer.host,
                    "shm setup");
  if (n != sizeof r || r.magic != kReplyMagic) {
    throw ProtocolError(fmt::format("{}: invalid reply ({} bytes)", what, n));
  }
  if (r.status != 0) {
    throw ProtocolError(fmt::format("{}: refused: {}", what, text_of(r.error, sizeof r.error)));
  }
  if (!same_key(r.key, key_))
    throw ProtocolError(fmt::format("{}: it does not know this rank's key", what));
  if (got.size() != 2 || !is_eventfd(got[1].get())) {
    throw ProtocolError(
        fmt::format("{}: expected a segment and an eventfd, got {} descriptors", what, got.size()));
  }
  auto p = std::make_unique<Peer>();
  p->rank = peer.rank;
  p->host = peer.host;
  p->pid = peer_pid(fd.get());
  SegmentSpec spec;
  spec.world_id = options_.world_id;
  spec.generation = options_.generation;
  spec.world_size = static_cast<uint32_t>(options_.size);
  spec.lo_rank = static_cast<uint32_t>(peer.rank);
  spec.hi_rank = static_cast<uint32_t>(options_.rank);
  p->map = open_segment(got[0].get(), spec, who);
  p->wake = std::move(got[1]);
  p->read_cma = options_.cma && probe_read(p->pid, r.probe_address, r.probe);
  p->send_cma = r.reads_you != 0;
  // This rank is the higher one: it receives on ring 0 and sends on ring 1.
  p->ring_bytes = p->map.ring_bytes();
  p->in_ctl = p->map.control(0);
  p->in_data = p->map.data(0);
  p->out_ctl = p->map.control(1);
  p->out_data = p->map.data(1);
  Final f{kFinalMagic, p->read_cma ? 1u : 0u};
  send_packet(fd.get(), &f, sizeof f, nullptr, 0, deadline, what);
  attach(std::move(p));
}

bool ShmTransport::accept_one(const std::vector<ShmPeer>& peers, const Deadline& deadline) {
  auto missing = [&] {
    std::string m;
    for (const auto& p : peers) {
      if (p.rank > options_.rank && !peer_for(p.rank))
        m += (m.empty() ? "" : ", ") + std::to_string(p.rank);
    }
    return m;
  };
  wait_fd(listen_fd_.get(), POLLIN, deadline,
          fmt::format("rank {}: waiting for ranks {} to set up shared memory", options_.rank,
                      missing()));
  net::Fd fd(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
  if (!fd.valid()) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED)
      return false;
    throw Error(fmt::format("accept(AF_UNIX): {}", net::errno_string(errno)));
  }
  const Deadline d = deadline.min(Deadline::after(options_.handshake_timeout));
  const std::string stranger = fmt::format(
      "rank {}: refused a shared-memory connection from pid {}", options_.rank, peer_pid(fd.get()));
  Hello h{};
  std::vector<net::Fd> got;
  size_t n = 0;
  try {
    n = recv_packet(fd.get(), &h, sizeof h, &got, d, stranger);
  } catch (const Error& e) {
    WEFT_ERROR("{}", e.what());
    return false;
  }
  const ShmPeer* peer = nullptr;
  std::string why;
  if (n != sizeof h || h.magic != kHelloMagic) {
    why = fmt::format("not a Weft shared-memory hello ({} bytes)", n);
  } else if (h.version != kSetupVersion) {
    why = fmt::format("set-up version {}, this is version {}", h.version, kSetupVersion);
  } else if (h.world_id != options_.world_id || h.generation != options_.generation) {
    why = fmt::format("world {:016x} generation {} is not this world ({:016x} generation {})",
                      h.world_id, h.generation, options_.world_id, options_.generation);
  } else if (h.size != static_cast<uint32_t>(options_.size) ||
             h.dst != static_cast<uint32_t>(options_.rank)) {
    why = fmt::format("inconsistent ranks (to {} of {})", h.dst, h.size);
  } else {
    for (const auto& p : peers) {
      if (static_cast<uint32_t>(p.rank) == h.src && p.rank > options_.rank) peer = &p;
    }
    if (peer == nullptr)
      why = fmt::format("rank {} is not a higher rank of this host", h.src);
    else if (peer_for(peer->rank))
      why = fmt::format("duplicate set-up from rank {}", h.src);
    else if (!same_key(h.key, key_))
      why = fmt::format("rank {} does not present this rank's key", h.src);
    else if (got.size() != 1 || !is_eventfd(got[0].get()))
      why = "no eventfd passed";
  }
  if (!why.empty()) {
    WEFT_ERROR("{}: {}", stranger, why);
    Reply no{};
    no.magic = kReplyMagic;
    no.status = 1;
    copy_text(no.error, sizeof no.error, why);
    try {
      send_packet(fd.get(), &no, sizeof no, nullptr, 0,
                  Deadline::after(std::chrono::milliseconds(100)), stranger);
    } catch (const Error&) {
    }
    return false;
  }
  const std::string who = fmt::format("rank {} (host {})", peer->rank, peer->host);
  const std::string what =
      fmt::format("rank {}: setting up shared memory with {}", options_.rank, who);
  auto p = std::make_unique<Peer>();
  p->rank = peer->rank;
  p->host = peer->host;
  p->pid = peer_pid(fd.get());
  p->wake = std::move(got[0]);
  SegmentSpec spec;
  spec.world_id = options_.world_id;
  spec.generation = options_.generation;
  spec.world_size = static_cast<uint32_t>(options_.size);
  spec.lo_rank = static_cast<uint32_t>(options_.rank);
  spec.hi_rank = static_cast<uint32_t>(peer->rank);
  spec.ring_bytes = options_.ring_bytes;
  auto [memfd, map] = create_segment(spec);
  p->map = std::move(map);
  p->read_cma = options_.cma && probe_read(p->pid, h.probe_address, h.probe);
  Reply r{};
  r.magic = kReplyMagic;
  r.status = 0;
  std::memcpy(r.key, peer->key.data(), std::min(peer->key.size(), kKeyChars));
  r.probe_address = reinterpret_cast<uintptr_t>(probe_);
  std::memcpy(r.probe, probe_, sizeof r.probe);
  r.reads_you = p->read_cma ? 1 : 0;
  int fds[2] = {memfd.get(), wake_->fd()};
  send_packet(fd.get(), &r, sizeof r, fds, 2, d, what);
  memfd.reset();  // the mapping keeps the memory; nothing else refers to it
  Final f{};
  std::vector<net::Fd> none;
  n = recv_packet(fd.get(), &f, sizeof f, &none, d, what);
  if (n != sizeof f || f.magic != kFinalMagic) {
    throw PeerError(fmt::format("{}: it did not complete the set-up ({})", what,
                                n == 0 ? "closed the connection" : "invalid packet"),
                    peer->rank, peer->host, "shm setup");
  }
  p->send_cma = f.reads_you != 0;
  // This rank is the lower one: it sends on ring 0 and receives on ring 1.
  p->ring_bytes = p->map.ring_bytes();
  p->out_ctl = p->map.control(0);
  p->out_data = p->map.data(0);
  p->in_ctl = p->map.control(1);
  p->in_data = p->map.data(1);
  attach(std::move(p));
  return true;
}

void ShmTransport::attach(std::unique_ptr<Peer> peer) {
  // The outgoing ring is written once now, before any record: its lines
  // are then in this rank's cache, and the first pass of messages through
  // the ring does not fetch each line from memory (the zero-filled pages
  // the kernel gave it are not in any cache). Nobody reads it yet: the
  // peer reads only what the head position announces.
  std::memset(peer->out_data, 0, peer->ring_bytes);
  const int r = peer->rank;
  peers_[static_cast<size_t>(r)] = std::move(peer);
}

// ---------------------------------------------------------------------------
// Sending.

void ShmTransport::signal(Peer& p, std::atomic<uint32_t>& sleeping) {
  // Called right after a sequentially consistent store of head or tail.
  // With prepare_block()'s sequentially consistent store of the flag and
  // load of the positions (a Dekker handshake), either the sleeper sees
  // what was just published, or this sees its flag.
  if (sleeping.load(std::memory_order_seq_cst) != 0 && sleeping.exchange(0) != 0) {
    uint64_t one = 1;
    ssize_t n = ::write(p.wake.get(), &one, sizeof one);
    (void)n;  // EAGAIN: the counter is saturated, the peer wakes anyway
  }
}

bool ShmTransport::fits_now(Peer& p, const SendOp& op) {
  // Through the ring, a message costs two copies but no system call and no
  // page pinning, and both copies stay in cache (a receiver with a consumer
  // even uses the payload in the ring, without copying it out): better for
  // a message that fits at once into the ring's free space. Single copy
  // for the rest (large messages, or a ring that is busy), which would
  // otherwise wait for ring space.
  if (!p.sendq.empty() || op.rec.length > p.ring_bytes / 2) return false;
  const uint64_t t = p.out_ctl->tail.load(std::memory_order_acquire);
  if (t < p.out_tail_seen || t > p.out_head) return false;  // write_some() reports it
  p.out_tail_seen = t;
  return (p.out_head - t) + op.total <= p.ring_bytes;
}

ShmTransport::WriteResult ShmTransport::write_some(Peer& p, SendOp& op) {
  const uint64_t cap = p.ring_bytes;
  uint64_t free = cap - (p.out_head - p.out_tail_seen);
  const uint64_t left = op.total - op.off;
  // Records without payload are written whole; payloads may go in pieces.
  const uint64_t want = op.type() == RecordType::Data ? std::min<uint64_t>(left, kLine) : left;
  if (free < want || free < left) {
    uint64_t t = p.out_ctl->tail.load(std::memory_order_acquire);
    if (t < p.out_tail_seen || t > p.out_head) return WriteResult::Corrupt;
    p.out_tail_seen = t;
    free = cap - (p.out_head - t);
    if (free < want) return WriteResult::Partial;
  }
  uint64_t n = std::min(free, left);
  if (n < left) n &= ~static_cast<uint64_t>(kLine - 1);  // pieces end on a line
  if (n == 0) return WriteResult::Partial;
  // The record is: header line, body line (DataCma) or payload, padding.
  uint64_t pos = p.out_head, from = op.off;
  const uint64_t end = op.off + n;
  if (from < kLine) {
    const uint64_t k = std::min(end, static_cast<uint64_t>(kLine)) - from;
    ring_put(p.out_data, cap, pos, reinterpret_cast<const uint8_t*>(&op.rec) + from, k);
    pos += k;
    from += k;
  }
  if (from < end) {
    if (op.type() == RecordType::DataCma) {
      ring_put(p.out_data, cap, pos, reinterpret_cast<const uint8_t*>(&op.body) + (from - kLine),
               end - from);
    } else {
      const uint64_t len = op.rec.length;
      const uint64_t a = from - kLine, b = std::min(end - kLine, len);
      if (b > a) ring_put(p.out_data, cap, pos, op.payload + a, b - a);  // padding is not written
    }
  }
  p.out_head += n;
  op.off = end;
  p.out_ctl->head.store(p.out_head, std::memory_order_seq_cst);  // see signal()
  signal(p, p.out_ctl->consumer_sleeping);
  return op.off == op.total ? WriteResult::Done : WriteResult::Partial;
}

bool ShmTransport::submit(Peer& p, SendOp op) {
  RequestPtr done;
  bool queued = false, corrupt = false;
  {
    std::lock_guard<std::mutex> lk(p.out_mu);
    if (p.out_dead) return false;
    // A data record queued after fail_all() cleared the queues would never
    // fail: fail_all() sets the flag before it takes this lock.
    if (op.req && first_error_.failed()) {
      op.req->fail(first_error_.get());
      return true;
    }
    if (op.may_cma && !fits_now(p, op)) op.to_cma();
    if (op.type() == RecordType::DataCma) {
      op.rec.aux = p.next_send_id++;
      p.awaiting[op.rec.aux] = op.req;
      op.body.cancels =
          p.out_ctl->cancels.load(std::memory_order_relaxed);  // only this side writes it
    }
    WriteResult r = p.sendq.empty() ? write_some(p, op) : WriteResult::Partial;
    if (r == WriteResult::Corrupt) {
      p.out_dead = true;
      corrupt = true;
      if (op.type() == RecordType::DataCma) p.awaiting.erase(op.rec.aux);
    } else if (r == WriteResult::Done) {
      if (op.type() == RecordType::Data) done = std::move(op.req);
    } else {
      p.sendq.push_back(std::move(op));
      p.queued.store(true, std::memory_order_seq_cst);
      queued = true;
    }
  }
  if (corrupt) {
    report([this, &p] { violation(p, "the consumer position of the outgoing ring is invalid"); });
    return false;
  }
  if (done) done->complete();
  if (queued) {
    engine_.kick();  // someone must go on writing when space frees
    engine_.wake();
  }
  return true;
}

ShmTransport::Peer* ShmTransport::admit(const RequestPtr& req) {
  if (first_error_.failed()) {
    req->fail(first_error_.get());
    return nullptr;
  }
  Peer* p = peer_for(req->peer());
  if (p == nullptr) {
    req->fail(std::make_exception_ptr(InternalError(
        fmt::format("{}: no shared memory with rank {}", req->describe(), req->peer()))));
  }
  return p;
}

void ShmTransport::isend(const RequestPtr& req) {
  Peer* p = admit(req);
  if (p == nullptr) return;
  {
    std::lock_guard<std::mutex> lk(p->mu);
    if (p->failed || p->departed) {
      req->fail(request_peer_error(*req, p->host,
                                   p->failed ? p->failure : "has closed its communicator"));
      return;
    }
  }
  SendOp op;
  op.req = req;
  op.rec.magic = kRecordMagic;
  op.rec.comm_id = req->comm_id();
  op.rec.tag = req->tag();
  op.rec.length = req->bytes();
  op.rec.desc = req->desc;
  op.rec.type = static_cast<uint8_t>(RecordType::Data);
  op.payload = static_cast<const uint8_t*>(req->send_data);
  op.total = record_bytes(RecordType::Data, req->bytes());
  op.may_cma = req->bytes() >= options_.cma_min_bytes && p->send_cma;
  if (!submit(*p, std::move(op))) {
    req->fail(
        request_peer_error(*req, p->host, "cannot be reached: its shared-memory ring is broken"));
  }
  engine_.wake();
}

int ShmTransport::flush(Peer& p) {
  if (!p.queued.load(std::memory_order_acquire)) return 0;
  std::vector<RequestPtr> done;
  int n = 0;
  bool corrupt = false;
  {
    std::lock_guard<std::mutex> lk(p.out_mu);
    while (!p.sendq.empty() && !p.out_dead) {
      SendOp& op = p.sendq.front();
      const uint64_t before = op.off;
      WriteResult r = write_some(p, op);
      if (op.off != before) ++n;
      if (r == WriteResult::Corrupt) {
        corrupt = true;
        p.out_dead = true;
        break;
      }
      if (r == WriteResult::Partial) break;
      if (op.req && op.type() == RecordType::Data) done.push_back(std::move(op.req));
      p.sendq.pop_front();
    }
    if (p.sendq.empty() || p.out_dead) p.queued.store(false, std::memory_order_release);
  }
  for (auto& r : done) r->complete();
  if (!done.empty()) engine_.notify_completion();
  if (corrupt) violation(p, "the consumer position of the outgoing ring is invalid");
  return n;
}

// ---------------------------------------------------------------------------
// Receiving.

void ShmTransport::irecv(const RequestPtr& req) {
  Peer* p = admit(req);
  if (p == nullptr) return;
  std::unique_ptr<Unexpected> matched;
  {
    std::lock_guard<std::mutex> lk(p->mu);
    // A message that arrived before the receive was posted (possibly before the peer left).
    matched = p->q.take_unexpected(*req);
    if (!matched && (p->failed || p->departed)) {
      req->fail(request_peer_error(*req, p->host,
                                   p->failed ? p->failure : "has closed its communicator"));
      return;
    }
    if (!matched && first_error_.failed()) {  // fail_all() ran since the check above
      req->fail(first_error_.get());
      return;
    }
    if (!matched) p->q.posted.push_back(req);
  }
  if (matched) deliver(*p, req, *matched, false);
  if (p->in_paused.load(std::memory_order_acquire)) engine_.kick();  // the ring may go on now
  engine_.wake();
}

void ShmTransport::read_remote(Peer& p, const RequestPtr& req, uint64_t address, uint64_t send_id,
                               uint64_t cancels) {
  int err = 0;
  bool ok = true;
  if (!req->consume) {
    ok = req->bytes() == 0 || cma_copy(p.pid, req->recv_data, address, req->bytes(), &err);
  } else {
    // In pieces, each read into the staging buffer (which stays in cache)
    // and used there.
    if (!stage_) stage_.reset(new uint8_t[kConsumeStep]);
    for (size_t off = 0; ok && off < req->bytes();) {
      const size_t k = std::min<size_t>(req->bytes() - off, kConsumeStep);
      ok = cma_copy(p.pid, stage_.get(), address + off, k, &err);
      if (ok) {
        req->consume(off, off + k, stage_.get());
        off += k;
        req->consumed = off;
      }
    }
  }
  if (!ok) {
    return stall(p, req,
                 fmt::format("its message for {} cannot be read with process_vm_readv: {}{}",
                             req->describe(), net::errno_string(err),
                             err == ESRCH ? " (the process is gone)" : ""));
  }
  // Read after the copy: if the sender gave up its sends meanwhile (or
  // before), its buffer may have been reused under the copy.
  if (p.in_ctl->cancels.load(std::memory_order_seq_cst) != cancels) {
    return stall(
        p, req,
        fmt::format("it gave up its message for {} while it was being read", req->describe()));
  }
  req->complete();
  SendOp ack;
  ack.rec.magic = kRecordMagic;
  ack.rec.type = static_cast<uint8_t>(RecordType::Ack);
  ack.rec.aux = send_id;
  ack.total = kLine;
  submit(p, std::move(ack));  // false: the ring is broken, and the peer fails anyway
}

void ShmTransport::stall(Peer& p, const RequestPtr& req, const std::string& why) {
  // The sender is most likely failing: it is gone (its TCP connection
  // closes) or it aborted (its abort frame, which names the cause, went out
  // before it gave up its sends). Either way fail_all() fails this receive
  // with the right error soon; only if nothing comes does the peer fail.
  bool held = false;
  {
    std::lock_guard<std::mutex> lk(p.mu);
    if (!p.failed && !first_error_.failed()) {
      p.stalled.push_back(req);
      held = true;
    }
  }
  if (!held) {  // already failed: fail it like the others
    auto first = first_error_.get();
    req->fail(first ? first : request_peer_error(*req, p.host, "failed: " + why));
    return;
  }
  engine_.add_timer(Deadline::after(kStallGrace), [this, &p, r = req, why, alive = alive_] {
    if (!alive->load()) return;
    {
      std::lock_guard<std::mutex> lk(p.mu);
      auto it = std::find(p.stalled.begin(), p.stalled.end(), r);
      if (it == p.stalled.end()) return;  // failed meanwhile
      p.stalled.erase(it);
    }
    r->fail(request_peer_error(*r, p.host, "failed: " + why));
    peer_failed(p, why, true);
  });
}

bool ShmTransport::begin_data(Peer& p) {
  const RecordHeader& h = p.cur;
  p.discard = false;
  p.cur_req.reset();
  p.cur_unexp = nullptr;
  std::exception_ptr mismatch;
  RequestPtr mismatched;
  {
    std::lock_guard<std::mutex> lk(p.mu);
    if (p.failed || first_error_.failed()) {
      p.discard = true;
    } else if ((p.cur_req = p.q.take_posted(h.comm_id, h.tag))) {
      mismatch = check_match(options_.rank, p.rank, p.host, *p.cur_req, h, events_.describe_op);
      if (mismatch) {
        mismatched = std::move(p.cur_req);
        p.discard = true;
      } else {
        p.target = static_cast<uint8_t*>(p.cur_req->recv_data);
      }
    } else {
      if (h.length > 0 && p.q.unexpected_bytes + h.length > options_.max_unexpected_bytes) {
        // No room: the ring is not read until a receive is posted.
        p.in_state = Peer::In::Paused;
        p.in_paused.store(true, std::memory_order_release);
        return false;
      }
      auto u = std::make_unique<Unexpected>();
      u->header = MessageHeader{h.comm_id, h.tag, h.length, h.desc};
      u->data = holds_.get(h.length);
      p.target = u->data.get();
      p.cur_unexp = u.get();
      p.q.unexpected_bytes += h.length;
      p.q.unexpected.push_back(std::move(u));
    }
  }
  p.in_paused.store(false, std::memory_order_relaxed);
  if (p.cur_unexp && h.desc.kind != 0 && events_.check_unexpected) {
    // A collective's message that no receive waits for yet: it must agree
    // with the collective of that number if this rank is running it.
    mismatch = events_.check_unexpected(p.rank, h.comm_id, h.desc);
    if (mismatch) {
      p.cur_unexp = nullptr;
      p.discard = true;
    }
  }
  p.in_state = Peer::In::Payload;
  if (mismatched) {
    mismatched->fail(mismatch);
    engine_.notify_completion();
  }
  if (mismatch) {
    report([this, mismatch] {
      if (events_.on_mismatch) events_.on_mismatch(mismatch);
    });
  }
  return true;
}

void ShmTransport::deliver(Peer& p, const RequestPtr& req, Unexpected& u, bool now) {
  if (auto err = check_match(options_.rank, p.rank, p.host, *req, u.header, events_.describe_op)) {
    req->fail(err);
    report([this, err] {
      if (events_.on_mismatch) events_.on_mismatch(err);
    });
  } else if (u.cma && now) {
    read_remote(p, req, u.address, u.send_id, u.cancels);
  } else if (u.cma) {
    // Not on the caller's thread: a collective posts its receives before
    // its sends, and the peer is waiting for those.
    std::lock_guard<std::mutex> lk(p.mu);
    if (p.failed || first_error_.failed()) {
      auto first = first_error_.get();
      req->fail(first ? first : request_peer_error(*req, p.host, "failed: " + p.failure));
      return;
    }
    p.reads.push_back({req, u.address, u.send_id, u.cancels});
    p.have_reads.store(true, std::memory_order_seq_cst);
  } else {
    if (req->bytes() > 0) std::memcpy(req->recv_data, u.data.get(), req->bytes());
    holds_.put(std::move(u.data));
    req->complete();
  }
}

void ShmTransport::finish_data(Peer& p) {
  p.in_state = Peer::In::Header;
  p.discard = false;
  if (p.cur_req) {
    RequestPtr r = std::move(p.cur_req);
    r->complete();
    engine_.notify_completion();
    return;
  }
  if (!p.cur_unexp) return;
  std::vector<std::pair<RequestPtr, std::unique_ptr<Unexpected>>> ready;
  {
    std::lock_guard<std::mutex> lk(p.mu);
    p.cur_unexp->complete = true;
    p.cur_unexp = nullptr;
    ready = p.q.take_deliverable();
  }
  for (auto& [req, u] : ready) deliver(p, req, *u, true);
  engine_.notify_completion();
}

void ShmTransport::on_cma(Peer& p, const RecordHeader& h, const CmaBody& body) {
  if (body.length != h.length) {
    return violation(
        p, fmt::format("single-copy record of {} bytes describes {} bytes", h.length, body.length));
  }
  if (!p.read_cma) return violation(p, "single-copy record, but single copy was not agreed");
  RequestPtr req;
  std::exception_ptr mismatch;
  bool held = false;
  {
    std::lock_guard<std::mutex> lk(p.mu);
    if (p.failed || first_error_.failed()) return;  // dropped: nobody waits for it any more
    req = p.q.take_posted(h.comm_id, h.tag);
    if (req) {
      mismatch = check_match(options_.rank, p.rank, p.host, *req, h, events_.describe_op);
    } else {
      auto u = std::make_unique<Unexpected>();
      u->header = MessageHeader{h.comm_id, h.tag, h.length, h.desc};
      u->complete = true;
      u->cma = true;
      u->address = body.address;
      u->send_id = h.aux;
      u->cancels = body.cancels;
      p.q.unexpected.push_back(std::move(u));
      held = true;
    }
  }
  if (held) {
    if (h.desc.kind != 0 && events_.check_unexpected) {
      mismatch = events_.check_unexpected(p.rank, h.comm_id, h.desc);
    }
  } else if (mismatch) {
    req->fail(mismatch);
  } else {
    read_remote(p, req, body.address, h.aux, body.cancels);
  }
  if (mismatch) {
    report([this, mismatch] {
      if (events_.on_mismatch) events_.on_mismatch(mismatch);
    });
  }
  engine_.notify_completion();
}

void ShmTransport::on_ack(Peer& p, uint64_t send_id) {
  RequestPtr r;
  {
    std::lock_guard<std::mutex> lk(p.out_mu);
    auto it = p.awaiting.find(send_id);
    if (it != p.awaiting.end()) {
      r = std::move(it->second);
      p.awaiting.erase(it);
    }
  }
  if (r) {
    r->complete();
    engine_.notify_completion();
    return;
  }
  bool failed;
  {
    std::lock_guard<std::mutex> lk(p.mu);
    failed = p.failed;
  }
  // After a failure the sends were failed and forgotten: a late ack is fine.
  if (!failed && !first_error_.failed())
    violation(p, fmt::format("acknowledgement of unknown send {}", send_id));
}

void ShmTransport::release_tail(Peer& p) {
  if (p.in_tail == p.in_released) return;
  p.in_ctl->tail.store(p.in_tail, std::memory_order_seq_cst);  // see signal()
  p.in_released = p.in_tail;
  signal(p, p.in_ctl->producer_sleeping);
}

int ShmTransport::poll_in(Peer& p) {
  using In = Peer::In;
  if (p.in_state == In::Dead) return 0;
  const uint64_t head = p.in_ctl->head.load(std::memory_order_acquire);
  if (head == p.in_tail && p.in_state != In::Paused) return 0;
  if (head < p.in_tail || head - p.in_tail > p.ring_bytes || head % kLine != 0) {
    violation(p, fmt::format("producer position {} is invalid (consumed {}, ring of {} bytes)",
                             head, p.in_tail, p.ring_bytes));
    return 1;
  }
  const uint64_t cap = p.ring_bytes;
  int progressed = 0;
  while (p.in_state != In::Dead) {
    if (p.in_state == In::Header) {
      if (head == p.in_tail) break;
      RecordHeader h;
      ring_get(p.in_data, cap, p.in_tail, &h, sizeof h);
      std::string why = validate_record(h);
      if (!why.empty()) {
        violation(p, why);
        break;
      }
      ++progressed;
      const auto type = static_cast<RecordType>(h.type);
      if (type == RecordType::Ack) {
        p.in_tail += kLine;
        on_ack(p, h.aux);
        continue;
      }
      if (type == RecordType::DataCma) {
        if (head - p.in_tail < 2 * kLine) {
          violation(p, "incomplete single-copy record");
          break;
        }
        CmaBody body;
        ring_get(p.in_data, cap, p.in_tail + kLine, &body, sizeof body);
        p.in_tail += 2 * kLine;
        on_cma(p, h, body);
        continue;
      }
      p.cur = h;
      p.in_tail += kLine;
      p.cur_got = 0;
      p.cur_need = round_up_line(h.length);
      p.in_state = In::Paused;  // until begin_data() finds it a place
    }
    if (p.in_state == In::Paused) {
      if (!begin_data(p)) break;
      ++progressed;
    }
    if (p.in_state == In::Payload) {
      const uint64_t n = std::min({head - p.in_tail, p.cur_need - p.cur_got, kReleaseStep});
      if (n > 0) {
        const uint64_t len = p.cur.length;
        const uint64_t useful = p.cur_got < len ? std::min(n, len - p.cur_got) : 0;
        if (!p.discard && useful > 0) {
          if (p.cur_req && p.cur_req->consume) {
            // Straight from the ring, in at most two pieces (it wraps on a line).
            const size_t at = static_cast<size_t>(p.in_tail & (cap - 1));
            const size_t first = std::min<size_t>(useful, static_cast<size_t>(cap) - at);
            p.cur_req->consume(p.cur_got, p.cur_got + first, p.in_data + at);
            if (useful > first)
              p.cur_req->consume(p.cur_got + first, p.cur_got + useful, p.in_data);
            p.cur_req->consumed = p.cur_got + useful;
          } else {
            ring_get(p.in_data, cap, p.in_tail, p.target + p.cur_got, useful);
          }
        }
        p.cur_got += n;
        p.in_tail += n;
        ++progressed;
        if (n == kReleaseStep) release_tail(p);
      }
      if (p.cur_got < p.cur_need) {
        if (head == p.in_tail) break;
        continue;
      }
      finish_data(p);
    }
  }
  release_tail(p);
  return progressed;
}

int ShmTransport::poll_all() {
  int n = 0;
  for (Peer* p : local_) {
    if (p->have_reads.load(std::memory_order_acquire)) n += run_reads(*p);
    n += poll_in(*p);
    n += flush(*p);
  }
  if (!deferred_.empty()) run_deferred();
  return n;
}

void ShmTransport::run_deferred() {
  std::vector<std::function<void()>> fns;
  fns.swap(deferred_);
  for (auto& f : fns) f();
}

void ShmTransport::report(std::function<void()> fn) {
  if (engine_.in_progress_thread()) {
    deferred_.push_back(std::move(fn));  // after the current poll round
  } else {
    engine_.run_in_progress(std::move(fn), Deadline::after(std::chrono::seconds(5)));
  }
}

int ShmTransport::run_reads(Peer& p) {
  std::deque<Peer::Read> reads;
  {
    std::lock_guard<std::mutex> lk(p.mu);
    reads.swap(p.reads);
    p.have_reads.store(false, std::memory_order_relaxed);
  }
  for (auto& r : reads) read_remote(p, r.req, r.address, r.send_id, r.cancels);
  if (!reads.empty()) engine_.notify_completion();
  return static_cast<int>(reads.size());
}

bool ShmTransport::prepare_block() {
  for (Peer* p : local_) {
    if (p->in_state != Peer::In::Dead)
      p->in_ctl->consumer_sleeping.store(1, std::memory_order_seq_cst);
    if (p->queued.load(std::memory_order_seq_cst))
      p->out_ctl->producer_sleeping.store(1, std::memory_order_seq_cst);
  }
  // The flags are stored before the positions are loaded again, all
  // sequentially consistent: with signal(), either the peer sees the flag,
  // or this sees what the peer published before it looked.
  bool work = !deferred_.empty();
  for (Peer* p : local_) {
    if (p->have_reads.load(std::memory_order_seq_cst)) work = true;
    if (p->in_state != Peer::In::Dead && p->in_state != Peer::In::Paused &&
        p->in_ctl->head.load(std::memory_order_seq_cst) != p->in_tail) {
      work = true;
    }
    if (p->queued.load(std::memory_order_seq_cst)) {
      std::lock_guard<std::mutex> lk(p->out_mu);
      if (!p->out_dead && p->out_ctl->tail.load(std::memory_order_seq_cst) != p->out_tail_seen)
        work = true;
    }
  }
  if (work) after_block();
  return !work;
}

void ShmTransport::after_block() {
  for (Peer* p : local_) {
    p->in_ctl->consumer_sleeping.store(0, std::memory_order_relaxed);
    p->out_ctl->producer_sleeping.store(0, std::memory_order_relaxed);
  }
}

// ---------------------------------------------------------------------------
// Failures.

std::exception_ptr ShmTransport::peer_error(const Peer& p, const std::string& reason) const {
  return std::make_exception_ptr(
      PeerError(fmt::format("rank {} (host {}) {}", p.rank, p.host, reason), p.rank, p.host, ""));
}

void ShmTransport::violation(Peer& p, const std::string& why) {
  if (p.in_state == Peer::In::Dead) return;
  WEFT_ERROR("protocol violation by rank {} ({}) in shared memory: {}", p.rank, p.host, why);
  p.in_state = Peer::In::Dead;  // nothing more is read from its ring
  report([this, &p, why] { peer_failed(p, "protocol violation in shared memory: " + why, true); });
}

void ShmTransport::peer_failed(Peer& p, const std::string& reason, bool report_it) {
  std::vector<RequestPtr> failed;
  {
    std::lock_guard<std::mutex> lk(p.mu);
    if (p.failed) return;
    p.failed = true;
    p.failure = reason;
    failed = p.q.clear();
    failed.insert(failed.end(), p.stalled.begin(), p.stalled.end());
    p.stalled.clear();
    for (auto& r : p.reads) failed.push_back(r.req);
    p.reads.clear();
  }
  if (p.cur_req) failed.push_back(std::move(p.cur_req));
  p.cur_unexp = nullptr;
  p.discard = true;
  p.in_state = Peer::In::Dead;
  {
    std::lock_guard<std::mutex> lk(p.out_mu);
    for (auto& op : p.sendq) {
      if (op.req && op.type() == RecordType::Data) failed.push_back(op.req);
    }
    p.sendq.clear();
    p.queued.store(false);
    p.out_dead = true;
    // Before the sends fail (and their buffers may be reused): see RingControl::cancels.
    if (!p.awaiting.empty()) p.out_ctl->cancels.fetch_add(1, std::memory_order_seq_cst);
    for (auto& [id, r] : p.awaiting) failed.push_back(r);
    p.awaiting.clear();
  }
  for (auto& r : failed) r->fail(request_peer_error(*r, p.host, "failed: " + reason));
  engine_.wake();
  if (report_it && !first_error_.failed() && events_.on_peer_failure) {
    events_.on_peer_failure(p.rank, peer_error(p, "failed: " + reason));
  }
}

void ShmTransport::peer_departed(int rank) {
  {
    std::lock_guard<std::mutex> lk(setup_mu_);
    if (!ready_) {
      early_departures_.push_back(rank);
      return;
    }
  }
  Peer* p = peer_for(rank);
  if (p == nullptr) return;
  auto leave = [this, p] {
    // What it sent before its goodbye is in the ring: take it first.
    poll_in(*p);
    bool pending = p->cur_req != nullptr;
    {
      std::lock_guard<std::mutex> lk(p->mu);
      p->departed = true;
      pending = pending || !p->q.posted.empty() || !p->stalled.empty() || !p->reads.empty();
    }
    {
      std::lock_guard<std::mutex> lk(p->out_mu);
      for (auto& op : p->sendq) pending = pending || op.req != nullptr;
      pending = pending || !p->awaiting.empty();
    }
    run_deferred();
    if (pending)
      peer_failed(*p, "closed its communicator while operations with it were pending", true);
  };
  engine_.run_in_progress(leave, Deadline::after(std::chrono::seconds(30)));
}

void ShmTransport::fail_all(std::exception_ptr error) {
  first_error_.set(error);
  // On the progress thread, so that no poll is filling a buffer of a request
  // while it fails; returns once done (by this call or an earlier one).
  engine_.run_in_progress([this] { fail_all_in_progress(); },
                          Deadline::after(std::chrono::seconds(30)));
}

void ShmTransport::fail_all_in_progress() {
  if (fail_done_) return;
  const std::exception_ptr error = first_error_.get();
  for (Peer* p : local_) {
    std::vector<RequestPtr> failed;
    {
      std::lock_guard<std::mutex> lk(p->mu);
      failed = p->q.clear();
      failed.insert(failed.end(), p->stalled.begin(), p->stalled.end());
      p->stalled.clear();
      for (auto& r : p->reads) failed.push_back(r.req);
      p->reads.clear();
    }
    if (p->in_state == Peer::In::Payload || p->in_state == Peer::In::Paused) {
      // The rest of the message being received is dropped.
      if (p->cur_req) failed.push_back(std::move(p->cur_req));
      p->cur_unexp = nullptr;
      p->discard = true;
      if (p->in_state == Peer::In::Paused) p->in_state = Peer::In::Payload;
      p->in_paused.store(false);
    }
    {
      std::lock_guard<std::mutex> lk(p->out_mu);
      std::deque<SendOp> keep;  // acknowledgements still go out (close() flushes them)
      for (auto& op : p->sendq) {
        if (!op.req) {
          keep.push_back(std::move(op));
          continue;
        }
        // A record partly in the ring cannot be taken back, and the rest
        // must not be read from the caller's buffer any more.
        if (op.off > 0) p->out_dead = true;
        if (op.type() == RecordType::Data) failed.push_back(op.req);
      }
      p->sendq = p->out_dead ? std::deque<SendOp>() : std::move(keep);
      p->queued.store(!p->sendq.empty());
      // Before the sends fail (and their buffers may be reused): see RingControl::cancels.
      if (!p->awaiting.empty()) p->out_ctl->cancels.fetch_add(1, std::memory_order_seq_cst);
      for (auto& [id, r] : p->awaiting) failed.push_back(r);
      p->awaiting.clear();
    }
    for (auto& r : failed) r->fail(error);
  }
  fail_done_ = true;
  engine_.wake();
}

std::exception_ptr ShmTransport::find_conflict(uint64_t comm_id, const OpDesc& desc) {
  for (Peer* p : local_) {
    std::lock_guard<std::mutex> lk(p->mu);
    if (const Unexpected* u = p->q.find_conflict(comm_id, desc)) {
      return mismatch_error(options_.rank, desc, 0, p->rank, p->host, u->header.desc,
                            u->header.length, events_.describe_op);
    }
  }
  return nullptr;
}

void ShmTransport::close(const Deadline& deadline) {
  engine_.wait(
      [&] {
        for (Peer* p : local_) {
          std::lock_guard<std::mutex> lk(p->out_mu);
          if (!p->sendq.empty() && !p->out_dead) return false;
        }
        return true;
      },
      deadline);
}

}  // namespace weft::transport::shm
