// weft-bench: collective benchmark in the style of nccl-tests, measured
// exactly like the peers' programs in ../shared/anchors (MEASURING.md):
// sizes 4 KiB .. 64 MiB in steps of 4x, 3 warm-ups, then 200 timed
// iterations below 1 MiB, 30 up to 4 MiB and 10 from 16 MiB; before each
// iteration the input is reset and all ranks pass a barrier; each rank times
// its own call; the iteration's time is the maximum over ranks and the
// figure is the median over iterations. CPU is user+system time of all
// threads of all ranks during the timed calls, per iteration. Every result
// is checked.
//
//   weft run -n 4 build/bin/weft-bench allreduce [--min-bytes 4K] [--max-bytes 64M]
//       [--dtype float32] [--op sum] [--algo auto] [--iters N] [--json] [--in-place]
#include <fmt/format.h>
#include <sys/resource.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <new>
#include <nlohmann/json.hpp>
#include <numeric>
#include <string>
#include <vector>

#include "core/settings.h"
#include "weft/weft.h"

namespace {

using weft::Buffer;
using weft::DType;
using weft::ReduceOp;

double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

DType parse_dtype(const std::string& s) {
  for (int i = 0; i < weft::kNumDTypes; ++i) {
    if (weft::dtype_name(static_cast<DType>(i)) == s) return static_cast<DType>(i);
  }
  throw CLI::ValidationError("--dtype", "unknown dtype " + s);
}

ReduceOp parse_op(const std::string& s) {
  for (int i = 0; i < weft::kNumReduceOps; ++i) {
    if (weft::reduce_op_name(static_cast<ReduceOp>(i)) == s) return static_cast<ReduceOp>(i);
  }
  throw CLI::ValidationError("--op", "unknown op " + s);
}

// Stores v (a small integer, exact in every dtype) as element i.
void set(void* p, DType t, size_t i, double v) {
  switch (t) {
    case DType::Float32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case DType::Float64: static_cast<double*>(p)[i] = v; break;
    case DType::Float16:
      static_cast<weft::Half*>(p)[i] = weft::float_to_half(static_cast<float>(v));
      break;
    case DType::BFloat16:
      static_cast<weft::BFloat16*>(p)[i] = weft::float_to_bfloat16(static_cast<float>(v));
      break;
    case DType::Int32: static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v); break;
    case DType::Int64: static_cast<int64_t*>(p)[i] = static_cast<int64_t>(v); break;
    case DType::UInt8: static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v); break;
  }
}

struct Options {
  std::string collective = "allreduce";
  std::string min_bytes = "4K";
  std::string max_bytes = "64M";
  std::string dtype = "float32";
  std::string op = "sum";
  std::string algo = "auto";
  uint64_t min_b = 0, max_b = 0;  // parsed from min_bytes, max_bytes
  int iters = 0;                  // 0: by size
  int warmup = 3;
  bool json = false;
  bool in_place = false;  // allreduce only: the result overwrites the input
};

// Input value of element i on rank r (small integers: exact in every dtype).
double input(int r, size_t i) { return static_cast<double>((r + 1) + static_cast<int>(i % 3)); }

// Elements of a tile of the input or expected result: a multiple of the
// period (3) of input() and reduced(), small enough to stay in cache.
constexpr size_t kTile = 3 * 1024;

// Writes `bytes` bytes of dst by repeating tile.
void fill_tiled(uint8_t* dst, size_t bytes, const std::vector<uint8_t>& tile) {
  for (size_t off = 0; off < bytes; off += tile.size()) {
    std::memcpy(dst + off, tile.data(), std::min(tile.size(), bytes - off));
  }
}

// Elements of got (count of them) that differ from `expect`, which holds
// either all of them or a tile (expect_count elements) that repeats.
double count_wrong(const uint8_t* got, size_t count, const std::vector<uint8_t>& expect,
                   size_t expect_count, size_t esize) {
  double wrong = 0;
  for (size_t first = 0; first < count; first += expect_count) {
    const size_t k = std::min(expect_count, count - first);
    const uint8_t* g = got + first * esize;
    if (std::memcmp(g, expect.data(), k * esize) == 0) continue;
    for (size_t i = 0; i < k; ++i) {
      wrong += std::memcmp(g + i * esize, expect.data() + i * esize, esize) != 0;
    }
  }
  return wrong;
}

struct Collective {
  weft::Collective kind;
  double busbw_factor;  // nccl-tests: busbw = algbw x factor
};

