// Deadlines: a point in time on the steady clock, built from a timeout.
#pragma once

#include <algorithm>
#include <chrono>
#include <climits>

#include "weft/timeout.h"

namespace weft {

class Deadline {
 public:
  using Clock = std::chrono::steady_clock;

  Deadline() : when_(Clock::time_point::max()) {}
  explicit Deadline(Clock::time_point when, Timeout budget = Timeout::zero())
      : when_(when), budget_(budget) {}
  // Now + timeout. A negative timeout is treated as zero.
  static Deadline after(Timeout timeout) {
    timeout = std::max(timeout, Timeout::zero());
    return Deadline(Clock::now() + timeout, timeout);
  }

  Clock::time_point when() const { return when_; }
  // The timeout this deadline was made from (for messages: "timed out after 30 s").
  Timeout budget() const { return budget_; }
  bool expired() const { return Clock::now() >= when_; }
  // Time left, never negative.
  std::chrono::nanoseconds remaining() const {
    auto now = Clock::now();
    return now >= when_ ? std::chrono::nanoseconds::zero() : when_ - now;
  }
  // Time left as milliseconds for poll()/epoll_wait() (rounded up, capped).
  int poll_ms() const {
    auto ns = remaining().count();
    if (ns <= 0) return 0;
    long long ms = (ns + 999999) / 1000000;
    return ms > INT_MAX ? INT_MAX : static_cast<int>(ms);
  }
  Deadline min(const Deadline& other) const { return when_ < other.when_ ? *this : other; }

 private:
  Clock::time_point when_;
  Timeout budget_{0};
};

// kDefaultTimeout (or any negative value) -> the given default.
inline Timeout resolve_timeout(Timeout t, Timeout def) { return t.count() < 0 ? def : t; }

// Seconds as text for messages: "30 s", "0.5 s".
std::string format_timeout(Timeout t);

}  // namespace weft
