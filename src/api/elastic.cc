// weft::ElasticGroup: generations of workers formed through the store
// (weft/elastic.h has the protocol).
#include "weft/elastic.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <charconv>
#include <thread>

#include "api/access.h"
#include "api/launch_store.h"
#include "comm/group.h"
#include "comm/world.h"
#include "core/launcher_watch.h"
#include "core/log.h"
#include "core/settings.h"
#include "weft/errors.h"
#include "weft/init.h"

namespace weft {
namespace {

using Clock = std::chrono::steady_clock;

// How often a worker forming a generation looks at the store: the price of
// a recovery is at most one of these after the last member registered.
constexpr auto kPoll = std::chrono::milliseconds(20);
// Longest member id: it travels in store keys and lists.
constexpr size_t kMaxMemberBytes = 128;
// Longest membership list read back from the store (kMaxRanks ids).
constexpr size_t kMaxListBytes = size_t{1} << 28;

constexpr const char* kGenerationKey = "weft/elastic/gen";
constexpr const char* kDoneKey = "weft/elastic/done";

std::string rdzv_key(uint32_t generation, std::string_view what) {
  return fmt::format("weft/elastic/rdzv/g{}/{}", generation, what);
}

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

int64_t parse_count(const std::optional<std::string>& v, std::string_view key) {
  if (!v) return 0;
  int64_t n = 0;
  auto [end, ec] = std::from_chars(v->data(), v->data() + v->size(), n);
  if (ec != std::errc() || end != v->data() + v->size() || n < 0) {
    throw DataError(fmt::format("elastic rendezvous: store key {} holds '{}', not a count", key,
                                v->substr(0, 32)));
  }
  return n;
}

std::vector<std::string> split_list(const std::string& s) {
  if (s.size() > kMaxListBytes) {
    throw DataError(fmt::format("elastic rendezvous: membership list of {} bytes", s.size()));
  }
  std::vector<std::string> out;
  size_t at = 0;
  while (at < s.size()) {
    size_t nl = s.find('\n', at);
    if (nl == std::string::npos) nl = s.size();
    out.push_back(s.substr(at, nl - at));
    at = nl + 1;
  }
  return out;
}

// Member ids in natural order ("n0.s2" before "n0.s10"): the first
// generation ranks the workers as their launchers numbered them.
bool natural_less(const std::string& a, const std::string& b) {
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const bool da = a[i] >= '0' && a[i] <= '9', db = b[j] >= '0' && b[j] <= '9';
    if (da && db) {
      size_t ei = i, ej = j;
      while (ei < a.size() && a[ei] >= '0' && a[ei] <= '9') ++ei;
      while (ej < b.size() && b[ej] >= '0' && b[ej] <= '9') ++ej;
      // Compare the numbers without leading zeros: longer is larger.
      size_t zi = i, zj = j;
      while (zi + 1 < ei && a[zi] == '0') ++zi;
      while (zj + 1 < ej && b[zj] == '0') ++zj;
      if (ei - zi != ej - zj) return ei - zi < ej - zj;
      const int c = a.compare(zi, ei - zi, b, zj, ej - zj);
      if (c != 0) return c < 0;
      i = ei;
      j = ej;
      continue;
    }
    if (a[i] != b[j]) return a[i] < b[j];
    ++i;
    ++j;
  }
  return a.size() - i < b.size() - j;
}

std::string join_list(const std::vector<std::string>& v) {
  return fmt::format("{}", fmt::join(v, "\n"));
}

bool contains(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

void check_member(const std::string& m) {
  if (m.empty() || m.size() > kMaxMemberBytes) {
    throw InvalidArgument(fmt::format("elastic member id '{}': must be 1 to {} characters",
                                      m.substr(0, kMaxMemberBytes), kMaxMemberBytes));
  }
  for (char c : m) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '-' || c == '_' || c == ':' || c == '@';
    if (!ok) {
      throw InvalidArgument(
          fmt::format("elastic member id '{}': only letters, digits and . - _ : @ are allowed", m));
    }
  }
}

// The member a failure names: the rank of a PeerError or TimeoutError, as
// a member of `members`; empty when it names none.
std::string culprit_of(const std::exception_ptr& cause, const std::vector<std::string>& members) {
  if (!cause) return {};
  int rank = -1;
  try {
    std::rethrow_exception(cause);
  } catch (const PeerError& e) {
    rank = e.rank();
  } catch (const TimeoutError& e) {
    rank = e.rank();
  } catch (...) {
  }
  if (rank < 0 || static_cast<size_t>(rank) >= members.size()) return {};
  return members[static_cast<size_t>(rank)];
}

std::string what_of(const std::exception_ptr& cause) {
  if (!cause) return "unknown error";
  try {
    std::rethrow_exception(cause);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown error";
  }
}

std::pair<int, int> parse_min_max(const std::string& spec) {
  const size_t colon = spec.find(':');
  auto num = [&](std::string_view t) {
    int v = 0;
    auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
    if (t.empty() || ec != std::errc() || end != t.data() + t.size()) {
      throw InvalidArgument(fmt::format("WEFT_ELASTIC='{}': expected MIN:MAX, two numbers", spec));
    }
    return v;
  };
  if (colon == std::string::npos) {
    throw InvalidArgument(fmt::format("WEFT_ELASTIC='{}': expected MIN:MAX", spec));
  }
  const std::string_view s(spec);
  return {num(s.substr(0, colon)), num(s.substr(colon + 1))};
}

}  // namespace

