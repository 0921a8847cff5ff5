// Elastic membership and in-memory commits, with ranks as threads over one
// MemoryStore: generations formed through the store, recovery after a member
// dies with a collective in flight, a join at a step boundary, falling below
// MIN, a failure during recovery, and commits that agree on the state.
// (Real processes under `weft run --elastic`: tests/launch and the main
// job's chaos tests.)
#include "weft/elastic.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "testing/testing.h"
#include "weft/elastic_state.h"
#include "weft/errors.h"
#include "weft/store.h"

namespace weft::train {
namespace {

using namespace std::chrono_literals;
using testing::run_ranks;
using testing::wait_until;

ElasticOptions options(std::string member, int min, int max, int initial) {
  ElasticOptions o;
  o.member = std::move(member);
  o.min = min;
  o.max = max;
  o.initial = initial;
  o.settle = 20s;
  o.min_wait = 20s;
  o.comm.timeout = 60s;
  o.comm.job_token = "elastic-test";
  return o;
}

// A replica: four weights and the count of completed steps, saved as bytes.
struct Replica {
  std::vector<float> w = std::vector<float>(4, 0.0f);
  int64_t step = 0;

  std::vector<std::byte> save() const {
    std::vector<std::byte> out(w.size() * sizeof(float) + sizeof(step));
    std::memcpy(out.data(), w.data(), w.size() * sizeof(float));
    std::memcpy(out.data() + w.size() * sizeof(float), &step, sizeof(step));
    return out;
  }
  void load(std::span<const std::byte> in) {
    ASSERT_EQ(in.size(), w.size() * sizeof(float) + sizeof(step));
    std::memcpy(w.data(), in.data(), w.size() * sizeof(float));
    std::memcpy(&step, in.data() + w.size() * sizeof(float), sizeof(step));
  }
  ElasticState commits() {
    return ElasticState([this] { return save(); }, [this](auto in) { load(in); });
  }
  // One step: every member adds (its rank + 1) to w[k % 4]; the sum is the
  // same on every member, so the replicas stay equal.
  void train_step(Communicator& comm) {
    std::vector<float> v{static_cast<float>(comm.rank() + 1)};
    comm.allreduce(v, ReduceOp::Sum);
    w[static_cast<size_t>(step % 4)] += v[0];
    ++step;
  }
};

void mark_dead(Store& store, const std::string& member) {
  store.set("weft/elastic/dead/" + member, "killed by the test");
}

// Three members; the third dies after its commit of step 3 while the others
// are in the allreduce of step 4. The survivors form generation 2 in the same
// processes, with dense ranks in their old order, restore commit 3 and go on.
TEST(ElasticTest, SurvivorsRecoverAfterAMemberDies) {
  auto store = std::make_shared<MemoryStore>();
  const std::vector<std::string> names{"a", "b", "c"};
  std::vector<Replica> reps(3);
  std::vector<int64_t> restored(3, -2);
  std::vector<std::vector<MembershipChange>> changes(3);
  auto errors = run_ranks(3, [&](int i) {
    ElasticGroup group(store, options(names[static_cast<size_t>(i)], 2, 3, 3));
    Replica& r = reps[static_cast<size_t>(i)];
    auto state = r.commits();
    auto comm = group.join();
    ASSERT_TRUE(comm);
    EXPECT_EQ(comm->size(), 3);
    EXPECT_EQ(comm->rank(), i);
    while (r.step < 10) {
      try {
        r.train_step(*comm);
        state.commit(*comm, r.step);
        if (i == 2 && r.step == 3) {
          mark_dead(*store, "c");
          return;  // the communicator goes away with a peer waiting on it
        }
      } catch (const Error& e) {
        ASSERT_TRUE(ElasticGroup::recoverable(e)) << e.what();
        comm = group.recover(std::current_exception());
        ASSERT_TRUE(comm);
        restored[static_cast<size_t>(i)] = state.restore(*comm);
      }
    }
    changes[static_cast<size_t>(i)] = group.changes();
  });
  for (int i = 0; i < 3; ++i) {
    EXPECT_FALSE(errors[static_cast<size_t>(i)]) << "member " << i;
  }
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(restored[static_cast<size_t>(i)], 3);
    EXPECT_EQ(reps[static_cast<size_t>(i)].step, 10);
    const auto& ch = changes[static_cast<size_t>(i)];
    ASSERT_EQ(ch.size(), 2u);
    EXPECT_EQ(ch[1].generation, 2u);
    EXPECT_EQ(ch[1].members, (std::vector<std::string>{"a", "b"}));
    EXPECT_EQ(ch[1].left, (std::vector<std::string>{"c"}));
    EXPECT_NE(ch[1].cause.find("failure"), std::string::npos);
  }
  // Steps 1..3 added 1+2+3 = 6 each, steps 4..10 added 1+2 = 3 each.
  EXPECT_EQ(reps[0].w, reps[1].w);
  float total = 0;
  for (float x : reps[0].w) total += x;
  EXPECT_EQ(total, 3 * 6 + 7 * 3);
}

// At a step boundary after step 4 the members remove rank 1 (rank 0's list
// counts: rank 2 passes another). Member b leaves with a null communicator
// and its record in the store; a and c form generation 2 with dense ranks,
// restore commit 4 and go on. A list that would leave fewer than MIN, or
// names a rank outside the generation or twice, is refused on every member
// before anyone leaves.
TEST(ElasticTest, RemovedMemberLeavesAndTheOthersGoOn) {
  auto store = std::make_shared<MemoryStore>();
  const std::vector<std::string> names{"a", "b", "c"};
  std::vector<Replica> reps(3);
  std::vector<int64_t> restored(3, -2);
  std::vector<int> sizes(3, 0);
  std::vector<bool> left(3, false);
  std::vector<std::vector<MembershipChange>> changes(3);
  auto errors = run_ranks(3, [&](int i) {
    ElasticGroup group(store, options(names[static_cast<size_t>(i)], 2, 3, 3));
    Replica& r = reps[static_cast<size_t>(i)];
    auto state = r.commits();
    auto comm = group.join();
    ASSERT_TRUE(comm);
    while (r.step < 10) {
      r.train_step(*comm);
      state.commit(*comm, r.step);
      if (r.step == 4) {
        for (const std::vector<int>& bad :
             {std::vector<int>{0, 1}, std::vector<int>{3}, std::vector<int>{-1},
              std::vector<int>{1, 1}, std::vector<int>{0, 1, 2, 0}}) {
          EXPECT_THROW(group.remove(bad, "bad list"), InvalidArgument);
        }
        comm = group.remove(i == 2 ? std::vector<int>{0} : std::vector<int>{1}, "too slow");
        if (!comm) {
          left[static_cast<size_t>(i)] = true;
          return;
        }
        restored[static_cast<size_t>(i)] = state.restore(*comm);
      }
    }
    sizes[static_cast<size_t>(i)] = comm->size();
    changes[static_cast<size_t>(i)] = group.changes();
  });
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(errors[static_cast<size_t>(i)]) << "member " << i;
  EXPECT_EQ(left, (std::vector<bool>{false, true, false}));
  EXPECT_EQ(store->try_get("weft/elastic/left/b"), std::optional<std::string>("too slow"));
  for (int i : {0, 2}) {
    EXPECT_EQ(sizes[static_cast<size_t>(i)], 2);
    EXPECT_EQ(restored[static_cast<size_t>(i)], 4);
    EXPECT_EQ(reps[static_cast<size_t>(i)].step, 10);
    const auto& ch = changes[static_cast<size_t>(i)];
    ASSERT_EQ(ch.size(), 2u);
    EXPECT_EQ(ch[1].members, (std::vector<std::string>{"a", "c"}));
    EXPECT_EQ(ch[1].left, (std::vector<std::string>{"b"}));
    EXPECT_NE(ch[1].cause.find("too slow"), std::string::npos) << ch[1].cause;
  }
  // Steps 1..4 added 1+2+3 = 6 each, steps 5..10 added 1+2 = 3 each.
  EXPECT_EQ(reps[0].w, reps[2].w);
  float total = 0;
  for (float x : reps[0].w) total += x;
  EXPECT_EQ(total, 4 * 6 + 6 * 3);
}

// A worker that starts late waits; the members see it at a step boundary,
// form the next generation with it, and it gets the state from rank 0.
TEST(ElasticTest, JoinAtAStepBoundaryGetsTheState) {
  auto store = std::make_shared<MemoryStore>();
  const std::vector<std::string> names{"a", "b", "d"};
  std::vector<Replica> reps(3);
  std::vector<int> sizes(3, 0);
  std::vector<int64_t> joined_at(3, -1);
  std::atomic<bool> go{false};
  auto errors = run_ranks(3, [&](int i) {
    ElasticGroup group(store, options(names[static_cast<size_t>(i)], 1, 3, 2));
    Replica& r = reps[static_cast<size_t>(i)];
    auto state = r.commits();
    if (i == 2) {
      // Starts once generation 1 has trained 5 steps.
      ASSERT_TRUE(wait_until([&] { return go.load(); }));
    }
    auto comm = group.join();
    ASSERT_TRUE(comm);
    if (i == 2) {
      EXPECT_EQ(group.generation(), 2u);
      joined_at[2] = state.restore(*comm);
    }
    while (r.step < 12) {
      r.train_step(*comm);
      state.commit(*comm, r.step);
      if (i < 2 && r.step == 5) {
        go = true;
        // The newcomer has registered for the next generation by now.
        ASSERT_TRUE(
            wait_until([&] { return store->try_get("weft/elastic/rdzv/g2/count").has_value(); }));
      }
      if (group.joins_pending()) {
        comm = group.admit();
        ASSERT_TRUE(comm);
        joined_at[static_cast<size_t>(i)] = state.restore(*comm);
      }
    }
    sizes[static_cast<size_t>(i)] = comm->size();
    group.finish();
  });
  for (int i = 0; i < 3; ++i) {
    EXPECT_FALSE(errors[static_cast<size_t>(i)]) << "member " << i;
    EXPECT_EQ(sizes[static_cast<size_t>(i)], 3);
    EXPECT_EQ(reps[static_cast<size_t>(i)].step, 12);
    EXPECT_EQ(joined_at[static_cast<size_t>(i)], 5) << "member " << i;
  }
  EXPECT_EQ(reps[0].w, reps[1].w);
  EXPECT_EQ(reps[0].w, reps[2].w);
}

// A worker that waits to join a running job whose members do not admit it
// gives up after join_wait, naming them, and records that it left; when the
// members do look for joins later, they form the next generation without it.
TEST(ElasticTest, JoinerThatIsNeverAdmittedGivesUpAfterJoinWait) {
  auto store = std::make_shared<MemoryStore>();
  const std::vector<std::string> names{"a", "b", "c"};
  std::atomic<bool> formed{false}, gave_up{false};
  std::string message;
  std::vector<int> sizes(2, 0);
  auto errors = run_ranks(3, [&](int i) {
    auto o = options(names[static_cast<size_t>(i)], 1, 3, 2);
    o.join_wait = 300ms;
    ElasticGroup group(store, o);
    if (i == 2) {
      ASSERT_TRUE(wait_until([&] { return formed.load(); }));
      try {
        group.join();
        ADD_FAILURE() << "joined without being admitted";
      } catch (const Error& e) {
        message = e.what();
      }
      gave_up = true;
      return;
    }
    Replica r;
    auto comm = group.join();
    ASSERT_TRUE(comm);
    EXPECT_EQ(group.generation(), 1u);
    formed = true;
    // Train without looking for joins until the newcomer has given up (the
    // members agree on when they stop: the same calls on both).
    for (;;) {
      r.train_step(*comm);
      std::vector<int32_t> stop{gave_up ? 1 : 0};
      comm->allreduce(stop, ReduceOp::Max);
      if (stop[0] != 0) break;
    }
    ASSERT_TRUE(group.joins_pending());  // it registered, then left
    comm = group.admit();
    ASSERT_TRUE(comm);
    EXPECT_EQ(group.generation(), 2u);
    EXPECT_EQ(group.members(), (std::vector<std::string>{"a", "b"}));
    r.train_step(*comm);
    sizes[static_cast<size_t>(i)] = comm->size();
  });
  for (auto& e : errors) EXPECT_FALSE(e);
  EXPECT_EQ(sizes, (std::vector<int>{2, 2}));
  EXPECT_NE(message.find("c was not admitted"), std::string::npos) << message;
  EXPECT_NE(message.find("WEFT_ELASTIC_JOIN_WAIT"), std::string::npos) << message;
  EXPECT_NE(message.find("generation 1 (a, b)"), std::string::npos) << message;
  EXPECT_TRUE(store->try_get("weft/elastic/left/c").has_value());
}

// Below MIN the survivor waits for joins for min_wait, then fails saying why.
TEST(ElasticTest, BelowMinFailsAfterWaitingForJoins) {
  auto store = std::make_shared<MemoryStore>();
  std::string message;
  auto errors = run_ranks(2, [&](int i) {
    auto o = options(i == 0 ? "a" : "b", 2, 2, 2);
    o.settle = 200ms;
    o.min_wait = 500ms;
    ElasticGroup group(store, o);
    Replica r;
    auto comm = group.join();
    ASSERT_TRUE(comm);
    r.train_step(*comm);
    if (i == 1) {
      mark_dead(*store, "b");
      return;
    }
    try {
      r.train_step(*comm);
      r.train_step(*comm);
      ADD_FAILURE() << "the allreduce with a departed member succeeded";
    } catch (const Error& e) {
      ASSERT_TRUE(ElasticGroup::recoverable(e)) << e.what();
      try {
        group.recover(std::current_exception());
        ADD_FAILURE() << "recover() formed a generation below MIN";
      } catch (const Error& below) {
        message = below.what();
      }
    }
  });
  EXPECT_FALSE(errors[0]);
  EXPECT_NE(message.find("1 of the minimum 2 workers"), std::string::npos) << message;
  EXPECT_NE(message.find("WEFT_ELASTIC_MIN_WAIT"), std::string::npos) << message;
  EXPECT_NE(message.find("b"), std::string::npos) << message;
}

// A member dies during recovery: it registered for generation 2 (so the
// generation closes with it) and dies before connecting. The others stop
// waiting for it as soon as its death is recorded and form generation 3.
TEST(ElasticTest, FailureDuringRecoveryFormsTheNextGeneration) {
  auto store = std::make_shared<MemoryStore>();
  const std::vector<std::string> names{"a", "b", "c"};
  std::vector<Replica> reps(3);
  std::vector<uint32_t> generation(3, 0);
  std::vector<int> sizes(3, 0);
  auto errors = run_ranks(3, [&](int i) {
    ElasticGroup group(store, options(names[static_cast<size_t>(i)], 1, 3, 3));
    Replica& r = reps[static_cast<size_t>(i)];
    auto state = r.commits();
    auto comm = group.join();
    ASSERT_TRUE(comm);
    while (r.step < 6) {
      try {
        r.train_step(*comm);
        state.commit(*comm, r.step);
        if (i == 2 && r.step == 2) {
          mark_dead(*store, "c");
          return;
        }
      } catch (const Error& e) {
        ASSERT_TRUE(ElasticGroup::recoverable(e)) << e.what();
        if (i == 1) {
          // b registers for generation 2 by hand, then dies once it closed.
          comm.reset();
          const int64_t n = store->add("weft/elastic/rdzv/g2/count", 1) - 1;
          store->set("weft/elastic/rdzv/g2/m" + std::to_string(n), "b");
          EXPECT_TRUE(wait_until(
              [&] { return store->try_get("weft/elastic/rdzv/g2/closed").has_value(); }));
          mark_dead(*store, "b");
          return;
        }
        comm = group.recover(std::current_exception());
        ASSERT_TRUE(comm);
        state.restore(*comm);
      }
    }
    generation[static_cast<size_t>(i)] = group.generation();
    sizes[static_cast<size_t>(i)] = comm->size();
  });
  EXPECT_FALSE(errors[0]);
  EXPECT_EQ(generation[0], 3u);
  EXPECT_EQ(sizes[0], 1);
  EXPECT_EQ(reps[0].step, 6);
}

// Members whose snapshots differ (local SGD between averages) all keep
// rank 0's; a restore loads it everywhere.
TEST(ElasticTest, DivergentCommitsKeepRankZerosState) {
  auto store = std::make_shared<MemoryStore>();
  std::vector<Replica> reps(2);
  std::vector<int64_t> divergent(2, -1);
  auto errors = run_ranks(2, [&](int i) {
    CommOptions o;
    o.timeout = 60s;
    o.job_token = "elastic-test";
    auto comm = Communicator::create(i, 2, store, o);
    Replica& r = reps[static_cast<size_t>(i)];
    auto state = r.commits();
    r.w[0] = static_cast<float>(10 + i);  // different on each member
    state.commit(*comm, 1);
    divergent[static_cast<size_t>(i)] = state.divergent_commits();
    r.w[0] = 99;  // changed after the commit
    EXPECT_EQ(state.restore(*comm), 1);
  });
  EXPECT_FALSE(errors[0]);
  EXPECT_FALSE(errors[1]);
  EXPECT_EQ(divergent, (std::vector<int64_t>{1, 1}));
  EXPECT_EQ(reps[0].w[0], 10.0f);
  EXPECT_EQ(reps[1].w[0], 10.0f);
}

TEST(ElasticTest, BadOptionsAreRefused) {
  auto store = std::make_shared<MemoryStore>();
  EXPECT_THROW(ElasticGroup(store, options("a", 3, 2, 2)), InvalidArgument);
  EXPECT_THROW(ElasticGroup(store, options("a", 0, 2, 2)), InvalidArgument);
  EXPECT_THROW(ElasticGroup(store, options("", 1, 2, 2)), InvalidArgument);
  EXPECT_THROW(ElasticGroup(store, options("a\nb", 1, 2, 2)), InvalidArgument);
  Replica r;
  auto state = r.commits();
  CommOptions o;
  o.job_token = "elastic-test";
  auto comm = Communicator::create(0, 1, store, o);
  state.commit(*comm, 4);
  EXPECT_THROW(state.commit(*comm, 4), InvalidArgument);  // ids must grow
}

}  // namespace
}  // namespace weft::train
