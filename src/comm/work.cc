#include "comm/work.h"

#include <fmt/format.h>

#include "core/log.h"
#include "transport/engine.h"
#include "weft/errors.h"

namespace weft::comm {

using transport::AbortKind;

namespace {

// How long an asynchronous collective may take to return after its world
// was aborted for its timeout. The abort fails every request at once, so
// the collective returns within the time of a reduction of the data it
// already has (milliseconds); one that has not returned after 60 s is
// stuck, and it may still write into the caller's buffers, which the
// caller would reuse after the error: the process ends instead.
constexpr auto kAbortedCollectiveLimit = std::chrono::seconds(60);

}  // namespace

void abort_world(Group& group, const std::string& reason) {
  World& w = group.world();
  std::string msg = fmt::format("rank {}: {}", w.rank(), reason);
  w.abort(std::make_exception_ptr(AbortedError(msg)), AbortKind::Aborted, w.rank(), msg, true);
}

void P2PWork::wait(Timeout timeout) {
  Deadline d = timeout.count() < 0 ? deadline_ : deadline_.min(Deadline::after(timeout));
  group_->wait(req_, d);
}

bool P2PWork::test() {
  if (req_->done()) return true;
  // Give communication a chance to move, without blocking.
  group_->world().engine().wait([&] { return req_->done(); }, Deadline::after(Timeout(0)));
  return req_->done();
}

void P2PWork::abort() { abort_world(*group_, "aborted by the application (Work::abort)"); }

void CollectiveWork::finish(std::exception_ptr error) {
  {
    MutexLock lk(&mu_);
    done_ = true;
    error_ = std::move(error);
  }
  cv_.notify_all();
}

void CollectiveWork::wait(Timeout timeout) {
  Deadline d = timeout.count() < 0 ? deadline_ : deadline_.min(Deadline::after(timeout));
  MutexLock lk(&mu_);
  while (!done_ && cv_.wait_until(d.when())) {
  }
  if (!done_) {
    lk.unlock();
    World& w = group_->world();
    std::string msg = fmt::format("rank {}: {} timed out after {}", w.rank(), description_,
                                  format_timeout(d.budget()));
    auto err = std::make_exception_ptr(TimeoutError(msg, -1, description_));
    w.abort(err, AbortKind::Timeout, -1, msg, true);
    // The collective fails fast now; its buffers are released when it returns.
    lk.lock();
    const auto limit = CondVar::Clock::now() + kAbortedCollectiveLimit;
    while (!done_ && cv_.wait_until(limit)) {
    }
    if (!done_) {
      transport::fatal_stuck(fmt::format(
          "rank {}: {} is still running {} after its communicator was aborted (it timed out); "
          "it may still write into the application's buffers, so the process ends",
          w.rank(), description_, format_timeout(kAbortedCollectiveLimit)));
    }
    std::rethrow_exception(err);
  }
  if (error_) std::rethrow_exception(error_);
}

bool CollectiveWork::test() {
  MutexLock lk(&mu_);
  return done_;
}

std::exception_ptr CollectiveWork::error() const {
  MutexLock lk(&mu_);
  return done_ ? error_ : nullptr;
}

void CollectiveWork::abort() { abort_world(*group_, "aborted by the application (Work::abort)"); }

}  // namespace weft::comm
