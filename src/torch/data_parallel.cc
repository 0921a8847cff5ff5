// weft::torch::DataParallel (see weft/torch.h): a torch::nn::Module's
// parameters and buffers handed to the engine, gradients as tensors over the
// engine's bucket slots, and gradient-accumulator hooks that report each
// gradient as soon as autograd has finished it.
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <malloc.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

#include "core/log.h"
#include "core/mutex.h"
#include "weft/errors.h"
#include "weft/torch.h"

namespace weft::torch {
namespace {

DType to_dtype(at::ScalarType t, const std::string& what) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    case at::kInt: return DType::Int32;
    case at::kLong: return DType::Int64;
    case at::kByte: return DType::UInt8;
    default: break;
  }
  throw InvalidArgument(
      fmt::format("weft::torch::DataParallel: {} has dtype {}, which Weft cannot communicate", what,
                  c10::toString(t)));
}

void check_tensor(const at::Tensor& t, const std::string& what) {
  if (!t.device().is_cpu()) {
    throw InvalidArgument(
        fmt::format("weft::torch::DataParallel: {} is on {}: only CPU tensors are supported", what,
                    t.device().str()));
  }
  if (!t.is_contiguous()) {
    throw InvalidArgument(fmt::format("weft::torch::DataParallel: {} is not contiguous", what));
  }
}

std::vector<int64_t> shape_of(const at::Tensor& t) { return {t.sizes().begin(), t.sizes().end()}; }

// glibc serves a large allocation (128 KiB at first) with mmap and moves
// that threshold with the sizes it sees freed; the heap's top is trimmed
// back to the kernel past twice the threshold. A CPU training step frees
// and allocates activations of a few MiB each, and once the thresholds
// move the wrong way every step pays fresh page faults for them: measured
// here, Fashion-MNIST at one worker with a codec thread ran at 448
// samples/s against 1253 without it, with 84k page faults every 2 s
// against none. Fixed thresholds (which also stop glibc moving them) keep
// the memory in the process. The user's own setting wins: GLIBC_TUNABLES
// naming a threshold, or the older MALLOC_*_THRESHOLD_ variables.
constexpr int kMmapThreshold = 32 << 20;  // glibc's largest dynamic value
constexpr int kTrimThreshold = 64 << 20;

void keep_freed_memory() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char* tunables = std::getenv("GLIBC_TUNABLES");
    if ((tunables != nullptr && std::strstr(tunables, "threshold") != nullptr) ||
        std::getenv("MALLOC_MMAP_THRESHOLD_") != nullptr ||
        std::getenv("MALLOC_TRIM_THRESHOLD_") != nullptr) {
      WEFT_DEBUG("weft::torch: malloc thresholds left as the environment set them");
      return;
    }
    if (mallopt(M_MMAP_THRESHOLD, kMmapThreshold) != 1 ||
        mallopt(M_TRIM_THRESHOLD, kTrimThreshold) != 1) {
      WEFT_WARN("weft::torch: mallopt refused the malloc thresholds; steps may page-fault");
    }
  });
}

}  // namespace

void set_threads(int intra_op) {
  if (intra_op < 1) {
    throw InvalidArgument(fmt::format("weft::torch::set_threads: {} threads", intra_op));
  }
  try {
    at::set_num_interop_threads(1);
  } catch (const c10::Error&) {
    // The inter-op pool already started (or was set): keep it.
  }
  at::set_num_threads(intra_op);
}

struct DataParallel::Impl {
  std::shared_ptr<::torch::nn::Module> module;
  std::vector<at::Tensor> params;  // in engine order
  std::vector<at::Tensor> slots;   // per parameter: the tensor over its bucket slot (or undefined)
  std::unique_ptr<train::DataParallel> engine;
  std::vector<std::pair<std::shared_ptr<::torch::autograd::Node>, uintptr_t>> hooks;

  Mutex mu;                                   // hooks may run on autograd threads
  std::vector<char> reported GUARDED_BY(mu);  // per parameter, this step
  bool finished = false;                      // finish_gradients() ran this step

  // The gradient of parameter i as a contiguous tensor of its dtype, made
  // the slot tensor when it is undefined.
  void* gradient_pointer(size_t i) {
    at::Tensor& g = params[i].mutable_grad();
    if (!g.defined()) {
      g = slots[i];
      g.zero_();
    } else if (!g.is_same(slots[i]) &&
               (!g.is_contiguous() || g.scalar_type() != params[i].scalar_type() ||
                !g.device().is_cpu())) {
      g = g.to(params[i].options()).contiguous();
    }
    return g.data_ptr();
  }

  void on_gradient(size_t i) {
    {
      MutexLock lock(&mu);
      reported[i] = 1;
    }
    engine->grad_ready(i, gradient_pointer(i));
  }
};

