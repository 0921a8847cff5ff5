// A worker for the multi-process shared-memory tests, started by `weft run`
// or directly with its environment (WEFT_RANK, WEFT_WORLD_SIZE, WEFT_STORE...).
//
//   shm_worker cases [--hosts H] [--large]
//       The collective case matrix (tests/collectives/cases.h). With
//       --hosts H, ranks are split into H emulated hosts (host id
//       "test-host-<rank * H / size>"), so that some pairs use shared
//       memory and the others TCP. Prints "TRANSPORT <names> LOCAL l/L",
//       then "CASES <n> FAILURES <f> (job total <t>)"; exits 0 only if none.
//   shm_worker stream BYTES
//       Ignores SIGTERM (the launcher's stop when a rank dies: the test is
//       about this worker's own detection). Prints "READY <rank> <pid>"
//       after the first round and "RUNNING <rank>" after the fourth,
//       forever sends BYTES to the next
//       rank and receives BYTES from the previous one, and allreduces, each
//       result checked. On a failure prints "ERROR <type> rank=<r>: ...",
//       then "MEMFDS <open memfd descriptors> MAPPED <mapped segments>"
//       while the communicator lives and "UNMAPPED <segments>" after it is
//       destroyed; exits 3 (PeerError), 4 (TimeoutError), 5 (other).
#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "collectives/cases.h"
#include "core/settings.h"
#include "weft/weft.h"

namespace {

size_t count_maps() {
  std::ifstream in("/proc/self/maps");
  std::string line;
  size_t n = 0;
  while (std::getline(in, line)) n += line.find("memfd:weft-shm") != std::string::npos ? 1 : 0;
  return n;
}

size_t count_memfds() {
  size_t n = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (dirent* e = ::readdir(d)) {
      char target[256] = {};
      std::string p = std::string("/proc/self/fd/") + e->d_name;
      if (::readlink(p.c_str(), target, sizeof target - 1) > 0 &&
          std::strstr(target, "memfd:") != nullptr) {
        ++n;
      }
    }
    ::closedir(d);
  }
  return n;
}

int cases(int argc, char** argv) {
  weft::testing::CaseOptions co;
  int hosts = 0;
  for (int i = 2; i < argc; ++i) {
    if (std::strcmp(argv[i], "--large") == 0) co.large = true;
    if (std::strcmp(argv[i], "--hosts") == 0 && i + 1 < argc) hosts = std::atoi(argv[++i]);
  }
  auto o = weft::CommOptions::from_env();
  if (hosts > 0) {
    int rank = static_cast<int>(weft::settings::get_int("WEFT_RANK", 0, 0, 1 << 20));
    int size = static_cast<int>(weft::settings::get_int("WEFT_WORLD_SIZE", 1, 1, 1 << 20));
    o.host_id = "test-host-" + std::to_string(rank * hosts / size);
  }
  auto comm = weft::init(o);
  std::printf("TRANSPORT %s LOCAL %d/%d\n", comm->transports().c_str(), comm->local_rank(),
              comm->local_size());
  auto report = weft::testing::run_collective_cases(*comm, co);
  std::vector<int64_t> failures{static_cast<int64_t>(report.failures.size())};
  comm->allreduce(failures, weft::ReduceOp::Sum);
  for (auto& f : report.failures) std::printf("FAIL %s\n", f.c_str());
  std::printf("CASES %d FAILURES %lld (job total %lld)\n", report.cases,
              static_cast<long long>(report.failures.size()), static_cast<long long>(failures[0]));
  return failures[0] == 0 ? 0 : 1;
}

int stream(std::shared_ptr<weft::Communicator>& comm, size_t bytes) {
  const int n = comm->size(), r = comm->rank();
  std::vector<uint8_t> out(bytes), in(bytes);
  std::vector<float> v(bytes / 4);
  for (long it = 0;; ++it) {
    for (size_t i = 0; i < bytes; ++i) out[i] = static_cast<uint8_t>(i * 31 + r + it);
    auto rw =
        comm->recv(weft::Buffer(in.data(), in.size(), weft::DType::UInt8), (r + n - 1) % n, 1);
    auto sw =
        comm->send(weft::ConstBuffer(out.data(), out.size(), weft::DType::UInt8), (r + 1) % n, 1);
    rw->wait();
    sw->wait();
    const int from = (r + n - 1) % n;
    for (size_t i = 0; i < bytes; i += 4099) {
      if (in[i] != static_cast<uint8_t>(i * 31 + from + it)) {
        std::printf("WRONG iteration %ld byte %zu\n", it, i);
        return 7;
      }
    }
    std::fill(v.begin(), v.end(), 1.0f);
    comm->allreduce(v, weft::ReduceOp::Sum);
    if (v[v.size() / 2] != static_cast<float>(n)) {
      std::printf("WRONG allreduce %f\n", v[v.size() / 2]);
      return 7;
    }
    if (it == 0) {
      std::printf("READY %d %d\n", r, static_cast<int>(::getpid()));
      std::fflush(stdout);
    }
    if (it == 3) {  // in the middle of the transfers
      std::printf("RUNNING %d\n", r);
      std::fflush(stdout);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: shm_worker cases [--hosts H] [--large] | stream BYTES\n");
    return 2;
  }
  std::shared_ptr<weft::Communicator> comm;
  int code = 0;
  try {
    if (std::strcmp(argv[1], "cases") == 0) return cases(argc, argv);
    if (std::strcmp(argv[1], "stream") != 0 || argc < 3) return 2;
    ::signal(SIGTERM, SIG_IGN);
    comm = weft::init();
    return stream(comm, std::strtoull(argv[2], nullptr, 10));
  } catch (const weft::PeerError& e) {
    std::printf("ERROR PeerError rank=%d: %s\n", e.rank(), e.what());
    code = 3;
  } catch (const weft::TimeoutError& e) {
    std::printf("ERROR TimeoutError rank=%d: %s\n", e.rank(), e.what());
    code = 4;
  } catch (const std::exception& e) {
    std::printf("ERROR other: %s\n", e.what());
    code = 5;
  }
  std::printf("MEMFDS %zu MAPPED %zu\n", count_memfds(), count_maps());
  comm.reset();
  std::printf("UNMAPPED %zu\n", count_maps());
  return code;
}
