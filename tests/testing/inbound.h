// What became of the messages a communicator's world received (the inbound
// counters of transport/inbound.h), for tests that wait until a message has
// taken the path they name instead of sleeping.
#pragma once

#include <chrono>
#include <memory>

#include "api/access.h"
#include "comm/group.h"
#include "comm/world.h"
#include "testing/testing.h"
#include "weft/communicator.h"

namespace weft::testing {

inline transport::InboundStats inbound(const std::shared_ptr<Communicator>& c) {
  return api::CommunicatorAccess::group(*c)->world().inbound_stats();
}

// Polls until pred(inbound(c)) holds (true), or false after `limit`.
template <typename Pred>
bool wait_inbound(const std::shared_ptr<Communicator>& c, Pred pred,
                  std::chrono::milliseconds limit = std::chrono::seconds(30)) {
  return wait_until([&] { return pred(inbound(c)); }, limit);
}

}  // namespace weft::testing
