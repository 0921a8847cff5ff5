// The shared-memory transport, set-up: the listening socket, the
// exchange that creates and maps each pair's segment, probing single copy.
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cstddef>
#include <thread>

#include "core/auth.h"
#include "core/enforce.h"
#include "transport/shm/peer.h"

namespace weft::transport::shm {
namespace {

constexpr int kMaxPassedFds = 4;
// How long the refusal sent to a stranger may block (a small packet on a
// local socket: it never waits unless the stranger stopped reading).
constexpr auto kRefusalLimit = std::chrono::milliseconds(100);
// Retrying a connect to a peer whose listen backlog is full (it is busy
// accepting other ranks): from 1 ms, doubling up to 50 ms (local sockets
// accept within microseconds; this only spreads out a crowd).
constexpr auto kConnectBackoffMin = std::chrono::milliseconds(1);
constexpr auto kConnectBackoffMax = std::chrono::milliseconds(50);

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

uint64_t auto_ring_bytes(int local_size) {
  if (local_size <= 8) return 1u << 20;
  uint64_t r = (8u << 20) / static_cast<uint64_t>(local_size - 1);
  uint64_t p = kMinRingBytes;
  while (p * 2 <= r && p * 2 <= (1u << 20)) p *= 2;
  return p;
}

}  // namespace

// ---------------------------------------------------------------------------
// Set-up.

ShmTransport::ShmTransport(Engine& engine, ShmOptions options, ShmEvents events)
    : engine_(engine),
      options_(std::move(options)),
      events_(std::move(events)),
      inbound_(engine_, options_.rank, options_.max_unexpected_bytes, events_, first_error_) {
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
      MutexLock lk(&setup_mu_);
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
    WEFT_ENFORCE(p.rank >= 0 && p.rank < options_.size && p.rank != options_.rank,
                 "shm: invalid peer rank {}", p.rank);
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
  for (std::chrono::milliseconds backoff = kConnectBackoffMin;;
       backoff = std::min(backoff * 2, kConnectBackoffMax)) {
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
      send_packet(fd.get(), &no, sizeof no, nullptr, 0, Deadline::after(kRefusalLimit), stranger);
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

}  // namespace weft::transport::shm

namespace weft::transport {

std::unique_ptr<LocalTransport> make_shm_transport(Engine& engine, ShmOptions options,
                                                   TransportEvents events) {
  return std::make_unique<shm::ShmTransport>(engine, std::move(options), std::move(events));
}

bool valid_shm_ring_bytes(uint64_t bytes) {
  return bytes == 0 ||
         (bytes >= shm::kMinRingBytes && bytes <= shm::kMaxRingBytes && (bytes & (bytes - 1)) == 0);
}

}  // namespace weft::transport
