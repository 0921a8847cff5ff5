#include "transport/shm/segment.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <new>
#include <utility>

#include "core/enforce.h"
#include "weft/errors.h"

namespace weft::transport::shm {

Mapping::Mapping(Mapping&& o) noexcept
    : base_(std::exchange(o.base_, nullptr)),
      bytes_(std::exchange(o.bytes_, 0)),
      ring_bytes_(std::exchange(o.ring_bytes_, 0)) {}

Mapping& Mapping::operator=(Mapping&& o) noexcept {
  if (this != &o) {
    reset();
    base_ = std::exchange(o.base_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    ring_bytes_ = std::exchange(o.ring_bytes_, 0);
  }
  return *this;
}

void Mapping::reset() {
  if (base_ != nullptr) ::munmap(base_, bytes_);
  base_ = nullptr;
  bytes_ = 0;
  ring_bytes_ = 0;
}

std::pair<net::Fd, Mapping> create_segment(const SegmentSpec& spec) {
  WEFT_ENFORCE(spec.ring_bytes >= kMinRingBytes && spec.ring_bytes <= kMaxRingBytes &&
                   (spec.ring_bytes & (spec.ring_bytes - 1)) == 0,
               "shared-memory ring size {} out of range", spec.ring_bytes);
  const uint64_t total = segment_bytes(spec.ring_bytes);
  net::Fd fd(::memfd_create("weft-shm", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) throw Error(fmt::format("memfd_create: {}", net::errno_string(errno)));
  if (::ftruncate(fd.get(), static_cast<off_t>(total)) != 0) {
    throw Error(fmt::format("ftruncate of a {}-byte shared-memory segment: {}", total,
                            net::errno_string(errno)));
  }
  // Neither side can change the size any more: a mapped segment can never
  // shrink under a reader (which would make its accesses fault).
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    throw Error(fmt::format("sealing a shared-memory segment: {}", net::errno_string(errno)));
  }
  // Populated now: the first messages would otherwise each pay a page
  // fault on a fresh ring page (a few microseconds, as much as the message).
  void* base =
      ::mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd.get(), 0);
  if (base == MAP_FAILED) {
    throw Error(fmt::format("mmap of a {}-byte shared-memory segment: {}", total,
                            net::errno_string(errno)));
  }
  Mapping map(base, total, spec.ring_bytes);
  SegmentHeader h{};
  h.magic = kSegmentMagic;
  h.version = kSegmentVersion;
  h.header_bytes = static_cast<uint32_t>(kSegmentHeaderBytes);
  h.world_id = spec.world_id;
  h.generation = spec.generation;
  h.world_size = spec.world_size;
  h.lo_rank = spec.lo_rank;
  h.hi_rank = spec.hi_rank;
  h.ring_bytes = spec.ring_bytes;
  h.total_bytes = total;
  std::memcpy(map.base(), &h, sizeof h);
  for (int ring = 0; ring < 2; ++ring) {
    auto* c = new (map.control(ring)) RingControl;
    c->head.store(0, std::memory_order_relaxed);
    c->tail.store(0, std::memory_order_relaxed);
    c->consumer_sleeping.store(0, std::memory_order_relaxed);
    c->producer_sleeping.store(0, std::memory_order_relaxed);
    c->cancels.store(0, std::memory_order_relaxed);
  }
  // Passing the descriptor (sendmsg) orders these writes before the peer's reads.
  return {std::move(fd), std::move(map)};
}

std::string validate_segment(const SegmentHeader& h, uint64_t file_bytes, const SegmentSpec& spec) {
  if (h.magic != kSegmentMagic) {
    return fmt::format("has magic {:#018x}, not {:#018x} (not a Weft shared-memory segment)",
                       h.magic, kSegmentMagic);
  }
  if (h.version != kSegmentVersion) {
    return fmt::format("is of protocol version {}, this is version {} (mixed Weft versions?)",
                       h.version, kSegmentVersion);
  }
  if (h.header_bytes != kSegmentHeaderBytes) {
    return fmt::format("has a {}-byte header, expected {}", h.header_bytes, kSegmentHeaderBytes);
  }
  if (h.world_id != spec.world_id || h.generation != spec.generation) {
    return fmt::format(
        "belongs to world {:016x} generation {}, not world {:016x} generation {} (another job, "
        "or a stale generation)",
        h.world_id, h.generation, spec.world_id, spec.generation);
  }
  if (h.world_size != spec.world_size || h.lo_rank != spec.lo_rank || h.hi_rank != spec.hi_rank) {
    return fmt::format("is for ranks {} and {} of {}, expected ranks {} and {} of {}", h.lo_rank,
                       h.hi_rank, h.world_size, spec.lo_rank, spec.hi_rank, spec.world_size);
  }
  if (h.ring_bytes < kMinRingBytes || h.ring_bytes > kMaxRingBytes ||
      (h.ring_bytes & (h.ring_bytes - 1)) != 0) {
    return fmt::format("announces rings of {} bytes (must be a power of two in [{}, {}])",
                       h.ring_bytes, kMinRingBytes, kMaxRingBytes);
  }
  const uint64_t expect = segment_bytes(h.ring_bytes);
  if (h.total_bytes != expect) {
    return fmt::format("announces {} bytes, but rings of {} bytes need {}", h.total_bytes,
                       h.ring_bytes, expect);
  }
  if (file_bytes != expect) {
    return fmt::format("is {} bytes long, but its header needs {} (truncated?)", file_bytes,
                       expect);
  }
  return "";
}

Mapping open_segment(int fd, const SegmentSpec& spec, const std::string& who) {
  auto fail = [&](const std::string& why) {
    return ProtocolError(fmt::format("the shared-memory segment from {} {}", who, why));
  };
  int seals = ::fcntl(fd, F_GET_SEALS);
  if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
    throw fail("is not sealed against shrinking (not a segment made by Weft)");
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0)
    throw fail(fmt::format("cannot be examined: {}", net::errno_string(errno)));
  const auto file_bytes = static_cast<uint64_t>(st.st_size);
  if (file_bytes < kSegmentHeaderBytes) {
    throw fail(fmt::format("is {} bytes long, shorter than its {}-byte header (truncated)",
                           file_bytes, kSegmentHeaderBytes));
  }
  SegmentHeader h{};
  if (::pread(fd, &h, sizeof h, 0) != static_cast<ssize_t>(sizeof h)) {
    throw fail(fmt::format("cannot be read: {}", net::errno_string(errno)));
  }
  std::string why = validate_segment(h, file_bytes, spec);
  if (!why.empty()) throw fail(why);
  void* base =
      ::mmap(nullptr, file_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (base == MAP_FAILED) {
    throw Error(fmt::format("mmap of the shared-memory segment from {}: {}", who,
                            net::errno_string(errno)));
  }
  return Mapping(base, file_bytes, h.ring_bytes);
}

std::string validate_record(const RecordHeader& h) {
  if (h.magic != kRecordMagic) return fmt::format("record with magic {:#010x}", h.magic);
  switch (static_cast<RecordType>(h.type)) {
    case RecordType::Data:
    case RecordType::DataCma:
      if (h.length > kMaxMessageBytes) {
        return fmt::format("record announcing {} bytes (limit {})", h.length, kMaxMessageBytes);
      }
      return "";
    case RecordType::Ack: return "";
  }
  return fmt::format("record of unknown type {}", h.type);
}

}  // namespace weft::transport::shm
