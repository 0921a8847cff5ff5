// Faults with real processes: a worker killed or stopped in the middle of an
// allreduce, and strangers sending garbage or the wrong token to a worker.
#include <gtest/gtest.h>
#include <signal.h>

#include <nlohmann/json.hpp>
#include <thread>

#include "core/auth.h"
#include "core/socket.h"
#include "job.h"
#include "testing/testing.h"
#include "weft/weft.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Process;

using test_job::Job;

TEST(Faults, KilledWorkerIsNamedByEverySurvivor) {
  const int n = 4, victim = 2;
  Job job(n, {"allreduce-loop", "0", std::to_string(4u << 20)}, 60);
  job.wait_ready(60s, "RUNNING");  // in the middle of the allreduces
  auto t0 = std::chrono::steady_clock::now();
  job.proc(victim).signal(SIGKILL);
  for (int r = 0; r < n; ++r) {
    if (r == victim) continue;
    ASSERT_TRUE(job.proc(r).wait(60s)) << "rank " << r << " hangs:\n" << job.proc(r).output();
    std::string out = job.proc(r).output();
    EXPECT_EQ(job.proc(r).exit_code(), 3) << out;
    EXPECT_NE(out.find("ERROR PeerError rank=2"), std::string::npos) << out;
  }
  // Well within the 60 s deadline: detection does not wait for a timeout.
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 30s);
  job.proc(victim).wait(10s);
}

// The deadline's path: liveness off (with it, the heartbeat finds the stopped
// rank first: liveness_test.cc).
TEST(Faults, StoppedWorkerTimesOutEverySurvivor) {
  const int n = 4, victim = 1, timeout_s = 4;
  Job job(n, {"allreduce-loop", "0", std::to_string(4u << 20)}, timeout_s,
          {{"WEFT_HEARTBEAT_TIMEOUT", "0"}});
  job.wait_ready(60s, "RUNNING");
  auto t0 = std::chrono::steady_clock::now();
  job.proc(victim).signal(SIGSTOP);
  for (int r = 0; r < n; ++r) {
    if (r == victim) continue;
    ASSERT_TRUE(job.proc(r).wait(60s)) << "rank " << r << " hangs:\n" << job.proc(r).output();
    std::string out = job.proc(r).output();
    EXPECT_EQ(job.proc(r).exit_code(), 4) << out;
    EXPECT_NE(out.find("ERROR TimeoutError"), std::string::npos) << out;
  }
  // Each survivor fails within its deadline (plus scheduling slack on a loaded machine).
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(timeout_s + 20));
  job.proc(victim).signal(SIGKILL);
  job.proc(victim).wait(10s);
}

TEST(Faults, GarbageAndWrongTokenAreRefusedAndTheJobCompletes) {
  const int n = 3;
  Job job(n, {"allreduce-loop", "20", "100000", "--wait-go"}, 60);
  job.wait_ready();
  auto record = nlohmann::json::parse(job.store().get("weft/world/g1/rank/0", 10s));
  auto [host, port] = net::split_host_port(record.at("address").get<std::string>(), "address");
  auto addr = net::resolve(host, port).front();
  // 1. Garbage bytes.
  {
    int err = 0;
    net::Fd fd = net::connect_tcp(addr, Deadline::after(5s), &err);
    ASSERT_TRUE(fd.valid()) << net::errno_string(err);
    std::string junk(200, '\x5a');
    net::write_all(fd.get(), junk.data(), junk.size(), Deadline::after(5s), &err);
    char c;
    auto st = net::read_exact(fd.get(), &c, 1, Deadline::after(10s), &err);
    EXPECT_EQ(st, net::IoStatus::Closed);  // disconnected, no answer
  }
  // 2. A correct handshake with the wrong token.
  {
    int err = 0;
    net::Fd fd = net::connect_tcp(addr, Deadline::after(5s), &err);
    ASSERT_TRUE(fd.valid());
    EXPECT_THROW(auth::client_handshake(fd.get(), auth::Kind::Transport, {},
                                        {"not-the-token", false}, Deadline::after(10s), "worker"),
                 ProtocolError);
  }
  job.store().set("test/go", "1", 10s);
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(job.proc(r).wait(120s)) << job.proc(r).output();
    EXPECT_EQ(job.proc(r).exit_code(), 0) << job.proc(r).output();
    EXPECT_NE(job.proc(r).output().find("OK"), std::string::npos);
  }
  std::string out0 = job.proc(0).output();
  EXPECT_NE(out0.find("refused connection from"), std::string::npos) << out0;
  EXPECT_NE(out0.find("not a Weft handshake"), std::string::npos) << out0;
  EXPECT_NE(out0.find("wrong job token"), std::string::npos) << out0;
}

}  // namespace
}  // namespace weft
