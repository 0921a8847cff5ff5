// A job of comm_worker processes on this machine's loopback, for the fault
// and liveness tests: a store served by the test, one worker per rank with
// the environment `weft run` gives (WEFT_RANK, WEFT_STORE, WEFT_JOB_TOKEN,
// WEFT_MEMBER n0.s<rank>.r0...) plus `env`.
#pragma once

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/auth.h"
#include "testing/testing.h"
#include "weft/weft.h"

namespace weft::test_job {

using namespace std::chrono_literals;

class Job {
 public:
  Job(int n, const std::vector<std::string>& args, int timeout_s,
      const std::map<std::string, std::string>& env = {})
      : n_(n) {
    TcpStoreOptions so;
    so.job_token = token_;
    server_ = std::make_unique<TcpStoreServer>("127.0.0.1", 0, so);
    store_ = std::make_shared<TcpStore>("127.0.0.1", server_->port(), so);
    for (int r = 0; r < n; ++r) {
      std::vector<std::string> argv = {testing::bin_dir() + "/comm_worker"};
      argv.insert(argv.end(), args.begin(), args.end());
      std::map<std::string, std::string> e = {
          {"WEFT_RANK", std::to_string(r)},
          {"WEFT_WORLD_SIZE", std::to_string(n)},
          {"WEFT_LOCAL_RANK", std::to_string(r)},
          {"WEFT_LOCAL_SIZE", std::to_string(n)},
          {"WEFT_STORE", fmt::format("127.0.0.1:{}", server_->port())},
          {"WEFT_JOB_TOKEN", token_},
          {"WEFT_TIMEOUT", std::to_string(timeout_s)},
          {"WEFT_MEMBER", member(r)},
          {"WEFT_LOG_LEVEL", "info"}};
      for (const auto& [k, v] : env) e[k] = v;
      procs_.push_back(std::make_unique<testing::Process>(argv, e));
    }
  }

  static std::string member(int r) { return fmt::format("n0.s{}.r0", r); }
  testing::Process& proc(int r) { return *procs_[static_cast<size_t>(r)]; }
  Store& store() { return *store_; }
  const std::string& token() const { return token_; }

  // Waits until every worker printed `line` (READY: connected; RUNNING:
  // a few allreduces done, so the job is in the middle of its allreduces).
  void wait_ready(std::chrono::seconds limit = 60s, const std::string& line = "READY") {
    auto until = std::chrono::steady_clock::now() + limit;
    for (int r = 0; r < n_; ++r) {
      while (proc(r).output().find(line) == std::string::npos) {
        ASSERT_FALSE(proc(r).wait(0ms)) << "rank " << r << " exited early:\n" << proc(r).output();
        ASSERT_LT(std::chrono::steady_clock::now(), until) << "rank " << r << " not " << line;
        std::this_thread::sleep_for(20ms);
      }
    }
  }

 private:
  int n_;
  std::string token_ = auth::generate_token();
  std::unique_ptr<TcpStoreServer> server_;
  std::shared_ptr<TcpStore> store_;
  std::vector<std::unique_ptr<testing::Process>> procs_;
};

}  // namespace weft::test_job
