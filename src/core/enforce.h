// Checks of internal invariants. A failed check throws weft::InternalError
// with the expression, both values, the file and the line:
//
//   WEFT_ENFORCE_EQ(received, expected, "bytes of segment {}", seg);
//
// For a broken invariant only (a bug in Weft); bad input from a caller is
// InvalidArgument with a message that names it.
#pragma once

#include <fmt/format.h>

#include <string>

#include "weft/errors.h"

namespace weft::detail {

[[noreturn]] void enforce_fail(const char* file, int line, const std::string& condition,
                               const std::string& message);

template <typename A, typename B>
std::string enforce_values(const char* op, const char* ea, const char* eb, const A& a, const B& b) {
  return fmt::format("{} {} {} ({} vs {})", ea, op, eb, a, b);
}

}  // namespace weft::detail

#define WEFT_ENFORCE(cond, ...)                                                             \
  do {                                                                                      \
    if (!(cond)) [[unlikely]]                                                               \
      ::weft::detail::enforce_fail(__FILE__, __LINE__, #cond, fmt::format("" __VA_ARGS__)); \
  } while (0)

#define WEFT_ENFORCE_OP_(op, a, b, ...)                                                           \
  do {                                                                                            \
    const auto& weft_a_ = (a);                                                                    \
    const auto& weft_b_ = (b);                                                                    \
    if (!(weft_a_ op weft_b_)) [[unlikely]]                                                       \
      ::weft::detail::enforce_fail(__FILE__, __LINE__,                                            \
                                   ::weft::detail::enforce_values(#op, #a, #b, weft_a_, weft_b_), \
                                   fmt::format("" __VA_ARGS__));                                  \
  } while (0)

// A place the code never reaches (the default of a switch over every case
// that can arrive): throws InternalError with the message.
#define WEFT_UNREACHABLE(...) \
  ::weft::detail::enforce_fail(__FILE__, __LINE__, "unreachable code", fmt::format("" __VA_ARGS__))

#define WEFT_ENFORCE_EQ(a, b, ...) WEFT_ENFORCE_OP_(==, a, b, __VA_ARGS__)
#define WEFT_ENFORCE_NE(a, b, ...) WEFT_ENFORCE_OP_(!=, a, b, __VA_ARGS__)
#define WEFT_ENFORCE_LT(a, b, ...) WEFT_ENFORCE_OP_(<, a, b, __VA_ARGS__)
#define WEFT_ENFORCE_LE(a, b, ...) WEFT_ENFORCE_OP_(<=, a, b, __VA_ARGS__)
#define WEFT_ENFORCE_GE(a, b, ...) WEFT_ENFORCE_OP_(>=, a, b, __VA_ARGS__)
#define WEFT_ENFORCE_GT(a, b, ...) WEFT_ENFORCE_OP_(>, a, b, __VA_ARGS__)
