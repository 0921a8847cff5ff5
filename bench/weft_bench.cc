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
//       [--dtype float32] [--op sum] [--algo auto] [--iters N] [--json]
#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
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

// Element value helpers: every dtype holds small integers exactly.
double get(const void* p, DType t, size_t i) {
  switch (t) {
    case DType::Float32: return static_cast<const float*>(p)[i];
    case DType::Float64: return static_cast<const double*>(p)[i];
    case DType::Float16: return weft::half_to_float(static_cast<const weft::Half*>(p)[i]);
    case DType::BFloat16: return weft::bfloat16_to_float(static_cast<const weft::BFloat16*>(p)[i]);
    case DType::Int32: return static_cast<const int32_t*>(p)[i];
    case DType::Int64: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case DType::UInt8: return static_cast<const uint8_t*>(p)[i];
  }
  return 0;
}

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
  int iters = 0;
  int warmup = 3;
  bool json = false;
};

// Input value of element i on rank r (small integers: exact in every dtype).
double input(int r, size_t i) { return static_cast<double>((r + 1) + static_cast<int>(i % 3)); }

int run(const Options& o) {
  auto comm = weft::init();
  const int n = comm->size(), rank = comm->rank();
  const DType dtype = parse_dtype(o.dtype);
  const ReduceOp op = parse_op(o.op);
  const size_t esize = weft::dtype_size(dtype);
  const uint64_t min_b = weft::settings::parse_bytes(o.min_bytes, "--min-bytes");
  const uint64_t max_b = weft::settings::parse_bytes(o.max_bytes, "--max-bytes");
  if (o.collective != "allreduce" && o.collective != "broadcast" && o.collective != "barrier") {
    throw CLI::ValidationError("collective", "unknown collective " + o.collective);
  }
  if (rank == 0 && !o.json) {
    std::printf("# weft-bench %s, %d ranks, %s, op %s, algo %s\n", o.collective.c_str(), n,
                o.dtype.c_str(), o.op.c_str(), o.algo.c_str());
    std::printf("# %12s %12s %8s %5s %10s %12s %10s %10s %12s %7s\n", "bytes", "count", "type",
                "op", "algo", "time_us", "algbw_GBps", "busbw_GBps", "cpu_us/iter", "errors");
  }
  for (uint64_t bytes = std::max<uint64_t>(min_b, esize); bytes <= max_b; bytes *= 4) {
    const size_t count = bytes / esize;
    std::vector<uint8_t> buf(count * esize);
    int iters =
        o.iters > 0 ? o.iters : (bytes >= (16u << 20) ? 10 : (bytes >= (1u << 20) ? 30 : 200));
    std::vector<double> times;
    double cpu = 0, wrong = 0;
    weft::AllreduceOptions ao;
    ao.op = op;
    for (int it = 0; it < iters + o.warmup; ++it) {
      // Reset the input.
      if (o.collective == "allreduce") {
        for (size_t i = 0; i < count; ++i) set(buf.data(), dtype, i, input(rank, i));
      } else if (o.collective == "broadcast") {
        for (size_t i = 0; i < count; ++i) set(buf.data(), dtype, i, rank == 0 ? input(0, i) : -1);
      }
      comm->barrier();
      double c0 = cpu_seconds();
      auto t0 = std::chrono::steady_clock::now();
      if (o.collective == "allreduce") {
        comm->allreduce(Buffer(buf.data(), count, dtype), ao);
      } else if (o.collective == "broadcast") {
        comm->broadcast(Buffer(buf.data(), count, dtype), 0);
      } else {
        comm->barrier();
      }
      auto t1 = std::chrono::steady_clock::now();
      double c1 = cpu_seconds();
      if (it >= o.warmup) {
        times.push_back(std::chrono::duration<double>(t1 - t0).count());
        cpu += c1 - c0;
      }
      // Check.
      if (o.collective == "allreduce") {
        for (size_t i = 0; i < count; ++i) {
          double expect = 0;
          switch (op) {
            case ReduceOp::Sum: expect = n * (i % 3) + n * (n + 1) / 2.0; break;
            case ReduceOp::Avg: expect = (i % 3) + (n + 1) / 2.0; break;
            case ReduceOp::Min: expect = 1 + static_cast<double>(i % 3); break;
            case ReduceOp::Max: expect = n + static_cast<double>(i % 3); break;
            case ReduceOp::Prod: {
              expect = 1;
              for (int r = 0; r < n; ++r) expect *= input(r, i);
              break;
            }
          }
          double tmp[1];
          set(tmp, DType::Float64, 0, expect);
          std::vector<uint8_t> e(esize);
          set(e.data(), dtype, 0, expect);
          if (std::memcmp(e.data(), buf.data() + i * esize, esize) != 0) wrong += 1;
        }
      } else if (o.collective == "broadcast") {
        for (size_t i = 0; i < count; ++i) wrong += get(buf.data(), dtype, i) != input(0, i);
      }
    }
    comm->allreduce(Buffer(times.data(), times.size(), DType::Float64), ReduceOp::Max);
    std::vector<double> totals{cpu, wrong};
    comm->allreduce(Buffer(totals.data(), totals.size(), DType::Float64), ReduceOp::Sum);
    std::sort(times.begin(), times.end());
    double med = times[times.size() / 2];
    double algbw = static_cast<double>(bytes) / med / 1e9;
    double factor = o.collective == "allreduce" ? 2.0 * (n - 1) / n : 1.0;
    double busbw = algbw * factor;
    double cpu_us = totals[0] / iters * 1e6;
    if (rank == 0) {
      if (o.json) {
        nlohmann::json j = {{"collective", o.collective},
                            {"bytes", bytes},
                            {"count", count},
                            {"type", o.dtype},
                            {"op", o.op},
                            {"world", n},
                            {"algo", o.algo},
                            {"time_us", med * 1e6},
                            {"algbw_gbps", algbw},
                            {"busbw_gbps", busbw},
                            {"cpu_us_per_iter", cpu_us},
                            {"errors", static_cast<int64_t>(totals[1])}};
        std::printf("%s\n", j.dump().c_str());
      } else {
        std::printf("  %12llu %12zu %8s %5s %10s %12.1f %10.3f %10.3f %12.1f %7.0f\n",
                    static_cast<unsigned long long>(bytes), count, o.dtype.c_str(), o.op.c_str(),
                    o.algo.c_str(), med * 1e6, algbw, busbw, cpu_us, totals[1]);
      }
      std::fflush(stdout);
    }
    if (bytes > max_b / 4) break;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"weft-bench: benchmark of Weft's collectives (launch with weft run -n N)"};
  app.add_option("collective", o.collective, "allreduce, broadcast or barrier")->required();
  app.add_option("--min-bytes", o.min_bytes, "smallest message (e.g. 4K)");
  app.add_option("--max-bytes", o.max_bytes, "largest message (e.g. 64M)");
  app.add_option("--dtype", o.dtype, "float32, float64, float16, bfloat16, int32, int64, uint8");
  app.add_option("--op", o.op, "sum, avg, min, max, prod");
  app.add_option("--algo", o.algo, "algorithm (auto: chosen by the cost model)");
  app.add_option("--iters", o.iters, "timed iterations per size (default: 200 / 30 / 10 by size)");
  app.add_option("--warmup", o.warmup, "warm-up iterations per size");
  app.add_flag("--json", o.json, "one JSON object per size");
  CLI11_PARSE(app, argc, argv);
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "weft-bench: %s\n", e.what());
    return 1;
  }
}