DataParallel::DataParallel(std::shared_ptr<::torch::nn::Module> module,
                           std::shared_ptr<Communicator> comm, train::DataParallelOptions options)
    : impl_(std::make_unique<Impl>()) {
  if (!module) throw InvalidArgument("weft::torch::DataParallel: the module is null");
  if (!comm) throw InvalidArgument("weft::torch::DataParallel: the communicator is null");
  keep_freed_memory();
  Impl& m = *impl_;
  m.module = std::move(module);

  std::vector<train::Parameter> params;
  for (const auto& item : m.module->named_parameters(/*recurse=*/true)) {
    const at::Tensor& t = item.value();
    const std::string what = fmt::format("parameter '{}'", item.key());
    check_tensor(t, what);
    params.push_back({item.key(), to_dtype(t.scalar_type(), what), shape_of(t), t.data_ptr(),
                      nullptr, t.requires_grad()});
    m.params.push_back(t);
  }
  std::vector<train::StateBuffer> buffers;
  for (const auto& item : m.module->named_buffers(/*recurse=*/true)) {
    const at::Tensor& t = item.value();
    if (!t.defined()) continue;
    const std::string what = fmt::format("buffer '{}'", item.key());
    check_tensor(t, what);
    buffers.push_back({item.key(), to_dtype(t.scalar_type(), what), shape_of(t), t.data_ptr()});
  }
  m.engine = std::make_unique<train::DataParallel>(std::move(comm), std::move(params),
                                                   std::move(buffers), std::move(options));

  // Gradients over the bucket slots, and a hook on each gradient accumulator.
  m.slots.resize(m.params.size());
  m.reported.assign(m.params.size(), 0);
  const std::shared_ptr<void> owner = m.engine->storage_owner();
  Impl* impl = impl_.get();
  for (size_t i = 0; i < m.params.size(); ++i) {
    at::Tensor& p = m.params[i];
    if (!p.requires_grad()) continue;
    Buffer slot = m.engine->grad_slot(i);
    m.slots[i] = at::from_blob(
        slot.data(), p.sizes(), [owner](void*) {}, p.options().requires_grad(false));
    if (p.grad().defined()) m.slots[i].copy_(p.grad());
    p.mutable_grad() = m.slots[i];
    std::shared_ptr<::torch::autograd::Node> acc = ::torch::autograd::impl::grad_accumulator(p);
    if (!acc) {
      throw InvalidArgument(
          fmt::format("weft::torch::DataParallel: parameter '{}' is not a leaf tensor",
                      m.engine->parameters()[i].name));
    }
    const uintptr_t key =
        acc->add_post_hook(std::make_unique<::torch::autograd::utils::LambdaPostHook>(
            [impl, i](const ::torch::autograd::variable_list& outputs,
                      const ::torch::autograd::variable_list&) {
              impl->on_gradient(i);
              return outputs;
            }));
    m.hooks.emplace_back(std::move(acc), key);
  }
}

DataParallel::~DataParallel() {
  for (auto& [acc, key] : impl_->hooks) acc->del_post_hook(key);
}

void DataParallel::zero_grad() {
  Impl& m = *impl_;
  for (size_t i = 0; i < m.params.size(); ++i) {
    if (!m.slots[i].defined()) continue;
    at::Tensor& g = m.params[i].mutable_grad();
    if (!g.defined() || !g.is_same(m.slots[i])) g = m.slots[i];
    g.zero_();
  }
}

void DataParallel::finish_gradients() {
  Impl& m = *impl_;
  if (m.finished) return;
  m.engine->begin_step();  // a step whose backward reported nothing opens here
  if (m.engine->step_averages_gradients()) {
    // Parameters that took no part in the loss: report what their gradient
    // holds (zeros once zeroed), so that they receive the average too.
    for (size_t i = 0; i < m.params.size(); ++i) {
      bool reported;
      {
        MutexLock lock(&m.mu);
        reported = m.reported[i] != 0;
      }
      if (!reported && m.slots[i].defined()) m.engine->grad_ready(i, m.gradient_pointer(i));
    }
  }
  m.engine->finish_gradients();
  m.finished = true;
}

void DataParallel::end_step() {
  Impl& m = *impl_;
  finish_gradients();
  m.engine->end_step();
  MutexLock lock(&m.mu);
  std::fill(m.reported.begin(), m.reported.end(), 0);
  m.finished = false;
}

void DataParallel::step(::torch::optim::Optimizer& optimizer) {
  finish_gradients();
  optimizer.step();
  end_step();
}

void DataParallel::synchronize() { impl_->engine->synchronize(); }

void DataParallel::rebind(std::shared_ptr<Communicator> comm) {
  Impl& m = *impl_;
  {
    MutexLock lock(&m.mu);
    std::fill(m.reported.begin(), m.reported.end(), 0);
    m.finished = false;
  }
  m.engine->rebind(std::move(comm));
}

::torch::nn::Module& DataParallel::module() const { return *impl_->module; }
train::DataParallel& DataParallel::engine() const { return *impl_->engine; }
int64_t DataParallel::steps() const { return impl_->engine->step(); }

}  // namespace weft::torch
