// A worker for the multi-process tests, started with the environment of
// `weft run` (WEFT_RANK, WEFT_WORLD_SIZE, WEFT_STORE, WEFT_JOB_TOKEN...).
//
//   comm_worker allreduce-loop ITERATIONS COUNT [--wait-go]
//   comm_worker compute SPIN_RANK SECONDS COUNT
//
// Prints "READY" once connected, runs ITERATIONS allreduces (0: until a
// failure) of COUNT floats and checks every result, printing "RUNNING"
// after the fourth; with --wait-go it first
// waits for the store key "test/go". On success prints "OK" and exits 0; on
// failure prints "ERROR <type> rank=<failed rank>: <message>" and exits
// 3 (PeerError), 4 (TimeoutError), 5 (other communication error), 6 (other).
//
// compute: after READY and four small allreduces ("RUNNING"), rank SPIN_RANK
// keeps its training thread busy on the CPU for SECONDS ("SPINNING", then
// "SPUN") while the others wait in the next allreduce, one of COUNT floats,
// checked; every rank prints "ALLREDUCE <seconds> s" (how long that
// allreduce took it), then "OK". SPIN_RANK -1: no rank spins.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/settings.h"
#include "core/socket.h"
#include "weft/weft.h"

namespace {

void check_sum(const std::vector<float>& v, int n, long it) {
  for (size_t i = 0; i < v.size(); ++i) {
    float expect = static_cast<float>(n * (n - 1) / 2 + n * static_cast<int>(i % 5));
    if (v[i] != expect) {
      std::printf("WRONG iteration %ld element %zu: %f != %f\n", it, i, v[i], expect);
      std::exit(7);
    }
  }
}

void fill(std::vector<float>& v, int rank) {
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(rank + (i % 5));
}

int compute(int spin_rank, double seconds, size_t count) {
  auto comm = weft::init();
  const int n = comm->size();
  std::printf("READY rank %d of %d\n", comm->rank(), n);
  std::fflush(stdout);
  std::vector<float> small(1000);
  for (long it = 0; it < 4; ++it) {
    fill(small, comm->rank());
    comm->allreduce(small, weft::ReduceOp::Sum);
    check_sum(small, n, it);
  }
  std::printf("RUNNING rank %d\n", comm->rank());
  std::fflush(stdout);
  if (comm->rank() == spin_rank) {
    std::printf("SPINNING rank %d for %.1f s\n", comm->rank(), seconds);
    std::fflush(stdout);
    // Busy on the CPU, never sleeping: a long compute step.
    const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    volatile uint64_t x = 1;
    while (std::chrono::steady_clock::now() < until) {
      for (int i = 0; i < 100000; ++i) x = x * 6364136223846793005ull + 1442695040888963407ull;
    }
    std::printf("SPUN rank %d\n", comm->rank());
    std::fflush(stdout);
  }
  std::vector<float> v(count);
  fill(v, comm->rank());
  const auto t0 = std::chrono::steady_clock::now();
  comm->allreduce(v, weft::ReduceOp::Sum);
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  check_sum(v, n, 4);
  std::printf("ALLREDUCE %.1f s rank %d\n", took, comm->rank());
  comm->barrier();
  std::printf("OK\n");
  return 0;
}

int run(int argc, char** argv) {
  if (argc == 5 && std::strcmp(argv[1], "compute") == 0) {
    return compute(std::atoi(argv[2]), std::atof(argv[3]), std::strtoull(argv[4], nullptr, 10));
  }
  if (argc < 4 || std::strcmp(argv[1], "allreduce-loop") != 0) {
    std::fprintf(stderr,
                 "usage: comm_worker allreduce-loop ITERATIONS COUNT [--wait-go]\n"
                 "       comm_worker compute SPIN_RANK SECONDS COUNT\n");
    return 2;
  }
  long iterations = std::atol(argv[2]);
  size_t count = std::strtoull(argv[3], nullptr, 10);
  bool wait_go = argc > 4 && std::strcmp(argv[4], "--wait-go") == 0;
  auto comm = weft::init();
  std::printf("READY rank %d of %d\n", comm->rank(), comm->size());
  std::fflush(stdout);
  if (wait_go) {
    auto [host, port] =
        weft::net::split_host_port(weft::settings::get_string("WEFT_STORE", ""), "WEFT_STORE");
    weft::TcpStoreOptions so;
    so.job_token = weft::settings::get_string("WEFT_JOB_TOKEN", "");
    weft::TcpStore store(host, port, so);
    store.get("test/go", std::chrono::seconds(120));
  }
  const int n = comm->size();
  std::vector<float> v(count);
  for (long it = 0; iterations == 0 || it < iterations; ++it) {
    for (size_t i = 0; i < count; ++i) v[i] = static_cast<float>(comm->rank() + (i % 5));
    comm->allreduce(v, weft::ReduceOp::Sum);
    for (size_t i = 0; i < count; ++i) {
      float expect = static_cast<float>(n * (n - 1) / 2 + n * static_cast<int>(i % 5));
      if (v[i] != expect) {
        std::printf("WRONG iteration %ld element %zu: %f != %f\n", it, i, v[i], expect);
        return 7;
      }
    }
    if (it == 3) {  // the job is in the middle of its allreduces
      std::printf("RUNNING rank %d\n", comm->rank());
      std::fflush(stdout);
    }
  }
  comm->barrier();
  std::printf("OK\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const weft::PeerError& e) {
    std::printf("ERROR PeerError rank=%d: %s\n", e.rank(), e.what());
    return 3;
  } catch (const weft::TimeoutError& e) {
    std::printf("ERROR TimeoutError rank=%d: %s\n", e.rank(), e.what());
    return 4;
  } catch (const weft::CommError& e) {
    std::printf("ERROR CommError: %s\n", e.what());
    return 5;
  } catch (const std::exception& e) {
    std::printf("ERROR other: %s\n", e.what());
    return 6;
  }
}
