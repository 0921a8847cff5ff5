// Logging: a thin layer over spdlog (stderr), with the rank in every line.
//
//   WEFT_INFO("listening on {}", addr);
//
// The level comes from WEFT_LOG_LEVEL (trace, debug, info, warn, error, off;
// default warn) and can be changed with weft::log::set_level().
#pragma once

#include <fmt/format.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include "core/mutex.h"
#include "core/thread_annotations.h"

namespace weft::log {

enum class Level { Trace = 0, Debug, Info, Warn, Error, Off };

void set_level(Level level);
Level level();
bool enabled(Level level);
// Parses "trace".."off"; throws weft::InvalidArgument on anything else.
Level parse_level(std::string_view name);
// Puts "rank R" into every later line of this process (-1 removes it).
void set_rank(int rank);
void write(Level level, std::string_view message);

// Lines that anyone may cause at will (a stranger's refused connection)
// must not flood the log: a RateLimiter writes at most `burst` of them per
// `period` and counts the others. The count is written with the next line
// that passes (after the period), by report(), and when the process exits.
class RateLimiter {
 public:
  using Clock = std::chrono::steady_clock;
  // what: the kind of line, plural ("refused connections").
  explicit RateLimiter(std::string what, int burst = 10,
                       std::chrono::seconds period = std::chrono::seconds(60));
  ~RateLimiter();
  RateLimiter(const RateLimiter&) = delete;
  RateLimiter& operator=(const RateLimiter&) = delete;

  struct Decision {
    bool write = false;      // write this event's line
    bool last = false;       // the last line of this period: later ones are counted
    uint64_t held_back = 0;  // lines not written since the last one written (write only)
  };
  // Counts one event at `now` and says whether to write its line.
  Decision admit(Clock::time_point now = Clock::now());
  // Writes message, or counts it when over the rate.
  void write(Level level, std::string_view message);
  // Writes the count of the lines held back since the last line written, if any.
  void report();
  // Events so far, and those whose lines were not written.
  uint64_t events() const;
  uint64_t suppressed() const;

 private:
  const std::string what_;
  const int burst_;
  const std::chrono::seconds period_;
  mutable Mutex mu_;
  Clock::time_point window_start_ GUARDED_BY(mu_){};
  int in_window_ GUARDED_BY(mu_) = 0;
  uint64_t held_back_ GUARDED_BY(mu_) = 0;
  uint64_t events_ GUARDED_BY(mu_) = 0;
  uint64_t suppressed_ GUARDED_BY(mu_) = 0;
  Level level_ GUARDED_BY(mu_) = Level::Warn;  // of the last line, for report()
};

}  // namespace weft::log

#define WEFT_LOG(lvl, ...)                                                            \
  do {                                                                                \
    if (::weft::log::enabled(lvl)) ::weft::log::write(lvl, fmt::format(__VA_ARGS__)); \
  } while (0)
#define WEFT_TRACE(...) WEFT_LOG(::weft::log::Level::Trace, __VA_ARGS__)
#define WEFT_DEBUG(...) WEFT_LOG(::weft::log::Level::Debug, __VA_ARGS__)
#define WEFT_INFO(...) WEFT_LOG(::weft::log::Level::Info, __VA_ARGS__)
#define WEFT_WARN(...) WEFT_LOG(::weft::log::Level::Warn, __VA_ARGS__)
#define WEFT_ERROR(...) WEFT_LOG(::weft::log::Level::Error, __VA_ARGS__)
// A line a stranger can cause, rate-limited per call site (RateLimiter;
// `what` names the lines, plural):
//   WEFT_LOG_LIMITED(Level::Error, "refused connections", "refused {}: {}", peer, why);
#define WEFT_LOG_LIMITED(lvl, what, ...)                                                  \
  do {                                                                                    \
    static ::weft::log::RateLimiter& weft_limiter_ = *new ::weft::log::RateLimiter(what); \
    if (::weft::log::enabled(lvl)) weft_limiter_.write(lvl, fmt::format(__VA_ARGS__));    \
  } while (0)
