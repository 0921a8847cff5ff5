// Load balancing for data-parallel training on uneven or changing workers.
//
// Under BSP every step waits for the slowest worker. Instead of giving every
// worker the same part of each global batch, the balancer gives worker i a
// share s_i of it, proportional to the rate (samples/s of compute) measured
// on that worker, so that every worker finishes its forward and backward at
// about the same time. The global batch B = sum of s_i stays constant, and
// each worker's gradient, the mean over its s_i samples, is weighted by
// W * s_i / B before the engine averages over the W workers
// (DataParallel::set_gradient_weight), so that the averaged gradient is
// exactly the mean gradient of the global batch, whatever the shares.
//
//   weft::balance::Balancer bal(comm, {.mode = Mode::Dynamic, .global_batch = 256});
//   bal.probe([&](int64_t n) { forward + backward on n samples, no engine });  // optional
//   weft::data::ShardQueue queue(num_samples, comm->size(), {...});
//   for (epoch) {
//     queue.start_epoch(epoch);
//     for (;;) {
//       auto takes = queue.take_step(bal.shares());   // the same on every rank
//       int64_t total = sum of takes[i].size(); if (total == 0) break;
//       dp.set_gradient_weight(weft::balance::gradient_weight(takes[rank].size(), total, W));
//       compute on takes[rank] (timed); dp.finish_gradients() (timed wait); optimizer;
//       dp.end_step(); queue.complete_step(); bal.end_step({compute_seconds, wait_seconds});   //
//       every rank, every step
//     }
//   }
//
// Pieces:
// * The capability probe (Balancer::probe): each worker's host facts
//   (weft/host.h) and a measured step time of the user's own model; the
//   initial shares are proportional to the measured rates.
// * The live monitor (Balancer::end_step): every worker records each step's
//   compute and communication-wait time; every `exchange_every` steps the
//   workers' figures (rate, compute time per sample, waiting, CPU
//   utilisation, resident memory, cgroup throttling, GPU utilisation) are
//   exchanged with one small allgather, so that every rank sees every
//   worker (Balancer::workers()).
// * The planner (replan(), a pure function): the new shares move from the
//   current ones toward the proportional target, all the way after a change
//   of speed and while the target moves on in that direction, damped
//   otherwise (less and less while the moves turn back and forth), and
//   bounded (a minimum share, a maximum change per re-plan), so that they
//   follow a change quickly and settle instead of oscillating. Each decision is
//   logged with the old and new shares and why.
// * CPU quotas: a worker in a cgroup with a CPU quota is planned at no
//   more than its quota sustains with headroom (quota_rate()), so that it
//   is not stopped by the kernel in the middle of a collective.
// * Stragglers: a worker below `straggler_floor` of the median rate is
//   reported (logged, WorkerFigures::straggler); one that stays below it
//   for `drop_after` exchanges in a row is named by stragglers_to_drop(),
//   for a job that drops it (the main job's `--straggler drop` under
//   `weft run --elastic`: ElasticGroup::remove).
//
// Every rank computes the same plan from the same exchanged figures, so the
// shares are identical everywhere without further communication.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "weft/communicator.h"
#include "weft/host.h"

