#include "store/tcp_protocol.h"

#include <fmt/format.h>

#include "core/bytes.h"
#include "store/store_util.h"
#include "weft/store.h"

namespace weft::store {

const char* op_name(Op op) {
  switch (op) {
    case Op::Set: return "set";
    case Op::Get: return "get";
    case Op::TryGet: return "try_get";
    case Op::Add: return "add";
    case Op::CompareSet: return "compare_set";
    case Op::Wait: return "wait";
    case Op::Remove: return "remove";
  }
  return "unknown";
}

void RequestHeader::encode(uint8_t* out) const {
  bytes::put_u32(out + 0, magic);
  bytes::put_u16(out + 4, version);
  bytes::put_u8(out + 6, op);
  bytes::put_u8(out + 7, flags);
  bytes::put_u32(out + 8, id);
  bytes::put_u32(out + 12, timeout_ms);
  bytes::put_u32(out + 16, key_bytes);
  bytes::put_u32(out + 20, key_count);
  bytes::put_u64(out + 24, value_bytes);
  bytes::put_u64(out + 32, value2_bytes);
}

RequestHeader RequestHeader::decode(const uint8_t* in) {
  RequestHeader h;
  h.magic = bytes::get_u32(in + 0);
  h.version = bytes::get_u16(in + 4);
  h.op = bytes::get_u8(in + 6);
  h.flags = bytes::get_u8(in + 7);
  h.id = bytes::get_u32(in + 8);
  h.timeout_ms = bytes::get_u32(in + 12);
  h.key_bytes = bytes::get_u32(in + 16);
  h.key_count = bytes::get_u32(in + 20);
  h.value_bytes = bytes::get_u64(in + 24);
  h.value2_bytes = bytes::get_u64(in + 32);
  return h;
}

std::string RequestHeader::validate() const {
  if (magic != kRequestMagic) return fmt::format("bad request magic 0x{:08x}", magic);
  if (version != kStoreProtocolVersion) {
    return fmt::format("store protocol version {} (this build speaks {})", version,
                       kStoreProtocolVersion);
  }
  if (op < static_cast<uint8_t>(Op::Set) || op > static_cast<uint8_t>(Op::Remove)) {
    return fmt::format("unknown op {}", op);
  }
  const auto o = static_cast<Op>(op);
  const char* name = op_name(o);
  if (o == Op::Wait) {
    if (key_count > kMaxWaitKeys) {
      return fmt::format("wait for {} keys, above the limit of {}", key_count, kMaxWaitKeys);
    }
    if (key_bytes > kMaxWaitListBytes) {
      return fmt::format("wait key list of {} bytes, above the limit of {}", key_bytes,
                         kMaxWaitListBytes);
    }
    if (key_bytes < 4ull * key_count) {
      return fmt::format("wait key list of {} bytes cannot hold {} keys", key_bytes, key_count);
    }
  } else {
    if (key_bytes > kMaxStoreKeyBytes) {
      return fmt::format("{} key length {} above the limit of {} bytes", name, key_bytes,
                         kMaxStoreKeyBytes);
    }
    if (key_count != 0) return fmt::format("{} with a key count ({})", name, key_count);
  }
  if (value_bytes > kMaxStoreValueBytes) {
    return fmt::format("{} value length {} above the limit of {} bytes", name, value_bytes,
                       kMaxStoreValueBytes);
  }
  if (value2_bytes > kMaxStoreValueBytes) {
    return fmt::format("{} second value length {} above the limit of {} bytes", name, value2_bytes,
                       kMaxStoreValueBytes);
  }
  const bool takes_value = o == Op::Set || o == Op::Add || o == Op::CompareSet;
  if (!takes_value && value_bytes != 0) {
    return fmt::format("{} with a value of {} bytes", name, value_bytes);
  }
  if (o == Op::Add && value_bytes != 8) {
    return fmt::format("add with a delta of {} bytes (expected 8)", value_bytes);
  }
  if (o == Op::CompareSet && !(flags & kHasExpected) && value_bytes != 0) {
    return fmt::format("compare_set without an expected value but {} value bytes", value_bytes);
  }
  if (o != Op::CompareSet && value2_bytes != 0) {
    return fmt::format("{} with a second value of {} bytes", name, value2_bytes);
  }
  return {};
}

void ReplyHeader::encode(uint8_t* out) const {
  bytes::put_u32(out + 0, magic);
  bytes::put_u16(out + 4, version);
  bytes::put_u8(out + 6, static_cast<uint8_t>(status));
  bytes::put_u8(out + 7, flags);
  bytes::put_u32(out + 8, id);
  bytes::put_u32(out + 12, 0);
  bytes::put_u64(out + 16, value_bytes);
  bytes::put_u64(out + 24, static_cast<uint64_t>(number));
}

ReplyHeader ReplyHeader::decode(const uint8_t* in) {
  ReplyHeader h;
  h.magic = bytes::get_u32(in + 0);
  h.version = bytes::get_u16(in + 4);
  h.status = static_cast<ReplyStatus>(bytes::get_u8(in + 6));
  h.flags = bytes::get_u8(in + 7);
  h.id = bytes::get_u32(in + 8);
  h.value_bytes = bytes::get_u64(in + 16);
  h.number = static_cast<int64_t>(bytes::get_u64(in + 24));
  return h;
}

}  // namespace weft::store
