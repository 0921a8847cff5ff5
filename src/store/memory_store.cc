// MemoryStore: a map guarded by a mutex; waiters sleep on a condition
// variable until a write or their deadline.
#include <fmt/format.h>

#include <condition_variable>
#include <map>
#include <mutex>

#include "store/store_util.h"
#include "weft/store.h"

namespace weft {

using store::call_name;

struct MemoryStore::Impl {
  Timeout default_timeout;
  std::mutex mu;
  std::condition_variable changed;
  std::map<std::string, std::string, std::less<>> data;
  StoreWaitStats waits;  // under mu

  // Waits until pred() holds (true) or the deadline passes (false). A call
  // whose first look fails counts in `waits` until it returns.
  template <typename Pred>
  bool wait_until(std::unique_lock<std::mutex>& lock, const Deadline& deadline, Pred pred) {
    if (pred()) return true;
    ++waits.waiting;
    bool found = false;
    for (;;) {
      if (changed.wait_until(lock, deadline.when()) == std::cv_status::timeout) {
        found = pred();
        break;
      }
      if (pred()) {
        found = true;
        break;
      }
      ++waits.looks;
    }
    --waits.waiting;
    return found;
  }
};

MemoryStore::MemoryStore(Timeout default_timeout) : impl_(std::make_unique<Impl>()) {
  impl_->default_timeout = resolve_timeout(default_timeout, kDefaultStoreTimeout);
}

MemoryStore::~MemoryStore() = default;

Timeout MemoryStore::default_timeout() const { return impl_->default_timeout; }

StoreWaitStats MemoryStore::wait_stats() const {
  std::lock_guard lock(impl_->mu);
  return impl_->waits;
}

void MemoryStore::set(std::string_view key, std::string_view value, Timeout) {
  store::check_key("set", key);
  store::check_value("set", key, value.size());
  {
    std::lock_guard lock(impl_->mu);
    impl_->data.insert_or_assign(std::string(key), std::string(value));
  }
  impl_->changed.notify_all();
}

std::string MemoryStore::get(std::string_view key, Timeout timeout) {
  store::check_key("get", key);
  Deadline deadline = store::deadline_for(timeout, impl_->default_timeout);
  std::unique_lock lock(impl_->mu);
  auto it = impl_->data.end();
  bool found = impl_->wait_until(lock, deadline, [&] {
    it = impl_->data.find(key);
    return it != impl_->data.end();
  });
  if (!found)
    store::throw_timeout(call_name("get", key), resolve_timeout(timeout, impl_->default_timeout));
  return it->second;
}

std::optional<std::string> MemoryStore::try_get(std::string_view key, Timeout) {
  store::check_key("try_get", key);
  std::lock_guard lock(impl_->mu);
  auto it = impl_->data.find(key);
  if (it == impl_->data.end()) return std::nullopt;
  return it->second;
}

int64_t MemoryStore::add(std::string_view key, int64_t delta, Timeout) {
  store::check_key("add", key);
  int64_t sum = 0;
  {
    std::lock_guard lock(impl_->mu);
    auto it = impl_->data.find(key);
    sum = store::add_to_value(key, it == impl_->data.end() ? nullptr : &it->second, delta);
    impl_->data.insert_or_assign(std::string(key), std::to_string(sum));
  }
  impl_->changed.notify_all();
  return sum;
}

CompareSetResult MemoryStore::compare_set(std::string_view key,
                                          const std::optional<std::string>& expected,
                                          std::string_view desired, Timeout) {
  store::check_key("compare_set", key);
  store::check_value("compare_set", key, desired.size());
  if (expected) store::check_value("compare_set", key, expected->size());
  CompareSetResult result;
  {
    std::lock_guard lock(impl_->mu);
    auto it = impl_->data.find(key);
    const bool matches =
        expected ? (it != impl_->data.end() && it->second == *expected) : it == impl_->data.end();
    if (matches) {
      impl_->data.insert_or_assign(std::string(key), std::string(desired));
      result.swapped = true;
      result.current = std::string(desired);
    } else if (it != impl_->data.end()) {
      result.current = it->second;
    }
  }
  if (result.swapped) impl_->changed.notify_all();
  return result;
}

void MemoryStore::wait(const std::vector<std::string>& keys, Timeout timeout) {
  store::check_wait_keys(keys);
  Deadline deadline = store::deadline_for(timeout, impl_->default_timeout);
  std::unique_lock lock(impl_->mu);
  const std::string* missing = nullptr;
  bool all = impl_->wait_until(lock, deadline, [&] {
    for (const auto& k : keys) {
      if (impl_->data.find(k) == impl_->data.end()) {
        missing = &k;
        return false;
      }
    }
    return true;
  });
  if (!all) {
    store::throw_timeout(call_name("wait", keys), resolve_timeout(timeout, impl_->default_timeout),
                         fmt::format(" (key {} is missing)", store::quote(*missing)));
  }
}

bool MemoryStore::remove(std::string_view key, Timeout) {
  store::check_key("remove", key);
  std::lock_guard lock(impl_->mu);
  auto it = impl_->data.find(key);
  if (it == impl_->data.end()) return false;
  impl_->data.erase(it);
  return true;
}

}  // namespace weft
