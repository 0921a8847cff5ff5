// Share arithmetic and the planner of weft/balance.h: pure functions, so
// that every rank computes the same shares from the same figures.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "balance/median.h"
#include "weft/balance.h"
#include "weft/errors.h"

namespace weft::balance {

std::string_view mode_name(Mode mode) {
  switch (mode) {
    case Mode::None: return "none";
    case Mode::Static: return "static";
    case Mode::Dynamic: return "dynamic";
  }
  return "?";
}

Mode parse_mode(std::string_view name) {
  if (name == "none") return Mode::None;
  if (name == "static") return Mode::Static;
  if (name == "dynamic") return Mode::Dynamic;
  throw InvalidArgument(
      fmt::format("unknown balance mode '{}' (valid: none, static, dynamic)", name));
}

double gradient_weight(int64_t share, int64_t total, int workers) {
  if (workers < 1 || total < 1 || share < 0 || share > total) {
    throw InvalidArgument(fmt::format(
        "gradient_weight: share {} of a step of {} samples over {} workers (need 0 <= share <= "
        "total, total >= 1, workers >= 1)",
        share, total, workers));
  }
  return static_cast<double>(workers) * static_cast<double>(share) / static_cast<double>(total);
}

double quota_rate(double quota_cores, double cpu_seconds_per_sample, double headroom) {
  if (!(headroom > 0 && headroom <= 1)) {
    throw InvalidArgument(fmt::format("quota headroom {} is not in (0, 1]", headroom));
  }
  if (!(std::isfinite(quota_cores) && quota_cores > 0) ||
      !(std::isfinite(cpu_seconds_per_sample) && cpu_seconds_per_sample > 0)) {
    return std::numeric_limits<double>::infinity();
  }
  return headroom * quota_cores / cpu_seconds_per_sample;
}

std::vector<int64_t> equal_shares(int64_t global_batch, int workers) {
  if (workers < 1 || global_batch < workers) {
    throw InvalidArgument(fmt::format(
        "a global batch of {} samples cannot give each of {} workers at least one sample",
        global_batch, workers));
  }
  std::vector<int64_t> s(static_cast<size_t>(workers), global_batch / workers);
  for (int64_t i = 0; i < global_batch % workers; ++i) s[static_cast<size_t>(i)] += 1;
  return s;
}

namespace {

bool valid_rate(double r) { return std::isfinite(r) && r > 0; }

// Integer shares from real ones: each at least min_share, summing to total,
// by largest remainders above the floors (ties to the lower index, so the
// result is the same on every rank).
std::vector<int64_t> round_shares(std::span<const double> want, int64_t total, int64_t min_share) {
  const size_t n = want.size();
  std::vector<int64_t> s(n);
  std::vector<double> frac(n);
  int64_t sum = 0;
  for (size_t i = 0; i < n; ++i) {
    const double w = std::max(want[i], static_cast<double>(min_share));
    s[i] = static_cast<int64_t>(std::floor(w));
    frac[i] = w - static_cast<double>(s[i]);
    sum += s[i];
  }
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t{0});
  if (sum < total) {
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return frac[a] > frac[b]; });
    for (size_t k = 0; sum < total; k = (k + 1) % n, ++sum) s[order[k]] += 1;
  } else {
    // Over: take from the largest shares above the minimum, smallest
    // fractions first.
    while (sum > total) {
      size_t best = n;
      for (size_t i = 0; i < n; ++i) {
        if (s[i] <= min_share) continue;
        if (best == n || s[i] > s[best] || (s[i] == s[best] && frac[i] < frac[best])) best = i;
      }
      if (best == n) break;  // cannot happen when total >= n * min_share
      s[best] -= 1;
      --sum;
    }
  }
  return s;
}

std::string join_shares(std::span<const int64_t> s) { return fmt::format("{}", fmt::join(s, " ")); }

}  // namespace

std::vector<double> sanitize_rates(std::span<const double> rates, std::vector<size_t>* replaced) {
  std::vector<double> valid;
  for (double r : rates) {
    if (valid_rate(r)) valid.push_back(r);
  }
  const double med = valid.empty() ? 1.0 : median(std::move(valid));
  std::vector<double> out(rates.begin(), rates.end());
  if (replaced != nullptr) replaced->clear();
  for (size_t i = 0; i < out.size(); ++i) {
    if (!valid_rate(out[i])) {
      out[i] = med;
      if (replaced != nullptr) replaced->push_back(i);
    }
  }
  return out;
}

