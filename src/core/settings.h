// Every setting Weft reads from the environment, declared once: its
// variable, its default and what it does (the table in settings.cc, printed
// by `weft config`). Readers validate the value and throw
// weft::InvalidArgument naming the variable when it is malformed.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace weft::settings {

struct Setting {
  std::string_view env;            // e.g. "WEFT_TIMEOUT"
  std::string_view default_value;  // as text, e.g. "300"
  std::string_view doc;            // one line
};

// The table of every setting, in documentation order.
std::span<const Setting> all();

// The raw value of an environment variable (nullopt when unset or empty).
std::optional<std::string> get(std::string_view env);
// Readers with defaults. Booleans accept 1/0/true/false/yes/no/on/off.
std::string get_string(std::string_view env, std::string_view def);
bool get_bool(std::string_view env, bool def);
int64_t get_int(std::string_view env, int64_t def, int64_t min, int64_t max);
// Bytes: a number with an optional K, M or G suffix (powers of 1024).
uint64_t get_bytes(std::string_view env, uint64_t def, uint64_t min, uint64_t max);
// Seconds as a decimal number ("2.5"), returned in milliseconds.
std::chrono::milliseconds get_seconds(std::string_view env, std::chrono::milliseconds def);

// Parsers behind the readers (also used for command-line values).
// `what` names the value in the error message.
uint64_t parse_bytes(std::string_view text, std::string_view what);
std::chrono::milliseconds parse_seconds(std::string_view text, std::string_view what);

}  // namespace weft::settings
