// Logging: a thin layer over spdlog (stderr), with the rank in every line.
//
//   WEFT_INFO("listening on {}", addr);
//
// The level comes from WEFT_LOG_LEVEL (trace, debug, info, warn, error, off;
// default warn) and can be changed with weft::log::set_level().
#pragma once

#include <fmt/format.h>

#include <string>
#include <string_view>

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

}  // namespace weft::log

#define WEFT_LOG(lvl, ...)                                                    \
  do {                                                                        \
    if (::weft::log::enabled(lvl)) ::weft::log::write(lvl, fmt::format(__VA_ARGS__)); \
  } while (0)
#define WEFT_TRACE(...) WEFT_LOG(::weft::log::Level::Trace, __VA_ARGS__)
#define WEFT_DEBUG(...) WEFT_LOG(::weft::log::Level::Debug, __VA_ARGS__)
#define WEFT_INFO(...) WEFT_LOG(::weft::log::Level::Info, __VA_ARGS__)
#define WEFT_WARN(...) WEFT_LOG(::weft::log::Level::Warn, __VA_ARGS__)
#define WEFT_ERROR(...) WEFT_LOG(::weft::log::Level::Error, __VA_ARGS__)
