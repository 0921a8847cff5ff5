// TcpStoreServer: one thread blocked in epoll_wait serving every connection
// with non-blocking sockets. Each connection runs the handshake state
// machine, then reads requests (header, then body) one at a time. A get or
// wait whose keys are missing is parked: the connection stops reading until
// the keys appear (watchers) or the request's deadline passes (timers).
// Nothing is read from a connection while its reply is still being sent, so
// a client that does not read cannot make the server buffer without bound.
#include <fmt/format.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <map>
#include <set>
#include <span>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "core/auth.h"
#include "core/bytes.h"
#include "core/log.h"
#include "core/mutex.h"
#include "core/settings.h"
#include "core/socket.h"
#include "store/store_util.h"
#include "store/tcp_protocol.h"
#include "weft/errors.h"
#include "weft/store.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using store::Op;
using store::ReplyStatus;

constexpr uint64_t kListenTag = 0;
constexpr uint64_t kWakeTag = 1;
constexpr uint64_t kFirstConnId = 16;
constexpr size_t kReadChunk = 64u << 10;
constexpr int kMessagesPerWakeup = 32;  // fairness between busy connections

enum class Phase { Handshake, Header, Body, Parked };

struct Conn {
  uint64_t id = 0;
  net::Fd fd;
  std::string peer;
  Phase phase = Phase::Handshake;
  auth::ServerHandshake handshake;
  std::vector<uint8_t> in;  // the message being read
  size_t have = 0;          // bytes of it read so far
  size_t need = 0;          // its size
  store::RequestHeader request;
  std::vector<std::string> waiting;  // keys of the parked get (one) or wait
  bool blocked = false;              // parked with keys missing: counted in num_blocked
  std::string out;                   // reply bytes not sent yet
  size_t out_done = 0;
  Clock::time_point timer = Clock::time_point::max();  // handshake or parked deadline
  uint32_t events = 0;                                 // registered with epoll
  bool dead = false;                                   // closed; destroyed after the current event

  explicit Conn(auth::Credentials creds) : handshake(std::move(creds), auth::Kind::Store) {}
};

}  // namespace

struct TcpStoreServer::Impl {
  TcpStoreOptions options;
  Timeout handshake_timeout{};
  net::Fd listen_fd, epoll_fd, wake_fd;
  std::string address;
  uint16_t port = 0;
  Mutex stop_mu;                           // serializes stop()
  std::thread thread GUARDED_BY(stop_mu);  // the event loop (started by the constructor)
  std::atomic<size_t> num_keys{0};
  std::atomic<size_t> num_conns{0};
  std::atomic<size_t> num_blocked{0};  // StoreWaitStats
  std::atomic<uint64_t> num_looks{0};
  std::atomic<bool> stopping{false};
  // Anyone who reaches the port can be refused: those lines are
  // rate-limited, and the count of the others is written at stop().
  log::RateLimiter refusals{"refused connections"};
  template <typename... Args>
  void refused(fmt::format_string<Args...> f, Args&&... args) {
    if (log::enabled(log::Level::Error)) {
      refusals.write(log::Level::Error, fmt::format(f, std::forward<Args>(args)...));
    }
  }

  // Owned by the event loop thread.
  std::unordered_map<std::string, std::string> data;
  Mutex hook_mu;
  std::string hook_prefix GUARDED_BY(hook_mu);
  std::function<void(const std::string&, const std::string&)> hook GUARDED_BY(hook_mu);
  uint64_t max_bytes = 0;   // limit of data_bytes
  uint64_t data_bytes = 0;  // keys and values of data
  // Why storing `value` under `key` would go above max_bytes ("" if it fits).
  std::string too_big(std::string_view key, size_t value_bytes) const;
  std::unordered_map<uint64_t, std::unique_ptr<Conn>> conns;
  std::vector<uint64_t> closed;  // dead connections to destroy
  std::unordered_map<std::string, std::unordered_set<uint64_t>> watchers;
  std::set<std::pair<Clock::time_point, uint64_t>> timers;
  uint64_t next_id = kFirstConnId;
  Clock::time_point accept_paused_until = Clock::time_point::min();

