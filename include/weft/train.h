// The data-parallel training engine: gradient buckets whose allreduce
// overlaps the backward pass, sync policies (BSP, local SGD) and learning
// rate schedules.
//
// The engine knows no tensor library. A model is a list of named parameters
// (dtype, shape, a pointer to the values and one to the gradient) and of
// named state buffers (e.g. batch-norm running statistics). An adapter
// (weft/torch.h for libtorch) or a hand-written training loop drives it:
//
//   std::vector<weft::train::Parameter> params = ...;   // name, dtype, shape, data, grad
//   weft::train::DataParallel dp(comm, params);         // checks + broadcasts rank 0's model
//   for (each step) {
//     dp.begin_step();         // optional: the first grad_ready() opens the step too
//     zero the gradients; forward;
//     backward, calling dp.grad_ready(i) as soon as parameter i's gradient is final;
//     dp.finish_gradients();   // waits for the averaged gradients
//     optimizer update;        // reads the gradients, writes the parameters
//     dp.end_step();           // local SGD: averages the parameters every H steps
//   }
//
// Buckets. The trainable parameters are grouped into buckets, in reverse
// order of the list (backward produces the gradients of the last layers
// first), one dtype per bucket. Each bucket owns a contiguous flat buffer
// holding its parameters' gradients side by side. A bucket is closed as soon
// as it holds at least BucketOptions::bucket_bytes (25 MiB by default); the
// first bucket of each dtype closes at first_bucket_bytes (1 MiB) instead,
// so that communication starts early in the backward pass. A parameter is
// never split between buckets.
//
// Overlap. When the last gradient of a bucket is reported with grad_ready(),
// the bucket's allreduce (ReduceOp::Avg) starts at once on the
// communicator's collective thread while backward goes on. Buckets are
// launched strictly in bucket order, on every rank the same, so that ranks
// that see their gradients become ready in different orders still issue the
// same collectives in the same order: a bucket that completes before an
// earlier one waits for it. finish_gradients() launches what is left, waits,
// and leaves the averaged gradients where the model reads them.
//
// Zero copy. Each parameter has a slot in its bucket's buffer (grad_slot()).
// When a parameter's gradient lives in its slot (an adapter can make the
// tensor library's gradient a view of it, as weft::torch does), nothing is
// copied; otherwise the gradient is copied into the slot when it is reported
// ready and the average is copied back in finish_gradients().
//
// Sync policies decide, step by step, whether gradients are averaged and
// what happens after the optimizer update (SyncPolicy below): BSP averages
// the gradients every step; local SGD lets every rank step alone and
// averages the parameters every H steps, optionally after BSP warm-up steps
// (post-local SGD). SSP and asynchronous parameter-server policies plug into
// the same interface.
//
// Collectives: the engine issues collectives on the communicator it was
// given, in the same order on every rank as long as every rank runs the same
// sequence of engine calls (same number of steps). Do not issue other
// collectives on that communicator between the first grad_ready() of a step
// and finish_gradients() (buckets may be in flight); outside that window the
// application may use it freely, e.g. to evaluate or to agree on a loss.
//
// Errors. A communication failure (weft::CommError and subclasses) thrown
// by grad_ready(), finish_gradients(), end_step() or synchronize() leaves
// the engine unusable: destroy it with its communicator. Misuse (an index
// out of range, a gradient reported twice in one step, calls out of order)
// throws weft::InvalidArgument naming the parameter, and changes nothing.
// Models that differ across ranks make the constructor throw
// weft::InvalidArgument on every rank, naming the first differing parameter
// and the ranks involved.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "weft/communicator.h"
#include "weft/compress.h"
#include "weft/timeout.h"
#include "weft/types.h"
#include "weft/work.h"

