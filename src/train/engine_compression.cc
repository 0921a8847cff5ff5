// DataParallel's compression (see weft/train.h and engine_compression.h):
// the codec thread, the codecs of the buckets, and the automatic choice.
#include "train/engine_compression.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "core/log.h"
#include "train/codecs.h"
#include "weft/errors.h"

namespace weft::train {
namespace {

// Timed repetitions of each candidate of the automatic choice (after one
// warm-up call, which also gives PowerSGD its warm start).
constexpr int kTimedReps = 3;
// A candidate whose warm-up call takes this many times the best median so
// far is not timed further (on a slow link, the uncompressed allreduce
// alone takes seconds: measured last, it costs one call).
constexpr double kGiveUpFactor = 4.0;

// A gradient that was not finite (an overflow, which dynamic loss scaling
// skips) would stay in the residual and, for PowerSGD, in the warm start,
// and poison every later step: the codec starts afresh instead. The average
// itself stays non-finite, so that the application sees the overflow.
void discard_non_finite(GradientCodec& codec) {
  for (float v : codec.residual()) {
    if (!std::isfinite(v)) {
      WEFT_WARN(
          "DataParallel: a non-finite gradient reached codec {}: its residual and state "
          "are dropped",
          codec.name());
      codec.reset();
      return;
    }
  }
}

}  // namespace

DataParallel::Compression::Compression(CompressionOptions gradient, CompressionOptions parameter)
    : options(gradient), parameter_options(parameter), current(gradient) {
  thread_ = std::thread([this] { run(); });
}

DataParallel::Compression::~Compression() {
  {
    MutexLock lock(&mu_);
    stop_ = true;
  }
  changed_.notify_all();
  thread_.join();
}

void DataParallel::Compression::submit(const Task& task) {
  {
    MutexLock lock(&mu_);
    queue_.push_back(task);
    submitted_ += 1;
  }
  changed_.notify_all();
}

bool DataParallel::Compression::busy() {
  MutexLock lock(&mu_);
  return completed_ < submitted_;
}

double DataParallel::Compression::wait(uint64_t* bytes) {
  codecs::Stopwatch watch;
  MutexLock lock(&mu_);
  while (completed_ < submitted_) changed_.wait();
  if (bytes != nullptr) *bytes += bytes_;
  bytes_ = 0;
  if (error_) {
    std::exception_ptr e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
  return watch.lap();
}

void DataParallel::Compression::wait_quietly() noexcept {
  try {
    wait(nullptr);
  } catch (const std::exception& e) {
    WEFT_DEBUG("DataParallel: a compressed bucket failed: {}", e.what());
  }
}

// The codec thread: reduces the queued buckets one at a time, in order. After
// a failure the later buckets of the step are not sent: the communicator is
// broken (a failure of this rank's own aborts it), so its collectives fail
// at once anyway.
void DataParallel::Compression::run() {
  for (;;) {
    Task t;
    bool skip = false;
    {
      MutexLock lock(&mu_);
      while (queue_.empty() && !stop_) changed_.wait();
      if (queue_.empty()) return;
      t = queue_.front();
      queue_.pop_front();
      skip = error_ != nullptr;
    }
    std::exception_ptr error;
    uint64_t sent = 0;
    if (!skip) {
      try {
        GradientCodec* codec = codecs[t.bucket].get();
        if (codec != nullptr) {
          const uint64_t before = codec->stats().bytes_sent;
          codec->average(*t.comm, std::span<float>(static_cast<float*>(t.data), t.numel),
                         t.timeout);
          sent = codec->stats().bytes_sent - before;
        } else {
          Buffer buf(t.data, t.numel, t.dtype);
          t.comm->allreduce(buf, AllreduceOptions{ReduceOp::Avg, t.timeout});
          sent = codecs::ring_allreduce_bytes(buf.bytes(), t.comm->size());
        }
      } catch (const std::exception& e) {
        error = std::current_exception();
        // A failure of this rank alone (no memory, a bug) would leave the
        // peers waiting in the bucket's collectives: fail them now.
        if (!t.comm->error()) t.comm->abort(fmt::format("a gradient codec failed: {}", e.what()));
      }
      if (!error) {
        GradientCodec* codec = codecs[t.bucket].get();
        if (codec != nullptr) discard_non_finite(*codec);
      }
    }
    {
      MutexLock lock(&mu_);
      completed_ += 1;
      bytes_ += sent;
      if (error && !error_) error_ = error;
    }
    changed_.notify_all();
  }
}

void DataParallel::setup_compression() {
  const CompressionOptions& g = options_.compression;
  const CompressionOptions& p = options_.parameter_compression;
  if (!g.enabled() && !p.enabled()) return;
  auto c = std::make_unique<Compression>(g, p);
  c->codecs.resize(buckets_.size());
  c->layouts.resize(buckets_.size());
  std::vector<CodecLayout> float_layouts;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    const Bucket& bucket = buckets_[b];
    CodecLayout& l = c->layouts[b];
    l.dtype = bucket.dtype;
    l.numel = bucket.numel;
    for (size_t k = 0; k < bucket.params.size(); ++k) {
      const Parameter& param = params_[bucket.params[k]];
      l.tensors.push_back({param.name, bucket.offsets[k], param.shape});
    }
  }
  if (g.automatic) c->current = CompressionOptions{};  // none until measured
  compression_ = std::move(c);
}

// After the model check, which compared the options across ranks: every
// rank refuses the same options alike.
void DataParallel::validate_compression_options() const {
  const Compression& c = *compression_;
  if (c.parameter_options.automatic) {
    throw InvalidArgument(
        "DataParallel: parameter_compression takes a named codec (auto chooses the gradients' "
        "codec only)");
  }
  std::vector<CodecLayout> float_layouts;
  for (const CodecLayout& l : c.layouts) {
    if (l.dtype == DType::Float32) float_layouts.push_back(l);
  }
  validate_compression(c.options, float_layouts);
  if (c.parameter_options.enabled()) validate_compression(c.parameter_options, float_layouts);
}

void DataParallel::choose_compression() {
  Compression& c = *compression_;
  const int n = comm_->size();
  const int64_t step = check_idle("choose_compression");
  if (n == 1) return;

  std::vector<size_t> float_buckets;
  std::vector<CodecLayout> float_layouts;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    if (c.layouts[b].dtype != DType::Float32) continue;
    float_buckets.push_back(b);
    float_layouts.push_back(c.layouts[b]);
  }
  if (float_buckets.empty()) return;

