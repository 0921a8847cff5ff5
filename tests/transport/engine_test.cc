// The progress engine on its own: who runs a task posted with
// run_in_progress, and when its poster learns that it ran.
#include "transport/engine.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "testing/testing.h"

namespace weft::transport {
namespace {

using namespace std::chrono_literals;

// A thread that waits on the engine holds the progress token; another
// thread's run_in_progress task runs there. The poster sleeps on the
// engine's condition variable meanwhile and must be woken when its task has
// run, not at its deadline (a lost wake-up there held fail_all for its whole
// 30 s limit while the owner sat in epoll_wait).
TEST(Engine, RunInProgressReturnsOnceTheOwnerRanTheTask) {
  Engine engine;
  std::atomic<bool> owner_in{false};
  std::atomic<bool> release{false};
  std::thread owner([&] {
    engine.wait(
        [&] {
          owner_in = true;
          return release.load();
        },
        Deadline::after(120s));
  });
  ASSERT_TRUE(testing::wait_until([&] { return owner_in.load(); }, 30s));
  for (int i = 0; i < 5; ++i) {
    std::atomic<bool> ran{false};
    const auto t0 = std::chrono::steady_clock::now();
    ASSERT_TRUE(engine.run_in_progress([&] { ran = true; }, Deadline::after(30s)));
    EXPECT_TRUE(ran.load());
    // Far below the deadline: the poster was woken by the task, not by
    // its deadline (a hang check, not a speed check).
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 15s) << "iteration " << i;
  }
  release = true;  // the owner sees it within its 1 s epoll_wait
  owner.join();
}

}  // namespace
}  // namespace weft::transport
