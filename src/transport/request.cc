#include "transport/request.h"

#include <fmt/format.h>

namespace weft::transport {

bool Request::complete() {
  if (claimed_.exchange(true, std::memory_order_acq_rel)) return false;
  state_.store(State::Done, std::memory_order_seq_cst);
  return true;
}

bool Request::fail(std::exception_ptr error) {
  if (claimed_.exchange(true, std::memory_order_acq_rel)) return false;
  error_ = std::move(error);
  state_.store(State::Failed, std::memory_order_seq_cst);
  return true;
}

std::string Request::describe() const {
  std::string what =
      is_send_ ? fmt::format("send to rank {}", peer_) : fmt::format("recv from rank {}", peer_);
  if (!op_name.empty()) return fmt::format("{} ({}, {} bytes)", op_name, what, bytes_);
  return fmt::format("{} (tag {}, {} bytes)", what, tag_ & 0xffffffffu, bytes_);
}

}  // namespace weft::transport
