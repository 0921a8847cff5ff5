#include "launch/run.h"

#include <fmt/format.h>
#include <unistd.h>

#include <climits>

#include "core/auth.h"
#include "core/socket.h"
#include "weft/store.h"

namespace weft::launch {
namespace {

// Deadline of the launcher's own store calls (the abort record).
constexpr Timeout kAbortRecordTimeout = std::chrono::seconds(5);

std::string hostname() {
  char buf[HOST_NAME_MAX + 1] = {0};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "unknown";
  return buf;
}

}  // namespace

int run_local(WorkerOptions options) {
  const int nproc = options.nproc;
  // First: it blocks the signals, which the store's thread then inherits.
  LocalLauncher launcher(std::move(options));

  TcpStoreOptions store_options;
  store_options.job_token = auth::generate_token();
  const std::string host = "127.0.0.1";
  TcpStoreServer server(host, 0, store_options);

  JobLayout job;
  job.world_size = nproc;
  job.store = net::join_host_port(host, server.port());
  job.job_token = store_options.job_token;

  launcher.on_failure([&](const WorkerExit& e) {
    TcpStoreOptions client_options = store_options;
    client_options.timeout = kAbortRecordTimeout;
    TcpStore store(host, server.port(), client_options);
    store.set(kAbortKey,
              fmt::format("rank {} (host {}, pid {}) {}", e.rank, hostname(), e.pid, e.describe()));
  });
  return launcher.run(job);
}

}  // namespace weft::launch