namespace weft::train {

// ---------------------------------------------------------------------------
// The model as the engine sees it
// ---------------------------------------------------------------------------

// A learnable tensor: contiguous, row-major, of a floating dtype.
struct Parameter {
  std::string name;  // unique within the model, e.g. "conv1.weight"
  DType dtype = DType::Float32;
  std::vector<int64_t> shape;  // empty for a scalar
  // The values: broadcast from rank 0 at start, read and written by the
  // optimizer, averaged by local SGD. Must stay valid for the engine's life.
  void* data = nullptr;
  // The gradient (numel() elements of dtype), or nullptr when the gradient
  // lives in the engine's slot (grad_slot()). grad_ready(i, ptr) can change
  // it step by step.
  void* grad = nullptr;
  // False for a frozen parameter: it is broadcast at start and averaged with
  // the others by local SGD, but has no gradient and no place in a bucket.
  bool trainable = true;

  size_t numel() const;
  size_t bytes() const { return numel() * dtype_size(dtype); }
};

// A non-learnable tensor of model state (e.g. batch-norm running mean and
// variance, or a counter), contiguous.
struct StateBuffer {
  std::string name;
  DType dtype = DType::Float32;
  std::vector<int64_t> shape;
  void* data = nullptr;

  size_t numel() const;
  size_t bytes() const { return numel() * dtype_size(dtype); }
};

// "float32 [128, 3136]".
std::string describe_shape(DType dtype, std::span<const int64_t> shape);

// ---------------------------------------------------------------------------
// Buckets
// ---------------------------------------------------------------------------

struct BucketOptions {
  // A bucket closes as soon as it holds at least this many bytes (a single
  // parameter larger than that gets a bucket of its own). > 0.
  size_t bucket_bytes = size_t{25} << 20;
  // Same for the first bucket of each dtype (the first to be filled by
  // backward), smaller so that the first allreduce starts early. > 0.
  size_t first_bucket_bytes = size_t{1} << 20;
};

// One bucket: parameters of one dtype, with their place in a flat buffer.
struct Bucket {
  DType dtype = DType::Float32;
  std::vector<size_t> params;   // indices into the parameter list, in the order they fill
  std::vector<size_t> offsets;  // element offset of each in the flat buffer
  size_t numel = 0;             // elements of the flat buffer
  size_t bytes() const { return numel * dtype_size(dtype); }
};

// The bucket plan: the trainable parameters, walked from the last to the
// first, are appended to the open bucket of their dtype, which closes once
// it reaches its size limit (see BucketOptions). Buckets are ordered by when
// they start to fill, i.e. by their expected readiness in backward; every
// trainable parameter is in exactly one bucket. A pure function of the
// parameters' dtypes, sizes and flags, so every rank computes the same plan.
// Throws weft::InvalidArgument for a zero size limit.
std::vector<Bucket> assign_buckets(std::span<const Parameter> params,
                                   const BucketOptions& options = {});

// ---------------------------------------------------------------------------
// Sync policies
// ---------------------------------------------------------------------------

class DataParallel;

// How ranks stay in agreement, decided step by step. Steps are counted by
// the engine from 0 (DataParallel::step()). A policy must make the same
// decisions on every rank for the same step, since each decision means
// collectives every rank joins.
//
// Where later policies plug in: SSP and asynchronous parameter-server
// training return false from average_gradients() and push gradients / pull
// parameters in after_update() (blocking there while a worker is more than
// the staleness bound ahead), through DataParallel's accessors.
//
// Called from the thread that drives the engine, never concurrently.
class SyncPolicy {
 public:
  virtual ~SyncPolicy() = default;
  // For messages and logs: "bsp", "local-sgd(H=8, warmup=100)".
  virtual std::string name() const = 0;
  // True when the gradients of `step` are averaged over the ranks (buckets
  // allreduced during backward). Asked once per step, when its first
  // gradient is reported (or at finish_gradients()).
  virtual bool average_gradients(int64_t step) = 0;
  // Called by DataParallel::end_step() after the optimizer has updated the
  // parameters of `step`. May communicate, e.g. engine.average_parameters().
  virtual void after_update(int64_t step, DataParallel& engine) = 0;
  // True when the parameters of the ranks may differ now, after `steps`
  // completed steps (DataParallel::synchronize() then averages them).
  virtual bool parameters_may_differ(int64_t steps) const = 0;
};

// Bulk synchronous parallel: every step averages the gradients, so every
// rank applies the same update and the parameters stay identical.
class BspPolicy final : public SyncPolicy {
 public:
  std::string name() const override { return "bsp"; }
  bool average_gradients(int64_t) override { return true; }
  void after_update(int64_t, DataParallel&) override {}
  bool parameters_may_differ(int64_t) const override { return false; }
};

// Local SGD: after `warmup_steps` BSP steps (post-local SGD; 0 for plain
// local SGD), every rank updates its own parameters from its own gradients,
// and the parameters (and state buffers) are averaged after every
// `local_steps`-th local step. Optimizer state (e.g. momentum) stays local.
class LocalSgdPolicy final : public SyncPolicy {
 public:
  // local_steps >= 1, warmup_steps >= 0, else weft::InvalidArgument.
  explicit LocalSgdPolicy(int64_t local_steps, int64_t warmup_steps = 0);
  std::string name() const override;
  bool average_gradients(int64_t step) override { return step < warmup_steps_; }
  void after_update(int64_t step, DataParallel& engine) override;
  bool parameters_may_differ(int64_t steps) const override;
  int64_t local_steps() const { return local_steps_; }
  int64_t warmup_steps() const { return warmup_steps_; }

