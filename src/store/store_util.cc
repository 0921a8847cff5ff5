#include "store/store_util.h"

#include <fmt/format.h>

#include <charconv>

#include "weft/errors.h"

namespace weft::store {

Deadline deadline_for(Timeout timeout, Timeout def) {
  // ~100 years: far enough to mean "no deadline", near enough not to overflow.
  constexpr Timeout kFar = std::chrono::hours(24 * 365 * 100);
  return Deadline::after(std::min(resolve_timeout(timeout, def), kFar));
}

std::string quote(std::string_view key) {
  constexpr size_t kShown = 120;
  std::string out = "'";
  for (size_t i = 0; i < key.size() && i < kShown; ++i) {
    auto c = static_cast<unsigned char>(key[i]);
    if (c == '\'' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      out += fmt::format("\\x{:02x}", c);
    }
  }
  out += '\'';
  if (key.size() > kShown) out += fmt::format("...({} bytes)", key.size());
  return out;
}

std::string call_name(std::string_view op, std::string_view key) {
  return fmt::format("store {}({})", op, quote(key));
}

std::string call_name(std::string_view op, const std::vector<std::string>& keys) {
  constexpr size_t kShown = 8;
  std::string list;
  for (size_t i = 0; i < keys.size() && i < kShown; ++i) {
    if (i > 0) list += ", ";
    list += quote(keys[i]);
  }
  if (keys.size() > kShown) list += fmt::format(", ... {} keys", keys.size());
  return fmt::format("store {}({})", op, list);
}

void check_key(std::string_view op, std::string_view key) {
  if (key.size() > kMaxStoreKeyBytes) {
    throw InvalidArgument(fmt::format("{}: the key has {} bytes, above the limit of {} bytes",
                                      call_name(op, key), key.size(), kMaxStoreKeyBytes));
  }
}

void check_value(std::string_view op, std::string_view key, size_t bytes) {
  if (bytes > kMaxStoreValueBytes) {
    throw InvalidArgument(fmt::format("{}: the value has {} bytes, above the limit of {} bytes",
                                      call_name(op, key), bytes, kMaxStoreValueBytes));
  }
}

void check_wait_keys(const std::vector<std::string>& keys) {
  if (keys.size() > kMaxWaitKeys) {
    throw InvalidArgument(fmt::format("{}: waits for {} keys, above the limit of {}",
                                      call_name("wait", keys), keys.size(), kMaxWaitKeys));
  }
  size_t total = 0;
  for (const auto& k : keys) {
    check_key("wait", k);
    total += 4 + k.size();
  }
  if (total > kMaxWaitListBytes) {
    throw InvalidArgument(fmt::format("{}: the key list has {} bytes, above the limit of {} bytes",
                                      call_name("wait", keys), total, kMaxWaitListBytes));
  }
}

void throw_timeout(const std::string& call, Timeout timeout, std::string_view detail) {
  throw TimeoutError(fmt::format("{} timed out after {}{}", call, format_timeout(timeout), detail),
                     -1, call);
}

int64_t add_to_value(std::string_view key, const std::string* current, int64_t delta) {
  int64_t value = 0;
  if (current != nullptr) {
    const char* begin = current->data();
    const char* end = begin + current->size();
    auto [ptr, ec] = std::from_chars(begin, end, value);
    if (current->empty() || ec != std::errc() || ptr != end) {
      throw StoreError(fmt::format("store add({}): the current value {} is not a decimal int64",
                                   quote(key), quote(*current)));
    }
  }
  int64_t sum = 0;
  if (__builtin_add_overflow(value, delta, &sum)) {
    throw StoreError(
        fmt::format("store add({}): {} + {} overflows int64", quote(key), value, delta));
  }
  return sum;
}

}  // namespace weft::store
