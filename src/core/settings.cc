#include "core/settings.h"

#include <fmt/format.h>

#include <array>
#include <cerrno>
#include <cmath>
#include <cstdlib>

#include "weft/errors.h"

namespace weft::settings {
namespace {

constexpr std::array kSettings = {
    Setting{"WEFT_RANK", "", "rank of this process (set by weft run)"},
    Setting{"WEFT_WORLD_SIZE", "", "number of ranks of the job (set by weft run)"},
    Setting{"WEFT_LOCAL_RANK", "", "rank among the ranks of this host (set by weft run)"},
    Setting{"WEFT_LOCAL_SIZE", "", "number of ranks on this host (set by weft run)"},
    Setting{"WEFT_NNODES", "", "number of nodes of the job (set by weft run)"},
    Setting{"WEFT_NODE_RANK", "", "index of this node in the job (set by weft run)"},
    Setting{"WEFT_STORE", "",
            "host:port of the rendezvous store (set by weft run, which serves it; under "
            "mpirun/srun/torchrun rank 0 serves it there)"},
    Setting{"WEFT_STORE_EXTERNAL", "0",
            "1: a store already runs at WEFT_STORE; no rank serves it (mpirun/srun/torchrun)"},
    Setting{"WEFT_STORE_PORT", "",
            "port rank 0 serves the store on under mpirun/srun/torchrun (with MASTER_ADDR, or "
            "Slurm's first node)"},
    Setting{"WEFT_JOB_TOKEN", "", "shared secret every connection must prove it knows"},
    Setting{"WEFT_ALLOW_UNAUTHENTICATED", "0", "1: run without a job token (logged)"},
    Setting{"WEFT_TIMEOUT", "300", "deadline of every communication call, seconds"},
    Setting{"WEFT_STORE_TIMEOUT", "300",
            "deadline of every store call, and of the rendezvous at start-up, seconds"},
    Setting{"WEFT_RENDEZVOUS_LOG_INTERVAL", "10",
            "a rank waiting at start-up says what it waits for every this many seconds"},
    Setting{"WEFT_IFNAME", "", "network interface to listen on and advertise"},
    Setting{"WEFT_ADDRESS", "", "IP address to listen on and advertise (over WEFT_IFNAME)"},
    Setting{"WEFT_HOST_ID", "", "identity of this host (ranks with the same id share memory)"},
    Setting{"WEFT_SHM", "1",
            "1: ranks of one host exchange data through shared memory (0: TCP only)"},
    Setting{
        "WEFT_SHM_CMA", "1",
        "1: large shared-memory messages are copied once with process_vm_readv (0: via the rings)"},
    Setting{"WEFT_SHM_CMA_MIN", "32K",
            "smallest shared-memory message that may be copied with process_vm_readv"},
    Setting{"WEFT_SHM_RING", "0",
            "bytes of each shared-memory ring (power of two, 64K..64M; 0: 1M, less above 8 local "
            "ranks)"},
    Setting{"WEFT_SOCKETS_PER_PEER", "1", "TCP connections per pair of ranks (1..16)"},
    Setting{"WEFT_SOCKET_BUFFER", "4M", "SO_SNDBUF/SO_RCVBUF of data connections (0: kernel)"},
    Setting{"WEFT_MAX_UNEXPECTED", "256M", "bytes of early messages held per peer"},
    Setting{"WEFT_SPIN_US", "20", "bounded poll before a waiter sleeps, microseconds (0: none)"},
    Setting{"WEFT_SPIN_YIELD_US", "100",
            "the same poll, yielding the CPU every round, when the host has more ranks of the job "
            "than CPUs"},
    Setting{"WEFT_SEGMENT_BYTES", "0",
            "segment of the pipelined algorithms (0: a quarter of the chunk, 256K..2M; half, "
            "1M..8M, when the group shares memory)"},
    Setting{"WEFT_REDUCE_ISA", "auto", "reduction kernels ISA cap: auto, avx512, avx2 or generic"},
    Setting{"WEFT_MODEL_INTER_MBPS", "1250", "cost model: one host's network bandwidth, MB/s"},
    Setting{"WEFT_MODEL_INTER_LATENCY_NS", "50000", "cost model: latency between hosts, ns"},
    Setting{"WEFT_HIER_BLOCK_BYTES", "1M", "pipeline block of the hierarchical allreduce"},
    Setting{"WEFT_LOG_LEVEL", "warn", "trace, debug, info, warn, error or off"},
};

[[noreturn]] void bad(std::string_view env, std::string_view value, std::string_view expected) {
  throw InvalidArgument(fmt::format("{}='{}' is invalid: expected {}", env, value, expected));
}

}  // namespace

std::span<const Setting> all() { return kSettings; }

std::optional<std::string> get(std::string_view env) {
  const char* v = std::getenv(std::string(env).c_str());
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

std::string get_string(std::string_view env, std::string_view def) {
  auto v = get(env);
  return v ? *v : std::string(def);
}

bool get_bool(std::string_view env, bool def) {
  auto v = get(env);
  if (!v) return def;
  if (*v == "1" || *v == "true" || *v == "yes" || *v == "on") return true;
  if (*v == "0" || *v == "false" || *v == "no" || *v == "off") return false;
  bad(env, *v, "1, 0, true, false, yes, no, on or off");
}

int64_t get_int(std::string_view env, int64_t def, int64_t min, int64_t max) {
  auto v = get(env);
  if (!v) return def;
  errno = 0;
  char* end = nullptr;
  long long x = std::strtoll(v->c_str(), &end, 10);
  if (errno != 0 || end == v->c_str() || *end != '\0' || x < min || x > max) {
    bad(env, *v, fmt::format("an integer in [{}, {}]", min, max));
  }
  return x;
}

uint64_t parse_bytes(std::string_view text, std::string_view what) {
  std::string s(text);
  errno = 0;
  char* end = nullptr;
  unsigned long long x = std::strtoull(s.c_str(), &end, 10);
  if (errno != 0 || end == s.c_str() || s[0] == '-')
    bad(what, text, "a byte count such as 4096, 64K, 4M or 1G");
  uint64_t mult = 1;
  std::string_view suffix(end);
  if (suffix == "K" || suffix == "k" || suffix == "KiB")
    mult = 1ull << 10;
  else if (suffix == "M" || suffix == "m" || suffix == "MiB")
    mult = 1ull << 20;
  else if (suffix == "G" || suffix == "g" || suffix == "GiB")
    mult = 1ull << 30;
  else if (!suffix.empty())
    bad(what, text, "a byte count such as 4096, 64K, 4M or 1G");
  if (x > UINT64_MAX / mult) bad(what, text, "a byte count below 2^64");
  return x * mult;
}

uint64_t get_bytes(std::string_view env, uint64_t def, uint64_t min, uint64_t max) {
  auto v = get(env);
  if (!v) return def;
  uint64_t x = parse_bytes(*v, env);
  if (x < min || x > max) bad(env, *v, fmt::format("a byte count in [{}, {}]", min, max));
  return x;
}

std::chrono::milliseconds parse_seconds(std::string_view text, std::string_view what) {
  std::string s(text);
  errno = 0;
  char* end = nullptr;
  double x = std::strtod(s.c_str(), &end);
  if (errno != 0 || end == s.c_str() || *end != '\0' || !std::isfinite(x) || x <= 0 || x > 1e9) {
    bad(what, text, "a positive number of seconds such as 30 or 0.5");
  }
  return std::chrono::milliseconds(
      std::max<int64_t>(1, static_cast<int64_t>(std::llround(x * 1000))));
}

std::chrono::milliseconds get_seconds(std::string_view env, std::chrono::milliseconds def) {
  auto v = get(env);
  return v ? parse_seconds(*v, env) : def;
}

}  // namespace weft::settings
