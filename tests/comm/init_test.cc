// weft::init() and the launch environments it understands; IPv6.
#include <gtest/gtest.h>
#include <stdlib.h>

#include "comm/rendezvous.h"
#include "testing/testing.h"
#include "weft/weft.h"

namespace weft {
namespace {

using namespace std::chrono_literals;

// Sets environment variables for the scope of a test, then restores them.
class Env {
 public:
  Env(std::initializer_list<std::pair<const char*, const char*>> vars) {
    for (const char* name : kAll) {
      if (const char* v = getenv(name)) saved_.emplace_back(name, v);
      unsetenv(name);
    }
    for (auto& [k, v] : vars) setenv(k, v, 1);
  }
  ~Env() {
    for (const char* name : kAll) unsetenv(name);
    for (auto& [k, v] : saved_) setenv(k.c_str(), v.c_str(), 1);
  }

 private:
  static constexpr const char* kAll[] = {"WEFT_RANK",
                                         "WEFT_WORLD_SIZE",
                                         "WEFT_LOCAL_RANK",
                                         "WEFT_LOCAL_SIZE",
                                         "WEFT_STORE",
                                         "WEFT_STORE_PORT",
                                         "OMPI_COMM_WORLD_RANK",
                                         "OMPI_COMM_WORLD_SIZE",
                                         "OMPI_COMM_WORLD_LOCAL_RANK",
                                         "OMPI_COMM_WORLD_LOCAL_SIZE",
                                         "SLURM_PROCID",
                                         "SLURM_NTASKS",
                                         "SLURM_LOCALID",
                                         "SLURM_NTASKS_PER_NODE",
                                         "SLURM_TASKS_PER_NODE",
                                         "RANK",
                                         "WORLD_SIZE",
                                         "LOCAL_RANK",
                                         "LOCAL_WORLD_SIZE",
                                         "MASTER_ADDR",
                                         "MASTER_PORT",
                                         "WEFT_STORE_EXTERNAL",
                                         "TORCHELASTIC_USE_AGENT_STORE",
                                         "OMPI_MCA_orte_ess_num_procs",
                                         "OMPI_MCA_ess_base_jobid",
                                         "SLURM_NPROCS",
                                         "SLURM_STEP_NUM_TASKS",
                                         "SLURM_JOB_ID",
                                         "SLURM_STEP_ID",
                                         "SLURM_STEP_NODELIST",
                                         "SLURM_JOB_NODELIST",
                                         "SLURM_NODELIST"};
  std::vector<std::pair<std::string, std::string>> saved_;
};

TEST(LaunchEnvironment, WeftRun) {
  Env env({{"WEFT_RANK", "2"},
           {"WEFT_WORLD_SIZE", "4"},
           {"WEFT_LOCAL_RANK", "0"},
           {"WEFT_LOCAL_SIZE", "2"},
           {"WEFT_STORE", "10.0.0.1:29500"}});
  auto e = detect_launch_environment();
  EXPECT_EQ(e.launcher, "weft");
  EXPECT_EQ(e.rank, 2);
  EXPECT_EQ(e.size, 4);
  EXPECT_EQ(e.local_size, 2);
  EXPECT_EQ(e.store_host, "10.0.0.1");
  EXPECT_EQ(e.store_port, 29500);
  EXPECT_FALSE(e.serve_store);
}

TEST(LaunchEnvironment, Mpirun) {
  Env env({{"OMPI_COMM_WORLD_RANK", "0"},
           {"OMPI_COMM_WORLD_SIZE", "8"},
           {"OMPI_COMM_WORLD_LOCAL_RANK", "0"},
           {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"},
           {"MASTER_ADDR", "node1"},
           {"MASTER_PORT", "29400"}});
  auto e = detect_launch_environment();
  EXPECT_EQ(e.launcher, "mpirun");
  EXPECT_EQ(e.size, 8);
  EXPECT_EQ(e.local_size, 4);
  EXPECT_EQ(e.store_host, "node1");
  EXPECT_EQ(e.store_port, 29400);
  EXPECT_TRUE(e.serve_store);
}

TEST(LaunchEnvironment, SlurmWithoutAStoreIsAClearError) {
  Env env({{"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "4"}, {"SLURM_TASKS_PER_NODE", "2(x2)"}});
  try {
    detect_launch_environment();
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("WEFT_STORE"), std::string::npos) << e.what();
  }
}

TEST(LaunchEnvironment, SlurmTasksPerNode) {
  Env env({{"SLURM_PROCID", "3"},
           {"SLURM_NTASKS", "4"},
           {"SLURM_LOCALID", "1"},
           {"SLURM_TASKS_PER_NODE", "2(x2)"},
           {"WEFT_STORE", "[::1]:7000"}});
  auto e = detect_launch_environment();
  EXPECT_EQ(e.launcher, "slurm");
  EXPECT_EQ(e.rank, 3);
  EXPECT_EQ(e.local_rank, 1);
  EXPECT_EQ(e.local_size, 2);
  EXPECT_EQ(e.store_host, "::1");
}

TEST(LaunchEnvironment, TorchrunServesTheStoreNextToTheAgentsPort) {
  Env env({{"RANK", "0"},
           {"WORLD_SIZE", "2"},
           {"LOCAL_RANK", "0"},
           {"LOCAL_WORLD_SIZE", "2"},
           {"MASTER_ADDR", "127.0.0.1"},
           {"MASTER_PORT", "29500"}});
  auto e = detect_launch_environment();
  EXPECT_EQ(e.launcher, "torchrun");
  EXPECT_EQ(e.store_port, 29501);
  EXPECT_TRUE(e.serve_store);
}

TEST(LaunchEnvironment, UnderMpirunRankZeroServesWeftStore) {
  Env env({{"OMPI_COMM_WORLD_RANK", "1"},
           {"OMPI_COMM_WORLD_SIZE", "2"},
           {"OMPI_MCA_ess_base_jobid", "77"},
           {"WEFT_STORE", "127.0.0.1:29511"}});
  auto e = detect_launch_environment();
  EXPECT_TRUE(e.serve_store);
  EXPECT_EQ(e.store_port, 29511);
  EXPECT_EQ(e.store_variable, "WEFT_STORE");
  EXPECT_EQ(e.job_id, "77");
}

TEST(LaunchEnvironment, ExternalStoreIsNotServed) {
  {
    Env env({{"SLURM_PROCID", "0"},
             {"SLURM_NTASKS", "2"},
             {"WEFT_STORE", "10.0.0.1:7000"},
             {"WEFT_STORE_EXTERNAL", "1"}});
    EXPECT_FALSE(detect_launch_environment().serve_store);
  }
  Env env({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"WEFT_STORE_EXTERNAL", "1"}});
  try {
    detect_launch_environment();
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("WEFT_STORE_EXTERNAL=1"), std::string::npos) << e.what();
  }
}

TEST(LaunchEnvironment, TorchrunC10dRendezvousLeavesMasterPortFree) {
  Env env({{"RANK", "0"},
           {"WORLD_SIZE", "2"},
           {"MASTER_ADDR", "127.0.0.1"},
           {"MASTER_PORT", "29500"},
           {"TORCHELASTIC_USE_AGENT_STORE", "False"}});
  EXPECT_EQ(detect_launch_environment().store_port, 29500);
}

TEST(LaunchEnvironment, LocalRankBeyondLocalSizeNamesTheVariable) {
  Env env({{"OMPI_COMM_WORLD_RANK", "1"},
           {"OMPI_COMM_WORLD_SIZE", "4"},
           {"OMPI_COMM_WORLD_LOCAL_RANK", "2"},
           {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
           {"WEFT_STORE", "127.0.0.1:1"}});
  try {
    detect_launch_environment();
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("OMPI_COMM_WORLD_LOCAL_RANK"), std::string::npos)
        << e.what();
  }
}

TEST(LaunchEnvironment, SlurmRankZeroServesOnTheFirstNode) {
  Env env({{"SLURM_PROCID", "5"},
           {"SLURM_NTASKS", "8"},
           {"SLURM_JOB_ID", "4242"},
           {"SLURM_STEP_ID", "3"},
           {"SLURM_STEP_NODELIST", "node[07-09,12],gpu1"}});
  auto e = detect_launch_environment();
  EXPECT_EQ(e.store_host, "node07");
  EXPECT_EQ(e.store_port, 20000 + (4242 * 7 + 3) % 10000);
  EXPECT_TRUE(e.serve_store);
  EXPECT_NE(e.store_variable.find("SLURM_STEP_NODELIST"), std::string::npos);
  setenv("WEFT_STORE_PORT", "31000", 1);
  EXPECT_EQ(detect_launch_environment().store_port, 31000);
  unsetenv("WEFT_STORE_PORT");
  setenv("SLURM_STEP_NODELIST", "a12,b[1-2]", 1);
  EXPECT_EQ(detect_launch_environment().store_host, "a12");
}

TEST(Rendezvous, MissingRanksAreListedCompactly) {
  EXPECT_EQ(comm::format_ranks({1, 3, 5, 6, 7, 8, 9}), "1, 3, 5-9");
  EXPECT_EQ(comm::format_ranks({0, 1, 2, 10, 20, 30}, 4), "0-2, 10, ...");
  EXPECT_EQ(comm::format_ranks({}), "");
}

// A rank that never publishes its record: the others give up at the store's
// deadline naming it.
TEST(Rendezvous, TimeoutNamesTheMissingRank) {
  auto store = std::make_shared<MemoryStore>(std::chrono::milliseconds(1500));
  auto errors = testing::run_ranks(3, [&](int r) {
    if (r == 1) return;  // never joins
    CommOptions o;
    o.job_token = "t";
    o.timeout = 60s;
    Communicator::create(r, 3, store, o);
  });
  for (int r : {0, 2}) {
    ASSERT_NE(errors[static_cast<size_t>(r)], nullptr);
    try {
      std::rethrow_exception(errors[static_cast<size_t>(r)]);
    } catch (const TimeoutError& e) {
      EXPECT_NE(std::string(e.what()).find("these never joined: rank 1 (1 of 3)"),
                std::string::npos)
          << e.what();
      EXPECT_EQ(e.rank(), 1);
    }
  }
}

TEST(LaunchEnvironment, BadValuesNameTheVariable) {
  Env env({{"WEFT_RANK", "5"}, {"WEFT_WORLD_SIZE", "4"}, {"WEFT_STORE", "h:1"}});
  try {
    detect_launch_environment();
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("WEFT_RANK"), std::string::npos) << e.what();
  }
}

TEST(LaunchEnvironment, NoLauncherIsAWorldOfOne) {
  Env env({});
  auto c = init();
  EXPECT_EQ(c->size(), 1);
  std::vector<float> v{3};
  c->allreduce(v);
  EXPECT_EQ(v[0], 3);
}

TEST(Init, TorchrunStyleRankZeroServesTheStore) {
  // Two ranks as threads, rank 0 serving the store (MASTER_ADDR/MASTER_PORT style).
  const int port = testing::free_port();
  auto errors = testing::run_ranks(2, [&](int r) {
    LaunchEnvironment e;
    (void)e;
    TcpStoreOptions so;
    so.job_token = "t";
    std::unique_ptr<TcpStoreServer> server;
    if (r == 0)
      server = std::make_unique<TcpStoreServer>("127.0.0.1", static_cast<uint16_t>(port), so);
    auto store = std::make_shared<TcpStore>("127.0.0.1", static_cast<uint16_t>(port), so);
    CommOptions o;
    o.job_token = "t";
    o.timeout = 30s;
    auto c = Communicator::create(r, 2, store, o);
    std::vector<int64_t> v{r + 1};
    c->allreduce(v);
    EXPECT_EQ(v[0], 3);
    c->barrier();
  });
  for (auto& e : errors) EXPECT_EQ(e, nullptr);
}

TEST(Init, IPv6) {
  auto store = std::make_shared<MemoryStore>();
  testing::run_ranks_ok(3, [&](int r) {
    CommOptions o;
    o.job_token = "v6";
    o.address = "::1";
    o.timeout = 30s;
    auto c = Communicator::create(r, 3, store, o);
    std::vector<float> v(100000, 1.0f);
    c->allreduce(v);
    EXPECT_EQ(v[0], 3.0f);
  });
}

}  // namespace
}  // namespace weft
