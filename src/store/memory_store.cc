// MemoryStore: a map guarded by a mutex; waiters sleep on a condition
// variable until a write or their deadline.
#include <fmt/format.h>

#include <map>

#include "core/mutex.h"
#include "store/store_util.h"
#include "weft/store.h"

namespace weft {

using store::call_name;

struct MemoryStore::Impl {
  Timeout default_timeout;
  Mutex mu;
  CondVar changed{&mu};  // notified after every write
  std::map<std::string, std::string, std::less<>> data GUARDED_BY(mu);
  StoreWaitStats waits GUARDED_BY(mu);  // calls blocked on a missing key

  // The first of keys that is missing (null: none).
  const std::string* first_missing(const std::vector<std::string>& keys) REQUIRES(mu) {
    for (const auto& k : keys) {
      if (data.find(k) == data.end()) return &k;
    }
    return nullptr;
  }
};

MemoryStore::MemoryStore(Timeout default_timeout) : impl_(std::make_unique<Impl>()) {
  impl_->default_timeout = resolve_timeout(default_timeout, kDefaultStoreTimeout);
}

MemoryStore::~MemoryStore() = default;

Timeout MemoryStore::default_timeout() const { return impl_->default_timeout; }

StoreWaitStats MemoryStore::wait_stats() const {
  MutexLock lock(&impl_->mu);
  return impl_->waits;
}

void MemoryStore::set(std::string_view key, std::string_view value, Timeout) {
  store::check_key("set", key);
  store::check_value("set", key, value.size());
  {
    MutexLock lock(&impl_->mu);
    impl_->data.insert_or_assign(std::string(key), std::string(value));
  }
  impl_->changed.notify_all();
}

std::string MemoryStore::get(std::string_view key, Timeout timeout) {
  store::check_key("get", key);
  Deadline deadline = store::deadline_for(timeout, impl_->default_timeout);
  MutexLock lock(&impl_->mu);
  auto it = impl_->data.find(key);
  if (it != impl_->data.end()) return it->second;
  ++impl_->waits.waiting;
  for (;;) {
    const bool in_time = impl_->changed.wait_until(deadline.when());
    it = impl_->data.find(key);
    if (it != impl_->data.end()) break;
    if (!in_time) {
      --impl_->waits.waiting;
      store::throw_timeout(call_name("get", key), resolve_timeout(timeout, impl_->default_timeout));
    }
    ++impl_->waits.looks;
  }
  --impl_->waits.waiting;
  return it->second;
}

std::optional<std::string> MemoryStore::try_get(std::string_view key, Timeout) {
  store::check_key("try_get", key);
  MutexLock lock(&impl_->mu);
  auto it = impl_->data.find(key);
  if (it == impl_->data.end()) return std::nullopt;
  return it->second;
}

int64_t MemoryStore::add(std::string_view key, int64_t delta, Timeout) {
  store::check_key("add", key);
  int64_t sum = 0;
  {
    MutexLock lock(&impl_->mu);
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
    MutexLock lock(&impl_->mu);
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
  MutexLock lock(&impl_->mu);
  const std::string* missing = impl_->first_missing(keys);
  if (missing == nullptr) return;
  ++impl_->waits.waiting;
  for (;;) {
    const bool in_time = impl_->changed.wait_until(deadline.when());
    missing = impl_->first_missing(keys);
    if (missing == nullptr) break;
    if (!in_time) {
      --impl_->waits.waiting;
      store::throw_timeout(call_name("wait", keys),
                           resolve_timeout(timeout, impl_->default_timeout),
                           fmt::format(" (key {} is missing)", store::quote(*missing)));
    }
    ++impl_->waits.looks;
  }
  --impl_->waits.waiting;
}

bool MemoryStore::remove(std::string_view key, Timeout) {
  store::check_key("remove", key);
  MutexLock lock(&impl_->mu);
  auto it = impl_->data.find(key);
  if (it == impl_->data.end()) return false;
  impl_->data.erase(it);
  return true;
}

}  // namespace weft