bool ElasticGroup::enabled() { return !settings::get(settings::kElastic).empty(); }

std::shared_ptr<ElasticGroup> ElasticGroup::from_env(CommOptions comm) {
  settings::validate_environment();
  const std::string spec = settings::get(settings::kElastic);
  if (spec.empty()) {
    throw InvalidArgument(
        "WEFT_ELASTIC is not set: elastic training runs under `weft run --elastic MIN:MAX`");
  }
  ElasticOptions o;
  std::tie(o.min, o.max) = parse_min_max(spec);
  o.member = settings::get(settings::kMember);
  if (o.member.empty()) {
    throw InvalidArgument(
        "WEFT_MEMBER is not set: elastic training runs under `weft run --elastic`");
  }
  const LaunchEnvironment env = detect_launch_environment();
  if (env.launcher != "weft") {
    throw InvalidArgument(fmt::format(
        "elastic training needs `weft run --elastic MIN:MAX` (this process was started by {})",
        env.launcher));
  }
  log::set_rank(env.rank);
  o.initial = env.size;
  o.settle = settings::get(settings::kElasticSettle);
  o.min_wait = settings::get(settings::kElasticMinWait);
  o.join_wait = settings::get(settings::kElasticJoinWait);
  std::shared_ptr<TcpStoreServer> server;  // weft run serves the store: stays null
  auto store = connect_launch_store(env, comm, &server);
  // Every generation's communicator listens on and advertises the address
  // that routes to the store's host, as weft::init()'s does (on several
  // hosts, not loopback).
  comm.address = comm::advertised_address(comm, env.store_host);
  o.comm = std::move(comm);
  return std::make_shared<ElasticGroup>(std::move(store), std::move(o));
}

ElasticGroup::ElasticGroup(std::shared_ptr<Store> store, ElasticOptions options)
    : store_(std::move(store)), options_(std::move(options)) {
  if (!store_) throw InvalidArgument("ElasticGroup: no store");
  if (options_.min < 1 || options_.max < options_.min) {
    throw InvalidArgument(
        fmt::format("elastic MIN:MAX {}:{}: need 1 <= MIN <= MAX", options_.min, options_.max));
  }
  check_member(options_.member);
}

ElasticGroup::~ElasticGroup() = default;

bool ElasticGroup::recoverable(const std::exception& e) {
  return dynamic_cast<const PeerError*>(&e) != nullptr ||
         dynamic_cast<const AbortedError*>(&e) != nullptr ||
         dynamic_cast<const TimeoutError*>(&e) != nullptr;
}

bool ElasticGroup::known_dead(const std::string& member, const std::vector<std::string>& extra) {
  if (contains(extra, member)) return true;
  return store_->try_get(fmt::format("weft/elastic/dead/{}", member)).has_value() ||
         store_->try_get(fmt::format("weft/evict/{}", member)).has_value() ||
         store_->try_get(fmt::format("weft/elastic/left/{}", member)).has_value();
}

std::shared_ptr<Communicator> ElasticGroup::join() {
  if (comm_) return comm_;
  return form("start", Clock::now(), {});
}

