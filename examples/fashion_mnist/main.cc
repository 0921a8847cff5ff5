// Fashion-MNIST, data-parallel: the main job of the project (`make demo`).
//
//   weft run -n 4 build/bin/fashion_mnist --epochs 5
//
// Every worker trains a replica of the CNN of
// ../shared/anchors/torch_ddp_fmnist.py (conv 1->32 3x3 + pool, conv 32->64
// 3x3 + pool, fc 3136->128, fc 128->10; 421,642 parameters) on its shard of
// each epoch, with SGD + momentum and weft::torch::DataParallel keeping the
// replicas in step (BSP or local SGD). Rank 0 shows a live progress line,
// the test accuracy after each epoch (evaluated by all ranks, each on a
// slice of the test set) and a summary; --json prints one JSON object per
// epoch instead.
//
// Load balancing (--balance, weft/balance.h): the global batch (--batch-size
// x workers) is shared among the workers in proportion to their measured
// speed: `static` from a probe of this model at start, `dynamic` (the
// default) re-planned from the live rates every --balance-every steps,
// `none` in equal parts. Each step's samples come from a shard queue
// (weft/shard_queue.h), so every sample is trained exactly once per epoch
// whatever the shares, and each worker's gradient is weighted by its share
// so that the averaged gradient is that of the global batch. A worker below
// 10% of the median rate is reported as a straggler; with --straggler drop
// under `weft run --elastic MIN:MAX`, one that stays a straggler for three
// exchanges leaves the job at the next commit (while at least MIN workers
// remain) and the others go on without it from that commit.
//
// Checkpoints (weft/checkpoint.h): with --checkpoint-dir DIR, rank 0 writes
// the training state (model, optimizer, RNG, step, epoch and the shard
// queue's ledger: which samples of the epoch are trained) every
// --checkpoint-every steps and at the end, off the training thread, keeping
// the newest --checkpoint-keep. A run resumes from the newest valid
// checkpoint of --resume DIR, or of --checkpoint-dir when it holds one:
// rank 0 reads it and sends it to every rank, so the workers need no shared
// file system. The world size may differ from the run that wrote it: the
// ledger's untrained samples are handed to the new workers, so every sample
// of the interrupted epoch is still trained exactly once.
//
// Throughput follows ../shared/guide/MEASURING.md: samples/s over the epoch
// after its first 20 steps (samples_per_s; samples_per_s_all counts the
// whole epoch, as the DDP script does).
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sched.h>
#include <torch/torch.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include "dataset.h"
#include "weft/balance.h"
#include "weft/checkpoint.h"
#include "weft/data.h"
#include "weft/elastic_state.h"
#include "weft/shard_queue.h"
#include "weft/torch.h"
#include "weft/train.h"
#include "weft/weft.h"

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct CnnImpl : torch::nn::Module {
  CnnImpl()
      : c1(register_module("c1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 32, 3).padding(1)))),
        c2(register_module("c2",
                           torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 3).padding(1)))),
        f1(register_module("f1", torch::nn::Linear(64 * 7 * 7, 128))),
        f2(register_module("f2", torch::nn::Linear(128, 10))) {}

  torch::Tensor forward(torch::Tensor x) {
    x = torch::max_pool2d(torch::relu(c1->forward(x)), 2);
    x = torch::max_pool2d(torch::relu(c2->forward(x)), 2);
    return f2->forward(torch::relu(f1->forward(x.flatten(1))));
  }

  torch::nn::Conv2d c1, c2;
  torch::nn::Linear f1, f2;
};

// Bounds of the floating-point flags. A learning rate above 1000 or a
// momentum of 1 or more only makes SGD diverge; a bucket from 1 byte to 64
// GiB (a bucket larger than the model is simply one bucket).
constexpr double kMaxLr = 1000;
constexpr double kMaxMomentum = 0.999;
constexpr double kMinBucketMib = 1.0 / (1 << 20);
constexpr double kMaxBucketMib = 64 * 1024;

struct Args {
  int epochs = 5;
  int64_t batch_size = 64;
  double lr = 0.1;
  std::string lr_schedule = "cosine";
  double warmup_epochs = 0.5;
  double momentum = 0.9;
  double weight_decay = 0.0;
  std::string sync = "bsp";
  std::string compress = "auto";
  int64_t local_steps = 8;
  int64_t sync_warmup_steps = 0;
  int threads = 1;
  uint64_t seed = 0;
  std::string data_dir{fashion_mnist::kDefaultDir};
  bool json = false;
  int64_t train_samples = 0;  // 0: all
  int64_t test_samples = 0;   // 0: all
  double bucket_mb = 25;
  double first_bucket_mb = 1;
  int64_t max_steps = 0;  // per epoch, 0: all (benchmarks)
  std::string balance = "dynamic";
  int64_t balance_every = 5;
  int64_t min_share = 0;  // 0: batch_size / 8, at least 1
  int64_t shard_samples = 64;
  std::string straggler = "report";  // or "drop" (elastic)
  std::string checkpoint_dir;        // "": no checkpoints
  int64_t checkpoint_every = 100;    // steps
  int checkpoint_keep = 3;
  int64_t commit_every = 1;  // steps between in-memory commits (elastic)
  std::string resume;        // "": resume from checkpoint_dir when it holds a checkpoint
};

