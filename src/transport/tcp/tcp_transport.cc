#include "transport/tcp/tcp_transport.h"

#include <fmt/format.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include "core/bytes.h"
#include "core/log.h"
#include "weft/errors.h"

namespace weft::transport::tcp {
namespace {

constexpr size_t kReadBufferBytes = 16u << 10;
// Payload reads shorter than this go through the read buffer (which may
// also bring the next header in the same system call); longer ones are
// received straight into the destination.
constexpr size_t kDirectReadMin = 8u << 10;
// Frames handled per readiness event before yielding to other connections.
constexpr int kMaxFramesPerEvent = 256;

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

// Scratch for payloads that are read and dropped (after a failure).
thread_local uint8_t g_discard[16u << 10];

}  // namespace

// ---------------------------------------------------------------------------
// Shared state per peer.

struct TcpTransport::Unexpected {
  FrameHeader header;
  HoldBuffers::Block data;
  bool complete = false;
};

struct TcpTransport::Peer {
  int rank = -1;
  std::vector<std::shared_ptr<Connection>> conns;
  std::mutex mu;
  MatchQueues<Unexpected> q;  // GUARDED_BY(mu)
  bool failed = false;        // GUARDED_BY(mu)
  bool departed = false;      // GUARDED_BY(mu)
  int byes = 0;               // GUARDED_BY(mu)
  std::string failure;        // GUARDED_BY(mu)
};

// ---------------------------------------------------------------------------
// A data connection to one peer.

class TcpTransport::Connection : public Handler {
 public:
  Connection(TcpTransport& t, Peer& peer, int index, net::Fd fd)
      : t_(t),
        peer_(peer),
        index_(index),
        fd_(std::move(fd)),
        rbuf_(new uint8_t[kReadBufferBytes]) {}

  int fd() const { return fd_.get(); }
  int index() const { return index_; }

  void start() { t_.engine_.add(fd_.get(), EPOLLIN, shared_from_handler()); }

  void set_self(const std::shared_ptr<Connection>& self) { self_ = self; }

  void on_event(uint32_t events) override {
    if (events & EPOLLOUT) on_writable();
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable();
  }

  // ---- send side (any thread) ----

  // Queues (or writes inline) one frame; req may be null for control frames.
  // Returns false if the connection is dead (the caller fails the request).
  bool send(const RequestPtr& req, const FrameHeader& h, std::string control) {
    SendOp op;
    encode_frame_header(h, op.header.data());
    op.req = req;
    op.control = std::move(control);
    if (req) {
      op.payload = static_cast<const uint8_t*>(req->send_data);
      op.payload_bytes = req->bytes();
    } else {
      op.payload = reinterpret_cast<const uint8_t*>(op.control.data());
      op.payload_bytes = op.control.size();
    }
    bool queued = false;
    {
      std::lock_guard<std::mutex> lk(send_mu_);
      if (dead_) return false;
      if (sendq_.empty()) {
        int err = 0;
        int rc = write_op(op, &err);
        if (rc > 0) {
          if (req) req->complete();
          return true;
        }
        if (rc < 0) {
          // The reader will see the failure and report it in progress context.
          broken_ = true;
          ::shutdown(fd_.get(), SHUT_RDWR);
          return false;
        }
      }
      sendq_.push_back(std::move(op));
      queued = true;
      if (!out_armed_) {
        out_armed_ = true;
        update_events_locked();
      }
    }
    if (queued) t_.engine_.kick();
    return true;
  }

  // Fails queued sends (progress context). A frame already partly on the
  // wire cannot be taken back: the connection is then unusable.
  void fail_sends(const std::function<std::exception_ptr(const Request&)>& error_for) {
    std::vector<RequestPtr> failed;
    {
      std::lock_guard<std::mutex> lk(send_mu_);
      std::deque<SendOp> keep;
      for (auto& op : sendq_) {
        if (!op.req) {
          keep.push_back(std::move(op));
          continue;
        }
        if (op.offset > 0) {
          // Partly written: the rest must not be read from the caller's buffer any more.
          dead_ = true;
          ::shutdown(fd_.get(), SHUT_RDWR);
        }
        failed.push_back(op.req);
      }
      sendq_ = dead_ ? std::deque<SendOp>() : std::move(keep);
    }
    for (auto& r : failed) r->fail(error_for(*r));
  }