 private:
  int64_t local_steps_;
  int64_t warmup_steps_;
};

enum class SyncMode : uint8_t {
  BSP,       // BspPolicy
  LocalSGD,  // LocalSgdPolicy(local_steps, warmup_steps)
  // Room for SSP and AsyncPS (parameter server) when src/ps/ exists.
};
// "bsp", "local-sgd".
std::string_view sync_mode_name(SyncMode mode);
// Parses "bsp", "local-sgd" (also "localsgd", "local_sgd"); throws
// weft::InvalidArgument listing the valid names otherwise.
SyncMode parse_sync_mode(std::string_view name);

// ---------------------------------------------------------------------------
// The engine
// ---------------------------------------------------------------------------

struct DataParallelOptions {
  BucketOptions buckets;
  SyncMode sync = SyncMode::BSP;
  int64_t local_steps = 8;   // H of local SGD
  int64_t warmup_steps = 0;  // BSP steps before local SGD starts
  // A policy of the application's own; when set, sync, local_steps and
  // warmup_steps are ignored.
  std::shared_ptr<SyncPolicy> policy;
  // Keep state buffers consistent: at every synchronization point (each
  // averaged-gradient step, each parameter average) floating-point buffers
  // are averaged and the others (counters) are copied from rank 0. When
  // false, buffers are only broadcast at start.
  bool sync_buffers = true;
  // Broadcast rank 0's parameters and buffers at construction (after the
  // model check), so that every rank starts from the same model.
  bool broadcast_initial = true;
  // Deadline of each collective the engine waits for.
  Timeout timeout = kDefaultTimeout;
  // Gradient compression (weft/compress.h): a codec per float32 bucket,
  // with error feedback, or `automatic` (measured at construction and every
  // compression.recheck_steps steps). Compressed buckets are reduced on the
  // engine's codec thread, in bucket order, while backward goes on; other
  // buckets (float64, float16, bfloat16) are sent as they are. Checked at
  // construction (weft::InvalidArgument naming the option), and compared
  // across ranks with the model.
  CompressionOptions compression;
  // Parameter averaging (local SGD, average_parameters()) as compressed
  // deltas: each rank sends the change of its float32 parameters since the
  // last average through this codec, whose residual carries forward what
  // was not sent; every rank then sets its parameters to the last average
  // plus the averaged deltas, so they are equal again. A named codec (not
  // automatic); none: the parameters themselves are averaged.
  CompressionOptions parameter_compression;
};

// Counters since construction.
struct DataParallelStats {
  int64_t steps = 0;               // end_step() calls
  int64_t averaged_steps = 0;      // steps whose gradients were averaged
  int64_t bucket_allreduces = 0;   // gradient buckets reduced
  int64_t parameter_averages = 0;  // average_parameters() calls
  uint64_t bytes_allreduced = 0;   // payload of every allreduce the engine issued (gradient
                                   // buckets: before compression)
  // Bytes this rank put on the wire for gradient buckets and parameter
  // averages, by the model of each codec (a float32 ring allreduce of B
  // bytes on n ranks sends 2 (n - 1) / n * B).
  uint64_t wire_bytes = 0;
  int64_t codec_switches = 0;  // changes of the automatic choice (after the first)
  // Parameter bytes broadcast_model() sent (construction, rebind): only the
  // 64 KiB chunks that differed from root's on some rank.
  uint64_t bytes_broadcast = 0;
  double wait_seconds = 0;  // time spent blocked on communication
};

// The data-parallel engine for one model replica per rank.
//
// Thread safety: grad_ready() may be called from any thread, also from
// several at once (e.g. autograd worker threads). The other methods must be
// called from one thread at a time and not while a grad_ready() call is
// running. The parameter and gradient memory belongs to the engine from the
// first grad_ready() of a step until finish_gradients() returns (buckets in
// flight read and write it): the application must not touch it in between,
// except that the backward pass may still write gradients not yet reported.
class DataParallel {
 public:
  // Builds the bucket plan, checks that every rank has the same model
  // (names, dtypes, shapes and flags of the parameters and buffers, in
  // order; else weft::InvalidArgument on every rank naming the first
  // difference), and broadcasts rank 0's parameters and buffers (see
  // options.broadcast_initial). Collective: every rank of comm calls it.
  // Throws weft::InvalidArgument for a null pointer, a non-floating
  // parameter, duplicate names or bad options.
  DataParallel(std::shared_ptr<Communicator> comm, std::vector<Parameter> params,
               std::vector<StateBuffer> buffers = {}, DataParallelOptions options = {});
  // Releases the buckets. If gradient allreduces of an unfinished step are
  // still in flight (the step was abandoned, e.g. by an exception during
  // backward), the communicator is aborted first, so that the peers fail
  // at once instead of waiting for buckets this rank will never send.
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  // ---- One step ---------------------------------------------------------

