// Internal to the TCP transport (tcp_*.cc): the per-peer state and the
// data connection, which sends frames (inline or queued) and reads them
// (header, payload straight into a posted receive or a held buffer, control
// frames), taking every decision about an arriving message from the shared
// inbound path (inbound.h).
#pragma once

#include <fmt/format.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <memory>
#include <string>

#include "core/log.h"
#include "core/mutex.h"
#include "transport/tcp/tcp_transport.h"
#include "weft/errors.h"

namespace weft::transport::tcp {
inline constexpr size_t kReadBufferBytes = 16u << 10;
// Payload reads shorter than this go through the read buffer (which may
// also bring the next header in the same system call); longer ones are
// received straight into the destination.
inline constexpr size_t kDirectReadMin = 8u << 10;
// Frames handled per readiness event before yielding to other connections.
inline constexpr int kMaxFramesPerEvent = 256;

// Scratch for payloads that are read and dropped (after a failure).
inline thread_local uint8_t g_discard[16u << 10];

// ---------------------------------------------------------------------------
// Shared state per peer.

struct TcpTransport::Unexpected {
  MessageHeader header;
  HoldBuffers::Block data;
  bool complete = false;
};

// rank, mu, the match queues, failed, departed, failure: InboundPeer.
struct TcpTransport::Peer : InboundPeer<Unexpected> {
  std::vector<std::shared_ptr<Connection>> conns;
  int byes GUARDED_BY(mu) = 0;
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
      MutexLock lk(&send_mu_);
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
      MutexLock lk(&send_mu_);
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
      MutexLock lk(&send_mu_);
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
    MutexLock lk(&send_mu_);
    return sendq_.empty() || dead_;
  }

  // A receive was posted or unexpected bytes were freed: a paused
  // connection may go on (any thread).
  void resume_if_paused() {
    {
      MutexLock lk(&send_mu_);
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

  void update_events_locked() REQUIRES(send_mu_) {
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
      MutexLock lk(&send_mu_);
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
  // unexpected (the shared inbound path). Returns false when the
  // connection must pause.
  bool begin_data() {
    cur_req_.reset();
    cur_unexp_ = nullptr;
    auto a = t_.inbound_.arrive(
        peer_, [this] { return t_.host_of(peer_.rank); },
        MessageHeader{cur_.comm_id, cur_.tag, cur_.length, cur_.desc});
    if (a.what == Disposition::Pause) {
      // No room: stop reading this connection until a receive is posted.
      if (rstate_ != RState::Paused) {
        rstate_ = RState::Paused;
        MutexLock slk(&send_mu_);
        paused_ = true;
        update_events_locked();
      }
      return false;
    }
    discard_ = a.what == Disposition::Discard;
    if (a.what == Disposition::Deliver) {
      cur_req_ = std::move(a.req);
      target_ = static_cast<uint8_t*>(cur_req_->recv_data);
    } else if (a.what == Disposition::Hold) {
      cur_unexp_ = a.held;
      target_ = a.held->data.get();
    }
    if (rstate_ == RState::Paused) {
      MutexLock slk(&send_mu_);
      if (paused_) {
        paused_ = false;
        update_events_locked();
      }
    }
    rstate_ = RState::Payload;
    // A mismatch breaks the communicator on every rank.
    if (a.mismatch && t_.events_.on_mismatch) t_.events_.on_mismatch(a.mismatch);
    return true;
  }

  void finish_data() {
    rstate_ = RState::Header;
    if (cur_req_) {
      RequestPtr r = std::move(cur_req_);
      r->complete();
      t_.engine_.notify_completion();
    } else if (cur_unexp_) {
      Unexpected* u = cur_unexp_;
      cur_unexp_ = nullptr;
      t_.deliver_held(peer_, t_.inbound_.held_complete(peer_, u));
      t_.engine_.notify_completion();
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
  Mutex send_mu_;
  std::deque<SendOp> sendq_ GUARDED_BY(send_mu_);
  bool out_armed_ GUARDED_BY(send_mu_) = false;
  bool paused_ GUARDED_BY(send_mu_) = false;
  bool dead_ GUARDED_BY(send_mu_) = false;
  std::atomic<bool> broken_{false};
};

}  // namespace weft::transport::tcp
