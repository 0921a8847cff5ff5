// The shared-memory segment of one pair of ranks on one host, and the
// records its two rings carry (docs/PROTOCOL.md, "Shared-memory transport").
//
// A segment is an anonymous memfd (never a name in /dev/shm: nothing can be
// left behind by a killed process) created by the lower rank of the pair,
// sized, sealed against shrinking and growing, and passed to the higher rank
// over a Unix-domain socket. Layout:
//
//   offset 0       SegmentHeader, written once by the creator (4096 bytes)
//   4096           RingControl of ring 0 (lower rank -> higher rank)
//   4096 + 512     RingControl of ring 1 (higher rank -> lower rank)
//   8192           data of ring 0 (ring_bytes)
//   8192 + rb      data of ring 1 (ring_bytes)
//
// Each ring is a single-producer single-consumer byte stream: `head` counts
// the bytes the producer has published, `tail` those the consumer is done
// with; both only grow, the data of position p is at p % ring_bytes. The
// stream is a sequence of 64-byte-aligned records (RecordHeader + body).
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/socket.h"
#include "transport/request.h"

namespace weft::transport::shm {

inline constexpr uint64_t kSegmentMagic = 0x314d485354464557ull;  // "WEFTSHM1"
inline constexpr uint32_t kSegmentVersion = 1;
inline constexpr size_t kLine = 64;
inline constexpr size_t kSegmentHeaderBytes = 4096;
inline constexpr size_t kRingControlBytes = 512;
inline constexpr size_t kRingDataOffset = 8192;
inline constexpr uint64_t kMinRingBytes = 64u << 10;
inline constexpr uint64_t kMaxRingBytes = 64u << 20;
// Largest message any record may announce (as for TCP frames).
inline constexpr uint64_t kMaxMessageBytes = 1ull << 40;

// What both ranks of a pair expect of their segment.
struct SegmentSpec {
  uint64_t world_id = 0;
  uint32_t generation = 0;
  uint32_t world_size = 0;
  uint32_t lo_rank = 0;  // the creator
  uint32_t hi_rank = 0;
  uint64_t ring_bytes = 0;  // creator: what to make; opener: ignored (read from the header)
};

// The segment's first bytes. Plain data, written before the segment is shared.
struct SegmentHeader {
  uint64_t magic;
  uint32_t version;
  uint32_t header_bytes;
  uint64_t world_id;
  uint32_t generation;
  uint32_t world_size;
  uint32_t lo_rank;
  uint32_t hi_rank;
  uint64_t ring_bytes;
  uint64_t total_bytes;
};

// Shared state of one ring; every field on a cache line of its own.
struct RingControl {
  // Bytes published by the producer (stored after the data).
  alignas(kLine) std::atomic<uint64_t> head;
  // Bytes released by the consumer (stored after reading).
  alignas(kLine) std::atomic<uint64_t> tail;
  // 1: the consumer is going to sleep in epoll_wait and wants its eventfd
  // signalled when head moves. Set by the consumer, cleared by either side.
  alignas(kLine) std::atomic<uint32_t> consumer_sleeping;
  // 1: the producer waits for space and wants its eventfd signalled when
  // tail moves.
  alignas(kLine) std::atomic<uint32_t> producer_sleeping;
  // Times the producer gave up single-copy sends still waiting for their
  // acknowledgement (its communicator failed), before failing them: a
  // receiver that sees it move during its read discards what it read,
  // since the sender's buffer may have been reused.
  alignas(kLine) std::atomic<uint64_t> cancels;
};
static_assert(sizeof(RingControl) <= kRingControlBytes);
static_assert(std::atomic<uint64_t>::is_always_lock_free &&
                  std::atomic<uint32_t>::is_always_lock_free,
              "shared-memory atomics must be lock-free (address-free)");

// Total bytes of a segment with rings of ring_bytes.
inline uint64_t segment_bytes(uint64_t ring_bytes) { return kRingDataOffset + 2 * ring_bytes; }

// A mapping of a segment (munmap on destruction).
class Mapping {
 public:
  Mapping() = default;
  // ring_bytes: the validated ring size (kept here: the header in shared
  // memory is never read again once validated).
  Mapping(void* base, size_t bytes, uint64_t ring_bytes)
      : base_(base), bytes_(bytes), ring_bytes_(ring_bytes) {}
  ~Mapping() { reset(); }
  Mapping(Mapping&& o) noexcept;
  Mapping& operator=(Mapping&& o) noexcept;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  uint8_t* base() const { return static_cast<uint8_t*>(base_); }
  size_t bytes() const { return bytes_; }
  explicit operator bool() const { return base_ != nullptr; }
  void reset();

  uint64_t ring_bytes() const { return ring_bytes_; }
  // Ring 0 carries lo -> hi, ring 1 hi -> lo.
  RingControl* control(int ring) const {
    return reinterpret_cast<RingControl*>(base() + kSegmentHeaderBytes +
                                          static_cast<size_t>(ring) * kRingControlBytes);
  }
  uint8_t* data(int ring) const {
    return base() + kRingDataOffset + static_cast<size_t>(ring) * ring_bytes();
  }

