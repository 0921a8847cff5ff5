// A small elastic training job without a tensor library, for the chaos
// tests: linear regression on synthetic samples with weft::DataParallel, the
// shard queue handing out each epoch, ElasticGroup and ElasticState keeping
// it going across failures and joins.
//
//   weft run -n 3 --elastic 2:3 --max-restarts 2 -- elastic_worker --epochs 3
//
// The committed state carries a ledger: how many times each sample was
// trained (counted from every worker's hand-out of each completed step). At
// the end of every epoch rank 0 prints one JSON line with the ledger's
// verdict ("exactly_once": every sample counted epoch+1 times), and at the
// end {"done": true, ...} with the final weights and loss.
//
// Faults on request, for tests: --die-member M --die-at-step S makes the
// worker(s) whose WEFT_MEMBER is M (repeatable) kill themselves (SIGKILL) at
// global step S; --stop-member/--stop-at-step stops one (SIGSTOP) instead.
// Load: --step-ms sleeps and --busy-ms spins per step; --ballast-floats N
// adds a parameter of N floats whose (zero) gradient is allreduced with every
// step, as a larger model's would be, and never trained or committed.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstring>
#include <ctime>
#include <thread>
#include <utility>

#include "weft/elastic.h"
#include "weft/elastic_state.h"
#include "weft/errors.h"
#include "weft/shard_queue.h"
#include "weft/train.h"

namespace {

constexpr int kDim = 8;

struct Args {
  int64_t samples = 3000;
  int64_t global_batch = 48;
  int epochs = 3;
  int64_t commit_every = 1;
  double lr = 0.05;
  double step_ms = 0;          // extra compute time per step (to make steps last)
  double busy_ms = 0;          // CPU time spun per step (a worker held by a CPU quota takes longer)
  int64_t ballast_floats = 0;  // a second parameter, allreduced every step, never trained
  std::vector<std::string> die_members;
  std::string stop_member;
  int64_t die_at = -1, stop_at = -1;
};

// Sample i: features from a fixed formula, target from fixed weights.
float feature(int64_t i, int j) {
  return static_cast<float>(std::sin(0.37 * static_cast<double>(i + 1) * (j + 1)));
}
float target(int64_t i) {
  float y = 0;
  for (int j = 0; j < kDim; ++j) y += static_cast<float>(j + 1) * 0.1f * feature(i, j);
  return y;
}

// Spins until this thread has used `ms` of CPU time (not wall time: under a
// CPU quota it takes as long as the quota makes it).
void spin_cpu(double ms) {
  auto cpu = [] {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) * 1e-6;
  };
  const double until = cpu() + ms;
  volatile uint64_t x = 0;
  while (cpu() < until) {
    for (int i = 0; i < 1000; ++i) x = x + 1;
  }
}

template <typename T>
void put(std::vector<std::byte>& out, const T* p, size_t n) {
  const auto* b = reinterpret_cast<const std::byte*>(p);
  out.insert(out.end(), b, b + n * sizeof(T));
}
template <typename T>
void get(std::span<const std::byte>& in, T* p, size_t n) {
  if (in.size() < n * sizeof(T)) throw weft::DataError("elastic_worker: short state image");
  std::memcpy(p, in.data(), n * sizeof(T));
  in = in.subspan(n * sizeof(T));
}