  // Marks the connection dead (progress context): no more reads or writes.
  void kill(const std::function<std::exception_ptr(const Request&)>& error_for) {
    std::vector<RequestPtr> failed;
    {
      std::lock_guard<std::mutex> lk(send_mu_);
      dead_ = true;
      for (auto& op : sendq_) {
        if (op.req) failed.push_back(op.req);
      }
      sendq_.clear();
    }
    rstate_ = RState::Dead;
    if (cur_req_) {
      failed.push_back(cur_req_);
      cur_req_.reset();
    }
    ::shutdown(fd_.get(), SHUT_RDWR);
    t_.engine_.remove(fd_.get());
    for (auto& r : failed) r->fail(error_for(*r));
  }

  // Fails the receive being filled (progress context) and drops the rest of
  // its payload.
  void fail_current_receive(const std::exception_ptr& error) {
    if (rstate_ != RState::Payload) return;
    // An early message being read into an internal buffer: the buffer goes
    // away with the unexpected queue, so the rest is dropped too.
    cur_unexp_ = nullptr;
    discard_ = true;
    if (cur_req_) {
      RequestPtr r = std::move(cur_req_);
      r->fail(error);
    }
  }

  bool send_idle() {
    std::lock_guard<std::mutex> lk(send_mu_);
    return sendq_.empty() || dead_;
  }

  // A receive was posted or unexpected bytes were freed: a paused
  // connection may go on (any thread).
  void resume_if_paused() {
    {
      std::lock_guard<std::mutex> lk(send_mu_);
      if (!paused_) return;
      paused_ = false;
      update_events_locked();
    }
    // The paused header is already read: go on even if no new bytes arrive.
    std::weak_ptr<Connection> weak = self_;
    t_.engine_.post([weak] {
      if (auto c = weak.lock()) c->on_readable();
    });
  }

 private:
  struct SendOp {
    RequestPtr req;
    std::array<uint8_t, kFrameHeaderBytes> header{};
    std::string control;
    const uint8_t* payload = nullptr;
    size_t payload_bytes = 0;
    size_t offset = 0;  // bytes of header + payload already written
  };

  enum class RState { Header, Payload, Control, Paused, Dead };

  std::shared_ptr<Handler> shared_from_handler() { return self_.lock(); }

  void update_events_locked() {
    uint32_t ev = (paused_ ? 0u : static_cast<uint32_t>(EPOLLIN)) |
                  (out_armed_ ? static_cast<uint32_t>(EPOLLOUT) : 0u);
    t_.engine_.modify(fd_.get(), ev);
  }

  // 1: the whole frame is written; 0: the socket is full; -1: error (*err).
  int write_op(SendOp& op, int* err) {
    const size_t total = kFrameHeaderBytes + op.payload_bytes;
    while (op.offset < total) {
      iovec iov[2];
      int n = 0;
      if (op.offset < kFrameHeaderBytes) {
        iov[n++] = {op.header.data() + op.offset, kFrameHeaderBytes - op.offset};
        if (op.payload_bytes > 0) iov[n++] = {const_cast<uint8_t*>(op.payload), op.payload_bytes};
      } else {
        size_t off = op.offset - kFrameHeaderBytes;
        iov[n++] = {const_cast<uint8_t*>(op.payload) + off, op.payload_bytes - off};
      }
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<size_t>(n);
      ssize_t w = ::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w > 0) {
        op.offset += static_cast<size_t>(w);
        continue;
      }
      if (w < 0 && errno == EINTR) continue;
      if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
      *err = w < 0 ? errno : EPIPE;
      return -1;
    }
    return 1;
  }

