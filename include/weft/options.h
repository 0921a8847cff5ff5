// Options of a communicator. Every field has a default, and an environment
// variable that overrides the default when the options are built with
// CommOptions::from_env() (which weft::init() does). `weft config` lists
// every setting with its variable, default and meaning.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "weft/timeout.h"

namespace weft {

// Default deadline of every communication call (WEFT_TIMEOUT, seconds).
// Generous because ranks legitimately wait for each other (rank 0 evaluating
// a model while the others wait at a barrier); lower it to detect hung peers
// sooner.
inline constexpr Timeout kDefaultCommTimeout = std::chrono::seconds(300);

struct CommOptions {
  // Deadline of each operation, counted from the call (WEFT_TIMEOUT).
  Timeout timeout = kDefaultCommTimeout;

  // Shared secret of the job (WEFT_JOB_TOKEN). Every connection between two
  // ranks, and to the store, proves knowledge of it with an HMAC-SHA256
  // challenge-response before any data is accepted. `weft run` generates one
  // per job. Empty: refused unless allow_unauthenticated is true.
  std::string job_token;
  // Run without a job token (WEFT_ALLOW_UNAUTHENTICATED=1); logged as a
  // warning, since any process that reaches the ports can join or inject.
  bool allow_unauthenticated = false;

  // Network interface to listen on and advertise (WEFT_IFNAME), e.g. "eth0".
  // Empty: the address of the interface that routes to the store (loopback
  // when the store is local).
  std::string ifname;
  // Explicit IPv4 or IPv6 address to listen on and advertise (WEFT_ADDRESS);
  // takes precedence over ifname.
  std::string address;

  // Identity of this rank's host (WEFT_HOST_ID). Ranks with the same host id
  // share memory. Empty: derived from the boot id and the network namespace,
  // so that emulated hosts (namespaces on one machine) are told apart.
  std::string host_id;

  // Exchange data with the ranks of the same host through shared memory
  // (WEFT_SHM). Used for a pair of ranks only when both enable it; TCP
  // still connects every pair (control messages, failure detection).
  bool shm = true;
  // Copy large shared-memory messages once, straight from the sender's
  // buffer (process_vm_readv), where the kernel allows it (WEFT_SHM_CMA);
  // off, or where not allowed, they are copied through the rings.
  bool shm_single_copy = true;
  // Messages of at least this many bytes may use single copy: those larger
  // than a quarter of a ring, or any when the ring is busy
  // (WEFT_SHM_CMA_MIN).
  size_t shm_single_copy_min_bytes = 32u << 10;
  // Bytes of each shared-memory ring, per pair of ranks and direction
  // (WEFT_SHM_RING, a power of two from 64K to 64M); 0: 1 MiB, less on
  // hosts with more than 8 ranks.
  size_t shm_ring_bytes = 0;

  // TCP connections per pair of ranks (WEFT_SOCKETS_PER_PEER, 1..16).
  // Messages are spread over them by tag.
  int sockets_per_peer = 1;
  // SO_SNDBUF / SO_RCVBUF of every data connection (WEFT_SOCKET_BUFFER,
  // bytes; 0 leaves the kernel's default and autotuning).
  size_t socket_buffer_bytes = 4u << 20;
  // Bytes of messages that arrived before their receive was posted that may
  // be held in memory per peer (WEFT_MAX_UNEXPECTED, bytes). Beyond that the
  // connection stops reading until receives are posted (back-pressure).
  size_t max_unexpected_bytes = 256u << 20;

  // Liveness: every rank sends a small authenticated UDP datagram to each
  // peer every heartbeat_interval (WEFT_HEARTBEAT_INTERVAL), from a thread
  // of its own, and declares a peer failed when none arrived for
  // heartbeat_timeout (WEFT_HEARTBEAT_TIMEOUT; 0 turns liveness off): every
  // pending call fails with PeerError naming it ("silent for 4.2 s"). Slow
  // is not dead: the heartbeat thread runs while the training thread
  // computes and beside bulk transfers. The interval must be at most half
  // the timeout.
  Timeout heartbeat_interval = std::chrono::milliseconds(500);
  Timeout heartbeat_timeout = std::chrono::seconds(4);
  // This worker's id, unique per process incarnation (WEFT_MEMBER, set by
  // `weft run`, e.g. "n0.s2.r1"). Published at rendezvous; a rank that
  // declares a peer dead writes the root store key weft/evict/<member>, so
  // that the peer's launcher kills it. Empty: nothing is written.
  std::string member;

  // Name of the communicator: the store key space it uses ("world").
  std::string name = "world";
  // Generation of the communicator. 0 (the default) takes the next
  // generation of `name` from the store: the k-th time a set of ranks
  // creates a communicator of the same name, all of them get generation k.
  // Frames of other generations are rejected.
  uint32_t generation = 0;

  // Options with every field overridden by its environment variable when
  // set. Throws weft::InvalidArgument naming the variable on a bad value.
  static CommOptions from_env();
};

}  // namespace weft
