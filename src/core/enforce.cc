#include "core/enforce.h"

namespace weft::detail {

void enforce_fail(const char* file, int line, const std::string& condition,
                  const std::string& message) {
  std::string what =
      fmt::format("internal error: check failed: {} at {}:{}", condition, file, line);
  if (!message.empty()) what += ": " + message;
  throw InternalError(what);
}

}  // namespace weft::detail
