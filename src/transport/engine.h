// The progress engine: one epoll set per communicator world, and the rule
// for which thread drives it.
//
// Communication threads never spin: whoever makes progress blocks in
// epoll_wait. At any moment at most one thread holds the "progress token"
// and may call epoll_wait and run the handlers:
//  * a thread waiting for a request (Engine::wait) takes the token and
//    drives progress itself, so a blocking collective does its socket I/O on
//    the caller's thread with no hand-off between threads (latency);
//  * when no thread waits, a background thread holds it, so that transfers
//    started asynchronously keep moving while the application computes. The
//    background thread takes the token back only after a short grace period
//    (EngineOptions::idle_grace), so back-to-back blocking calls do not pay
//    for waking it up and interrupting it each time;
//  * other waiters sleep on a condition variable and are woken when any
//    request completes.
// Before blocking in epoll_wait a waiter polls for a short, bounded time
// (EngineOptions::spin, default a few tens of microseconds), which saves a
// wake-up on small messages; it never spins longer than that.
//
// Transports whose data arrives without a file descriptor becoming ready
// (shared-memory rings) register a Poller: the progress owner calls it on
// every round and, during the bounded poll, far more often than it calls
// epoll_wait, so that a waiter sees new data without a system call. Before
// the owner blocks in epoll_wait each poller arms its wake-ups (e.g. tells
// its peers, in shared memory, to signal an eventfd that is in the epoll
// set) and re-checks, so that no data that arrives meanwhile is slept on.
#pragma once

#include <sys/epoll.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <queue>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "core/deadline.h"
#include "core/mutex.h"
#include "core/socket.h"

namespace weft::transport {

// How long a task that must run on the progress thread (run_in_progress)
// may wait for it when returning without it would break a promise: failing
// every request of an aborted world (Transport::fail_all: afterwards no
// handler may touch a failed request's buffer), registering and removing a
// poller (afterwards it must not run on a destroyed transport). Handlers
// never block (non-blocking I/O, copies bounded by a ring or a read
// buffer), so the token holder comes back within milliseconds even on a
// loaded host; after 30 s it is stuck (a deadlock, a handler that never
// returns), and the process ends instead (run_in_progress_or_die).
inline constexpr std::chrono::seconds kProgressTaskLimit{30};

// Logs "FATAL: <message>" (whatever the log level) and ends the process
// with std::abort: for a deadline on the failure path that passed while a
// request could still write into a caller's buffer, where returning would
// let that buffer be reused under it (silent corruption).
[[noreturn]] void fatal_stuck(const std::string& message);

// Something registered in the epoll set. on_event runs on the thread that
// holds the progress token, never on two threads at once.
class Handler {
 public:
  virtual ~Handler() = default;
  virtual void on_event(uint32_t events) = 0;
};

// Progress that does not come from a file descriptor. Every method runs on
// the thread that holds the progress token, never on two threads at once.
class Poller {
 public:
  virtual ~Poller() = default;
  // Makes whatever progress is possible without blocking; returns the
  // number of things done (0: nothing new). Called very often: must be
  // cheap when there is nothing to do (a few loads of shared memory).
  virtual int poll() = 0;
  // The owner is about to block in epoll_wait: arm the wake-ups that end
  // the wait when new work arrives, then check again. Returns false (and
  // leaves nothing armed) when there is work already: the owner then does
  // not block.
  virtual bool prepare_block() = 0;
  // Back from a wait that prepare_block() allowed: disarm the wake-ups.
  virtual void after_block() = 0;
};

struct EngineOptions {
  // Bounded poll before sleeping in epoll_wait (WEFT_SPIN_US).
  std::chrono::microseconds spin{20};
  // Yield the CPU on every round of that poll: for processes that share
  // their CPUs with other ranks of the job (more ranks on the host than
  // CPUs), where a pure poll would hold off the very peer it waits for.
  bool spin_yield = false;
  // How long the background thread leaves the token to foreground waiters
  // after the last one finished.
  std::chrono::microseconds idle_grace{2000};
  // Name of the background thread (pthread name, 15 chars max).
  std::string thread_name = "weft-progress";
};

class Engine {
 public:
  explicit Engine(EngineOptions options = {});
  // Stops the background thread. Handlers must have been removed.
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Registers fd with the given epoll events (EPOLLIN, EPOLLOUT...); the
  // engine keeps the handler alive while registered. Thread-safe.
  void add(int fd, uint32_t events, std::shared_ptr<Handler> handler);
  void modify(int fd, uint32_t events);
  // Unregisters fd (the handler is released once no thread dispatches to it).
  void remove(int fd);

  // Registers / unregisters a poller (through run_in_progress, so that the
  // list is only ever touched by the progress owner). The engine keeps the
  // poller alive while registered. Thread-safe.
  void add_poller(std::shared_ptr<Poller> poller);
  void remove_poller(const Poller* poller);

