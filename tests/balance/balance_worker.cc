// A worker of the balance tests, started under `weft run`: a BSP training
// loop whose "model" is real CPU work proportional to the worker's share
// (no sleeping: a throttled CPU makes it slower, as it does a real model),
// driven by the balancer. Each step: compute share * --work-per-sample
// rounds of arithmetic, timed; an allreduce (the gradient exchange); then
// Balancer::end_step. Rank 0 prints one JSON line at the end:
//   {"shares": [...], "rates": [...], "decisions": N, "throttled": [...],
//    "memory_pressure": [...], "shedding": [...], "cpu_quota": [...],
//    "quota_rate": [...], "quota_bound": [...]}
//
//   balance_worker [--steps N] [--global-batch B] [--work-per-sample K]
//                  [--slow-rank R --cgroup DIR]
//                  [--slow-rank R --memory-cgroup DIR --ballast-mb M --memory-fill F]
// With --cgroup, rank R first moves itself into the cgroup DIR (writes its
// pid to DIR/cgroup.procs or DIR/tasks), so that only it is throttled.
// With --memory-cgroup, rank R moves itself into the memory cgroup DIR,
// touches M MiB, and sets DIR's limit so that its resident memory is the
// fraction F of it: a worker near its memory limit.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "weft/balance.h"
#include "weft/weft.h"

namespace {

// Work that the compiler cannot remove: a chain of dependent multiply-adds.
double spin(int64_t rounds) {
  volatile double sink = 0;
  double x = 1.000001;
  for (int64_t i = 0; i < rounds; ++i) x = x * 1.0000001 + 1e-9;
  sink = x;
  return sink;
}

// This process's resident memory, from /proc/self/statm.
int64_t rss_bytes() {
  std::ifstream in("/proc/self/statm");
  int64_t size = 0, resident = 0;
  in >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

// Sets the memory limit of the cgroup `dir` (v1 or v2) to `bytes`.
bool set_memory_limit(const std::string& dir, int64_t bytes) {
  for (const char* file : {"/memory.limit_in_bytes", "/memory.max"}) {
    std::ofstream f(dir + file);
    if (!f) continue;
    f << bytes << std::flush;
    if (f) return true;
  }
  return false;
}

bool join_cgroup(const std::string& dir) {
  for (const char* file : {"/cgroup.procs", "/tasks"}) {
    std::ofstream f(dir + file);
    if (!f) continue;
    f << getpid() << std::flush;
    if (f) return true;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t steps = 80, global_batch = 64, work = 20000;
  int slow_rank = -1;
  std::string cgroup, memory_cgroup;
  int64_t ballast_mb = 0;
  double memory_fill = 0.95;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--steps") {
      steps = std::stoll(v);
    } else if (k == "--global-batch") {
      global_batch = std::stoll(v);
    } else if (k == "--work-per-sample") {
      work = std::stoll(v);
    } else if (k == "--slow-rank") {
      slow_rank = std::stoi(v);
    } else if (k == "--cgroup") {
      cgroup = v;
    } else if (k == "--memory-cgroup") {
      memory_cgroup = v;
    } else if (k == "--ballast-mb") {
      ballast_mb = std::stoll(v);
    } else if (k == "--memory-fill") {
      memory_fill = std::stod(v);
    } else {
      std::fprintf(stderr, "balance_worker: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  try {
    auto comm = weft::init();
    if (!cgroup.empty() && comm->rank() == slow_rank && !join_cgroup(cgroup)) {
      std::fprintf(stderr, "balance_worker: cannot join cgroup %s\n", cgroup.c_str());
      return 3;
    }
    std::vector<char> ballast;
    if (!memory_cgroup.empty() && comm->rank() == slow_rank) {
      if (!join_cgroup(memory_cgroup)) {
        std::fprintf(stderr, "balance_worker: cannot join cgroup %s\n", memory_cgroup.c_str());
        return 3;
      }
      ballast.assign(static_cast<size_t>(ballast_mb) << 20, 1);  // touched: resident
      const auto limit = static_cast<int64_t>(static_cast<double>(rss_bytes()) / memory_fill);
      if (!set_memory_limit(memory_cgroup, limit)) {
        std::fprintf(stderr, "balance_worker: cannot set the memory limit of %s\n",
                     memory_cgroup.c_str());
        return 3;
      }
    }
    weft::balance::Balancer b(comm, {.mode = weft::balance::Mode::Dynamic,
                                     .global_batch = global_batch,
                                     .exchange_every = 2,
                                     .warmup_steps = 2});
    double grad = 0;
    for (int64_t s = 0; s < steps; ++s) {
      const auto t0 = std::chrono::steady_clock::now();
      grad = spin(b.share() * work);
      const auto t1 = std::chrono::steady_clock::now();
      comm->allreduce(weft::Buffer(&grad, 1, weft::DType::Float64), weft::ReduceOp::Sum);
      const auto t2 = std::chrono::steady_clock::now();
      b.end_step({.compute_seconds = std::chrono::duration<double>(t1 - t0).count(),
                  .wait_seconds = std::chrono::duration<double>(t2 - t1).count()});
    }
    if (!ballast.empty()) {  // held to the end: resident all along
      volatile char last = ballast.back();
      (void)last;
    }
    if (comm->rank() == 0) {
      std::vector<double> rates, throttled, pressure, quota, quota_rate;
      std::vector<std::string> shedding, quota_bound;
      for (const auto& w : b.workers()) {
        rates.push_back(w.rate);
        throttled.push_back(w.throttled_fraction);
        pressure.push_back(w.memory_pressure);
        shedding.emplace_back(w.shedding ? "true" : "false");
        quota.push_back(w.cpu_quota_cores);
        quota_rate.push_back(w.quota_rate);
        quota_bound.emplace_back(w.quota_bound ? "true" : "false");
      }
      fmt::print(
          "{{\"shares\": [{}], \"rates\": [{:.1f}], \"decisions\": {}, \"throttled\": [{:.3f}], "
          "\"memory_pressure\": [{:.3f}], \"shedding\": [{}], \"cpu_quota\": [{:.3f}], "
          "\"quota_rate\": [{:.1f}], \"quota_bound\": [{}]}}\n",
          fmt::join(b.shares(), ", "), fmt::join(rates, ", "), b.decisions().size(),
          fmt::join(throttled, ", "), fmt::join(pressure, ", "), fmt::join(shedding, ", "),
          fmt::join(quota, ", "), fmt::join(quota_rate, ", "), fmt::join(quota_bound, ", "));
      std::fflush(stdout);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "balance_worker: %s\n", e.what());
    return 1;
  }
}
