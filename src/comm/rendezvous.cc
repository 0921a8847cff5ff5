#include "comm/rendezvous.h"

#include <fmt/format.h>

#include <algorithm>

#include "core/launcher_watch.h"
#include "core/log.h"
#include "weft/errors.h"

namespace weft::comm {
namespace {

using namespace std::chrono_literals;

// Longest single store wait: the launcher is checked between two.
constexpr auto kSlice = 1000ms;
// Worlds up to this size list the missing ranks on every rank.
constexpr int kListEverywhere = 256;

std::string key_of(int r) { return fmt::format("rank/{}", r); }

Timeout ms_left(const Deadline& d) {
  return std::max(std::chrono::duration_cast<Timeout>(d.remaining()), Timeout(1));
}

// The ranks whose record is not in the store yet (nullopt: not listed here).
std::optional<std::vector<int>> missing_ranks(Store& store, int rank, int size,
                                              const Deadline& deadline) {
  if (rank != 0 && size > kListEverywhere) return std::nullopt;
  std::vector<int> missing;
  for (int r = 0; r < size; ++r) {
    if (r == rank) continue;
    if (!store.try_get(key_of(r), std::min<Timeout>(ms_left(deadline), 5s))) missing.push_back(r);
  }
  return missing;
}

std::string describe_missing(const std::optional<std::vector<int>>& missing, int size) {
  if (!missing) return fmt::format("some of the {} ranks (rank 0 lists them)", size);
  if (missing->empty()) return "none (all joined just now)";
  return fmt::format("{} {} ({} of {})", missing->size() == 1 ? "rank" : "ranks",
                     format_ranks(*missing), missing->size(), size);
}

}  // namespace

std::string format_ranks(const std::vector<int>& ranks, size_t limit) {
  std::string out;
  size_t named = 0;
  for (size_t i = 0; i < ranks.size();) {
    size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    if (named >= limit) {
      out += ", ...";
      break;
    }
    if (!out.empty()) out += ", ";
    out += j == i ? fmt::format("{}", ranks[i]) : fmt::format("{}-{}", ranks[i], ranks[j]);
    named += j - i + 1;
    i = j + 1;
  }
  return out;
}

void wait_for_ranks(Store& store, int rank, int size, const Deadline& deadline) {
  std::vector<std::string> keys;
  for (int r = 0; r < size; ++r) keys.push_back(key_of(r));
  const Timeout store_timeout = store.default_timeout();
  const Deadline until = deadline.min(Deadline::after(store_timeout));
  const Timeout budget = std::min(ms_left(deadline), store_timeout);
  const auto started = std::chrono::steady_clock::now();
  const auto interval = rendezvous::report_interval();
  auto next_report = started + interval;
  for (;;) {
    rendezvous::check_launcher("the other ranks at rendezvous");
    try {
      store.wait(keys, std::min<Timeout>(ms_left(until), kSlice));
      return;
    } catch (const TimeoutError&) {
    }
    const auto now = std::chrono::steady_clock::now();
    if (until.expired()) {
      // A last look, with a little time of its own: the deadline has passed.
      const Deadline look = Deadline::after(10s);
      auto missing = missing_ranks(store, rank, size, look);
      if (missing && missing->empty()) return;
      const int first = missing ? missing->front() : -1;
      throw TimeoutError(
          fmt::format("rank {}: rendezvous timed out after {} (WEFT_STORE_TIMEOUT, or WEFT_TIMEOUT "
                      "if shorter): these never joined: {}",
                      rank, format_timeout(budget), describe_missing(missing, size)),
          first, "rendezvous");
    }
    if (now >= next_report) {
      auto missing = missing_ranks(store, rank, size, until);
      WEFT_WARN("waiting at rendezvous for {} after {} s; giving up in {} s",
                describe_missing(missing, size),
                std::chrono::duration_cast<std::chrono::seconds>(now - started).count(),
                std::chrono::duration_cast<std::chrono::seconds>(until.remaining()).count());
      next_report = std::chrono::steady_clock::now() + interval;
    }
  }
}

}  // namespace weft::comm
