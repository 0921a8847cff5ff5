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
    case Backend::File:
      return std::make_shared<FileStore>(dir_->path() + "/store", default_timeout);
    case Backend::Tcp: return std::make_shared<TcpStore>("127.0.0.1", server_->port(), o);
    case Backend::PrefixTcp:
      return std::make_shared<PrefixStore>(
          "job/gen1", std::make_shared<TcpStore>("127.0.0.1", server_->port(), o));
  }
  return nullptr;
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
