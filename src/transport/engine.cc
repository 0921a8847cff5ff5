#include "transport/engine.h"

#include <fmt/format.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>

#include "core/log.h"
#include "weft/errors.h"

namespace weft::transport {
namespace {

thread_local const Engine* tl_owner = nullptr;

// Marks the current thread as the progress owner for a scope.
class OwnerScope {
 public:
  explicit OwnerScope(const Engine* e) : prev_(tl_owner) { tl_owner = e; }
  ~OwnerScope() { tl_owner = prev_; }

 private:
  const Engine* prev_;
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

}  // namespace

Engine::Engine(EngineOptions options)
    : options_(std::move(options)),
      spin_us_(options_.spin.count()),
      spin_yield_(options_.spin_yield) {
  epoll_fd_.reset(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_fd_.valid()) throw Error(fmt::format("epoll_create1: {}", net::errno_string(errno)));
  wake_fd_.reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!wake_fd_.valid()) throw Error(fmt::format("eventfd: {}", net::errno_string(errno)));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = wake_fd_.get();
  if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_ADD, wake_fd_.get(), &ev) != 0) {
    throw Error(fmt::format("epoll_ctl: {}", net::errno_string(errno)));
  }
  background_ = std::thread([this] { background_loop(); });
}

Engine::~Engine() { stop(); }

void Engine::stop() {
  {
    MutexLock lk(&mu_);
    stopping_ = true;
  }
  bg_cv_.notify_all();
  interrupt();
  if (background_.joinable()) background_.join();
}

bool Engine::in_progress_thread() const { return tl_owner == this; }

void Engine::run_tasks() {
  if (!have_tasks_.load(std::memory_order_acquire)) return;
  std::vector<std::function<void()>> tasks;
  {
    MutexLock lk(&tasks_mu_);
    tasks.swap(tasks_);
    have_tasks_.store(false, std::memory_order_release);
  }
  for (auto& t : tasks) t();
}

void Engine::post(std::function<void()> fn) {
  {
    MutexLock lk(&tasks_mu_);
    tasks_.push_back(std::move(fn));
    have_tasks_.store(true, std::memory_order_release);
  }
  interrupt();
  kick();
}

bool Engine::run_in_progress(std::function<void()> fn, const Deadline& deadline) {
  if (in_progress_thread()) {
    fn();
    return true;
  }
  auto ran = std::make_shared<std::atomic<bool>>(false);
  {
    MutexLock lk(&tasks_mu_);
    tasks_.push_back([this, fn = std::move(fn), ran] {
      fn();
      ran->store(true, std::memory_order_seq_cst);
      // The poster may sleep on fg_cv_ (another thread holds the token and
      // runs this): nothing else would wake it before its deadline.
      notify_completion();
    });
    have_tasks_.store(true, std::memory_order_release);
  }
  interrupt();
  if (stopping_.load()) {
    // Nobody else will run it: do it here (no handler can run any more).
    run_tasks();
    return ran->load();
  }
  return wait([&] { return ran->load(std::memory_order_seq_cst); }, deadline);
}

void Engine::run_in_progress_or_die(std::function<void()> fn, const char* what, Timeout limit) {
  if (run_in_progress(std::move(fn), Deadline::after(limit))) return;
  // Returning would let the caller go on (and its caller release buffers)
  // while the progress thread may still run handlers on them.
  fatal_stuck(fmt::format(
      "the progress thread did not run '{}' within {}: it is stuck, and requests that may still "
      "write into the application's buffers cannot be stopped; ending the process",
      what, format_timeout(limit)));
}

void fatal_stuck(const std::string& message) {
  const std::string line = "FATAL: " + message;
  if (log::enabled(log::Level::Error)) {
    log::write(log::Level::Error, line);
  } else {
    std::fprintf(stderr, "weft: %s\n", line.c_str());
  }
  std::fflush(stderr);
  std::abort();
}

void Engine::add_poller(std::shared_ptr<Poller> poller) {
  run_in_progress_or_die([this, p = std::move(poller)] { pollers_.push_back(p); },
                         "register a poller");
}

void Engine::remove_poller(const Poller* poller) {
  run_in_progress_or_die(
      [this, poller] { std::erase_if(pollers_, [&](const auto& p) { return p.get() == poller; }); },
      "remove a poller (before its transport is destroyed)");
}

int Engine::run_pollers() {
  int n = 0;
  for (size_t i = 0; i < pollers_.size(); ++i) n += pollers_[i]->poll();
  return n;
}

void Engine::add(int fd, uint32_t events, std::shared_ptr<Handler> handler) {
  {
    MutexLock lk(&handlers_mu_);
    handlers_[fd] = std::move(handler);
  }
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
    int err = errno;
    MutexLock lk(&handlers_mu_);
    handlers_.erase(fd);
    throw Error(fmt::format("epoll_ctl(ADD, fd {}): {}", fd, net::errno_string(err)));
  }
}