  // The candidates, most faithful first; those the model does not allow
  // (PowerSGD without a matrix) are left out, on every rank alike.
  std::vector<CompressionOptions> candidates;
  for (const char* spec : {"none", "fp16", "int8", "powersgd:4"}) {
    CompressionOptions o = parse_compression(spec, c.options);
    try {
      validate_compression(o, float_layouts);
      candidates.push_back(o);
    } catch (const InvalidArgument&) {
    }
  }

  // Gradient-like data (the same on every rank: the values do not change the
  // cost of any codec but top-k's, which is not a candidate).
  std::vector<std::vector<float>> pattern(float_buckets.size());
  for (size_t i = 0; i < float_buckets.size(); ++i) {
    pattern[i].resize(c.layouts[float_buckets[i]].numel);
    for (size_t j = 0; j < pattern[i].size(); ++j) {
      pattern[i][j] = 1e-3f * std::sin(static_cast<float>(j) * 0.7f + static_cast<float>(i));
    }
  }
  std::vector<std::vector<float>> scratch = pattern;

  const bool first_choice = c.timings.empty();
  c.timings.clear();
  double best = std::numeric_limits<double>::infinity();
  // Measured from the fewest bytes to the most (the reverse of fidelity),
  // so that on a slow link the first candidate sets a low best and the
  // slow ones are given up after their warm-up call.
  for (auto it = candidates.rbegin(); it != candidates.rend(); ++it) {
    const CompressionOptions& o = *it;
    std::vector<std::unique_ptr<GradientCodec>> trial;
    uint64_t bytes = 0;
    for (size_t i = 0; i < float_buckets.size(); ++i) {
      trial.push_back(make_codec(o, c.layouts[float_buckets[i]], n));
      bytes += trial.back()->wire_bytes(n);
    }
    // One call of every bucket, timed as the slowest rank saw it.
    auto once = [&] {
      for (size_t i = 0; i < scratch.size(); ++i) {
        std::memcpy(scratch[i].data(), pattern[i].data(), pattern[i].size() * sizeof(float));
      }
      comm_->barrier(BarrierOptions{options_.timeout});
      codecs::Stopwatch watch;
      for (size_t i = 0; i < trial.size(); ++i) {
        trial[i]->average(*comm_, scratch[i], options_.timeout);
      }
      double t = watch.lap();
      comm_->allreduce(Buffer(&t, 1, DType::Float64), AllreduceOptions{ReduceOp::Max});
      return t;
    };
    double warm = 0;
    double median = 0;
    try {
      warm = once();
      median = warm;
      if (warm <= best * kGiveUpFactor) {
        std::vector<double> reps;
        for (int r = 0; r < kTimedReps; ++r) reps.push_back(once());
        std::sort(reps.begin(), reps.end());
        median = reps[reps.size() / 2];
      }
    } catch (const std::exception& e) {
      // A failure of this rank alone must not leave the others waiting.
      if (!comm_->error()) {
        comm_->abort(
            fmt::format("measuring --compress {} failed: {}", compression_name(o), e.what()));
      }
      throw;
    }
    best = std::min(best, median);
    c.timings.insert(c.timings.begin(), {o, median, bytes});  // back in order of fidelity
  }

