// A Group is what a Communicator is made of: a list of world ranks in a
// World, this process's rank among them, the group's id (carried in every
// frame) and its sequence of collectives. Point-to-point requests are issued
// here in group ranks; the collectives layer builds on isend/irecv/wait.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "comm/world.h"
#include "core/deadline.h"
#include "transport/request.h"

namespace weft::comm {

// Tags: user point-to-point tags are 32-bit and have bit 63 clear.
// Collectives use bit 63, their sequence number in bits 24..62 and an
// algorithm step in bits 0..23, so concurrent collectives never match each
// other's messages.
inline constexpr uint64_t kCollectiveTagBit = 1ull << 63;
inline constexpr uint32_t kMaxCollectiveStep = (1u << 24) - 1;
inline uint64_t user_tag(uint32_t tag) { return tag; }
inline uint64_t collective_tag(uint64_t seq, uint32_t step) {
  return kCollectiveTagBit | ((seq & ((1ull << 39) - 1)) << 24) | (step & kMaxCollectiveStep);
}

class Group : public std::enable_shared_from_this<Group> {
 public:
  Group(std::shared_ptr<World> world, std::vector<int> members, uint64_t id);

  int rank() const { return rank_; }
  int size() const { return static_cast<int>(members_.size()); }
  int world_rank(int group_rank) const { return members_[static_cast<size_t>(group_rank)]; }
  const std::vector<int>& members() const { return members_; }
  uint64_t id() const { return id_; }
  World& world() { return *world_; }
  const std::shared_ptr<World>& world_ptr() const { return world_; }
  const std::string& host_of(int group_rank) const {
    return world_->hostname(world_rank(group_rank));
  }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }

  // Takes the next number in this group's sequence of collectives.
  uint64_t next_seq() { return seq_.fetch_add(1, std::memory_order_relaxed) + 1; }

  // The deadline of an operation issued now: the given timeout, or the
  // communicator's default for kDefaultTimeout.
  Deadline deadline(Timeout t) const;

  transport::RequestPtr isend(int dst, uint64_t tag, const void* data, size_t bytes,
                              const transport::OpDesc& desc = {}, const char* op = nullptr);
  // consume: see transport::Request::consume.
  transport::RequestPtr irecv(int src, uint64_t tag, void* data, size_t bytes,
                              const transport::OpDesc& desc = {}, const char* op = nullptr,
                              transport::Request::Consumer consume = nullptr);
  // Waits for a request; rethrows its error; TimeoutError (and abort) at the deadline.
  void wait(const transport::RequestPtr& req, const Deadline& deadline) {
    world_->wait(req, deadline);
  }

  // State the collectives layer keeps for this group (its plans), made by
  // `make` on first use.
  template <typename T, typename Make>
  T& extension(Make make) {
    std::call_once(ext_once_, [&] { ext_ = make(); });
    return *static_cast<T*>(ext_.get());
  }

  // Collective: ranks with the same color form a new group ordered by (key, rank).
  // Returns null for a negative color.
  std::shared_ptr<Group> split(int color, int key, const Deadline& deadline);

 private:
  transport::RequestPtr make(bool send, int peer, uint64_t tag, size_t bytes,
                             const transport::OpDesc& desc, const char* op);

  std::shared_ptr<World> world_;
  std::vector<int> members_;
  uint64_t id_;
  int rank_ = -1;
  int local_rank_ = 0;
  int local_size_ = 1;
  std::atomic<uint64_t> seq_{0};
  std::once_flag ext_once_;
  std::shared_ptr<void> ext_;
};

}  // namespace weft::comm
