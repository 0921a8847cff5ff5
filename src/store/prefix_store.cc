// PrefixStore: every key of the underlying store under "<prefix>/".
#include "weft/errors.h"
#include "weft/store.h"

namespace weft {

PrefixStore::PrefixStore(std::string prefix, std::shared_ptr<Store> base)
    : prefix_(std::move(prefix)), base_(std::move(base)) {
  if (!base_) throw InvalidArgument("PrefixStore: the underlying store is null");
}

PrefixStore::~PrefixStore() = default;

std::string PrefixStore::key(std::string_view k) const {
  std::string out;
  out.reserve(prefix_.size() + 1 + k.size());
  out.append(prefix_).append("/").append(k);
  return out;
}

void PrefixStore::set(std::string_view k, std::string_view value, Timeout timeout) {
  base_->set(key(k), value, timeout);
}

std::string PrefixStore::get(std::string_view k, Timeout timeout) {
  return base_->get(key(k), timeout);
}

std::optional<std::string> PrefixStore::try_get(std::string_view k, Timeout timeout) {
  return base_->try_get(key(k), timeout);
}

int64_t PrefixStore::add(std::string_view k, int64_t delta, Timeout timeout) {
  return base_->add(key(k), delta, timeout);
}

CompareSetResult PrefixStore::compare_set(std::string_view k,
                                          const std::optional<std::string>& expected,
                                          std::string_view desired, Timeout timeout) {
  return base_->compare_set(key(k), expected, desired, timeout);
}

void PrefixStore::wait(const std::vector<std::string>& keys, Timeout timeout) {
  std::vector<std::string> full;
  full.reserve(keys.size());
  for (const auto& k : keys) full.push_back(key(k));
  base_->wait(full, timeout);
}

bool PrefixStore::remove(std::string_view k, Timeout timeout) {
  return base_->remove(key(k), timeout);
}

Timeout PrefixStore::default_timeout() const { return base_->default_timeout(); }

}  // namespace weft
