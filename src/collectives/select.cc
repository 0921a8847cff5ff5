// Choosing an algorithm: per collective, the supported algorithms, an
// environment override (WEFT_<COLLECTIVE>_ALGO), and a cost model that
// estimates each candidate's time as latency x messages on the critical
// path + bytes / bandwidth + reduced bytes / reduction speed, for the
// message size, the number of ranks and how they are spread over hosts
// (flat algorithms on several hosts are costed on the inter-host links;
// hierarchical ones per phase, intra-host and between hosts).
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
    case Kind::Broadcast: return {Algorithm::Tree, Algorithm::Ring, Algorithm::Hierarchical};
    case Kind::Allreduce:
      return {Algorithm::RecursiveDoubling, Algorithm::HalvingDoubling, Algorithm::Ring,
              Algorithm::Hierarchical};
    case Kind::Reduce: return {Algorithm::Tree, Algorithm::Ring};
    case Kind::ReduceScatter: return {Algorithm::Ring};
    case Kind::Allgather:
    case Kind::Allgatherv: return {Algorithm::Ring, Algorithm::Hierarchical};
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
      try {
        table[i] =
            parse_algorithm(settings::get(settings::algorithm_setting(static_cast<Kind>(i))));
      } catch (const InvalidArgument& e) {
        errors[i] = e.what();
      }
    }
  });
  const int i = static_cast<int>(k);
  if (!errors[i].empty()) throw InvalidArgument(errors[i]);
  return table[i];
}

// Links: latency per message on the critical path, seconds per byte moved
// and per byte reduced. Within a host (WEFT_MODEL_LATENCY_NS, _MBPS,
// _REDUCE_MBPS) and between hosts (WEFT_MODEL_INTER_LATENCY_NS,
// _INTER_MBPS: the bandwidth of one host's network link, which the ranks of
// that host share when they all cross hosts at once).
struct Links {
  double a, b, g;
};

struct Model {
  Links intra, inter;
};

const Model& model() {
  static const Model m = [] {
    auto ns = [](const settings::IntSetting& s) {
      return static_cast<double>(settings::get(s)) * 1e-9;
    };
    auto per_byte = [](const settings::IntSetting& s) {
      return 1.0 / (static_cast<double>(settings::get(s)) * 1e6);
    };
    Model x{};
    x.intra = {ns(settings::kModelLatencyNs), per_byte(settings::kModelMbps),
               per_byte(settings::kModelReduceMbps)};
    x.inter = {ns(settings::kModelInterLatencyNs), per_byte(settings::kModelInterMbps), x.intra.g};
    return x;
  }();
  return m;
}

double log2_ceil(int n) { return n <= 1 ? 0.0 : std::ceil(std::log2(static_cast<double>(n))); }

// Estimated seconds of a flat algorithm on n ranks over links l. bytes: the
// buffer (allreduce, broadcast, reduce) or one rank's block (the others).
double flat_cost(Kind k, Algorithm a, int n, double bytes, const Links& l) {
  const double a_ = l.a, b_ = l.b, g_ = l.g;
  int p = 1;
  while (p * 2 <= n) p *= 2;
  const double fold = p == n ? 0.0 : 2.0 * (a_ + bytes * b_);
  const double lp = std::log2(static_cast<double>(p));
  auto seg_of = [](double b) { return static_cast<double>(segment_bytes(static_cast<size_t>(b))); };
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
        double chunk = bytes / n, seg = seg_of(chunk), segs = std::max(1.0, std::ceil(chunk / seg));
        return 2.0 * (n - 1) * a_ + (2.0 * (n - 1) / n * bytes) * b_ + std::min(chunk, seg) * g_ +
               (segs - 1) * a_ * 0.25;
      }
    case Kind::Broadcast:
      if (a == Algorithm::Tree) return log2_ceil(n) * (a_ + bytes * b_);
      {
        double segs = std::max(1.0, std::ceil(bytes / seg_of(bytes))), sb = bytes / segs;
        return (n - 1 + segs - 1) * (a_ + sb * b_);
      }
    case Kind::Reduce:
      if (a == Algorithm::Tree) return log2_ceil(n) * (a_ + bytes * (b_ + g_));
      {
        double segs = std::max(1.0, std::ceil(bytes / seg_of(bytes))), sb = bytes / segs;
        return (n - 1 + segs - 1) * (a_ + sb * (b_ + g_));
      }
    case Kind::Allgather:
    case Kind::Allgatherv: return (n - 1) * (a_ + bytes * b_);
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

// The cheapest flat algorithm of k on n ranks over links l, and its cost.
std::pair<Algorithm, double> best_flat(Kind k, int n, double bytes, const Links& l) {
  std::pair<Algorithm, double> best{Algorithm::Auto, 0.0};
  for (Algorithm a : supported(k)) {
    if (a == Algorithm::Hierarchical) continue;
    double c = flat_cost(k, a, n, bytes, l);
    if (best.first == Algorithm::Auto || c < best.second) best = {a, c};
  }
  return best;
}