void Engine::modify(int fd, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_MOD, fd, &ev) != 0 && errno != ENOENT) {
    WEFT_WARN("epoll_ctl(MOD, fd {}): {}", fd, net::errno_string(errno));
  }
}

void Engine::remove(int fd) {
  ::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_DEL, fd, nullptr);
  std::shared_ptr<Handler> released;
  {
    MutexLock lk(&handlers_mu_);
    auto it = handlers_.find(fd);
    if (it != handlers_.end()) {
      released = std::move(it->second);
      handlers_.erase(it);
    }
  }
  // `released` dies here, outside the lock; a dispatch in flight holds its own reference.
}

void Engine::add_timer(Deadline when, std::function<void()> fn) {
  {
    MutexLock lk(&timers_mu_);
    timers_.push(Timer{when, timer_seq_++, std::move(fn)});
  }
  interrupt();  // the owner may be blocked with a longer timeout
}

int Engine::next_timer_ms(int cap_ms) {
  MutexLock lk(&timers_mu_);
  if (timers_.empty()) return cap_ms;
  int ms = timers_.top().when.poll_ms();
  return cap_ms < 0 ? ms : std::min(ms, cap_ms);
}

void Engine::run_due_timers() {
  for (;;) {
    std::function<void()> fn;
    {
      MutexLock lk(&timers_mu_);
      if (timers_.empty() || !timers_.top().when.expired()) return;
      fn = timers_.top().fn;
      timers_.pop();
    }
    fn();
  }
}

void Engine::interrupt() {
  uint64_t one = 1;
  ssize_t n = ::write(wake_fd_.get(), &one, sizeof one);
  (void)n;
}

int Engine::progress_once(int timeout_ms) {
  constexpr int kMaxEvents = 64;
  epoll_event events[kMaxEvents];
  run_tasks();
  int handled = pollers_.empty() ? 0 : run_pollers();
  if (handled > 0 || have_tasks_.load(std::memory_order_acquire)) timeout_ms = 0;
  timeout_ms = next_timer_ms(timeout_ms);
  // Before blocking, every poller arms its wake-ups; one that has work
  // already makes this a poll.
  size_t armed = 0;
  if (timeout_ms != 0) {
    for (; armed < pollers_.size(); ++armed) {
      if (!pollers_[armed]->prepare_block()) {
        timeout_ms = 0;
        break;
      }
    }
  }
  int n = ::epoll_wait(epoll_fd_.get(), events, kMaxEvents, timeout_ms);
  if (n < 0) {
    if (errno != EINTR) WEFT_ERROR("epoll_wait: {}", net::errno_string(errno));
    n = 0;
  }
  for (size_t i = 0; i < armed; ++i) pollers_[i]->after_block();
  for (int i = 0; i < n; ++i) {
    int fd = events[i].data.fd;
    if (fd == wake_fd_.get()) {
      uint64_t v;
      while (::read(wake_fd_.get(), &v, sizeof v) > 0) {
      }
      continue;
    }
    std::shared_ptr<Handler> h;
    {
      MutexLock lk(&handlers_mu_);
      auto it = handlers_.find(fd);
      if (it != handlers_.end()) h = it->second;
    }
    if (h) {
      h->on_event(events[i].events);
      ++handled;
    }
  }
  run_due_timers();
  run_tasks();
  return handled;
}

bool Engine::run_as_owner(const std::function<bool()>& done, const Deadline& deadline) {
  OwnerScope owner(this);
  for (;;) {
    if (done()) return true;
    if (deadline.expired()) return false;
    if (progress_once(0) > 0) continue;
    // Bounded poll: catches a reply that is microseconds away without a
    // sleep/wake-up round trip; it polls for at most options_.spin.
    // With pollers (shared memory), the poll checks them on every round,
    // calls epoll_wait only every 16th round and then also yields the CPU:
    // a peer that runs on this CPU (woken onto it, or more ranks than
    // cores) gets it at once instead of after the poll. Time given away
    // that way is not polling and does not count against options_.spin,
    // within a limit of 8 x options_.spin in all.
    bool progressed = false;
    const auto spin = std::chrono::microseconds(spin_us_.load(std::memory_order_relaxed));
    const bool yield_always = spin_yield_.load(std::memory_order_relaxed);
    if (spin.count() > 0) {
      auto now = Deadline::Clock::now();
      const auto give_up = now + 8 * spin;
      auto polled = Deadline::Clock::duration::zero();
      for (unsigned round = 1; polled < spin && now < give_up; ++round) {
        const bool polling = !pollers_.empty();
        const bool yielding = yield_always || (polling && round % 16 == 0);
        for (int i = 0; i < (polling || yield_always ? 4 : 32); ++i) cpu_relax();
        if (done() || (polling && run_pollers() > 0) ||
            ((!polling || yielding) && progress_once(0) > 0)) {
          progressed = true;
          break;
        }
        auto t = Deadline::Clock::now();
        polled += t - now;
        now = t;
        if (yielding) {
          sched_yield();
          now = Deadline::Clock::now();
        }
      }
    }
    if (progressed) continue;
    // Block in the kernel until an event, a wake-up, a timer or the deadline.
    owner_blocked_.store(true, std::memory_order_seq_cst);
    if (done()) {
      owner_blocked_.store(false, std::memory_order_relaxed);
      return true;
    }
    progress_once(std::min(deadline.poll_ms(), 1000));
    owner_blocked_.store(false, std::memory_order_relaxed);
  }
}

