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

enum class Backend { Memory, File, Tcp, PrefixTcp, Etcd };
std::string backend_name(Backend b);

// A cluster of etcd members on loopback (random free ports, data in a
// temporary directory), killed when destroyed.
class EtcdCluster {
 public:
  // The etcd binary (WEFT_TEST_ETCD, or etcd on PATH), or "" when there is none.
  static std::string binary();
  // Starts `members` members and waits until the cluster answers (throws
  // naming the member logs otherwise).
  explicit EtcdCluster(int members = 3);
  ~EtcdCluster();
  EtcdCluster(const EtcdCluster&) = delete;
  EtcdCluster& operator=(const EtcdCluster&) = delete;
  int size() const { return static_cast<int>(members_.size()); }
  // "127.0.0.1:PORT" of member i's client endpoint, and all of them.
  std::string endpoint(int i) const;
  std::vector<std::string> endpoints() const;
  // The index of the member whose client endpoint is `endpoint`.
  int member_of(const std::string& endpoint) const;
  // SIGKILLs member i and reaps it.
  void kill(int i);
  // Sends sig to member i (SIGSTOP: a member that stops answering).
  void signal(int i, int sig);
  bool alive(int i) const;
  // Options of a client of every member, under a prefix no other test uses.
  EtcdStoreOptions options(Timeout timeout = 30s) const;

 private:
  struct Member {
    std::string name;
    int client_port = 0;
    int peer_port = 0;
    pid_t pid = -1;
  };
  std::unique_ptr<testing::TempDir> dir_;
  std::vector<Member> members_;
};

// One cluster shared by the contract tests of a process (started on first
// use; nullptr when etcd is not installed).
std::shared_ptr<EtcdCluster> shared_etcd_cluster();

// A store of one kind, and clients of it.
class StoreBackend {
 public:
  explicit StoreBackend(Backend kind);
  ~StoreBackend();
  // A new client of the same store (the MemoryStore itself for Memory).
  std::shared_ptr<Store> client(Timeout default_timeout = 30s);
  Backend kind() const { return kind_; }
  // False when the backend cannot run here (Etcd without etcd installed).
  bool available() const { return kind_ != Backend::Etcd || etcd_ != nullptr; }
  // The largest value the backend stores.
  size_t max_value_bytes() const {
    return kind_ == Backend::Etcd ? kMaxEtcdValueBytes : kMaxStoreValueBytes;
  }
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
  std::shared_ptr<EtcdCluster> etcd_;
  EtcdStoreOptions etcd_options_;
  std::vector<std::weak_ptr<EtcdStore>> etcds_;  // the clients, for wait_stats()
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
