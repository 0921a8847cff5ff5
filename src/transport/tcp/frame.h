// Frames on a data connection (docs/PROTOCOL.md, "Transport frames").
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "transport/request.h"
#include "transport/transport.h"

namespace weft::transport::tcp {

inline constexpr uint32_t kFrameMagic = 0x54464557;  // "WEFT"
inline constexpr uint8_t kProtocolVersion = 1;
inline constexpr size_t kFrameHeaderBytes = 64;
// Longest control payload (ABORT reason text).
inline constexpr size_t kMaxControlBytes = 4096;
// Largest DATA payload any frame may announce (a sanity bound; real bounds
// are the posted receive size and WEFT_MAX_UNEXPECTED).
inline constexpr uint64_t kMaxFrameBytes = 1ull << 40;

enum class FrameType : uint8_t {
  Data = 1,   // a message for (comm id, tag)
  Abort = 2,  // the sender's world is aborting: tag = failed rank (or ~0), payload = reason
  Bye = 3,    // the sender closes its communicator: no more frames follow
};

// Kinds of Abort frames (flags field): transport::AbortKind.
using transport::AbortKind;

struct FrameHeader {
  FrameType type = FrameType::Data;
  uint16_t flags = 0;
  uint32_t generation = 0;
  uint32_t src_rank = 0;
  uint64_t comm_id = 0;
  uint64_t tag = 0;
  uint64_t length = 0;
  OpDesc desc;
};

void encode_frame_header(const FrameHeader& h, uint8_t* out);

// Parses and validates magic, version and type; on failure returns false and
// fills *why with a message for the log / the error.
bool decode_frame_header(const uint8_t* in, FrameHeader* h, std::string* why);

}  // namespace weft::transport::tcp
