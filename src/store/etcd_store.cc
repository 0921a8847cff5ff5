// EtcdStore: the Store interface over an etcd v3 cluster's JSON gateway.
//
// Layout in etcd: a key K of the store is "<prefix>/k/" + K; the markers of
// a client are "<prefix>/m/<client id>/<slot>". Keys and values are base64
// in the JSON of the gateway (POST /v3/kv/put, /v3/kv/range, /v3/kv/txn,
// /v3/kv/deleterange).
//
// Resending. Every request may be resent: to the next endpoint when a member
// cannot be reached (connection refused, the member is down), stops answering
// (attempt_timeout), answers "unavailable" (no leader yet) or drops the
// connection before answering. set is idempotent; get/try_get/wait read.
// add, compare_set and remove are transactions that also write a marker
// (slot key of this client := a sequence number unique to the call) and,
// when their comparison fails, read the marker back: a resent transaction
// whose first copy was applied finds its own sequence number there and
// reports the first copy's result. add compares the key's mod_revision with
// the one it read, so that two copies of one add can never both apply.
//
// libcurl lives only in this file.
#include <curl/curl.h>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "core/log.h"
#include "core/mutex.h"
#include "core/socket.h"
#include "store/store_util.h"
#include "weft/errors.h"
#include "weft/store.h"

namespace weft {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

// The most keys one wait() look asks for in one transaction (etcd's
// --max-txn-ops is 128 by default).
constexpr size_t kKeysPerLook = 100;
// Back-off of polling get()/wait() and of retries: 2 ms doubling to 50 ms.
constexpr Timeout kFirstBackoff = 2ms;
constexpr Timeout kMaxBackoff = 50ms;
// Longest answer read from etcd: a value at the limit in base64, its key, and
// the JSON around them (a wait() look carries keys only: at most
// kKeysPerLook keys of kMaxStoreKeyBytes, in base64).
constexpr size_t kMaxAnswerBytes = (kMaxEtcdValueBytes / 3 + 1) * 4 * 2 + (2u << 20);

// --- base64 (RFC 4648, with padding), strict on decoding.

constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

std::string b64(std::string_view in) {
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= in.size(); i += 3) {
    uint32_t v = (uint32_t(uint8_t(in[i])) << 16) | (uint32_t(uint8_t(in[i + 1])) << 8) |
                 uint32_t(uint8_t(in[i + 2]));
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
    out += kAlphabet[v & 63];
  }
  if (size_t rest = in.size() - i; rest > 0) {
    uint32_t v = uint32_t(uint8_t(in[i])) << 16;
    if (rest == 2) v |= uint32_t(uint8_t(in[i + 1])) << 8;
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += rest == 2 ? kAlphabet[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

// False when `in` is not canonical base64.
bool unb64(std::string_view in, std::string* out) {
  if (in.size() % 4 != 0) return false;
  out->clear();
  out->reserve(in.size() / 4 * 3);
  auto digit = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  for (size_t i = 0; i < in.size(); i += 4) {
    const bool last = i + 4 == in.size();
    int pad = 0;
    if (last && in[i + 3] == '=') pad = in[i + 2] == '=' ? 2 : 1;
    uint32_t v = 0;
    for (size_t j = 0; j < 4; ++j) {
      int d = j >= 4 - static_cast<size_t>(pad) ? 0 : digit(in[i + j]);
      if (d < 0) return false;
      v = (v << 6) | static_cast<uint32_t>(d);
    }
    out->push_back(static_cast<char>(v >> 16));
    if (pad < 2) out->push_back(static_cast<char>((v >> 8) & 0xff));
    if (pad < 1) out->push_back(static_cast<char>(v & 0xff));
  }
  return true;
}

// The key just after every key starting with `prefix` (etcd's range_end of a
// prefix range).
std::string prefix_end(std::string prefix) {
  while (!prefix.empty()) {
    auto& c = reinterpret_cast<unsigned char&>(prefix.back());
    if (c < 0xff) {
      ++c;
      return prefix;
    }
    prefix.pop_back();
  }
  return std::string(1, '\0');
}

int64_t parse_i64(const json& v) {
  // The gateway writes int64 fields as strings.
  if (v.is_number_integer()) return v.get<int64_t>();
  if (!v.is_string()) return -1;
  const auto& s = v.get_ref<const std::string&>();
  int64_t out = -1;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && p == s.data() + s.size() ? out : -1;
}

void global_init() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
      throw StoreError("etcd store: libcurl failed to initialize");
    }
  });
}

