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
      "usage: launch_probe env|lines K|stdio|partial|longline BYTES|exit R CODE|kill R|sleep|"
      "trapterm\n");
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
  if (mode == "sleep") wait_forever();
  if (mode == "trapterm") {
    ::signal(SIGTERM, SIG_IGN);
    ::signal(SIGINT, SIG_IGN);
    wait_forever();
  }
  return usage();
}