  void on_writable() {
    std::vector<RequestPtr> done;
    int err = 0;
    bool failed = false;
    {
      std::lock_guard<std::mutex> lk(send_mu_);
      while (!sendq_.empty() && !dead_) {
        int rc = write_op(sendq_.front(), &err);
        if (rc == 0) break;
        if (rc < 0) {
          failed = true;
          break;
        }
        if (sendq_.front().req) done.push_back(std::move(sendq_.front().req));
        sendq_.pop_front();
      }
      if ((sendq_.empty() || dead_) && out_armed_) {
        out_armed_ = false;
        update_events_locked();
      }
    }
    for (auto& r : done) r->complete();
    if (!done.empty()) t_.engine_.notify_completion();
    if (failed) fail(fmt::format("send failed: {}", net::errno_string(err)));
  }

  // Reads into the read buffer; false when nothing more can be read now (or
  // the connection failed).
  bool fill_rbuf() {
    if (rbeg_ > 0) {
      std::memmove(rbuf_.get(), rbuf_.get() + rbeg_, rend_ - rbeg_);
      rend_ -= rbeg_;
      rbeg_ = 0;
    }
    for (;;) {
      ssize_t r = ::recv(fd_.get(), rbuf_.get() + rend_, kReadBufferBytes - rend_, 0);
      if (r > 0) {
        rend_ += static_cast<size_t>(r);
        return true;
      }
      if (r == 0) {
        on_eof();
        return false;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
      fail(fmt::format("receive failed: {}", net::errno_string(errno)));
      return false;
    }
  }

  void on_eof() {
    if (bye_) {
      rstate_ = RState::Dead;
      t_.engine_.remove(fd_.get());
      return;
    }
    fail(broken_ ? "connection broken while sending"
                 : "connection closed by the peer (process died?)");
  }

  void fail(const std::string& reason) {
    if (rstate_ == RState::Dead) return;
    t_.peer_failed(peer_, reason, true);
  }

  void protocol_violation(const std::string& why) {
    WEFT_ERROR("protocol violation by rank {} ({}): {}; closing its connections", peer_.rank,
               t_.host_of(peer_.rank), why);
    fail("protocol violation: " + why);
  }

  void on_readable() {
    for (int frames = 0; frames < kMaxFramesPerEvent;) {
      switch (rstate_) {
        case RState::Dead: return;
        case RState::Paused:
          if (!begin_data()) return;
          continue;
        case RState::Header: {
          if (rend_ - rbeg_ < kFrameHeaderBytes) {
            if (!fill_rbuf()) return;
            continue;
          }
          std::string why;
          if (!decode_frame_header(rbuf_.get() + rbeg_, &cur_, &why)) {
            protocol_violation(why);
            return;
          }
          if (cur_.generation != t_.options_.generation) {
            protocol_violation(
                fmt::format("frame of generation {} (this communicator is generation {})",
                            cur_.generation, t_.options_.generation));
            return;
          }
          if (cur_.src_rank != static_cast<uint32_t>(peer_.rank)) {
            protocol_violation(fmt::format("frame claims to come from rank {}", cur_.src_rank));
            return;
          }
          rbeg_ += kFrameHeaderBytes;
          ++frames;
          got_ = 0;
          if (cur_.type == FrameType::Data) {
            if (!begin_data()) return;
          } else {
            control_.clear();
            rstate_ = RState::Control;
          }
          continue;
        }
        case RState::Control: {
          size_t need = cur_.length - control_.size();
          size_t avail = std::min(need, rend_ - rbeg_);
          control_.append(reinterpret_cast<char*>(rbuf_.get() + rbeg_), avail);
          rbeg_ += avail;
          if (control_.size() < cur_.length) {
            if (!fill_rbuf()) return;
            continue;
          }
          rstate_ = RState::Header;
          handle_control();
          continue;
        }
        case RState::Payload: {
          size_t need = cur_.length - got_;
          size_t avail = std::min(need, rend_ - rbeg_);
          if (avail > 0) {
            if (!discard_) std::memcpy(target_ + got_, rbuf_.get() + rbeg_, avail);
            got_ += avail;
            rbeg_ += avail;
            need -= avail;
          }
          if (need == 0) {
            finish_data();
            continue;
          }
          if (need < kDirectReadMin || discard_) {
            if (discard_) {
              ssize_t r = ::recv(fd_.get(), g_discard, std::min(need, sizeof g_discard), 0);
              if (!after_recv(r)) return;
              continue;
            }
            if (!fill_rbuf()) return;
            continue;
          }
          ssize_t r = ::recv(fd_.get(), target_ + got_, need, 0);
          if (!after_recv(r)) return;
          continue;
        }
      }
    }
  }

  // Accounts a direct recv; false when reading must stop for now.
  bool after_recv(ssize_t r) {
    if (r > 0) {
      got_ += static_cast<size_t>(r);
      return true;
    }
    if (r == 0) {
      on_eof();
      return false;
    }
    if (errno == EINTR) return true;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
    fail(fmt::format("receive failed: {}", net::errno_string(errno)));
    return false;
  }

  // Matches the current data header with a posted receive, or holds it as
  // unexpected. Returns false when the connection must pause.
  bool begin_data() {
    discard_ = false;
    cur_req_.reset();
    cur_unexp_ = nullptr;
    std::exception_ptr mismatch_error;
    RequestPtr mismatched;
    {
      std::lock_guard<std::mutex> lk(peer_.mu);
      if (peer_.failed || t_.first_error_.failed()) {
        discard_ = true;
      } else {
        cur_req_ = peer_.q.take_posted(cur_.comm_id, cur_.tag);
        if (cur_req_) {
          mismatch_error = t_.mismatch(peer_, *cur_req_, cur_);
          if (mismatch_error) {
            mismatched = std::move(cur_req_);
            discard_ = true;
          } else {
            target_ = static_cast<uint8_t*>(cur_req_->recv_data);
          }
        } else if (!discard_) {
          if (peer_.q.unexpected_bytes + cur_.length > t_.options_.max_unexpected_bytes &&
              cur_.length > 0) {
            // No room: stop reading this connection until a receive is posted.
            if (rstate_ != RState::Paused) {
              rstate_ = RState::Paused;
              std::lock_guard<std::mutex> slk(send_mu_);
              paused_ = true;
              update_events_locked();
            }
            return false;
          }
          auto u = std::make_unique<Unexpected>();
          u->header = cur_;
          u->data = t_.holds_.get(cur_.length);
          target_ = u->data.get();
          cur_unexp_ = u.get();
          peer_.q.unexpected_bytes += cur_.length;
          peer_.q.unexpected.push_back(std::move(u));
        }
      }
    }
    if (cur_unexp_ && cur_.desc.kind != 0 && t_.events_.check_unexpected) {
      // A collective's message that no receive waits for yet: it must agree
      // with the collective of that number if this rank is running it.
      mismatch_error = t_.events_.check_unexpected(peer_.rank, cur_);
      if (mismatch_error) {
        cur_unexp_ = nullptr;
        discard_ = true;
      }
    }
    if (rstate_ == RState::Paused) {
      std::lock_guard<std::mutex> slk(send_mu_);
      if (paused_) {
        paused_ = false;
        update_events_locked();
      }
    }
    rstate_ = RState::Payload;
    if (mismatched) {
      mismatched->fail(mismatch_error);
      t_.engine_.notify_completion();
    }
    // A mismatch breaks the communicator on every rank.
    if (mismatch_error && t_.events_.on_mismatch) t_.events_.on_mismatch(mismatch_error);
    return true;
  }

  void finish_data() {
    rstate_ = RState::Header;
    if (cur_req_) {
      RequestPtr r = std::move(cur_req_);
      r->complete();
      t_.engine_.notify_completion();
    } else if (cur_unexp_) {
      std::vector<std::exception_ptr> mismatches;
      {
        std::lock_guard<std::mutex> lk(peer_.mu);
        cur_unexp_->complete = true;
        cur_unexp_ = nullptr;
        mismatches = t_.deliver_unexpected_locked(peer_);
      }
      t_.engine_.notify_completion();
      for (auto& e : mismatches) {
        if (t_.events_.on_mismatch) t_.events_.on_mismatch(e);
      }
    }
    discard_ = false;
  }

  void handle_control() {
    if (cur_.type == FrameType::Bye) {
      bye_ = true;
      t_.peer_said_bye(peer_);
      return;
    }
    if (cur_.type == FrameType::Abort) {
      int failed_rank = cur_.tag == ~0ull ? -1 : static_cast<int>(cur_.tag);
      if (t_.events_.on_abort) {
        t_.events_.on_abort(peer_.rank, static_cast<AbortKind>(cur_.flags), failed_rank, control_);
      }
    }
  }

  TcpTransport& t_;
  Peer& peer_;
  const int index_;
  net::Fd fd_;
  std::weak_ptr<Connection> self_;

  // Read state: touched only by the progress owner.
  RState rstate_ = RState::Header;
  std::unique_ptr<uint8_t[]> rbuf_;
  size_t rbeg_ = 0;
  size_t rend_ = 0;
  FrameHeader cur_;
  uint8_t* target_ = nullptr;
  size_t got_ = 0;
  RequestPtr cur_req_;
  Unexpected* cur_unexp_ = nullptr;
  bool discard_ = false;
  bool bye_ = false;
  std::string control_;

  // Send state.
  std::mutex send_mu_;
  std::deque<SendOp> sendq_;  // GUARDED_BY(send_mu_)
  bool out_armed_ = false;    // GUARDED_BY(send_mu_)
  bool paused_ = false;       // GUARDED_BY(send_mu_)
  bool dead_ = false;         // GUARDED_BY(send_mu_)
  std::atomic<bool> broken_{false};
};

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
                         Deadline::after(std::chrono::seconds(1)), &err);
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
    : engine_(engine), options_(std::move(options)), events_(std::move(events)) {
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
    std::lock_guard<std::mutex> lk(mesh_mu_);
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
  std::lock_guard<std::mutex> lk(hosts_mu_);
  const std::string& h = hosts_[static_cast<size_t>(rank)];
  return h.empty() ? "?" : h;
}

