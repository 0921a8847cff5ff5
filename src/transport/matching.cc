#include "transport/matching.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>

#include "weft/errors.h"

namespace weft::transport {

std::exception_ptr mismatch_error(int my_rank, const OpDesc& mine, uint64_t my_bytes, int peer,
                                  const std::string& peer_host, const OpDesc& theirs,
                                  uint64_t their_bytes, const DescribeOp& describe) {
  auto text = [&](const OpDesc& d) { return describe ? describe(d) : std::string("p2p"); };
  std::string t = text(theirs);
  std::string o = text(mine);
  if (t == o) {  // same call, different sizes (point-to-point)
    t += fmt::format(" [{} bytes]", their_bytes);
    o += fmt::format(" [{} bytes]", my_bytes);
  }
  return std::make_exception_ptr(
      MismatchError(fmt::format("mismatched operations: rank {} called {} but rank {} (host {}) "
                                "called {}",
                                my_rank, o, peer, peer_host, t)));
}

std::exception_ptr request_peer_error(const Request& req, const std::string& peer_host,
                                      const std::string& why) {
  return std::make_exception_ptr(
      PeerError(fmt::format("{}: rank {} (host {}) {}", req.describe(), req.peer(), peer_host, why),
                req.peer(), peer_host, req.op_name));
}

HoldBuffers::Block HoldBuffers::get(size_t n) {
  // Size classes: 8 per power of two (at most 1/8 wasted).
  const size_t step = std::bit_floor(std::max(n, kMinKept)) / 8;
  const size_t cap = (n + step - 1) / step * step;
  if (n < kMinKept || cap > keep_bytes_) {  // never kept: exactly what is needed
    return {std::unique_ptr<uint8_t[]>(new uint8_t[std::max<size_t>(n, 1)]), n};
  }
  {
    MutexLock lk(&mu_);
    auto it = free_.find(cap);
    if (it != free_.end() && !it->second.empty()) {
      Block b{std::move(it->second.back()), cap};
      it->second.pop_back();
      kept_ -= cap;
      return b;
    }
  }
  return {std::unique_ptr<uint8_t[]>(new uint8_t[cap]), cap};
}

void HoldBuffers::put(Block b) {
  if (!b.data || b.capacity < kMinKept) return;  // freed here
  MutexLock lk(&mu_);
  if (kept_ + b.capacity > keep_bytes_) return;
  kept_ += b.capacity;
  free_[b.capacity].push_back(std::move(b.data));
}

size_t HoldBuffers::kept_bytes() const {
  MutexLock lk(&mu_);
  return kept_;
}

}  // namespace weft::transport