  // Opens the step: asks the policy, once, whether this step's gradients are
  // averaged (SyncPolicy::average_gradients()). The first grad_ready() of a
  // step, and finish_gradients(), open it when it is not open yet; call
  // begin_step() to know step_averages_gradients() before any gradient is
  // reported. Does nothing when the step is already open. After it, until
  // end_step(), the collective building blocks below are refused.
  void begin_step();

  // Reports that the gradient of trainable parameter `index` is final for
  // this step (backward will not add to it any more). When that completes a
  // bucket, and all earlier buckets are launched, its allreduce starts. The
  // second form also records where the gradient is this step (nullptr: in
  // its slot). Reporting a parameter twice in a step whose gradients are
  // averaged throws weft::InvalidArgument (gradient accumulation over
  // several backward passes needs finish_gradients() in between).
  void grad_ready(size_t index);
  void grad_ready(size_t index, void* grad);

  // Call between backward and the optimizer update. When this step's
  // gradients are averaged: launches the buckets not launched yet (a
  // parameter that was never reported contributes what its gradient buffer
  // holds), waits for all of them and leaves every gradient averaged over
  // the ranks; also syncs state buffers (options.sync_buffers). Otherwise
  // returns at once. Calling it twice in a step is harmless.
  void finish_gradients();

  // Call after the optimizer update: closes the step (calling
  // finish_gradients() first if it was not) and runs the policy's
  // after_update() (local SGD averages the parameters there).
  void end_step();

  // The weight of this rank's gradients in the average, from the next step
  // on (1 by default): each bucket is multiplied by it just before its
  // allreduce (ReduceOp::Avg). Load balancing (weft/balance.h) gives rank i,
  // which computed the mean gradient over s_i of a step's B samples, the
  // weight W * s_i / B (weft::balance::gradient_weight), so that the
  // average is exactly the mean gradient of the B samples. A weight of 0
  // sends zeros whatever the gradient holds (a rank with no sample this
  // step). A weight of 1 costs nothing. Not inside a step; `weight` finite
  // and >= 0, else weft::InvalidArgument. Ignored by steps whose gradients
  // are not averaged (local SGD).
  void set_gradient_weight(double weight);
  double gradient_weight() const;

