#include "core/log.h"

#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <cstdlib>
#include <mutex>

#include "weft/errors.h"

namespace weft::log {
namespace {

std::atomic<int> g_level{-1};  // -1: not initialized from the environment yet
std::atomic<int> g_rank{-1};

spdlog::logger& logger() {
  static std::shared_ptr<spdlog::logger> instance = [] {
    auto l = std::make_shared<spdlog::logger>(
        "weft", std::make_shared<spdlog::sinks::stderr_sink_mt>());
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
  if (const char* env = std::getenv("WEFT_LOG_LEVEL"); env && *env) {
    try {
      parsed = parse_level(env);
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
  if (name == "warn" || name == "warning") return Level::Warn;
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

}  // namespace weft::log
