// `weft run` on a single node: a fresh job token, the rendezvous store
// served by the launcher itself, and the workers.
#pragma once

#include "launch/local_launcher.h"

namespace weft::launch {

// Key of the abort record: when a worker fails, the launcher stores
// "rank R (host H, pid P) exited with code C" (or "was killed by signal N
// (SIGNAME)") under it, so that the surviving ranks can tell which rank
// failed and why.
inline constexpr const char* kAbortKey = "weft/abort";

// Generates the job token, serves a TcpStore on an ephemeral port of
// 127.0.0.1 (authenticated with the token), starts options.nproc workers as
// ranks 0..nproc-1 of a one-node job and supervises them. Returns the
// launcher's exit code (LocalLauncher::run). Throws LaunchError when the
// launch cannot start.
int run_local(WorkerOptions options);

}  // namespace weft::launch
