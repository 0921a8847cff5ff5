// The balancer of weft/balance.h: the capability probe, the per-step
// measurements, the exchange of every worker's figures and the re-plans.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <exception>
#include <nlohmann/json.hpp>

#include "balance/median.h"
#include "core/log.h"
#include "weft/balance.h"
#include "weft/errors.h"

namespace weft::balance {
namespace {

using Clock = std::chrono::steady_clock;

// The figures one worker contributes to an exchange, as doubles.
enum Field : size_t {
  kShare,
  kRate,
  kWait,
  kCpu,
  kRss,
  kThrottled,
  kGpu,
  kMemoryPressure,
  kQuota,
  kCpuPerSample,
  kFields
};

// Host facts travel as JSON of at most this many bytes per worker (the
// strings in them are cut to kMaxText characters).
constexpr size_t kMaxHostBytes = 16 << 10;
constexpr size_t kMaxText = 200;

// A worker whose resident memory is this close to its cgroup limit sheds
// work: the planner sees its rate halved (smaller batches need less
// activation memory).
constexpr double kMemoryPressureShed = 0.9;

std::string cut(std::string s) {
  if (s.size() > kMaxText) s.resize(kMaxText);
  return s;
}

std::string host_to_json(const HostFacts& h) {
  nlohmann::json gpus = nlohmann::json::array();
  for (const GpuFacts& g : h.gpus) {
    if (gpus.size() >= 16) break;
    gpus.push_back({{"index", g.index}, {"name", cut(g.name)}, {"memory", g.memory_total_bytes}});
  }
  nlohmann::json j = {{"hostname", cut(h.hostname)},
                      {"cpu_model", cut(h.cpu_model)},
                      {"cpus_online", h.cpus_online},
                      {"cpus_usable", h.cpus_usable},
                      {"cpu_quota_cores", h.cpu_quota_cores},
                      {"memory_total", h.memory_total_bytes},
                      {"memory_available", h.memory_available_bytes},
                      {"memory_limit", h.memory_limit_bytes},
                      {"gpus", gpus},
                      {"gpu_note", cut(h.gpu_note)}};
  return j.dump();
}

HostFacts host_from_json(const std::string& text) {
  HostFacts h;
  const auto j = nlohmann::json::parse(text);
  h.hostname = j.at("hostname").get<std::string>();
  h.cpu_model = j.at("cpu_model").get<std::string>();
  h.cpus_online = j.at("cpus_online").get<int>();
  h.cpus_usable = j.at("cpus_usable").get<int>();
  h.cpu_quota_cores = j.at("cpu_quota_cores").get<double>();
  h.memory_total_bytes = j.at("memory_total").get<uint64_t>();
  h.memory_available_bytes = j.at("memory_available").get<uint64_t>();
  h.memory_limit_bytes = j.at("memory_limit").get<uint64_t>();
  for (const auto& g : j.at("gpus")) {
    h.gpus.push_back(GpuFacts{.index = g.at("index").get<int>(),
                              .name = g.at("name").get<std::string>(),
                              .memory_total_bytes = g.at("memory").get<uint64_t>()});
  }
  h.gpu_note = j.at("gpu_note").get<std::string>();
  return h;
}

std::string shares_text(std::span<const int64_t> s) { return fmt::format("{}", fmt::join(s, " ")); }

void check_options(const BalancerOptions& o, int workers) {
  PlannerOptions p = o.planner;
  p.global_batch = o.global_batch;
  check_planner_options(p, workers);
  if (o.exchange_every < 1) {
    throw InvalidArgument(fmt::format("exchange_every {} is not >= 1", o.exchange_every));
  }
  if (o.warmup_steps < 0) {
    throw InvalidArgument(fmt::format("warmup_steps {} is negative", o.warmup_steps));
  }
  if (!(o.rate_window_seconds > 0 && o.rate_window_seconds <= 3600)) {
    throw InvalidArgument(
        fmt::format("rate_window_seconds {} is not in (0, 3600]", o.rate_window_seconds));
  }
  if (!(o.quota_headroom > 0 && o.quota_headroom <= 1)) {
    throw InvalidArgument(fmt::format("quota_headroom {} is not in (0, 1]", o.quota_headroom));
  }
  if (!(o.straggler_floor >= 0 && o.straggler_floor < 1)) {
    throw InvalidArgument(fmt::format("straggler_floor {} is not in [0, 1)", o.straggler_floor));
  }
  if (o.drop_after < 1) {
    throw InvalidArgument(fmt::format("drop_after {} is not >= 1", o.drop_after));
  }
}

ProcessSample sample_of(const BalancerOptions& o) {
  return o.process_sampler ? o.process_sampler() : sample_process();
}

}  // namespace

// The measurements since the last exchange (wait, process use), and the
// recent measured steps the rate is computed from.
//
// The rate is samples over compute time summed over the recent steps that
// make up at least rate_window_seconds of the job's time (wall time per
// step), not a median of per-step rates nor the last few steps alone: a CPU
// quota (CFS) lets a process run at full speed for its quota and then stops
// it for the rest of the period (100 ms by default), so with steps shorter
// than that most steps look fast and a few very slow; only sums over
// several periods see the duty cycle. The window is measured in wall time,
// not in the worker's own compute time, so that it holds the same steps on
// every worker: a worker with a small share computes for a small part of
// each step, and a window of its compute time would reach back over many
// exchanges, slow steps from before a speed-up included. The window slides,
// so a change of speed shows within about rate_window_seconds.
struct Balancer::Window {
  struct Step {
    int64_t samples;
    double compute;
    double wall;
  };
  std::deque<Step> recent;  // measured steps, oldest first
  int64_t samples = 0;      // sums over `recent`
  double compute_sum = 0;   // seconds
  double wall_sum = 0;
  Clock::time_point last_end{};  // end of the previous step (or of the probe)
  double wait_sum = 0;
  int64_t steps = 0;
  // Samples trained since `since` (every step, warm-up too), for the CPU
  // time per sample over the same interval.
  int64_t interval_samples = 0;
  ProcessSample since;
};

Balancer::Balancer(std::shared_ptr<Communicator> comm, BalancerOptions options)
    : comm_(std::move(comm)), options_(std::move(options)) {
  if (!comm_) throw InvalidArgument("Balancer: null communicator");
  rank_ = comm_->rank();
  size_ = comm_->size();
  options_.planner.global_batch = options_.global_batch;
  // Every rank checks its own options; then all agree that the options are
  // the same (a mismatch would make the ranks plan different shares).
  std::string problem;
  try {
    check_options(options_, size_);
  } catch (const InvalidArgument& e) {
    problem = e.what();
  }
  // (The planner's and the straggler options too: every rank must plan the
  // same shares and name the same workers to drop.)
  const PlannerOptions& po = options_.planner;
  const std::vector<std::pair<const char*, double>> agreed = {
      {"global batch", static_cast<double>(options_.global_batch)},
      {"mode", static_cast<double>(options_.mode)},
      {"exchange every", static_cast<double>(options_.exchange_every)},
      {"straggler floor", options_.straggler_floor},
      {"quota headroom", options_.quota_headroom},
      {"drop after", static_cast<double>(options_.drop_after)},
      {"minimum share", static_cast<double>(po.min_share)},
      {"damping", po.damping},
      {"max change", po.max_change},
      {"dead band", po.deadband},
      {"jump", po.jump}};
  const size_t fields = agreed.size() + 1;
  std::vector<double> mine{problem.empty() ? 0.0 : 1.0};
  for (const auto& [name, value] : agreed) mine.push_back(value);
  std::vector<double> all(fields * static_cast<size_t>(size_));
  comm_->allgather(ConstBuffer(mine.data(), fields, DType::Float64),
                   Buffer(all.data(), all.size(), DType::Float64));
  if (!problem.empty()) throw InvalidArgument("Balancer: " + problem);
  for (int r = 0; r < size_; ++r) {
    const double* o = &all[fields * static_cast<size_t>(r)];
    if (o[0] != 0) throw InvalidArgument(fmt::format("Balancer: rank {} has bad options", r));
    std::string differ;
    for (size_t k = 0; k < agreed.size(); ++k) {
      if (o[k + 1] == mine[k + 1]) continue;
      const bool mode = k == 1;
      differ += fmt::format(
          "{}{} {} vs {}", differ.empty() ? "" : ", ", agreed[k].first,
          mode ? std::string(mode_name(static_cast<Mode>(o[k + 1]))) : fmt::format("{}", o[k + 1]),
          mode ? std::string(mode_name(options_.mode)) : fmt::format("{}", mine[k + 1]));
    }
    if (!differ.empty()) {
      throw InvalidArgument(
          fmt::format("Balancer: rank {} has other options than rank {} ({}): every rank must "
                      "pass the same",
                      r, rank_, differ));
    }
  }
  shares_ = equal_shares(options_.global_batch, size_);

  // Host facts, exchanged as JSON of bounded size.
  std::string text = host_to_json(probe_host());
  if (text.size() > kMaxHostBytes) text = host_to_json(HostFacts{.hostname = "(facts too long)"});
  const int64_t len = static_cast<int64_t>(text.size());
  std::vector<int64_t> lens(static_cast<size_t>(size_));
  comm_->allgather(ConstBuffer(&len, 1, DType::Int64),
                   Buffer(lens.data(), lens.size(), DType::Int64));
  std::vector<size_t> counts;
  size_t total = 0;
  for (int64_t l : lens) {
    if (l < 0 || static_cast<size_t>(l) > kMaxHostBytes) {
      throw CommError(fmt::format("Balancer: a worker announced {} bytes of host facts", l));
    }
    counts.push_back(static_cast<size_t>(l));
    total += static_cast<size_t>(l);
  }
  std::string all_text(total, '\0');
  comm_->allgatherv(ConstBuffer(text.data(), text.size(), DType::UInt8),
                    Buffer(all_text.data(), all_text.size(), DType::UInt8), counts);
  size_t at = 0;
  for (int r = 0; r < size_; ++r) {
    try {
      hosts_.push_back(host_from_json(all_text.substr(at, counts[static_cast<size_t>(r)])));
    } catch (const std::exception& e) {
      WEFT_WARN("balance: host facts of rank {} unreadable ({})", r, e.what());
      hosts_.push_back(HostFacts{.hostname = "?"});
    }
    at += counts[static_cast<size_t>(r)];
  }
  if (rank_ == 0) {
    for (int r = 0; r < size_; ++r) {
      WEFT_INFO("balance: rank {}: {}", r, hosts_[static_cast<size_t>(r)].describe());
    }
  }
  window_ = std::make_unique<Window>();
  window_->since = sample_of(options_);
  window_->last_end = Clock::now();
}

Balancer::~Balancer() = default;

void Balancer::probe(const std::function<void(int64_t)>& step, int64_t batch, int repeats) {
  if (batch < 1 || repeats < 1) {
    throw InvalidArgument(
        fmt::format("Balancer::probe: batch {} and repeats {} must both be >= 1", batch, repeats));
  }
  double rate = std::nan("");
  std::string failure;
  try {
    step(batch);  // warm-up: first-touch allocations, caches
    std::vector<double> times;
    for (int i = 0; i < repeats; ++i) {
      const auto t0 = Clock::now();
      step(batch);
      times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    rate = static_cast<double>(batch) / median(times);
  } catch (const std::exception& e) {
    failure = e.what();
  }
  if (!failure.empty()) {
    WEFT_ERROR("balance: the capability probe failed on this worker: {}", failure);
  }
  std::vector<double> rates(static_cast<size_t>(size_));
  comm_->allgather(ConstBuffer(&rate, 1, DType::Float64),
                   Buffer(rates.data(), rates.size(), DType::Float64));
  std::vector<size_t> replaced;
  const std::vector<double> safe = sanitize_rates(rates, &replaced);
  workers_.assign(static_cast<size_t>(size_), WorkerFigures{});
  for (int r = 0; r < size_; ++r) {
    auto& w = workers_[static_cast<size_t>(r)];
    w.rank = r;
    w.host = hosts_[static_cast<size_t>(r)].hostname;
    w.rate = rates[static_cast<size_t>(r)];
    w.compute_seconds_per_sample = 1.0 / safe[static_cast<size_t>(r)];
  }
  std::string why;
  if (replaced.size() == static_cast<size_t>(size_)) {
    why = "no worker gave a usable rate: shares stay equal";
  } else if (options_.mode == Mode::None) {
    why = fmt::format("probe rates [{:.1f}] samples/s; --balance none keeps equal shares",
                      fmt::join(rates, " "));
  } else {
    const std::vector<int64_t> old = shares_;
    shares_ = proportional_shares(safe, options_.global_batch, options_.planner.min_share);
    why = fmt::format("probe rates [{:.1f}] samples/s give shares in proportion",
                      fmt::join(rates, " "));
    if (!replaced.empty()) {
      why += fmt::format("; worker(s) {} gave no usable rate and were taken at the median",
                         fmt::join(replaced, ","));
    }
    decisions_.push_back(Decision{steps_, old, shares_, why});
  }
  for (int r = 0; r < size_; ++r)
    workers_[static_cast<size_t>(r)].share = shares_[static_cast<size_t>(r)];
  // The probe's own steps are no part of the first interval's CPU per sample.
  window_->since = sample_of(options_);
  window_->interval_samples = 0;
  window_->last_end = Clock::now();
  if (rank_ == 0) WEFT_INFO("balance: initial shares [{}]: {}", shares_text(shares_), why);
}

bool Balancer::end_step(const StepTimes& t) {
  ++steps_;
  const int64_t samples = t.samples >= 0 ? t.samples : share();
  // The step's wall time: from the end of the previous one, and at least
  // its compute and wait (which a caller that measures them has timed).
  const auto end = Clock::now();
  double wall = std::chrono::duration<double>(end - window_->last_end).count();
  window_->last_end = end;
  const double wait = std::isfinite(t.wait_seconds) && t.wait_seconds > 0 ? t.wait_seconds : 0;
  if (std::isfinite(t.compute_seconds) && t.compute_seconds > 0) {
    wall = std::max(wall, t.compute_seconds + wait);
  }
  if (steps_ > options_.warmup_steps && samples > 0 && t.compute_seconds > 0 &&
      std::isfinite(t.compute_seconds)) {
    Window& w = *window_;
    w.recent.push_back({samples, t.compute_seconds, wall});
    w.samples += samples;
    w.compute_sum += t.compute_seconds;
    w.wall_sum += wall;
    // Drop the oldest steps while the rest still cover the rate window and
    // at least one exchange interval.
    while (w.recent.size() > static_cast<size_t>(options_.exchange_every) &&
           w.wall_sum - w.recent.front().wall >= options_.rate_window_seconds) {
      w.samples -= w.recent.front().samples;
      w.compute_sum -= w.recent.front().compute;
      w.wall_sum -= w.recent.front().wall;
      w.recent.pop_front();
    }
    ++measured_steps_;
  }
  window_->wait_sum += wait;
  window_->steps += 1;
  if (samples > 0) window_->interval_samples += samples;
  if (steps_ % options_.exchange_every != 0) return false;
  const std::vector<int64_t> before = shares_;
  exchange();
  return shares_ != before;
}

std::vector<int> Balancer::stragglers_to_drop(int max) const {
  std::vector<const WorkerFigures*> slow;
  for (const auto& w : workers_) {
    if (w.straggler && w.straggler_exchanges >= options_.drop_after) slow.push_back(&w);
  }
  std::stable_sort(slow.begin(), slow.end(), [](const WorkerFigures* a, const WorkerFigures* b) {
    return a->rate < b->rate;
  });
  std::vector<int> out;
  for (const auto* w : slow) {
    if (static_cast<int>(out.size()) >= max) break;
    out.push_back(w->rank);
  }
  return out;
}

void Balancer::exchange() {
  const ProcessSample now = sample_of(options_);
  const Usage use = usage_between(window_->since, now);
  std::vector<double> mine(kFields, 0.0);
  mine[kShare] = static_cast<double>(share());
  mine[kRate] = window_->compute_sum > 0
                    ? static_cast<double>(window_->samples) / window_->compute_sum
                    : std::nan("");  // nothing measured in this window
  mine[kWait] = window_->steps > 0 ? window_->wait_sum / static_cast<double>(window_->steps) : 0;
  mine[kCpu] = use.cpu_utilization;
  mine[kRss] = static_cast<double>(use.rss_bytes);
  mine[kThrottled] = use.throttled_fraction;
  mine[kGpu] = use.gpu_utilization;
  mine[kMemoryPressure] = use.memory_pressure;
  mine[kQuota] = use.cpu_quota_cores;
  mine[kCpuPerSample] = window_->interval_samples > 0 && use.cpu_seconds > 0
                            ? use.cpu_seconds / static_cast<double>(window_->interval_samples)
                            : 0;
  std::vector<double> all(kFields * static_cast<size_t>(size_));
  comm_->allgather(ConstBuffer(mine.data(), mine.size(), DType::Float64),
                   Buffer(all.data(), all.size(), DType::Float64));
  window_->wait_sum = 0;
  window_->steps = 0;
  window_->interval_samples = 0;
  window_->since = now;

  std::vector<double> rates(static_cast<size_t>(size_));
  std::vector<double> plan_rates(static_cast<size_t>(size_));
  std::vector<WorkerFigures> figures(static_cast<size_t>(size_));
  std::vector<int> shedding;
  std::string quota_bound;  // for the log
  for (int r = 0; r < size_; ++r) {
    const double* f = &all[kFields * static_cast<size_t>(r)];
    auto& w = figures[static_cast<size_t>(r)];
    w.rank = r;
    w.host = hosts_[static_cast<size_t>(r)].hostname;
    w.share = static_cast<int64_t>(f[kShare]);
    w.rate = f[kRate];
    w.compute_seconds_per_sample = std::isfinite(f[kRate]) && f[kRate] > 0 ? 1.0 / f[kRate] : 0;
    w.wait_seconds_per_step = f[kWait];
    w.cpu_utilization = f[kCpu];
    w.rss_bytes = std::isfinite(f[kRss]) && f[kRss] > 0 ? static_cast<uint64_t>(f[kRss]) : 0;
    w.throttled_fraction = f[kThrottled];
    w.gpu_utilization = f[kGpu];
    w.memory_pressure = std::isfinite(f[kMemoryPressure]) ? f[kMemoryPressure] : 0;
    w.shedding = w.memory_pressure >= kMemoryPressureShed;
    rates[static_cast<size_t>(r)] = f[kRate];
    plan_rates[static_cast<size_t>(r)] = f[kRate];
    if (w.shedding) {
      plan_rates[static_cast<size_t>(r)] = f[kRate] / 2;
      shedding.push_back(r);
    }
    w.cpu_quota_cores = std::isfinite(f[kQuota]) && f[kQuota] > 0 ? f[kQuota] : 0;
    w.cpu_seconds_per_sample =
        std::isfinite(f[kCpuPerSample]) && f[kCpuPerSample] > 0 ? f[kCpuPerSample] : 0;
    const double bound =
        quota_rate(w.cpu_quota_cores, w.cpu_seconds_per_sample, options_.quota_headroom);
    if (std::isfinite(bound)) {
      w.quota_rate = bound;
      // Only a measured rate is bounded: one absent from this window is
      // taken at the median by the planner, as before.
      double& plan = plan_rates[static_cast<size_t>(r)];
      if (std::isfinite(plan) && plan > bound) {
        plan = bound;
        w.quota_bound = true;
        quota_bound += fmt::format(
            "{}rank {} at {:.1f} samples/s ({:.2f} cores x {:.0f}% / {:.2f} ms CPU per sample)",
            quota_bound.empty() ? "" : ", ", r, bound, w.cpu_quota_cores,
            options_.quota_headroom * 100, w.cpu_seconds_per_sample * 1e3);
      }
    }
  }
  // Stragglers: below the floor of the median rate.
  const double med = median([&] {
    std::vector<double> v;
    for (double r : rates) {
      if (std::isfinite(r) && r > 0) v.push_back(r);
    }
    return v;
  }());
  for (auto& w : figures) {
    w.straggler = std::isfinite(med) && std::isfinite(w.rate) && w.rate > 0 &&
                  w.rate < options_.straggler_floor * med;
    const bool was = !workers_.empty() && workers_[static_cast<size_t>(w.rank)].straggler;
    w.straggler_exchanges =
        w.straggler ? (was ? workers_[static_cast<size_t>(w.rank)].straggler_exchanges : 0) + 1 : 0;
    if (rank_ == 0 && w.straggler != was) {
      if (w.straggler) {
        WEFT_WARN(
            "balance: rank {} ({}) is a straggler: {:.1f} samples/s, below {:.0f}% of the median "
            "{:.1f} (CPU {:.0f}%, throttled {:.0f}% of the time)",
            w.rank, w.host, w.rate, options_.straggler_floor * 100, med, w.cpu_utilization * 100,
            w.throttled_fraction * 100);
      } else {
        WEFT_INFO("balance: rank {} ({}) is no longer a straggler ({:.1f} samples/s)", w.rank,
                  w.host, w.rate);
      }
    }
  }
  workers_ = std::move(figures);

  if (options_.mode != Mode::Dynamic || measured_steps_ == 0) return;
  // Every rank plans from the same exchanged figures, so all get the same
  // shares. A worker that measured nothing in the window (NaN) is taken at
  // the median (sanitize_rates inside replan).
  const Plan plan = replan(shares_, plan_rates, options_.planner, planner_state_);
  planner_state_ = plan.next;
  if (!plan.changed) {
    WEFT_DEBUG("balance: step {}: {}", steps_, plan.reason);
    return;
  }
  std::string why = plan.reason;
  if (!quota_bound.empty()) {
    why += fmt::format("; planned at what the CPU quota sustains: {}", quota_bound);
  }
  if (!shedding.empty()) {
    why += fmt::format("; rank(s) {} shed work: resident memory at {:.0f}%+ of the cgroup limit",
                       fmt::join(shedding, ","), kMemoryPressureShed * 100);
  }
  decisions_.push_back(Decision{steps_, shares_, plan.shares, why});
  if (rank_ == 0) {
    WEFT_INFO("balance: step {}: shares [{}] -> [{}]: {}", steps_, shares_text(shares_),
              shares_text(plan.shares), why);
  }
  shares_ = plan.shares;
  for (auto& w : workers_) w.share = shares_[static_cast<size_t>(w.rank)];
}

}  // namespace weft::balance
