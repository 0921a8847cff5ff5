// `weft run` on a single node: a fresh job token and the workers (the
// rendezvous store served by the launcher comes with the store layer).
#pragma once

#include "launch/local_launcher.h"

namespace weft::launch {

// Generates the job token, starts options.nproc workers as ranks
// 0..nproc-1 of a one-node job and supervises them. Returns the
// launcher's exit code (LocalLauncher::run). Throws LaunchError when the
// launch cannot start.
int run_local(WorkerOptions options);

}  // namespace weft::launch