  // Elastic training: continues on `comm` (a new generation, after a
  // failure or a join) instead of the current communicator. A step left
  // open by a failure is abandoned: its allreduces still in flight are
  // failed (the old communicator is aborted when one still runs) and waited
  // for, and the next step starts afresh. Collective on `comm`, with the
  // same calls as the constructor (the model check, and the broadcast of
  // rank 0's model when options.broadcast_initial), so that the members
  // rebinding and a worker joining (constructing its engine on `comm`) meet
  // in the same calls. The caller then restores the committed state.
  void rebind(std::shared_ptr<Communicator> comm);
  // Sets the count of completed steps (after restoring a commit or a
  // checkpoint: local SGD's schedule counts from it). Not inside a step.
  void set_step(int64_t step);

  // Makes the parameters and buffers equal on every rank now (averages them
  // when the policy says they may differ, e.g. before evaluating or saving a
  // local SGD model). Collective. Not inside a step.
  void synchronize();

  // ---- Collective building blocks (for policies and the application) ----
  // All collective, not inside a step (between end_step() and the next
  // grad_ready()).

  // Averages every parameter (and, with sync_buffers, every buffer) over
  // the ranks, bucket by bucket.
  void average_parameters();
  // Averages floating-point buffers and copies the others from rank 0.
  void sync_buffers();
  // Copies root's parameters and buffers to every rank. The parameters go
  // as a delta: root's chunk hashes first, then only the chunks that differ
  // on some rank (survivors of a failure, identical already, send none).
  void broadcast_model(int root = 0);

  // ---- Introspection ----------------------------------------------------

  // Where parameter `index`'s gradient is kept in its bucket's flat buffer
  // (trainable parameters only; InvalidArgument otherwise). The memory is
  // zero-initialised, stays at the same address for the engine's life, and
  // is kept alive by storage_owner() as well.
  Buffer grad_slot(size_t index) const;
  // Shares ownership of the bucket memory, so that views of grad_slot()
  // handed to a tensor library may outlive the engine.
  std::shared_ptr<void> storage_owner() const { return grad_storage_; }

  // Completed steps (end_step() calls).
  int64_t step() const;
  // Whether a step is open: from begin_step() (or the first grad_ready(),
  // or finish_gradients()) to end_step().
  bool step_open() const;
  // Whether the gradients of the open step are (or will be) averaged. A
  // query: it changes nothing. Between end_step() and the opening of the
  // next step the policy has not been asked yet, so it throws
  // weft::InvalidArgument (call begin_step() first).
  bool step_averages_gradients() const;
  const std::vector<Parameter>& parameters() const { return params_; }
  const std::vector<StateBuffer>& buffers() const { return buffers_; }
  const std::vector<Bucket>& buckets() const { return buckets_; }
  SyncPolicy& policy() const { return *policy_; }
  Communicator& communicator() const { return *comm_; }
  const DataParallelOptions& options() const { return options_; }
  DataParallelStats stats() const;
  // The gradient codec in use: "none", "int8(chunk=1024)"; with automatic
  // compression "auto->" and the choice, e.g. "auto->powersgd:4".
  std::string compression() const;
  // The measurements behind the last automatic choice (empty otherwise).
  std::vector<CodecTiming> compression_timings() const;

 private:
  // Idle: between end_step() and the first call of the next step; Open:
  // gradients being reported; Finished: after finish_gradients().
  enum class Phase : uint8_t { Idle, Open, Finished };
  struct Slot {
    size_t bucket = SIZE_MAX;
    size_t offset = 0;  // elements into the bucket
  };
  // Flat copies of a set of tensors for collectives over the whole model.
  struct Flat;

  // The state that steps change, and its lock (data_parallel.cc).
  struct State;

