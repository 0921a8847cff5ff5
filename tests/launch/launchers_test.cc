// weft::init() under the launchers people already use: Open MPI's mpirun
// (2 and 4 ranks on this host, and 2 emulated hosts made of network
// namespaces), torchrun (Debian's python3-torch) and Slurm's srun (its
// environment, set exactly as srun sets it). Each checks right results
// (comm_worker checks every allreduce and prints OK) and that a missing rank
// is a clear error naming it within seconds, not a wait until the 300 s
// default. Bad input (a store without a port, a bad MASTER_PORT, rank counts
// that disagree, two jobs on one store port) fails within seconds naming
// the variable. A launcher test is skipped only when the launcher is not
// installed (scripts/deps.sh installs openmpi-bin and python3-torch).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "testing/testing.h"

namespace weft::testing {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

const std::string kToken = "launchers-test-token-5f3a9c";

std::string worker() { return bin_dir() + "/comm_worker"; }
std::string cluster_script() { return std::string(WEFT_SOURCE_DIR) + "/scripts/cluster.sh"; }

// The path of `name` in PATH, or "".
std::string which(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path ? path : "/usr/bin:/bin");
  for (std::string dir; std::getline(dirs, dir, ':');) {
    std::string p = (dir.empty() ? "." : dir) + "/" + name;
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  return "";
}

struct Result {
  int code = -1;
  std::string output;
  std::chrono::milliseconds took{0};
};

Result run(const std::vector<std::string>& argv, std::map<std::string, std::string> env,
           std::chrono::milliseconds limit = 120s) {
  auto t0 = Clock::now();
  Process p(argv, std::move(env));
  Result r;
  if (!p.wait(limit)) {
    p.signal(SIGKILL);
    p.wait(10s);
    r.output = p.output() + "\n(killed: still running after the test's limit)";
    r.took = limit;
    return r;
  }
  r.code = p.exit_code();
  r.output = p.output();
  r.took = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0);
  return r;
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// True when something listens on 127.0.0.1:port.
bool port_open(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

// True once pid is gone (or a zombie nobody reaped yet).
bool gone(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return true;
  size_t close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'Z';
}

// ---- Open MPI ------------------------------------------------------------

class Mpirun : public ::testing::Test {
 protected:
  void SetUp() override {
    mpirun_ = which("mpirun");
    if (mpirun_.empty()) GTEST_SKIP() << "mpirun is not installed (scripts/deps.sh installs it)";
  }

  // The environment of the user's shell: the token exported, and what CI
  // needs (root; more ranks than cores).
  std::map<std::string, std::string> env(std::map<std::string, std::string> extra = {}) {
    std::map<std::string, std::string> e = {{"WEFT_JOB_TOKEN", kToken},
                                            {"OMPI_ALLOW_RUN_AS_ROOT", "1"},
                                            {"OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"},
                                            {"OMPI_MCA_rmaps_base_oversubscribe", "1"}};
    for (auto& [k, v] : extra) e[k] = v;
    return e;
  }

  // mpirun -np N -x WEFT_JOB_TOKEN -x WEFT_STORE=127.0.0.1:PORT [-x more] CMD...
  std::vector<std::string> line(int n, int port, std::vector<std::string> cmd,
                                std::vector<std::string> more = {}) {
    std::vector<std::string> a = {mpirun_,
                                  "-np",
                                  std::to_string(n),
                                  "-x",
                                  "WEFT_JOB_TOKEN",
                                  "-x",
                                  "WEFT_STORE=127.0.0.1:" + std::to_string(port)};
    for (auto& m : more) {
      a.push_back("-x");
      a.push_back(m);
    }
    a.insert(a.end(), cmd.begin(), cmd.end());
    return a;
  }

  std::string mpirun_;
};

TEST_F(Mpirun, TwoRanksOneHost) {
  auto r = run(line(2, free_port(), {worker(), "allreduce-loop", "20", "10000"}), env());
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(count(r.output, "OK"), 2u) << r.output;
}

TEST_F(Mpirun, FourRanksOneHost) {
  auto r = run(line(4, free_port(), {worker(), "allreduce-loop", "20", "10000"}), env());
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(count(r.output, "OK"), 4u) << r.output;
  EXPECT_EQ(count(r.output, "READY rank"), 4u) << r.output;
}

// Rank 1 never starts Weft: rank 0 names it when WEFT_STORE_TIMEOUT ends,
// and says so meanwhile every WEFT_RENDEZVOUS_LOG_INTERVAL.
TEST_F(Mpirun, MissingRankIsNamedWithinSeconds) {
  auto r = run(line(2, free_port(),
                    {"/bin/sh", "-c",
                     "if [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then exec sleep 60; fi; exec \"$0\" "
                     "\"$@\"",
                     worker(), "allreduce-loop", "5", "1000"},
                    {"WEFT_STORE_TIMEOUT=3", "WEFT_RENDEZVOUS_LOG_INTERVAL=1"}),
               env(), 100s);
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("these never joined: rank 1 (1 of 2)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("waiting at rendezvous for rank 1 (1 of 2)"), std::string::npos)
      << r.output;
  EXPECT_LT(r.took, 50s) << r.output;  // not sleep 60, not the 300 s default
}

// Rank 0 (which serves the store) never starts: rank 1 says which address it
// tries, and gives up naming it.
TEST_F(Mpirun, MissingStoreIsNamedWithinSeconds) {
  const int port = free_port();
  auto r = run(line(2, port,
                    {"/bin/sh", "-c",
                     "if [ \"$OMPI_COMM_WORLD_RANK\" = 0 ]; then exec sleep 60; fi; exec \"$0\" "
                     "\"$@\"",
                     worker(), "allreduce-loop", "5", "1000"},
                    {"WEFT_STORE_TIMEOUT=3", "WEFT_RENDEZVOUS_LOG_INTERVAL=1"}),
               env(), 100s);
  const std::string where = "127.0.0.1:" + std::to_string(port);
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("still waiting for the store at " + where), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("cannot reach the rendezvous store at " + where +
                          " (WEFT_STORE, served by rank 0)"),
            std::string::npos)
      << r.output;
  EXPECT_LT(r.took, 50s) << r.output;
}

// mpirun is killed while a rank waits at rendezvous: it stops waiting (its
// launcher is gone) instead of lingering until the deadline. The other
// rank, a plain sleep, shows that nothing else ends the orphans.
//  * sleeper 0: rank 1 waits in its store connect loop (nobody serves);
//  * sleeper 1: rank 0 serves the store and waits for rank 1's record.
void launcher_gone_case(const std::vector<std::string>& argv,
                        const std::map<std::string, std::string>& env, int sleeper) {
  const int waiter = 1 - sleeper;
  Process p(argv, env);
  pid_t pids[2] = {0, 0};
  auto until = Clock::now() + 60s;
  while ((pids[0] == 0 || pids[1] == 0) && Clock::now() < until) {
    std::istringstream out(p.output());
    for (std::string w; out >> w;) {
      if (w != "PID") continue;
      int rank = -1, pid = 0;
      out >> rank >> pid;
      if (rank == 0 || rank == 1) pids[rank] = pid;
    }
    std::this_thread::sleep_for(50ms);
  }
  ASSERT_TRUE(pids[0] > 0 && pids[1] > 0) << p.output();
  std::this_thread::sleep_for(1500ms);  // the waiter is in its wait
  ASSERT_FALSE(gone(pids[waiter])) << p.output();
  p.signal(SIGKILL);
  p.wait(10s);
  auto t0 = Clock::now();
  while (!gone(pids[waiter]) && Clock::now() - t0 < 30s) std::this_thread::sleep_for(50ms);
  EXPECT_TRUE(gone(pids[waiter])) << "rank " << waiter << " still waits after mpirun was killed";
  EXPECT_FALSE(gone(pids[sleeper])) << "the orphaned sleep ended too: the test proves nothing";
  ::kill(pids[0], SIGKILL);
  ::kill(pids[1], SIGKILL);
}

TEST_F(Mpirun, RankWhoseLauncherIsGoneStopsWaiting) {
  for (int sleeper : {0, 1}) {
    SCOPED_TRACE("rank " + std::to_string(sleeper) + " never starts Weft");
    launcher_gone_case(
        line(2, free_port(),
             {"/bin/sh", "-c",
              "echo \"PID $OMPI_COMM_WORLD_RANK $$\"; if [ \"$OMPI_COMM_WORLD_RANK\" = " +
                  std::to_string(sleeper) + " ]; then exec sleep 120; fi; exec \"$0\" \"$@\"",
              worker(), "allreduce-loop", "5", "1000"},
             // No report within the test's window: a report written to the dead
             // launcher's pipe would end the rank by SIGPIPE, hiding a missing watch.
             {"WEFT_STORE_TIMEOUT=200", "WEFT_RENDEZVOUS_LOG_INTERVAL=100"}),
        env(), sleeper);
  }
}

// Two emulated hosts (network namespaces, scripts/cluster.sh): mpirun runs
// on host 1 and starts host 2's orted through an rsh agent that enters the
// namespace (as ssh would enter the other machine).
TEST_F(Mpirun, TwoEmulatedHosts) {
  auto [ok, why] = [&] {
    Process c({cluster_script(), "check"});
    bool done = c.wait(30s);
    return std::make_pair(done && c.exit_code() == 0, c.output());
  }();
  if (!ok) GTEST_SKIP() << "no emulated cluster here: " << why;
  const std::string prefix = "wlt" + std::to_string(::getpid());
  auto up = run({cluster_script(), "up", prefix, "2"}, {}, 60s);
  ASSERT_EQ(up.code, 0) << up.output;
  struct Down {
    std::string script, prefix;
    ~Down() { Process({script, "down", prefix}).wait(30s); }
  } down{cluster_script(), prefix};
  TempDir dir;
  const std::string agent = dir.path() + "/agent.sh", log = dir.path() + "/agent.log";
  {
    std::ofstream a(agent);
    a << "#!/bin/sh\n"
      << "# mpirun's rsh agent for emulated hosts: HOST (10.77.0.I) then the command.\n"
      << "while [ $# -gt 0 ]; do case \"$1\" in -*) shift ;; *) break ;; esac; done\n"
      << "host=$1; shift\n"
      << "echo \"" << prefix << "-h${host##*.}\" >>" << log << "\n"
      << "exec ip netns exec \"" << prefix << "-h${host##*.}\" sh -c \"$*\"\n";
  }
  ::chmod(agent.c_str(), 0755);
  const int port = 29400 + ::getpid() % 500;
  const std::string ip = which("ip");
  // ip netns exec HOST1 mpirun --mca plm_rsh_agent AGENT --host 10.77.0.1:2,10.77.0.2:2 -np 4
  //   -x WEFT_JOB_TOKEN -x WEFT_STORE=10.77.0.1:PORT [-x MORE] CMD...
  auto emulated = [&](std::vector<std::string> more, std::vector<std::string> cmd) {
    std::vector<std::string> a = {ip,
                                  "netns",
                                  "exec",
                                  prefix + "-h1",
                                  mpirun_,
                                  "--mca",
                                  "plm_rsh_agent",
                                  agent,
                                  "--mca",
                                  "plm_rsh_no_tree_spawn",
                                  "1",
                                  "--host",
                                  "10.77.0.1:2,10.77.0.2:2",
                                  "-np",
                                  "4",
                                  "-x",
                                  "WEFT_JOB_TOKEN",
                                  "-x",
                                  "WEFT_STORE=10.77.0.1:" + std::to_string(port)};
    for (auto& m : more) {
      a.push_back("-x");
      a.push_back(m);
    }
    a.insert(a.end(), cmd.begin(), cmd.end());
    return a;
  };
  auto r = run(emulated({}, {worker(), "allreduce-loop", "20", "100000"}), env(), 120s);
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(count(r.output, "OK"), 4u) << r.output;
  std::ifstream in(log);
  std::string entered;
  std::getline(in, entered);
  EXPECT_EQ(entered, prefix + "-h2") << "host 2's daemon did not start in its namespace";

  // Rank 3 (on host 2) never starts Weft: named within seconds.
  auto m = run(emulated({"WEFT_STORE_TIMEOUT=3"},
                        {"/bin/sh", "-c",
                         "if [ \"$OMPI_COMM_WORLD_RANK\" = 3 ]; then exec sleep 60; fi; exec "
                         "\"$0\" \"$@\"",
                         worker(), "allreduce-loop", "5", "1000"}),
               env(), 100s);
  EXPECT_NE(m.code, 0) << m.output;
  EXPECT_NE(m.output.find("these never joined: rank 3 (1 of 4)"), std::string::npos) << m.output;
  EXPECT_LT(m.took, 50s) << m.output;
}

// Two jobs given the same store port on one host: the second fails within
// seconds naming WEFT_STORE, while the first (waiting for a rank) holds it.
TEST_F(Mpirun, TwoJobsOnOneStorePort) {
  const int port = free_port();
  const std::vector<std::string> wait_for_rank_1 = {
      "/bin/sh",
      "-c",
      "if [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then exec sleep 30; fi; exec \"$0\" \"$@\"",
      worker(),
      "allreduce-loop",
      "5",
      "1000"};
  Process first(line(2, port, wait_for_rank_1, {"WEFT_STORE_TIMEOUT=25"}), env());
  // Until the first job's rank 0 serves the store.
  auto until = Clock::now() + 60s;
  while (!port_open(port) && Clock::now() < until) std::this_thread::sleep_for(50ms);
  ASSERT_TRUE(port_open(port)) << first.output();
  auto r = run(line(2, port, {worker(), "allreduce-loop", "5", "1000"}), env(), 100s);
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("WEFT_STORE"), std::string::npos) << r.output;
  EXPECT_TRUE(r.output.find("cannot serve the rendezvous store on port " + std::to_string(port)) !=
                  std::string::npos ||
              r.output.find("belongs to another job") != std::string::npos)
      << r.output;
  EXPECT_LT(r.took, 20s) << r.output;  // the first job holds the port for 25 s
  first.signal(SIGTERM);
  first.wait(30s);
}

// ---- torchrun -------------------------------------------------------------

class Torchrun : public ::testing::Test {
 protected:
  void SetUp() override {
    // Debian's torch is for Debian's python3.
    for (const char* p : {"/usr/bin/python3", "/usr/local/bin/python3"}) {
      if (::access(p, X_OK) != 0) continue;
      Process check({p, "-c",
                     "import importlib.util, sys; "
                     "sys.exit(importlib.util.find_spec('torch') is None)"});
      if (check.wait(60s) && check.exit_code() == 0) {
        python_ = p;
        break;
      }
    }
    if (python_.empty()) GTEST_SKIP() << "torch is not installed (scripts/deps.sh installs it)";
  }

