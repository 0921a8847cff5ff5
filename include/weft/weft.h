// Weft: a runtime for training models in parallel on clusters of CPUs and GPUs.
// Umbrella header: everything a user program needs.
#pragma once

#include "weft/communicator.h"  // IWYU pragma: export
#include "weft/elastic.h"       // IWYU pragma: export
#include "weft/errors.h"        // IWYU pragma: export
#include "weft/init.h"          // IWYU pragma: export
#include "weft/options.h"       // IWYU pragma: export
#include "weft/store.h"         // IWYU pragma: export
#include "weft/timeout.h"       // IWYU pragma: export
#include "weft/types.h"         // IWYU pragma: export
#include "weft/version.h"       // IWYU pragma: export
#include "weft/work.h"          // IWYU pragma: export
