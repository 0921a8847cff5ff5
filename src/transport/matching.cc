#include "transport/matching.h"

#include <fmt/format.h>

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

}  // namespace weft::transport