Collective parse_collective(const std::string& s, int n) {
  const double a = 2.0 * (n - 1) / n, b = static_cast<double>(n - 1) / n;
  if (s == "allreduce") return {weft::Collective::Allreduce, a};
  if (s == "reduce") return {weft::Collective::Reduce, 1.0};
  if (s == "broadcast") return {weft::Collective::Broadcast, 1.0};
  if (s == "allgather") return {weft::Collective::Allgather, b};
  if (s == "reduce_scatter") return {weft::Collective::ReduceScatter, b};
  if (s == "gather") return {weft::Collective::Gather, b};
  if (s == "scatter") return {weft::Collective::Scatter, b};
  if (s == "alltoall") return {weft::Collective::Alltoall, b};
  if (s == "barrier") return {weft::Collective::Barrier, 0.0};
  throw CLI::ValidationError("collective", "unknown collective " + s);
}

// Expected value of an output element of a reduction over n ranks.
double reduced(ReduceOp op, int n, size_t i) {
  double e = 0;
  switch (op) {
    case ReduceOp::Sum: e = n * static_cast<double>(i % 3) + n * (n + 1) / 2.0; break;
    case ReduceOp::Avg: e = static_cast<double>(i % 3) + (n + 1) / 2.0; break;
    case ReduceOp::Min: e = 1 + static_cast<double>(i % 3); break;
    case ReduceOp::Max: e = n + static_cast<double>(i % 3); break;
    case ReduceOp::Prod:
      e = 1;
      for (int r = 0; r < n; ++r) e *= input(r, i);
      break;
  }
  return e;
}