std::vector<int64_t> proportional_shares(std::span<const double> rates, int64_t global_batch,
                                         int64_t min_share) {
  const auto n = static_cast<int64_t>(rates.size());
  if (n < 1) throw InvalidArgument("proportional_shares: no workers");
  if (min_share < 1) {
    throw InvalidArgument(fmt::format("the minimum share {} is not >= 1 sample", min_share));
  }
  if (global_batch < n * min_share) {
    throw InvalidArgument(fmt::format(
        "a global batch of {} samples cannot give each of {} workers the minimum share of {}",
        global_batch, n, min_share));
  }
  double sum = 0;
  for (double r : rates) {
    if (!valid_rate(r)) {
      throw InvalidArgument(fmt::format(
          "proportional_shares: rate {} is not a finite number > 0 (sanitize_rates first)", r));
    }
    sum += r;
  }
  // Water-filling: workers whose proportional share falls below the minimum
  // get the minimum, the rest is split among the others in proportion.
  std::vector<double> want(rates.size(), 0);
  std::vector<bool> pinned(rates.size(), false);
  double free_batch = static_cast<double>(global_batch);
  double free_rate = sum;
  for (bool again = true; again;) {
    again = false;
    for (size_t i = 0; i < rates.size(); ++i) {
      if (pinned[i]) continue;
      want[i] = free_batch * rates[i] / free_rate;
      if (want[i] < static_cast<double>(min_share)) {
        pinned[i] = true;
        want[i] = static_cast<double>(min_share);
        free_batch -= want[i];
        free_rate -= rates[i];
        again = true;
      }
    }
    if (free_rate <= 0) break;
  }
  return round_shares(want, global_batch, min_share);
}

void check_planner_options(const PlannerOptions& o, int workers) {
  if (workers < 1) throw InvalidArgument(fmt::format("{} workers: need at least 1", workers));
  if (o.min_share < 1) {
    throw InvalidArgument(fmt::format("min_share {} is not >= 1 sample", o.min_share));
  }
  if (o.global_batch < static_cast<int64_t>(workers) * o.min_share) {
    throw InvalidArgument(fmt::format(
        "global_batch {} is smaller than {} workers x the minimum share of {} sample(s)",
        o.global_batch, workers, o.min_share));
  }
  if (!(o.damping > 0 && o.damping <= 1)) {
    throw InvalidArgument(fmt::format("damping {} is not in (0, 1]", o.damping));
  }
  if (!(o.max_change > 0 && o.max_change <= 1)) {
    throw InvalidArgument(fmt::format("max_change {} is not in (0, 1]", o.max_change));
  }
  if (!(o.deadband >= 0 && o.deadband < 1)) {
    throw InvalidArgument(fmt::format("deadband {} is not in [0, 1)", o.deadband));
  }
  if (!(o.jump > 0)) {  // NaN too
    throw InvalidArgument(fmt::format("jump {} is not > 0", o.jump));
  }
}