  // torchrun's default output options fail under Python 3.11 with torch 1.13:
  // --redirects 2 --tee 1 (stderr to the log files, stdout to both).
  std::vector<std::string> line(int n, const std::string& log_dir, std::vector<std::string> cmd) {
    std::vector<std::string> a = {python_,
                                  "-m",
                                  "torch.distributed.run",
                                  "--nproc_per_node",
                                  std::to_string(n),
                                  "--redirects",
                                  "2",
                                  "--tee",
                                  "1",
                                  "--log_dir",
                                  log_dir,
                                  "--master_port",
                                  std::to_string(29700 + ::getpid() % 200 * 2),
                                  "--no_python"};
    a.insert(a.end(), cmd.begin(), cmd.end());
    return a;
  }

  // Every stderr.log torchrun wrote under dir.
  static std::string stderr_logs(const std::string& dir) {
    Process cat({"/bin/sh", "-c", "find \"$0\" -name stderr.log -exec cat {} +", dir});
    cat.wait(30s);
    return cat.output();
  }

  std::string python_;
};

TEST_F(Torchrun, TwoRanks) {
  TempDir dir;
  auto r = run(line(2, dir.path(), {worker(), "allreduce-loop", "20", "10000"}),
               {{"WEFT_JOB_TOKEN", kToken}}, 200s);
  EXPECT_EQ(r.code, 0) << r.output << stderr_logs(dir.path());
  EXPECT_EQ(count(r.output, "OK"), 2u) << r.output << stderr_logs(dir.path());
}

TEST_F(Torchrun, MissingRankIsNamedWithinSeconds) {
  TempDir dir;
  auto t0 = Clock::now();
  auto r = run(
      line(2, dir.path(),
           {"/bin/sh", "-c", "if [ \"$RANK\" = 1 ]; then exec sleep 100; fi; exec \"$0\" \"$@\"",
            worker(), "allreduce-loop", "5", "1000"}),
      {{"WEFT_JOB_TOKEN", kToken}, {"WEFT_STORE_TIMEOUT", "3"}}, 200s);
  const std::string all = r.output + stderr_logs(dir.path());
  EXPECT_NE(r.code, 0) << all;
  EXPECT_NE(all.find("these never joined: rank 1 (1 of 2)"), std::string::npos) << all;
  EXPECT_LT(Clock::now() - t0, 90s) << all;  // torchrun itself starts in seconds; not sleep 100
}

TEST_F(Torchrun, NoTokenSaysHowToGiveOne) {
  TempDir dir;
  auto r = run(line(2, dir.path(), {worker(), "allreduce-loop", "5", "1000"}),
               {{"WEFT_JOB_TOKEN", ""}}, 200s);
  const std::string all = r.output + stderr_logs(dir.path());
  EXPECT_NE(r.code, 0) << all;
  EXPECT_NE(all.find("no job token"), std::string::npos) << all;
  EXPECT_NE(all.find("before torchrun"), std::string::npos) << all;
}

// ---- Slurm ----------------------------------------------------------------

// The environment srun gives task `rank` of `n` on one node (job 4242, step
// 0), plus the user's exported variables (srun passes the environment on).
std::map<std::string, std::string> srun_env(int rank, int n,
                                            std::map<std::string, std::string> user) {
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  std::string gtids;
  for (int i = 0; i < n; ++i) gtids += (i ? "," : "") + std::to_string(i);
  std::map<std::string, std::string> e = {
      {"SLURM_PROCID", std::to_string(rank)},
      {"SLURM_LOCALID", std::to_string(rank)},
      {"SLURM_NODEID", "0"},
      {"SLURM_NTASKS", std::to_string(n)},
      {"SLURM_NPROCS", std::to_string(n)},
      {"SLURM_NNODES", "1"},
      {"SLURM_JOB_NUM_NODES", "1"},
      {"SLURM_STEP_NUM_NODES", "1"},
      {"SLURM_STEP_NUM_TASKS", std::to_string(n)},
      {"SLURM_TASKS_PER_NODE", std::to_string(n)},
      {"SLURM_STEP_TASKS_PER_NODE", std::to_string(n)},
      {"SLURM_NODELIST", host},
      {"SLURM_JOB_NODELIST", host},
      {"SLURM_STEP_NODELIST", host},
      {"SLURMD_NODENAME", host},
      {"SLURM_TOPOLOGY_ADDR", host},
      {"SLURM_JOB_ID", "4242"},
      {"SLURM_JOBID", "4242"},
      {"SLURM_STEP_ID", "0"},
      {"SLURM_STEPID", "0"},
      {"SLURM_GTIDS", gtids},
      {"SLURM_CPUS_ON_NODE", "2"},
      {"SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"},
      {"SLURM_SRUN_COMM_HOST", "127.0.0.1"},
      {"SLURM_CLUSTER_NAME", "weft-test"},
      {"SLURM_JOB_NAME", "comm_worker"},
      {"SLURM_PRIO_PROCESS", "0"},
      {"SLURM_SUBMIT_DIR", "/tmp"},
      {"SLURM_SUBMIT_HOST", host},
      {"SLURM_UMASK", "0022"},
      {"SLURM_DISTRIBUTION", "cyclic"},
  };
  for (auto& [k, v] : user) e[k] = v;
  return e;
}

TEST(Slurm, TwoTasksAsSrunStartsThem) {
  const std::string store = "127.0.0.1:" + std::to_string(free_port());
  std::vector<std::unique_ptr<Process>> tasks;
  for (int r = 0; r < 2; ++r) {
    tasks.push_back(std::make_unique<Process>(
        std::vector<std::string>{worker(), "allreduce-loop", "20", "10000"},
        srun_env(r, 2, {{"WEFT_JOB_TOKEN", kToken}, {"WEFT_STORE", store}})));
  }
  for (auto& t : tasks) {
    ASSERT_TRUE(t->wait(60s)) << t->output();
    EXPECT_EQ(t->exit_code(), 0) << t->output();
    EXPECT_NE(t->output().find("OK"), std::string::npos) << t->output();
  }
}

// Without WEFT_STORE: rank 0 serves on the first node of SLURM_STEP_NODELIST
// (this host's name here) at a port derived from the job and step ids.
TEST(Slurm, NoStoreAddressNeeded) {
  std::vector<std::unique_ptr<Process>> tasks;
  const std::string step = std::to_string(::getpid() % 1000);  // another port per test run
  for (int r = 0; r < 2; ++r) {
    tasks.push_back(std::make_unique<Process>(
        std::vector<std::string>{worker(), "allreduce-loop", "20", "10000"},
        srun_env(r, 2,
                 {{"WEFT_JOB_TOKEN", kToken}, {"SLURM_STEP_ID", step}, {"SLURM_STEPID", step}})));
  }
  for (auto& t : tasks) {
    ASSERT_TRUE(t->wait(60s)) << t->output();
    EXPECT_EQ(t->exit_code(), 0) << t->output();
    EXPECT_NE(t->output().find("OK"), std::string::npos) << t->output();
  }
}

TEST(Slurm, MissingTaskIsNamedWithinSeconds) {
  const std::string store = "127.0.0.1:" + std::to_string(free_port());
  auto r = run(
      {worker(), "allreduce-loop", "5", "1000"},
      srun_env(0, 2,
               {{"WEFT_JOB_TOKEN", kToken}, {"WEFT_STORE", store}, {"WEFT_STORE_TIMEOUT", "3"}}),
      60s);
  EXPECT_EQ(r.code, 4) << r.output;  // TimeoutError
  EXPECT_NE(r.output.find("these never joined: rank 1 (1 of 2)"), std::string::npos) << r.output;
  EXPECT_LT(r.took, 30s) << r.output;
}

// ---- bad input ----------------------------------------------------------------

// One process with Open MPI's variables for rank `rank` of `n`.
std::map<std::string, std::string> ompi_env(int rank, int n,
                                            std::map<std::string, std::string> more) {
  std::map<std::string, std::string> e = {{"OMPI_COMM_WORLD_RANK", std::to_string(rank)},
                                          {"OMPI_COMM_WORLD_SIZE", std::to_string(n)},
                                          {"OMPI_COMM_WORLD_LOCAL_RANK", std::to_string(rank)},
                                          {"OMPI_COMM_WORLD_LOCAL_SIZE", std::to_string(n)},
                                          {"OMPI_MCA_ess_base_jobid", "777"},
                                          {"WEFT_JOB_TOKEN", kToken}};
  for (auto& [k, v] : more) e[k] = v;
  return e;
}

void expect_quick_error(const std::map<std::string, std::string>& env, const std::string& what) {
  auto r = run({worker(), "allreduce-loop", "5", "1000"}, env, 60s);
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.output.find(what), std::string::npos) << r.output;
  EXPECT_LT(r.took, 20s) << r.output;
}