void TcpTransport::on_accepted(net::Fd fd, std::string remote) {
  net::set_nodelay(fd.get());
  auto acc = std::make_shared<Acceptor>(*this, std::move(fd), std::move(remote));
  acc->set_self(acc);
  {
    std::lock_guard<std::mutex> lk(mesh_mu_);
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
  std::lock_guard<std::mutex> lk(mesh_mu_);
  if (peers_[c.src]->conns[c.index]) {
    return fmt::format("duplicate connection {} from rank {}", c.index, c.src);
  }
  return "";
}

void TcpTransport::on_handshake_done(Acceptor* acceptor, bool ok) {
  std::shared_ptr<Acceptor> acc;
  {
    std::lock_guard<std::mutex> lk(mesh_mu_);
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
    std::lock_guard<std::mutex> lk(mesh_mu_);
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
    std::lock_guard<std::mutex> lk(hosts_mu_);
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
      auto backoff = std::chrono::milliseconds(10);
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
        backoff = std::min(backoff * 2, std::chrono::milliseconds(200));
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
      std::lock_guard<std::mutex> lk(mesh_mu_);
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

TcpTransport::Connection* TcpTransport::connection_for(Peer& peer, uint64_t tag) {
  size_t k = peer.conns.size();
  size_t idx = k == 1 ? 0 : static_cast<size_t>((tag ^ (tag >> 29) ^ (tag >> 47)) % k);
  return peer.conns[idx].get();
}

std::exception_ptr TcpTransport::peer_error(const Peer& peer, const std::string& reason) const {
  return std::make_exception_ptr(
      PeerError(fmt::format("rank {} (host {}) {}", peer.rank, host_of(peer.rank), reason),
                peer.rank, host_of(peer.rank), ""));
}

void TcpTransport::isend(const RequestPtr& req) {
  if (first_error_.failed()) {
    req->fail(first_error_.get());
    return;
  }
  Peer& peer = *peers_[static_cast<size_t>(req->peer())];
  {
    std::lock_guard<std::mutex> lk(peer.mu);
    if (peer.failed || peer.departed) {
      req->fail(request_peer_error(*req, host_of(peer.rank),
                                   peer.failed ? peer.failure : "has closed its communicator"));
      return;
    }
  }
  FrameHeader h;
  h.type = FrameType::Data;
  h.generation = options_.generation;
  h.src_rank = static_cast<uint32_t>(options_.rank);
  h.comm_id = req->comm_id();
  h.tag = req->tag();
  h.length = req->bytes();
  h.desc = req->desc;
  Connection* c = connection_for(peer, req->tag());
  if (c == nullptr || !c->send(req, h, {})) {
    req->fail(std::make_exception_ptr(
        PeerError(fmt::format("{}: connection to rank {} (host {}) is broken", req->describe(),
                              peer.rank, host_of(peer.rank)),
                  peer.rank, host_of(peer.rank), req->op_name)));
  }
  engine_.wake();
}

void TcpTransport::irecv(const RequestPtr& req) {
  if (first_error_.failed()) {
    req->fail(first_error_.get());
    return;
  }
  Peer& peer = *peers_[static_cast<size_t>(req->peer())];
  std::unique_ptr<Unexpected> matched;
  {
    std::lock_guard<std::mutex> lk(peer.mu);
    // A message that arrived before the receive was posted (possibly before the peer left).
    matched = peer.q.take_unexpected(*req);
    if (!matched && (peer.failed || peer.departed)) {
      req->fail(request_peer_error(*req, host_of(peer.rank),
                                   peer.failed ? peer.failure : "has closed its communicator"));
      return;
    }
    if (!matched) peer.q.posted.push_back(req);
  }
  if (matched) {
    if (auto err = mismatch(peer, *req, matched->header)) {
      req->fail(err);
      if (events_.on_mismatch) {
        engine_.run_in_progress([this, err] { events_.on_mismatch(err); },
                                Deadline::after(std::chrono::seconds(5)));
      }
    } else {
      if (req->bytes() > 0) std::memcpy(req->recv_data, matched->data.get(), req->bytes());
      holds_.put(std::move(matched->data));
      req->complete();
    }
  }
  for (auto& c : peer.conns) {
    if (c) c->resume_if_paused();
  }
  engine_.wake();
}

std::vector<std::exception_ptr> TcpTransport::deliver_unexpected_locked(Peer& peer) {
  std::vector<std::exception_ptr> mismatches;
  // For each posted receive (oldest first), the oldest unexpected message
  // with its key may now be complete.
  for (auto& [req, u] : peer.q.take_deliverable()) {
    if (auto err = mismatch(peer, *req, u->header)) {
      req->fail(err);
      mismatches.push_back(err);
    } else {
      if (req->bytes() > 0) std::memcpy(req->recv_data, u->data.get(), req->bytes());
      holds_.put(std::move(u->data));
      req->complete();
    }
  }
  return mismatches;
}

std::exception_ptr TcpTransport::find_conflict(uint64_t comm_id, const OpDesc& desc) {
  for (auto& p : peers_) {
    if (p->rank == options_.rank) continue;
    std::lock_guard<std::mutex> lk(p->mu);
    if (const Unexpected* u = p->q.find_conflict(comm_id, desc)) {
      return mismatch_error(options_.rank, desc, 0, p->rank, host_of(p->rank), u->header.desc,
                            u->header.length, events_.describe_op);
    }
  }
  return nullptr;
}

std::exception_ptr TcpTransport::mismatch(const Peer& peer, const Request& req,
                                          const FrameHeader& h) const {
  return check_match(options_.rank, peer.rank, host_of(peer.rank), req, h, events_.describe_op);
}

void TcpTransport::peer_failed(Peer& peer, const std::string& reason, bool report) {
  std::vector<RequestPtr> failed;
  {
    std::lock_guard<std::mutex> lk(peer.mu);
    if (peer.failed) return;
    peer.failed = true;
    peer.failure = reason;
    failed = peer.q.clear();
  }
  auto error_for = [&](const Request& r) {
    return request_peer_error(r, host_of(peer.rank), "failed: " + reason);
  };
  for (auto& c : peer.conns) {
    if (c) c->kill(error_for);
  }
  for (auto& r : failed) r->fail(error_for(*r));
  engine_.wake();
  if (report && !first_error_.failed() && events_.on_peer_failure) {
    events_.on_peer_failure(peer.rank, peer_error(peer, "failed: " + reason));
  }
}

void TcpTransport::peer_said_bye(Peer& peer) {
  bool pending = false;
  {
    std::lock_guard<std::mutex> lk(peer.mu);
    // Data sent before the goodbye precedes it on each connection: the peer
    // has left once every one of its connections said goodbye.
    if (++peer.byes < static_cast<int>(peer.conns.size())) return;
    peer.departed = true;
    pending = !peer.q.posted.empty();
  }
  WEFT_DEBUG("rank {} closed its communicator", peer.rank);
  if (events_.on_peer_departed) events_.on_peer_departed(peer.rank);
  if (pending)
    peer_failed(peer, "closed its communicator while operations with it were pending", true);
}

void TcpTransport::fail_all(std::exception_ptr error) {
  first_error_.set(error);
  // Runs on the progress thread, so that no handler is filling a buffer of a
  // request while it fails; returns once done (by this call or an earlier one).
  engine_.run_in_progress([this] { fail_all_in_progress(); },
                          Deadline::after(std::chrono::seconds(30)));
}

void TcpTransport::fail_all_in_progress() {
  if (fail_done_) return;
  const std::exception_ptr error = first_error_.get();
  auto error_for = [&](const Request&) { return error; };
  for (auto& p : peers_) {
    std::vector<RequestPtr> failed;
    {
      std::lock_guard<std::mutex> lk(p->mu);
      failed = p->q.clear();
    }
    for (auto& c : p->conns) {
      if (!c) continue;
      c->fail_current_receive(error);
      c->fail_sends(error_for);
      c->resume_if_paused();
    }
    for (auto& r : failed) r->fail(error);
  }
  fail_done_ = true;
  engine_.wake();
}

void TcpTransport::broadcast_abort(AbortKind kind, int failed_rank, const std::string& reason) {
  FrameHeader h;
  h.type = FrameType::Abort;
  h.flags = static_cast<uint16_t>(kind);
  h.generation = options_.generation;
  h.src_rank = static_cast<uint32_t>(options_.rank);
  h.tag = failed_rank < 0 ? ~0ull : static_cast<uint64_t>(failed_rank);
  std::string text = reason.substr(0, kMaxControlBytes);
  h.length = text.size();
  for (auto& p : peers_) {
    if (p->rank == options_.rank) continue;
    {
      std::lock_guard<std::mutex> lk(p->mu);
      if (p->failed || p->departed) continue;
    }
    if (p->conns.empty() || !p->conns[0]) continue;
    p->conns[0]->send(nullptr, h, text);
  }
}

void TcpTransport::close(const Deadline& deadline) {
  FrameHeader h;
  h.type = FrameType::Bye;
  h.generation = options_.generation;
  h.src_rank = static_cast<uint32_t>(options_.rank);
  for (auto& p : peers_) {
    if (p->rank == options_.rank) continue;
    for (auto& c : p->conns) {
      if (c) c->send(nullptr, h, {});
    }
  }
  engine_.wait(
      [&] {
        for (auto& p : peers_) {
          for (auto& c : p->conns) {
            if (c && !c->send_idle()) return false;
          }
        }
        return true;
      },
      deadline);
}

}  // namespace weft::transport::tcp
