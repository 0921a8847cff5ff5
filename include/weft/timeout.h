// Deadlines. Every blocking call in Weft takes a timeout and never waits
// longer; kDefaultTimeout means "the default of the object the call is made
// on" (a Store's or a Communicator's, see options.h for the defaults).
#pragma once

#include <chrono>

namespace weft {

using Timeout = std::chrono::milliseconds;

// Use the receiving object's default timeout.
inline constexpr Timeout kDefaultTimeout{-1};

}  // namespace weft