  void check_model();
  void check_options();
  // Throws unless the step is idle; returns the completed steps.
  int64_t check_idle(const char* what) const;
  void* slot_data(size_t index) const;
  // Collectives over a Flat: start() copies in and issues them (average, or
  // broadcast from root; adds the bytes averaged to *bytes), finish() waits
  // and copies out (returns the seconds it waited).
  std::vector<WorkPtr> start_flat(Flat& flat, bool average, int root, uint64_t* bytes);
  double finish_flat(Flat& flat, std::vector<WorkPtr>& works, bool average, int root);
  std::vector<WorkPtr> start_buffer_sync(bool average, int root, uint64_t* bytes);
  double finish_buffer_sync(std::vector<WorkPtr>& works, bool average, int root);
  double wait_all(std::vector<WorkPtr>& works);
  void drain() noexcept;

  std::shared_ptr<Communicator> comm_;
  std::vector<Parameter> params_;
  std::vector<StateBuffer> buffers_;
  DataParallelOptions options_;
  std::shared_ptr<SyncPolicy> policy_;

  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_offset_;  // byte offset of each bucket in grad_storage_
  std::vector<Slot> slots_;            // per parameter
  std::shared_ptr<void> grad_storage_;

  std::unique_ptr<Flat> param_flat_;   // all parameters, for averaging/broadcast
  std::unique_ptr<Flat> buffer_flat_;  // floating-point buffers

  // Gradient and parameter codecs, the codec thread and the automatic
  // choice (src/train/engine_compression.h); null without compression.
  struct Compression;
  // Lays the buckets out for codecs (construction, before the model check).
  void setup_compression();
  void validate_compression_options() const;
  // After the initial broadcast (construction, rebind): the codecs, the
  // parameter codecs and their anchor; the automatic choice (collective).
  void start_compression();
  // A new communicator (rebind): drops the codecs (start_compression()
  // builds them for its size).
  void drop_codecs();
  // After end_step(): drops codecs the automatic choice left behind, and
  // measures again every recheck_steps steps (collective).
  void after_step_compression(int64_t steps);
  // Whether this step's buckets go through the codec thread.
  bool runs_codecs() const;
  // average_parameters() with parameter codecs: each group as a delta from
  // the anchor, one after the other.
  void average_parameter_deltas(uint64_t* bytes, double* waited);
  // broadcast_model()'s parameters: only the chunks that differ from root's.
  double broadcast_parameter_delta(int root, uint64_t* sent_bytes);
  // Measures the candidates on the current communicator and switches to
  // the choice (collective; automatic compression only).
  void choose_compression();
  std::unique_ptr<Compression> compression_;

  // The per-step state (grad_ready may be concurrent) and the lock that
  // guards it, behind a pointer: its lock is a weft::Mutex whose use clang's
  // thread-safety analysis checks (src/core/, which this installed header
  // cannot include).
  std::unique_ptr<State> state_;
};

// ---------------------------------------------------------------------------
// Learning-rate schedules
// ---------------------------------------------------------------------------

enum class LrScheduleKind : uint8_t {
  Constant,  // base_lr
  Step,      // base_lr * gamma^(number of milestones <= step)
  Cosine,    // min_lr + (base_lr - min_lr) * (1 + cos(pi * t)) / 2, t from 0 to 1 at total_steps
};
// "constant", "step", "cosine".
std::string_view lr_schedule_name(LrScheduleKind kind);
// Parses those names; throws weft::InvalidArgument otherwise.
LrScheduleKind parse_lr_schedule(std::string_view name);

// The learning rate of each step (0-based), with an optional linear
// warm-up: during the first warmup_steps steps the rate rises linearly from
// base_lr * warmup_start_factor to base_lr; the decay (Step milestones,
// Cosine progress) is counted from the end of the warm-up. A pure function:
// every rank computes the same rate.
struct LrSchedule {
  LrScheduleKind kind = LrScheduleKind::Constant;
  double base_lr = 0.05;
  int64_t warmup_steps = 0;
  double warmup_start_factor = 0.1;
  // Step: steps (after warm-up) at which the rate is multiplied by gamma.
  std::vector<int64_t> milestones;
  double gamma = 0.1;
  // Cosine: steps of the whole run, warm-up included; the rate reaches
  // min_lr there and stays.
  int64_t total_steps = 0;
  double min_lr = 0.0;

  double at(int64_t step) const;
};

}  // namespace weft::train