  void run();
  void accept_all();
  // The handlers below may close c: callers check c.dead afterwards.
  void on_event(Conn& c, uint32_t events);
  void read_messages(Conn& c);
  void on_message(Conn& c);
  void on_request(Conn& c);
  void flush(Conn& c);
  void close(Conn& c);
  void refuse(Conn& c, std::string_view why);
  void set_events(Conn& c);
  void set_timer(Conn& c, Clock::time_point when);
  void expire_timers();
  void expect(Conn& c, Phase phase, size_t bytes);
  void park(Conn& c, std::vector<std::string> keys, uint32_t timeout_ms);
  void unpark(Conn& c);
  bool answer_parked(Conn& c);  // answers if every key exists now
  void changed(const std::string& key);
  void reply(Conn& c, ReplyStatus status, std::string_view value = {}, int64_t number = 0,
             uint8_t flags = 0);
  void send(Conn& c, std::string_view bytes);
  void put(std::string key, std::string value);
};

void TcpStoreServer::Impl::set_events(Conn& c) {
  uint32_t want;
  if (c.out_done < c.out.size()) {
    want = EPOLLOUT;  // reply pending: read nothing more until it is sent
  } else if (c.phase == Phase::Parked) {
    want = EPOLLRDHUP;  // only notice the client going away
  } else {
    want = EPOLLIN | EPOLLRDHUP;
  }
  if (want == c.events) return;
  epoll_event ev{};
  ev.events = want;
  ev.data.u64 = c.id;
  if (epoll_ctl(epoll_fd.get(), EPOLL_CTL_MOD, c.fd.get(), &ev) != 0) {
    WEFT_ERROR("store server: epoll_ctl for {}: {}", c.peer, net::errno_string(errno));
  }
  c.events = want;
}

void TcpStoreServer::Impl::set_timer(Conn& c, Clock::time_point when) {
  if (c.timer != Clock::time_point::max()) timers.erase({c.timer, c.id});
  c.timer = when;
  if (when != Clock::time_point::max()) timers.insert({when, c.id});
}

void TcpStoreServer::Impl::expect(Conn& c, Phase phase, size_t bytes) {
  c.phase = phase;
  c.need = bytes;
  c.have = 0;
  if (c.in.capacity() > 4 * kReadChunk) {
    std::vector<uint8_t>().swap(c.in);  // give back the memory of a big value
  } else {
    c.in.clear();
  }
}

void TcpStoreServer::Impl::close(Conn& c) {
  if (c.dead) return;
  if (c.phase == Phase::Parked) unpark(c);
  set_timer(c, Clock::time_point::max());
  epoll_ctl(epoll_fd.get(), EPOLL_CTL_DEL, c.fd.get(), nullptr);
  c.fd.reset();
  c.dead = true;
  closed.push_back(c.id);
}

void TcpStoreServer::Impl::refuse(Conn& c, std::string_view why) {
  WEFT_ERROR("store server: closing connection from {}: {}", c.peer, why);
  close(c);
}

void TcpStoreServer::Impl::accept_all() {
  for (;;) {
    net::SocketAddress addr;
    addr.length = sizeof addr.storage;
    int fd = ::accept4(listen_fd.get(), reinterpret_cast<sockaddr*>(&addr.storage), &addr.length,
                       SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO) continue;
      // Out of descriptors or memory: stop accepting for a moment rather than spin.
      WEFT_ERROR("store server on {}: accept: {}; pausing new connections for 100 ms", address,
                 net::errno_string(errno));
      epoll_event ev{};
      ev.data.u64 = kListenTag;
      epoll_ctl(epoll_fd.get(), EPOLL_CTL_MOD, listen_fd.get(), &ev);
      accept_paused_until = Clock::now() + 100ms;
      return;
    }
    auto c =
        std::make_unique<Conn>(auth::Credentials{options.job_token, options.allow_unauthenticated});
    c->id = next_id++;
    c->fd.reset(fd);
    c->peer = addr.to_string();
    net::set_nodelay(fd);
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.u64 = c->id;
    if (epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
      WEFT_ERROR("store server: epoll_ctl for {}: {}", c->peer, net::errno_string(errno));
      continue;
    }
    c->events = ev.events;
    Conn& ref = *c;
    conns.emplace(c->id, std::move(c));
    num_conns.store(conns.size());
    expect(ref, Phase::Handshake, ref.handshake.want());
    set_timer(ref, Clock::now() + handshake_timeout);
    WEFT_DEBUG("store server: connection from {}", ref.peer);
  }
}

