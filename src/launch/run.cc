#include "launch/run.h"

#include "core/auth.h"

namespace weft::launch {

int run_local(WorkerOptions options) {
  const int nproc = options.nproc;
  LocalLauncher launcher(std::move(options));
  JobLayout job;
  job.world_size = nproc;
  job.job_token = auth::generate_token();
  // The rendezvous store (WEFT_STORE) and the abort record come with the
  // store layer.
  return launcher.run(job);
}

}  // namespace weft::launch
