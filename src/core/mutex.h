// A mutex, its scoped lock and a condition variable that clang's
// thread-safety analysis understands (core/thread_annotations.h), over
// std::mutex and std::condition_variable. Waits are written as loops in the
// caller, where the analysis knows the mutex is held:
//
//   MutexLock lock(&mu_);
//   while (!ready_) changed_.wait();           // ready_ is GUARDED_BY(mu_)
//   while (!ready_) if (!changed_.wait_until(when)) return false;  // timed out
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "core/thread_annotations.h"

namespace weft {

class CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() ACQUIRE() { mu_.lock(); }
  void unlock() RELEASE() { mu_.unlock(); }
  bool try_lock() TRY_ACQUIRE(true) { return mu_.try_lock(); }
  // Tells the analysis that the caller holds this mutex (where it cannot see it).
  void assert_held() const ASSERT_CAPABILITY(this) {}

 private:
  friend class CondVar;
  std::mutex mu_;
};

// Holds a Mutex from construction to destruction; unlock() and lock() in
// between are allowed (the destructor unlocks only if held).
class SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ACQUIRE(mu) : mu_(mu) { mu_->lock(); }
  ~MutexLock() RELEASE() {
    if (held_) mu_->unlock();
  }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

  void unlock() RELEASE() {
    mu_->unlock();
    held_ = false;
  }
  void lock() ACQUIRE() {
    mu_->lock();
    held_ = true;
  }

 private:
  Mutex* const mu_;
  bool held_ = true;
};

// A condition variable tied to one Mutex, which the caller of every wait
// holds. (As in LevelDB, the waits carry no REQUIRES: the analysis cannot
// tell that the CondVar's mutex is the caller's. The loop around a wait is
// checked where it is written.)
class CondVar {
 public:
  using Clock = std::chrono::steady_clock;

  explicit CondVar(Mutex* mu) : mu_(mu) {}
  CondVar(const CondVar&) = delete;
  CondVar& operator=(const CondVar&) = delete;

  // Releases the mutex, sleeps until notified (or spuriously), takes it again.
  void wait() {
    std::unique_lock<std::mutex> lock(mu_->mu_, std::adopt_lock);
    cv_.wait(lock);
    lock.release();
  }
  // As wait(), until `when` at the latest: false if that time has passed.
  template <class C, class D>
  bool wait_until(std::chrono::time_point<C, D> when) {
    std::unique_lock<std::mutex> lock(mu_->mu_, std::adopt_lock);
    const bool notified = cv_.wait_until(lock, when) == std::cv_status::no_timeout;
    lock.release();
    return notified || C::now() < when;
  }
  template <class R, class P>
  bool wait_for(std::chrono::duration<R, P> d) {
    return wait_until(Clock::now() + d);
  }
  void notify_one() { cv_.notify_one(); }
  void notify_all() { cv_.notify_all(); }

 private:
  Mutex* const mu_;
  std::condition_variable cv_;
};

}  // namespace weft