// One kv of a range answer.
struct Kv {
  std::string value;
  int64_t mod_revision = 0;
};

// An HTTP answer, or why there is none.
struct Attempt {
  enum Kind { Answer, Unreachable, Lost, TooLarge } kind = Answer;
  long status = 0;
  std::string body;
  std::string error;  // curl's message
};

struct Sink {
  std::string* body;
  bool too_large = false;
};

size_t on_data(char* data, size_t size, size_t n, void* user) {
  auto* sink = static_cast<Sink*>(user);
  const size_t bytes = size * n;
  if (sink->body->size() + bytes > kMaxAnswerBytes) {
    sink->too_large = true;
    return 0;  // curl stops with CURLE_WRITE_ERROR
  }
  sink->body->append(data, bytes);
  return bytes;
}

}  // namespace

bool is_etcd_url(std::string_view text) { return text.starts_with("etcd://"); }

EtcdStoreOptions parse_etcd_url(std::string_view url, std::string_view what) {
  auto bad = [&](std::string_view why) {
    return InvalidArgument(
        fmt::format("{}='{}' is invalid: {} (expected etcd://HOST:PORT[,HOST:PORT...][/PREFIX])",
                    what, url.substr(0, 300), why));
  };
  if (!is_etcd_url(url)) throw bad("it does not start with etcd://");
  std::string_view rest = url.substr(7);
  EtcdStoreOptions o;
  // The endpoints end at the first '/' that is not inside [IPv6].
  size_t slash = std::string_view::npos;
  bool in_brackets = false;
  for (size_t i = 0; i < rest.size(); ++i) {
    if (rest[i] == '[') in_brackets = true;
    if (rest[i] == ']') in_brackets = false;
    if (rest[i] == '/' && !in_brackets) {
      slash = i;
      break;
    }
  }
  std::string_view hosts = rest.substr(0, slash);
  if (slash != std::string_view::npos) {
    std::string_view prefix = rest.substr(slash + 1);
    while (prefix.ends_with('/')) prefix.remove_suffix(1);
    if (prefix.empty()) throw bad("the prefix after '/' is empty");
    if (prefix.size() > 512) throw bad("the prefix is longer than 512 bytes");
    for (char c : prefix) {
      if (static_cast<unsigned char>(c) < 0x21 || static_cast<unsigned char>(c) > 0x7e) {
        throw bad("the prefix has a space or a non-printable byte");
      }
    }
    o.prefix = std::string(prefix);
  }
  if (hosts.empty()) throw bad("no endpoint");
  while (!hosts.empty()) {
    size_t comma = hosts.find(',');
    std::string_view one = hosts.substr(0, comma);
    if (one.empty()) throw bad("an empty endpoint");
    std::pair<std::string, uint16_t> hp;
    try {
      hp = net::split_host_port(one, "endpoint");
    } catch (const Error& e) {
      throw bad(e.what());
    }
    if (hp.second == 0) throw bad(fmt::format("endpoint '{}' has port 0", one));
    o.endpoints.push_back(net::join_host_port(hp.first, hp.second));
    if (o.endpoints.size() > 64) throw bad("more than 64 endpoints");
    hosts = comma == std::string_view::npos ? std::string_view() : hosts.substr(comma + 1);
    if (comma != std::string_view::npos && hosts.empty()) throw bad("an empty endpoint");
  }
  return o;
}

struct EtcdStore::Impl {
  EtcdStoreOptions opt;
  std::vector<std::string> urls;  // "http://host:port"
  std::string keys_prefix;        // "<prefix>/k/"
  std::string markers_prefix;     // "<prefix>/m/<client id>/"

  std::atomic<size_t> current{0};
  std::atomic<uint64_t> failovers{0};
  std::atomic<uint64_t> next_seq{1};
  std::atomic<size_t> waiting{0};
  std::atomic<uint64_t> looks{0};

