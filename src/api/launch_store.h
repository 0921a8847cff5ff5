// The job's rendezvous store as the launcher's environment describes it
// (shared by weft::init() and weft::ElasticGroup::from_env()).
#pragma once

#include <memory>

#include "weft/init.h"
#include "weft/options.h"
#include "weft/store.h"

namespace weft {

// Connects to (or, where rank 0 serves it, starts and connects to) the
// store of `env`; a MemoryStore for a process on its own. Fills in a job
// token when none is needed. `server` receives the store server this
// process runs, if any, which must live as long as the job.
std::shared_ptr<Store> connect_launch_store(const LaunchEnvironment& env, CommOptions& options,
                                            std::shared_ptr<TcpStoreServer>* server);

}  // namespace weft