int run(const Options& o) {
  auto comm = weft::init();
  const int n = comm->size(), rank = comm->rank();
  const auto coll = parse_collective(o.collective, n);
  const DType dtype = parse_dtype(o.dtype);
  const ReduceOp op = parse_op(o.op);
  const weft::Algorithm algo = weft::parse_algorithm(o.algo);
  const size_t esize = weft::dtype_size(dtype);
  const uint64_t min_b = o.min_b, max_b = o.max_b;
  const std::string transport = comm->transports();
  if (rank == 0 && !o.json) {
    std::printf("# weft-bench %s%s, %d ranks, %s, op %s, transport %s\n", o.collective.c_str(),
                o.in_place ? " (in place)" : "", n, o.dtype.c_str(), o.op.c_str(),
                transport.c_str());
    std::printf("# %12s %12s %8s %5s %10s %12s %10s %10s %12s %7s\n", "bytes", "count", "type",
                "op", "algo", "time_us", "algbw_GBps", "busbw_GBps", "cpu_us/iter", "errors");
  }
  const uint64_t first =
      coll.kind == weft::Collective::Barrier ? 0 : std::max<uint64_t>(min_b, esize * n);
  for (uint64_t bytes = first;; bytes = bytes == 0 ? 1 : bytes * 4) {
    // bytes: the whole buffer (for allgather the output, for reduce_scatter
    // and alltoall the input), as in nccl-tests; blk: elements per rank.
    const size_t count = bytes / esize;
    const size_t blk = std::max<size_t>(1, count / static_cast<size_t>(n));
    std::vector<uint8_t> in, out;
    size_t in_count = count, out_count = count;
    switch (coll.kind) {
      case weft::Collective::Allgather: in_count = blk, out_count = blk * n; break;
      case weft::Collective::Gather: in_count = blk, out_count = blk * n; break;
      case weft::Collective::ReduceScatter: in_count = blk * n, out_count = blk; break;
      case weft::Collective::Scatter: in_count = blk * n, out_count = blk; break;
      case weft::Collective::Alltoall: in_count = out_count = blk * n; break;
      default: break;
    }
    in.resize(std::max<size_t>(1, in_count * esize));
    out.resize(std::max<size_t>(1, out_count * esize));
    weft::Algorithm used =
        algo == weft::Algorithm::Auto ? comm->selected_algorithm(coll.kind, in_count, dtype) : algo;
    int iters =
        o.iters > 0 ? o.iters : (bytes >= (16u << 20) ? 10 : (bytes >= (1u << 20) ? 30 : 200));
    // Every input and most expected results repeat with period 3 in the
    // element index (input(), reduced()): they are kept as one tile of
    // kTile elements, and each iteration writes the input from the tile and
    // compares the result with it tile by tile. The memory an iteration
    // touches outside the call is then the buffers themselves, as for the
    // peers' programs (which store a constant and read the result back):
    // reference copies as large as the buffers would push the buffers out
    // of cache before every timed call. Results that depend on the block
    // (allgather, gather, scatter, alltoall) are checked against a full
    // array.
    const bool in_place = o.in_place && coll.kind == weft::Collective::Allreduce;
    const bool checked =
        !((coll.kind == weft::Collective::Reduce || coll.kind == weft::Collective::Gather) &&
          rank != 0) &&
        coll.kind != weft::Collective::Barrier;
    const bool check_in = in_place || coll.kind == weft::Collective::Broadcast;
    const size_t check_count = check_in ? in_count : out_count;
    auto expected = [&](size_t i) {
      switch (coll.kind) {
        case weft::Collective::Allreduce:
        case weft::Collective::Reduce: return reduced(op, n, i);
        case weft::Collective::ReduceScatter: return reduced(op, n, rank * blk + i);
        case weft::Collective::Broadcast: return input(0, i);
        case weft::Collective::Allgather:
        case weft::Collective::Gather: return input(static_cast<int>(i / blk), i % blk);
        case weft::Collective::Scatter: return input(0, rank * blk + i);
        case weft::Collective::Alltoall:
          return input(static_cast<int>(i / blk), rank * blk + i % blk);
        default: return 0.0;
      }
    };
    const bool tiled_expect =
        coll.kind == weft::Collective::Allreduce || coll.kind == weft::Collective::Reduce ||
        coll.kind == weft::Collective::ReduceScatter || coll.kind == weft::Collective::Broadcast;
    std::vector<uint8_t> in_tile(kTile * esize);
    for (size_t i = 0; i < kTile; ++i) set(in_tile.data(), dtype, i, input(rank, i));
    const size_t expect_count = !checked ? 0 : (tiled_expect ? kTile : check_count);
    std::vector<uint8_t> expect(std::max<size_t>(1, expect_count * esize));
    for (size_t i = 0; i < expect_count; ++i) set(expect.data(), dtype, i, expected(i));
    std::vector<double> times;
    double cpu = 0, wrong = 0;
    for (int it = 0; it < iters + o.warmup; ++it) {
      fill_tiled(in.data(), in_count * esize, in_tile);
      if (!in_place) std::fill(out.begin(), out.end(), 0);
      weft::ConstBuffer ib(in.data(), in_count, dtype);
      weft::Buffer ob(in_place ? in.data() : out.data(), in_place ? in_count : out_count, dtype);
      comm->barrier();
      double c0 = cpu_seconds();
      auto t0 = std::chrono::steady_clock::now();
      switch (coll.kind) {
        case weft::Collective::Allreduce:
          comm->allreduce(ib, ob, weft::AllreduceOptions{op, weft::kDefaultTimeout, algo});
          break;
        case weft::Collective::Reduce:
          comm->reduce(ib, ob, weft::ReduceOptions{op, 0, weft::kDefaultTimeout, algo});
          break;
        case weft::Collective::Broadcast:
          comm->broadcast(Buffer(in.data(), in_count, dtype),
                          weft::BroadcastOptions{0, weft::kDefaultTimeout, algo});
          break;
        case weft::Collective::Allgather:
          comm->allgather(ib, ob, weft::CollectiveOptions{weft::kDefaultTimeout, algo});
          break;
        case weft::Collective::ReduceScatter:
          comm->reduce_scatter(ib, ob, weft::ReduceScatterOptions{op, weft::kDefaultTimeout, algo});
          break;
        case weft::Collective::Gather:
          comm->gather(ib, ob, weft::RootedOptions{0, weft::kDefaultTimeout, algo});
          break;
        case weft::Collective::Scatter:
          comm->scatter(ib, ob, weft::RootedOptions{0, weft::kDefaultTimeout, algo});
          break;
        case weft::Collective::Alltoall:
          comm->alltoall(ib, ob, weft::CollectiveOptions{weft::kDefaultTimeout, algo});
          break;
        case weft::Collective::Barrier: comm->barrier(); break;
        default: break;
      }
      auto t1 = std::chrono::steady_clock::now();
      double c1 = cpu_seconds();
      if (it >= o.warmup) {
        times.push_back(std::chrono::duration<double>(t1 - t0).count());
        cpu += c1 - c0;
      }
      // Check every element of the result.
      const uint8_t* got = check_in ? in.data() : out.data();
      if (checked) wrong += count_wrong(got, check_count, expect, expect_count, esize);
    }
    comm->allreduce(Buffer(times.data(), times.size(), DType::Float64), ReduceOp::Max);
    std::vector<double> totals{cpu, wrong};
    comm->allreduce(Buffer(totals.data(), totals.size(), DType::Float64), ReduceOp::Sum);
    std::sort(times.begin(), times.end());
    const double med = times[times.size() / 2];
    const double algbw = bytes > 0 ? static_cast<double>(bytes) / med / 1e9 : 0.0;
    const double busbw = algbw * coll.busbw_factor;
    const double cpu_us = totals[0] / iters * 1e6;
    if (rank == 0) {
      if (o.json) {
        nlohmann::json j = {{"collective", o.collective},
                            {"bytes", bytes},
                            {"count", count},
                            {"type", o.dtype},
                            {"op", o.op},
                            {"world", n},
                            {"algo", weft::algorithm_name(used)},
                            {"transport", transport},
                            {"in_place", in_place},
                            {"time_us", med * 1e6},
                            {"algbw_gbps", algbw},
                            {"busbw_gbps", busbw},
                            {"cpu_us_per_iter", cpu_us},
                            {"errors", static_cast<int64_t>(totals[1])}};
        std::printf("%s\n", j.dump().c_str());
      } else {
        std::printf("  %12llu %12zu %8s %5s %10s %12.1f %10.3f %10.3f %12.1f %7.0f\n",
                    static_cast<unsigned long long>(bytes), count, o.dtype.c_str(), o.op.c_str(),
                    weft::algorithm_name(used), med * 1e6, algbw, busbw, cpu_us, totals[1]);
      }
      std::fflush(stdout);
    }
    if (bytes == 0 || bytes * 4 > max_b) break;
  }
  return 0;
}

