// weft::train::ElasticState: in-memory commits, equal on every member.
#include "weft/elastic_state.h"

#include <fmt/format.h>

#include <limits>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "core/log.h"
#include "weft/errors.h"

namespace weft::train {
namespace {

// Largest image restore() accepts from the member that sends it (bounded
// before anything is allocated): 64 GiB.
constexpr int64_t kMaxImageBytes = int64_t{64} << 30;

// Sends `image` from `root` to every member of `comm`; every member returns it.
std::vector<std::byte> broadcast_image(Communicator& comm, std::vector<std::byte> image, int root) {
  std::vector<int64_t> size{static_cast<int64_t>(image.size())};
  comm.broadcast(Buffer(size.data(), 1, DType::Int64), root);
  if (size[0] < 0 || size[0] > kMaxImageBytes) {
    throw ProtocolError(
        fmt::format("elastic state: rank {} announced a commit of {} bytes", root, size[0]));
  }
  if (comm.rank() != root) image.assign(static_cast<size_t>(size[0]), std::byte{0});
  if (!image.empty()) comm.broadcast(Buffer(image.data(), image.size(), DType::UInt8), root);
  return image;
}

}  // namespace

uint64_t image_hash(std::span<const std::byte> image) {
  return XXH3_64bits(image.data(), image.size());
}

ElasticState::ElasticState(Save save, Load load) : save_(std::move(save)), load_(std::move(load)) {
  if (!save_ || !load_) throw InvalidArgument("ElasticState: save and load must both be given");
}

void ElasticState::commit(Communicator& comm, int64_t id) {
  if (id <= latest_.id) {
    throw InvalidArgument(
        fmt::format("ElasticState::commit: id {} is not after the last commit {}", id, latest_.id));
  }
  Commit next{id, save_()};
  const auto h = static_cast<int64_t>(image_hash(next.image));
  // Keep the new snapshot before the check: if a member fails during it,
  // this one is still a valid state (taken after a completed step).
  previous_ = std::move(latest_);
  latest_ = std::move(next);
  if (comm.size() == 1) return;
  // max(x) and max(~x) = ~min(x): one allreduce tells whether all are equal.
  std::vector<int64_t> v{id, ~id, h, ~h};
  comm.allreduce(Buffer(v.data(), v.size(), DType::Int64), ReduceOp::Max);
  if (v[0] != ~v[1]) {
    throw InternalError(fmt::format(
        "ElasticState::commit: members committed different ids (from {} to {})", ~v[1], v[0]));
  }
  if (v[2] != ~v[3]) {
    ++divergent_;
    latest_.image = broadcast_image(comm, std::move(latest_.image), 0);
    if (comm.rank() == 0) {
      WEFT_DEBUG("commit {}: the members' states differ; every member keeps rank 0's", id);
    }
  }
}

int64_t ElasticState::restore(Communicator& comm) {
  std::vector<int64_t> newest{latest_.id};
  comm.allreduce(Buffer(newest.data(), 1, DType::Int64), ReduceOp::Max);
  const int64_t target = newest[0];
  if (target < 0) return -1;
  const bool have = latest_.id == target || previous_.id == target;
  std::vector<int64_t> source{have ? comm.rank() : std::numeric_limits<int64_t>::max()};
  comm.allreduce(Buffer(source.data(), 1, DType::Int64), ReduceOp::Min);
  if (source[0] >= comm.size()) {
    throw InternalError(fmt::format("elastic state: no member holds commit {}", target));
  }
  const int root = static_cast<int>(source[0]);
  std::vector<std::byte> image;
  if (comm.rank() == root) {
    image = latest_.id == target ? latest_.image : previous_.image;
  }
  image = broadcast_image(comm, std::move(image), root);
  load_(image);
  latest_ = Commit{target, std::move(image)};
  previous_ = Commit{};
  return target;
}

}  // namespace weft::train
