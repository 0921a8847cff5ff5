// Helpers of the store tests: backends to run the same tests on, forked
// child processes, captured log output.
#pragma once

#include <gtest/gtest.h>
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "testing/testing.h"
#include "weft/store.h"

namespace weft::store_test {

using namespace std::chrono_literals;

enum class Backend { Memory, File, Tcp, PrefixTcp };
std::string backend_name(Backend b);

// A store of one kind, and clients of it.
class StoreBackend {
 public:
  explicit StoreBackend(Backend kind);
  ~StoreBackend();
  // A new client of the same store (the MemoryStore itself for Memory).
  std::shared_ptr<Store> client(Timeout default_timeout = 30s);
  Backend kind() const { return kind_; }
  TcpStoreServer* server() { return server_.get(); }

  // The get()/wait() calls blocked on the store: the MemoryStore's, the
  // server's, or those of every FileStore client() made.
  StoreWaitStats wait_stats();
  // Waits until n calls are blocked (false if that does not happen in 30 s).
  bool wait_blocked(size_t n);
  // With one call blocked, runs write() (a write that should not release
  // it) and waits until the call has looked at its keys after the write
  // (false if it did not, e.g. because the write released it).
  bool write_then_wait_for_a_look(const std::function<void()>& write);

 private:
  Backend kind_;
  std::unique_ptr<testing::TempDir> dir_;
  std::unique_ptr<TcpStoreServer> server_;
  std::shared_ptr<MemoryStore> memory_;
  std::mutex files_mu_;
  std::vector<std::weak_ptr<FileStore>> files_;  // the clients, for wait_stats()
  TcpStoreOptions options_;
};

TcpStoreOptions tcp_options(Timeout timeout = 30s);

// Runs fn in a forked child, which exits with fn's result (1 if it throws).
pid_t fork_child(const std::function<int()>& fn);
// Waits up to timeout for the child; its exit code, or -1 (killed) on timeout.
int wait_child(pid_t pid, std::chrono::milliseconds timeout);

// Seconds since `start` as a double, for EXPECT_LT on deadlines.
double seconds_since(std::chrono::steady_clock::time_point start);

}  // namespace weft::store_test