int run(const Args& a) {
  auto group = weft::ElasticGroup::from_env();
  auto comm = group->join();
  if (!comm) return 0;  // the job finished before this worker joined
  const std::string member = group->member();

  std::vector<float> w(kDim, 0.0f), g(kDim, 0.0f);
  int64_t step = 0, epoch = 0;
  std::vector<int32_t> counts(static_cast<size_t>(a.samples), 0);
  weft::data::ShardQueue queue(a.samples, comm->size(), {.shard_samples = 16, .seed = 3});

  std::vector<weft::train::Parameter> params{
      {"w", weft::DType::Float32, {kDim}, w.data(), g.data()}};
  // Ballast: gradient traffic of a larger model (zeros), to load the links.
  std::vector<float> ballast(static_cast<size_t>(a.ballast_floats), 0.0f);
  std::vector<float> ballast_grad(ballast.size(), 0.0f);
  if (a.ballast_floats > 0) {
    params.push_back(
        {"ballast", weft::DType::Float32, {a.ballast_floats}, ballast.data(), ballast_grad.data()});
  }
  weft::train::DataParallel engine(comm, params);

  auto save = [&] {
    std::vector<std::byte> out;
    put(out, w.data(), w.size());
    put(out, &step, 1);
    put(out, &epoch, 1);
    put(out, counts.data(), counts.size());
    const std::string q = queue.serialize();
    put(out, q.data(), q.size());
    return out;
  };
  auto load = [&](std::span<const std::byte> in) {
    get(in, w.data(), w.size());
    get(in, &step, 1);
    get(in, &epoch, 1);
    get(in, counts.data(), counts.size());
    queue = weft::data::ShardQueue::deserialize(
        std::string_view(reinterpret_cast<const char*>(in.data()), in.size()));
  };
  weft::train::ElasticState state(save, load);
  // After every membership change: the newest commit everywhere, the
  // queue's pools back to todo for the new workers, the engine on the new
  // communicator.
  auto resync = [&] {
    if (queue.step_open()) queue.abandon_step();
    // The engine meets the new generation first (a joiner's engine was just
    // built on it: the same calls), then the newest commit is restored.
    if (&engine.communicator() != comm.get()) engine.rebind(comm);
    const int64_t at = state.restore(*comm);
    queue.regroup(comm->size());
    engine.set_step(step);
    if (comm->rank() == 0) {
      fmt::print(
          "{{\"event\": \"membership\", \"generation\": {}, \"workers\": {}, "
          "\"restored_commit\": {}, \"step\": {}, \"epoch\": {}}}\n",
          group->generation(), comm->size(), at, step, epoch);
      std::fflush(stdout);
    }
  };
  resync();
  if (state.last_id() < 0) state.commit(*comm, 0);

  // A failure during the recovery itself (the next generation fails while
  // it restores) is recovered from like any other.
  std::exception_ptr failure;
  for (;;) {
    try {
      if (failure) {
        comm = group->recover(std::exchange(failure, nullptr));
        if (!comm) throw weft::Error("elastic_worker: no generation could be formed");
        resync();
      }
      while (epoch < a.epochs) {
        if (queue.epoch() != epoch) queue.start_epoch(epoch);
        while (!queue.epoch_done()) {
          if (step == a.die_at && std::find(a.die_members.begin(), a.die_members.end(), member) !=
                                      a.die_members.end()) {
            ::raise(SIGKILL);
          }
          if (member == a.stop_member && step == a.stop_at) ::raise(SIGSTOP);
          const int world = comm->size();
          std::vector<int64_t> want(static_cast<size_t>(world), a.global_batch / world);
          for (int64_t k = 0; k < a.global_batch % world; ++k) ++want[static_cast<size_t>(k)];
          const auto takes = queue.take_step(want);
          int64_t total = 0;
          for (const auto& t : takes) total += static_cast<int64_t>(t.size());
          const auto& mine = takes[static_cast<size_t>(comm->rank())];
          std::fill(g.begin(), g.end(), 0.0f);
          for (int64_t i : mine) {
            float pred = 0;
            for (int j = 0; j < kDim; ++j) pred += w[static_cast<size_t>(j)] * feature(i, j);
            const float err = pred - target(i);
            for (int j = 0; j < kDim; ++j) g[static_cast<size_t>(j)] += err * feature(i, j);
          }
          if (!mine.empty()) {
            for (float& x : g) x /= static_cast<float>(mine.size());
          }
          if (a.step_ms > 0)
            std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(a.step_ms));
          if (a.busy_ms > 0) spin_cpu(a.busy_ms);
          // Weighted so that the average is the gradient of the whole step.
          engine.set_gradient_weight(total > 0 ? static_cast<double>(mine.size()) * world /
                                                     static_cast<double>(total)
                                               : 0.0);
          engine.grad_ready(0);
          if (a.ballast_floats > 0) engine.grad_ready(1);
          engine.end_step();
          for (int j = 0; j < kDim; ++j) {
            w[static_cast<size_t>(j)] -= static_cast<float>(a.lr) * g[static_cast<size_t>(j)];
          }
          queue.complete_step();
          for (const auto& t : takes) {
            for (int64_t i : t) ++counts[static_cast<size_t>(i)];
          }
          ++step;
          if (step % a.commit_every == 0) {
            state.commit(*comm, 2 * step);
            if (group->joins_pending()) {
              comm = group->admit();
              if (!comm) throw weft::Error("elastic_worker: admit formed no generation");
              resync();
            }
          }
        }
        int64_t wrong = 0;
        for (int32_t c : counts) wrong += c != epoch + 1;
        if (comm->rank() == 0) {
          fmt::print(
              "{{\"ledger_epoch\": {}, \"exactly_once\": {}, \"samples\": {}, "
              "\"wrong\": {}, \"generation\": {}, \"workers\": {}}}\n",
              epoch, wrong == 0 ? "true" : "false", a.samples, wrong, group->generation(),
              comm->size());
          std::fflush(stdout);
        }
        ++epoch;
        state.commit(*comm, 2 * step + 1);  // after the step's own commit, 2 * step
      }
      break;
    } catch (const weft::Error& e) {
      if (!weft::ElasticGroup::recoverable(e)) throw;
      failure = std::current_exception();
    }
  }
  double loss = 0;
  for (int64_t i = 0; i < a.samples; ++i) {
    float pred = 0;
    for (int j = 0; j < kDim; ++j) pred += w[static_cast<size_t>(j)] * feature(i, j);
    loss += std::pow(pred - target(i), 2);
  }
  loss /= static_cast<double>(a.samples);
  if (comm->rank() == 0) {
    fmt::print(
        "{{\"done\": true, \"loss\": {:.6f}, \"steps\": {}, \"generation\": {}, "
        "\"workers\": {}, \"changes\": {}}}\n",
        loss, step, group->generation(), comm->size(), group->changes().size());
    std::fflush(stdout);
  }
  group->finish();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"elastic training test job (under weft run --elastic)"};
  Args a;
  app.add_option("--samples", a.samples)->check(CLI::Range(int64_t{1}, int64_t{1} << 24));
  app.add_option("--global-batch", a.global_batch)->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--epochs", a.epochs)->check(CLI::Range(1, 1000));
  app.add_option("--commit-every", a.commit_every)->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  app.add_option("--lr", a.lr);
  app.add_option("--step-ms", a.step_ms)->check(CLI::Range(0.0, 60000.0));
  app.add_option("--busy-ms", a.busy_ms, "CPU time spun per step")->check(CLI::Range(0.0, 60000.0));
  app.add_option("--ballast-floats", a.ballast_floats,
                 "A second parameter of this many floats, allreduced every step (link load)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 26));
  app.add_option("--die-member", a.die_members, "Member(s) that kill themselves at --die-at-step");
  app.add_option("--die-at-step", a.die_at);
  app.add_option("--stop-member", a.stop_member);
  app.add_option("--stop-at-step", a.stop_at);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  try {
    return run(a);
  } catch (const std::exception& e) {
    fmt::print(stderr, "elastic_worker: error: {}\n", e.what());
    return 1;
  }
}
