#include "transport/tcp/frame.h"

#include <fmt/format.h>

#include "core/bytes.h"

namespace weft::transport::tcp {

// Layout (64 bytes, little-endian):
//   0 u32 magic | 4 u8 version | 5 u8 type | 6 u16 flags | 8 u32 generation | 12 u32 src rank
//  16 u64 comm id | 24 u64 tag | 32 u64 payload length
//  40 u8 op kind | 41 u8 dtype | 42 u8 reduce op | 43 u8 op flags | 44 u32 root
//  48 u64 element count | 56 u64 collective sequence number
void encode_frame_header(const FrameHeader& h, uint8_t* p) {
  bytes::put_u32(p + 0, kFrameMagic);
  bytes::put_u8(p + 4, kProtocolVersion);
  bytes::put_u8(p + 5, static_cast<uint8_t>(h.type));
  bytes::put_u16(p + 6, h.flags);
  bytes::put_u32(p + 8, h.generation);
  bytes::put_u32(p + 12, h.src_rank);
  bytes::put_u64(p + 16, h.comm_id);
  bytes::put_u64(p + 24, h.tag);
  bytes::put_u64(p + 32, h.length);
  bytes::put_u8(p + 40, h.desc.kind);
  bytes::put_u8(p + 41, h.desc.dtype);
  bytes::put_u8(p + 42, h.desc.op);
  bytes::put_u8(p + 43, h.desc.flags);
  bytes::put_u32(p + 44, h.desc.root);
  bytes::put_u64(p + 48, h.desc.count);
  bytes::put_u64(p + 56, h.desc.seq);
}

bool decode_frame_header(const uint8_t* p, FrameHeader* h, std::string* why) {
  uint32_t magic = bytes::get_u32(p);
  if (magic != kFrameMagic) {
    *why = fmt::format("bad frame magic 0x{:08x} (expected 0x{:08x})", magic, kFrameMagic);
    return false;
  }
  uint8_t version = bytes::get_u8(p + 4);
  if (version != kProtocolVersion) {
    *why = fmt::format("frame of protocol version {} (this build speaks {})", version,
                       kProtocolVersion);
    return false;
  }
  uint8_t type = bytes::get_u8(p + 5);
  if (type < static_cast<uint8_t>(FrameType::Data) || type > static_cast<uint8_t>(FrameType::Bye)) {
    *why = fmt::format("unknown frame type {}", type);
    return false;
  }
  h->type = static_cast<FrameType>(type);
  h->flags = bytes::get_u16(p + 6);
  h->generation = bytes::get_u32(p + 8);
  h->src_rank = bytes::get_u32(p + 12);
  h->comm_id = bytes::get_u64(p + 16);
  h->tag = bytes::get_u64(p + 24);
  h->length = bytes::get_u64(p + 32);
  h->desc.kind = bytes::get_u8(p + 40);
  h->desc.dtype = bytes::get_u8(p + 41);
  h->desc.op = bytes::get_u8(p + 42);
  h->desc.flags = bytes::get_u8(p + 43);
  h->desc.root = bytes::get_u32(p + 44);
  h->desc.count = bytes::get_u64(p + 48);
  h->desc.seq = bytes::get_u64(p + 56);
  if (h->length > kMaxFrameBytes) {
    *why = fmt::format("frame announces {} bytes (limit {})", h->length, kMaxFrameBytes);
    return false;
  }
  if (h->type != FrameType::Data && h->length > kMaxControlBytes) {
    *why = fmt::format("control frame announces {} bytes (limit {})", h->length, kMaxControlBytes);
    return false;
  }
  return true;
}

}  // namespace weft::transport::tcp