TEST(LauncherBadInput, StoreWithoutAPort) {
  expect_quick_error(ompi_env(0, 2, {{"WEFT_STORE", "127.0.0.1"}}),
                     "WEFT_STORE='127.0.0.1' is invalid: expected HOST:PORT");
}

TEST(LauncherBadInput, MasterPortOutOfRange) {
  for (const char* port : {"0", "70000"}) {
    expect_quick_error(ompi_env(0, 2, {{"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", port}}),
                       std::string("MASTER_PORT='") + port + "' is invalid");
    expect_quick_error({{"RANK", "0"},
                        {"WORLD_SIZE", "2"},
                        {"LOCAL_RANK", "0"},
                        {"LOCAL_WORLD_SIZE", "2"},
                        {"MASTER_ADDR", "127.0.0.1"},
                        {"MASTER_PORT", port},
                        {"WEFT_JOB_TOKEN", kToken}},
                       std::string("MASTER_PORT='") + port + "' is invalid");
  }
}

TEST(LauncherBadInput, NoStoreAddressGivesAdviceThatWorks) {
  expect_quick_error(ompi_env(0, 2, {}), "-x WEFT_STORE=127.0.0.1:29500");
}

TEST(LauncherBadInput, NoTokenSaysHowToPassOneToMpirun) {
  auto env = ompi_env(0, 2, {{"WEFT_STORE", "127.0.0.1:1"}});
  env["WEFT_JOB_TOKEN"] = "";
  expect_quick_error(env, "mpirun -x WEFT_JOB_TOKEN");
}

