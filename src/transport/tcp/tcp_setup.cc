// The TCP transport, set-up: listening, accepting and authenticating
// connections (server side of the handshake), connecting the full mesh.
#include <thread>

#include "core/bytes.h"
#include "transport/tcp/connection.h"

namespace weft::transport::tcp {
namespace {

// How long the server side of a handshake may block writing its reply (a
// few dozen bytes into the empty socket buffer of a fresh connection: it
// never waits unless the client stopped reading, a stranger not worth more).
constexpr auto kHandshakeReplyLimit = std::chrono::seconds(1);
// Retrying a refused connect (the peer is not listening yet): from 10 ms,
// doubling up to 200 ms, so that a mesh forms fast when ranks start
// together, without hammering a peer that starts late.
constexpr auto kConnectBackoffMin = std::chrono::milliseconds(10);
constexpr auto kConnectBackoffMax = std::chrono::milliseconds(200);

// Handshake context of a data connection: who connects to whom, in which
// world and generation.
struct HelloContext {
  uint64_t world_id = 0;
  uint32_t generation = 0;
  uint32_t src = 0;
  uint32_t dst = 0;
  uint32_t index = 0;
  uint32_t size = 0;
};

auth::Context encode_context(const HelloContext& c) {
  auth::Context ctx{};
  bytes::put_u64(&ctx[0], c.world_id);
  bytes::put_u32(&ctx[8], c.generation);
  bytes::put_u32(&ctx[12], c.src);
  bytes::put_u32(&ctx[16], c.dst);
  bytes::put_u32(&ctx[20], c.index);
  bytes::put_u32(&ctx[24], c.size);
  return ctx;
}

HelloContext decode_context(const auth::Context& ctx) {
  HelloContext c;
  c.world_id = bytes::get_u64(&ctx[0]);
  c.generation = bytes::get_u32(&ctx[8]);
  c.src = bytes::get_u32(&ctx[12]);
  c.dst = bytes::get_u32(&ctx[16]);
  c.index = bytes::get_u32(&ctx[20]);
  c.size = bytes::get_u32(&ctx[24]);
  return c;
}

bool transient_connect_error(int err) {
  return err == ECONNREFUSED || err == ECONNRESET || err == ENETUNREACH || err == EHOSTUNREACH ||
         err == EAGAIN || err == EINTR;
}

}  // namespace

// ---------------------------------------------------------------------------
// Accepting connections and running the server side of the handshake.

class TcpTransport::Listener : public Handler {
 public:
  explicit Listener(TcpTransport& t) : t_(t) {}
  void on_event(uint32_t) override {
    for (;;) {
      sockaddr_storage ss{};
      socklen_t len = sizeof ss;
      int fd = ::accept4(t_.listen_fd_.get(), reinterpret_cast<sockaddr*>(&ss), &len,
                         SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
          WEFT_WARN("accept on {}: {}", t_.listen_address_, net::errno_string(errno));
        }
        return;
      }
      net::SocketAddress a;
      std::memcpy(&a.storage, &ss, len);
      a.length = len;
      t_.on_accepted(net::Fd(fd), a.to_string());
    }
  }

 private:
  TcpTransport& t_;
};

class TcpTransport::Acceptor : public Handler {
 public:
  Acceptor(TcpTransport& t, net::Fd fd, std::string remote)
      : t_(t),
        fd_(std::move(fd)),
        remote_(std::move(remote)),
        hs_(t.options_.credentials, auth::Kind::Transport,
            [&t](const auth::Hello& h) { return t.check_hello(h); }) {}

  int fd() const { return fd_.get(); }
  const std::string& remote() const { return remote_; }
  net::Fd take_fd() { return std::move(fd_); }
  const auth::ServerHandshake& handshake() const { return hs_; }
  bool finished() const { return finished_; }
  void set_self(const std::shared_ptr<Acceptor>& self) { self_ = self; }

