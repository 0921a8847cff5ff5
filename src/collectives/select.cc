// Choosing an algorithm: per collective, the supported algorithms, an
// environment override (WEFT_<COLLECTIVE>_ALGO), and a cost model that
// estimates each candidate's time as latency x messages on the critical
// path + bytes / bandwidth + reduced bytes / reduction speed, for the
// message size and the number of ranks.
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <mutex>

#include "collectives/collectives.h"
#include "collectives/plan.h"
#include "core/settings.h"
#include "weft/errors.h"

namespace weft {

namespace coll {
namespace {

constexpr int kKinds = 12;

// Algorithms each collective supports; the first is used when only one is.
std::vector<Algorithm> supported(Kind k) {
  switch (k) {
    case Kind::Barrier: return {Algorithm::Dissemination};
    case Kind::Broadcast: return {Algorithm::Tree, Algorithm::Ring};
    case Kind::Allreduce:
      return {Algorithm::RecursiveDoubling, Algorithm::HalvingDoubling, Algorithm::Ring};
    case Kind::Reduce: return {Algorithm::Tree, Algorithm::Ring};
    case Kind::ReduceScatter: return {Algorithm::Ring};
    case Kind::Allgather:
    case Kind::Allgatherv: return {Algorithm::Ring};
    case Kind::Gather:
    case Kind::Scatter: return {Algorithm::Tree, Algorithm::Linear};
    case Kind::Alltoall:
    case Kind::Alltoallv: return {Algorithm::Pairwise};
  }
  return {};
}

// WEFT_ALLREDUCE_ALGO and friends, read once.
Algorithm env_override(Kind k) {
  static std::once_flag once;
  static std::array<Algorithm, kKinds> table{};
  static std::array<std::string, kKinds> errors{};
  std::call_once(once, [] {
    for (int i = 1; i < kKinds; ++i) {
      std::string var = "WEFT_";
      for (const char* p = collective_name(static_cast<Kind>(i)); *p; ++p) {
        var += static_cast<char>(std::toupper(static_cast<unsigned char>(*p)));
      }
      var += "_ALGO";
      if (auto v = settings::get(var)) {
        try {
          table[i] = parse_algorithm(*v);
        } catch (const InvalidArgument& e) {
          errors[i] = fmt::format("{}: {}", var, e.what());
        }
      }
    }
  });
  const int i = static_cast<int>(k);
  if (!errors[i].empty()) throw InvalidArgument(errors[i]);
  return table[i];
}

struct Model {
  double latency_s;     // per message on the critical path
  double bytes_per_s;   // per link
  double reduce_per_s;  // bytes reduced per second
};

const Model& model() {
  static const Model m{
      static_cast<double>(settings::get_int("WEFT_MODEL_LATENCY_NS", 20000, 1, 1000000000)) * 1e-9,
      static_cast<double>(settings::get_int("WEFT_MODEL_MBPS", 3000, 1, 100000000)) * 1e6,
      static_cast<double>(settings::get_int("WEFT_MODEL_REDUCE_MBPS", 10000, 1, 100000000)) * 1e6};
  return m;
}

double log2_ceil(int n) { return n <= 1 ? 0.0 : std::ceil(std::log2(static_cast<double>(n))); }

// Estimated seconds of one algorithm on one call.
double cost(Kind k, Algorithm a, int n, double bytes) {
  const Model& m = model();
  const double a_ = m.latency_s, b_ = 1.0 / m.bytes_per_s, g_ = 1.0 / m.reduce_per_s;
  int p = 1;
  while (p * 2 <= n) p *= 2;
  const double fold = p == n ? 0.0 : 2.0 * (a_ + bytes * b_);
  const double lp = std::log2(static_cast<double>(p));
  const double seg = static_cast<double>(segment_bytes());
  switch (k) {
    case Kind::Allreduce:
      if (a == Algorithm::RecursiveDoubling) return lp * (a_ + bytes * b_ + bytes * g_) + fold;
      if (a == Algorithm::HalvingDoubling) {
        return 2 * lp * a_ + 2.0 * (p - 1) / p * bytes * b_ + (p - 1.0) / p * bytes * g_ + fold;
      }
      {
        // Ring: 2(n-1) steps, pipelined over segments: a segment is reduced
        // while the next ones are on the wire, so only one segment's
        // reduction is on the critical path (the other algorithms reduce a
        // whole step's data between transfers).
        double chunk = bytes / n, segs = std::max(1.0, std::ceil(chunk / seg));
        return 2.0 * (n - 1) * a_ + (2.0 * (n - 1) / n * bytes) * b_ + std::min(chunk, seg) * g_ +
               (segs - 1) * a_ * 0.25;
      }
    case Kind::Broadcast:
      if (a == Algorithm::Tree) return log2_ceil(n) * (a_ + bytes * b_);
      {
        double segs = std::max(1.0, std::ceil(bytes / seg)), sb = bytes / segs;
        return (n - 1 + segs - 1) * (a_ + sb * b_);
      }
    case Kind::Reduce:
      if (a == Algorithm::Tree) return log2_ceil(n) * (a_ + bytes * (b_ + g_));
      {
        double segs = std::max(1.0, std::ceil(bytes / seg)), sb = bytes / segs;
        return (n - 1 + segs - 1) * (a_ + sb * (b_ + g_));
      }
    case Kind::Gather:
    case Kind::Scatter:
      // bytes: one block. The tree forwards blocks log2(n) times; linear
      // moves each once but serializes n - 1 messages at the root.
      if (a == Algorithm::Tree)
        return log2_ceil(n) * a_ + (n - 1) * bytes * b_ * (log2_ceil(n) / 2 + 0.5);
      return (n - 1) * (a_ * 0.5 + bytes * b_);
    default: return 0;
  }
}

}  // namespace

size_t model_bytes(const Call& c, int size) {
  (void)size;
  return c.count * c.esize();
}

Algorithm select(const Call& call, int size) {
  if (call.algorithm != Algorithm::Auto) return call.algorithm;
  Algorithm forced = env_override(call.kind);
  auto algos = supported(call.kind);
  if (forced != Algorithm::Auto) {
    if (std::find(algos.begin(), algos.end(), forced) != algos.end()) return forced;
    throw InvalidArgument(fmt::format("{}={} is not an algorithm of {}", "WEFT_*_ALGO",
                                      algorithm_name(forced), collective_name(call.kind)));
  }
  if (algos.size() == 1) return algos.front();
  const double bytes = static_cast<double>(model_bytes(call, size));
  Algorithm best = algos.front();
  double best_cost = cost(call.kind, best, size, bytes);
  for (size_t i = 1; i < algos.size(); ++i) {
    double c = cost(call.kind, algos[i], size, bytes);
    if (c < best_cost) {
      best_cost = c;
      best = algos[i];
    }
  }
  return best;
}

bool supports(Kind k, Algorithm a) {
  auto algos = supported(k);
  return std::find(algos.begin(), algos.end(), a) != algos.end();
}

size_t segment_bytes() {
  static const size_t s = settings::get_bytes("WEFT_SEGMENT_BYTES", 256u << 10, 4096, 1ull << 30);
  return s;
}

}  // namespace coll
}  // namespace weft