std::shared_ptr<Communicator> ElasticGroup::recover(std::exception_ptr cause) {
  const auto since = Clock::now();
  std::vector<std::string> dead;
  if (std::string c = culprit_of(cause, members_); !c.empty() && c != options_.member) {
    dead.push_back(c);
  }
  // The failed generation's communicator stays alive while the next one
  // forms: its liveness thread keeps listening, so members that fell
  // silent (a dead host takes all of its workers, and the failure names
  // one) are not waited for (form()).
  failed_ = std::move(comm_);
  struct Clear {
    std::shared_ptr<Communicator>& c;
    ~Clear() { c.reset(); }
  } clear{failed_};
  return form(fmt::format("failure: {}", what_of(cause)), since, dead);
}

bool ElasticGroup::fell_silent(const std::string& member) const {
  if (!failed_) return false;
  const auto it = std::find(members_.begin(), members_.end(), member);
  if (it == members_.end()) return false;
  const comm::World& world = api::CommunicatorAccess::group(*failed_)->world();
  const auto silent = world.silent_for(static_cast<int>(it - members_.begin()));
  return silent && *silent > world.options().heartbeat_timeout;
}

bool ElasticGroup::joins_pending() {
  if (!comm_) throw InvalidArgument("ElasticGroup::joins_pending: no generation joined yet");
  std::vector<int32_t> flag{0};
  if (comm_->rank() == 0) {
    flag[0] = parse_count(store_->try_get(rdzv_key(generation_ + 1, "count")),
                          rdzv_key(generation_ + 1, "count")) > 0
                  ? 1
                  : 0;
  }
  comm_->broadcast(flag, 0);
  return flag[0] != 0;
}

std::shared_ptr<Communicator> ElasticGroup::admit() {
  if (!comm_) throw InvalidArgument("ElasticGroup::admit: no generation joined yet");
  const auto since = Clock::now();
  comm_.reset();
  return form("join", since, {});
}

std::shared_ptr<Communicator> ElasticGroup::remove(const std::vector<int>& ranks,
                                                   const std::string& reason) {
  if (!comm_) throw InvalidArgument("ElasticGroup::remove: no generation joined yet");
  const int size = comm_->size();
  // Rank 0's list, on every member: its length first (bounded by the
  // generation's size), then the ranks.
  std::vector<int32_t> count{static_cast<int32_t>(std::min<size_t>(ranks.size(), INT32_MAX))};
  comm_->broadcast(count, 0);
  if (count[0] < 0 || count[0] > size) {
    throw InvalidArgument(fmt::format(
        "ElasticGroup::remove: {} ranks to remove from a generation of {}", count[0], size));
  }
  std::vector<int32_t> list(static_cast<size_t>(count[0]));
  if (comm_->rank() == 0) std::copy_n(ranks.begin(), list.size(), list.begin());
  comm_->broadcast(list, 0);
  std::vector<std::string> leaving;
  for (int32_t r : list) {
    if (r < 0 || r >= size) {
      throw InvalidArgument(
          fmt::format("ElasticGroup::remove: rank {} is not in generation {} of {} members", r,
                      generation_, size));
    }
    const std::string& m = members_[static_cast<size_t>(r)];
    if (contains(leaving, m)) {
      throw InvalidArgument(fmt::format("ElasticGroup::remove: rank {} is named twice", r));
    }
    leaving.push_back(m);
  }
  if (size - static_cast<int>(leaving.size()) < options_.min) {
    throw InvalidArgument(fmt::format(
        "ElasticGroup::remove: removing {} of {} members would leave fewer than the minimum {}",
        leaving.size(), size, options_.min));
  }
  if (leaving.empty()) return comm_;
  const auto since = Clock::now();
  comm_.reset();
  if (contains(leaving, options_.member)) {
    store_->set(fmt::format("weft/elastic/left/{}", options_.member), reason.substr(0, 1000));
    WEFT_WARN("elastic: {} leaves the job after generation {}: {}", options_.member, generation_,
              reason);
    return nullptr;
  }
  return form(fmt::format("removed [{}]: {}", fmt::join(leaving, " "), reason), since, leaving);
}

void ElasticGroup::finish() { store_->compare_set(kDoneKey, std::nullopt, options_.member); }