// Estimated seconds of a hierarchical algorithm (hierarchical.cc): H hosts,
// L ranks on the largest, k lanes (ranks on the smallest).
double hierarchical_cost(Kind kind, const Topology& t, double bytes) {
  const Model& m = model();
  const int H = t.num_hosts(), L = t.max_local, k = t.min_local;
  Links shared = m.inter;
  shared.b *= k;  // the k lanes of a host share its link
  const double lanes_inter = H > 1 ? 1.0 : 0.0;
  switch (kind) {
    case Kind::Allreduce: {
      // Direct reduce-scatter onto the lanes and allgather back: one step
      // each, (L-1) chunks of bytes/k in and out.
      const double chunk = bytes / k;
      double intra =
          L > 1 ? 2.0 * (m.intra.a + (L - 1) * chunk * m.intra.b) + (L - 1) * chunk * m.intra.g
                : 0.0;
      return intra + lanes_inter * best_flat(kind, H, chunk, shared).second;
    }
    case Kind::Broadcast:
      return lanes_inter * best_flat(kind, H, bytes, m.inter).second +
             (L > 1 ? best_flat(kind, L, bytes, m.intra).second : 0.0);
    case Kind::Allgather:
    case Kind::Allgatherv: {
      // Lanes exchange the host's blocks (L/k each), then every lane sends
      // what it holds (H * L/k blocks) to the host's other ranks.
      const double per_lane = bytes * L / k;
      return lanes_inter * flat_cost(kind, Algorithm::Ring, H, per_lane, shared) +
             (L > 1 ? m.intra.a + (L - 1) * H * per_lane * m.intra.b : 0.0);
    }
    default: return 0;
  }
}

// The links a flat algorithm runs over: between hosts as soon as the ranks
// span several.
const Links& flat_links(const Topology& t) {
  return t.num_hosts() > 1 ? model().inter : model().intra;
}

double cost(Kind k, Algorithm a, const Topology& t, double bytes) {
  if (a == Algorithm::Hierarchical) return hierarchical_cost(k, t, bytes);
  return flat_cost(k, a, t.size(), bytes, flat_links(t));
}

// Auto considers hierarchical algorithms only on several hosts with the same
// number (> 1) of ranks each.
bool hierarchy_pays(const Topology& t) { return t.num_hosts() > 1 && t.even() && t.min_local > 1; }

Algorithm cheapest(const Call& call, const Topology& topo, bool allow_hierarchical) {
  auto algos = supported(call.kind);
  if (!allow_hierarchical) {
    algos.erase(std::remove(algos.begin(), algos.end(), Algorithm::Hierarchical), algos.end());
  }
  if (algos.size() == 1) return algos.front();
  const double bytes = static_cast<double>(model_bytes(call, topo.size()));
  Algorithm best = algos.front();
  double best_cost = cost(call.kind, best, topo, bytes);
  for (size_t i = 1; i < algos.size(); ++i) {
    double c = cost(call.kind, algos[i], topo, bytes);
    if (c < best_cost) {
      best_cost = c;
      best = algos[i];
    }
  }
  return best;
}

}  // namespace

size_t model_bytes(const Call& c, int size) {
  if (c.kind == Kind::Allgatherv)
    return c.count * c.esize() / static_cast<size_t>(std::max(1, size));
  return c.count * c.esize();
}

Algorithm select(const Call& call, const Topology& topo) {
  if (call.algorithm != Algorithm::Auto) return call.algorithm;
  Algorithm forced = env_override(call.kind);
  if (forced != Algorithm::Auto) {
    auto algos = supported(call.kind);
    if (std::find(algos.begin(), algos.end(), forced) != algos.end()) return forced;
    throw InvalidArgument(fmt::format("{}={} is not an algorithm of {}", "WEFT_*_ALGO",
                                      algorithm_name(forced), collective_name(call.kind)));
  }
  return cheapest(call, topo, hierarchy_pays(topo));
}

Algorithm select_flat(const Call& call, const Topology& topo) {
  return cheapest(call, topo, false);
}

bool supports(Kind k, Algorithm a) {
  auto algos = supported(k);
  return std::find(algos.begin(), algos.end(), a) != algos.end();
}

size_t segment_bytes(size_t bytes, bool shm) {
  static const size_t fixed = settings::get(settings::kSegmentBytes);
  if (fixed > 0) return std::max<size_t>(fixed, 4096);
  if (shm) return std::clamp<size_t>(bytes / 2, 1u << 20, 8u << 20);
  return std::clamp<size_t>(bytes / 4, 256u << 10, 2u << 20);
}

}  // namespace coll
}  // namespace weft