namespace weft::balance {

enum class Mode : uint8_t {
  None,     // equal shares, never changed
  Static,   // shares from the start-up probe, then fixed
  Dynamic,  // shares from the probe, re-planned from the live rates
};
// "none", "static", "dynamic".
std::string_view mode_name(Mode mode);
// Parses those names; throws weft::InvalidArgument listing them otherwise.
Mode parse_mode(std::string_view name);

// ---------------------------------------------------------------------------
// Share arithmetic and the planner (pure functions, the same on every rank)
// ---------------------------------------------------------------------------

// The weight of a worker's gradient when it computed the mean gradient over
// `share` samples of a step of `total` samples over `workers` workers:
// workers * share / total. With every worker's gradient so weighted, their
// average (ReduceOp::Avg) is the mean gradient of the `total` samples.
// 0 <= share <= total, total >= 1, workers >= 1, else weft::InvalidArgument.
double gradient_weight(int64_t share, int64_t total, int workers);

// Shares of `global_batch` proportional to `rates`, each at least
// `min_share`, summing to global_batch exactly (largest remainders). Rates
// must be finite and > 0 (sanitize_rates() first); global_batch >=
// rates.size() * min_share, min_share >= 1, else weft::InvalidArgument.
std::vector<int64_t> proportional_shares(std::span<const double> rates, int64_t global_batch,
                                         int64_t min_share);

// Measured rates made safe to plan with: a rate that is zero, negative,
// NaN or infinite is replaced by the median of the valid ones (by 1 when
// none is valid). `replaced` (optional) receives the indices replaced.
std::vector<double> sanitize_rates(std::span<const double> rates,
                                   std::vector<size_t>* replaced = nullptr);

struct PlannerOptions {
  int64_t global_batch = 0;  // samples per step over all workers, >= workers * min_share
  int64_t min_share = 1;     // no worker gets less (>= 1)
  // Fraction of the way from the current share to the target taken by the
  // first damped re-plan, in (0, 1]: 1 jumps at once, smaller values damp
  // noise. Later ones adapt it (replan(), PlannerState::gain) between a
  // quarter of it and 1.
  double damping = 0.5;
  // A share changes by at most this fraction of the mean share
  // (global_batch / workers), at least 1 sample, per re-plan (plus one
  // sample from rounding to whole samples), in (0, 1]. 0.4 covers the
  // move of a worker cut to a quarter of its speed (4 workers: 64 -> 16 of
  // 256) in two re-plans; 0.25 took three, and the follow missed 20 steps.
  double max_change = 0.4;
  // A re-plan whose largest change is below this fraction of the mean share
  // keeps the current shares (no churn from noise), in [0, 1).
  double deadband = 0.03;
  // When some worker's target is more than this fraction of the mean share
  // away from its share, every share moves all the way (still within
  // max_change) instead of `damping` of it: a gap that large is a change of
  // speed (a quota, a program started beside a worker), which damping would
  // only make the others wait out, while the noise of the rates stays below
  // it. > 0; 1 or more damps every move.
  double jump = 0.2;
};
// Checks the options for `workers` workers; throws weft::InvalidArgument
// naming the field otherwise.
void check_planner_options(const PlannerOptions& options, int workers);

// What one re-plan passes to the next (Plan::next); the default is the
// state before the first.
struct PlannerState {
  // The last re-plan that changed the shares: each share's change (empty:
  // none yet).
  std::vector<int64_t> last_move;
  // The fraction of the way that re-plan moved, in [0, 1]; 0: none yet
  // (PlannerOptions::damping).
  double gain = 0;
};

struct Plan {
  std::vector<int64_t> shares;  // sums to global_batch
  bool changed = false;         // differs from the current shares
  PlannerState next;            // to pass to the next replan()
  std::string reason;           // why (for the log): the rates and targets, or why kept
};
// One re-plan from `current` shares (one per worker, summing to the global
// batch, each >= min_share) toward proportional_shares(sanitize_rates(rates))
// as PlannerOptions says, adapting how far to move from `state` (the
// previous re-plan's Plan::next): further while the target moves on in the
// same direction, less when it turns back (planner.cc says how).
Plan replan(std::span<const int64_t> current, std::span<const double> rates,
            const PlannerOptions& options, const PlannerState& state = {});

// The samples/s a worker with a CPU quota sustains while its whole step
// (compute, its part of the collectives, the optimizer) uses at most
// `headroom` of the quota: headroom * quota_cores / cpu_seconds_per_sample,
// where cpu_seconds_per_sample is the process's CPU time over the samples it
// trained in the same interval. +infinity where there is no quota
// (quota_cores <= 0) or either figure is unknown (not finite, <= 0): no
// bound. headroom in (0, 1], else weft::InvalidArgument.
double quota_rate(double quota_cores, double cpu_seconds_per_sample, double headroom);

// Equal shares of global_batch over `workers` (the first global_batch %
// workers get one more).
std::vector<int64_t> equal_shares(int64_t global_batch, int workers);

// ---------------------------------------------------------------------------
// The balancer (one per rank, collective)
// ---------------------------------------------------------------------------

struct BalancerOptions {
  Mode mode = Mode::Dynamic;
  int64_t global_batch = 0;  // >= workers * planner.min_share
  PlannerOptions planner;    // its global_batch is set from the field above
  // Steps between exchanges of the workers' figures (and, in dynamic mode,
  // re-plans), >= 1.
  int64_t exchange_every = 5;
  // The first re-plan waits for this many measured steps (warm-up steps are
  // slower), >= 0.
  int64_t warmup_steps = 5;
  // Each worker's rate is its samples over its compute time in its most
  // recent steps that add up to at least this much of the job's wall time
  // (and at least exchange_every steps), the same steps on every worker:
  // long enough to see the duty cycle of a cgroup CPU quota (5 periods of
  // 100 ms), short enough to follow a change of speed within about that
  // time. In (0, 3600]. Measured with a worker's quota cut to a quarter and
  // restored (bench/balance.sh b): see BENCHMARKS.md, "Following a change".
  double rate_window_seconds = 0.5;
  // A worker with a cgroup CPU quota is planned at no more than quota_rate()
  // with this headroom: the fraction of its quota its whole step may use,
  // in (0, 1]. A worker planned to the edge of its quota runs out of it
  // inside the step, the kernel stops it for the rest of the period (up to
  // 75 ms of 100 at a quarter core), and every collective it takes part in
  // waits that out on every rank; with room left, it finishes its compute
  // and its part of the allreduce within its quota. The quota is read at
  // every exchange, so the bound follows a quota changed while training.
  double quota_headroom = 0.8;
  // A worker whose rate is below this fraction of the median rate is
  // reported as a straggler, in [0, 1).
  double straggler_floor = 0.1;
  // stragglers_to_drop() names a worker once it has been a straggler in
  // this many exchanges in a row (one slow window is not enough), >= 1.
  int drop_after = 3;
  // Where the monitor reads the process's use (CPU time, quota, memory,
  // throttling): sample_process() when empty. Tests pass their own.
  std::function<ProcessSample()> process_sampler;
};

// One worker's figures, as every rank sees them after an exchange.
struct WorkerFigures {
  int rank = 0;
  std::string host;
  int64_t share = 0;  // samples per step now
  double rate = 0;    // samples/s of compute over the last window
  double compute_seconds_per_sample = 0;
  double wait_seconds_per_step = 0;  // blocked on communication (mean of the window)
  double cpu_utilization = 0;        // process CPU time / wall time (1 = one core)
  uint64_t rss_bytes = 0;
  double throttled_fraction = 0;  // of the window spent throttled by a cgroup quota
  double cpu_quota_cores = 0;     // its cgroup CPU quota now, 0: none
  // Process CPU seconds per sample trained since the last exchange (all its
  // threads: compute, communication, optimizer), 0 where unknown.
  double cpu_seconds_per_sample = 0;
  // What its quota sustains (quota_rate()), 0 where it has no quota.
  double quota_rate = 0;
  // Planned at quota_rate instead of its measured rate, which was higher.
  bool quota_bound = false;
  double gpu_utilization = -1;  // 0..1, -1 where no GPU is seen
  // Resident memory over the cgroup memory limit, 0 where there is none.
  double memory_pressure = 0;
  // Near its memory limit (memory_pressure >= 0.9): planned at half its
  // rate, so that its share falls.
  bool shedding = false;
  bool straggler = false;
  // Exchanges in a row, up to this one, in which it was a straggler.
  int straggler_exchanges = 0;
};

// One re-plan decision, as logged.
struct Decision {
  int64_t step = 0;
  std::vector<int64_t> old_shares, new_shares;
  std::string reason;
};

struct StepTimes {
  double compute_seconds = 0;  // forward + backward of this worker's samples
  double wait_seconds = 0;     // blocked on communication in the step
  int64_t samples = -1;        // samples this worker computed; -1: its share
};

class Balancer {
 public:
  // Collective: exchanges every worker's host facts. Throws
  // weft::InvalidArgument for bad options (on every rank alike).
  Balancer(std::shared_ptr<Communicator> comm, BalancerOptions options);
  ~Balancer();
  Balancer(const Balancer&) = delete;
  Balancer& operator=(const Balancer&) = delete;