// A checkpoint that cannot be used (another model, another Weft version, a
// corrupt image, none where --resume names a directory): the job ends before
// training starts with exit code 2, naming the flag, and nothing is written.
struct BadCheckpoint : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A flag that the model refuses (e.g. a PowerSGD rank larger than any of its
// matrices allows): exit code 2 before training starts, like a bad flag.
struct BadFlag : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The engine's compression from --compress: the gradients' codec (BSP, and
// local SGD's BSP warm-up); with local SGD a named codec also carries the
// parameter deltas. Top-k and sign under BSP take the SGD momentum into the
// codec (top-k: DGC's momentum correction; sign: the velocity is what is
// compressed), and the optimizer then runs without momentum: applied after
// a 1-bit or sparse average, momentum amplifies its error (sign diverged).
void set_compression(const Args& a, weft::train::DataParallelOptions& opts) {
  opts.compression = weft::train::parse_compression(a.compress);
  opts.compression.seed = a.seed ^ 0x5eedULL;
  const bool named =
      !opts.compression.automatic && opts.compression.codec != weft::train::CodecKind::None;
  if (opts.sync == weft::train::SyncMode::LocalSGD && named) {
    opts.parameter_compression = opts.compression;
  }
  const auto codec = opts.compression.codec;
  if ((codec == weft::train::CodecKind::TopK || codec == weft::train::CodecKind::Sign) &&
      opts.sync == weft::train::SyncMode::BSP) {
    opts.compression.momentum = a.momentum;
  }
}

// ---- Checks of the command line ----------------------------------------
// Every flag is checked when the command line is parsed, before anything
// starts: a bad value ends the job with exit code 2 (as `weft run` does) and
// a message naming the flag ("--lr: nan is not a finite number in (0,
// 1000]"), never later inside libtorch.

// A finite number in [lo, hi] ((lo, hi] when lo_open). NaN and the
// infinities are refused explicitly (they pass every comparison-based
// range check). Text that is not a number is left to the conversion, whose
// error names the flag too.
CLI::Validator finite_range(double lo, double hi, bool lo_open = false) {
  const std::string range = fmt::format("{}{}, {}]", lo_open ? "(" : "[", lo, hi);
  return CLI::Validator(
      [=](std::string& text) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(text.c_str(), &end);
        if (end == text.c_str() || *end != '\0') return "";
        if (!std::isfinite(v)) return fmt::format("{} is not a finite number in {}", text, range);
        if (v < lo || v > hi || (lo_open && v == lo)) {
          return fmt::format("{} is not in {}", text, range);
        }
        return "";
      },
      "NUMBER in " + range);
}

// CPUs this process may run on (its affinity mask), at least 1.
int usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1L, sysconf(_SC_NPROCESSORS_ONLN));
}

// Intra-op threads beyond the CPUs this process may use only make the
// threads of a worker take turns: refused, so that a typo (1024 for 4) does
// not go unnoticed.
CLI::Validator at_most_usable_cpus() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        char* end = nullptr;
        const long v = std::strtol(text.c_str(), &end, 10);
        if (end == text.c_str() || *end != '\0') return "";
        const int cpus = usable_cpus();
        if (v > cpus) {
          return fmt::format(
              "{} intra-op threads per worker is more than the {} CPU(s) this process may run on",
              text, cpus);
        }
        return "";
      },
      "at most the usable CPUs");
}

// MiB of a --bucket-mb value to bytes (the range check keeps it from 1 byte
// to 64 GiB).
size_t mib_to_bytes(double mib) { return static_cast<size_t>(std::llround(mib * (1 << 20))); }

std::string duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const auto t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) return fmt::format("{}h{:02}m", t / 3600, t / 60 % 60);
  if (t >= 60) return fmt::format("{}m{:02}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

// Accuracy and mean loss of the model on `test`, each rank evaluating a
// contiguous slice; collective.
std::pair<double, double> evaluate(CnnImpl& model, const weft::data::Dataset& test, int64_t count,
                                   weft::Communicator& comm) {
  torch::NoGradGuard no_grad;
  model.eval();
  const int64_t per = (count + comm.size() - 1) / comm.size();
  const int64_t begin = std::min(count, per * comm.rank());
  const int64_t end = std::min(count, begin + per);
  std::vector<double> sums(3, 0.0);  // correct, samples, loss sum
  const int64_t chunk = 500;
  std::vector<int64_t> idx;
  for (int64_t s = begin; s < end; s += chunk) {
    const int64_t n = std::min(chunk, end - s);
    idx.resize(static_cast<size_t>(n));
    for (int64_t k = 0; k < n; ++k) idx[static_cast<size_t>(k)] = s + k;
    auto x = torch::empty({n, 1, test.height(), test.width()});
    auto y = torch::empty({n}, torch::kLong);
    test.fill_batch(idx, {x.data_ptr<float>(), static_cast<size_t>(x.numel())},
                    {y.data_ptr<int64_t>(), static_cast<size_t>(n)});
    auto out = model.forward(x);
    sums[0] += static_cast<double>(out.argmax(1).eq(y).sum().item<int64_t>());
    sums[1] += static_cast<double>(n);
    sums[2] += torch::nn::functional::cross_entropy(
                   out, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                   .item<double>();
  }
  comm.allreduce(sums, weft::ReduceOp::Sum);
  model.train();
  return {sums[0] / sums[1], sums[2] / sums[1]};
}

// Each worker's compute rate (samples/s) as last exchanged, for JSON and text.
std::string rates_json(const weft::balance::Balancer& b) {
  std::string out;
  for (const auto& w : b.workers()) {
    out += fmt::format("{}{:.1f}", out.empty() ? "" : ", ", std::isfinite(w.rate) ? w.rate : 0.0);
  }
  return out;
}
std::string rates_text(const weft::balance::Balancer& b) {
  std::string out;
  for (const auto& w : b.workers()) {
    out += fmt::format("{}{:.0f}", out.empty() ? "" : " ", std::isfinite(w.rate) ? w.rate : 0.0);
  }
  return out;
}
// Every worker's monitor figures, as a JSON array.
std::string figures_json(const weft::balance::Balancer& b) {
  auto num = [](double v) { return std::isfinite(v) ? v : -1.0; };
  std::string out = "[";
  for (const auto& w : b.workers()) {
    out += fmt::format(
        "{}{{\"rank\": {}, \"host\": \"{}\", \"share\": {}, \"rate\": {:.1f}, \"wait_s_per_step\": "
        "{:.4f}, \"cpu_utilization\": {:.3f}, \"rss_mb\": {:.1f}, \"throttled_fraction\": {:.3f}, "
        "\"gpu_utilization\": {:.3f}, \"memory_pressure\": {:.3f}, \"shedding\": {}, "
        "\"cpu_quota\": {:.3f}, \"cpu_ms_per_sample\": {:.3f}, \"quota_rate\": {:.1f}, "
        "\"quota_bound\": {}, \"straggler\": {}}}",
        out.size() > 1 ? ", " : "", w.rank, w.host, w.share, num(w.rate),
        num(w.wait_seconds_per_step), num(w.cpu_utilization),
        static_cast<double>(w.rss_bytes) / 1e6, num(w.throttled_fraction), num(w.gpu_utilization),
        num(w.memory_pressure), w.shedding ? "true" : "false", num(w.cpu_quota_cores),
        num(w.cpu_seconds_per_sample * 1e3), num(w.quota_rate), w.quota_bound ? "true" : "false",
        w.straggler ? "true" : "false");
  }
  return out + "]";
}

// `s` as a JSON string literal (quotes, backslashes and control characters
// escaped).
std::string json_string(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += fmt::format("\\u{:04x}", static_cast<int>(c));
    } else {
      out += c;
    }
  }
  return out + "\"";
}

