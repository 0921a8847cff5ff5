// Elastic membership: the workers of a job form numbered generations
// through the rendezvous store; when one fails, the survivors agree on the
// next generation (membership, dense ranks) and rebuild their communicator
// in the same processes; a new or returning worker joins at the next step
// boundary.
//
//   weft run --elastic 2:4 --max-restarts 3 -- ./train
//
//   auto group = weft::ElasticGroup::from_env();      // WEFT_ELASTIC, WEFT_MEMBER
//   auto comm = group->join();                        // generation 1
//   for (;;) {
//     try {
//       ... a step with `comm` ...
//       if (group->joins_pending()) comm = group->admit();   // collective
//     } catch (const weft::Error& e) {
//       if (!weft::ElasticGroup::recoverable(e)) throw;
//       comm = group->recover(std::current_exception());
//       ... restore the last committed state (weft::train::Elastic does both) ...
//     }
//   }
//
// The protocol (store keys under weft/elastic/, docs/ARCHITECTURE.md):
// generation k is formed by the workers that register for it
// (weft/elastic/rdzv/g<k>/count, .../m<i>); it closes once every member of
// generation k-1 not known to be dead has registered (a dead worker is one
// its launcher recorded under weft/elastic/dead/<member>, one a survivor
// evicted, weft/evict/<member>, one that left, weft/elastic/left/<member>,
// or the one this worker's error names), or
// when `max` have, or, with at least `min`, after `settle`. The first to see
// the condition writes the membership (compare-and-set, so all agree); the
// survivors of k-1 keep their order and come first, so rank 0 of every
// generation after the first holds the committed state. A worker that
// registered too late registers for k+1, which the members admit at their
// next step boundary, or it gives up after `join_wait`. Below `min` the
// workers wait `min_wait` for joins, then fail saying how many are there
// and who died.
#pragma once

#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "weft/communicator.h"
#include "weft/options.h"
#include "weft/store.h"
#include "weft/timeout.h"

namespace weft {

struct ElasticOptions {
  int min = 1;  // fewest workers to train with
  int max = 1;  // most workers of a generation
  // This worker's id, unique per process incarnation (WEFT_MEMBER, given by
  // `weft run`; e.g. "n0.s2.r1").
  std::string member;
  // Workers expected in the first generation (WEFT_WORLD_SIZE of
  // `weft run`); the first generation closes when they are all there.
  int initial = 0;
  // How long a generation waits for a member of the previous one that is
  // not known to be dead, before closing without it (WEFT_ELASTIC_SETTLE).
  Timeout settle = std::chrono::seconds(30);
  // How long the workers wait for joins below `min` (WEFT_ELASTIC_MIN_WAIT).
  Timeout min_wait = std::chrono::seconds(120);
  // How long a worker waits to be admitted to a running job
  // (WEFT_ELASTIC_JOIN_WAIT): the members admit joins at their step
  // boundaries (joins_pending()); one that never asks, or asks too seldom,
  // would otherwise keep the newcomer waiting until the job ends. Then
  // join() records that the worker left and throws weft::Error naming the
  // members that did not admit it.
  Timeout join_wait = std::chrono::seconds(600);
  // Options of every generation's communicator (name and generation are
  // set by the group).
  CommOptions comm;
};

// One membership change, for logs and reports.
struct MembershipChange {
  uint32_t generation = 0;
  std::vector<std::string> members;  // in rank order
  std::vector<std::string> left;     // members of the previous generation not in this one
  std::vector<std::string> joined;   // members new in this one
  std::string cause;                 // "start", "failure: <error>", "join"
  double seconds = 0;                // from the cause to the new communicator
};

class ElasticGroup {
 public:
  // From the environment `weft run --elastic MIN:MAX` gives: WEFT_ELASTIC,
  // WEFT_MEMBER, WEFT_STORE, WEFT_JOB_TOKEN. Throws InvalidArgument naming
  // the variable when one is missing or malformed.
  static std::shared_ptr<ElasticGroup> from_env(CommOptions comm = CommOptions::from_env());
  // Whether this process runs under `weft run --elastic` (WEFT_ELASTIC set).
  static bool enabled();
  // `store` is the job's root store.
  ElasticGroup(std::shared_ptr<Store> store, ElasticOptions options);
  ~ElasticGroup();
  ElasticGroup(const ElasticGroup&) = delete;
  ElasticGroup& operator=(const ElasticGroup&) = delete;

  // Registers for the next generation and waits until one that includes
  // this worker is formed; returns its communicator, or null when the job
  // finished (finish()) before this worker could join.
  std::shared_ptr<Communicator> join();
  // After `cause` broke the current communicator: closes it and forms the
  // next generation with the survivors (and any worker waiting to join).
  std::shared_ptr<Communicator> recover(std::exception_ptr cause);
  // Collective on the current communicator, at a step boundary: whether
  // workers wait to join (rank 0 looks at the store; everyone gets its
  // answer).
  bool joins_pending();
  // Collective: forms the next generation with the current members and the
  // workers waiting to join.
  std::shared_ptr<Communicator> admit();
  // Collective on the current communicator, at a step boundary: the members
  // of rank `ranks` leave the job (a straggler the balancer named, for
  // example); rank 0's list counts. Those members record their leaving
  // under weft/elastic/left/<member> with `reason` and get null: they
  // should exit with success, so that their launcher does not restart
  // them. The others form the next generation without them (and with any
  // worker waiting to join) and get its communicator. Throws
  // InvalidArgument, on every member alike, when the list names a rank
  // twice or one outside the generation, or would leave fewer than `min`.
  std::shared_ptr<Communicator> remove(const std::vector<int>& ranks, const std::string& reason);
  // The job is done: workers still waiting to join give up (join() returns
  // null). Any member may call it, once training has finished.
  void finish();

  // Whether `e` (an error of a collective) is one a new generation can get
  // past: PeerError, AbortedError, TimeoutError. Bad arguments, mismatches
  // and internal errors are not.
  static bool recoverable(const std::exception& e);

  const std::shared_ptr<Communicator>& communicator() const { return comm_; }
  uint32_t generation() const { return generation_; }
  const std::vector<std::string>& members() const { return members_; }
  // Members of the previous generation that joined this one (survivors);
  // empty for the first.
  const std::vector<std::string>& survivors() const { return survivors_; }
  const std::string& member() const { return options_.member; }
  const ElasticOptions& options() const { return options_; }
  // Every membership change so far, oldest first.
  const std::vector<MembershipChange>& changes() const { return changes_; }

 private:
  std::shared_ptr<Communicator> form(const std::string& cause,
                                     std::chrono::steady_clock::time_point since,
                                     const std::vector<std::string>& known_dead);
  bool known_dead(const std::string& member, const std::vector<std::string>& extra);
  // In a recovery: `member` of the failed generation has been silent to
  // this member's liveness for longer than the heartbeat timeout.
  bool fell_silent(const std::string& member) const;

  std::shared_ptr<Store> store_;
  ElasticOptions options_;
  std::shared_ptr<Communicator> comm_;
  // The failed generation's communicator, kept while recover() forms the
  // next (its liveness thread keeps listening).
  std::shared_ptr<Communicator> failed_;
  uint32_t generation_ = 0;
  std::vector<std::string> members_;
  std::vector<std::string> survivors_;
  std::vector<MembershipChange> changes_;
};

}  // namespace weft