bool Engine::wait(const std::function<bool()>& done, const Deadline& deadline) {
  if (done()) return true;
  MutexLock lk(&mu_);
  fg_wanting_.fetch_add(1);
  bool result = false;
  // Whatever happens, leave as a foreground waiter (leave_locked). The
  // background thread is not woken: it takes the token back by itself once
  // the grace period after the last foreground wait has passed.
  for (;;) {
    if (!token_held_) {
      token_held_ = true;
      lk.unlock();
      try {
        result = run_as_owner(done, deadline);
      } catch (...) {
        lk.lock();
        token_held_ = false;
        leave_locked();
        if (sleepers_.load() > 0) fg_cv_.notify_all();
        throw;
      }
      lk.lock();
      token_held_ = false;
      if (sleepers_.load() > 0) fg_cv_.notify_all();  // another waiter takes over
      break;
    }
    if (bg_owns_) interrupt();  // ask the background thread to hand the token over
    sleepers_.fetch_add(1);
    if (done()) {
      sleepers_.fetch_sub(1);
      result = true;
      break;
    }
    bool timed_out = !fg_cv_.wait_until(deadline.when());
    sleepers_.fetch_sub(1);
    if (done()) {
      result = true;
      break;
    }
    if (timed_out && deadline.expired()) {
      result = false;
      break;
    }
  }
  leave_locked();
  return result;
}

void Engine::leave_locked() {
  fg_wanting_.fetch_sub(1);
  last_fg_release_ = Deadline::Clock::now();
}

void Engine::set_spin(std::chrono::microseconds spin, bool yield) {
  spin_us_.store(spin.count(), std::memory_order_relaxed);
  spin_yield_.store(yield, std::memory_order_relaxed);
}

void Engine::wake() {
  if (owner_blocked_.load(std::memory_order_seq_cst)) interrupt();
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    MutexLock lk(&mu_);
    fg_cv_.notify_all();
  }
}

void Engine::notify_completion() {
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    MutexLock lk(&mu_);
    fg_cv_.notify_all();
  }
}

void Engine::kick() {
  {
    MutexLock lk(&mu_);
    if (token_held_) {
      // The owner (background or foreground) will see the newly armed events.
      return;
    }
    kicked_ = true;
  }
  bg_cv_.notify_all();
}

void Engine::background_loop() {
  pthread_setname_np(pthread_self(), options_.thread_name.substr(0, 15).c_str());
  MutexLock lk(&mu_);
  while (!stopping_) {
    if (token_held_ || fg_wanting_.load() > 0) {
      // Foreground waiters drive progress; look again after a grace period.
      bg_cv_.wait_for(options_.idle_grace);
      continue;
    }
    auto resume = last_fg_release_ + options_.idle_grace;
    if (!kicked_ && Deadline::Clock::now() < resume) {
      bg_cv_.wait_until(resume);
      continue;
    }
    kicked_ = false;
    token_held_ = true;
    bg_owns_ = true;
    lk.unlock();
    OwnerScope owner(this);
    while (fg_wanting_.load(std::memory_order_seq_cst) == 0 && !stopping_.load()) {
      owner_blocked_.store(true, std::memory_order_seq_cst);
      if (fg_wanting_.load(std::memory_order_seq_cst) > 0) {
        owner_blocked_.store(false);
        break;
      }
      try {
        progress_once(-1);
      } catch (const std::exception& e) {
        // A handler failed (e.g. out of memory): keep the thread alive; the
        // requests involved fail through their own paths or their deadlines.
        WEFT_ERROR("progress thread: {}", e.what());
      }
      owner_blocked_.store(false, std::memory_order_relaxed);
    }
    lk.lock();
    bg_owns_ = false;
    token_held_ = false;
    if (sleepers_.load() > 0) fg_cv_.notify_all();
  }
}

}  // namespace weft::transport
