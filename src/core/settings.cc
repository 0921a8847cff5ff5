#include "core/settings.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <set>

#include "core/log.h"
#include "core/mutex.h"
#include "core/socket.h"
#include "weft/errors.h"

extern char** environ;  // NOLINT: POSIX

namespace weft::settings {
namespace {

// The table of every setting, in documentation order (`weft config`).
constexpr std::array<const Setting*, 54> kAll = {
    &kRank,
    &kWorldSize,
    &kLocalRank,
    &kLocalSize,
    &kNnodes,
    &kNodeRank,
    &kMember,
    &kElastic,
    &kStore,
    &kStoreExternal,
    &kStorePort,
    &kElasticSettle,
    &kElasticMinWait,
    &kElasticJoinWait,
    &kStoreMaxBytes,
    &kJobToken,
    &kAllowUnauthenticated,
    &kTimeout,
    &kStoreTimeout,
    &kRendezvousLogInterval,
    &kHeartbeatInterval,
    &kHeartbeatTimeout,
    &kIfname,
    &kAddress,
    &kHostId,
    &kShm,
    &kShmCma,
    &kShmCmaMin,
    &kShmRing,
    &kSocketsPerPeer,
    &kSocketBuffer,
    &kMaxUnexpected,
    &kSpinUs,
    &kSpinYieldUs,
    &kSegmentBytes,
    &kReduceIsa,
    &kModelLatencyNs,
    &kModelMbps,
    &kModelReduceMbps,
    &kModelInterLatencyNs,
    &kModelInterMbps,
    &kHierBlockBytes,
    &kBarrierAlgo,
    &kBroadcastAlgo,
    &kAllreduceAlgo,
    &kReduceAlgo,
    &kAllgatherAlgo,
    &kAllgathervAlgo,
    &kReduceScatterAlgo,
    &kGatherAlgo,
    &kScatterAlgo,
    &kAlltoallAlgo,
    &kAlltoallvAlgo,
    &kLogLevel,
};

// Indexed by weft::Collective (Barrier = 1 .. Alltoallv = 11).
constexpr std::array<const EnumSetting*, 12> kAlgoOf = {
    nullptr,      &kBarrierAlgo,   &kBroadcastAlgo,  &kAllreduceAlgo,
    &kReduceAlgo, &kAllgatherAlgo, &kAllgathervAlgo, &kReduceScatterAlgo,
    &kGatherAlgo, &kScatterAlgo,   &kAlltoallAlgo,   &kAlltoallvAlgo};

[[noreturn]] void undeclared(std::string_view env) {
  throw InternalError(fmt::format(
      "{} is read but not declared: declare it in src/core/settings.h and list it in kAll", env));
}

// The declaration of s, checking that s is the one listed.
const Setting& declared(const Setting& s) {
  const Setting* d = find(s.env);
  if (d != &s) undeclared(s.env);
  return s;
}

std::optional<std::string> raw(std::string_view env) {
  const char* v = std::getenv(std::string(env).c_str());
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

// The value of a declared setting, checked (nullopt when unset).
std::optional<std::string> checked(const Setting& s) {
  auto v = raw(declared(s).env);
  if (!v) return v;
  if (std::string why = problem(s, *v); !why.empty()) {
    if (s.flags & kSecret) throw InvalidArgument(fmt::format("{} is invalid: {}", s.env, why));
    throw InvalidArgument(fmt::format("{}='{}' is invalid: {}", s.env, *v, why));
  }
  return v;
}

// "64K" for 65536: the largest exact suffix.
std::string format_bytes(int64_t b) {
  if (b != 0 && b % (int64_t{1} << 30) == 0) return fmt::format("{}G", b >> 30);
  if (b != 0 && b % (int64_t{1} << 20) == 0) return fmt::format("{}M", b >> 20);
  if (b != 0 && b % (int64_t{1} << 10) == 0) return fmt::format("{}K", b >> 10);
  return std::to_string(b);
}

std::optional<int64_t> parse_int(std::string_view text) {
  std::string s(text);
  errno = 0;
  char* end = nullptr;
  long long x = std::strtoll(s.c_str(), &end, 10);
  if (errno != 0 || end == s.c_str() || *end != '\0') return std::nullopt;
  return x;
}

std::optional<bool> parse_bool(std::string_view v) {
  if (v == "1" || v == "true" || v == "yes" || v == "on") return true;
  if (v == "0" || v == "false" || v == "no" || v == "off") return false;
  return std::nullopt;
}

constexpr std::string_view kBytesExample = "a byte count such as 4096, 64K, 4M or 1G";

// Why text is not a byte count ("" when it is); x receives it.
std::string bytes_problem(std::string_view text, uint64_t* x) {
  std::string s(text);
  errno = 0;
  char* end = nullptr;
  unsigned long long n = std::strtoull(s.c_str(), &end, 10);
  if (s.empty() || !std::isdigit(static_cast<unsigned char>(s[0])) || errno != 0 ||
      end == s.c_str()) {
    return fmt::format("expected {}", kBytesExample);
  }
  uint64_t mult = 1;
  std::string_view suffix(end);
  if (suffix == "K" || suffix == "k" || suffix == "KiB")
    mult = 1ull << 10;
  else if (suffix == "M" || suffix == "m" || suffix == "MiB")
    mult = 1ull << 20;
  else if (suffix == "G" || suffix == "g" || suffix == "GiB")
    mult = 1ull << 30;
  else if (!suffix.empty())
    return fmt::format("expected {}", kBytesExample);
  if (n > UINT64_MAX / mult) return "expected a byte count below 2^64";
  *x = n * mult;
  return {};
}

std::string seconds_problem(std::string_view text, std::chrono::milliseconds* out,
                            bool zero_ok = false) {
  std::string s(text);
  errno = 0;
  char* end = nullptr;
  double x = std::strtod(s.c_str(), &end);
  if (end == s.c_str() || *end != '\0' || std::isnan(x)) {
    return "expected a positive number of seconds such as 30 or 0.5";
  }
  if (x == 0 && zero_ok) {
    *out = std::chrono::milliseconds(0);
    return {};
  }
  if (x <= 0) {
    return zero_ok ? "expected 0 (off) or a positive number of seconds such as 30 or 0.5"
                   : "expected a positive number of seconds such as 30 or 0.5";
  }
  if (!std::isfinite(x) || x > kMaxSeconds) {
    return fmt::format("too large: at most {:.0f} seconds (about 31 years)", kMaxSeconds);
  }
  *out =
      std::chrono::milliseconds(std::max<int64_t>(1, static_cast<int64_t>(std::llround(x * 1000))));
  return {};
}

bool is_choice(std::string_view choices, std::string_view v) {
  size_t start = 0;
  while (start <= choices.size()) {
    size_t bar = choices.find('|', start);
    if (bar == std::string_view::npos) bar = choices.size();
    if (choices.substr(start, bar - start) == v) return true;
    start = bar + 1;
  }
  return false;
}

// "a, b or c" from "a|b|c".
std::string list_choices(std::string_view choices) {
  std::string out;
  const size_t last = choices.rfind('|');
  for (size_t i = 0; i < choices.size(); ++i) {
    if (choices[i] != '|')
      out += choices[i];
    else
      out += i == last ? " or " : ", ";
  }
  return out;
}

// Levenshtein distance, for "did you mean".
size_t distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

}  // namespace

std::span<const Setting* const> all() { return kAll; }

const Setting* find(std::string_view env) {
  for (const Setting* s : kAll) {
    if (s->env == env) return s;
  }
  return nullptr;
}

const EnumSetting& algorithm_setting(Collective c) {
  const auto i = static_cast<size_t>(c);
  if (i == 0 || i >= kAlgoOf.size()) {
    throw InternalError(fmt::format("no algorithm setting for collective {}", i));
  }
  return *kAlgoOf[i];
}

std::string problem(const Setting& s, std::string_view v) {
  switch (s.type) {
    case Type::Int: {
      auto x = parse_int(v);
      if (!x || *x < s.min || *x > s.max) {
        return fmt::format("expected an integer in [{}, {}]", s.min, s.max);
      }
      return {};
    }
    case Type::Bytes: {
      uint64_t x = 0;
      if (std::string why = bytes_problem(v, &x); !why.empty()) return why;
      const bool auto_ok = (s.flags & kZeroOrPowerOf2) && x == 0;
      const std::string range = fmt::format("[{}, {}]", format_bytes(s.min), format_bytes(s.max));
      if (!auto_ok && (x < static_cast<uint64_t>(s.min) || x > static_cast<uint64_t>(s.max))) {
        return (s.flags & kZeroOrPowerOf2)
                   ? fmt::format("expected 0 or a power of two in {}", range)
                   : fmt::format("expected a byte count in {}", range);
      }
      if ((s.flags & kZeroOrPowerOf2) && (x & (x - 1)) != 0) {
        return fmt::format("not a power of two: expected 0 or a power of two in {}", range);
      }
      return {};
    }
    case Type::Seconds: {
      std::chrono::milliseconds ms{};
      return seconds_problem(v, &ms, (s.flags & kZeroTurnsOff) != 0);
    }
    case Type::Bool:
      return parse_bool(v) ? std::string() : "expected 1, 0, true, false, yes, no, on or off";
    case Type::String:
      if (static_cast<int64_t>(v.size()) < s.min) {
        return fmt::format("too short: {} bytes, expected at least {}", v.size(), s.min);
      }
      return {};
    case Type::Enum:
      return is_choice(s.choices, v) ? std::string()
                                     : fmt::format("expected {}", list_choices(s.choices));
    case Type::HostPort:
      // WEFT_STORE may name an etcd cluster instead (parse_etcd_url checks it).
      if (v.starts_with("etcd://") && v.size() > 7) return {};
      try {
        net::split_host_port(v, s.env);
        return {};
      } catch (const Error& e) {
        return e.what();
      }
    case Type::Algorithm:
      try {
        parse_algorithm(std::string(v));
        return {};
      } catch (const Error& e) {
        return e.what();
      }
  }
  return "unknown type";
}

std::string default_text(const Setting& s) {
  if (s.flags & kNoDefault) return "-";
  switch (s.type) {
    case Type::Int: return std::to_string(s.def);
    case Type::Bytes: return format_bytes(s.def);
    case Type::Seconds:
      return s.def % 1000 == 0 ? std::to_string(s.def / 1000)
                               : fmt::format("{}", static_cast<double>(s.def) / 1000);
    case Type::Bool: return s.def ? "1" : "0";
    default: return s.text_def.empty() ? "-" : std::string(s.text_def);
  }
}

int64_t get(const IntSetting& s) {
  auto v = checked(s);
  return v ? *parse_int(*v) : s.def;
}

uint64_t get(const BytesSetting& s) {
  auto v = checked(s);
  if (!v) return static_cast<uint64_t>(s.def);
  return parse_bytes(*v, s.env);
}

std::chrono::milliseconds get(const SecondsSetting& s) {
  auto v = checked(s);
  if (!v) return std::chrono::milliseconds(s.def);
  std::chrono::milliseconds ms{};
  seconds_problem(*v, &ms, (s.flags & kZeroTurnsOff) != 0);  // checked: valid
  return ms;
}

bool get(const BoolSetting& s) {
  auto v = checked(s);
  return v ? *parse_bool(*v) : s.def != 0;
}

std::string get(const StringSetting& s) { return checked(s).value_or(""); }

std::string get(const EnumSetting& s) {
  auto v = checked(s);
  return v ? *v : std::string(s.text_def);
}

bool is_set(const Setting& s) { return raw(declared(s).env).has_value(); }

std::optional<std::string> get(std::string_view env) {
  if (env.starts_with("WEFT_") && find(env) == nullptr) undeclared(env);
  return raw(env);
}

std::string get_string(std::string_view env, std::string_view def) {
  auto v = get(env);
  return v ? *v : std::string(def);
}

int64_t get_int(std::string_view env, int64_t def, int64_t min, int64_t max) {
  if (const Setting* s = env.starts_with("WEFT_") ? find(env) : nullptr) {
    checked(*s);
  } else if (env.starts_with("WEFT_")) {
    undeclared(env);
  }
  auto v = raw(env);
  if (!v) return def;
  auto x = parse_int(*v);
  if (!x || *x < min || *x > max) {
    throw InvalidArgument(
        fmt::format("{}='{}' is invalid: expected an integer in [{}, {}]", env, *v, min, max));
  }
  return *x;
}

std::vector<std::string> unknown_variables() {
  std::vector<std::string> out;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string_view kv(*e);
    if (!kv.starts_with("WEFT_")) continue;
    std::string_view name = kv.substr(0, kv.find('='));
    if (find(name) == nullptr) out.emplace_back(name);
  }
  return out;
}

void validate_environment() {
  for (const Setting* s : kAll) checked(*s);
  // The names already warned about, once per process.
  struct Warned {
    Mutex mu;
    std::set<std::string> names GUARDED_BY(mu);
  };
  static Warned warned;
  for (const auto& name : unknown_variables()) {
    {
      MutexLock lock(&warned.mu);
      if (!warned.names.insert(name).second) continue;
    }
    const Setting* best = nullptr;
    size_t best_d = 3;  // suggest only close names
    for (const Setting* s : kAll) {
      size_t d = distance(name, s->env);
      if (d < best_d) best = s, best_d = d;
    }
    WEFT_WARN("{} is not a Weft setting and is ignored{} (`weft config` lists them)", name,
              best ? fmt::format(": did you mean {}?", best->env) : std::string());
  }
}

uint64_t parse_bytes(std::string_view text, std::string_view what) {
  uint64_t x = 0;
  if (std::string why = bytes_problem(text, &x); !why.empty()) {
    throw InvalidArgument(fmt::format("{}='{}' is invalid: {}", what, text, why));
  }
  return x;
}

std::chrono::milliseconds parse_seconds(std::string_view text, std::string_view what) {
  std::chrono::milliseconds ms{};
  if (std::string why = seconds_problem(text, &ms); !why.empty()) {
    throw InvalidArgument(fmt::format("{}='{}' is invalid: {}", what, text, why));
  }
  return ms;
}

}  // namespace weft::settings
