#include "store/store_testing.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <exception>
#include <thread>

#include "core/auth.h"

namespace weft::store_test {

std::string backend_name(Backend b) {
  switch (b) {
    case Backend::Memory: return "Memory";
    case Backend::File: return "File";
    case Backend::Tcp: return "Tcp";
    case Backend::PrefixTcp: return "PrefixTcp";
  }
  return "?";
}

TcpStoreOptions tcp_options(Timeout timeout) {
  TcpStoreOptions o;
  o.timeout = timeout;
  static const std::string token = auth::generate_token();
  o.job_token = token;
  return o;
}

StoreBackend::StoreBackend(Backend kind) : kind_(kind), options_(tcp_options()) {
  switch (kind) {
    case Backend::Memory: memory_ = std::make_shared<MemoryStore>(30s); break;
    case Backend::File: dir_ = std::make_unique<testing::TempDir>(); break;
    case Backend::Tcp:
    case Backend::PrefixTcp:
      server_ = std::make_unique<TcpStoreServer>("127.0.0.1", 0, options_);
      break;
  }
}

StoreBackend::~StoreBackend() = default;

std::shared_ptr<Store> StoreBackend::client(Timeout default_timeout) {
  TcpStoreOptions o = options_;
  o.timeout = default_timeout;
  switch (kind_) {
    case Backend::Memory:
      if (default_timeout != 30s) return std::make_shared<MemoryStore>(default_timeout);
      return memory_;
    case Backend::File: {
      auto file = std::make_shared<FileStore>(dir_->path() + "/store", default_timeout);
      std::lock_guard lock(files_mu_);
      files_.push_back(file);
      return file;
    }
    case Backend::Tcp: return std::make_shared<TcpStore>("127.0.0.1", server_->port(), o);
    case Backend::PrefixTcp:
      return std::make_shared<PrefixStore>(
          "job/gen1", std::make_shared<TcpStore>("127.0.0.1", server_->port(), o));
  }
  return nullptr;
}

StoreWaitStats StoreBackend::wait_stats() {
  switch (kind_) {
    case Backend::Memory: return memory_->wait_stats();
    case Backend::File: {
      StoreWaitStats sum;
      std::lock_guard lock(files_mu_);
      for (const auto& weak : files_) {
        if (auto file = weak.lock()) {
          auto s = file->wait_stats();
          sum.waiting += s.waiting;
          sum.looks += s.looks;
        }
      }
      return sum;
    }
    case Backend::Tcp:
    case Backend::PrefixTcp: return server_->wait_stats();
  }
  return {};
}

bool StoreBackend::wait_blocked(size_t n) {
  return testing::wait_until([&] { return wait_stats().waiting == n; });
}

bool StoreBackend::write_then_wait_for_a_look(const std::function<void()>& write) {
  if (kind_ == Backend::File) {
    // The FileStore polls: two looks ending after the write returned, the
    // second of which began after it.
    write();
    const uint64_t before = wait_stats().looks;
    testing::wait_until([&] {
      auto s = wait_stats();
      return s.looks >= before + 2 || s.waiting == 0;
    });
    return wait_stats().looks >= before + 2;
  }
  // The MemoryStore wakes a blocked call on each write (the call sleeps on
  // the condition variable between writes: it looks once per write); the
  // server looks at a parked request before it answers the write.
  const uint64_t before = wait_stats().looks;
  write();
  testing::wait_until([&] {
    auto s = wait_stats();
    return s.looks > before || s.waiting == 0;  // looked, or released
  });
  return wait_stats().looks > before;
}

pid_t fork_child(const std::function<int()>& fn) {
  std::fflush(nullptr);
  pid_t pid = fork();
  if (pid == 0) {
    int code = 1;
    try {
      code = fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "child %d failed: %s\n", getpid(), e.what());
    }
    std::fflush(nullptr);
    _exit(code);
  }
  return pid;
}

int wait_child(pid_t pid, std::chrono::milliseconds timeout) {
  auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) {
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (std::chrono::steady_clock::now() >= until) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(5ms);
  }
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace weft::store_test
