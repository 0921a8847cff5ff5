// A worker for the launcher tests: `weft run -n N -- launch_probe MODE ...`.
//   env               one line with the WEFT_* environment of this rank
//   lines K           K lines on stdout and K on stderr, each written in pieces
//   stdio             "out R" on stdout, "err R" on stderr
//   partial           a last line without newline on stdout and on stderr
//   longline BYTES    BYTES 'x' on stdout without a newline
//   exit R CODE       rank R exits with CODE; the others wait forever
//   kill R            rank R kills itself with SIGKILL once the others are
//                     ready; they read the abort record from the store,
//                     print it and exit 0
//   elastic_kill      (weft run --elastic) member n0.s1.r0 kills itself with
//                     SIGKILL; rank 0 waits for its dead record and prints
//                     "dead n0.s1.r0: VALUE"; every other member prints
//                     "member M" and exits 0
//   evict             member n0.s1.r0 (or $PROBE_VICTIM) prints "ready pid=P" and stops itself
//                     (SIGSTOP); rank 0 then writes weft/evict/<it> and,
//                     in an elastic job, waits for its dead record and
//                     prints it; other members print "member M" and exit 0
//   fill BYTES        rank 0 stores values of BYTES until the store refuses
//                     one, prints "refused after N: ERROR", then stores a
//                     small key and prints "small ok"
//   sleep             prints "ready pid=P" and waits forever
//   trapterm          same, ignoring SIGTERM and SIGINT
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "core/socket.h"
#include "weft/errors.h"
#include "weft/store.h"