 private:
  void* base_ = nullptr;
  size_t bytes_ = 0;
  uint64_t ring_bytes_ = 0;
};

// Creates, sizes, seals and maps a new segment for spec (the lower rank).
// Throws weft::Error on a system error.
std::pair<net::Fd, Mapping> create_segment(const SegmentSpec& spec);

// Validates a segment received from the lower rank and maps it: it must be
// sealed against shrinking (so that the peer cannot truncate it under us),
// at least a header long, carry the magic and version of this protocol, the
// world, generation, size and ranks of spec, a ring size within bounds and
// exactly the length that ring size implies. Throws weft::ProtocolError
// saying what is wrong.
Mapping open_segment(int fd, const SegmentSpec& spec, const std::string& who);

// The check behind open_segment, on a header already read and the segment's
// size: returns what is wrong ("" when the segment is fine).
std::string validate_segment(const SegmentHeader& h, uint64_t file_bytes, const SegmentSpec& spec);

// ---------------------------------------------------------------------------
// Records. Every record starts on a 64-byte boundary with a RecordHeader.

inline constexpr uint32_t kRecordMagic = 0x4d534657;  // "WFSM"

enum class RecordType : uint8_t {
  // A message whose payload follows in the ring (padded to 64 bytes).
  Data = 1,
  // A message the receiver copies itself from the sender's memory with
  // process_vm_readv: a body line follows with its address (CmaBody).
  DataCma = 2,
  // The receiver is done with the DataCma message `aux` (its send id).
  Ack = 3,
};

struct RecordHeader {
  uint32_t magic;
  uint8_t type;
  uint8_t flags;
  uint16_t reserved;
  uint64_t comm_id;
  uint64_t tag;
  uint64_t length;  // message payload bytes
  OpDesc desc;
  uint64_t aux;  // DataCma, Ack: the send id
};
static_assert(sizeof(OpDesc) == 24);
static_assert(sizeof(RecordHeader) == kLine);

struct CmaBody {
  uint64_t address;  // in the sender's address space
  uint64_t length;   // same as the header's
  uint64_t cancels;  // the sender's RingControl::cancels when it sent it
  uint8_t pad[kLine - 24];
};
static_assert(sizeof(CmaBody) == kLine);

inline uint64_t round_up_line(uint64_t n) {
  return (n + kLine - 1) & ~static_cast<uint64_t>(kLine - 1);
}

// Bytes of a record of type t announcing `length` payload bytes (header included).
inline uint64_t record_bytes(RecordType t, uint64_t length) {
  switch (t) {
    case RecordType::Data: return kLine + round_up_line(length);
    case RecordType::DataCma: return 2 * kLine;
    case RecordType::Ack: return kLine;
  }
  return kLine;
}

// Validates a record header read from a ring: returns what is wrong ("" if fine).
std::string validate_record(const RecordHeader& h);

// ---------------------------------------------------------------------------
// Set-up messages, one SOCK_SEQPACKET packet each, on the lower rank's
// abstract Unix-domain socket (native byte order: both ends are on one host).

inline constexpr uint32_t kHelloMagic = 0x48534657;  // "WFSH"
inline constexpr uint32_t kReplyMagic = 0x52534657;  // "WFSR"
inline constexpr uint32_t kFinalMagic = 0x46534657;  // "WFSF"
inline constexpr uint32_t kSetupVersion = 1;
inline constexpr size_t kKeyChars = 64;
inline constexpr size_t kProbeBytes = 32;

// Higher rank -> lower rank, passing the higher rank's eventfd.
struct Hello {
  uint32_t magic;
  uint32_t version;
  uint64_t world_id;
  uint32_t generation;
  uint32_t size;
  uint32_t src;
  uint32_t dst;
  char key[kKeyChars];     // the lower rank's key, as published in the store
  uint64_t probe_address;  // bytes the lower rank may read to probe single copy
  uint8_t probe[kProbeBytes];
};

// Lower rank -> higher rank, passing the segment (memfd) and the lower
// rank's eventfd when accepted.
struct Reply {
  uint32_t magic;
  uint32_t status;      // 0: accepted; else `error` says why not
  char key[kKeyChars];  // the higher rank's key: both sides prove they read the store
  uint64_t probe_address;
  uint8_t probe[kProbeBytes];
  uint32_t reads_you;  // the lower rank can read the higher rank's memory
  uint32_t reserved;
  char error[192];
};

// Higher rank -> lower rank: the set-up is complete.
struct Final {
  uint32_t magic;
  uint32_t reads_you;  // the higher rank can read the lower rank's memory
};

static_assert(sizeof(Hello) == 136 && sizeof(Reply) == 312 && sizeof(Final) == 8,
              "set-up packets as documented in docs/PROTOCOL.md");

}  // namespace weft::transport::shm
