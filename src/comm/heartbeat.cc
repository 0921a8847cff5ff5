#include "comm/heartbeat.h"

#include <fmt/format.h>
#include <netinet/ip.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <span>

#include "core/auth.h"
#include "core/bytes.h"
#include "core/log.h"
#include "weft/errors.h"

namespace weft::comm {
namespace {

using Clock = std::chrono::steady_clock;

int64_t nanos(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}
using namespace std::chrono_literals;

constexpr uint32_t kMagic = 0x42484657;  // "WFHB"
constexpr uint16_t kVersion = 1;
constexpr size_t kSignedBytes = 40;  // the header the MAC covers
constexpr std::string_view kMacLabel = "weft heartbeat v1";
// Receive buffer asked for: datagrams that arrive while this process is
// stopped or starved wait here (the kernel caps it at net.core.rmem_max).
constexpr int kReceiveBuffer = 1 << 20;
// Datagrams read per wake-up at most, so that a flood cannot keep the
// thread from sending its own heartbeats and checking the peers.
constexpr int kMaxReadsPerRound = 4096;
// Copies of the goodbye (UDP may drop one): a lost goodbye could get a rank
// that left declared dead by a peer that is still running.
constexpr int kGoodbyeCopies = 3;

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

Heartbeat::Heartbeat(HeartbeatOptions options, std::function<bool()> alive, OnSilent on_silent)
    : options_(std::move(options)), alive_(std::move(alive)), on_silent_(std::move(on_silent)) {
  const auto n = static_cast<size_t>(options_.size);
  departed_.assign(n, false);
  auto addr = net::resolve(options_.listen_ip, 0, true).front();
  sock_ = net::Fd(::socket(addr.family(), SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!sock_.valid()) {
    throw Error(fmt::format("heartbeat: socket(): {}", net::errno_string(errno)));
  }
  if (::bind(sock_.get(), addr.sa(), addr.length) != 0) {
    throw Error(fmt::format("heartbeat: cannot bind a UDP socket on {}: {}", addr.to_string(),
                            net::errno_string(errno)));
  }
  // Ahead of bulk data where the queueing discipline has priorities
  // (pfifo_fast's bands, or a DSCP-aware network): low delay, interactive.
  // Best effort: a failure changes nothing else.
  if (addr.family() == AF_INET) {
    int tos = IPTOS_LOWDELAY;
    (void)::setsockopt(sock_.get(), IPPROTO_IP, IP_TOS, &tos, sizeof tos);
  } else {
    int tclass = IPTOS_LOWDELAY;
    (void)::setsockopt(sock_.get(), IPPROTO_IPV6, IPV6_TCLASS, &tclass, sizeof tclass);
  }
  int prio = 6;  // TC_PRIO_INTERACTIVE, the highest allowed without CAP_NET_ADMIN
  (void)::setsockopt(sock_.get(), SOL_SOCKET, SO_PRIORITY, &prio, sizeof prio);
  int rcvbuf = kReceiveBuffer;
  (void)::setsockopt(sock_.get(), SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  local_ = net::local_address(sock_.get());
  wake_ = net::Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake_.valid()) {
    throw Error(fmt::format("heartbeat: eventfd(): {}", net::errno_string(errno)));
  }
}

Heartbeat::~Heartbeat() { stop(); }

std::string Heartbeat::address() const { return local_.to_string(); }

void Heartbeat::start(const std::vector<std::string>& addresses) {
  const auto n = static_cast<size_t>(options_.size);
  peers_.assign(n, net::SocketAddress{});
  watched_.assign(n, false);
  last_seq_.assign(n, 0);
  for (size_t r = 0; r < n && r < addresses.size(); ++r) {
    if (static_cast<int>(r) == options_.rank || addresses[r].empty()) continue;
    auto [host, port] = net::split_host_port(addresses[r], "heartbeat address");
    peers_[r] = net::resolve(host, port).front();
    watched_[r] = true;
  }
  last_heard_.assign(n, Clock::now());
  heard_ns_ = std::make_unique<std::atomic<int64_t>[]>(n);
  for (size_t r = 0; r < n; ++r) heard_ns_[r].store(nanos(last_heard_[r]));
  started_.store(true);
  thread_ = std::thread([this] { loop(); });
}

std::optional<Timeout> Heartbeat::silent_for(int peer) const {
  if (!started_.load() || peer < 0 || peer >= options_.size) return std::nullopt;
  const auto r = static_cast<size_t>(peer);
  if (!watched_[r]) return std::nullopt;
  {
    MutexLock lk(&mu_);
    if (stop_ || departed_[r]) return std::nullopt;
  }
  const int64_t heard = heard_ns_[r].load(std::memory_order_relaxed);
  return std::chrono::duration_cast<Timeout>(std::chrono::nanoseconds(nanos(Clock::now()) - heard));
}

void Heartbeat::departed(int peer) {
  MutexLock lk(&mu_);
  if (peer >= 0 && peer < options_.size) departed_[static_cast<size_t>(peer)] = true;
}

bool Heartbeat::stopping() const {
  MutexLock lk(&mu_);
  return stop_;
}

void Heartbeat::stop() {
  {
    MutexLock lk(&mu_);
    if (stop_) return;
    stop_ = true;
  }
  if (thread_.joinable()) {
    uint64_t one = 1;
    (void)!::write(wake_.get(), &one, sizeof one);
    thread_.join();
  }
}

HeartbeatStats Heartbeat::stats() const {
  return {sent_.load(std::memory_order_relaxed), received_.load(std::memory_order_relaxed),
          dropped_.load(std::memory_order_relaxed)};
}

void Heartbeat::send_all(Type type) {
  std::vector<bool> departed;
  {
    MutexLock lk(&mu_);
    departed = departed_;
  }
  ++seq_;
  uint8_t d[kDatagramBytes] = {};
  bytes::put_u32(d, kMagic);
  bytes::put_u16(d + 4, kVersion);
  bytes::put_u16(d + 6, static_cast<uint16_t>(type));
  bytes::put_u64(d + 8, options_.world_id);
  bytes::put_u32(d + 16, options_.generation);
  bytes::put_u32(d + 20, static_cast<uint32_t>(options_.rank));
  bytes::put_u32(d + 28, 0);
  bytes::put_u64(d + 32, seq_);
  for (size_t r = 0; r < peers_.size(); ++r) {
    if (!watched_[r] || departed[r]) continue;
    bytes::put_u32(d + 24, static_cast<uint32_t>(r));
    const auto mac =
        auth::hmac(options_.token, kMacLabel, std::span<const uint8_t>(d, kSignedBytes),
                   std::span<const uint8_t>());
    std::copy(mac.begin(), mac.end(), d + kSignedBytes);
    const auto& to = peers_[r];
    if (::sendto(sock_.get(), d, sizeof d, MSG_NOSIGNAL, to.sa(), to.length) ==
        static_cast<ssize_t>(sizeof d)) {
      sent_.fetch_add(1, std::memory_order_relaxed);
    } else {
      // A link that is down, a full send buffer: the peer notices the
      // silence if it lasts; nothing to do here but say so (rarely).
      WEFT_LOG_LIMITED(log::Level::Debug, "unsent heartbeats", "rank {}: heartbeat to rank {}: {}",
                       options_.rank, r, net::errno_string(errno));
    }
  }
}

std::string Heartbeat::check(const uint8_t* d, size_t n, int* src, Type* type,
                             uint64_t* seq) const {
  if (n != kDatagramBytes) return fmt::format("{} bytes, not a heartbeat", n);
  if (bytes::get_u32(d) != kMagic) return "not a heartbeat (bad magic)";
  if (bytes::get_u16(d + 4) != kVersion) {
    return fmt::format("heartbeat version {} (this is {})", bytes::get_u16(d + 4), kVersion);
  }
  const auto mac = auth::hmac(options_.token, kMacLabel, std::span<const uint8_t>(d, kSignedBytes),
                              std::span<const uint8_t>());
  auth::Mac got;
  std::copy(d + kSignedBytes, d + kDatagramBytes, got.begin());
  if (!auth::equal(mac, got)) return "wrong MAC (another job's token, or forged)";
  const uint16_t t = bytes::get_u16(d + 6);
  if (t != static_cast<uint16_t>(Type::Beat) && t != static_cast<uint16_t>(Type::Goodbye)) {
    return fmt::format("unknown heartbeat type {}", t);
  }
  if (bytes::get_u64(d + 8) != options_.world_id || bytes::get_u32(d + 16) != options_.generation) {
    return fmt::format("from another communicator or generation ({})", bytes::get_u32(d + 16));
  }
  const uint32_t from = bytes::get_u32(d + 20);
  if (from >= static_cast<uint32_t>(options_.size) || static_cast<int>(from) == options_.rank) {
    return fmt::format("sender rank {} out of range", from);
  }
  if (bytes::get_u32(d + 24) != static_cast<uint32_t>(options_.rank)) {
    return fmt::format("addressed to rank {}", bytes::get_u32(d + 24));
  }
  *src = static_cast<int>(from);
  *type = static_cast<Type>(t);
  *seq = bytes::get_u64(d + 32);
  if (*seq <= last_seq_[from]) return "replayed or reordered";
  return {};
}

void Heartbeat::drain(Clock::time_point now) {
  for (int i = 0; i < kMaxReadsPerRound; ++i) {
    uint8_t buf[256];
    net::SocketAddress from;
    from.length = sizeof from.storage;
    ssize_t n = ::recvfrom(sock_.get(), buf, sizeof buf, MSG_TRUNC,
                           reinterpret_cast<sockaddr*>(&from.storage), &from.length);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // EAGAIN: drained (or an ICMP error of an earlier send: nothing to read)
    }
    int src = -1;
    Type type = Type::Beat;
    uint64_t seq = 0;
    std::string why = check(buf, static_cast<size_t>(n), &src, &type, &seq);
    if (!why.empty()) {
      dropped_.fetch_add(1, std::memory_order_relaxed);
      WEFT_LOG_LIMITED(log::Level::Warn, "dropped heartbeat datagrams",
                       "rank {}: dropped a datagram from {} on the heartbeat socket: {}",
                       options_.rank, from.to_string(), why);
      continue;
    }
    received_.fetch_add(1, std::memory_order_relaxed);
    const auto s = static_cast<size_t>(src);
    last_seq_[s] = seq;
    last_heard_[s] = now;
    heard_ns_[s].store(nanos(now), std::memory_order_relaxed);
    if (type == Type::Goodbye) {
      WEFT_DEBUG("rank {}: rank {} said goodbye on the heartbeat socket", options_.rank, src);
      departed(src);
    }
  }
}

void Heartbeat::loop() {
  pthread_setname_np(pthread_self(), "weft-heartbeat");
  const Clock::duration interval = options_.interval;
  const Clock::duration timeout = options_.timeout;
  // A round of this thread that comes this late means that this process
  // was stopped or starved: the peers' silence is not theirs to answer for
  // (their datagrams may have overflowed the receive buffer meanwhile).
  const Clock::duration stalled = std::max<Clock::duration>(timeout / 2, 2 * interval);
  bool watching = options_.timeout.count() > 0;
  Clock::time_point last_round = Clock::now();
  Clock::time_point next_send = last_round;
  pollfd fds[2] = {{sock_.get(), POLLIN, 0}, {wake_.get(), POLLIN, 0}};
  while (!stopping()) {
    Clock::time_point now = Clock::now();
    drain(now);
    if (now - last_round > stalled) {
      WEFT_WARN(
          "rank {}: the heartbeat thread did not run for {:.1f} s (this process was stopped or "
          "starved of CPU); the peers' clocks start again",
          options_.rank, seconds(now - last_round));
      for (size_t r = 0; r < last_heard_.size(); ++r) {
        last_heard_[r] = std::max(last_heard_[r], now);
        heard_ns_[r].store(nanos(last_heard_[r]), std::memory_order_relaxed);
      }
    }
    last_round = now;
    if (now >= next_send) {
      send_all(Type::Beat);
      next_send += interval;
      if (next_send <= now) next_send = now + interval;
    }
    Clock::time_point wake_at = next_send;
    if (watching && alive_()) {
      std::vector<bool> departed;
      {
        MutexLock lk(&mu_);
        departed = departed_;
      }
      std::vector<std::pair<int, Timeout>> silent;
      for (size_t r = 0; r < last_heard_.size(); ++r) {
        if (!watched_[r] || departed[r]) continue;
        if (now - last_heard_[r] > timeout) {
          silent.emplace_back(static_cast<int>(r),
                              std::chrono::duration_cast<Timeout>(now - last_heard_[r]));
        } else {
          wake_at = std::min(wake_at, last_heard_[r] + timeout + 1ms);
        }
      }
      if (!silent.empty()) {
        watching = false;  // the world aborts: reported once
        std::stable_sort(silent.begin(), silent.end(),
                         [](const auto& a, const auto& b) { return a.second > b.second; });
        on_silent_(silent);
        continue;
      }
    }
    const auto wait = std::chrono::ceil<std::chrono::milliseconds>(wake_at - Clock::now());
    const int ms = static_cast<int>(std::clamp<int64_t>(wait.count(), 0, 1000));
    fds[0].revents = fds[1].revents = 0;
    if (::poll(fds, 2, ms) > 0 && (fds[1].revents & POLLIN)) {
      uint64_t v;
      (void)!::read(wake_.get(), &v, sizeof v);
    }
  }
  for (int i = 0; i < kGoodbyeCopies; ++i) send_all(Type::Goodbye);
}

}  // namespace weft::comm