// The checkpoint to resume from, as read by rank 0 and sent to every rank.
struct Resumed {
  weft::train::CheckpointMeta meta;
  std::string from;  // its file
};

// Rank 0 looks for the newest valid checkpoint of --resume (or of
// --checkpoint-dir) and broadcasts it; every rank restores it into `state`.
// nullopt when there is nothing to resume from. Throws BadCheckpoint, on
// every rank, when the checkpoint cannot be used. Collective.
std::optional<Resumed> resume(const Args& a, weft::Communicator& comm,
                              const weft::train::TrainState& state) {
  const bool explicit_resume = !a.resume.empty();
  const std::string dir = explicit_resume ? a.resume : a.checkpoint_dir;
  const std::string flag = explicit_resume ? "--resume" : "--checkpoint-dir";
  if (dir.empty()) return std::nullopt;
  // status: 0 nothing to resume, 1 an image follows, 2 rank 0 refused.
  std::vector<int64_t> header{0, 0, 0};  // status, bytes, step
  std::vector<std::byte> image;
  std::string refused;
  if (comm.rank() == 0) {
    std::vector<std::string> skipped;
    try {
      auto latest = weft::train::load_latest(dir, &skipped);
      if (latest) {
        image = std::move(latest->second);
        header = {1, static_cast<int64_t>(image.size()), latest->first.step};
      } else if (explicit_resume) {
        refused = fmt::format("{} {}: no valid checkpoint there{}{}", flag, dir,
                              skipped.empty() ? "" : "; skipped: ", fmt::join(skipped, "; "));
        header[0] = 2;
      }
    } catch (const weft::Error& e) {
      refused = fmt::format("{} {}: {}", flag, dir, e.what());
      header[0] = 2;
    }
  }
  comm.broadcast(header, 0);
  if (header[0] == 0) return std::nullopt;
  if (header[0] == 2) {
    throw BadCheckpoint(comm.rank() == 0 ? refused : "rank 0 could not resume (see its message)");
  }
  image.resize(static_cast<size_t>(header[1]));
  comm.broadcast(weft::Buffer(image.data(), image.size(), weft::DType::UInt8), 0);
  const std::string from = fmt::format("{}/{}", dir, weft::train::checkpoint_file_name(header[2]));
  try {
    return Resumed{state.restore(image), from};
  } catch (const weft::Error& e) {
    throw BadCheckpoint(fmt::format("{} {}: {}: {}", flag, dir, from, e.what()));
  }
}

// Thrown (and caught in run()) when workers joined at a commit: the
// members go on from that commit in the new generation.
struct MembershipChanged {};
// Thrown (and caught in run()) on a worker that left the job (dropped as a
// straggler): it ends with success, without finishing the job.
struct LeftTheJob {};