  Mutex mu;
  std::vector<CURL*> handles GUARDED_BY(mu);  // idle easy handles (each keeps its connections)
  std::vector<int> free_slots GUARDED_BY(mu);
  int slots GUARDED_BY(mu) = 0;

  ~Impl() {
    MutexLock lock(&mu);
    for (CURL* h : handles) curl_easy_cleanup(h);
  }

  std::string ekey(std::string_view key) const { return b64(keys_prefix + std::string(key)); }

  CURL* take_handle() {
    {
      MutexLock lock(&mu);
      if (!handles.empty()) {
        CURL* h = handles.back();
        handles.pop_back();
        return h;
      }
    }
    CURL* h = curl_easy_init();
    if (h == nullptr) throw StoreError("etcd store: curl_easy_init failed");
    return h;
  }
  void give_handle(CURL* h) {
    MutexLock lock(&mu);
    handles.push_back(h);
  }

  // A marker slot for one call, and its return.
  int take_slot() {
    MutexLock lock(&mu);
    if (!free_slots.empty()) {
      int s = free_slots.back();
      free_slots.pop_back();
      return s;
    }
    return slots++;
  }
  void give_slot(int s) {
    MutexLock lock(&mu);
    free_slots.push_back(s);
  }

  // One POST to one endpoint.
  Attempt post(const std::string& url, const std::string& body, const Deadline& deadline) {
    CURL* h = take_handle();
    Attempt a;
    Sink sink{&a.body};
    char errbuf[CURL_ERROR_SIZE] = {0};
    curl_slist* headers = nullptr;
    headers = curl_slist_append(headers, "Content-Type: application/json");
    headers = curl_slist_append(headers, "Expect:");
    const long ms = std::max<long>(
        1, static_cast<long>(std::min<int64_t>(
               std::chrono::duration_cast<std::chrono::milliseconds>(deadline.remaining()).count(),
               opt.attempt_timeout.count())));
    curl_easy_reset(h);
    curl_easy_setopt(h, CURLOPT_URL, url.c_str());
    curl_easy_setopt(h, CURLOPT_POST, 1L);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body.data());
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(body.size()));
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &sink);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, ms);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, std::min<long>(ms, 2000));
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http");
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(h, CURLOPT_PROXY, "");  // loopback and cluster members: never via a proxy
    CURLcode rc = curl_easy_perform(h);
    curl_slist_free_all(headers);
    if (rc == CURLE_OK) {
      curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &a.status);
      give_handle(h);
      return a;
    }
    a.error = errbuf[0] != '\0' ? std::string(errbuf) : std::string(curl_easy_strerror(rc));
    if (sink.too_large) {
      a.kind = Attempt::TooLarge;
    } else if (rc == CURLE_COULDNT_CONNECT || rc == CURLE_COULDNT_RESOLVE_HOST) {
      a.kind = Attempt::Unreachable;
    } else {
      a.kind = Attempt::Lost;
    }
    // A handle whose connection failed starts afresh.
    curl_easy_cleanup(h);
    return a;
  }

  // Sends body to path ("/v3/kv/range"), moving on to the next endpoint when
  // a member cannot answer, until the deadline. Returns the parsed answer.
  json call(const char* path, const std::string& body, const std::string& name,
            const Deadline& deadline) {
    Timeout backoff = kFirstBackoff;
    std::string last;  // the last failure, for the final error
    size_t tries_since_success = 0;
    bool all_unreachable = true;
    for (;;) {
      const size_t idx = current.load() % opt.endpoints.size();
      const std::string& endpoint = opt.endpoints[idx];
      Attempt a = post(urls[idx] + path, body, deadline);
      bool move_on = false;
      if (a.kind == Attempt::Answer && a.status == 200) {
        json j = json::parse(a.body, nullptr, false);
        if (j.is_discarded() || !j.is_object()) {
          throw StoreError(fmt::format("{}: etcd at {} answered {} with invalid JSON ({} bytes)",
                                       name, endpoint, path, a.body.size()));
        }
        return j;
      }
      if (a.kind == Attempt::TooLarge) {
        throw StoreError(fmt::format("{}: etcd at {} answered {} with more than {} bytes", name,
                                     endpoint, path, kMaxAnswerBytes));
      }
      if (a.kind == Attempt::Answer) {
        json j = json::parse(a.body, nullptr, false);
        int64_t code = -1;
        std::string message = a.body.substr(0, 200);
        if (j.is_object()) {
          if (j.contains("code")) code = parse_i64(j["code"]);
          if (j.contains("message") && j["message"].is_string()) {
            message = j["message"].get<std::string>().substr(0, 300);
          }
        }
        // gRPC codes worth another try elsewhere: 4 deadline exceeded, 8
        // resource exhausted, 10 aborted, 14 unavailable (no leader yet).
        if (code != 4 && code != 8 && code != 10 && code != 14) {
          std::string hint;
          if (message.find("too large") != std::string::npos) {
            hint = "; raise the members' --max-request-bytes";
          }
          throw StoreError(fmt::format("{}: etcd at {} refused {} (HTTP {}, code {}): {}{}", name,
                                       endpoint, path, a.status, code, message, hint));
        }
        last = fmt::format("etcd at {}: {} (HTTP {}, code {})", endpoint, message, a.status, code);
        all_unreachable = false;
        move_on = true;
      } else {
        last = fmt::format("etcd at {}: {}", endpoint, a.error);
        if (a.kind != Attempt::Unreachable) all_unreachable = false;
        move_on = true;
      }
      // An attempt cut short by the call's own deadline says nothing about
      // the member: no failover then.
      if (move_on && a.kind != Attempt::Answer && deadline.expired()) move_on = false;
      if (move_on) {
        size_t expected = idx;
        if (opt.endpoints.size() > 1 &&
            current.compare_exchange_strong(expected, (idx + 1) % opt.endpoints.size())) {
          failovers.fetch_add(1);
          WEFT_WARN("{}: {}; trying {}", name, last,
                    opt.endpoints[(idx + 1) % opt.endpoints.size()]);
        }
        ++tries_since_success;
      }
      if (deadline.expired()) {
        if (all_unreachable) {
          throw StoreError(fmt::format("{}: cannot reach etcd at any of {} within {} (last: {})",
                                       name, fmt::join(opt.endpoints, ", "),
                                       format_timeout(deadline.budget()), last));
        }
        store::throw_timeout(name, deadline.budget(), fmt::format(" (last: {})", last));
      }
      // Once around every endpoint, pause before the next round.
      if (tries_since_success % opt.endpoints.size() == 0) {
        std::this_thread::sleep_for(
            std::min<std::chrono::nanoseconds>(backoff, deadline.remaining()));
        backoff = std::min(backoff * 2, Timeout(500ms));
      }
    }
  }

  // The kvs of a range answer (a top-level one or a txn's response_range).
  static std::optional<Kv> first_kv(const json& range, const std::string& name) {
    if (!range.is_object() || !range.contains("kvs")) return std::nullopt;
    const json& kvs = range["kvs"];
    if (!kvs.is_array() || kvs.empty()) return std::nullopt;
    const json& kv = kvs[0];
    Kv out;
    if (!kv.is_object()) throw StoreError(name + ": etcd answered a malformed kv");
    if (kv.contains("value")) {
      if (!kv["value"].is_string() ||
          !unb64(kv["value"].get_ref<const std::string&>(), &out.value)) {
        throw StoreError(name + ": etcd answered a value that is not base64");
      }
    }
    out.mod_revision = kv.contains("mod_revision") ? parse_i64(kv["mod_revision"]) : -1;
    if (out.mod_revision <= 0) throw StoreError(name + ": etcd answered a kv without mod_revision");
    return out;
  }

  std::optional<Kv> range(std::string_view key, const std::string& name, const Deadline& dl) {
    json req = {{"key", ekey(key)}};
    return first_kv(call("/v3/kv/range", req.dump(), name, dl), name);
  }

  // The response_range of response i of a txn answer.
  static const json& txn_range(const json& answer, size_t i, const std::string& name) {
    static const json kNone = json::object();
    if (!answer.contains("responses")) return kNone;
    const json& r = answer["responses"];
    if (!r.is_array() || r.size() <= i) throw StoreError(name + ": etcd answered a short txn");
    if (!r[i].is_object() || !r[i].contains("response_range")) return kNone;
    return r[i]["response_range"];
  }

  static bool succeeded(const json& answer) {
    return answer.contains("succeeded") && answer["succeeded"].is_boolean() &&
           answer["succeeded"].get<bool>();
  }

  // The marker of a call: its key and its sequence number.
  struct Marker {
    Impl* impl;
    int slot;
    std::string key;  // base64 of the etcd key
    std::string seq;  // base64 of the sequence number
    explicit Marker(Impl* i) : impl(i), slot(i->take_slot()) {
      key = b64(impl->markers_prefix + std::to_string(slot));
      seq = b64(std::to_string(impl->next_seq.fetch_add(1)));
    }
    ~Marker() { impl->give_slot(slot); }
    Marker(const Marker&) = delete;
    Marker& operator=(const Marker&) = delete;
    json put() const { return {{"request_put", {{"key", key}, {"value", seq}}}}; }
    json read() const { return {{"request_range", {{"key", key}}}}; }
    // Whether a failed txn's answer shows that an earlier copy applied.
    bool applied(const json& answer, size_t i, const std::string& name) const {
      const json& r = txn_range(answer, i, name);
      if (!r.contains("kvs") || !r["kvs"].is_array() || r["kvs"].empty()) return false;
      const json& kv = r["kvs"][0];
      return kv.is_object() && kv.contains("value") && kv["value"] == seq;
    }
  };
};

