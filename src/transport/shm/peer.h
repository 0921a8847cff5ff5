// Internal to the shared-memory transport (shm_*.cc): the per-peer state
// (rings, match queues, queued sends), the records of held messages and
// queued sends, and the copies every part uses (rings, process_vm_readv).
#pragma once

#include <fmt/format.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "core/log.h"
#include "core/mutex.h"
#include "transport/shm/shm_transport.h"
#include "weft/errors.h"

namespace weft::transport::shm {

// Copies n bytes at `remote` in process pid to dst; false with *err set on failure.
inline bool cma_copy(pid_t pid, void* dst, uint64_t remote, size_t n, int* err) {
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

// Copies n bytes to / from the ring at stream position pos (wrapping).
inline void ring_put(uint8_t* ring, uint64_t cap, uint64_t pos, const void* src, size_t n) {
  const size_t at = static_cast<size_t>(pos & (cap - 1));
  const size_t first = std::min<size_t>(n, static_cast<size_t>(cap) - at);
  std::memcpy(ring + at, src, first);
  if (n > first) std::memcpy(ring, static_cast<const uint8_t*>(src) + first, n - first);
}

inline void ring_get(const uint8_t* ring, uint64_t cap, uint64_t pos, void* dst, size_t n) {
  const size_t at = static_cast<size_t>(pos & (cap - 1));
  const size_t first = std::min<size_t>(n, static_cast<size_t>(cap) - at);
  std::memcpy(dst, ring + at, first);
  if (n > first) std::memcpy(static_cast<uint8_t*>(dst) + first, ring, n - first);
}

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

// rank, mu, the match queues, failed, departed, failure: InboundPeer.
struct ShmTransport::Peer : InboundPeer<Unexpected> {
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

  // Receives whose single-copy read failed or may have read a reused
  // buffer: they wait for the world's abort (see stall()).
  std::vector<RequestPtr> stalled GUARDED_BY(mu);
  // Receives matched in irecv() with a single-copy message that arrived
  // first: the progress thread reads them (irecv() returns at once).
  struct Read {
    RequestPtr req;
    uint64_t address, send_id, cancels;
  };
  std::deque<Read> reads GUARDED_BY(mu);
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
  Mutex out_mu;
  std::deque<SendOp> sendq GUARDED_BY(out_mu);
  std::unordered_map<uint64_t, RequestPtr> awaiting GUARDED_BY(out_mu);  // DataCma sends
  uint64_t next_send_id GUARDED_BY(out_mu) = 1;
  uint64_t out_head GUARDED_BY(out_mu) = 0;
  uint64_t out_tail_seen GUARDED_BY(out_mu) = 0;
  bool out_dead GUARDED_BY(out_mu) = false;
  std::atomic<bool> queued{false};  // sendq is not empty
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

}  // namespace weft::transport::shm