TEST(LauncherBadInput, StoreAddressOfAnotherHost) {
  // 192.0.2.1 (TEST-NET-1) is no address of this host: rank 0 cannot serve there.
  expect_quick_error(ompi_env(0, 2, {{"WEFT_STORE", "192.0.2.1:29500"}}),
                     "is not an address of rank 0's host");
}

TEST(LauncherBadInput, RankCountsThatDisagree) {
  // Within one rank's variables.
  expect_quick_error(
      ompi_env(0, 2, {{"WEFT_STORE", "127.0.0.1:1"}, {"OMPI_MCA_orte_ess_num_procs", "3"}}),
      "OMPI_COMM_WORLD_SIZE=2 but OMPI_MCA_orte_ess_num_procs=3");
  expect_quick_error(
      srun_env(0, 2,
               {{"SLURM_NPROCS", "4"}, {"WEFT_STORE", "127.0.0.1:1"}, {"WEFT_JOB_TOKEN", kToken}}),
      "SLURM_NTASKS=2 but SLURM_NPROCS=4");
  // Between the ranks of one job: rank 1 says 3 ranks, rank 0 said 2.
  const std::string store = "127.0.0.1:" + std::to_string(free_port());
  Process rank0(
      {worker(), "allreduce-loop", "5", "1000"},
      ompi_env(0, 2,
               {{"WEFT_STORE", store}, {"WEFT_STORE_TIMEOUT", "30"}, {"WEFT_LOG_LEVEL", "info"}}));
  // Until rank 0 has recorded the job (it connects right after serving).
  auto until = Clock::now() + 30s;
  while (rank0.output().find("connecting to the rendezvous store") == std::string::npos &&
         Clock::now() < until)
    std::this_thread::sleep_for(20ms);
  std::this_thread::sleep_for(500ms);
  expect_quick_error(ompi_env(1, 3, {{"WEFT_STORE", store}}),
                     "the launcher's rank counts disagree: this rank has OMPI_COMM_WORLD_SIZE=3");
  rank0.signal(SIGKILL);
  rank0.wait(10s);
}

}  // namespace
}  // namespace weft::testing
