// Sync policies (BSP, local SGD), their names, and learning-rate schedules.
#include <fmt/format.h>

#include <cmath>
#include <numbers>

#include "weft/errors.h"
#include "weft/train.h"

namespace weft::train {

LocalSgdPolicy::LocalSgdPolicy(int64_t local_steps, int64_t warmup_steps)
    : local_steps_(local_steps), warmup_steps_(warmup_steps) {
  if (local_steps < 1) {
    throw InvalidArgument(fmt::format("local SGD: local_steps must be >= 1, got {}", local_steps));
  }
  if (warmup_steps < 0) {
    throw InvalidArgument(
        fmt::format("local SGD: warmup_steps must be >= 0, got {}", warmup_steps));
  }
}

std::string LocalSgdPolicy::name() const {
  return fmt::format("local-sgd(H={}, warmup={})", local_steps_, warmup_steps_);
}

void LocalSgdPolicy::after_update(int64_t step, DataParallel& engine) {
  if (step >= warmup_steps_ && (step - warmup_steps_ + 1) % local_steps_ == 0) {
    engine.average_parameters();
  }
}

bool LocalSgdPolicy::parameters_may_differ(int64_t steps) const {
  const int64_t local = steps - warmup_steps_;
  return local > 0 && local % local_steps_ != 0;
}

std::string_view sync_mode_name(SyncMode mode) {
  switch (mode) {
    case SyncMode::BSP: return "bsp";
    case SyncMode::LocalSGD: return "local-sgd";
  }
  return "?";
}

SyncMode parse_sync_mode(std::string_view name) {
  if (name == "bsp" || name == "BSP") return SyncMode::BSP;
  if (name == "local-sgd" || name == "localsgd" || name == "local_sgd") return SyncMode::LocalSGD;
  throw InvalidArgument(fmt::format("unknown sync mode '{}': expected bsp or local-sgd", name));
}

std::string_view lr_schedule_name(LrScheduleKind kind) {
  switch (kind) {
    case LrScheduleKind::Constant: return "constant";
    case LrScheduleKind::Step: return "step";
    case LrScheduleKind::Cosine: return "cosine";
  }
  return "?";
}

LrScheduleKind parse_lr_schedule(std::string_view name) {
  if (name == "constant") return LrScheduleKind::Constant;
  if (name == "step") return LrScheduleKind::Step;
  if (name == "cosine") return LrScheduleKind::Cosine;
  throw InvalidArgument(
      fmt::format("unknown learning-rate schedule '{}': expected constant, step or cosine", name));
}

double LrSchedule::at(int64_t step) const {
  if (step < 0) step = 0;
  if (step < warmup_steps) {
    const double t = static_cast<double>(step) / static_cast<double>(warmup_steps);
    return base_lr * (warmup_start_factor + (1.0 - warmup_start_factor) * t);
  }
  const int64_t s = step - warmup_steps;
  switch (kind) {
    case LrScheduleKind::Constant: return base_lr;
    case LrScheduleKind::Step: {
      double lr = base_lr;
      for (int64_t m : milestones) {
        if (s >= m) lr *= gamma;
      }
      return lr;
    }
    case LrScheduleKind::Cosine: {
      const int64_t span = total_steps - warmup_steps;
      if (span <= 0) return base_lr;
      const double t = std::min(1.0, static_cast<double>(s) / static_cast<double>(span));
      return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * t));
    }
  }
  return base_lr;
}

}  // namespace weft::train
