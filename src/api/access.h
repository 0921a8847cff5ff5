// In-tree access to what the public Communicator keeps private: building one
// around a comm::Group (weft::init(), create(), split()) and reaching the
// group behind it (tests and benchmarks that inspect the topology).
#pragma once

#include <memory>

#include "weft/communicator.h"

namespace weft::api {

struct CommunicatorAccess {
  // A communicator over `group`; owns_world: it shuts the world down when
  // destroyed (the world communicator, not one made by split()).
  static std::shared_ptr<Communicator> make(std::shared_ptr<comm::Group> group, bool owns_world) {
    return std::shared_ptr<Communicator>(new Communicator(std::move(group), owns_world));
  }
  static const std::shared_ptr<comm::Group>& group(const Communicator& c) { return c.group_; }
};

}  // namespace weft::api