EtcdStore::EtcdStore(EtcdStoreOptions options) : impl_(std::make_unique<Impl>()) {
  global_init();
  if (options.endpoints.empty()) throw InvalidArgument("EtcdStore: no endpoints");
  if (options.prefix.empty()) throw InvalidArgument("EtcdStore: the prefix is empty");
  if (options.attempt_timeout <= Timeout::zero()) {
    throw InvalidArgument("EtcdStore: attempt_timeout must be positive");
  }
  for (const auto& e : options.endpoints) {
    auto [host, port] = net::split_host_port(e, "EtcdStore endpoint");
    if (port == 0) throw InvalidArgument(fmt::format("EtcdStore endpoint '{}': port 0", e));
    impl_->urls.push_back("http://" + net::join_host_port(host, port));
  }
  impl_->opt = std::move(options);
  const std::string& p = impl_->opt.prefix;
  impl_->keys_prefix = p + "/k/";
  std::random_device rd;
  impl_->markers_prefix = fmt::format("{}/m/{:08x}{:08x}{:08x}/", p, rd(), rd(), rd());
  // Spread clients over the members.
  impl_->current = rd() % impl_->opt.endpoints.size();
}

EtcdStore::~EtcdStore() {
  // Best effort: the markers of this client are of no use to anyone now.
  try {
    json req = {{"key", b64(impl_->markers_prefix)},
                {"range_end", b64(prefix_end(impl_->markers_prefix))}};
    impl_->call("/v3/kv/deleterange", req.dump(), "etcd store: deleting markers",
                Deadline::after(1s));
  } catch (const std::exception&) {
  }
}

