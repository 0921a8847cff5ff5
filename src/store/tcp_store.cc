// TcpStore: the client of a TcpStoreServer. One connection per object,
// shared by its threads under a mutex; connects lazily, retries transient
// connection errors with back-off until the call's deadline, and reconnects
// and resends idempotent requests when the connection breaks.
#include <fmt/format.h>
#include <poll.h>
#include <sys/socket.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <mutex>
#include <thread>

#include "core/auth.h"
#include "core/bytes.h"
#include "core/launcher_watch.h"
#include "core/log.h"
#include "core/socket.h"
#include "store/store_util.h"
#include "store/tcp_protocol.h"
#include "weft/errors.h"
#include "weft/store.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using store::call_name;
using store::Op;
using store::ReplyStatus;

constexpr auto kFirstBackoff = 10ms;
constexpr auto kMaxBackoff = 500ms;
constexpr auto kMaxAttempt = 5s;
constexpr Timeout kMaxHandshake = 30s;

bool transient(int err) {
  switch (err) {
    case ECONNREFUSED:
    case ECONNRESET:
    case ECONNABORTED:
    case ENETUNREACH:
    case EHOSTUNREACH:
    case ETIMEDOUT:
    case EAGAIN:
    case EINTR: return true;
    default: return false;
  }
}

// A request: the header fields that vary and the body pieces.
struct Request {
  Op op;
  uint8_t flags = 0;
  bool waits = false;       // get/wait: the server may park it until the deadline
  bool idempotent = false;  // may be resent after the connection broke mid-call
  std::string_view key;     // or the encoded key list of wait
  uint32_t key_count = 0;
  std::string_view value;
  std::string_view value2;
};

struct Reply {
  store::ReplyHeader header;
  std::string value;
};

// How long the server may park a waiting request: a little less than what is
// left, so that its timeout answer arrives before the client gives up (and
// the connection stays usable).
uint32_t server_wait_ms(const Deadline& deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline.remaining()).count();
  left -= std::min<long long>(left / 4, 50);
  return static_cast<uint32_t>(std::clamp<long long>(left, 0, UINT32_MAX));
}

}  // namespace

struct TcpStore::Impl {
  std::string host;
  uint16_t port;
  TcpStoreOptions options;
  std::string peer;  // "host:port" for messages

  store::TimedMutex mu;  // serializes requests on the connection
  net::Fd fd;
  uint32_t next_id = 1;
  std::atomic<uint64_t> connect_attempts{0};  // read without mu