Plan replan(std::span<const int64_t> current, std::span<const double> rates,
            const PlannerOptions& o, const PlannerState& state) {
  const int n = static_cast<int>(current.size());
  check_planner_options(o, n);
  if (rates.size() != current.size()) {
    throw InvalidArgument(fmt::format("replan: {} rates for {} workers", rates.size(), n));
  }
  const std::vector<int64_t>& last_move = state.last_move;
  if (!last_move.empty() && last_move.size() != current.size()) {
    throw InvalidArgument(fmt::format("replan: {} last moves for {} workers", last_move.size(), n));
  }
  if (!(state.gain >= 0 && state.gain <= 1)) {  // NaN too
    throw InvalidArgument(fmt::format("replan: gain {} is not in [0, 1]", state.gain));
  }
  int64_t sum = 0;
  for (int64_t s : current) {
    if (s < o.min_share) {
      throw InvalidArgument(
          fmt::format("replan: current share {} is below the minimum {}", s, o.min_share));
    }
    sum += s;
  }
  if (sum != o.global_batch) {
    throw InvalidArgument(fmt::format("replan: current shares sum to {}, not the global batch {}",
                                      sum, o.global_batch));
  }
  std::vector<size_t> replaced;
  const std::vector<double> r = sanitize_rates(rates, &replaced);
  const std::vector<int64_t> target = proportional_shares(r, o.global_batch, o.min_share);
  const double mean = static_cast<double>(o.global_batch) / n;
  const double bound = std::max(1.0, o.max_change * mean);
  std::vector<double> want(current.size()), lo(current.size()), hi(current.size());
  double largest = 0;
  for (size_t i = 0; i < current.size(); ++i) {
    largest = std::max(largest, std::abs(static_cast<double>(target[i] - current[i])));
  }
  // A change of speed moves every share all the way (the others' shares
  // take up what the changed worker's gives or takes); noise is damped.
  // Between those, the fraction of the way a move takes (the gain) adapts
  // to how the gaps to the targets (all workers', as one vector) lie against
  // the last move:
  // * further on in the same direction (cosine >= 0.8): the gain grows by
  //   half, to 1 at most, and after a move all the way it stays 1. The
  //   target often moves on for a few re-plans after a change of speed (the
  //   rates settle as the shares change: per-step costs spread over another
  //   share, CPUs shared with the others); that is still the same change.
  // * back against it (cosine < 0): the gain halves, down to a quarter of
  //   `damping`. Noise turns back and forth, so under steady speeds the
  //   moves shrink and die out instead of dithering.
  // * another direction: at most `damping`.
  const bool jump = largest > o.jump * mean;
  double dot = 0, gap_norm = 0, last_norm = 0;
  if (!last_move.empty()) {
    for (size_t i = 0; i < current.size(); ++i) {
      const auto g = static_cast<double>(target[i] - current[i]);
      const auto m = static_cast<double>(last_move[i]);
      dot += g * m;
      gap_norm += g * g;
      last_norm += m * m;
    }
  }
  const double gain = state.gain > 0 ? state.gain : o.damping;
  double step = gain;
  const char* how_gain = "";
  if (jump) {
    step = 1.0;
  } else if (gap_norm > 0 && last_norm > 0) {
    const double cosine = dot / std::sqrt(gap_norm * last_norm);
    if (cosine >= 0.8) {
      step = std::min(1.0, gain * 1.5);
      how_gain = "the targets lie on in the direction of the last move";
    } else if (cosine < 0) {
      step = std::max(o.damping / 4, gain / 2);
      how_gain = "the targets lie back against the last move";
    } else {
      step = std::min(gain, o.damping);
      how_gain = "the targets lie across the last move";
    }
  }
  for (size_t i = 0; i < current.size(); ++i) {
    const double c = static_cast<double>(current[i]);
    lo[i] = std::max(static_cast<double>(o.min_share), c - bound);
    hi[i] = c + bound;
    want[i] = std::clamp(c + step * (static_cast<double>(target[i]) - c), lo[i], hi[i]);
  }
  Plan plan;
  std::string rates_text;
  for (size_t i = 0; i < r.size(); ++i) {
    rates_text += fmt::format("{}{:.1f}", i == 0 ? "" : " ", r[i]);
  }
  std::string note;
  if (!replaced.empty()) {
    note = fmt::format("; rates of worker(s) {} were absent or absurd, taken as the median",
                       fmt::join(replaced, ","));
  }
  if (largest < o.deadband * mean) {
    plan.shares.assign(current.begin(), current.end());
    plan.next = state;  // a kept plan is no move: the next one judges the last move
    plan.reason = fmt::format(
        "kept: target [{}] from rates [{}] samples/s is within the dead band ({:.0f}% of the "
        "mean share){}",
        join_shares(target), rates_text, o.deadband * 100, note);
    return plan;
  }
  // The damped, bounded moves no longer sum to the global batch: spread the
  // difference over the workers still inside their bounds, in proportion to
  // their targets, until it is gone (the current shares are inside the
  // bounds and sum to it, so it always can be), then round. Rounding to
  // whole samples moves a share by at most one more.
  for (int round = 0; round < 64; ++round) {
    double total = 0;
    for (double w : want) total += w;
    const double diff = static_cast<double>(o.global_batch) - total;
    if (std::abs(diff) < 1e-9) break;
    double weight = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      if (diff > 0 ? want[i] < hi[i] : want[i] > lo[i]) weight += static_cast<double>(target[i]);
    }
    if (weight <= 0) break;
    for (size_t i = 0; i < want.size(); ++i) {
      if (diff > 0 ? want[i] < hi[i] : want[i] > lo[i]) {
        want[i] =
            std::clamp(want[i] + diff * static_cast<double>(target[i]) / weight, lo[i], hi[i]);
      }
    }
  }
  plan.shares = round_shares(want, o.global_batch, o.min_share);
  plan.changed = !std::equal(plan.shares.begin(), plan.shares.end(), current.begin());
  plan.next.gain = step;
  plan.next.last_move = last_move;
  if (plan.changed) {
    plan.next.last_move.resize(current.size());
    for (size_t i = 0; i < current.size(); ++i) {
      plan.next.last_move[i] = plan.shares[i] - current[i];
    }
  }
  const std::string how =
      jump ? fmt::format(
                 "moved all the way (a gap over {:.0f}% of the mean share: a change of "
                 "speed)",
                 o.jump * 100)
      : *how_gain != 0 ? fmt::format("moved {:.0f}% of the way ({})", step * 100, how_gain)
                       : fmt::format("moved {:.0f}% of the way", step * 100);
  plan.reason = fmt::format(
      "rates [{}] samples/s give the target [{}]; {} (at most {:.0f} "
      "samples per worker){}",
      rates_text, join_shares(target), how, bound, note);
  return plan;
}

}  // namespace weft::balance
