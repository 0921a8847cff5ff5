// Helpers shared by the store implementations: argument checks, deadlines,
// names of calls for messages, and the integer arithmetic of add().
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/deadline.h"
#include "core/mutex.h"
#include "weft/store.h"

namespace weft::store {

// Limits of wait(): number of keys and bytes of the encoded key list.
inline constexpr size_t kMaxWaitKeys = 65536;
inline constexpr size_t kMaxWaitListBytes = 16u << 20;

// A mutex that can be waited for until a deadline. (std::timed_mutex would
// do, but ThreadSanitizer does not see its pthread_mutex_clocklock and then
// reports false races.)
class CAPABILITY("mutex") TimedMutex {
 public:
  bool try_lock_until(Deadline::Clock::time_point when) TRY_ACQUIRE(true) {
    MutexLock lock(&mu_);
    while (held_) {
      if (!free_.wait_until(when) && held_) return false;
    }
    held_ = true;
    return true;
  }
  void unlock() RELEASE() {
    {
      MutexLock lock(&mu_);
      held_ = false;
    }
    free_.notify_one();
  }

 private:
  Mutex mu_;
  CondVar free_{&mu_};
  bool held_ GUARDED_BY(mu_) = false;
};

// The deadline of a call: timeout (kDefaultTimeout -> def) from now, capped
// far in the future so that huge timeouts do not overflow the clock.
Deadline deadline_for(Timeout timeout, Timeout def);

// A key for messages: quoted, non-printable bytes escaped, long keys cut.
std::string quote(std::string_view key);
// "store get('key')" and "store wait('a', 'b')".
std::string call_name(std::string_view op, std::string_view key);
std::string call_name(std::string_view op, const std::vector<std::string>& keys);

// InvalidArgument when a key or value is above kMaxStoreKeyBytes /
// kMaxStoreValueBytes, or a wait() list above kMaxWaitKeys / kMaxWaitListBytes.
// `op` is the call ("set"); the message names it with the key.
void check_key(std::string_view op, std::string_view key);
void check_value(std::string_view op, std::string_view key, size_t bytes);
void check_wait_keys(const std::vector<std::string>& keys);

// Throws TimeoutError "<call> timed out after <timeout><detail>" (rank -1).
[[noreturn]] void throw_timeout(const std::string& call, Timeout timeout,
                                std::string_view detail = {});

// The value of add(): the current value (absent = 0) parsed as a decimal
// int64, plus delta. StoreError when the value is not an integer or the sum
// overflows.
int64_t add_to_value(std::string_view key, const std::string* current, int64_t delta);

}  // namespace weft::store