namespace {

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

int rank() { return std::atoi(env("WEFT_RANK").c_str()); }

void put(int fd, std::string_view s) {
  while (!s.empty()) {
    ssize_t n = ::write(fd, s.data(), s.size());
    if (n <= 0) std::exit(90);
    s.remove_prefix(static_cast<size_t>(n));
  }
}

[[noreturn]] void wait_forever() {
  put(1, "ready pid=" + std::to_string(::getpid()) + "\n");
  for (;;) ::pause();
}

int usage() {
  put(2,
      "usage: launch_probe env|lines K|stdio|partial|longline BYTES|exit R CODE|kill R|"
      "elastic_kill|evict|fill BYTES|sleep|trapterm\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  std::string mode = argv[1];
  const int r = rank();
  const std::string rs = std::to_string(r);

  if (mode == "env") {
    std::string token = env("WEFT_JOB_TOKEN");
    put(1, "rank=" + env("WEFT_RANK") + " size=" + env("WEFT_WORLD_SIZE") +
               " local_rank=" + env("WEFT_LOCAL_RANK") + " local_size=" + env("WEFT_LOCAL_SIZE") +
               " nnodes=" + env("WEFT_NNODES") + " node_rank=" + env("WEFT_NODE_RANK") +
               " store=" + env("WEFT_STORE") + " token_len=" + std::to_string(token.size()) +
               " token_head=" + token.substr(0, 8) + " timeout=" + env("WEFT_TIMEOUT") +
               " log_level=" + env("WEFT_LOG_LEVEL") + " extra=" + env("PROBE_EXTRA") + "\n");
    return 0;
  }
  if (mode == "cpus") {
    // The CPUs this worker may run on, e.g. "cpus=0,1".
    cpu_set_t set;
    std::string list;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
      for (int c = 0; c < CPU_SETSIZE; ++c) {
        if (!CPU_ISSET(c, &set)) continue;
        list += list.empty() ? "" : ",";
        list += std::to_string(c);
      }
    }
    put(1, "cpus=" + list + "\n");
    return 0;
  }
  if (mode == "lines" && argc == 3) {
    int k = std::atoi(argv[2]);
    for (int i = 0; i < k; ++i) {
      // In pieces, so that a relay that did not buffer lines would mix ranks.
      std::string is = std::to_string(i);
      put(1, "line ");
      put(1, is + " of rank ");
      put(1, rs + "\n");
      put(2, "err ");
      put(2, is + " of rank ");
      put(2, rs + "\n");
    }
    return 0;
  }
  if (mode == "stdio") {
    put(1, "out " + rs + "\n");
    put(2, "err " + rs + "\n");
    return 0;
  }
  if (mode == "partial") {
    put(1, "no newline");
    put(2, "err no newline");
    return 0;
  }
  if (mode == "longline" && argc == 3) {
    long bytes = std::atol(argv[2]);
    std::string chunk(10000, 'x');
    for (long done = 0; done < bytes; done += static_cast<long>(chunk.size())) {
      put(1, std::string_view(chunk).substr(
                 0, static_cast<size_t>(std::min<long>(10000, bytes - done))));
    }
    return 0;
  }
  if (mode == "exit" && argc == 4) {
    if (r == std::atoi(argv[2])) {
      put(1, "exiting\n");
      return std::atoi(argv[3]);
    }
    wait_forever();
  }
  if (mode == "kill" && argc == 3) {
    const int victim = std::atoi(argv[2]);
    try {
      auto [host, port] = weft::net::split_host_port(env("WEFT_STORE"), "WEFT_STORE");
      weft::TcpStoreOptions options;
      options.job_token = env("WEFT_JOB_TOKEN");
      weft::TcpStore store(host, port, options);
      if (r == victim) {
        // Once every other rank is ready to read the record.
        std::vector<std::string> keys;
        for (int i = 0; i < std::atoi(env("WEFT_WORLD_SIZE").c_str()); ++i) {
          if (i != victim) keys.push_back("ready/" + std::to_string(i));
        }
        store.wait(keys, std::chrono::seconds(120));
        put(1, "killing myself\n");
        ::raise(SIGKILL);
      }
      // The launcher sends SIGTERM right after the record: hold it until the
      // record is printed.
      sigset_t set;
      sigemptyset(&set);
      sigaddset(&set, SIGTERM);
      sigprocmask(SIG_BLOCK, &set, nullptr);
      store.set("ready/" + rs, "1");
      put(1, "abort: " + store.get("weft/abort", std::chrono::seconds(120)) + "\n");
    } catch (const std::exception& e) {
      put(2, std::string("store error: ") + e.what() + "\n");
      return 1;
    }
    return 0;
  }
  if (mode == "elastic_kill" || mode == "evict" || (mode == "fill" && argc == 3)) {
    const std::string member = env("WEFT_MEMBER");
    try {
      auto [host, port] = weft::net::split_host_port(env("WEFT_STORE"), "WEFT_STORE");
      weft::TcpStoreOptions options;
      options.job_token = env("WEFT_JOB_TOKEN");
      weft::TcpStore store(host, port, options);
      if (mode == "fill") {
        if (r != 0) return 0;
        const std::string value(static_cast<size_t>(std::atol(argv[2])), 'v');
        for (int i = 0;; ++i) {
          try {
            store.set("fill/" + std::to_string(i), value);
          } catch (const weft::StoreError& e) {
            put(1, "refused after " + std::to_string(i) + ": " + e.what() + "\n");
            break;
          }
        }
        store.set("small", "1");
        put(1, "small ok\n");
        return 0;
      }
      const std::string victim =
          env("PROBE_VICTIM").empty() ? std::string("n0.s1.r0") : env("PROBE_VICTIM");
      if (member == victim) {
        if (mode == "elastic_kill") ::raise(SIGKILL);
        put(1, "ready pid=" + std::to_string(::getpid()) + "\n");
        store.set("stopping", "1");
        ::raise(SIGSTOP);
        put(1, "resumed\n");  // must never happen: evicted while stopped
        return 0;
      }
      if (r == 0) {
        if (mode == "evict") {
          store.wait({"stopping"}, std::chrono::seconds(120));
          store.compare_set("weft/evict/" + victim, std::nullopt,
                            "silent for 5.2 s (declared by rank 0 in launch_probe)");
        }
        if (!env("WEFT_ELASTIC").empty()) {
          put(1, "dead n0.s1.r0: " +
                     store.get("weft/elastic/dead/n0.s1.r0", std::chrono::seconds(120)) + "\n");
        }
      }
      put(1, "member " + member + "\n");
    } catch (const std::exception& e) {
      put(2, std::string("store error: ") + e.what() + "\n");
      return 1;
    }
    return 0;
  }
  if (mode == "sleep") wait_forever();
  if (mode == "trapterm") {
    ::signal(SIGTERM, SIG_IGN);
    ::signal(SIGINT, SIG_IGN);
    wait_forever();
  }
  return usage();
}