std::shared_ptr<Communicator> ElasticGroup::form(const std::string& cause, Clock::time_point since,
                                                 const std::vector<std::string>& extra_dead) {
  std::vector<std::string> prev = members_;
  uint32_t k = generation_ + 1;
  if (prev.empty()) {
    // A new or returning worker: the generation after the newest formed,
    // whose members are the ones to expect.
    const auto g = store_->try_get(kGenerationKey);
    k = static_cast<uint32_t>(parse_count(g, kGenerationKey)) + 1;
    if (k > 1) {
      if (auto list = store_->try_get(rdzv_key(k - 1, "closed"))) prev = split_list(*list);
    }
  }
  std::vector<std::string> dead = extra_dead;
  std::vector<std::string> silent;  // logged as not waited for (fell_silent)
  for (;;) {
    // Register for generation k.
    const int64_t index = store_->add(rdzv_key(k, "count"), 1) - 1;
    store_->set(rdzv_key(k, fmt::format("m{}", index)), options_.member);
    WEFT_DEBUG("elastic: {} registered for generation {} as #{}", options_.member, k, index);

    std::vector<std::string> registered;
    std::vector<std::string> list;
    bool warned_min = false;
    for (;;) {
      if (auto closed = store_->try_get(rdzv_key(k, "closed"))) {
        list = split_list(*closed);
        break;
      }
      if (store_->try_get(kDoneKey)) {
        // The job finished while this worker waited to join.
        WEFT_INFO("elastic: the job finished before {} could join", options_.member);
        return nullptr;
      }
      const int64_t count = parse_count(store_->try_get(rdzv_key(k, "count")), "count");
      while (static_cast<int64_t>(registered.size()) < count) {
        auto m = store_->try_get(rdzv_key(k, fmt::format("m{}", registered.size())));
        if (!m) break;  // registered but not yet written: next round
        registered.push_back(std::move(*m));
      }
      const size_t n = registered.size();
      // Who may close: a member of the last generation, or anyone when the
      // last generation is gone (every member dead) or this is the first.
      // The members of the last generation to wait for: not known dead,
      // and, in a recovery, not silent to this member's liveness for longer
      // than the heartbeat timeout (every live member of a failed
      // generation registers within moments of the abort; one that was only
      // slow registers for the next generation and joins then).
      std::vector<std::string> expected;
      for (const auto& p : prev) {
        if (known_dead(p, dead)) continue;
        if (!contains(registered, p) && fell_silent(p)) {
          if (!contains(silent, p)) {
            WEFT_WARN("elastic: {} is silent since the failure (heartbeats): not waited for", p);
            silent.push_back(p);
          }
          continue;
        }
        expected.push_back(p);
      }
      const bool may_close = prev.empty() || contains(prev, options_.member) || expected.empty();
      const bool all_there = std::all_of(expected.begin(), expected.end(),
                                         [&](const auto& p) { return contains(registered, p); });
      const auto waited = Clock::now() - since;
      if (!may_close && waited >= options_.join_wait) {
        // The members of the running generation have not admitted this
        // worker: leave (so that no generation counts on it) and say why.
        store_->set(fmt::format("weft/elastic/left/{}", options_.member),
                    "gave up waiting to be admitted (WEFT_ELASTIC_JOIN_WAIT)");
        throw Error(fmt::format(
            "elastic: {} was not admitted to the running job within {:.0f} s "
            "(WEFT_ELASTIC_JOIN_WAIT): the members of generation {} ({}) admit joins at their "
            "step boundaries (ElasticGroup::joins_pending) and have not since it registered for "
            "generation {}",
            options_.member, std::chrono::duration<double>(waited).count(), k - 1,
            fmt::join(expected, ", "), k));
      }
      bool close = false;
      if (may_close && n >= static_cast<size_t>(options_.min)) {
        if (n >= static_cast<size_t>(options_.max)) {
          close = true;
        } else if (prev.empty()) {
          close = (options_.initial > 0 && n >= static_cast<size_t>(options_.initial)) ||
                  waited >= options_.settle;
        } else {
          close = all_there || waited >= options_.settle;
        }
      }
      if (close) {
        // Survivors first, in their old order (rank 0 holds the state),
        // then the others in the order they registered; at most max.
        std::vector<std::string> order;
        for (const auto& p : prev) {
          if (contains(registered, p)) order.push_back(p);
        }
        const size_t survivors = order.size();
        for (const auto& r : registered) {
          // (Not one that registered and then left or died: a joiner that
          // gave up waiting, one killed while it waited.)
          if (!contains(order, r) && !known_dead(r, dead)) order.push_back(r);
        }
        if (prev.empty()) {
          std::sort(order.begin() + static_cast<std::ptrdiff_t>(survivors), order.end(),
                    natural_less);
        }
        if (order.size() > static_cast<size_t>(options_.max)) {
          order.resize(static_cast<size_t>(options_.max));
        }
        store_->compare_set(rdzv_key(k, "closed"), std::nullopt, join_list(order));
        continue;  // read back what won
      }
      if (n < static_cast<size_t>(options_.min)) {
        if (waited >= options_.settle + options_.min_wait) {
          throw Error(fmt::format(
              "elastic: generation {} has {} of the minimum {} workers ({}) after {:.0f} s waiting "
              "for joins (WEFT_ELASTIC_MIN_WAIT); members of the last generation known dead: {}",
              k, n, options_.min, fmt::join(registered, ", "),
              std::chrono::duration<double>(waited).count(), [&] {
                std::vector<std::string> d;
                for (const auto& p : prev) {
                  if (known_dead(p, dead)) d.push_back(p);
                }
                return d.empty() ? std::string("none") : fmt::format("{}", fmt::join(d, ", "));
              }()));
        }
        if (!warned_min && waited >= options_.settle) {
          warned_min = true;
          WEFT_WARN(
              "elastic: generation {} has {} of the minimum {} workers; waiting up to {:.0f} "
              "s for joins",
              k, n, options_.min, std::chrono::duration<double>(options_.min_wait).count());
        }
      }
      std::this_thread::sleep_for(kPoll);
    }
    // Keep the newest generation number known to new workers.
    for (auto g = store_->try_get(kGenerationKey);
         static_cast<uint32_t>(parse_count(g, kGenerationKey)) < k;) {
      auto r = store_->compare_set(kGenerationKey, g, std::to_string(k));
      if (r.swapped) break;
      g = r.current;
    }
    const auto at = std::find(list.begin(), list.end(), options_.member);
    if (at == list.end()) {
      // Registered too late for k: the members admit this worker into k+1
      // at their next step boundary.
      WEFT_INFO("elastic: generation {} formed without {} (registered late); waiting for the next",
                k, options_.member);
      prev = list;
      ++k;
      continue;
    }
    const int rank = static_cast<int>(at - list.begin());
    const int size = static_cast<int>(list.size());
    CommOptions co = options_.comm;
    co.name = "elastic";
    co.generation = k;
    try {
      // A member that dies before connecting would leave the others
      // waiting for its record: its launcher's record stops the wait.
      rendezvous::LauncherWatch watch("weft run", [&]() -> std::string {
        for (const auto& m : list) {
          if (m != options_.member && known_dead(m, {})) {
            return fmt::format("member {} of generation {} died", m, k);
          }
        }
        return {};
      });
      comm_ = Communicator::create(rank, size, store_, co);
    } catch (const Error& e) {
      if (!recoverable(e)) throw;
      WEFT_WARN("elastic: generation {} failed while connecting ({}); forming the next", k,
                e.what());
      for (const auto& m : list) {
        if (m != options_.member && known_dead(m, {}) && !contains(dead, m)) dead.push_back(m);
      }
      members_ = list;
      generation_ = k;
      prev = list;
      ++k;
      continue;
    }
    MembershipChange ch;
    ch.generation = k;
    ch.members = list;
    for (const auto& p : members_) {
      if (!contains(list, p)) ch.left.push_back(p);
    }
    for (const auto& m : list) {
      if (!contains(members_, m)) ch.joined.push_back(m);
    }
    survivors_.clear();
    for (const auto& m : list) {
      if (contains(members_, m)) survivors_.push_back(m);
    }
    ch.cause = cause;
    ch.seconds = seconds_since(since);
    const bool first = members_.empty() && cause == "start";
    members_ = list;
    generation_ = k;
    const std::string line = fmt::format(
        "elastic: generation {} formed in {:.2f} s ({}): {} worker(s) [{}]{}{}; I am rank {}", k,
        ch.seconds, ch.cause.substr(0, 300), size, fmt::join(list, " "),
        ch.left.empty() ? "" : fmt::format(", left [{}]", fmt::join(ch.left, " ")),
        ch.joined.empty() ? "" : fmt::format(", joined [{}]", fmt::join(ch.joined, " ")), rank);
    // A membership change is news; the first generation of a job is not.
    if (first) {
      WEFT_INFO("{}", line);
    } else {
      WEFT_WARN("{}", line);
    }
    changes_.push_back(std::move(ch));
    return comm_;
  }
}

}  // namespace weft
