// FileStore: one file per key in a shared directory.
//
// File names: "k." + the key percent-encoded (bytes other than A-Z a-z 0-9 _ -
// become %XX), or "h." + hex SHA-256 of the key when that name would be long
// (file names are limited to 255 bytes). Writes go to a ".tmp.*" file that is
// then renamed over the key's file, so readers see whole values only.
// Writers (set, add, compare_set, remove) serialize on flock() of ".lock";
// within the process they first take a mutex, since flock() locks belong to
// the open file and would not exclude the threads of one process otherwise.
#include <fcntl.h>
#include <fmt/format.h>
#include <openssl/evp.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <filesystem>
#include <mutex>
#include <random>
#include <thread>

#include "core/socket.h"
#include "store/store_util.h"
#include "weft/errors.h"
#include "weft/store.h"

namespace weft {
namespace {

using store::call_name;
using namespace std::chrono_literals;

constexpr size_t kMaxEncodedName = 200;

std::string hex(const unsigned char* p, size_t n) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * n);
  for (size_t i = 0; i < n; ++i) {
    out += kDigits[p[i] >> 4];
    out += kDigits[p[i] & 15];
  }
  return out;
}

std::string file_name(std::string_view key) {
  std::string name = "k.";
  for (char ch : key) {
    auto c = static_cast<unsigned char>(ch);
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
        c == '-') {
      name += ch;
    } else {
      name += '%';
      name += hex(&c, 1);
    }
    if (name.size() > kMaxEncodedName) break;
  }
  if (name.size() <= kMaxEncodedName) return name;
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(key.data(), key.size(), digest, &len, EVP_sha256(), nullptr) != 1) {
    throw StoreError("FileStore: SHA-256 of a key failed (OpenSSL)");
  }
  return "h." + hex(digest, len);
}

// Sleeps the next step of a polling back-off (1 ms doubling to 10 ms), never
// past the deadline.
void backoff_sleep(std::chrono::microseconds& step, const Deadline& deadline) {
  std::this_thread::sleep_for(std::min<std::chrono::nanoseconds>(step, deadline.remaining()));
  step = std::min<std::chrono::microseconds>(step * 2, 10ms);
}

}  // namespace

struct FileStore::Impl {
  std::string dir;
  Timeout default_timeout;
  store::TimedMutex mu;
  std::atomic<uint64_t> tmp_counter{0};
  uint64_t tmp_salt = std::random_device{}();
  std::atomic<size_t> waiting{0};  // StoreWaitStats
  std::atomic<uint64_t> looks{0};

  // Calls look() until it returns true (then true), polling with back-off,
  // or until the deadline passes (then false). A call whose first look fails
  // counts as waiting until it returns.
  template <typename Look>
  bool poll(const Deadline& deadline, Look look) {
    if (look()) return true;
    struct Waiting {
      std::atomic<size_t>& n;
      explicit Waiting(std::atomic<size_t>& count) : n(count) { ++n; }
      ~Waiting() { --n; }
      Waiting(const Waiting&) = delete;
      Waiting& operator=(const Waiting&) = delete;
    } counted(waiting);
    auto step = std::chrono::microseconds(1000);
    for (;;) {
      if (deadline.expired()) return false;
      backoff_sleep(step, deadline);
      if (look()) return true;
      ++looks;
    }
  }

  std::string path_of(std::string_view key) const { return dir + "/" + file_name(key); }

  [[noreturn]] void fail(std::string_view what, const std::string& path, int err) const {
    throw StoreError(
        fmt::format("FileStore {}: cannot {} {}: {}", dir, what, path, net::errno_string(err)));
  }

  // The value of key, nullopt when absent.
  std::optional<std::string> read(std::string_view key) const {
    std::string path = path_of(key);
    net::Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid()) {
      if (errno == ENOENT) return std::nullopt;
      fail("open", path, errno);
    }
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) fail("stat", path, errno);
    if (static_cast<uint64_t>(st.st_size) > kMaxStoreValueBytes) {
      throw StoreError(fmt::format("FileStore {}: {} has {} bytes, above the value limit of {}",
                                   dir, path, st.st_size, kMaxStoreValueBytes));
    }
    std::string value;
    value.resize(static_cast<size_t>(st.st_size));
    size_t have = 0;
    for (;;) {
      if (have == value.size()) value.resize(have + 4096);  // grown since fstat: keep reading
      ssize_t n = ::read(fd.get(), value.data() + have, value.size() - have);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) fail("read", path, errno);
      if (n == 0) break;
      have += static_cast<size_t>(n);
    }
    value.resize(have);
    return value;
  }

  bool exists(std::string_view key) const {
    std::string path = path_of(key);
    if (::access(path.c_str(), F_OK) == 0) return true;
    if (errno != ENOENT) fail("look up", path, errno);
    return false;
  }

  void write(std::string_view key, std::string_view value) {
    std::string path = path_of(key);
    std::string tmp = fmt::format("{}/.tmp.{}.{:x}.{}", dir, ::getpid(), tmp_salt, tmp_counter++);
    net::Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
    if (!fd.valid()) fail("create", tmp, errno);
    size_t done = 0;
    while (done < value.size()) {
      ssize_t n = ::write(fd.get(), value.data() + done, value.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        int err = errno;
        ::unlink(tmp.c_str());
        fail("write", tmp, err);
      }
      done += static_cast<size_t>(n);
    }
    if (::close(fd.release()) != 0) {
      int err = errno;
      ::unlink(tmp.c_str());
      fail("write", tmp, err);
    }
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      int err = errno;
      ::unlink(tmp.c_str());
      fail("rename onto", path, err);
    }
  }

  bool erase(std::string_view key) {
    std::string path = path_of(key);
    if (::unlink(path.c_str()) == 0) return true;
    if (errno == ENOENT) return false;
    fail("remove", path, errno);
  }

  // Holds the process mutex and the flock of the lock file.
  class Locked {
   public:
    Locked(Impl& impl, const Deadline& deadline, const std::string& call, Timeout timeout)
        : impl_(impl) {
      if (!impl.mu.try_lock_until(deadline.when())) {
        store::throw_timeout(call, timeout, " (waiting for another call of this FileStore)");
      }
      std::unique_lock<store::TimedMutex> guard(impl.mu, std::adopt_lock);
      std::string path = impl.dir + "/.lock";
      fd_.reset(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
      if (!fd_.valid()) impl.fail("open", path, errno);
      auto step = std::chrono::microseconds(100);
      while (::flock(fd_.get(), LOCK_EX | LOCK_NB) != 0) {
        if (errno == EINTR) continue;
        if (errno != EWOULDBLOCK) impl.fail("lock", path, errno);
        if (deadline.expired()) {
          store::throw_timeout(call, timeout, fmt::format(" (waiting for the lock {})", path));
        }
        backoff_sleep(step, deadline);
      }
      guard.release();
    }
    ~Locked() {
      fd_.reset();  // closing the file releases the flock
      impl_.mu.unlock();
    }
    Locked(const Locked&) = delete;
    Locked& operator=(const Locked&) = delete;

   private:
    Impl& impl_;
    net::Fd fd_;
  };
};

