// In-memory commits of the training state for elastic training.
//
// commit() takes a snapshot of what must survive (the caller's save(): the
// image of a weft::train::TrainState, weft/checkpoint.h) and makes sure that
// every member holds the same committed image: under BSP the replicas are
// equal and one allreduce of a 64-bit hash proves it; when they differ
// (local SGD between averages) every member takes rank 0's image. The
// committed state is therefore in the memory of every host of the job:
// losing any host, or all but one, loses nothing committed.
//
// restore(), on a new generation (weft/elastic.h): the members agree on the
// newest commit any of them holds (a member whose last commit did not
// complete everywhere still holds the one before, and a commit that
// completed anywhere was taken everywhere), the lowest rank holding it
// sends it to every member (new members included) and every member loads
// it (the caller's load()).
//
//   weft::train::ElasticState commits(save, load);
//   ... after each step:    if (step % commit_every == 0) commits.commit(*comm, step);
//   ... after recover():    int64_t at = commits.restore(*comm);   // -1: nothing committed
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "weft/communicator.h"

namespace weft::train {

class ElasticState {
 public:
  using Save = std::function<std::vector<std::byte>()>;
  using Load = std::function<void(std::span<const std::byte>)>;

  ElasticState(Save save, Load load);

  // Collective. Takes a snapshot as commit `id` (larger than the last), and
  // makes it the same on every member. Throws what the communicator throws
  // (then the snapshot is kept as this member's newest: it is a valid state,
  // taken after a completed step).
  void commit(Communicator& comm, int64_t id);
  // Collective, on a new communicator: loads the newest commit any member
  // holds into every member; returns its id, or -1 when nobody has
  // committed (nothing is loaded).
  int64_t restore(Communicator& comm);

  int64_t last_id() const { return latest_.id; }
  // Bytes of the newest commit held.
  size_t bytes() const { return latest_.image.size(); }
  // Commits whose snapshots differed between members (rank 0's was taken).
  int64_t divergent_commits() const { return divergent_; }

 private:
  struct Commit {
    int64_t id = -1;
    std::vector<std::byte> image;
  };
  Save save_;
  Load load_;
  Commit latest_;
  Commit previous_;
  int64_t divergent_ = 0;
};

// 64-bit hash of an image (XXH3), the same on every host.
uint64_t image_hash(std::span<const std::byte> image);

}  // namespace weft::train