  const size_t pick = choose_codec(c.timings);
  const CompressionOptions chosen = c.timings[pick].options;
  std::string report;
  for (const CodecTiming& t : c.timings) {
    report +=
        fmt::format(" {}={:.2f}ms/{}B", compression_name(t.options), t.seconds * 1e3, t.bytes_sent);
  }
  WEFT_INFO("DataParallel: compression auto at step {}: measured{}; chose {}", step, report,
            compression_name(chosen));

  // Switch, carrying each bucket's residual into its new codec.
  const bool first = std::all_of(c.codecs.begin(), c.codecs.end(),
                                 [](const auto& codec) { return codec == nullptr; });
  if (chosen.codec == c.current.codec && !first) return;
  if (!first_choice && chosen.codec != c.current.codec) c.switches += 1;
  for (size_t b : float_buckets) {
    std::unique_ptr<GradientCodec> next;
    const bool carry = c.codecs[b] != nullptr;
    if (chosen.codec != CodecKind::None || carry) next = make_codec(chosen, c.layouts[b], n);
    if (carry) {
      std::span<float> from = c.codecs[b]->residual();
      std::span<float> to = next->residual();
      for (size_t j = 0; j < std::min(from.size(), to.size()); ++j) to[j] += from[j];
    }
    c.codecs[b] = std::move(next);
  }
  c.current = chosen;
}

std::string DataParallel::compression() const {
  if (!compression_ || !compression_->options.enabled()) return "none";
  const Compression& c = *compression_;
  std::string name = compression_name(c.current);
  for (const auto& codec : c.codecs) {
    if (codec) {
      name = codec->name();
      break;
    }
  }
  return c.options.automatic ? "auto->" + name : name;
}

std::vector<CodecTiming> DataParallel::compression_timings() const {
  if (!compression_) return {};
  return compression_->timings;
}

}  // namespace weft::train
