// A worker for the multi-process tests, started with the environment of
// `weft run` (WEFT_RANK, WEFT_WORLD_SIZE, WEFT_STORE, WEFT_JOB_TOKEN...).
//
//   comm_worker allreduce-loop ITERATIONS COUNT [--wait-go]
//
// Prints "READY" once connected, runs ITERATIONS allreduces (0: until a
// failure) of COUNT floats and checks every result, printing "RUNNING"
// after the fourth; with --wait-go it first
// waits for the store key "test/go". On success prints "OK" and exits 0; on
// failure prints "ERROR <type> rank=<failed rank>: <message>" and exits
// 3 (PeerError), 4 (TimeoutError), 5 (other communication error), 6 (other).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/settings.h"
#include "core/socket.h"
#include "weft/weft.h"

namespace {

int run(int argc, char** argv) {
  if (argc < 4 || std::strcmp(argv[1], "allreduce-loop") != 0) {
    std::fprintf(stderr, "usage: comm_worker allreduce-loop ITERATIONS COUNT [--wait-go]\n");
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
