#include "comm/group.h"

#include <fmt/format.h>

#include <algorithm>

#include "core/bytes.h"
#include "core/enforce.h"
#include "weft/errors.h"

namespace weft::comm {

Group::Group(std::shared_ptr<World> world, std::vector<int> members, uint64_t id)
    : world_(std::move(world)), members_(std::move(members)), id_(id) {
  const int me = world_->rank();
  for (size_t i = 0; i < members_.size(); ++i) {
    if (members_[i] == me) rank_ = static_cast<int>(i);
  }
  WEFT_ENFORCE_GE(rank_, 0, "group does not contain this rank");
  const auto& my_host = world_->ranks()[static_cast<size_t>(me)].host_id;
  local_rank_ = 0;
  local_size_ = 0;
  for (size_t i = 0; i < members_.size(); ++i) {
    if (world_->ranks()[static_cast<size_t>(members_[i])].host_id == my_host) {
      if (static_cast<int>(i) < rank_) ++local_rank_;
      ++local_size_;
    }
  }
}

Deadline Group::deadline(Timeout t) const {
  return Deadline::after(resolve_timeout(t, world_->options().timeout));
}

transport::RequestPtr Group::make(bool send, int peer, uint64_t tag, size_t bytes,
                                  const transport::OpDesc& desc, const char* op) {
  if (peer < 0 || peer >= size()) {
    throw InvalidArgument(
        fmt::format("rank {} is out of range for a communicator of size {}", peer, size()));
  }
  if (peer == rank_) {
    throw InvalidArgument(
        fmt::format("rank {} cannot {} itself", rank_, send ? "send to" : "receive from"));
  }
  auto req = std::make_shared<transport::Request>(send, world_rank(peer), id_, tag, bytes);
  req->desc = desc;
  if (op != nullptr) req->op_name = op;
  return req;
}

transport::RequestPtr Group::isend(int dst, uint64_t tag, const void* data, size_t bytes,
                                   const transport::OpDesc& desc, const char* op) {
  auto req = make(true, dst, tag, bytes, desc, op);
  req->send_data = data;
  world_->start(req);
  return req;
}

transport::RequestPtr Group::irecv(int src, uint64_t tag, void* data, size_t bytes,
                                   const transport::OpDesc& desc, const char* op,
                                   transport::Request::Consumer consume) {
  auto req = make(false, src, tag, bytes, desc, op);
  req->recv_data = data;
  req->consume = std::move(consume);
  world_->start(req);
  return req;
}

std::shared_ptr<Group> Group::split(int color, int key, const Deadline& deadline) {
  world_->throw_if_failed();
  const uint64_t seq = next_seq();
  // Every member publishes (color, key) under this group's id and sequence number.
  auto& store = world_->store();
  const std::string base = fmt::format("split/{:016x}/{}", id_, seq);
  auto remaining = [&] {
    return std::max(std::chrono::duration_cast<Timeout>(deadline.remaining()), Timeout(1));
  };
  store.set(fmt::format("{}/{}", base, rank_), fmt::format("{} {}", color, key), remaining());
  std::vector<std::string> keys;
  for (int r = 0; r < size(); ++r) keys.push_back(fmt::format("{}/{}", base, r));
  store.wait(keys, remaining());
  struct Entry {
    int key;
    int rank;
  };
  std::vector<Entry> mine;
  for (int r = 0; r < size(); ++r) {
    std::string v = r == rank_ ? fmt::format("{} {}", color, key)
                               : store.get(keys[static_cast<size_t>(r)], remaining());
    int c = 0, k = 0;
    if (std::sscanf(v.c_str(), "%d %d", &c, &k) != 2) {
      throw StoreError(fmt::format("split: invalid record of rank {}: '{}'", r, v.substr(0, 64)));
    }
    if (c == color && color >= 0) mine.push_back({k, r});
  }
  if (color < 0) return nullptr;
  std::sort(mine.begin(), mine.end(), [](const Entry& a, const Entry& b) {
    return a.key != b.key ? a.key < b.key : a.rank < b.rank;
  });
  std::vector<int> members;
  for (auto& e : mine) members.push_back(world_rank(e.rank));
  uint64_t parts[3] = {id_, seq, static_cast<uint64_t>(static_cast<uint32_t>(color))};
  uint64_t child_id = bytes::fnv1a64(parts, sizeof parts);
  return std::make_shared<Group>(world_, std::move(members), child_id);
}

}  // namespace weft::comm
