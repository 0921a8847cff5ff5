// Start-up waits that say what they wait for, and stop when the launcher is
// gone.
//
// While weft::init() rendezvous (connecting to the store, waiting for every
// rank's record), the launcher that started this process may go away
// (mpirun or srun killed, torchrun's agent stopped). A rank whose launcher
// is gone must not linger until the deadline: init() puts a LauncherWatch
// on its thread for the rendezvous, and the waits call check_launcher()
// between their slices (at most every 500 ms). The launcher counts as gone
// when the parent process changed (getppid() differs from what it was when
// the watch began: the parent died and this process was re-parented).
//
// The waits also report progress every report_interval()
// (WEFT_RENDEZVOUS_LOG_INTERVAL, default 10 s) at warn level.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <string>
#include <string_view>

namespace weft::rendezvous {

// Watches the parent process of this thread's caller while in scope
// (thread-local; nests: the innermost one counts).
class LauncherWatch {
 public:
  // `also` (optional) is asked too at every check: a non-empty answer is a
  // reason to stop waiting (elastic: a member of the generation being
  // formed died).
  explicit LauncherWatch(std::string launcher, std::function<std::string()> also = {});
  ~LauncherWatch();
  LauncherWatch(const LauncherWatch&) = delete;
  LauncherWatch& operator=(const LauncherWatch&) = delete;

  const std::string& launcher() const { return launcher_; }
  pid_t parent() const { return parent_; }
  std::string also() const { return also_ ? also_() : std::string(); }

 private:
  std::string launcher_;
  std::function<std::string()> also_;
  pid_t parent_;
  LauncherWatch* outer_;
};

// Throws weft::AbortedError ("... the launcher (mpirun, pid P) is gone
// while waiting for <waiting_for>") when a LauncherWatch of this thread sees
// its parent gone, or "stopped waiting for <waiting_for>: <reason>" when
// its `also` gives a reason; does nothing without a watch.
void check_launcher(std::string_view waiting_for);

// How often a start-up wait reports what it waits for
// (WEFT_RENDEZVOUS_LOG_INTERVAL, seconds; default 10).
std::chrono::milliseconds report_interval();

}  // namespace weft::rendezvous
