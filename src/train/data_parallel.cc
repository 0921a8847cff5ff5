// The DataParallel engine (see weft/train.h): gradient buckets launched in
// order as they fill, the model check at start, and flat collectives over
// the whole model for broadcast and averaging.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <set>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "core/log.h"
#include "core/mutex.h"
#include "core/thread_annotations.h"
#include "train/codecs.h"
#include "train/engine_compression.h"
#include "weft/errors.h"
#include "weft/train.h"

namespace weft::train {
namespace {

constexpr size_t kAlign = 64;
// Bytes per hashed chunk of the parameters' delta broadcast.
constexpr size_t kDeltaChunk = size_t{64} << 10;

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

std::shared_ptr<void> allocate_zeroed(size_t bytes) {
  bytes = std::max(bytes, kAlign);
  void* p = ::operator new (bytes, std::align_val_t{kAlign});
  std::memset(p, 0, bytes);
  return {p, [](void* q) { ::operator delete (q, std::align_val_t{kAlign}); }};
}

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::vector<std::string> split_lines(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start < s.size()) {
    size_t end = s.find('\n', start);
    if (end == std::string::npos) end = s.size();
    out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

// Broadcasts a string from root (length first).
std::string broadcast_string(Communicator& comm, std::string s, int root) {
  int64_t len = static_cast<int64_t>(s.size());
  comm.broadcast(Buffer(&len, 1, DType::Int64), root);
  s.resize(static_cast<size_t>(len));
  if (len > 0) comm.broadcast(Buffer(s.data(), s.size(), DType::UInt8), root);
  return s;
}

// Waits for every work still held when destroyed, swallowing errors: buffers
// of collectives in flight must not be released (or reused) before they
// complete, also when an earlier wait threw.
class DrainGuard {
 public:
  explicit DrainGuard(std::vector<WorkPtr>& works) : works_(works) {}
  ~DrainGuard() {
    for (WorkPtr& w : works_) {
      if (!w) continue;
      try {
        w->wait();
      } catch (const std::exception& e) {
        WEFT_DEBUG("DataParallel: {} failed while unwinding: {}", w->describe(), e.what());
      }
      w.reset();
    }
  }
  DrainGuard(const DrainGuard&) = delete;
  DrainGuard& operator=(const DrainGuard&) = delete;

 private:
  std::vector<WorkPtr>& works_;
};

// Multiplies n elements of a floating dtype by w; w == 0 writes zeros, so
// that a rank without samples sends zeros even if its gradient holds NaN.
void scale_in_place(void* data, size_t n, DType dtype, double w) {
  if (w == 0) {
    std::memset(data, 0, n * dtype_size(dtype));
    return;
  }
  switch (dtype) {
    case DType::Float32: {
      auto* p = static_cast<float*>(data);
      const auto f = static_cast<float>(w);
      for (size_t i = 0; i < n; ++i) p[i] *= f;
      return;
    }
    case DType::Float64: {
      auto* p = static_cast<double*>(data);
      for (size_t i = 0; i < n; ++i) p[i] *= w;
      return;
    }
    case DType::Float16: {
      auto* p = static_cast<Half*>(data);
      const auto f = static_cast<float>(w);
      for (size_t i = 0; i < n; ++i) p[i] = float_to_half(half_to_float(p[i]) * f);
      return;
    }
    case DType::BFloat16: {
      auto* p = static_cast<BFloat16*>(data);
      const auto f = static_cast<float>(w);
      for (size_t i = 0; i < n; ++i) p[i] = float_to_bfloat16(bfloat16_to_float(p[i]) * f);
      return;
    }
    default:
      // Buckets hold floating dtypes only (checked at construction).
      throw InternalError(
          fmt::format("DataParallel: cannot weight a {} bucket", dtype_name(dtype)));
  }
}

}  // namespace

// A set of tensors packed into flat, per-dtype groups.
struct DataParallel::Flat {
  struct Entry {
    void* data = nullptr;
    size_t offset = 0;  // bytes into storage
    size_t bytes = 0;
    const Parameter* tensor = nullptr;  // name and shape (parameters only: see make())
  };
  struct Group {
    DType dtype = DType::Float32;
    size_t offset = 0;  // bytes into storage
    size_t numel = 0;
    std::vector<Entry> entries;
  };
  std::vector<Group> groups;
  std::shared_ptr<void> storage;
  size_t total = 0;  // bytes of storage

  std::byte* at(size_t offset) const { return static_cast<std::byte*>(storage.get()) + offset; }
  void copy_in(const Group& g) const {
    for (const Entry& e : g.entries) {
      if (e.bytes > 0) std::memcpy(at(e.offset), e.data, e.bytes);
    }
  }
  void copy_out(const Group& g) const {
    for (const Entry& e : g.entries) {
      if (e.bytes > 0) std::memcpy(e.data, at(e.offset), e.bytes);
    }
  }