void TcpStoreServer::Impl::on_event(Conn& c, uint32_t events) {
  if (events & EPOLLOUT) flush(c);
  if (c.dead || !(events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) return;
  if (c.phase == Phase::Parked || c.out_done < c.out.size()) {
    // Not reading: the event means the client went away (or broke).
    if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
      WEFT_DEBUG("store server: {} disconnected", c.peer);
      close(c);
    }
    return;
  }
  read_messages(c);
}

// Reads and handles up to kMessagesPerWakeup messages (level-triggered epoll
// comes back for the rest).
void TcpStoreServer::Impl::read_messages(Conn& c) {
  for (int handled = 0; handled < kMessagesPerWakeup;) {
    if (c.dead || c.phase == Phase::Parked || c.out_done < c.out.size()) return;
    if (c.in.size() < c.need) {
      // Grow with what arrives: a header claiming a big body reserves nothing.
      c.in.resize(std::min(c.need, std::max(c.in.size() * 2, kReadChunk)));
    }
    ssize_t n = ::recv(c.fd.get(), c.in.data() + c.have, c.in.size() - c.have, 0);
    if (n > 0) {
      c.have += static_cast<size_t>(n);
      if (c.have == c.need) {
        ++handled;
        on_message(c);
      }
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    const std::string why = n == 0 ? "closed the connection" : net::errno_string(errno);
    if (c.phase == Phase::Handshake && n == 0) {
      refused(
          "store server: refused connection from {}: the client closed the connection during the "
          "handshake (wrong job token?)",
          c.peer);
    } else if (c.phase == Phase::Handshake) {
      refused("store server: refused connection from {}: {} during the handshake", c.peer, why);
    } else if (c.phase == Phase::Header && c.have == 0) {
      WEFT_DEBUG("store server: {} disconnected", c.peer);
    } else {
      WEFT_WARN("store server: {} {} in the middle of a {} request", c.peer, why,
                c.phase == Phase::Body ? store::op_name(static_cast<Op>(c.request.op)) : "new");
    }
    close(c);
    return;
  }
}

// A complete message is in c.in.
void TcpStoreServer::Impl::on_message(Conn& c) {
  switch (c.phase) {
    case Phase::Handshake: {
      std::vector<uint8_t> answer = c.handshake.feed(std::span<const uint8_t>(c.in.data(), c.need));
      if (c.handshake.done() && !c.handshake.accepted()) {
        // Best effort: tell the client why (a few bytes fit in any socket buffer).
        if (!answer.empty()) {
          [[maybe_unused]] ssize_t n =
              ::send(c.fd.get(), answer.data(), answer.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        }
        refused("store server: refused connection from {}: {}", c.peer, c.handshake.error());
        close(c);
        return;
      }
      if (c.handshake.done()) {
        WEFT_DEBUG("store server: {} authenticated", c.peer);
        set_timer(c, Clock::time_point::max());
        expect(c, Phase::Header, store::kRequestHeaderBytes);
      } else {
        expect(c, Phase::Handshake, c.handshake.want());
      }
      send(c, std::string_view(reinterpret_cast<const char*>(answer.data()), answer.size()));
      return;
    }
    case Phase::Header: {
      c.request = store::RequestHeader::decode(c.in.data());
      if (std::string why = c.request.validate(); !why.empty()) {
        refuse(c, why);
        return;
      }
      expect(c, Phase::Body, c.request.body_bytes());
      if (c.need == 0) on_request(c);  // nothing more to read
      return;
    }
    case Phase::Body: on_request(c); return;
    case Phase::Parked: return;
  }
}

void TcpStoreServer::Impl::on_request(Conn& c) {
  const auto& h = c.request;
  const char* p = reinterpret_cast<const char*>(c.in.data());
  std::string_view key(p, h.key_bytes);
  std::string_view value(p + h.key_bytes, h.value_bytes);
  std::string_view value2(p + h.key_bytes + h.value_bytes, h.value2_bytes);
  switch (static_cast<Op>(h.op)) {
    case Op::Set:
      if (std::string why = too_big(key, value.size()); !why.empty())
        return reply(c, ReplyStatus::Error, why);
      put(std::string(key), std::string(value));
      return reply(c, ReplyStatus::Ok);
    case Op::Get: {
      auto it = data.find(std::string(key));
      if (it != data.end()) return reply(c, ReplyStatus::Ok, it->second);
      return park(c, {std::string(key)}, h.timeout_ms);
    }
    case Op::TryGet: {
      auto it = data.find(std::string(key));
      if (it == data.end()) return reply(c, ReplyStatus::NotFound);
      return reply(c, ReplyStatus::Ok, it->second);
    }
    case Op::Add: {
      auto delta =
          static_cast<int64_t>(bytes::get_u64(reinterpret_cast<const uint8_t*>(value.data())));
      std::string k(key);
      auto it = data.find(k);
      int64_t sum = 0;
      try {
        sum = store::add_to_value(key, it == data.end() ? nullptr : &it->second, delta);
      } catch (const StoreError& e) {
        return reply(c, ReplyStatus::Error, e.what());
      }
      std::string text = std::to_string(sum);
      if (std::string why = too_big(k, text.size()); !why.empty())
        return reply(c, ReplyStatus::Error, why);
      put(std::move(k), std::move(text));
      return reply(c, ReplyStatus::Ok, {}, sum);
    }
    case Op::CompareSet: {
      std::string k(key);
      auto it = data.find(k);
      const bool matches = (h.flags & store::kHasExpected) ? it != data.end() && it->second == value
                                                           : it == data.end();
      if (matches) {
        if (std::string why = too_big(k, value2.size()); !why.empty())
          return reply(c, ReplyStatus::Error, why);
        put(std::move(k), std::string(value2));
        return reply(c, ReplyStatus::Ok, value2, 0, store::kSwapped | store::kHasValue);
      }
      if (it == data.end()) return reply(c, ReplyStatus::Ok);
      return reply(c, ReplyStatus::Ok, it->second, 0, store::kHasValue);
    }
    case Op::Wait: {
      std::vector<std::string> keys;
      keys.reserve(h.key_count);
      size_t off = 0;
      for (uint32_t i = 0; i < h.key_count && key.size() - off >= 4; ++i) {
        uint32_t len = bytes::get_u32(reinterpret_cast<const uint8_t*>(p + off));
        off += 4;
        if (len > kMaxStoreKeyBytes || len > key.size() - off) {
          return refuse(c, fmt::format("wait key {} has length {} (limit {} bytes, {} left in the "
                                       "list)",
                                       i, len, kMaxStoreKeyBytes, key.size() - off));
        }
        keys.emplace_back(p + off, len);
        off += len;
      }
      if (keys.size() != h.key_count || off != key.size()) {
        return refuse(c, fmt::format("malformed wait key list ({} keys announced in {} bytes)",
                                     h.key_count, key.size()));
      }
      return park(c, std::move(keys), h.timeout_ms);
    }
    case Op::Remove: {
      auto it = data.find(std::string(key));
      bool existed = it != data.end();
      if (existed) {
        data_bytes -= it->first.size() + it->second.size();
        data.erase(it);
      }
      num_keys.store(data.size(), std::memory_order_relaxed);
      return reply(c, ReplyStatus::Ok, {}, existed ? 1 : 0);
    }
  }
  refuse(c, fmt::format("unknown op {}", h.op));
}

std::string TcpStoreServer::Impl::too_big(std::string_view key, size_t value_bytes) const {
  uint64_t after = data_bytes + key.size() + value_bytes;
  auto it = data.find(std::string(key));
  if (it != data.end()) after -= it->first.size() + it->second.size();
  if (after <= max_bytes) return "";
  return fmt::format(
      "the store is full: writing '{}' ({} bytes) would bring it to {} bytes, above its limit of "
      "{} bytes (WEFT_STORE_MAX_BYTES of the process that serves it)",
      key.substr(0, 200), key.size() + value_bytes, after, max_bytes);
}

void TcpStoreServer::Impl::put(std::string key, std::string value) {
  auto old = data.find(key);
  if (old != data.end()) data_bytes -= old->first.size() + old->second.size();
  data_bytes += key.size() + value.size();
  auto it = data.insert_or_assign(std::move(key), std::move(value)).first;
  num_keys.store(data.size(), std::memory_order_relaxed);
  std::function<void(const std::string&, const std::string&)> call;
  {
    MutexLock lk(&hook_mu);
    if (hook && it->first.starts_with(hook_prefix)) call = hook;
  }
  if (call) call(it->first, it->second);
  changed(it->first);
}

// Parks a get/wait until its keys exist (answered at once when they do).
void TcpStoreServer::Impl::park(Conn& c, std::vector<std::string> keys, uint32_t timeout_ms) {
  c.waiting = std::move(keys);
  c.phase = Phase::Parked;
  if (answer_parked(c)) return;
  if (timeout_ms == 0) {
    std::string missing;
    for (const auto& k : c.waiting) {
      if (!data.count(k)) {
        missing = k;
        break;
      }
    }
    unpark(c);
    return reply(c, ReplyStatus::Timeout, missing);
  }
  for (const auto& k : c.waiting) {
    if (!data.count(k)) watchers[k].insert(c.id);
  }
  set_timer(c, Clock::now() + std::chrono::milliseconds(timeout_ms));
  set_events(c);
  c.blocked = true;
  ++num_blocked;
}

void TcpStoreServer::Impl::unpark(Conn& c) {
  for (const auto& k : c.waiting) {
    auto it = watchers.find(k);
    if (it == watchers.end()) continue;
    it->second.erase(c.id);
    if (it->second.empty()) watchers.erase(it);
  }
  c.waiting.clear();
  if (c.blocked) {
    c.blocked = false;
    --num_blocked;
  }
  set_timer(c, Clock::time_point::max());
  expect(c, Phase::Header, store::kRequestHeaderBytes);
}

// If every key c waits for exists, answers it and returns true.
bool TcpStoreServer::Impl::answer_parked(Conn& c) {
  for (const auto& k : c.waiting) {
    if (!data.count(k)) return false;
  }
  std::string value;
  if (static_cast<Op>(c.request.op) == Op::Get) value = data.find(c.waiting.front())->second;
  unpark(c);
  reply(c, ReplyStatus::Ok, value);
  return true;
}

// Wakes the parked requests watching key (just written).
void TcpStoreServer::Impl::changed(const std::string& key) {
  auto it = watchers.find(key);
  if (it == watchers.end()) return;
  std::vector<uint64_t> ids(it->second.begin(), it->second.end());
  watchers.erase(it);
  for (uint64_t id : ids) {
    auto found = conns.find(id);
    if (found == conns.end()) continue;
    Conn& c = *found->second;
    if (c.dead || c.phase != Phase::Parked) continue;
    if (!answer_parked(c)) {
      ++num_looks;
      // Still missing keys; watch them all again (some may have been removed).
      for (const auto& k : c.waiting) {
        if (!data.count(k)) watchers[k].insert(c.id);
      }
    }
  }
}

void TcpStoreServer::Impl::expire_timers() {
  const auto now = Clock::now();
  while (!timers.empty() && timers.begin()->first <= now) {
    const auto [when, id] = *timers.begin();
    timers.erase(timers.begin());
    auto it = conns.find(id);
    if (it == conns.end() || it->second->dead || it->second->timer != when) continue;
    Conn& c = *it->second;
    c.timer = Clock::time_point::max();
    if (c.phase == Phase::Handshake) {
      refused("store server: refused connection from {}: handshake not completed within {}", c.peer,
              format_timeout(handshake_timeout));
      close(c);
    } else if (c.phase == Phase::Parked) {
      std::string missing;
      for (const auto& k : c.waiting) {
        if (!data.count(k)) {
          missing = k;
          break;
        }
      }
      unpark(c);
      reply(c, ReplyStatus::Timeout, missing);
    }
  }
}

// Queues the reply to c's current request and sends what the socket takes.
void TcpStoreServer::Impl::reply(Conn& c, ReplyStatus status, std::string_view value,
                                 int64_t number, uint8_t flags) {
  store::ReplyHeader h;
  h.status = status;
  h.flags = flags;
  h.id = c.request.id;
  h.value_bytes = value.size();
  h.number = number;
  std::array<uint8_t, store::kReplyHeaderBytes> head{};
  h.encode(head.data());
  if (c.dead) return;
  c.out.append(reinterpret_cast<const char*>(head.data()), head.size());
  c.out.append(value);  // before expect(): value may point into c.in
  if (c.phase == Phase::Body) expect(c, Phase::Header, store::kRequestHeaderBytes);
  flush(c);
}

void TcpStoreServer::Impl::send(Conn& c, std::string_view bytes) {
  if (c.dead) return;
  c.out.append(bytes);
  flush(c);
}

void TcpStoreServer::Impl::flush(Conn& c) {
  while (c.out_done < c.out.size()) {
    ssize_t n = ::send(c.fd.get(), c.out.data() + c.out_done, c.out.size() - c.out_done,
                       MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      c.out_done += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    WEFT_WARN("store server: cannot send to {}: {}", c.peer, net::errno_string(errno));
    return close(c);
  }
  if (c.out_done == c.out.size()) {
    if (c.out.capacity() > 4 * kReadChunk) {
      std::string().swap(c.out);
    } else {
      c.out.clear();
    }
    c.out_done = 0;
  }
  set_events(c);
}

void TcpStoreServer::Impl::run() {
  std::array<epoll_event, 64> events{};
  while (!stopping.load()) {
    auto next = timers.empty() ? Clock::time_point::max() : timers.begin()->first;
    if (accept_paused_until != Clock::time_point::min()) next = std::min(next, accept_paused_until);
    int timeout_ms = next == Clock::time_point::max() ? -1 : Deadline(next).poll_ms();
    int n = epoll_wait(epoll_fd.get(), events.data(), static_cast<int>(events.size()), timeout_ms);
    if (n < 0) {
      if (errno == EINTR) continue;
      WEFT_ERROR("store server on {}: epoll_wait: {}; stopping", address, net::errno_string(errno));
      break;
    }
    for (int i = 0; i < n; ++i) {
      const uint64_t tag = events[i].data.u64;
      if (tag == kWakeTag) {
        uint64_t v;
        [[maybe_unused]] ssize_t r = ::read(wake_fd.get(), &v, sizeof v);
        continue;
      }
      if (tag == kListenTag) {
        accept_all();
        continue;
      }
      auto it = conns.find(tag);
      if (it == conns.end() || it->second->dead) continue;  // closed earlier in this batch
      Conn& c = *it->second;
      try {
        on_event(c, events[i].events);
      } catch (const std::exception& e) {
        // E.g. bad_alloc for a large value: lose this connection, not the server.
        refuse(c, fmt::format("internal error: {}", e.what()));
      }
    }
    expire_timers();
    for (uint64_t id : closed) conns.erase(id);
    closed.clear();
    num_conns.store(conns.size());
    if (accept_paused_until != Clock::time_point::min() && Clock::now() >= accept_paused_until) {
      accept_paused_until = Clock::time_point::min();
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = kListenTag;
      epoll_ctl(epoll_fd.get(), EPOLL_CTL_MOD, listen_fd.get(), &ev);
    }
  }
  conns.clear();
  watchers.clear();
  timers.clear();
  num_conns.store(0);
  num_blocked.store(0);
}

TcpStoreServer::TcpStoreServer(const std::string& host, uint16_t port, TcpStoreOptions options)
    : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.options = std::move(options);
  s.max_bytes =
      s.options.max_bytes != 0 ? s.options.max_bytes : settings::get(settings::kStoreMaxBytes);
  s.handshake_timeout = std::min<Timeout>(resolve_timeout(s.options.timeout, kDefaultStoreTimeout),
                                          std::chrono::seconds(10));
  const std::string where = net::join_host_port(host.empty() ? "0.0.0.0" : host, port);
  try {
    auto addrs = net::resolve(host, port, /*passive=*/true);
    s.listen_fd = net::listen_tcp(addrs.front());
  } catch (const Error& e) {
    throw StoreError(fmt::format("cannot start the store server on {}: {}", where, e.what()));
  }
  auto local = net::local_address(s.listen_fd.get());
  s.port = local.port();
  s.address = local.to_string();
  s.epoll_fd.reset(epoll_create1(EPOLL_CLOEXEC));
  s.wake_fd.reset(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!s.epoll_fd.valid() || !s.wake_fd.valid()) {
    throw StoreError(
        fmt::format("cannot start the store server on {}: {}", where, net::errno_string(errno)));
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kListenTag;
  epoll_ctl(s.epoll_fd.get(), EPOLL_CTL_ADD, s.listen_fd.get(), &ev);
  ev.data.u64 = kWakeTag;
  epoll_ctl(s.epoll_fd.get(), EPOLL_CTL_ADD, s.wake_fd.get(), &ev);
  if (s.options.job_token.empty()) {
    if (s.options.allow_unauthenticated) {
      WEFT_WARN("store server on {} accepts unauthenticated connections (no job token)", s.address);
    } else {
      WEFT_WARN(
          "store server on {} has no job token and refuses unauthenticated connections: "
          "every client will be refused",
          s.address);
    }
  }
  s.thread = std::thread([&s] {
    try {
      s.run();
    } catch (const std::exception& e) {
      WEFT_ERROR("store server on {} stopped: {}", s.address, e.what());
    }
  });
  WEFT_INFO("store server listening on {}", s.address);
}

TcpStoreServer::~TcpStoreServer() { stop(); }

uint16_t TcpStoreServer::port() const { return impl_->port; }

size_t TcpStoreServer::num_keys() const { return impl_->num_keys.load(); }

void TcpStoreServer::on_write(
    std::string prefix, std::function<void(const std::string&, const std::string&)> callback) {
  MutexLock lk(&impl_->hook_mu);
  impl_->hook_prefix = std::move(prefix);
  impl_->hook = std::move(callback);
}

size_t TcpStoreServer::num_connections() const { return impl_->num_conns.load(); }

StoreWaitStats TcpStoreServer::wait_stats() const {
  return {.waiting = impl_->num_blocked.load(), .looks = impl_->num_looks.load()};
}

void TcpStoreServer::stop() {
  MutexLock lock(&impl_->stop_mu);
  if (!impl_->thread.joinable()) return;
  impl_->stopping.store(true);
  uint64_t one = 1;
  [[maybe_unused]] ssize_t r = ::write(impl_->wake_fd.get(), &one, sizeof one);
  impl_->thread.join();
  impl_->listen_fd.reset();
  impl_->refusals.report();
  WEFT_INFO("store server on {} stopped", impl_->address);
}

}  // namespace weft