Timeout EtcdStore::default_timeout() const {
  return resolve_timeout(impl_->opt.timeout, kDefaultStoreTimeout);
}

std::string EtcdStore::current_endpoint() const {
  return impl_->opt.endpoints[impl_->current.load() % impl_->opt.endpoints.size()];
}

uint64_t EtcdStore::failovers() const { return impl_->failovers.load(); }

StoreWaitStats EtcdStore::wait_stats() const {
  return {impl_->waiting.load(), impl_->looks.load()};
}

namespace {
void check_etcd_value(std::string_view op, std::string_view key, size_t bytes) {
  store::check_value(op, key, bytes);
  if (bytes > kMaxEtcdValueBytes) {
    throw InvalidArgument(
        fmt::format("{}: the value has {} bytes, above the etcd store's limit of {} bytes (etcd's "
                    "--max-request-bytes, 1.5 MiB by default, bounds a request)",
                    store::call_name(op, key), bytes, kMaxEtcdValueBytes));
  }
}
}  // namespace

void EtcdStore::connect(Timeout timeout) {
  auto dl = store::deadline_for(timeout, default_timeout());
  json req = {{"key", impl_->ekey("")}, {"count_only", true}};
  impl_->call("/v3/kv/range", req.dump(), "etcd store connect", dl);
}

