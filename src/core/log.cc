#include "core/log.h"

#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <set>

#include "core/settings.h"
#include "weft/errors.h"

namespace weft::log {
namespace {

std::atomic<int> g_level{-1};  // -1: not initialized from the environment yet
std::atomic<int> g_rank{-1};

spdlog::logger& logger() {
  static std::shared_ptr<spdlog::logger> instance = [] {
    auto l =
        std::make_shared<spdlog::logger>("weft", std::make_shared<spdlog::sinks::stderr_sink_mt>());
    l->set_pattern("%Y-%m-%d %H:%M:%S.%e weft %l: %v");
    l->set_level(spdlog::level::trace);  // filtering happens in enabled()
    l->flush_on(spdlog::level::trace);
    return l;
  }();
  return *instance;
}

int current_level() {
  int l = g_level.load(std::memory_order_relaxed);
  if (l >= 0) return l;
  Level parsed = Level::Warn;
  // An invalid value is refused at start-up (settings::validate_environment);
  // logging itself never throws.
  if (auto env = settings::get(settings::kLogLevel.env)) {
    try {
      parsed = parse_level(*env);
    } catch (const Error&) {
      parsed = Level::Warn;
    }
  }
  int expected = -1;
  g_level.compare_exchange_strong(expected, static_cast<int>(parsed));
  return g_level.load();
}

}  // namespace

void set_level(Level level) { g_level.store(static_cast<int>(level)); }
Level level() { return static_cast<Level>(current_level()); }
bool enabled(Level level) { return static_cast<int>(level) >= current_level(); }

Level parse_level(std::string_view name) {
  if (name == "trace") return Level::Trace;
  if (name == "debug") return Level::Debug;
  if (name == "info") return Level::Info;
  if (name == "warn") return Level::Warn;
  if (name == "error") return Level::Error;
  if (name == "off") return Level::Off;
  throw InvalidArgument("unknown log level '" + std::string(name) +
                        "' (expected trace, debug, info, warn, error or off)");
}

void set_rank(int rank) { g_rank.store(rank); }

void write(Level level, std::string_view message) {
  static const spdlog::level::level_enum kMap[] = {spdlog::level::trace, spdlog::level::debug,
                                                   spdlog::level::info,  spdlog::level::warn,
                                                   spdlog::level::err,   spdlog::level::off};
  int rank = g_rank.load(std::memory_order_relaxed);
  if (rank >= 0) {
    logger().log(kMap[static_cast<int>(level)], "[rank {}] {}", rank, message);
  } else {
    logger().log(kMap[static_cast<int>(level)], "{}", message);
  }
}

// ---------------------------------------------------------------------------
// RateLimiter

namespace {

// Every live limiter, reported when the process exits (leaked: limiters
// created by WEFT_LOG_LIMITED live until then, and threads may log while
// the process exits).
struct Limiters {
  Mutex mu;
  std::set<RateLimiter*> live GUARDED_BY(mu);
};
Limiters& limiters() {
  static auto* l = new Limiters;
  return *l;
}

void report_all_at_exit() {
  Limiters& l = limiters();
  MutexLock lock(&l.mu);
  for (RateLimiter* r : l.live) r->report();
}

}  // namespace

RateLimiter::RateLimiter(std::string what, int burst, std::chrono::seconds period)
    : what_(std::move(what)), burst_(std::max(1, burst)), period_(period) {
  logger();  // constructed first, so destroyed after report_all_at_exit ran
  static std::once_flag once;
  std::call_once(once, [] { std::atexit(report_all_at_exit); });
  Limiters& l = limiters();
  MutexLock lock(&l.mu);
  l.live.insert(this);
}

RateLimiter::~RateLimiter() {
  {
    Limiters& l = limiters();
    MutexLock lock(&l.mu);
    l.live.erase(this);
  }
  report();
}

RateLimiter::Decision RateLimiter::admit(Clock::time_point now) {
  MutexLock lock(&mu_);
  ++events_;
  if (in_window_ == 0 || now - window_start_ >= period_) {
    window_start_ = now;
    in_window_ = 0;
  }
  Decision d;
  if (in_window_ < burst_) {
    ++in_window_;
    d.write = true;
    d.last = in_window_ == burst_;
    d.held_back = std::exchange(held_back_, 0);
  } else {
    ++held_back_;
    ++suppressed_;
  }
  return d;
}

void RateLimiter::write(Level level, std::string_view message) {
  const Decision d = admit();
  if (!d.write) return;
  {
    MutexLock lock(&mu_);
    level_ = level;
  }
  std::string line(message);
  if (d.held_back > 0)
    line += fmt::format(" ({} more {} not logged before this one)", d.held_back, what_);
  if (d.last) {
    line += fmt::format(" (further {} in the next {} s are counted, not logged)", what_,
                        period_.count());
  }
  ::weft::log::write(level, line);
}

void RateLimiter::report() {
  uint64_t n = 0;
  Level level = Level::Warn;
  {
    MutexLock lock(&mu_);
    n = std::exchange(held_back_, 0);
    level = level_;
  }
  if (n > 0 && enabled(level)) {
    ::weft::log::write(level,
                       fmt::format("{} more {} were not logged ({} in all)", n, what_, events()));
  }
}

uint64_t RateLimiter::events() const {
  MutexLock lock(&mu_);
  return events_;
}

uint64_t RateLimiter::suppressed() const {
  MutexLock lock(&mu_);
  return suppressed_;
}

}  // namespace weft::log
