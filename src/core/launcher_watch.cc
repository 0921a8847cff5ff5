#include "core/launcher_watch.h"

#include <fmt/format.h>
#include <unistd.h>

#include "core/settings.h"
#include "weft/errors.h"

namespace weft::rendezvous {
namespace {

thread_local LauncherWatch* t_watch = nullptr;

}  // namespace

LauncherWatch::LauncherWatch(std::string launcher, std::function<std::string()> also)
    : launcher_(std::move(launcher)),
      also_(std::move(also)),
      parent_(::getppid()),
      outer_(t_watch) {
  t_watch = this;
}

LauncherWatch::~LauncherWatch() { t_watch = outer_; }

void check_launcher(std::string_view waiting_for) {
  if (t_watch == nullptr) return;
  if (std::string reason = t_watch->also(); !reason.empty()) {
    throw AbortedError(fmt::format("stopped waiting for {}: {}", waiting_for, reason));
  }
  const pid_t now = ::getppid();
  if (now == t_watch->parent()) return;
  throw AbortedError(fmt::format(
      "stopped waiting for {}: the launcher ({}, pid {}) is gone (this process now belongs to pid "
      "{})",
      waiting_for, t_watch->launcher(), t_watch->parent(), now));
}

std::chrono::milliseconds report_interval() {
  return settings::get(settings::kRendezvousLogInterval);
}

}  // namespace weft::rendezvous