int64_t EtcdStore::clear(Timeout timeout) {
  auto dl = store::deadline_for(timeout, default_timeout());
  const std::string all = impl_->opt.prefix + "/";
  json req = {{"key", b64(all)}, {"range_end", b64(prefix_end(all))}};
  json answer = impl_->call("/v3/kv/deleterange", req.dump(), "etcd store clear", dl);
  return answer.contains("deleted") ? std::max<int64_t>(0, parse_i64(answer["deleted"])) : 0;
}

void EtcdStore::set(std::string_view key, std::string_view value, Timeout timeout) {
  store::check_key("set", key);
  check_etcd_value("set", key, value.size());
  auto dl = store::deadline_for(timeout, default_timeout());
  json req = {{"key", impl_->ekey(key)}, {"value", b64(value)}};
  impl_->call("/v3/kv/put", req.dump(), store::call_name("set", key), dl);
}

std::optional<std::string> EtcdStore::try_get(std::string_view key, Timeout timeout) {
  store::check_key("try_get", key);
  auto dl = store::deadline_for(timeout, default_timeout());
  auto kv = impl_->range(key, store::call_name("try_get", key), dl);
  if (!kv) return std::nullopt;
  return std::move(kv->value);
}

std::string EtcdStore::get(std::string_view key, Timeout timeout) {
  store::check_key("get", key);
  const Timeout t = resolve_timeout(timeout, default_timeout());
  auto dl = store::deadline_for(t, default_timeout());
  const std::string name = store::call_name("get", key);
  bool counted = false;
  Timeout backoff = kFirstBackoff;
  struct Uncount {
    Impl* impl;
    bool* counted;
    ~Uncount() {
      if (*counted) impl->waiting.fetch_sub(1);
    }
  } uncount{impl_.get(), &counted};
  for (;;) {
    if (auto kv = impl_->range(key, name, dl)) return std::move(kv->value);
    if (counted) impl_->looks.fetch_add(1);
    if (!counted) {
      counted = true;
      impl_->waiting.fetch_add(1);
    }
    std::this_thread::sleep_for(std::min<std::chrono::nanoseconds>(backoff, dl.remaining()));
    if (dl.expired()) store::throw_timeout(name, t);
    backoff = std::min(backoff * 2, kMaxBackoff);
  }
}

void EtcdStore::wait(const std::vector<std::string>& keys, Timeout timeout) {
  store::check_wait_keys(keys);
  if (keys.empty()) return;
  const Timeout t = resolve_timeout(timeout, default_timeout());
  auto dl = store::deadline_for(t, default_timeout());
  const std::string name = store::call_name("wait", keys);
  std::vector<std::string> missing = keys;
  bool counted = false;
  Timeout backoff = kFirstBackoff;
  struct Uncount {
    Impl* impl;
    bool* counted;
    ~Uncount() {
      if (*counted) impl->waiting.fetch_sub(1);
    }
  } uncount{impl_.get(), &counted};
  for (;;) {
    // One look: which of the missing keys exist now (keys only, in chunks).
    std::vector<std::string> still;
    for (size_t begin = 0; begin < missing.size(); begin += kKeysPerLook) {
      const size_t end = std::min(missing.size(), begin + kKeysPerLook);
      json ops = json::array();
      for (size_t i = begin; i < end; ++i) {
        ops.push_back(
            {{"request_range", {{"key", impl_->ekey(missing[i])}, {"count_only", true}}}});
      }
      json req = {{"success", ops}};
      json answer = impl_->call("/v3/kv/txn", req.dump(), name, dl);
      for (size_t i = begin; i < end; ++i) {
        const json& r = Impl::txn_range(answer, i - begin, name);
        const bool present = r.contains("count") && parse_i64(r["count"]) > 0;
        if (!present) still.push_back(missing[i]);
      }
    }
    missing = std::move(still);
    if (missing.empty()) return;
    if (counted) impl_->looks.fetch_add(1);
    if (!counted) {
      counted = true;
      impl_->waiting.fetch_add(1);
    }
    std::this_thread::sleep_for(std::min<std::chrono::nanoseconds>(backoff, dl.remaining()));
    if (dl.expired()) {
      store::throw_timeout(name, t, fmt::format(" (still missing: {})", store::quote(missing[0])));
    }
    backoff = std::min(backoff * 2, kMaxBackoff);
  }
}