  // The capability probe, collective. Runs `step(batch)` (the user's
  // forward and backward on `batch` samples; no collective inside) once to
  // warm up, then `repeats` times, timed; the median gives this worker's
  // rate. In Static and Dynamic modes the shares become proportional to the
  // rates. A worker whose probe throws or measures an absurd rate (zero,
  // negative, NaN) is reported and given the median rate of the others; if
  // no worker measured a rate, the shares stay equal. Logged either way.
  void probe(const std::function<void(int64_t batch)>& step, int64_t batch, int repeats = 3);

  // The shares of the next step, one per worker (the same on every rank).
  const std::vector<int64_t>& shares() const { return shares_; }
  int64_t share() const { return shares_[static_cast<size_t>(rank_)]; }

  // Every rank, after every step: records the step's times; every
  // exchange_every steps exchanges the figures (allgather), reports
  // stragglers and, in Dynamic mode after the warm-up, re-plans. Returns
  // true when the shares changed. Collective on exchange steps.
  bool end_step(const StepTimes& times);

  // The figures of every worker as of the last exchange (empty before it).
  const std::vector<WorkerFigures>& workers() const { return workers_; }
  // Every worker's host facts (exchanged at construction).
  const std::vector<HostFacts>& hosts() const { return hosts_; }
  const std::vector<Decision>& decisions() const { return decisions_; }
  // The workers that have been stragglers in the last drop_after exchanges,
  // slowest first, at most `max` of them (none when max <= 0): the same on
  // every rank, since every rank judges the same exchanged figures.
  std::vector<int> stragglers_to_drop(int max) const;
  const BalancerOptions& options() const { return options_; }
  int64_t steps() const { return steps_; }

 private:
  struct Window;
  void exchange();

  std::shared_ptr<Communicator> comm_;
  BalancerOptions options_;
  int rank_ = 0;
  int size_ = 1;
  std::vector<int64_t> shares_;
  std::vector<HostFacts> hosts_;
  std::vector<WorkerFigures> workers_;
  std::vector<Decision> decisions_;
  PlannerState planner_state_;  // carried from one re-plan to the next
  std::unique_ptr<Window> window_;
  int64_t steps_ = 0;
  int64_t measured_steps_ = 0;
};

}  // namespace weft::balance
