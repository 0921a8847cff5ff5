// weft::torch::add_to_state (see weft/torch.h): a libtorch training's
// model, optimizer and RNG as entries of a train::TrainState.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <fmt/format.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <mutex>
#include <sstream>

#include "weft/errors.h"
#include "weft/torch.h"

namespace weft::torch {
namespace {

std::string save_optimizer(::torch::optim::Optimizer& optimizer) {
  ::torch::serialize::OutputArchive archive;
  optimizer.save(archive);
  std::ostringstream out;
  archive.save_to(out);
  return std::move(out).str();
}

// A torch archive of the bytes (throws c10::Error when they are not one).
::torch::serialize::InputArchive read_archive(std::string_view bytes) {
  ::torch::serialize::InputArchive archive;
  std::istringstream in{std::string(bytes)};
  archive.load_from(in);
  return archive;
}

std::string rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  const at::Tensor state = gen.get_state();
  return std::string(static_cast<const char*>(state.data_ptr()),
                     static_cast<size_t>(state.numel()) * state.element_size());
}

void set_rng_state(std::string_view bytes) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  at::Tensor state = at::empty({static_cast<int64_t>(bytes.size())}, at::kByte);
  std::memcpy(state.data_ptr(), bytes.data(), bytes.size());
  gen.set_state(state);
}

}  // namespace

void add_to_state(train::TrainState& state, DataParallel& dp,
                  ::torch::optim::Optimizer& optimizer) {
  state.add_engine(dp.engine());
  state.add_blob(
      "torch.optimizer", [&optimizer] { return save_optimizer(optimizer); },
      [&optimizer](std::string_view bytes) {
        auto archive = read_archive(bytes);
        optimizer.load(archive);
      },
      [](std::string_view bytes) {
        try {
          (void)read_archive(bytes);
        } catch (const c10::Error& e) {
          throw DataError(fmt::format("not a torch optimizer archive ({} bytes): {}", bytes.size(),
                                      e.what_without_backtrace()));
        }
      });
  state.add_blob(
      "torch.rng", [] { return rng_state(); }, [](std::string_view bytes) { set_rng_state(bytes); },
      [](std::string_view bytes) {
        const size_t expect = rng_state().size();
        if (bytes.size() != expect) {
          throw DataError(
              fmt::format("a CPU generator state of {} bytes, {} expected", bytes.size(), expect));
        }
      });
}

}  // namespace weft::torch
