// Every setting Weft reads from the environment, declared once, here: its
// variable, its type, its default, its bounds or allowed values and what it
// does. The readers (settings::get(kSpinUs)), the start-up check
// (validate_environment) and `weft config` all work from these
// declarations; reading a WEFT_ variable that is not declared here is a
// programming error (weft::InternalError), and a test scans the source tree
// for WEFT_ names that are not declared.
//
// Adding a setting: declare it below and list it in kAll (settings.cc).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "weft/types.h"

namespace weft::settings {

enum class Type {
  Int,        // a decimal integer in [min, max]
  Bytes,      // a byte count with an optional K, M or G suffix, in [min, max]
  Seconds,    // a positive decimal number of seconds ("2.5")
  Bool,       // 1/0/true/false/yes/no/on/off
  String,     // any text of at least min bytes
  Enum,       // one of `choices` ("a|b|c")
  HostPort,   // HOST:PORT
  Algorithm,  // a collective algorithm name (weft::parse_algorithm)
};

// Flags of a setting.
inline constexpr unsigned kNoDefault = 1;       // set by a launcher or the user; no default
inline constexpr unsigned kSecret = 2;          // `weft config` does not print its value
inline constexpr unsigned kZeroOrPowerOf2 = 4;  // Bytes: 0 (automatic) or a power of two in range
inline constexpr unsigned kZeroTurnsOff = 8;    // Seconds: 0 is accepted and turns the feature off

struct Setting {
  std::string_view env;  // e.g. "WEFT_TIMEOUT"
  Type type = Type::String;
  // Int: the default and bounds; Bytes: the same in bytes; Seconds: the
  // default in milliseconds; Bool: the default (0 or 1); String: min is the
  // shortest value accepted.
  int64_t def = 0, min = 0, max = 0;
  std::string_view text_def;  // String, Enum, Algorithm: the default
  std::string_view choices;   // Enum: the allowed values, "a|b|c"
  unsigned flags = 0;
  std::string_view doc;  // one line
};

// Typed declarations: settings::get() of each returns the parsed value.
struct IntSetting : Setting {
  constexpr IntSetting(std::string_view e, int64_t d, int64_t lo, int64_t hi, std::string_view doc_,
                       unsigned f = 0)
      : Setting{e, Type::Int, d, lo, hi, {}, {}, f, doc_} {}
};
struct BytesSetting : Setting {
  constexpr BytesSetting(std::string_view e, int64_t d, int64_t lo, int64_t hi,
                         std::string_view doc_, unsigned f = 0)
      : Setting{e, Type::Bytes, d, lo, hi, {}, {}, f, doc_} {}
};
struct SecondsSetting : Setting {
  constexpr SecondsSetting(std::string_view e, double def_seconds, std::string_view doc_,
                           unsigned f = 0)
      : Setting{e, Type::Seconds, static_cast<int64_t>(def_seconds * 1000 + 0.5), 0, 0, {}, {},
                f, doc_} {}
};
struct BoolSetting : Setting {
  constexpr BoolSetting(std::string_view e, bool d, std::string_view doc_)
      : Setting{e, Type::Bool, d ? 1 : 0, 0, 1, {}, {}, 0, doc_} {}
};
struct StringSetting : Setting {
  constexpr StringSetting(std::string_view e, std::string_view doc_, unsigned f = 0,
                          int64_t min_length = 0, Type t = Type::String)
      : Setting{e, t, 0, min_length, 0, {}, {}, f, doc_} {}
};
struct EnumSetting : Setting {
  constexpr EnumSetting(std::string_view e, std::string_view d, std::string_view allowed,
                        std::string_view doc_, Type t = Type::Enum)
      : Setting{e, t, 0, 0, 0, d, allowed, 0, doc_} {}
};

inline constexpr int64_t kMaxRanks = 1 << 20;
// Shortest job token accepted (WEFT_JOB_TOKEN, weft run --token-file): 16
// bytes, 128 bits when they are random bytes; `weft run` makes 64 hex digits.
inline constexpr int64_t kMinTokenBytes = 16;

// --- Set by the launcher (weft run, or read from mpirun/srun/torchrun's variables).
inline constexpr IntSetting kRank{
    "WEFT_RANK", 0, 0, kMaxRanks - 1, "rank of this process (set by weft run)", kNoDefault};
inline constexpr IntSetting kWorldSize{
    "WEFT_WORLD_SIZE", 1, 1, kMaxRanks, "number of ranks of the job (set by weft run)", kNoDefault};
inline constexpr IntSetting kLocalRank{"WEFT_LOCAL_RANK", 0, 0, kMaxRanks,
                                       "rank among the ranks of this host (set by weft run)"};
inline constexpr IntSetting kLocalSize{"WEFT_LOCAL_SIZE", 1, 1, kMaxRanks,
                                       "number of ranks on this host (set by weft run)"};
inline constexpr IntSetting kNnodes{"WEFT_NNODES", 1, 1, 1 << 16,
                                    "number of nodes of the job (set by weft run)"};
inline constexpr IntSetting kNodeRank{"WEFT_NODE_RANK", 0, 0, (1 << 16) - 1,
                                      "index of this node in the job (set by weft run)"};
inline constexpr StringSetting kMember{
    "WEFT_MEMBER",
    "member id of this process incarnation, n<node>.s<slot>.r<restart> (set by weft run)",
    kNoDefault};
inline constexpr StringSetting kElastic{
    "WEFT_ELASTIC", "MIN:MAX of an elastic job (set by weft run --elastic)", kNoDefault};
inline constexpr StringSetting kStore{
    "WEFT_STORE",
    "host:port of the rendezvous store (set by weft run, which serves it; under "
    "mpirun/srun/torchrun rank 0 serves it there), or etcd://HOST:PORT[,HOST:PORT...]/PREFIX: "
    "an etcd cluster, served by nobody in the job",
    kNoDefault, 0, Type::HostPort};
inline constexpr BoolSetting kStoreExternal{
    "WEFT_STORE_EXTERNAL", false,
    "1: a store already runs at WEFT_STORE; no rank serves it (mpirun/srun/torchrun)"};
inline constexpr IntSetting kStorePort{
    "WEFT_STORE_PORT",
    0,
    1,
    65535,
    "port rank 0 serves the store on under mpirun/srun/torchrun (with MASTER_ADDR, or Slurm's "
    "first node; default MASTER_PORT, +1 under torchrun)",
    kNoDefault};
// --- Elastic membership (weft run --elastic MIN:MAX; weft/elastic.h).
inline constexpr SecondsSetting kElasticSettle{
    "WEFT_ELASTIC_SETTLE", 30,
    "elastic: how long a new generation waits for a member of the last one not known to be dead"};
inline constexpr SecondsSetting kElasticMinWait{
    "WEFT_ELASTIC_MIN_WAIT", 120,
    "elastic: how long the workers wait for joins when fewer than MIN are left, seconds"};
inline constexpr SecondsSetting kElasticJoinWait{
    "WEFT_ELASTIC_JOIN_WAIT", 600,
    "elastic: how long a worker waits to be admitted to a running job (members admit joins at "
    "their commits), seconds"};
inline constexpr BytesSetting kStoreMaxBytes{
    "WEFT_STORE_MAX_BYTES", int64_t{1} << 30, 1 << 20, int64_t{1} << 40,
    "total bytes of keys and values the store server holds; a write above it is refused"};
// --- Security.
inline constexpr StringSetting kJobToken{
    "WEFT_JOB_TOKEN", "shared secret every connection must prove it knows (at least 16 bytes)",
    kNoDefault | kSecret, kMinTokenBytes};
inline constexpr BoolSetting kAllowUnauthenticated{"WEFT_ALLOW_UNAUTHENTICATED", false,
                                                   "1: run without a job token (logged)"};
// --- Deadlines.
inline constexpr SecondsSetting kTimeout{"WEFT_TIMEOUT", 300,
                                         "deadline of every communication call, seconds"};
inline constexpr SecondsSetting kStoreTimeout{
    "WEFT_STORE_TIMEOUT", 300,
    "deadline of every store call, and of the rendezvous at start-up, seconds"};
inline constexpr SecondsSetting kRendezvousLogInterval{
    "WEFT_RENDEZVOUS_LOG_INTERVAL", 10,
    "a rank waiting at start-up says what it waits for every this many seconds"};
// --- Liveness (src/comm/heartbeat.h).
inline constexpr SecondsSetting kHeartbeatInterval{
    "WEFT_HEARTBEAT_INTERVAL", 0.5,
    "every rank sends a heartbeat datagram to each peer this often, seconds"};
inline constexpr SecondsSetting kHeartbeatTimeout{
    "WEFT_HEARTBEAT_TIMEOUT", 4,
    "a peer whose heartbeats stop for this long is declared failed, seconds (0: off)",
    kZeroTurnsOff};
// --- Network and host.
inline constexpr StringSetting kIfname{"WEFT_IFNAME",
                                       "network interface to listen on and advertise", kNoDefault};
inline constexpr StringSetting kAddress{
    "WEFT_ADDRESS", "IP address to listen on and advertise (over WEFT_IFNAME)", kNoDefault};
inline constexpr StringSetting kHostId{
    "WEFT_HOST_ID", "identity of this host (ranks with the same id share memory)", kNoDefault};
// --- Transports.
inline constexpr BoolSetting kShm{
    "WEFT_SHM", true, "1: ranks of one host exchange data through shared memory (0: TCP only)"};
inline constexpr BoolSetting kShmCma{
    "WEFT_SHM_CMA", true,
    "1: large shared-memory messages are copied once with process_vm_readv (0: via the rings)"};
inline constexpr BytesSetting kShmCmaMin{
    "WEFT_SHM_CMA_MIN", 32 << 10, 0, int64_t{1} << 40,
    "smallest shared-memory message that may be copied with process_vm_readv"};
inline constexpr BytesSetting kShmRing{
    "WEFT_SHM_RING",
    0,
    64 << 10,
    64 << 20,
    "bytes of each shared-memory ring (a power of two, 64K..64M; 0: 1M, less above 8 local ranks)",
    kZeroOrPowerOf2};
inline constexpr IntSetting kSocketsPerPeer{"WEFT_SOCKETS_PER_PEER", 1, 1, 16,
                                            "TCP connections per pair of ranks"};
inline constexpr BytesSetting kSocketBuffer{"WEFT_SOCKET_BUFFER", 4 << 20, 0, int64_t{1} << 30,
                                            "SO_SNDBUF/SO_RCVBUF of data connections (0: kernel)"};
inline constexpr BytesSetting kMaxUnexpected{"WEFT_MAX_UNEXPECTED", 256 << 20, 1 << 20,
                                             int64_t{1} << 40,
                                             "bytes of early messages held per peer"};
inline constexpr IntSetting kSpinUs{"WEFT_SPIN_US", 20, 0, 10000,
                                    "bounded poll before a waiter sleeps, microseconds (0: none)"};
inline constexpr IntSetting kSpinYieldUs{
    "WEFT_SPIN_YIELD_US", 100, 0, 10000,
    "the same poll, yielding the CPU every round, when the host has more ranks of the job than "
    "CPUs"};
// --- Collectives.
inline constexpr BytesSetting kSegmentBytes{
    "WEFT_SEGMENT_BYTES", 0, 0, int64_t{1} << 30,
    "segment of the pipelined algorithms (0: a quarter of the chunk, 256K..2M; half, 1M..8M, when "
    "the group shares memory; at least 4K)"};
inline constexpr EnumSetting kReduceIsa{"WEFT_REDUCE_ISA", "auto", "auto|avx512|avx2|generic",
                                        "reduction kernels ISA cap"};
inline constexpr IntSetting kModelLatencyNs{"WEFT_MODEL_LATENCY_NS", 20000, 1, 1000000000,
                                            "cost model: latency within a host, ns"};
inline constexpr IntSetting kModelMbps{"WEFT_MODEL_MBPS", 3000, 1, 100000000,
                                       "cost model: bandwidth within a host, MB/s"};
inline constexpr IntSetting kModelReduceMbps{"WEFT_MODEL_REDUCE_MBPS", 10000, 1, 100000000,
                                             "cost model: reduction speed, MB/s"};
inline constexpr IntSetting kModelInterLatencyNs{
    "WEFT_MODEL_INTER_LATENCY_NS", 50000, 1, 1000000000, "cost model: latency between hosts, ns"};
inline constexpr IntSetting kModelInterMbps{"WEFT_MODEL_INTER_MBPS", 1250, 1, 100000000,
                                            "cost model: one host's network bandwidth, MB/s"};
inline constexpr BytesSetting kHierBlockBytes{"WEFT_HIER_BLOCK_BYTES", 1 << 20, 4096,
                                              int64_t{1} << 40,
                                              "pipeline block of the hierarchical allreduce"};
#define WEFT_ALGO_SETTING(var, env, coll)                                                          \
  inline constexpr EnumSetting var {                                                               \
    env, "auto", {}, "algorithm of every " coll " (auto: the cost model chooses)", Type::Algorithm \
  }
WEFT_ALGO_SETTING(kBarrierAlgo, "WEFT_BARRIER_ALGO", "barrier");
WEFT_ALGO_SETTING(kBroadcastAlgo, "WEFT_BROADCAST_ALGO", "broadcast");
WEFT_ALGO_SETTING(kAllreduceAlgo, "WEFT_ALLREDUCE_ALGO", "allreduce");
WEFT_ALGO_SETTING(kReduceAlgo, "WEFT_REDUCE_ALGO", "reduce");
WEFT_ALGO_SETTING(kAllgatherAlgo, "WEFT_ALLGATHER_ALGO", "allgather");
WEFT_ALGO_SETTING(kAllgathervAlgo, "WEFT_ALLGATHERV_ALGO", "allgatherv");
WEFT_ALGO_SETTING(kReduceScatterAlgo, "WEFT_REDUCE_SCATTER_ALGO", "reduce_scatter");
WEFT_ALGO_SETTING(kGatherAlgo, "WEFT_GATHER_ALGO", "gather");
WEFT_ALGO_SETTING(kScatterAlgo, "WEFT_SCATTER_ALGO", "scatter");
WEFT_ALGO_SETTING(kAlltoallAlgo, "WEFT_ALLTOALL_ALGO", "alltoall");
WEFT_ALGO_SETTING(kAlltoallvAlgo, "WEFT_ALLTOALLV_ALGO", "alltoallv");
#undef WEFT_ALGO_SETTING
// --- Logging.
inline constexpr EnumSetting kLogLevel{"WEFT_LOG_LEVEL", "warn", "trace|debug|info|warn|error|off",
                                       "log level"};

// WEFT_<COLLECTIVE>_ALGO of a collective.
const EnumSetting& algorithm_setting(Collective c);

// Every declared setting, in documentation order.
std::span<const Setting* const> all();
// The declaration of a variable; nullptr when it is not declared.
const Setting* find(std::string_view env);

// The values of the declared settings: the variable's value, checked
// against the declaration, or the declared default when it is unset or
// empty. A malformed value throws weft::InvalidArgument naming the variable
// and what was expected; a declaration missing from all() throws
// weft::InternalError.
int64_t get(const IntSetting& s);
uint64_t get(const BytesSetting& s);
std::chrono::milliseconds get(const SecondsSetting& s);
bool get(const BoolSetting& s);
std::string get(const StringSetting& s);  // "" when unset
std::string get(const EnumSetting& s);
// Whether the variable is set (and not empty).
bool is_set(const Setting& s);

// The raw value of an environment variable (nullopt when unset or empty).
// For other launchers' variables (OMPI_*, SLURM_*, RANK, MASTER_ADDR...); a
// WEFT_ name must be declared (weft::InternalError otherwise).
std::optional<std::string> get(std::string_view env);
std::string get_string(std::string_view env, std::string_view def);
// An integer variable with bounds known only at run time (a rank below the
// world size, other launchers' variables). A WEFT_ name must be declared,
// and its value must also satisfy the declaration.
int64_t get_int(std::string_view env, int64_t def, int64_t min, int64_t max);

// Why `value` is not valid for s ("" when it is), e.g. "expected a byte
// count in [64K, 64M]".
std::string problem(const Setting& s, std::string_view value);
// The default as `weft config` prints it ("-" when there is none).
std::string default_text(const Setting& s);

// Checks every WEFT_* variable of the environment at start-up: throws
// weft::InvalidArgument naming the first invalid one, and logs a warning
// naming each variable that starts with WEFT_ but is not a setting (a typo,
// e.g. WEFT_TIMOUT). Entry points call it before anything else: weft::init,
// `weft run`, weft-bench.
void validate_environment();
// The variables of the environment that start with WEFT_ but are not
// declared.
std::vector<std::string> unknown_variables();

// Parsers behind the readers (also used for command-line values).
// `what` names the value in the error message.
uint64_t parse_bytes(std::string_view text, std::string_view what);
std::chrono::milliseconds parse_seconds(std::string_view text, std::string_view what);
// Largest number of seconds accepted (about 31 years).
inline constexpr double kMaxSeconds = 1e9;

}  // namespace weft::settings