  // Packs tensors (as Parameters: dtype, shape, data) into groups of about
  // group_bytes each. `names` (the engine's parameter list, which outlives
  // the Flat) gives each entry its name and shape, for codecs.
  static std::unique_ptr<Flat> make(std::vector<Parameter> tensors, size_t group_bytes,
                                    const std::vector<Parameter>* names = nullptr) {
    for (Parameter& t : tensors) t.trainable = true;
    auto flat = std::make_unique<Flat>();
    size_t total = 0;
    for (const Bucket& b : assign_buckets(tensors, {group_bytes, group_bytes})) {
      Group g{b.dtype, total, b.numel, {}};
      for (size_t k = 0; k < b.params.size(); ++k) {
        const Parameter& t = tensors[b.params[k]];
        g.entries.push_back({t.data, total + b.offsets[k] * dtype_size(b.dtype), t.bytes(),
                             names != nullptr ? &(*names)[b.params[k]] : nullptr});
      }
      total += align_up(b.bytes());
      flat->groups.push_back(std::move(g));
    }
    flat->storage = allocate_zeroed(total);
    flat->total = total;
    return flat;
  }
};

// What a step changes. grad_ready() may run on several threads at once (the
// autograd engine's), so all of it is guarded by `mu`; the functions that
// need it held say REQUIRES(mu), and clang's analysis checks every use
// (make ci-thread-safety).
struct DataParallel::State {
  explicit State(DataParallel& owner) : dp(owner) {}
  DataParallel& dp;  // the immutable parts: parameters, buckets, slots, policy, communicator

  // Asks the policy whether this step's gradients are averaged and resets
  // the per-step bookkeeping.
  void open_step() REQUIRES(mu);
  // Records parameter index's gradient as final (copying it into its slot
  // when it lives elsewhere) and launches the buckets it completes.
  void mark_ready(size_t index, void* grad) REQUIRES(mu);
  // Launches, in bucket order, every complete bucket not launched yet.
  void launch_in_order() REQUIRES(mu);

  mutable Mutex mu;
  Phase phase GUARDED_BY(mu) = Phase::Idle;
  bool averaging GUARDED_BY(mu) = false;  // this step's gradients are averaged
  int64_t step GUARDED_BY(mu) = 0;        // completed steps
  double weight GUARDED_BY(mu) = 1.0;     // set_gradient_weight()
  int64_t synced_at GUARDED_BY(mu) = 0;   // `step` when the model was last averaged or broadcast
  std::vector<uint8_t> ready GUARDED_BY(mu);    // per parameter
  std::vector<void*> step_grad GUARDED_BY(mu);  // per parameter: where its gradient is this step
  std::vector<size_t> pending GUARDED_BY(mu);   // per bucket: parameters not reported yet
  size_t next_launch GUARDED_BY(mu) = 0;        // first bucket not launched
  std::vector<WorkPtr> works GUARDED_BY(mu);    // per bucket, this step
  DataParallelStats stats GUARDED_BY(mu);
};

DataParallel::DataParallel(std::shared_ptr<Communicator> comm, std::vector<Parameter> params,
                           std::vector<StateBuffer> buffers, DataParallelOptions options)
    : comm_(std::move(comm)),
      params_(std::move(params)),
      buffers_(std::move(buffers)),
      options_(std::move(options)),
      state_(std::make_unique<State>(*this)) {
  if (!comm_) throw InvalidArgument("DataParallel: the communicator is null");
  std::set<std::string> names;
  for (const Parameter& p : params_) {
    if (!dtype_is_floating(p.dtype)) {
      throw InvalidArgument(
          fmt::format("DataParallel: parameter '{}' has dtype {}: parameters must "
                      "be floating-point",
                      p.name, dtype_name(p.dtype)));
    }
    if (p.data == nullptr && p.numel() > 0) {
      throw InvalidArgument(fmt::format("DataParallel: parameter '{}' has no data", p.name));
    }
    if (!names.insert(p.name).second) {
      throw InvalidArgument(fmt::format("DataParallel: two tensors are named '{}'", p.name));
    }
  }
  for (const StateBuffer& b : buffers_) {
    if (b.data == nullptr && b.numel() > 0) {
      throw InvalidArgument(fmt::format("DataParallel: buffer '{}' has no data", b.name));
    }
    if (!names.insert(b.name).second) {
      throw InvalidArgument(fmt::format("DataParallel: two tensors are named '{}'", b.name));
    }
  }
  if (options_.policy) {
    policy_ = options_.policy;
  } else if (options_.sync == SyncMode::BSP) {
    policy_ = std::make_shared<BspPolicy>();
  } else {
    policy_ = std::make_shared<LocalSgdPolicy>(options_.local_steps, options_.warmup_steps);
  }

  buckets_ = assign_buckets(params_, options_.buckets);
  slots_.resize(params_.size());
  size_t total = 0;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    bucket_offset_.push_back(total);
    total += align_up(buckets_[b].bytes());
    for (size_t k = 0; k < buckets_[b].params.size(); ++k) {
      slots_[buckets_[b].params[k]] = Slot{b, buckets_[b].offsets[k]};
    }
  }
  grad_storage_ = allocate_zeroed(total);
  {
    MutexLock lock(&state_->mu);
    state_->ready.assign(params_.size(), 0);
    state_->step_grad.assign(params_.size(), nullptr);
    state_->pending.assign(buckets_.size(), 0);
    state_->works.resize(buckets_.size());
  }

