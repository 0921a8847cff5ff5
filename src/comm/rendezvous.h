// The wait for every rank's record at rendezvous (World::bootstrap).
#pragma once

#include <string>
#include <vector>

#include "core/deadline.h"
#include "weft/store.h"

namespace weft::comm {

// Waits until every rank of a world of `size` published its record under
// "rank/<r>" in `store`. Gives up at `deadline` or after the store's own
// timeout (WEFT_STORE_TIMEOUT for a TcpStore), whichever comes first, with
// a TimeoutError naming the ranks that did not join. Meanwhile it logs
// every rendezvous::report_interval() which ranks are missing, and stops
// (AbortedError) when the launcher of this process is gone
// (core/launcher_watch.h). The names of the missing ranks cost one store
// request per rank: they are listed by rank 0 and, in worlds of up to 256
// ranks, by every rank; the others give the count only.
void wait_for_ranks(Store& store, int rank, int size, const Deadline& deadline);

// "1, 3, 5-9" (at most `limit` ranks named, then "...").
std::string format_ranks(const std::vector<int>& ranks, size_t limit = 32);

}  // namespace weft::comm
