// Wire format of the TCP store (docs/PROTOCOL.md, "Store protocol"). After
// the handshake (core/auth.h) the client sends requests, each a fixed
// 40-byte header and a body, and the server answers each with a fixed
// 32-byte header and a value. All integers little-endian.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace weft::store {

inline constexpr uint32_t kRequestMagic = 0x53544657;  // "WFTS"
inline constexpr uint32_t kReplyMagic = 0x52544657;    // "WFTR"
inline constexpr uint16_t kStoreProtocolVersion = 1;
inline constexpr size_t kRequestHeaderBytes = 40;
inline constexpr size_t kReplyHeaderBytes = 32;
// Largest error or timeout text a reply carries.
inline constexpr size_t kMaxReplyMessageBytes = 64u << 10;

enum class Op : uint8_t {
  Set = 1,         // key, value
  Get = 2,         // key; waits up to timeout_ms
  TryGet = 3,      // key
  Add = 4,         // key, value = 8-byte int64 delta
  CompareSet = 5,  // key, value = expected (flag kHasExpected), value2 = desired
  Wait = 6,        // key list (key_count entries of u32 length + bytes); waits up to timeout_ms
  Remove = 7,      // key
};
const char* op_name(Op op);

// Request flags.
inline constexpr uint8_t kHasExpected = 1;  // compare_set: value holds the expected value

enum class ReplyStatus : uint8_t {
  Ok = 0,
  NotFound = 1,  // try_get: the key does not exist
  Timeout = 2,   // get/wait: the deadline passed; value = a missing key
  Error = 3,     // the request failed; value = the reason (add on a non-integer...)
};

// Reply flags (compare_set).
inline constexpr uint8_t kSwapped = 1;
inline constexpr uint8_t kHasValue = 2;  // the key exists after the call; value = its value

struct RequestHeader {
  uint32_t magic = kRequestMagic;
  uint16_t version = kStoreProtocolVersion;
  uint8_t op = 0;
  uint8_t flags = 0;
  uint32_t id = 0;
  uint32_t timeout_ms = 0;
  uint32_t key_bytes = 0;
  uint32_t key_count = 0;
  uint64_t value_bytes = 0;
  uint64_t value2_bytes = 0;

  void encode(uint8_t* out) const;  // kRequestHeaderBytes
  static RequestHeader decode(const uint8_t* in);
  // Empty when the header is valid: known magic, version and op, lengths
  // within the limits (weft/store.h) and consistent with the op. Otherwise
  // the violation, for the log.
  std::string validate() const;
  uint64_t body_bytes() const { return uint64_t{key_bytes} + value_bytes + value2_bytes; }
};

struct ReplyHeader {
  uint32_t magic = kReplyMagic;
  uint16_t version = kStoreProtocolVersion;
  ReplyStatus status = ReplyStatus::Ok;
  uint8_t flags = 0;
  uint32_t id = 0;
  uint64_t value_bytes = 0;
  int64_t number = 0;  // add: the new value; remove: 1 if the key existed

  void encode(uint8_t* out) const;  // kReplyHeaderBytes
  static ReplyHeader decode(const uint8_t* in);
};

}  // namespace weft::store