FileStore::FileStore(std::string path, Timeout default_timeout) : impl_(std::make_unique<Impl>()) {
  if (path.empty()) throw InvalidArgument("FileStore: the directory path is empty");
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (!std::filesystem::is_directory(path)) {
    throw StoreError(fmt::format("FileStore: cannot create the directory {}: {}", path,
                                 ec ? ec.message() : "not a directory"));
  }
  impl_->dir = std::move(path);
  impl_->default_timeout = resolve_timeout(default_timeout, kDefaultStoreTimeout);
}

FileStore::~FileStore() = default;

Timeout FileStore::default_timeout() const { return impl_->default_timeout; }

StoreWaitStats FileStore::wait_stats() const {
  return {.waiting = impl_->waiting.load(), .looks = impl_->looks.load()};
}

void FileStore::set(std::string_view key, std::string_view value, Timeout timeout) {
  store::check_key("set", key);
  store::check_value("set", key, value.size());
  Deadline deadline = store::deadline_for(timeout, impl_->default_timeout);
  Impl::Locked lock(*impl_, deadline, call_name("set", key),
                    resolve_timeout(timeout, impl_->default_timeout));
  impl_->write(key, value);
}

std::string FileStore::get(std::string_view key, Timeout timeout) {
  store::check_key("get", key);
  Deadline deadline = store::deadline_for(timeout, impl_->default_timeout);
  std::optional<std::string> value;
  if (!impl_->poll(deadline, [&] { return (value = impl_->read(key)).has_value(); })) {
    store::throw_timeout(call_name("get", key), resolve_timeout(timeout, impl_->default_timeout),
                         fmt::format(" (FileStore {})", impl_->dir));
  }
  return std::move(*value);
}

std::optional<std::string> FileStore::try_get(std::string_view key, Timeout) {
  store::check_key("try_get", key);
  return impl_->read(key);
}

int64_t FileStore::add(std::string_view key, int64_t delta, Timeout timeout) {
  store::check_key("add", key);
  Deadline deadline = store::deadline_for(timeout, impl_->default_timeout);
  Impl::Locked lock(*impl_, deadline, call_name("add", key),
                    resolve_timeout(timeout, impl_->default_timeout));
  auto current = impl_->read(key);
  int64_t sum = store::add_to_value(key, current ? &*current : nullptr, delta);
  impl_->write(key, std::to_string(sum));
  return sum;
}

CompareSetResult FileStore::compare_set(std::string_view key,
                                        const std::optional<std::string>& expected,
                                        std::string_view desired, Timeout timeout) {
  store::check_key("compare_set", key);
  store::check_value("compare_set", key, desired.size());
  if (expected) store::check_value("compare_set", key, expected->size());
  Deadline deadline = store::deadline_for(timeout, impl_->default_timeout);
  Impl::Locked lock(*impl_, deadline, call_name("compare_set", key),
                    resolve_timeout(timeout, impl_->default_timeout));
  CompareSetResult result;
  result.current = impl_->read(key);
  if (result.current == expected) {
    impl_->write(key, desired);
    result.swapped = true;
    result.current = std::string(desired);
  }
  return result;
}

void FileStore::wait(const std::vector<std::string>& keys, Timeout timeout) {
  store::check_wait_keys(keys);
  Deadline deadline = store::deadline_for(timeout, impl_->default_timeout);
  auto missing = keys.end();
  if (!impl_->poll(deadline, [&] {
        missing = std::find_if(keys.begin(), keys.end(),
                               [&](const std::string& k) { return !impl_->exists(k); });
        return missing == keys.end();
      })) {
    store::throw_timeout(
        call_name("wait", keys), resolve_timeout(timeout, impl_->default_timeout),
        fmt::format(" (key {} is missing in FileStore {})", store::quote(*missing), impl_->dir));
  }
}

bool FileStore::remove(std::string_view key, Timeout timeout) {
  store::check_key("remove", key);
  Deadline deadline = store::deadline_for(timeout, impl_->default_timeout);
  Impl::Locked lock(*impl_, deadline, call_name("remove", key),
                    resolve_timeout(timeout, impl_->default_timeout));
  return impl_->erase(key);
}

}  // namespace weft