  // Closes a connection the peer closed, or that has unexpected bytes
  // waiting: a request must start on a clean connection.
  void drop_if_stale() {
    if (!fd.valid()) return;
    pollfd p{fd.get(), POLLIN, 0};
    if (::poll(&p, 1, 0) <= 0) return;
    char c;
    ssize_t n = ::recv(fd.get(), &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    WEFT_DEBUG("store client: connection to {} is {}, reconnecting", peer,
               n == 0 ? "closed" : "unusable");
    fd.reset();
  }

  // Connects (with retries of transient errors until the deadline) and runs
  // the handshake, unless connected already.
  void ensure_connected(const Deadline& deadline, const std::string& call, Timeout timeout) {
    drop_if_stale();
    if (fd.valid()) return;
    std::vector<net::SocketAddress> addrs;
    try {
      addrs = net::resolve(host, port);
    } catch (const Error& e) {
      throw StoreError(fmt::format("{}: cannot reach the store at {}: {}", call, peer, e.what()));
    }
    auto backoff = std::chrono::duration_cast<std::chrono::nanoseconds>(kFirstBackoff);
    int attempts = 0;
    // A wait for a store nobody serves yet says so at a steady interval, and
    // ends when the launcher that started this process is gone.
    const auto started = std::chrono::steady_clock::now();
    const auto interval = rendezvous::report_interval();
    auto next_report = started + interval;
    for (;;) {
      rendezvous::check_launcher(fmt::format("the store at {}", peer));
      int err = 0;
      for (const auto& addr : addrs) {
        ++attempts;
        ++connect_attempts;
        // One attempt at most kMaxAttempt: a host that drops the packets
        // must not keep the loop (and its reports) from running.
        net::Fd f = net::connect_tcp(addr, deadline.min(Deadline::after(kMaxAttempt)), &err);
        if (!f.valid()) continue;
        net::set_nodelay(f.get());
        net::set_keepalive(f.get());
        try {
          // A server that accepts but never answers is not a Weft store:
          // say so after kMaxHandshake rather than at the call's deadline.
          auth::client_handshake(f.get(), auth::Kind::Store, auth::Context{},
                                 {options.job_token, options.allow_unauthenticated},
                                 deadline.min(Deadline::after(kMaxHandshake)), peer);
        } catch (const TimeoutError&) {
          if (deadline.expired()) {
            store::throw_timeout(call, timeout,
                                 fmt::format(" (handshake with the store at {})", peer));
          }
          throw StoreError(fmt::format(
              "{}: the server at {} accepted the connection but did not answer the store "
              "handshake within {}: is something other than a Weft store listening there?",
              call, peer, format_timeout(kMaxHandshake)));
        }
        fd = std::move(f);
        return;
      }
      if (!transient(err)) {
        throw StoreError(fmt::format("{}: cannot connect to the store at {}: {}", call, peer,
                                     net::errno_string(err)));
      }
      if (deadline.expired()) {
        throw StoreError(fmt::format("{}: cannot reach the store at {} within {}: {} ({} attempts)",
                                     call, peer, format_timeout(timeout), net::errno_string(err),
                                     attempts));
      }
      const auto now = std::chrono::steady_clock::now();
      if (now >= next_report) {
        WEFT_WARN(
            "{}: still waiting for the store at {} ({}) after {} s, {} attempts; giving up in {} s",
            call, peer, net::errno_string(err),
            std::chrono::duration_cast<std::chrono::seconds>(now - started).count(), attempts,
            std::chrono::duration_cast<std::chrono::seconds>(deadline.remaining()).count());
        next_report = now + interval;
      }
      std::this_thread::sleep_for(std::min(backoff, deadline.remaining()));
      backoff = std::min<std::chrono::nanoseconds>(backoff * 2, kMaxBackoff);
    }
  }

  // Why an I/O step failed, for messages.
  static std::string io_error(net::IoStatus st, int err) {
    if (st == net::IoStatus::Closed) return "the connection was closed";
    return net::errno_string(err);
  }

  [[noreturn]] void garbage(const std::string& call, const std::string& what) {
    fd.reset();
    throw StoreError(fmt::format("{}: the store at {} answered garbage: {}", call, peer, what));
  }

  // Sends req and reads the reply, reconnecting as needed. Throws on
  // timeouts, errors and Error replies.
  Reply call(const std::string& call, const Request& req, Timeout timeout) {
    const Timeout resolved = resolve_timeout(timeout, options.timeout);
    const Deadline deadline = store::deadline_for(timeout, options.timeout);
    std::unique_lock<store::TimedMutex> lock(mu, std::defer_lock);
    if (!lock.try_lock_until(deadline.when())) {
      store::throw_timeout(call, resolved, " (waiting for another request of this TcpStore)");
    }
    auto backoff = std::chrono::duration_cast<std::chrono::nanoseconds>(kFirstBackoff);
    for (;;) {
      ensure_connected(deadline, call, resolved);
      const char* step = "sending the request";
      net::IoStatus st = net::IoStatus::Ok;
      int err = 0;
      store::RequestHeader h;
      h.op = static_cast<uint8_t>(req.op);
      h.flags = req.flags;
      h.id = next_id++;
      h.timeout_ms = req.waits ? server_wait_ms(deadline) : 0;
      h.key_bytes = static_cast<uint32_t>(req.key.size());
      h.key_count = req.key_count;
      h.value_bytes = req.value.size();
      h.value2_bytes = req.value2.size();
      std::string head(store::kRequestHeaderBytes, '\0');
      h.encode(reinterpret_cast<uint8_t*>(head.data()));
      head.append(req.key);
      if (req.value.size() + req.value2.size() < 4096) head.append(req.value).append(req.value2);
      const bool separate = head.size() < store::kRequestHeaderBytes + req.key.size() +
                                              req.value.size() + req.value2.size();
      st = net::write_all(fd.get(), head.data(), head.size(), deadline, &err);
      if (st == net::IoStatus::Ok && separate) {
        st = net::write_all(fd.get(), req.value.data(), req.value.size(), deadline, &err);
        if (st == net::IoStatus::Ok) {
          st = net::write_all(fd.get(), req.value2.data(), req.value2.size(), deadline, &err);
        }
      }
      Reply reply;
      if (st == net::IoStatus::Ok) {
        step = "reading the reply";
        std::array<uint8_t, store::kReplyHeaderBytes> buf{};
        st = net::read_exact(fd.get(), buf.data(), buf.size(), deadline, &err);
        if (st == net::IoStatus::Ok) {
          reply.header = store::ReplyHeader::decode(buf.data());
          const auto& r = reply.header;
          if (r.magic != store::kReplyMagic)
            garbage(call, fmt::format("reply magic 0x{:08x}", r.magic));
          if (r.version != store::kStoreProtocolVersion) {
            garbage(call, fmt::format("store protocol version {} (ours {})", r.version,
                                      store::kStoreProtocolVersion));
          }
          if (r.id != h.id)
            garbage(call, fmt::format("reply to request {} (expected {})", r.id, h.id));
          const size_t limit =
              r.status == ReplyStatus::Ok ? kMaxStoreValueBytes : store::kMaxReplyMessageBytes;
          if (r.value_bytes > limit) {
            garbage(call, fmt::format("a value of {} bytes (limit {})", r.value_bytes, limit));
          }
          reply.value.resize(r.value_bytes);
          st = net::read_exact(fd.get(), reply.value.data(), reply.value.size(), deadline, &err);
        }
      }
      if (st == net::IoStatus::Ok) return check(call, resolved, std::move(reply));
      fd.reset();  // the connection is in an unknown state
      if (st == net::IoStatus::Timeout) {
        store::throw_timeout(call, resolved, fmt::format(" (store at {})", peer));
      }
      if (!req.idempotent) {
        throw StoreError(
            fmt::format("{}: connection to the store at {} broke while {}: {} (not "
                        "retried: the request may have been applied)",
                        call, peer, step, io_error(st, err)));
      }
      WEFT_DEBUG("{}: connection to the store at {} broke while {} ({}); retrying", call, peer,
                 step, io_error(st, err));
      if (deadline.expired()) {
        throw StoreError(fmt::format("{}: connection to the store at {} broke while {}: {}", call,
                                     peer, step, io_error(st, err)));
      }
      std::this_thread::sleep_for(std::min(backoff, deadline.remaining()));
      backoff = std::min<std::chrono::nanoseconds>(backoff * 2, kMaxBackoff);
    }
  }

  Reply check(const std::string& call, Timeout timeout, Reply reply) {
    switch (reply.header.status) {
      case ReplyStatus::Ok:
      case ReplyStatus::NotFound: return reply;
      case ReplyStatus::Timeout:
        store::throw_timeout(call, timeout,
                             reply.value.empty()
                                 ? fmt::format(" (store at {})", peer)
                                 : fmt::format(" (key {} is missing in the store at {})",
                                               store::quote(reply.value), peer));
      case ReplyStatus::Error:
        throw StoreError(
            fmt::format("{}: the store at {} refused it: {}", call, peer, reply.value));
    }
    garbage(call, fmt::format("reply status {}", static_cast<int>(reply.header.status)));
  }
};

TcpStore::TcpStore(std::string host, uint16_t port, TcpStoreOptions options)
    : impl_(std::make_unique<Impl>()) {
  impl_->peer = net::join_host_port(host.empty() ? "127.0.0.1" : host, port);
  impl_->host = std::move(host);
  impl_->port = port;
  impl_->options = std::move(options);
  impl_->options.timeout = resolve_timeout(impl_->options.timeout, kDefaultStoreTimeout);
}

TcpStore::~TcpStore() = default;

Timeout TcpStore::default_timeout() const { return impl_->options.timeout; }

uint64_t TcpStore::connect_attempts() const { return impl_->connect_attempts.load(); }

void TcpStore::connect(Timeout timeout) {
  const std::string call = fmt::format("store connect({})", impl_->peer);
  const Deadline deadline = store::deadline_for(timeout, impl_->options.timeout);
  std::unique_lock<store::TimedMutex> lock(impl_->mu, std::defer_lock);
  const Timeout resolved = resolve_timeout(timeout, impl_->options.timeout);
  if (!lock.try_lock_until(deadline.when())) {
    store::throw_timeout(call, resolved, " (waiting for another request of this TcpStore)");
  }
  impl_->ensure_connected(deadline, call, resolved);
}

void TcpStore::set(std::string_view key, std::string_view value, Timeout timeout) {
  store::check_key("set", key);
  store::check_value("set", key, value.size());
  Request r{Op::Set};
  r.idempotent = true;
  r.key = key;
  r.value = value;
  impl_->call(call_name("set", key), r, timeout);
}

std::string TcpStore::get(std::string_view key, Timeout timeout) {
  store::check_key("get", key);
  Request r{Op::Get};
  r.idempotent = r.waits = true;
  r.key = key;
  return std::move(impl_->call(call_name("get", key), r, timeout).value);
}

std::optional<std::string> TcpStore::try_get(std::string_view key, Timeout timeout) {
  store::check_key("try_get", key);
  Request r{Op::TryGet};
  r.idempotent = true;
  r.key = key;
  Reply reply = impl_->call(call_name("try_get", key), r, timeout);
  if (reply.header.status == ReplyStatus::NotFound) return std::nullopt;
  return std::move(reply.value);
}

int64_t TcpStore::add(std::string_view key, int64_t delta, Timeout timeout) {
  store::check_key("add", key);
  std::array<uint8_t, 8> d{};
  bytes::put_u64(d.data(), static_cast<uint64_t>(delta));
  Request r{Op::Add};
  r.key = key;
  r.value = std::string_view(reinterpret_cast<const char*>(d.data()), d.size());
  return impl_->call(call_name("add", key), r, timeout).header.number;
}

CompareSetResult TcpStore::compare_set(std::string_view key,
                                       const std::optional<std::string>& expected,
                                       std::string_view desired, Timeout timeout) {
  store::check_key("compare_set", key);
  store::check_value("compare_set", key, desired.size());
  if (expected) store::check_value("compare_set", key, expected->size());
  Request r{Op::CompareSet};
  r.key = key;
  if (expected) {
    r.flags = store::kHasExpected;
    r.value = *expected;
  }
  r.value2 = desired;
  Reply reply = impl_->call(call_name("compare_set", key), r, timeout);
  CompareSetResult result;
  result.swapped = (reply.header.flags & store::kSwapped) != 0;
  if (reply.header.flags & store::kHasValue) result.current = std::move(reply.value);
  return result;
}

void TcpStore::wait(const std::vector<std::string>& keys, Timeout timeout) {
  store::check_wait_keys(keys);
  std::string list;
  for (const auto& k : keys) {
    std::array<uint8_t, 4> len{};
    bytes::put_u32(len.data(), static_cast<uint32_t>(k.size()));
    list.append(reinterpret_cast<const char*>(len.data()), len.size()).append(k);
  }
  Request r{Op::Wait};
  r.idempotent = r.waits = true;
  r.key = list;
  r.key_count = static_cast<uint32_t>(keys.size());
  impl_->call(call_name("wait", keys), r, timeout);
}

bool TcpStore::remove(std::string_view key, Timeout timeout) {
  store::check_key("remove", key);
  Request r{Op::Remove};
  r.key = key;
  return impl_->call(call_name("remove", key), r, timeout).header.number != 0;
}

}  // namespace weft