  void on_event(uint32_t) override {
    if (finished_) return;
    for (;;) {
      size_t want = hs_.want();
      if (buf_.size() != want) buf_.resize(want);
      ssize_t r = ::recv(fd_.get(), buf_.data() + have_, want - have_, 0);
      if (r > 0) {
        have_ += static_cast<size_t>(r);
        if (have_ < want) continue;
        have_ = 0;
        auto reply = hs_.feed(buf_);
        if (!reply.empty()) {
          int err = 0;
          net::write_all(fd_.get(), reply.data(), reply.size(),
                         Deadline::after(kHandshakeReplyLimit), &err);
        }
        if (hs_.done()) {
          finish(hs_.accepted());
          return;
        }
        continue;
      }
      if (r == 0) {
        reject(fmt::format("closed the connection during the handshake ({} of {} bytes of its {})",
                           have_, hs_.want(), hs_.want() == auth::kHelloBytes ? "hello" : "proof"));
        return;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      reject(fmt::format("handshake read failed: {}", net::errno_string(errno)));
      return;
    }
  }

  void timeout() {
    if (!finished_) reject("did not complete the handshake in time");
  }

 private:
  void reject(const std::string& why) {
    error_ = why;
    finish(false);
  }
  void finish(bool ok) {
    finished_ = true;
    if (!ok && error_.empty()) error_ = hs_.error();
    if (!ok) {
      WEFT_LOG_LIMITED(log::Level::Error, "refused connections",
                       "refused connection from {} on {}: {}", remote_, t_.listen_address_, error_);
    }
    t_.on_handshake_done(this, ok);
  }

  TcpTransport& t_;
  net::Fd fd_;
  std::string remote_;
  auth::ServerHandshake hs_;
  std::vector<uint8_t> buf_;
  size_t have_ = 0;
  bool finished_ = false;
  std::string error_;
  std::weak_ptr<Acceptor> self_;
};

// ---------------------------------------------------------------------------

TcpTransport::TcpTransport(Engine& engine, TcpOptions options, TcpEvents events)
    : engine_(engine),
      options_(std::move(options)),
      events_(std::move(events)),
      inbound_(engine_, options_.rank, options_.max_unexpected_bytes, events_, first_error_) {
  if (options_.sockets_per_peer < 1) options_.sockets_per_peer = 1;
  peers_.resize(static_cast<size_t>(options_.size));
  for (int r = 0; r < options_.size; ++r) {
    peers_[static_cast<size_t>(r)] = std::make_unique<Peer>();
    peers_[static_cast<size_t>(r)]->rank = r;
    peers_[static_cast<size_t>(r)]->conns.resize(static_cast<size_t>(options_.sockets_per_peer));
  }
  hosts_.assign(static_cast<size_t>(options_.size), "");
  auto addrs = net::resolve(options_.listen_ip, 0, true);
  listen_fd_ = net::listen_tcp(addrs.front());
  auto local = net::local_address(listen_fd_.get());
  listen_address_ = local.to_string();
  listener_ = std::make_shared<Listener>(*this);
  engine_.add(listen_fd_.get(), EPOLLIN, listener_);
}

TcpTransport::~TcpTransport() {
  engine_.remove(listen_fd_.get());
  {
    MutexLock lk(&mesh_mu_);
    for (auto& a : acceptors_) engine_.remove(a->fd());
    acceptors_.clear();
  }
  for (auto& p : peers_) {
    for (auto& c : p->conns) {
      if (c) engine_.remove(c->fd());
    }
  }
}

std::string TcpTransport::listen_address() const { return listen_address_; }

std::string TcpTransport::host_of(int rank) const {
  if (rank < 0 || rank >= options_.size) return "?";
  MutexLock lk(&hosts_mu_);
  const std::string& h = hosts_[static_cast<size_t>(rank)];
  return h.empty() ? "?" : h;
}

void TcpTransport::on_accepted(net::Fd fd, std::string remote) {
  net::set_nodelay(fd.get());
  auto acc = std::make_shared<Acceptor>(*this, std::move(fd), std::move(remote));
  acc->set_self(acc);
  {
    MutexLock lk(&mesh_mu_);
    acceptors_.push_back(acc);
  }
  engine_.add(acc->fd(), EPOLLIN, acc);
  std::weak_ptr<Acceptor> weak = acc;
  engine_.add_timer(Deadline::after(options_.handshake_timeout), [weak] {
    if (auto a = weak.lock()) a->timeout();
  });
}

std::string TcpTransport::check_hello(const auth::Hello& hello) {
  HelloContext c = decode_context(hello.context);
  if (c.world_id != options_.world_id) {
    return fmt::format("belongs to another job or communicator (world id {:016x}, ours {:016x})",
                       c.world_id, options_.world_id);
  }
  if (c.generation != options_.generation) {
    return fmt::format("is of generation {} but this communicator is generation {} (stale peer)",
                       c.generation, options_.generation);
  }
  if (c.size != static_cast<uint32_t>(options_.size) ||
      c.dst != static_cast<uint32_t>(options_.rank) || c.src >= c.size ||
      c.src <= static_cast<uint32_t>(options_.rank)) {
    return fmt::format("has inconsistent ranks (from {} to {} of {}; this is rank {} of {})", c.src,
                       c.dst, c.size, options_.rank, options_.size);
  }
  if (c.index >= static_cast<uint32_t>(options_.sockets_per_peer)) {
    return fmt::format("connection index {} out of range (sockets per peer: {})", c.index,
                       options_.sockets_per_peer);
  }
  MutexLock lk(&mesh_mu_);
  if (peers_[c.src]->conns[c.index]) {
    return fmt::format("duplicate connection {} from rank {}", c.index, c.src);
  }
  return "";
}

void TcpTransport::on_handshake_done(Acceptor* acceptor, bool ok) {
  std::shared_ptr<Acceptor> acc;
  {
    MutexLock lk(&mesh_mu_);
    auto it = std::find_if(acceptors_.begin(), acceptors_.end(),
                           [&](const auto& a) { return a.get() == acceptor; });
    if (it == acceptors_.end()) return;
    acc = *it;
    acceptors_.erase(it);
  }
  engine_.remove(acc->fd());
  if (!ok) return;  // the fd closes with the acceptor
  HelloContext c = decode_context(acc->handshake().hello().context);
  attach(static_cast<int>(c.src), static_cast<int>(c.index), acc->take_fd());
}

void TcpTransport::attach(int peer_rank, int index, net::Fd fd) {
  net::set_nodelay(fd.get());
  net::set_keepalive(fd.get());
  net::set_buffer_sizes(fd.get(), options_.socket_buffer_bytes);
  Peer& peer = *peers_[static_cast<size_t>(peer_rank)];
  auto conn = std::make_shared<Connection>(*this, peer, index, std::move(fd));
  conn->set_self(conn);
  {
    MutexLock lk(&mesh_mu_);
    peer.conns[static_cast<size_t>(index)] = conn;
  }
  conn->start();
  connections_ready_.fetch_add(1);
  engine_.wake();
  WEFT_DEBUG("connected to rank {} (socket {})", peer_rank, index);
}

void TcpTransport::connect_all(const std::vector<std::string>& addresses,
                               const std::vector<std::string>& hosts, const Deadline& deadline) {
  {
    MutexLock lk(&hosts_mu_);
    hosts_ = hosts;
    hosts_.resize(static_cast<size_t>(options_.size));
  }
  const int k = options_.sockets_per_peer;
  for (int j = 0; j < options_.rank; ++j) {
    auto [host, port] = net::split_host_port(addresses[static_cast<size_t>(j)],
                                             fmt::format("address of rank {}", j));
    auto addr = net::resolve(host, port).front();
    std::string who = fmt::format("rank {} at {}", j, addr.to_string());
    for (int idx = 0; idx < k; ++idx) {
      net::Fd fd;
      int err = 0;
      std::chrono::milliseconds backoff = kConnectBackoffMin;
      for (;;) {
        fd = net::connect_tcp(addr, deadline, &err);
        if (fd.valid()) break;
        if (!transient_connect_error(err) || deadline.expired()) {
          if (deadline.expired() || err == ETIMEDOUT) {
            throw TimeoutError(
                fmt::format("rank {}: timed out connecting to {}", options_.rank, who), j,
                "connect");
          }
          throw PeerError(fmt::format("rank {}: cannot connect to {}: {}", options_.rank, who,
                                      net::errno_string(err)),
                          j, host_of(j), "connect");
        }
        std::this_thread::sleep_for(
            std::min<std::chrono::nanoseconds>(backoff, deadline.remaining()));
        backoff = std::min(backoff * 2, kConnectBackoffMax);
      }
      HelloContext c;
      c.world_id = options_.world_id;
      c.generation = options_.generation;
      c.src = static_cast<uint32_t>(options_.rank);
      c.dst = static_cast<uint32_t>(j);
      c.index = static_cast<uint32_t>(idx);
      c.size = static_cast<uint32_t>(options_.size);
      auth::client_handshake(fd.get(), auth::Kind::Transport, encode_context(c),
                             options_.credentials, deadline, who);
      attach(j, idx, std::move(fd));
    }
  }
  const int expected = (options_.size - 1) * k;
  bool ok = engine_.wait([&] { return connections_ready_.load() >= expected; }, deadline);
  if (!ok) {
    std::string missing;
    {
      MutexLock lk(&mesh_mu_);
      for (int r = options_.rank + 1; r < options_.size; ++r) {
        for (auto& c : peers_[static_cast<size_t>(r)]->conns) {
          if (!c) {
            missing += (missing.empty() ? "" : ", ") + std::to_string(r);
            break;
          }
        }
      }
    }
    throw TimeoutError(
        fmt::format("rank {}: timed out waiting for ranks {} to connect", options_.rank, missing),
        -1, "connect");
  }
}

}  // namespace weft::transport::tcp

namespace weft::transport {

std::unique_ptr<MeshTransport> make_tcp_transport(Engine& engine, TcpOptions options,
                                                  TransportEvents events) {
  return std::make_unique<tcp::TcpTransport>(engine, std::move(options), std::move(events));
}

}  // namespace weft::transport