int run(const Args& a) {
  // Under `weft run --elastic MIN:MAX` the workers form generations (weft/elastic.h):
  // the job survives failures and admits returning workers.
  std::shared_ptr<weft::ElasticGroup> group;
  std::shared_ptr<weft::Communicator> comm;
  if (weft::ElasticGroup::enabled()) {
    group = weft::ElasticGroup::from_env();
    comm = group->join();
    if (!comm) return 0;  // the job finished before this worker could join
  } else {
    comm = weft::init();
  }
  if (a.straggler == "drop" && !group) {
    throw BadFlag(
        "--straggler drop: a worker can only leave an elastic job; run it under `weft run "
        "--elastic MIN:MAX`");
  }
  // A worker that joins a running elastic job gets its state from the
  // members (in the same calls as theirs after a change), not from a
  // checkpoint or a probe of its own.
  const bool joiner = group && group->generation() > 1;
  int rank = comm->rank(), world = comm->size();
  bool lead = rank == 0;
  weft::torch::set_threads(a.threads);
  torch::manual_seed(a.seed);

  auto train = fashion_mnist::load(fashion_mnist::Split::Train, a.data_dir);
  auto test = fashion_mnist::load(fashion_mnist::Split::Test, a.data_dir);
  const int64_t train_n =
      a.train_samples > 0 ? std::min(a.train_samples, train->size()) : train->size();
  const int64_t test_n = a.test_samples > 0 ? std::min(a.test_samples, test->size()) : test->size();

  // The global batch is the same whatever the balance mode: --batch-size
  // per worker on average. The queue hands each step's samples out by the
  // shares; an epoch has ceil(samples / global batch) steps, the last one
  // shorter.
  // (Elastic: of the most workers, whatever the generation.)
  const int max_world = group ? group->options().max : world;
  const int64_t global_batch = a.batch_size * max_world;
  if (train_n < global_batch) {
    throw weft::InvalidArgument(
        fmt::format("{} training samples over {} workers make no full batch of {}", train_n,
                    max_world, a.batch_size));
  }
  const int64_t min_share = a.min_share > 0 ? a.min_share : std::max<int64_t>(1, a.batch_size / 8);
  weft::data::ShardQueue queue(train_n, world,
                               {.shard_samples = a.shard_samples, .seed = a.seed, .shuffle = true});
  int64_t steps = (train_n + global_batch - 1) / global_batch;
  if (a.max_steps > 0) steps = std::min(steps, a.max_steps);
  weft::balance::BalancerOptions bopts;
  bopts.mode = weft::balance::parse_mode(a.balance);
  bopts.global_batch = global_batch;
  bopts.planner.min_share = min_share;
  bopts.exchange_every = a.balance_every;
  std::optional<weft::balance::Balancer> balancer;
  balancer.emplace(comm, bopts);

  auto model = std::make_shared<CnnImpl>();
  weft::train::DataParallelOptions opts;
  opts.sync = weft::train::parse_sync_mode(a.sync);
  opts.local_steps = a.local_steps;
  opts.warmup_steps = a.sync_warmup_steps;
  opts.buckets.bucket_bytes = mib_to_bytes(a.bucket_mb);
  opts.buckets.first_bucket_bytes = mib_to_bytes(a.first_bucket_mb);
  set_compression(a, opts);
  std::optional<weft::torch::DataParallel> dp_holder;
  try {
    dp_holder.emplace(model, comm, opts);
  } catch (const weft::InvalidArgument& e) {
    if (std::string_view(e.what()).starts_with("--compress")) throw BadFlag(e.what());
    throw;
  }
  weft::torch::DataParallel& dp = *dp_holder;
  // Top-k and sign apply the momentum inside the codec (set_compression).
  const double sgd_momentum = opts.compression.momentum > 0 ? 0.0 : a.momentum;
  torch::optim::SGD opt(
      model->parameters(),
      torch::optim::SGDOptions(a.lr).momentum(sgd_momentum).weight_decay(a.weight_decay));

  // What a checkpoint holds, and the resume (before anything else: a
  // checkpoint that cannot be used ends the job before training starts).
  int64_t ck_step = 0, ck_epoch = 0;
  weft::train::TrainState state;
  state.add_int("step", &ck_step);
  state.add_int("epoch", &ck_epoch);
  weft::torch::add_to_state(state, dp, opt);
  auto check_ledger = [train_n](std::string_view bytes) {
    const auto q = weft::data::ShardQueue::deserialize(bytes, train_n);
    if (q.num_samples() != train_n) {
      throw weft::InvalidArgument(
          fmt::format("the checkpoint's data ledger is of {} training samples, this run has {} "
                      "(--train-samples)",
                      q.num_samples(), train_n));
    }
  };
  state.add_blob(
      "data.shard_queue", [&queue] { return queue.serialize(); },
      [&queue, train_n](std::string_view bytes) {
        queue = weft::data::ShardQueue::deserialize(bytes, train_n);
      },
      check_ledger);
  const auto resumed = joiner ? std::nullopt : resume(a, *comm, state);
  // The global step the run goes on from, and the epoch (the one the
  // checkpoint was taken in: finished below if unfinished).
  int64_t global_step = 0;
  int first_epoch = 0;
  int64_t trained_at_resume = 0;
  if (resumed) {
    first_epoch = static_cast<int>(ck_epoch);
    if (queue.workers() != world) {
      // Another world size: every worker of the checkpoint gives its
      // untrained samples back to the todo list; the new workers take them.
      const int old_workers = queue.workers();
      for (int w = 0; w < old_workers; ++w) {
        if (!queue.released(w)) queue.release(w);
      }
      queue.resize(world);
      for (int w = 0; w < world; ++w) {
        if (queue.released(w)) queue.rejoin(w);
      }
      if (lead) {
        fmt::print(stderr, "resume: the data ledger of {} worker(s) handed to {}\n", old_workers,
                   world);
      }
    }
    if (ck_epoch < 0 || ck_epoch > 100000 || queue.epoch() != ck_epoch) {
      throw BadCheckpoint(
          fmt::format("the checkpoint's data ledger is of epoch {}, its metadata says epoch {}",
                      queue.epoch(), ck_epoch));
    }
    trained_at_resume = queue.trained();
    if (lead) {
      const std::string what =
          fmt::format("{}: step {}, epoch {}, {} worker(s) then, {} sample(s) of the epoch trained",
                      resumed->from, resumed->meta.step, resumed->meta.epoch + 1,
                      resumed->meta.world_size, trained_at_resume);
      if (a.json) {
        fmt::print(
            "{{\"event\": \"resume\", \"checkpoint\": {}, \"step\": {}, \"in_epoch\": {}, "
            "\"workers_then\": {}, \"trained\": {}}}\n",
            json_string(resumed->from), resumed->meta.step, resumed->meta.epoch + 1,
            resumed->meta.world_size, trained_at_resume);
      } else {
        fmt::print("resumed from {}\n", what);
      }
      std::fflush(stdout);
    }
  }

  // The capability probe: forward and backward of this model on one batch,
  // timed, on a replica of its own (the engine's gradient hooks are on
  // `model`). Static and dynamic start from the measured rates.
  if (bopts.mode != weft::balance::Mode::None && !joiner) {
    CnnImpl probe_model;
    auto px = torch::empty({a.batch_size, 1, train->height(), train->width()});
    auto py = torch::empty({a.batch_size}, torch::kLong);
    std::vector<int64_t> first(static_cast<size_t>(a.batch_size));
    for (int64_t i = 0; i < a.batch_size; ++i) first[static_cast<size_t>(i)] = i;
    train->fill_batch(first, {px.data_ptr<float>(), static_cast<size_t>(px.numel())},
                      {py.data_ptr<int64_t>(), static_cast<size_t>(a.batch_size)});
    balancer->probe(
        [&](int64_t n) {
          probe_model.zero_grad();
          torch::nn::functional::cross_entropy(probe_model.forward(px.narrow(0, 0, n)),
                                               py.narrow(0, 0, n))
              .backward();
        },
        a.batch_size);
  }

  weft::train::LrSchedule schedule;
  schedule.kind = weft::train::parse_lr_schedule(a.lr_schedule);
  schedule.base_lr = a.lr;
  schedule.total_steps = steps * a.epochs;
  schedule.warmup_steps = static_cast<int64_t>(a.warmup_epochs * static_cast<double>(steps));
  const int64_t decay_steps = schedule.total_steps - schedule.warmup_steps;
  schedule.milestones = {decay_steps / 2, decay_steps * 3 / 4};  // step: x0.1 at 50% and 75%

  const bool tty = isatty(lead && a.json ? 2 : 1) != 0;
  std::FILE* progress = a.json ? stderr : stdout;
  if (lead && !a.json) {
    std::string buckets;
    for (const auto& b : dp.engine().buckets()) {
      buckets += fmt::format("{}{:.2f} MB", buckets.empty() ? "" : " + ",
                             static_cast<double>(b.bytes()) / 1e6);
    }
    fmt::print(
        "Fashion-MNIST: {} train / {} test samples from {}\n"
        "CNN, {} parameters in {} bucket(s) ({}); {} worker(s) x batch {} (global {}), {} "
        "steps/epoch, {} epoch(s)\n"
        "sync {}, compress {}, SGD lr {} ({}, warm-up {} steps) momentum {}, {} intra-op "
        "thread(s) per worker, seed {}\n"
        "balance {}: shares [{}] of the global batch\n",
        train_n, test_n, a.data_dir,
        [&] {
          int64_t n = 0;
          for (const auto& p : model->parameters()) n += p.numel();
          return n;
        }(),
        dp.engine().buckets().size(), buckets, world, a.batch_size, a.batch_size * world, steps,
        a.epochs, dp.engine().policy().name(), dp.engine().compression(), a.lr, a.lr_schedule,
        schedule.warmup_steps, a.momentum, a.threads, a.seed, a.balance,
        fmt::join(balancer->shares(), " "));
    std::fflush(stdout);
  }

  // A worker's share is at most the global batch less the others' minimum.
  torch::Tensor x, y;
  auto size_batch = [&] {
    const int64_t max_share = global_batch - (world - 1) * min_share;
    x = torch::empty({max_share, 1, train->height(), train->width()});
    y = torch::empty({max_share}, torch::kLong);
  };
  size_batch();
  const int64_t pixels = train->height() * train->width();

  const auto start = Clock::now();
  double train_seconds = 0, best_acc = 0, last_acc = 0, rate_sum = 0;
  int best_epoch = 0;
  auto& engine = dp.engine();
  // Rank 0 writes the checkpoints (BSP keeps the replicas identical; under
  // local SGD the checkpoint holds rank 0's replica).
  std::unique_ptr<weft::train::CheckpointWriter> writer;
  auto make_writer = [&] {
    if (lead && !writer && !a.checkpoint_dir.empty()) {
      writer = std::make_unique<weft::train::CheckpointWriter>(a.checkpoint_dir, a.checkpoint_keep);
    }
  };
  make_writer();
  // Steps trained since the very start, across resumes: a checkpoint's step
  // (its file name), which only grows. (global_step is the position of the
  // learning-rate schedule, which depends on the world size.)
  int64_t steps_done = resumed ? ck_step : 0;
  // Elastic: the last commit in every member's memory (weft/elastic_state.h).
  std::optional<weft::train::ElasticState> commits;
  bool continuing = resumed.has_value();
  int64_t commit_id = 0;
  if (group) {
    commits.emplace(
        [&] {
          weft::train::CheckpointMeta meta;
          meta.step = ck_step;
          meta.epoch = ck_epoch;
          meta.world_size = world;
          meta.generation = group->generation();
          return state.snapshot(meta);
        },
        [&](std::span<const std::byte> image) { state.restore(image); });
  }
  // After a membership change (a failure, or workers joining): the members
  // meet in the calls a joiner makes at start (balancer, engine), take the
  // newest commit, and hand the epoch's untrained samples to the new workers.
  auto regroup = [&](bool fresh) {
    rank = comm->rank();
    world = comm->size();
    lead = rank == 0;
    if (queue.step_open()) queue.abandon_step();
    if (!fresh) {
      balancer.emplace(comm, bopts);
      dp.rebind(comm);
    }
    const int64_t at = commits->restore(*comm);
    commit_id = std::max<int64_t>(commit_id, at);
    queue.regroup(world);
    dp.engine().set_step(ck_step);
    steps_done = ck_step;
    first_epoch = static_cast<int>(ck_epoch);
    continuing = at >= 0;
    size_batch();
    make_writer();
    if (lead) {
      const auto& ch = group->changes().back();
      if (a.json) {
        fmt::print(
            "{{\"event\": \"membership\", \"generation\": {}, \"workers\": {}, "
            "\"left\": {}, \"joined\": {}, \"seconds\": {:.3f}, \"restored_step\": {}, "
            "\"trained_in_epoch\": {}}}\n",
            ch.generation, world, ch.left.size(), ch.joined.size(), ch.seconds, ck_step,
            queue.trained());
      } else {
        fmt::print(
            "generation {}: {} worker(s) ({} left, {} joined) in {:.2f} s; going on from "
            "step {}, epoch {}\n",
            ch.generation, world, ch.left.size(), ch.joined.size(), ch.seconds, ck_step,
            ck_epoch + 1);
      }
      std::fflush(stdout);
    }
  };
  // Time the training thread spends on commits and checkpoint snapshots
  // (the per-epoch JSON's "commit_s" and "checkpoint_s": their cost).
  double commit_seconds = 0, checkpoint_seconds = 0;
  auto commit = [&](int epoch) {
    const auto t = Clock::now();
    ck_step = steps_done;
    ck_epoch = epoch;
    commits->commit(*comm, ++commit_id);
    commit_seconds += since(t);
  };
  if (group) {
    if (joiner) regroup(true);
    if (commits->last_id() < 0) commit(first_epoch);
  }
  auto checkpoint = [&](int epoch, int64_t completed_steps) {
    if (!writer) return;
    const auto t = Clock::now();
    ck_step = completed_steps;
    ck_epoch = epoch;
    weft::train::CheckpointMeta meta;
    meta.step = completed_steps;
    meta.epoch = epoch;
    meta.world_size = world;
    writer->write(state.snapshot(meta), meta);
    checkpoint_seconds += since(t);
  };
  // A failure (elastic): the survivors form the next generation and go on
  // from the last commit; a join: the same, without the failure.
  std::exception_ptr failure;
  for (;;) {
    try {
      if (failure) {
        comm = group->recover(std::exchange(failure, nullptr));
        if (!comm) throw weft::Error("elastic: no generation could be formed");
        regroup(false);
      }
      for (int epoch = first_epoch; epoch < a.epochs; ++epoch) {
        // The epoch of the checkpoint or commit goes on from its ledger; the
        // others start.
        if (!(continuing && epoch == first_epoch)) queue.start_epoch(epoch);
        // Full steps of the global batch already trained in this epoch: the
        // learning rate's position.
        const int64_t first_k =
            continuing && epoch == first_epoch ? queue.trained() / global_batch : 0;
        global_step = static_cast<int64_t>(epoch) * steps + first_k;
        comm->barrier();
        const auto t0 = Clock::now();
        auto t_warm = t0;
        auto last_print = t0;
        double loss_sum = 0, shown_loss = 0;
        int64_t samples = 0, samples_warm = 0, loss_steps = 0;
        // ceil(samples / global batch) steps train the whole epoch (the shares
        // always sum to the global batch, and the queue shares the tail); a
        // whole epoch also goes on until the queue says every sample is done.
        const bool whole_epoch = a.max_steps == 0;
        for (int64_t k = first_k; !queue.epoch_done() && (k < steps || whole_epoch);
             ++k, ++global_step) {
          if (k == first_k + 20) t_warm = Clock::now(), samples_warm = samples;
          // This step's samples of every worker (the same on every rank).
          const auto takes = queue.take_step(balancer->shares());
          int64_t total = 0;
          for (const auto& t : takes) total += static_cast<int64_t>(t.size());
          if (total == 0) {  // the epoch is done (only with --max-steps past its end)
            queue.complete_step();
            break;
          }
          const auto& mine = takes[static_cast<size_t>(rank)];
          const auto n = static_cast<int64_t>(mine.size());
          engine.set_gradient_weight(weft::balance::gradient_weight(n, total, world));
          static_cast<torch::optim::SGDOptions&>(opt.param_groups()[0].options())
              .lr(schedule.at(global_step));
          const auto c0 = Clock::now();
          const double wait0 = engine.stats().wait_seconds;
          dp.zero_grad();
          double l = 0;
          if (n > 0) {
            train->fill_batch(mine, {x.data_ptr<float>(), static_cast<size_t>(n * pixels)},
                              {y.data_ptr<int64_t>(), static_cast<size_t>(n)});
            auto loss = torch::nn::functional::cross_entropy(model->forward(x.narrow(0, 0, n)),
                                                             y.narrow(0, 0, n));
            loss.backward();
            l = loss.item<double>();
          }
          const double compute = since(c0);
          dp.step(opt);
          queue.complete_step();
          ++steps_done;
          if (writer && steps_done % a.checkpoint_every == 0) checkpoint(epoch, steps_done);
          if (group && steps_done % a.commit_every == 0) {
            commit(epoch);
            // Persistent stragglers leave (--straggler drop), as long as
            // MIN workers remain; the others go on from this commit.
            const auto slow = a.straggler == "drop"
                                  ? balancer->stragglers_to_drop(world - group->options().min)
                                  : std::vector<int>{};
            if (!slow.empty()) {
              std::vector<std::string> who;
              std::vector<double> rates;
              for (int r : slow) {
                who.push_back(group->members()[static_cast<size_t>(r)]);
                rates.push_back(balancer->workers()[static_cast<size_t>(r)].rate);
              }
              const std::string why = fmt::format(
                  "straggler(s) [{}] at [{:.1f}] samples/s, below {:.0f}% of the median rate "
                  "for {} exchanges in a row",
                  fmt::join(who, " "), fmt::join(rates, " "),
                  balancer->options().straggler_floor * 100, balancer->options().drop_after);
              if (lead) {
                if (a.json) {
                  fmt::print(
                      "{{\"event\": \"straggler_drop\", \"step\": {}, \"ranks\": [{}], "
                      "\"rates\": [{:.1f}], \"rates_all\": [{}]}}\n",
                      steps_done, fmt::join(slow, ", "), fmt::join(rates, ", "),
                      rates_json(*balancer));
                } else {
                  fmt::print("step {}: dropping {}\n", steps_done, why);
                }
                std::fflush(stdout);
              }
              comm = group->remove(slow, why);
              if (!comm) throw LeftTheJob{};
              regroup(false);
              throw MembershipChanged{};  // the epoch goes on from the commit
            }
            if (group->joins_pending()) {
              comm = group->admit();
              if (!comm)
                throw weft::Error("elastic: no generation could be formed with the joiners");
              regroup(false);
              throw MembershipChanged{};  // the epoch goes on from the commit
            }
          }
          const double wait = engine.stats().wait_seconds - wait0;
          samples += total;
          if (balancer->end_step(
                  {.compute_seconds = compute, .wait_seconds = wait, .samples = n}) &&
              lead) {
            const auto& d = balancer->decisions().back();
            if (a.json) {
              fmt::print(
                  "{{\"event\": \"replan\", \"step\": {}, \"shares\": [{}], \"rates\": [{}]}}\n",
                  global_step + 1, fmt::join(d.new_shares, ", "), rates_json(*balancer));
            } else if (!tty) {
              fmt::print("step {}: shares [{}] -> [{}]\n", global_step + 1,
                         fmt::join(d.old_shares, " "), fmt::join(d.new_shares, " "));
            }
            std::fflush(stdout);
          }
          if (n > 0) {
            loss_sum += l;
            ++loss_steps;
            shown_loss = loss_steps == 1 ? l : 0.95 * shown_loss + 0.05 * l;
          }
          if (lead && (tty || !a.json) &&
              (since(last_print) >= (tty ? 0.25 : 15.0) || k + 1 == steps)) {
            last_print = Clock::now();
            const double el = since(t0);
            const double rate = static_cast<double>(samples) / el;
            const double per_step = (train_seconds + el) / static_cast<double>(global_step + 1);
            const double eta = per_step * static_cast<double>(steps * a.epochs - global_step - 1);
            const std::string line = fmt::format(
                "epoch {}/{}  step {}/{}  loss {:.4f}  {:.0f} samples/s  shares {}  ETA {}",
                epoch + 1, a.epochs, k + 1, steps, shown_loss, rate,
                fmt::join(balancer->shares(), "/"), duration(eta));
            if (tty) {
              fmt::print(progress, "\r{}\033[K", line);
            } else {
              fmt::print(progress, "{}\n", line);
            }
            std::fflush(progress);
          }
        }
        comm->barrier();
        const double seconds = since(t0);
        const bool warm = steps - first_k > 20;
        const double measured = warm ? since(t_warm) : seconds;
        const int64_t measured_samples = warm ? samples - samples_warm : samples;
        const double rate = static_cast<double>(measured_samples) / measured;
        const double rate_all = static_cast<double>(samples) / seconds;
        train_seconds += seconds;
        rate_sum += rate;

        std::vector<double> loss_total{loss_sum, static_cast<double>(loss_steps)};
        comm->allreduce(loss_total, weft::ReduceOp::Sum);
        // (No step in this run: an epoch whose last step the checkpoint holds.)
        const double train_loss = loss_total[1] > 0 ? loss_total[0] / loss_total[1] : 0.0;
        dp.synchronize();  // local SGD: evaluate the average of the replicas
        const auto [acc, test_loss] = evaluate(*model, *test, test_n, *comm);
        last_acc = acc;
        if (acc > best_acc) best_acc = acc, best_epoch = epoch + 1;
        if (lead) {
          if (tty && !a.json) fmt::print("\r\033[K");
          if (tty && a.json) fmt::print(stderr, "\r\033[K");
          if (a.json) {
            fmt::print(
                "{{\"epoch\": {}, \"samples_per_s\": {:.1f}, \"samples_per_s_all\": {:.1f}, "
                "\"test_accuracy\": {:.4f}, \"loss\": {:.4f}, \"test_loss\": {:.4f}, \"seconds\": "
                "{:.2f}, \"workers\": {}, \"batch_size\": {}, \"sync\": \"{}\", \"seed\": {}, "
                "\"comm_wait_s\": {:.3f}, \"samples\": {}, \"balance\": \"{}\", \"global_batch\": "
                "{}, "
                "\"shares\": [{}], \"rates\": [{}], \"rebalances\": {}, \"worker_figures\": {}, "
                "\"samples_this_run\": {}, \"commit_s\": {:.3f}, \"checkpoint_s\": {:.3f}, "
                "\"compress\": {}, \"wire_bytes_per_step\": {:.0f}}}\n",
                epoch + 1, rate, rate_all, acc, train_loss, test_loss, seconds, world, a.batch_size,
                a.sync, a.seed, dp.engine().stats().wait_seconds, queue.trained(), a.balance,
                global_batch, fmt::join(balancer->shares(), ", "), rates_json(*balancer),
                balancer->decisions().size(), figures_json(*balancer), samples, commit_seconds,
                checkpoint_seconds, json_string(dp.engine().compression()), [&] {
                  const auto st = dp.engine().stats();
                  return st.steps > 0
                             ? static_cast<double>(st.wire_bytes) / static_cast<double>(st.steps)
                             : 0.0;
                }());
          } else {
            fmt::print(
                "epoch {}/{}: train loss {:.4f}, test accuracy {:.4f} (loss {:.4f}), {:.0f} "
                "samples/s, {:.1f} s; shares [{}], compute rates [{}] samples/s\n",
                epoch + 1, a.epochs, train_loss, acc, test_loss, rate, seconds,
                fmt::join(balancer->shares(), " "), rates_text(*balancer));
          }
          std::fflush(stdout);
        }
      }
      break;
    } catch (const MembershipChanged&) {
    } catch (const LeftTheJob&) {
      // Dropped: the others go on from the last commit and write the
      // checkpoints; this worker's pending writes finish first.
      if (writer) writer->flush();
      return 0;
    } catch (const weft::Error& e) {
      if (!group || !weft::ElasticGroup::recoverable(e)) throw;
      failure = std::current_exception();
    }
  }
  if (group) group->finish();
  // The final state, and every write on disk before the job ends (a write
  // that failed fails the job).
  if (writer) {
    const int last = std::max(first_epoch, a.epochs - 1);
    if (steps_done > ck_step) checkpoint(last, steps_done);
    writer->flush();
  }
  if (lead && !a.json) {
    const auto st = dp.engine().stats();
    fmt::print(
        "done: {} epoch(s) in {} ({} training), final test accuracy {:.4f} (best {:.4f} after "
        "epoch {}), {:.0f} samples/s on average; {} worker(s), sync {}, compress {}; rank 0 "
        "waited {:.1f} s for communication ({} allreduces, {:.1f} MB on the wire)\n",
        a.epochs, duration(since(start)), duration(train_seconds), last_acc, best_acc, best_epoch,
        a.epochs > 0 ? rate_sum / a.epochs : 0.0, world, dp.engine().policy().name(),
        dp.engine().compression(), st.wait_seconds, st.bucket_allreduces + st.parameter_averages,
        static_cast<double>(st.wire_bytes) / 1e6);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Data-parallel Fashion-MNIST training with Weft (run it under `weft run -n N`)"};
  Args a;
  // A repeated option takes its last value, so that scripts can put their
  // defaults first and the user's arguments after them.
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--epochs", a.epochs, "Epochs")
      ->capture_default_str()
      ->check(CLI::Range(0, 100000));
  app.add_option("--batch-size", a.batch_size, "Batch size per worker")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--lr", a.lr, "Peak learning rate")
      ->capture_default_str()
      ->check(finite_range(0, kMaxLr, /*lo_open=*/true));
  app.add_option("--lr-schedule", a.lr_schedule,
                 "constant, step (x0.1 at 50% and 75% of the decay) or cosine (to 0)")
      ->capture_default_str()
      ->check(CLI::IsMember({"constant", "step", "cosine"}));
  app.add_option("--warmup-epochs", a.warmup_epochs,
                 "Linear learning-rate warm-up, in epochs (from 10% of --lr)")
      ->capture_default_str()
      ->check(finite_range(0, 1e6));
  app.add_option("--momentum", a.momentum, "SGD momentum (below 1)")
      ->capture_default_str()
      ->check(finite_range(0, kMaxMomentum));
  app.add_option("--weight-decay", a.weight_decay, "SGD weight decay (L2 penalty)")
      ->capture_default_str()
      ->check(finite_range(0, 1));
  app.add_option("--sync", a.sync, "bsp (gradients averaged every step) or local-sgd")
      ->capture_default_str()
      ->check(CLI::IsMember({"bsp", "local-sgd"}));
  app.add_option("--compress", a.compress,
                 "Gradient compression: auto (measure the link and the codecs, compress only "
                 "where it shortens the step), none, fp16, bf16, int8, topk:FRACTION (DGC "
                 "momentum correction in place of SGD momentum), sign (momentum inside the "
                 "codec too) or powersgd:RANK; with "
                 "local-sgd a named codec sends the parameter deltas")
      ->capture_default_str()
      ->check([](const std::string& v) {
        try {
          weft::train::parse_compression(v);
          return std::string();
        } catch (const weft::InvalidArgument& e) {
          return std::string(e.what());
        }
      });
  app.add_option("--local-steps", a.local_steps, "Local SGD: average the parameters every H steps")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  app.add_option("--sync-warmup-steps", a.sync_warmup_steps,
                 "Local SGD: BSP steps before local SGD starts (post-local SGD)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 40));
  app.add_option("--threads", a.threads,
                 "Intra-op threads per worker (at most the CPUs it may run on)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024))
      ->check(at_most_usable_cpus());
  app.add_option("--seed", a.seed, "Seed of the model initialisation and of the data order")
      ->capture_default_str();
  app.add_option("--data-dir", a.data_dir, "Directory of the Fashion-MNIST IDX files")
      ->capture_default_str();
  app.add_flag("--json", a.json, "Print one JSON object per epoch (rank 0) instead of text");
  app.add_option("--train-samples", a.train_samples, "Use the first N training samples (0: all)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 40));
  app.add_option("--test-samples", a.test_samples, "Use the first N test samples (0: all)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 40));
  app.add_option("--bucket-mb", a.bucket_mb, "Gradient bucket size, MiB")
      ->capture_default_str()
      ->check(finite_range(kMinBucketMib, kMaxBucketMib));
  app.add_option("--first-bucket-mb", a.first_bucket_mb, "First gradient bucket size, MiB")
      ->capture_default_str()
      ->check(finite_range(kMinBucketMib, kMaxBucketMib));
  app.add_option("--max-steps", a.max_steps, "Stop each epoch after N steps (0: whole epoch)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 40));
  app.add_option("--balance", a.balance,
                 "Shares of the global batch: none (equal), static (from a probe at start) or "
                 "dynamic (re-planned from the measured rates)")
      ->capture_default_str()
      ->check(CLI::IsMember({"none", "static", "dynamic"}));
  app.add_option("--balance-every", a.balance_every,
                 "Exchange the workers' figures (and re-plan, dynamic) every N steps")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--min-share", a.min_share,
                 "Smallest share of a worker, samples (0: --batch-size / 8, at least 1)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  app.add_option("--straggler", a.straggler,
                 "A worker below 10% of the median rate: report (log it) or drop (it leaves "
                 "the job after three exchanges; needs weft run --elastic MIN:MAX)")
      ->capture_default_str()
      ->check(CLI::IsMember({"report", "drop"}));
  app.add_option("--shard-samples", a.shard_samples, "Samples per shard of the shard queue")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  app.add_option("--checkpoint-dir", a.checkpoint_dir,
                 "Write checkpoints to DIR (rank 0; created if missing), and resume from the "
                 "newest there if it holds one");
  auto* every = app.add_option("--checkpoint-every", a.checkpoint_every,
                               "Checkpoint every N steps (with --checkpoint-dir)")
                    ->capture_default_str()
                    ->check(CLI::Range(int64_t{1}, int64_t{1} << 40));
  app.add_option("--commit-every", a.commit_every,
                 "Elastic (weft run --elastic): commit the state in every worker's memory every N "
                 "steps; a failure loses at most the steps since the last commit")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 40));
  auto* keep =
      app.add_option("--checkpoint-keep", a.checkpoint_keep, "Checkpoints kept (the newest N)")
          ->capture_default_str()
          ->check(CLI::Range(1, 1000000));
  app.add_option("--resume", a.resume, "Resume from the newest valid checkpoint of DIR")
      ->check(CLI::ExistingDirectory);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help exits 0; every refused command line exits 2, as `weft run` does.
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  if (a.min_share > a.batch_size) {
    fmt::print(stderr,
               "--min-share: {} is larger than --batch-size {} (the mean share of a worker)\n",
               a.min_share, a.batch_size);
    return 2;
  }
  if (a.checkpoint_dir.empty() && (every->count() > 0 || keep->count() > 0)) {
    fmt::print(stderr, "{}: needs --checkpoint-dir\n",
               every->count() > 0 ? "--checkpoint-every" : "--checkpoint-keep");
    return 2;
  }
  if (!a.checkpoint_dir.empty()) {
    // A directory that cannot be written is refused before anything starts
    // (every rank checks; rank 0 writes).
    try {
      weft::train::CheckpointWriter probe(a.checkpoint_dir, a.checkpoint_keep);
    } catch (const weft::Error& e) {
      fmt::print(stderr, "--checkpoint-dir: {}\n", e.what());
      return 2;
    }
  }
  try {
    return run(a);
  } catch (const BadFlag& e) {
    std::fflush(stdout);
    fmt::print(stderr, "\nfashion_mnist: error: {}\n", e.what());
    return 2;
  } catch (const BadCheckpoint& e) {
    std::fflush(stdout);
    fmt::print(stderr, "\nfashion_mnist: error: {}\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    fmt::print(stderr, "\nfashion_mnist: error: {}\n", e.what());
    return 1;
  }
}
