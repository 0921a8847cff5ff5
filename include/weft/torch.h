// The libtorch adapter: data-parallel training of a torch::nn::Module with
// Weft's engine (weft/train.h). Part of libweft_torch (CMake target
// Weft::torch), built when libtorch is found.
//
//   auto comm = weft::init();
//   weft::torch::set_threads(1);                     // before any torch work
//   auto net = std::make_shared<Net>();
//   weft::torch::DataParallel dp(net, comm);         // rank 0's weights everywhere
//   torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
//   for (...) {
//     dp.zero_grad();                                // or opt.zero_grad()
//     auto loss = torch::nn::functional::cross_entropy(net->forward(x), y);
//     loss.backward();                               // buckets allreduce while backward runs
//     dp.step(opt);                                  // wait, opt.step(), sync policy
//   }
//   dp.synchronize();                                // local SGD: average before evaluating
//
// How it works. Each parameter that requires a gradient gets a slot in the
// engine's buckets, and its .grad() is made a tensor over that slot, so
// autograd accumulates gradients straight into the buckets and the
// optimizer reads the averaged result from there: no copies. A hook on each
// parameter's gradient accumulator tells the engine when the gradient is
// final, which starts the bucket's allreduce while backward goes on. The
// module is not wrapped: call its forward() as usual.
//
// Gradients. Keep the gradients in place between steps: DataParallel::
// zero_grad(), torch::optim::Optimizer::zero_grad() and
// Module::zero_grad() (set_to_none = false, its default) of libtorch 1.13
// zero them in place. A gradient that was reset to an undefined tensor or
// replaced still works (it is copied into its slot and back, a little
// slower); zero_grad() of this class puts the slot tensors back. In a step
// whose gradients are averaged, a parameter that took no part in the loss
// contributes zeros and receives the average, like the others, so every
// rank applies the same update.
//
// Buffers (e.g. batch-norm running statistics) are broadcast from rank 0 at
// start; then, with DataParallelOptions::sync_buffers (the default),
// floating-point buffers are averaged and the others copied from rank 0 at
// each synchronization point (every BSP step; every parameter average of
// local SGD).
//
// Requirements: CPU tensors of a floating dtype for parameters (float32,
// float64, float16, bfloat16), contiguous parameters and buffers, the same
// module structure on every rank (checked at construction: a difference
// throws weft::InvalidArgument on every rank naming the first differing
// parameter or buffer). Move or cast the module (to(), half()) before
// wrapping it: the engine keeps pointers to the parameters' memory.
//
// Thread safety: as weft::train::DataParallel. Backward may run on
// autograd's threads; the other calls come from the training thread.
#pragma once

#include <cstdint>
#include <memory>

#include "weft/checkpoint.h"
#include "weft/communicator.h"
#include "weft/train.h"

// libtorch's classes, declared here so that this header stays light; the
// caller includes <torch/torch.h> (or the pieces it uses) for the real thing.
namespace torch {
namespace nn {
class Module;
}  // namespace nn
namespace optim {
class Optimizer;
}  // namespace optim
}  // namespace torch

namespace weft::torch {

// Sets libtorch's intra-op threads to `intra_op` (>= 1) and its inter-op
// threads to 1. Call it first thing, before any tensor work: libtorch
// accepts the inter-op setting only before its pool starts (a later call
// changes the intra-op setting only). One thread per worker is what gives
// the best throughput when several workers share a machine's cores.
void set_threads(int intra_op);

class DataParallel {
 public:
  // Builds the engine over module's parameters (module->named_parameters(),
  // trainable when they require grad) and buffers (named_buffers()), checks
  // that every rank has the same model, broadcasts rank 0's weights and
  // buffers, installs the gradient slots and the hooks. Collective: every
  // rank of comm calls it. Throws weft::InvalidArgument for a null module or
  // communicator, an unsupported dtype or device, a non-contiguous tensor,
  // or a model that differs across ranks.
  DataParallel(std::shared_ptr<::torch::nn::Module> module, std::shared_ptr<Communicator> comm,
               train::DataParallelOptions options = {});
  // Removes the hooks. The gradients stay valid tensors (their memory is
  // kept alive as long as they are).
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  // Zeroes every gradient in place (one memset over the buckets), putting
  // the slot tensors back as .grad() where they had been replaced.
  void zero_grad();

  // Between backward and the optimizer: waits for the averaged gradients
  // (BSP steps) or does nothing (local steps). See train::DataParallel.
  void finish_gradients();
  // After the optimizer: runs the sync policy (local SGD averages the
  // parameters every H steps).
  void end_step();
  // finish_gradients(), optimizer.step(), end_step().
  void step(::torch::optim::Optimizer& optimizer);
  // Makes parameters and buffers equal on every rank (local SGD: averages
  // them if they may differ). Call before evaluating or saving. Collective.
  void synchronize();
  // Elastic training: continues on a new communicator; a step a failure
  // left open is abandoned. Collective, like the constructor
  // (train::DataParallel::rebind).
  void rebind(std::shared_ptr<Communicator> comm);

  ::torch::nn::Module& module() const;
  train::DataParallel& engine() const;
  // Completed steps.
  int64_t steps() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Registers in `state` what a libtorch training must keep to go on after a
// failure (weft/checkpoint.h): every parameter and buffer of dp's module,
// by name (train::TrainState::add_engine), the optimizer's state as the blob
// "torch.optimizer" (Optimizer::save / load through a torch archive:
// momentum buffers, Adam moments, step counts, learning rates) and the
// state of libtorch's default CPU generator as the blob "torch.rng".
// restore() checks that both blobs can be read before it writes anything.
// The application adds its own step, epoch, data position and schedule.
void add_to_state(train::TrainState& state, DataParallel& dp, ::torch::optim::Optimizer& optimizer);

}  // namespace weft::torch