  // Runs fn on the progress thread at (or soon after) `when`. Thread-safe.
  void add_timer(Deadline when, std::function<void()> fn);

  // Waits until done() is true or the deadline passes, making progress
  // meanwhile. Returns done()'s final value. done() is called often and
  // must be cheap; it is called without any engine lock held.
  bool wait(const std::function<bool()>& done, const Deadline& deadline);

  // Wakes every waiter so that it re-checks its condition (call after a
  // request was completed or failed outside of a handler, e.g. an inline
  // send or an abort). Cheap when nobody sleeps.
  void wake();
  // Changes the bounded poll (see EngineOptions::spin and spin_yield), e.g.
  // once rendezvous has told how many ranks share this host. Thread-safe;
  // takes effect at the next wait.
  void set_spin(std::chrono::microseconds spin, bool yield);

  // Same as wake(), from inside a handler: only sleeping waiters need waking.
  void notify_completion();

  // Hands the background thread the token as soon as possible, because
  // queued work needs progress while nobody waits (e.g. a partially written
  // asynchronous send).
  void kick();

  // Runs fn on the progress thread, between handler calls, and returns once
  // it ran (or the deadline passed: then returns false and fn may still run
  // later). Runs fn at once when the caller already is the progress owner.
  // Used for everything that must not race with handlers, e.g. failing the
  // receive a handler is filling.
  bool run_in_progress(std::function<void()> fn, const Deadline& deadline);
  // run_in_progress for work the caller must not return without (see
  // kProgressTaskLimit): if it has not run after `limit`, logs a fatal
  // message naming `what` and ends the process (std::abort), since the
  // caller's promise can no longer be kept.
  void run_in_progress_or_die(std::function<void()> fn, const char* what,
                              Timeout limit = kProgressTaskLimit);
  // Queues fn to run on the progress thread soon; does not wait.
  void post(std::function<void()> fn);
  // True on the thread that holds the progress token.
  bool in_progress_thread() const;

  // Stops the background thread; afterwards nothing makes progress. Call
  // before destroying the objects whose handlers are registered.
  void stop();

 private:
  // One epoll_wait (timeout in ms, 0 = poll) plus due timers; returns the
  // number of events handled.
  int progress_once(int timeout_ms);
  int run_pollers();
  bool run_as_owner(const std::function<bool()>& done, const Deadline& deadline);
  void background_loop();
  void interrupt();
  int next_timer_ms(int cap_ms);
  void run_due_timers();
  void run_tasks();
  // A foreground waiter leaves wait().
  void leave_locked() REQUIRES(mu_);

  struct Timer {
    Deadline when;
    uint64_t seq;
    std::function<void()> fn;
    bool operator>(const Timer& o) const {
      return when.when() != o.when.when() ? when.when() > o.when.when() : seq > o.seq;
    }
  };

  EngineOptions options_;
  net::Fd epoll_fd_;
  net::Fd wake_fd_;  // eventfd: interrupts epoll_wait

  Mutex handlers_mu_;
  std::unordered_map<int, std::shared_ptr<Handler>> handlers_ GUARDED_BY(handlers_mu_);

  // Touched only by the progress owner (see add_poller).
  std::vector<std::shared_ptr<Poller>> pollers_;

  Mutex tasks_mu_;
  std::vector<std::function<void()>> tasks_ GUARDED_BY(tasks_mu_);
  std::atomic<bool> have_tasks_{false};

  Mutex timers_mu_;
  std::priority_queue<Timer, std::vector<Timer>, std::greater<>> timers_ GUARDED_BY(timers_mu_);
  uint64_t timer_seq_ GUARDED_BY(timers_mu_) = 0;

  // Token state.
  Mutex mu_;
  CondVar fg_cv_{&mu_};  // foreground waiters waiting for the token or a completion
  CondVar bg_cv_{&mu_};  // the background thread
  bool token_held_ GUARDED_BY(mu_) = false;
  bool bg_owns_ GUARDED_BY(mu_) = false;
  std::atomic<bool> stopping_{false};  // written under mu_
  bool kicked_ GUARDED_BY(mu_) = false;
  std::atomic<int> fg_wanting_{0};  // threads in wait(); written under mu_
  Deadline::Clock::time_point last_fg_release_ GUARDED_BY(mu_){};
  std::atomic<int> sleepers_{0};            // waiters asleep on cv_
  std::atomic<bool> owner_blocked_{false};  // the token holder may be blocked in epoll_wait
  std::atomic<int64_t> spin_us_;            // the bounded poll (set_spin)
  std::atomic<bool> spin_yield_;

  std::thread background_;
};

}  // namespace weft::transport
