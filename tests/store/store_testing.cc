#include "store/store_testing.h"

#include <fmt/format.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "core/auth.h"

namespace weft::store_test {

std::string backend_name(Backend b) {
  switch (b) {
    case Backend::Memory: return "Memory";
    case Backend::File: return "File";
    case Backend::Tcp: return "Tcp";
    case Backend::PrefixTcp: return "PrefixTcp";
    case Backend::Etcd: return "Etcd";
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
    case Backend::Etcd:
      etcd_ = shared_etcd_cluster();
      if (etcd_) etcd_options_ = etcd_->options();
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
    case Backend::Etcd: {
      EtcdStoreOptions eo = etcd_options_;
      eo.timeout = default_timeout;
      auto etcd = std::make_shared<EtcdStore>(eo);
      std::lock_guard lock(files_mu_);
      etcds_.push_back(etcd);
      return etcd;
    }
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
    case Backend::Etcd: {
      StoreWaitStats sum;
      std::lock_guard lock(files_mu_);
      for (const auto& weak : etcds_) {
        if (auto etcd = weak.lock()) {
          auto s = etcd->wait_stats();
          sum.waiting += s.waiting;
          sum.looks += s.looks;
        }
      }
      return sum;
    }
  }
  return {};
}

bool StoreBackend::wait_blocked(size_t n) {
  return testing::wait_until([&] { return wait_stats().waiting == n; });
}

bool StoreBackend::write_then_wait_for_a_look(const std::function<void()>& write) {
  if (kind_ == Backend::File || kind_ == Backend::Etcd) {
    // The FileStore and the EtcdStore poll: two looks ending after the write returned, the
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

std::string EtcdCluster::binary() {
  if (const char* env = std::getenv("WEFT_TEST_ETCD"); env != nullptr && *env != '\0') return env;
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path != nullptr ? path : "/usr/bin:/bin");
  for (std::string dir; std::getline(dirs, dir, ':');) {
    std::string candidate = (dir.empty() ? "." : dir) + "/etcd";
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

EtcdCluster::EtcdCluster(int members) : dir_(std::make_unique<testing::TempDir>()) {
  const std::string etcd = binary();
  if (etcd.empty()) throw std::runtime_error("etcd is not installed (Debian: etcd-server)");
  std::string initial;
  std::vector<int> taken;
  auto port = [&] {
    // free_port() may hand out a port twice: every member needs two of its own.
    for (;;) {
      int p = testing::free_port();
      if (std::find(taken.begin(), taken.end(), p) == taken.end()) {
        taken.push_back(p);
        return p;
      }
    }
  };
  for (int i = 0; i < members; ++i) {
    Member m;
    m.name = fmt::format("m{}", i);
    m.client_port = port();
    m.peer_port = port();
    initial += fmt::format("{}{}=http://127.0.0.1:{}", i == 0 ? "" : ",", m.name, m.peer_port);
    members_.push_back(m);
  }
  for (auto& m : members_) {
    const std::string client = fmt::format("http://127.0.0.1:{}", m.client_port);
    const std::string peer = fmt::format("http://127.0.0.1:{}", m.peer_port);
    std::vector<std::string> args = {
        etcd, "--name=" + m.name, "--data-dir=" + dir_->path() + "/" + m.name,
        "--listen-client-urls=" + client, "--advertise-client-urls=" + client,
        "--listen-peer-urls=" + peer, "--initial-advertise-peer-urls=" + peer,
        "--initial-cluster=" + initial, "--initial-cluster-state=new",
        "--initial-cluster-token=weft-test",
        // Fast elections: a killed leader is replaced in about 1 s.
        "--heartbeat-interval=50", "--election-timeout=500", "--log-level=warn"};
    const std::string log = dir_->path() + "/" + m.name + ".log";
    std::fflush(nullptr);
    pid_t pid = fork();
    if (pid == 0) {
      FILE* f = std::freopen(log.c_str(), "w", stdout);
      if (f != nullptr) dup2(fileno(stdout), 2);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    m.pid = pid;
  }
  // Up when a client of every member gets an answer.
  for (int i = 0; i < members; ++i) {
    EtcdStoreOptions o;
    o.endpoints = {endpoint(i)};
    o.prefix = "probe";
    try {
      EtcdStore(o).connect(30s);
    } catch (const std::exception& e) {
      std::string logs;
      for (auto& m : members_) {
        std::ifstream in(dir_->path() + "/" + m.name + ".log");
        std::stringstream ss;
        ss << in.rdbuf();
        logs += "\n--- " + m.name + ".log:\n" + ss.str().substr(0, 4000);
      }
      for (int j = 0; j < size(); ++j) kill(j);
      throw std::runtime_error(
          fmt::format("etcd member {} did not come up: {}{}", i, e.what(), logs));
    }
  }
}

EtcdCluster::~EtcdCluster() {
  for (int i = 0; i < size(); ++i) kill(i);
}

std::string EtcdCluster::endpoint(int i) const {
  return fmt::format("127.0.0.1:{}", members_.at(static_cast<size_t>(i)).client_port);
}

std::vector<std::string> EtcdCluster::endpoints() const {
  std::vector<std::string> out;
  for (int i = 0; i < size(); ++i) out.push_back(endpoint(i));
  return out;
}

int EtcdCluster::member_of(const std::string& e) const {
  for (int i = 0; i < size(); ++i) {
    if (endpoint(i) == e) return i;
  }
  return -1;
}

void EtcdCluster::kill(int i) {
  Member& m = members_.at(static_cast<size_t>(i));
  if (m.pid <= 0) return;
  ::kill(m.pid, SIGKILL);
  int status = 0;
  waitpid(m.pid, &status, 0);
  m.pid = -1;
}

void EtcdCluster::signal(int i, int sig) {
  const Member& m = members_.at(static_cast<size_t>(i));
  if (m.pid > 0) ::kill(m.pid, sig);
}

bool EtcdCluster::alive(int i) const { return members_.at(static_cast<size_t>(i)).pid > 0; }

EtcdStoreOptions EtcdCluster::options(Timeout timeout) const {
  static std::atomic<int> next{0};
  EtcdStoreOptions o;
  o.endpoints = endpoints();
  o.prefix = fmt::format("test{}/{}", getpid(), next++);
  o.timeout = timeout;
  return o;
}

std::shared_ptr<EtcdCluster> shared_etcd_cluster() {
  static std::mutex mu;
  static std::shared_ptr<EtcdCluster> cluster;
  std::lock_guard lock(mu);
  if (!cluster && !EtcdCluster::binary().empty()) cluster = std::make_shared<EtcdCluster>(3);
  return cluster;
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