  param_flat_ = Flat::make(params_, options_.buckets.bucket_bytes, &params_);
  std::vector<Parameter> floating;
  for (const StateBuffer& b : buffers_) {
    if (dtype_is_floating(b.dtype)) floating.push_back({b.name, b.dtype, b.shape, b.data});
  }
  buffer_flat_ = Flat::make(std::move(floating), options_.buckets.bucket_bytes);

  setup_compression();
  check_model();
  if (options_.broadcast_initial) broadcast_model(0);
  start_compression();
}

DataParallel::~DataParallel() { drain(); }

// Gradient allreduces still in flight at destruction belong to a step that
// was abandoned (an exception between backward and finish_gradients()): the
// peers may never issue the buckets this rank is waiting for, so the
// communicator is aborted (they fail at once, naming this rank, instead of
// hanging until their deadline) before the bucket memory is released.
void DataParallel::drain() noexcept {
  MutexLock lock(&state_->mu);
  bool in_flight = compression_ && compression_->busy();
  for (WorkPtr& w : state_->works) in_flight = in_flight || (w && !w->test());
  if (in_flight) {
    const int64_t step = state_->step;
    WEFT_WARN("DataParallel destroyed in the middle of step {}: aborting the communicator", step);
    comm_->abort(
        fmt::format("DataParallel destroyed with gradient allreduces of step {} in flight", step));
  }
  if (compression_) compression_->wait_quietly();
  for (WorkPtr& w : state_->works) {
    if (!w) continue;
    try {
      w->wait(options_.timeout);
    } catch (const std::exception& e) {
      WEFT_DEBUG("DataParallel: {} ended with: {}", w->describe(), e.what());
    }
    w.reset();
  }
}

void DataParallel::check_model() {
  if (comm_->size() == 1) return;
  std::vector<std::string> mine;
  for (const Parameter& p : params_) {
    mine.push_back(fmt::format("parameter '{}' {}{}", p.name, describe_shape(p.dtype, p.shape),
                               p.trainable ? "" : " (frozen)"));
  }
  for (const StateBuffer& b : buffers_) {
    mine.push_back(fmt::format("buffer '{}' {}", b.name, describe_shape(b.dtype, b.shape)));
  }
  std::string joined;
  for (const std::string& line : mine) joined += line + "\n";
  const std::vector<std::string> ref = split_lines(broadcast_string(*comm_, joined, 0));

  const size_t n = std::max(mine.size(), ref.size());
  size_t first = n;
  for (size_t k = 0; k < n; ++k) {
    if (k >= mine.size() || k >= ref.size() || mine[k] != ref[k]) {
      first = k;
      break;
    }
  }
  const auto size = static_cast<int64_t>(comm_->size());
  int64_t key = first == n ? std::numeric_limits<int64_t>::max()
                           : static_cast<int64_t>(first) * size + comm_->rank();
  comm_->allreduce(Buffer(&key, 1, DType::Int64), ReduceOp::Min);
  if (key == std::numeric_limits<int64_t>::max()) {
    check_options();
    return;
  }

  const int bad_rank = static_cast<int>(key % size);
  const auto k = static_cast<size_t>(key / size);
  auto missing = [](size_t count) {
    return fmt::format("nothing (it has only {} parameters and buffers)", count);
  };
  std::string theirs;
  if (comm_->rank() == bad_rank) theirs = k < mine.size() ? mine[k] : missing(mine.size());
  theirs = broadcast_string(*comm_, theirs, bad_rank);
  const std::string at_root = k < ref.size() ? ref[k] : missing(ref.size());
  throw InvalidArgument(fmt::format(
      "DataParallel: the model differs across ranks at entry {} of its parameters and buffers: "
      "rank 0 has {}, rank {} has {} (every rank must build the same model: the same parameters "
      "and buffers, in the same order, with the same names, dtypes and shapes)",
      k, at_root, bad_rank, theirs));
}

// The options every rank must share (the codecs exchange what they encode
// with the same codec on every rank), compared like the model.
void DataParallel::check_options() {
  auto describe = [](const CompressionOptions& o) {
    return fmt::format("{} (topk {}, rank {}, momentum {}, chunk {}, seed {}, recheck {})",
                       compression_name(o), o.topk_fraction, o.powersgd_rank, o.momentum, o.chunk,
                       o.seed, o.recheck_steps);
  };
  const std::string mine =
      fmt::format("compress={} parameter-compress={}", describe(options_.compression),
                  describe(options_.parameter_compression));
  const std::string ref = broadcast_string(*comm_, mine, 0);
  int64_t bad = mine == ref ? std::numeric_limits<int64_t>::max() : comm_->rank();
  comm_->allreduce(Buffer(&bad, 1, DType::Int64), ReduceOp::Min);
  if (bad == std::numeric_limits<int64_t>::max()) return;
  const int bad_rank = static_cast<int>(bad);
  const std::string theirs =
      broadcast_string(*comm_, comm_->rank() == bad_rank ? mine : "", bad_rank);
  throw InvalidArgument(fmt::format(
      "DataParallel: the options differ across ranks: rank 0 has {}, rank {} has {} (every rank "
      "must pass the same compression options)",
      ref, bad_rank, theirs));
}

void* DataParallel::slot_data(size_t index) const {
  const Slot& s = slots_[index];
  return static_cast<std::byte*>(grad_storage_.get()) + bucket_offset_[s.bucket] +
         s.offset * dtype_size(params_[index].dtype);
}

Buffer DataParallel::grad_slot(size_t index) const {
  if (index >= params_.size()) {
    throw InvalidArgument(fmt::format(
        "DataParallel: parameter index {} out of range ({} parameters)", index, params_.size()));
  }
  if (slots_[index].bucket == SIZE_MAX) {
    throw InvalidArgument(fmt::format(
        "DataParallel: parameter '{}' is frozen: it has no gradient slot", params_[index].name));
  }
  return Buffer(slot_data(index), params_[index].numel(), params_[index].dtype);
}

void DataParallel::State::open_step() {
  averaging = dp.policy_->average_gradients(step) && dp.comm_->size() > 1;
  phase = Phase::Open;
  if (!averaging) return;
  std::fill(ready.begin(), ready.end(), 0);
  std::fill(step_grad.begin(), step_grad.end(), nullptr);
  for (size_t b = 0; b < dp.buckets_.size(); ++b) pending[b] = dp.buckets_[b].params.size();
  next_launch = 0;
}

void DataParallel::grad_ready(size_t index) {
  if (index >= params_.size()) (void)grad_slot(index);  // throws the range error
  grad_ready(index, params_[index].grad);
}

void DataParallel::grad_ready(size_t index, void* grad) {
  if (index >= params_.size() || slots_[index].bucket == SIZE_MAX) (void)grad_slot(index);
  State& st = *state_;
  MutexLock lock(&st.mu);
  if (st.phase == Phase::Idle) st.open_step();
  if (!st.averaging) return;
  if (st.phase == Phase::Finished) {
    throw InvalidArgument(fmt::format(
        "DataParallel: gradient of '{}' reported after finish_gradients() in step {}: call "
        "end_step() after the optimizer update, before the next backward pass",
        params_[index].name, st.step));
  }
  st.mark_ready(index, grad);
}

void DataParallel::State::mark_ready(size_t index, void* grad) {
  if (ready[index]) {
    throw InvalidArgument(fmt::format(
        "DataParallel: gradient of '{}' reported twice in step {} (is backward run twice per "
        "step? accumulating gradients over several backward passes needs finish_gradients() "
        "and end_step() in between)",
        dp.params_[index].name, step));
  }
  ready[index] = 1;
  step_grad[index] = grad;
  void* slot = dp.slot_data(index);
  if (grad != nullptr && grad != slot) std::memcpy(slot, grad, dp.params_[index].bytes());
  if (--pending[dp.slots_[index].bucket] == 0) launch_in_order();
}

void DataParallel::State::launch_in_order() {
  const AllreduceOptions opts{ReduceOp::Avg, dp.options_.timeout};
  while (next_launch < dp.buckets_.size() && pending[next_launch] == 0) {
    const Bucket& b = dp.buckets_[next_launch];
    void* data = static_cast<std::byte*>(dp.grad_storage_.get()) + dp.bucket_offset_[next_launch];
    if (weight != 1.0) scale_in_place(data, b.numel, b.dtype, weight);
    if (dp.runs_codecs()) {
      dp.compression_->submit(
          {next_launch, data, b.numel, b.dtype, dp.comm_.get(), dp.options_.timeout});
    } else {
      works[next_launch] = dp.comm_->allreduce_async(Buffer(data, b.numel, b.dtype), opts);
      stats.wire_bytes += codecs::ring_allreduce_bytes(b.bytes(), dp.comm_->size());
    }
    stats.bytes_allreduced += b.bytes();  // the payload before compression
    stats.bucket_allreduces += 1;
    ++next_launch;
  }
}

void DataParallel::set_gradient_weight(double weight) {
  if (!std::isfinite(weight) || weight < 0) {
    throw InvalidArgument(
        fmt::format("DataParallel::set_gradient_weight: {} is not a finite number >= 0", weight));
  }
  MutexLock lock(&state_->mu);
  if (state_->phase != Phase::Idle) {
    throw InvalidArgument(fmt::format(
        "DataParallel::set_gradient_weight called inside step {} (the step is open): call it "
        "between end_step() and the next step",
        state_->step));
  }
  state_->weight = weight;
}

double DataParallel::gradient_weight() const {
  MutexLock lock(&state_->mu);
  return state_->weight;
}

void DataParallel::begin_step() {
  MutexLock lock(&state_->mu);
  if (state_->phase == Phase::Idle) state_->open_step();
}

bool DataParallel::step_open() const {
  MutexLock lock(&state_->mu);
  return state_->phase != Phase::Idle;
}

int64_t DataParallel::step() const {
  MutexLock lock(&state_->mu);
  return state_->step;
}

void DataParallel::rebind(std::shared_ptr<Communicator> comm) {
  if (!comm) throw InvalidArgument("DataParallel::rebind: the communicator is null");
  drain();
  {
    MutexLock lock(&state_->mu);
    state_->works.assign(buckets_.size(), nullptr);
    state_->phase = Phase::Idle;
  }
  comm_ = std::move(comm);
  if (compression_) drop_codecs();
  check_model();
  if (options_.broadcast_initial) broadcast_model(0);
  start_compression();
}

void DataParallel::set_step(int64_t step) {
  if (step < 0) throw InvalidArgument(fmt::format("DataParallel::set_step: {} is negative", step));
  check_idle("set_step");
  if (compression_) compression_->anchor_valid = false;
  MutexLock lock(&state_->mu);
  state_->step = step;
  state_->synced_at = step;
}

bool DataParallel::step_averages_gradients() const {
  MutexLock lock(&state_->mu);
  if (state_->phase == Phase::Idle) {
    throw InvalidArgument(fmt::format(
        "DataParallel::step_averages_gradients: step {} is not open yet (the policy decides when "
        "it opens): call begin_step() first, or ask after the first grad_ready()",
        state_->step));
  }
  return state_->averaging;
}

// Holds the lock while it waits: grad_ready() may not run any more in this
// step (the contract), and the buckets in flight are this step's.
void DataParallel::finish_gradients() {
  State& st = *state_;
  MutexLock lock(&st.mu);
  if (st.phase == Phase::Idle) st.open_step();
  if (st.phase == Phase::Finished) return;
  st.phase = Phase::Finished;
  if (!st.averaging) return;
  // Parameters never reported contribute their gradient buffer as it is.
  for (size_t b = st.next_launch; b < buckets_.size(); ++b) {
    if (st.pending[b] == 0) continue;
    for (size_t i : buckets_[b].params) {
      if (!st.ready[i]) st.mark_ready(i, params_[i].grad);
    }
  }
  st.launch_in_order();
  // Compressed buckets first: their codec thread issues collectives, which
  // must all be issued before the buffers' on every rank alike.
  if (compression_) {
    st.stats.wait_seconds += compression_->wait(&st.stats.wire_bytes);
    // Every rank applies the same update now: the parameters move away from
    // the anchor of compressed parameter averages.
    compression_->anchor_valid = false;
  }
  std::vector<WorkPtr> buffer_works;
  DrainGuard guard(buffer_works);
  if (options_.sync_buffers) {
    uint64_t bytes = 0;
    buffer_works = start_buffer_sync(true, 0, &bytes);
    st.stats.bytes_allreduced += bytes;
    st.stats.wire_bytes += codecs::ring_allreduce_bytes(bytes, comm_->size());
  }
  st.stats.wait_seconds += wait_all(st.works);
  for (size_t i = 0; i < params_.size(); ++i) {
    void* g = st.step_grad[i];
    if (g != nullptr && slots_[i].bucket != SIZE_MAX && g != slot_data(i)) {
      std::memcpy(g, slot_data(i), params_[i].bytes());
    }
  }
  if (options_.sync_buffers) st.stats.wait_seconds += finish_buffer_sync(buffer_works, true, 0);
  st.stats.averaged_steps += 1;
}

void DataParallel::end_step() {
  finish_gradients();
  int64_t step = 0;
  {
    MutexLock lock(&state_->mu);
    state_->phase = Phase::Idle;
    step = state_->step;
  }
  // Not under the lock: the policy may average the parameters.
  policy_->after_update(step, *this);
  {
    MutexLock lock(&state_->mu);
    state_->step = step + 1;
    state_->stats.steps += 1;
  }
  if (compression_) after_step_compression(step + 1);
}

int64_t DataParallel::check_idle(const char* what) const {
  MutexLock lock(&state_->mu);
  if (state_->phase != Phase::Idle) {
    throw InvalidArgument(fmt::format(
        "DataParallel::{} called inside step {} (the step is open: begin_step() was called or a "
        "gradient was reported): call it between end_step() and the next step",
        what, state_->step));
  }
  return state_->step;
}

void DataParallel::synchronize() {
  const int64_t step = check_idle("synchronize");
  int64_t synced_at = 0;
  {
    MutexLock lock(&state_->mu);
    synced_at = state_->synced_at;
  }
  if (synced_at != step && policy_->parameters_may_differ(step)) average_parameters();
}

void DataParallel::average_parameters() {
  const int64_t step = check_idle("average_parameters");
  {
    MutexLock lock(&state_->mu);
    state_->stats.parameter_averages += 1;
    state_->synced_at = step;
  }
  if (comm_->size() == 1) return;
  uint64_t bytes = 0;
  uint64_t wire = 0;
  double waited = 0;
  if (compression_ && !compression_->param_codecs.empty()) {
    average_parameter_deltas(&wire, &waited);
    std::vector<WorkPtr> buffer_works;
    DrainGuard buffer_guard(buffer_works);
    if (options_.sync_buffers) {
      buffer_works = start_buffer_sync(true, 0, &bytes);
      waited += finish_buffer_sync(buffer_works, true, 0);
    }
  } else {
    auto works = start_flat(*param_flat_, true, 0, &bytes);
    DrainGuard guard(works);
    std::vector<WorkPtr> buffer_works;
    DrainGuard buffer_guard(buffer_works);
    if (options_.sync_buffers) buffer_works = start_buffer_sync(true, 0, &bytes);
    waited += finish_flat(*param_flat_, works, true, 0);
    if (options_.sync_buffers) waited += finish_buffer_sync(buffer_works, true, 0);
  }
  MutexLock lock(&state_->mu);
  state_->stats.bytes_allreduced += bytes;
  state_->stats.wire_bytes += wire + codecs::ring_allreduce_bytes(bytes, comm_->size());
  state_->stats.wait_seconds += waited;
}

// Each group of the parameter Flat in turn: its values minus the anchor
// (the last average) through its codec, plus the anchor again, which then
// becomes the new average; groups without a codec are averaged as they are.
void DataParallel::average_parameter_deltas(uint64_t* wire, double* waited) {
  Compression& c = *compression_;
  Flat& flat = *param_flat_;
  auto* anchor = static_cast<std::byte*>(c.anchor.get());
  // Without a valid anchor (see Compression::anchor_valid) this average is
  // sent uncompressed: it makes the replicas equal and becomes the anchor.
  const bool deltas = c.anchor_valid;
  for (size_t k = 0; k < flat.groups.size(); ++k) {
    const Flat::Group& g = flat.groups[k];
    flat.copy_in(g);
    GradientCodec* codec = deltas ? c.param_codecs[k].get() : nullptr;
    codecs::Stopwatch watch;
    if (codec == nullptr) {
      Buffer buf(flat.at(g.offset), g.numel, g.dtype);
      comm_->allreduce(buf, AllreduceOptions{ReduceOp::Avg, options_.timeout});
      *wire += codecs::ring_allreduce_bytes(buf.bytes(), comm_->size());
    } else {
      auto* x = reinterpret_cast<float*>(flat.at(g.offset));
      const auto* a = reinterpret_cast<const float*>(anchor + g.offset);
      for (size_t i = 0; i < g.numel; ++i) x[i] -= a[i];
      const uint64_t before = codec->stats().bytes_sent;
      codec->average(*comm_, std::span<float>(x, g.numel), options_.timeout);
      *wire += codec->stats().bytes_sent - before;
      for (size_t i = 0; i < g.numel; ++i) x[i] += a[i];
    }
    *waited += watch.lap();
    std::memcpy(anchor + g.offset, flat.at(g.offset), g.numel * dtype_size(g.dtype));
    flat.copy_out(g);
  }
  c.anchor_valid = true;
}

bool DataParallel::runs_codecs() const {
  if (!compression_) return false;
  for (const auto& codec : compression_->codecs) {
    if (codec) return true;
  }
  return false;
}

// After the model check (which compares the options across ranks), so that
// every rank builds the same codecs or fails alike.
void DataParallel::start_compression() {
  if (!compression_) return;
  validate_compression_options();
  Compression& c = *compression_;
  if (!c.options.automatic && c.options.codec != CodecKind::None) {
    for (size_t b = 0; b < buckets_.size(); ++b) {
      if (c.layouts[b].dtype == DType::Float32) {
        c.codecs[b] = make_codec(c.options, c.layouts[b], comm_->size());
      }
    }
  }
  if (c.parameter_options.codec != CodecKind::None) {
    c.param_codecs.clear();
    for (const Flat::Group& g : param_flat_->groups) {
      std::unique_ptr<GradientCodec> codec;
      if (g.dtype == DType::Float32) {
        CodecLayout layout{g.dtype, g.numel, {}};
        for (const Flat::Entry& e : g.entries) {
          layout.tensors.push_back(
              {e.tensor->name, (e.offset - g.offset) / sizeof(float), e.tensor->shape});
        }
        codec = make_codec(c.parameter_options, layout, comm_->size());
      }
      c.param_codecs.push_back(std::move(codec));
    }
    c.anchor = allocate_zeroed(param_flat_->total);
    c.anchor_valid = false;
  }
  // Local SGD without BSP warm-up never averages gradients: nothing to choose.
  const auto* local = dynamic_cast<const LocalSgdPolicy*>(policy_.get());
  const bool averages_gradients = local == nullptr || local->warmup_steps() > 0;
  if (c.options.automatic && averages_gradients) choose_compression();
}

// The residuals belong to the old communicator's average: start_compression()
// builds fresh codecs for the new one.
void DataParallel::drop_codecs() {
  Compression& c = *compression_;
  for (auto& codec : c.codecs) codec.reset();
  c.param_codecs.clear();
}

void DataParallel::after_step_compression(int64_t steps) {
  Compression& c = *compression_;
  if (c.current.codec == CodecKind::None) {
    // The automatic choice went back to none: the codecs that carried the
    // residual into this step's gradient are done.
    for (auto& codec : c.codecs) codec.reset();
  }
  const auto* local = dynamic_cast<const LocalSgdPolicy*>(policy_.get());
  const bool averages_gradients = local == nullptr || local->warmup_steps() > steps;
  if (c.options.automatic && c.options.recheck_steps > 0 && averages_gradients &&
      steps % c.options.recheck_steps == 0) {
    choose_compression();
  }
}

void DataParallel::sync_buffers() {
  check_idle("sync_buffers");
  if (comm_->size() == 1) return;
  uint64_t bytes = 0;
  auto works = start_buffer_sync(true, 0, &bytes);
  DrainGuard guard(works);
  const double waited = finish_buffer_sync(works, true, 0);
  MutexLock lock(&state_->mu);
  state_->stats.bytes_allreduced += bytes;
  state_->stats.wait_seconds += waited;
}

void DataParallel::broadcast_model(int root) {
  const int64_t step = check_idle("broadcast_model");
  if (root < 0 || root >= comm_->size()) {
    throw InvalidArgument(fmt::format("DataParallel::broadcast_model: root {} out of range", root));
  }
  {
    MutexLock lock(&state_->mu);
    state_->synced_at = step;
  }
  if (comm_->size() == 1) return;
  uint64_t sent = 0;
  double waited = broadcast_parameter_delta(root, &sent);
  auto buffer_works = start_buffer_sync(false, root, nullptr);
  DrainGuard buffer_guard(buffer_works);
  waited += finish_buffer_sync(buffer_works, false, root);
  if (compression_) compression_->anchor_valid = false;
  MutexLock lock(&state_->mu);
  state_->stats.wait_seconds += waited;
  state_->stats.bytes_broadcast += sent;
}

// The parameters, as a delta: every rank hashes its copy chunk by chunk
// (XXH3 of kDeltaChunk bytes of the flat storage), root broadcasts its
// hashes, the ranks agree (allreduce Max) on the chunks that differ
// anywhere, and only those are broadcast, in runs. Survivors rebinding after
// a failure hold rank 0's model already and send nothing but the hashes; a
// joiner gets the chunks it lacks (all of them, unless it loaded the same
// values). Returns the seconds waited.
double DataParallel::broadcast_parameter_delta(int root, uint64_t* sent_bytes) {
  Flat& flat = *param_flat_;
  if (flat.total == 0) return 0;
  for (const Flat::Group& g : flat.groups) flat.copy_in(g);
  const size_t chunks = (flat.total + kDeltaChunk - 1) / kDeltaChunk;
  std::vector<uint64_t> mine(chunks);
  for (size_t c = 0; c < chunks; ++c) {
    const size_t begin = c * kDeltaChunk;
    mine[c] = XXH3_64bits(flat.at(begin), std::min(kDeltaChunk, flat.total - begin));
  }
  std::vector<uint64_t> theirs = mine;
  const auto t0 = Clock::now();
  comm_->broadcast(Buffer(theirs.data(), chunks, DType::Int64),
                   BroadcastOptions{root, options_.timeout});
  std::vector<uint8_t> differs(chunks);
  for (size_t c = 0; c < chunks; ++c) differs[c] = mine[c] != theirs[c] ? 1 : 0;
  comm_->allreduce(Buffer(differs.data(), chunks, DType::UInt8),
                   AllreduceOptions{ReduceOp::Max, options_.timeout});
  std::vector<WorkPtr> works;
  DrainGuard guard(works);
  size_t sent = 0;
  for (size_t c = 0; c < chunks;) {
    if (!differs[c]) {
      ++c;
      continue;
    }
    size_t end = c;
    while (end < chunks && differs[end]) ++end;
    const size_t begin = c * kDeltaChunk;
    const size_t bytes = std::min(end * kDeltaChunk, flat.total) - begin;
    works.push_back(comm_->broadcast_async(Buffer(flat.at(begin), bytes, DType::UInt8),
                                           BroadcastOptions{root, options_.timeout}));
    sent += bytes;
    c = end;
  }
  wait_all(works);
  if (comm_->rank() != root && sent > 0) {
    for (const Flat::Group& g : flat.groups) flat.copy_out(g);
  }
  WEFT_DEBUG("DataParallel: parameters broadcast from rank {}: {} of {} bytes differed", root, sent,
             flat.total);
  *sent_bytes += sent;
  return seconds_since(t0);
}

std::vector<WorkPtr> DataParallel::start_flat(Flat& flat, bool average, int root, uint64_t* bytes) {
  std::vector<WorkPtr> works;
  const bool is_root = comm_->rank() == root;
  for (const Flat::Group& g : flat.groups) {
    if (average || is_root) flat.copy_in(g);
    Buffer buf(flat.at(g.offset), g.numel, g.dtype);
    if (average) {
      works.push_back(comm_->allreduce_async(buf, {ReduceOp::Avg, options_.timeout}));
      if (bytes != nullptr) *bytes += buf.bytes();
    } else {
      works.push_back(comm_->broadcast_async(buf, {root, options_.timeout}));
    }
  }
  return works;
}

double DataParallel::finish_flat(Flat& flat, std::vector<WorkPtr>& works, bool average, int root) {
  DrainGuard guard(works);
  const bool is_root = comm_->rank() == root;
  double waited = 0;
  for (size_t k = 0; k < works.size(); ++k) {
    const auto t0 = Clock::now();
    works[k]->wait(options_.timeout);
    waited += seconds_since(t0);
    works[k].reset();
    if (average || !is_root) flat.copy_out(flat.groups[k]);
  }
  return waited;
}

// Floating-point buffers are averaged (or broadcast), the others broadcast
// from rank 0 (or root), in place.
std::vector<WorkPtr> DataParallel::start_buffer_sync(bool average, int root, uint64_t* bytes) {
  std::vector<WorkPtr> works = start_flat(*buffer_flat_, average, root, bytes);
  for (const StateBuffer& b : buffers_) {
    if (dtype_is_floating(b.dtype) || b.numel() == 0) continue;
    works.push_back(comm_->broadcast_async(Buffer(b.data, b.numel(), b.dtype),
                                           {average ? 0 : root, options_.timeout}));
  }
  return works;
}

double DataParallel::finish_buffer_sync(std::vector<WorkPtr>& works, bool average, int root) {
  const size_t groups = buffer_flat_->groups.size();
  std::vector<WorkPtr> flat_works(works.begin(), works.begin() + static_cast<ptrdiff_t>(groups));
  std::vector<WorkPtr> rest(works.begin() + static_cast<ptrdiff_t>(groups), works.end());
  works.clear();
  DrainGuard guard(flat_works);
  DrainGuard rest_guard(rest);
  const double waited = finish_flat(*buffer_flat_, flat_works, average, root);
  return waited + wait_all(rest);
}

double DataParallel::wait_all(std::vector<WorkPtr>& works) {
  DrainGuard guard(works);
  const auto t0 = Clock::now();
  for (WorkPtr& w : works) {
    if (!w) continue;
    w->wait(options_.timeout);
    w.reset();
  }
  return seconds_since(t0);
}

DataParallelStats DataParallel::stats() const {
  MutexLock lock(&state_->mu);
  DataParallelStats out = state_->stats;
  if (compression_) out.codec_switches = compression_->switches;
  return out;
}

}  // namespace weft::train