int64_t EtcdStore::add(std::string_view key, int64_t delta, Timeout timeout) {
  store::check_key("add", key);
  auto dl = store::deadline_for(timeout, default_timeout());
  const std::string name = store::call_name("add", key);
  const std::string k = impl_->ekey(key);
  std::optional<Kv> cur = impl_->range(key, name, dl);
  Timeout backoff = 1ms;
  for (;;) {
    const int64_t sum = store::add_to_value(key, cur ? &cur->value : nullptr, delta);
    Impl::Marker marker(impl_.get());
    json compare = cur ? json{{"target", "MOD"},
                              {"key", k},
                              {"mod_revision", std::to_string(cur->mod_revision)}}
                       : json{{"target", "CREATE"}, {"key", k}, {"create_revision", "0"}};
    json req = {{"compare", json::array({compare})},
                {"success",
                 json::array({{{"request_put", {{"key", k}, {"value", b64(std::to_string(sum))}}}},
                              marker.put()})},
                {"failure", json::array({{{"request_range", {{"key", k}}}}, marker.read()})}};
    json answer = impl_->call("/v3/kv/txn", req.dump(), name, dl);
    if (Impl::succeeded(answer) || marker.applied(answer, 1, name)) return sum;
    // Another writer came first: go again from the value it left.
    cur = Impl::first_kv(Impl::txn_range(answer, 0, name), name);
    if (dl.expired()) store::throw_timeout(name, dl.budget(), " (contended)");
    // With jitter, so that contending clients do not retry in lockstep.
    thread_local std::minstd_rand jitter(std::random_device{}());
    std::this_thread::sleep_for(backoff * (50 + jitter() % 100) / 100);
    backoff = std::min(backoff * 2, Timeout(20ms));
  }
}

CompareSetResult EtcdStore::compare_set(std::string_view key,
                                        const std::optional<std::string>& expected,
                                        std::string_view desired, Timeout timeout) {
  store::check_key("compare_set", key);
  check_etcd_value("compare_set", key, desired.size());
  if (expected) check_etcd_value("compare_set", key, expected->size());
  auto dl = store::deadline_for(timeout, default_timeout());
  const std::string name = store::call_name("compare_set", key);
  const std::string k = impl_->ekey(key);
  Impl::Marker marker(impl_.get());
  json compare = expected ? json{{"target", "VALUE"}, {"key", k}, {"value", b64(*expected)}}
                          : json{{"target", "CREATE"}, {"key", k}, {"create_revision", "0"}};
  json req = {{"compare", json::array({compare})},
              {"success", json::array({{{"request_put", {{"key", k}, {"value", b64(desired)}}}},
                                       marker.put()})},
              {"failure", json::array({{{"request_range", {{"key", k}}}}, marker.read()})}};
  json answer = impl_->call("/v3/kv/txn", req.dump(), name, dl);
  CompareSetResult out;
  if (Impl::succeeded(answer) || marker.applied(answer, 1, name)) {
    out.swapped = true;
    out.current = std::string(desired);
    return out;
  }
  if (auto kv = Impl::first_kv(Impl::txn_range(answer, 0, name), name)) {
    out.current = std::move(kv->value);
  }
  return out;
}

bool EtcdStore::remove(std::string_view key, Timeout timeout) {
  store::check_key("remove", key);
  auto dl = store::deadline_for(timeout, default_timeout());
  const std::string name = store::call_name("remove", key);
  const std::string k = impl_->ekey(key);
  Impl::Marker marker(impl_.get());
  // Deletes only when the key exists, so that success means "it existed".
  json req = {
      {"compare",
       json::array(
           {{{"target", "CREATE"}, {"key", k}, {"result", "GREATER"}, {"create_revision", "0"}}})},
      {"success", json::array({{{"request_delete_range", {{"key", k}}}}, marker.put()})},
      {"failure", json::array({marker.read()})}};
  json answer = impl_->call("/v3/kv/txn", req.dump(), name, dl);
  return Impl::succeeded(answer) || marker.applied(answer, 0, name);
}

}  // namespace weft