// Bytes of the largest message of the sweep min_b, 4 min_b, ... <= max_b.
uint64_t largest_size(uint64_t min_b, uint64_t max_b) {
  uint64_t b = std::max<uint64_t>(min_b, 1);
  while (b <= max_b / 4) b *= 4;
  return b;
}

std::string gib(double bytes) { return fmt::format("{:.1f} GiB", bytes / (1ull << 30)); }

// Checks the sizes before anything starts: a usage error (a message naming
// the flag) rather than std::bad_alloc in the middle of the sweep.
void check_sizes(Options& o) {
  o.min_b = weft::settings::parse_bytes(o.min_bytes, "--min-bytes");
  o.max_b = weft::settings::parse_bytes(o.max_bytes, "--max-bytes");
  if (o.min_b > o.max_b) {
    throw CLI::ValidationError(
        fmt::format("--min-bytes {} is larger than --max-bytes {}", o.min_bytes, o.max_bytes));
  }
  // Each rank holds the input, the output and the expected result: at most
  // three buffers of the largest message. The ranks of this host share its memory.
  const double per_rank = 3.0 * static_cast<double>(largest_size(o.min_b, o.max_b));
  const auto local = static_cast<double>(weft::settings::get(weft::settings::kLocalSize));
  const double host =
      static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
  if (host > 0 && per_rank * local > host) {
    throw CLI::ValidationError(
        fmt::format("--max-bytes {}: messages of up to {} bytes need about {} per rank ({} for the "
                    "{} rank(s) of "
                    "this host), more than its {} of memory: lower --max-bytes or --min-bytes",
                    o.max_bytes, largest_size(o.min_b, o.max_b), gib(per_rank),
                    gib(per_rank * local), static_cast<int>(local), gib(host)));
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"weft-bench: benchmark of Weft's collectives (launch with weft run -n N)"};
  app.add_option("collective", o.collective,
                 "allreduce, reduce, broadcast, allgather, reduce_scatter, gather, scatter, "
                 "alltoall or barrier")
      ->required();
  app.add_option("--min-bytes", o.min_bytes, "smallest message (e.g. 4K)");
  app.add_option("--max-bytes", o.max_bytes, "largest message (e.g. 64M)");
  app.add_option("--dtype", o.dtype, "float32, float64, float16, bfloat16, int32, int64, uint8");
  app.add_option("--op", o.op, "sum, avg, min, max, prod");
  app.add_option("--algo", o.algo,
                 "auto (the cost model chooses), ring, hd, rd, tree, linear, pairwise, "
                 "hierarchical");
  app.add_option("--iters", o.iters, "timed iterations per size (default: 200 / 30 / 10 by size)")
      ->check(CLI::Range(1, 100000000));
  app.add_option("--warmup", o.warmup, "warm-up iterations per size")
      ->check(CLI::Range(0, 100000000));
  app.add_flag("--json", o.json, "one JSON object per size");
  app.add_flag("--in-place", o.in_place,
               "allreduce: the result overwrites the input (as the peers' programs do)");
  try {
    app.parse(argc, argv);
    weft::settings::validate_environment();
    check_sizes(o);
  } catch (const CLI::ParseError& e) {
    // Usage errors exit 2, as weft run's do (--help exits 0).
    return app.exit(e) == 0 ? 0 : 2;
  } catch (const weft::Error& e) {
    std::fprintf(stderr, "weft-bench: %s\n", e.what());
    return 2;
  }
  try {
    return run(o);
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr,
                 "weft-bench: out of memory for the buffers of the benchmark (%s): lower "
                 "--max-bytes\n",
                 o.max_bytes.c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "weft-bench: %s\n", e.what());
    return 1;
  }
}
