// End-to-end tests of `weft run`: the built weft binary launches
// launch_probe workers (launch_probe.cc). Deadlines are generous: nothing
// here asserts on speed.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <map>
#include <memory>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "core/settings.h"
#include "launch/local_launcher.h"
#include "launch/run.h"
#include "testing/testing.h"
#include "weft/store.h"

namespace weft::testing {
namespace {

using namespace std::chrono_literals;

constexpr auto kDeadline = std::chrono::seconds(60);

std::string weft_bin() { return bin_dir() + "/weft"; }
std::string probe_bin() { return bin_dir() + "/launch_probe"; }

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// `weft ARGS...` with its stdout and stderr captured apart.
class Weft {
 public:
  // `shell` runs first in the same shell (e.g. "ulimit -n 100;").
  explicit Weft(std::vector<std::string> args, std::map<std::string, std::string> env = {},
                const std::string& shell = "")
      : err_path_(dir_.path() + "/stderr") {
    std::vector<std::string> argv = {
        "/bin/sh", "-c", shell + "exec \"$0\" \"$@\" 2>\"$TEST_STDERR_PATH\"", weft_bin()};
    argv.insert(argv.end(), args.begin(), args.end());
    env["TEST_STDERR_PATH"] = err_path_;
    proc_ = std::make_unique<Process>(argv, env);
  }

  // Waits for the launcher; fails the test if it does not exit in time.
  int wait() {
    bool exited = proc_->wait(kDeadline);
    EXPECT_TRUE(exited) << "weft run did not exit; stdout:\n" << out() << "\nstderr:\n" << err();
    return exited ? proc_->exit_code() : -1;
  }
  // Waits until stdout satisfies pred.
  bool wait_for_output(const std::function<bool(const std::string&)>& pred) {
    auto until = std::chrono::steady_clock::now() + kDeadline;
    while (std::chrono::steady_clock::now() < until) {
      if (pred(out())) return true;
      if (proc_->wait(0ms)) return pred(out());
      std::this_thread::sleep_for(20ms);
    }
    return false;
  }
  bool wait_for_stderr(const std::string& needle) {
    auto until = std::chrono::steady_clock::now() + kDeadline;
    while (std::chrono::steady_clock::now() < until) {
      if (err().find(needle) != std::string::npos) return true;
      std::this_thread::sleep_for(20ms);
    }
    return false;
  }
  void signal(int sig) { proc_->signal(sig); }
  std::string out() const { return proc_->output(); }
  std::string err() const { return read_file(err_path_); }
  std::string all() const { return "stdout:\n" + out() + "\nstderr:\n" + err(); }

 private:
  TempDir dir_;
  std::string err_path_;
  std::unique_ptr<Process> proc_;
};

// The pids of the "[R] ready pid=P" lines of stdout, by rank.
std::map<int, pid_t> ready_pids(const std::string& out) {
  static const std::regex re(R"(^\[(\d+)\] ready pid=(\d+)$)");
  std::map<int, pid_t> pids;
  for (const auto& line : lines_of(out)) {
    std::smatch m;
    if (std::regex_match(line, m, re)) pids[std::stoi(m[1])] = std::stoi(m[2]);
  }
  return pids;
}

// True when pid no longer runs (absent, or a zombie nobody reaped).
bool gone(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  if (!in) return true;
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t paren = stat.rfind(')');
  return paren == std::string::npos || paren + 2 >= stat.size() || stat[paren + 2] == 'Z' ||
         stat[paren + 2] == 'X';
}

bool all_gone(const std::map<int, pid_t>& pids) {
  auto until = std::chrono::steady_clock::now() + kDeadline;
  for (;;) {
    bool any = false;
    for (auto [rank, pid] : pids) any = any || !gone(pid);
    if (!any) return true;
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::sleep_for(20ms);
  }
}

TEST(Launch, EachRankGetsItsEnvironment) {
  Weft w({"run", "-n", "4", "--timeout", "12", "--log-level", "info", "--env", "PROBE_EXTRA=a=b",
          "--", probe_bin(), "env"});
  ASSERT_EQ(w.wait(), 0) << w.all();
  static const std::regex re(
      R"(^\[(\d+)\] rank=(\d+) size=4 local_rank=(\d+) local_size=4 nnodes=1 node_rank=0 )"
      R"(store=(127\.0\.0\.1:\d+) token_len=64 token_head=(\w{8}) timeout=12 log_level=info )"
      R"(extra=a=b$)");
  std::set<int> ranks;
  std::set<std::string> stores, tokens;
  auto lines = lines_of(w.out());
  ASSERT_EQ(lines.size(), 4u) << w.all();
  for (const auto& line : lines) {
    std::smatch m;
    ASSERT_TRUE(std::regex_match(line, m, re)) << line;
    EXPECT_EQ(m[1], m[2]);
    EXPECT_EQ(m[2], m[3]);
    ranks.insert(std::stoi(m[2]));
    stores.insert(m[4]);
    tokens.insert(m[5]);
  }
  EXPECT_EQ(ranks, (std::set<int>{0, 1, 2, 3}));
  EXPECT_EQ(stores.size(), 1u);
  EXPECT_EQ(tokens.size(), 1u);
}

TEST(Bind, WorkersGetEqualSharesInCpuOrder) {
  using launch::worker_cpus;
  const std::vector<int> four = {0, 1, 4, 5};
  EXPECT_EQ(worker_cpus(four, 0, 2), (std::vector<int>{0, 1}));
  EXPECT_EQ(worker_cpus(four, 1, 2), (std::vector<int>{4, 5}));
  EXPECT_EQ(worker_cpus(four, 2, 4), (std::vector<int>{4}));
  // Uneven: 3 workers on 4 CPUs get 1, 1 and 2.
  EXPECT_EQ(worker_cpus(four, 0, 3), (std::vector<int>{0}));
  EXPECT_EQ(worker_cpus(four, 2, 3), (std::vector<int>{4, 5}));
  // More workers than CPUs, or one worker: nobody is bound.
  EXPECT_TRUE(worker_cpus(four, 0, 5).empty());
  EXPECT_TRUE(worker_cpus(four, 0, 1).empty());
  EXPECT_TRUE(worker_cpus({}, 0, 2).empty());
}

// The CPU list ("0,1") each rank's probe printed, by rank.
std::map<int, std::string> cpus_by_rank(const std::string& out) {
  static const std::regex re(R"(^\[(\d+)\] cpus=([\d,]*)$)");
  std::map<int, std::string> cpus;
  for (const auto& line : lines_of(out)) {
    std::smatch m;
    if (std::regex_match(line, m, re)) cpus[std::stoi(m[1])] = m[2];
  }
  return cpus;
}

TEST(Launch, WorkersAreBoundToTheirShareOfTheCpus) {
  cpu_set_t set;
  ASSERT_EQ(sched_getaffinity(0, sizeof set, &set), 0);
  std::vector<int> mine;
  std::string all;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (!CPU_ISSET(c, &set)) continue;
    mine.push_back(c);
    all += all.empty() ? "" : ",";
    all += std::to_string(c);
  }
  const int n = static_cast<int>(std::min<size_t>(mine.size(), 4));
  if (n < 2) GTEST_SKIP() << "needs 2 CPUs";
  {
    Weft w({"run", "-n", std::to_string(n), probe_bin(), "cpus"});
    ASSERT_EQ(w.wait(), 0) << w.all();
    auto cpus = cpus_by_rank(w.out());
    ASSERT_EQ(cpus.size(), static_cast<size_t>(n)) << w.all();
    for (int r = 0; r < n; ++r) {
      std::string expect;
      for (int c : launch::worker_cpus(mine, r, n)) {
        expect += expect.empty() ? "" : ",";
        expect += std::to_string(c);
      }
      EXPECT_EQ(cpus[r], expect) << "rank " << r;
    }
  }
  // --bind none, and more workers than CPUs: every worker may use every CPU.
  for (auto args : {std::vector<std::string>{"run", "-n", std::to_string(n), "--bind", "none"},
                    std::vector<std::string>{"run", "-n", std::to_string(mine.size() + 1)}}) {
    args.push_back(probe_bin());
    args.push_back("cpus");
    Weft w(args);
    ASSERT_EQ(w.wait(), 0) << w.all();
    auto cpus = cpus_by_rank(w.out());
    ASSERT_FALSE(cpus.empty()) << w.all();
    for (auto& [r, list] : cpus) EXPECT_EQ(list, all) << "rank " << r;
  }
}

TEST(Launch, EveryJobGetsAFreshToken) {
  Weft a({"run", "-n", "1", probe_bin(), "env"});
  Weft b({"run", "-n", "1", probe_bin(), "env"});
  ASSERT_EQ(a.wait(), 0) << a.all();
  ASSERT_EQ(b.wait(), 0) << b.all();
  static const std::regex re(R"(token_head=(\w{8}))");
  std::smatch ma, mb;
  std::string oa = a.out(), ob = b.out();
  ASSERT_TRUE(std::regex_search(oa, ma, re)) << oa;
  ASSERT_TRUE(std::regex_search(ob, mb, re)) << ob;
  EXPECT_NE(ma[1], mb[1]);
}

TEST(Launch, LinesArePrefixedAndNeverInterleaved) {
  constexpr int kRanks = 4, kLines = 300;
  // --oversubscribe: no warning line about more workers than CPUs on stderr.
  Weft w({"run", "--oversubscribe", "-n", std::to_string(kRanks), probe_bin(), "lines",
          std::to_string(kLines)});
  ASSERT_EQ(w.wait(), 0) << w.all();
  for (auto [text, word] : {std::pair{w.out(), "line"}, std::pair{w.err(), "err"}}) {
    std::vector<int> next(kRanks, 0);
    static const std::regex re(R"(^\[(\d)\] (\w+) (\d+) of rank (\d)$)");
    for (const auto& line : lines_of(text)) {
      std::smatch m;
      ASSERT_TRUE(std::regex_match(line, m, re)) << "mixed line: '" << line << "'";
      int r = std::stoi(m[1]);
      ASSERT_EQ(m[2], word);
      ASSERT_EQ(std::stoi(m[4]), r);
      ASSERT_LT(r, kRanks);
      EXPECT_EQ(std::stoi(m[3]), next[static_cast<size_t>(r)]++) << "out of order: " << line;
    }
    for (int n : next) EXPECT_EQ(n, kLines);
  }
}

TEST(Launch, StdoutAndStderrStayApart) {
  Weft w({"run", "-n", "2", probe_bin(), "stdio"});
  ASSERT_EQ(w.wait(), 0) << w.all();
  auto out = lines_of(w.out()), err = lines_of(w.err());
  std::sort(out.begin(), out.end());
  std::sort(err.begin(), err.end());
  EXPECT_EQ(out, (std::vector<std::string>{"[0] out 0", "[1] out 1"}));
  EXPECT_EQ(err, (std::vector<std::string>{"[0] err 0", "[1] err 1"}));
}

TEST(Launch, NoPrefix) {
  Weft w({"run", "-n", "2", "--no-prefix", probe_bin(), "stdio"});
  ASSERT_EQ(w.wait(), 0) << w.all();
  auto out = lines_of(w.out());
  std::sort(out.begin(), out.end());
  EXPECT_EQ(out, (std::vector<std::string>{"out 0", "out 1"}));
}

TEST(Launch, PartialLastLineIsWrittenAtExit) {
  Weft w({"run", "-n", "2", probe_bin(), "partial"});
  ASSERT_EQ(w.wait(), 0) << w.all();
  EXPECT_NE(w.out().find("[0] no newline\n"), std::string::npos) << w.all();
  EXPECT_NE(w.out().find("[1] no newline\n"), std::string::npos) << w.all();
  EXPECT_NE(w.err().find("[1] err no newline\n"), std::string::npos) << w.all();
}

TEST(Launch, LongLineIsCutIntoBoundedChunks) {
  constexpr size_t kBytes = 300000;
  Weft w({"run", "-n", "1", probe_bin(), "longline", std::to_string(kBytes)});
  ASSERT_EQ(w.wait(), 0) << w.err();
  std::string out = w.out();
  ASSERT_FALSE(out.empty());
  EXPECT_EQ(out.back(), '\n');
  size_t total = 0;
  auto lines = lines_of(out);
  EXPECT_GE(lines.size(), kBytes / (64 << 10));
  for (const auto& line : lines) {
    ASSERT_EQ(line.rfind("[0] ", 0), 0u);
    std::string payload = line.substr(4);
    EXPECT_LE(payload.size(), size_t{64} << 10);
    EXPECT_EQ(payload.find_first_not_of('x'), std::string::npos);
    total += payload.size();
  }
  EXPECT_EQ(total, kBytes);
}

TEST(Launch, FailedExitCodeStopsTheOthers) {
  Weft w({"run", "-n", "3", probe_bin(), "exit", "1", "3"});
  EXPECT_EQ(w.wait(), 3) << w.all();
  std::string err = w.err();
  EXPECT_NE(err.find("rank 1 (pid "), std::string::npos) << err;
  EXPECT_NE(err.find("exited with code 3; stopping the other 2 workers"), std::string::npos) << err;
  // The others (waiting forever) were stopped: the launcher exited, and so did they.
  EXPECT_TRUE(all_gone(ready_pids(w.out())));
}

TEST(Launch, KilledWorkerIsNamedAndAbortRecordPublished) {
  // The surviving ranks hold SIGTERM until they printed the record; a long
  // grace lets them finish on a loaded machine.
  Weft w({"run", "-n", "4", "--grace", "60", probe_bin(), "kill", "2"});
  EXPECT_EQ(w.wait(), 128 + SIGKILL) << w.all();
  std::string err = w.err();
  EXPECT_NE(err.find("rank 2 (pid "), std::string::npos) << err;
  EXPECT_NE(err.find("was killed by signal 9 (SIGKILL); stopping the other 3 workers"),
            std::string::npos)
      << err;
  static const std::regex re(
      R"(^\[(\d)\] abort: rank 2 \(host [^,]+, pid \d+\) was killed by signal 9 \(SIGKILL\)$)");
  std::set<int> seen;
  for (const auto& line : lines_of(w.out())) {
    std::smatch m;
    if (std::regex_match(line, m, re)) seen.insert(std::stoi(m[1]));
  }
  EXPECT_EQ(seen, (std::set<int>{0, 1, 3})) << w.all();
}

// A stopped worker (SIGSTOP) makes its peers time out: the launcher's last
// line blames the stopped rank, not the one that timed out.
TEST(Launch, StoppedWorkerIsBlamedNotTheOneThatTimedOut) {
  Weft w({"run", "-n", "2", "--timeout", "3", "--grace", "2", "/bin/sh", "-c",
          "echo ready pid=$$; exec \"$0\" \"$@\"", bin_dir() + "/comm_worker", "allreduce-loop",
          "0", "1000"});
  ASSERT_TRUE(w.wait_for_output([](const std::string& o) {
    return ready_pids(o).size() == 2 && o.find("[0] READY") != std::string::npos &&
           o.find("[1] READY") != std::string::npos;
  })) << w.all();
  const pid_t victim = ready_pids(w.out()).at(1);
  ASSERT_EQ(::kill(victim, SIGSTOP), 0);
  EXPECT_EQ(w.wait(), 4) << w.all();  // rank 0's TimeoutError
  auto lines = lines_of(w.err());
  ASSERT_FALSE(lines.empty()) << w.all();
  EXPECT_NE(lines.back().find(fmt::format("rank 1 (pid {}) was stopped", victim)),
            std::string::npos)
      << w.all();
  EXPECT_NE(w.err().find(fmt::format("rank 1 (pid {}) is stopped (state T", victim)),
            std::string::npos)
      << w.all();
  EXPECT_TRUE(gone(victim)) << "the stopped worker was left behind";
}

TEST(Launch, SigtermStopsTheWorkers) {
  Weft w({"run", "-n", "3", probe_bin(), "sleep"});
  ASSERT_TRUE(w.wait_for_output([](const std::string& o) { return ready_pids(o).size() == 3; }))
      << w.all();
  auto pids = ready_pids(w.out());
  w.signal(SIGTERM);
  EXPECT_EQ(w.wait(), 128 + SIGTERM) << w.all();
  EXPECT_NE(w.err().find("received SIGTERM; stopping 3 workers"), std::string::npos) << w.err();
  EXPECT_TRUE(all_gone(pids));
}

TEST(Launch, WorkersIgnoringSigtermAreKilledAfterTheGrace) {
  Weft w({"run", "-n", "2", "--grace", "0.5", probe_bin(), "trapterm"});
  ASSERT_TRUE(w.wait_for_output([](const std::string& o) { return ready_pids(o).size() == 2; }))
      << w.all();
  auto pids = ready_pids(w.out());
  w.signal(SIGTERM);
  EXPECT_EQ(w.wait(), 128 + SIGTERM) << w.all();
  static const std::regex re(R"(2 workers still running 0\.5\d* s after SIGTERM; sending SIGKILL)");
  EXPECT_TRUE(std::regex_search(w.err(), re)) << w.err();
  EXPECT_TRUE(all_gone(pids));
}

TEST(Launch, SecondInterruptKillsAtOnce) {
  Weft w({"run", "-n", "2", "--grace", "3600", probe_bin(), "trapterm"});
  ASSERT_TRUE(w.wait_for_output([](const std::string& o) { return ready_pids(o).size() == 2; }))
      << w.all();
  auto pids = ready_pids(w.out());
  w.signal(SIGINT);
  ASSERT_TRUE(w.wait_for_stderr("received SIGINT; stopping 2 workers")) << w.all();
  w.signal(SIGINT);
  EXPECT_EQ(w.wait(), 128 + SIGINT) << w.all();
  EXPECT_NE(w.err().find("received SIGINT again; killing 2 workers"), std::string::npos) << w.err();
  EXPECT_TRUE(all_gone(pids));
}

TEST(Launch, WorkersDieWithTheLauncher) {
  Weft w({"run", "-n", "2", probe_bin(), "trapterm"});
  ASSERT_TRUE(w.wait_for_output([](const std::string& o) { return ready_pids(o).size() == 2; }))
      << w.all();
  auto pids = ready_pids(w.out());
  w.signal(SIGKILL);
  EXPECT_EQ(w.wait(), 128 + SIGKILL);
  EXPECT_TRUE(all_gone(pids));
}

TEST(Launch, ProgramNotFound) {
  {
    Weft w({"run", "-n", "2", "--", "weft-no-such-program"});
    EXPECT_EQ(w.wait(), 127);
    EXPECT_NE(w.err().find("cannot run 'weft-no-such-program': command not found in PATH"),
              std::string::npos)
        << w.err();
  }
  {
    Weft w({"run", "-n", "2", "/nonexistent/weft-program"});
    EXPECT_EQ(w.wait(), 127);
    EXPECT_NE(w.err().find("cannot run '/nonexistent/weft-program': No such file or directory"),
              std::string::npos)
        << w.err();
  }
  {
    TempDir dir;
    std::string script = dir.path() + "/not-executable";
    std::ofstream(script) << "#!/bin/sh\necho hi\n";
    ::chmod(script.c_str(), 0644);
    Weft w({"run", "-n", "2", script});
    EXPECT_EQ(w.wait(), 127);
    EXPECT_NE(w.err().find("cannot run '" + script + "': not an executable file"),
              std::string::npos)
        << w.err();
  }
}

TEST(Launch, ExecFailureIsReported) {
  TempDir dir;
  std::string garbage = dir.path() + "/garbage";
  std::ofstream(garbage) << "\x7f"
                            "ELF but not really";
  ::chmod(garbage.c_str(), 0755);
  Weft w({"run", "-n", "3", garbage});
  EXPECT_EQ(w.wait(), 127);
  EXPECT_NE(w.err().find("cannot execute '" + garbage + "': Exec format error"), std::string::npos)
      << w.err();
}

TEST(Launch, UsageErrors) {
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"run", "-n", "0", probe_bin(), "env"},
           {"run", "-n", "2"},
           {"run", probe_bin(), "env"},
           {"run", "-n", "2", "--grace", "-1", probe_bin(), "env"},
           {"run", "-n", "2", "--timeout", "soon", probe_bin(), "env"},
           {"run", "-n", "2", "--log-level", "loud", probe_bin(), "env"},
           {"run", "-n", "2", "--env", "NOEQUALS", probe_bin(), "env"},
           {"run", "-n", "2", "--env", "WEFT_RANK=7", probe_bin(), "env"},
           {"frobnicate"},
       }) {
    Weft w(args);
    EXPECT_EQ(w.wait(), 2) << args[args.size() > 1 ? 1 : 0] << "\n" << w.all();
    EXPECT_EQ(w.out().find("rank="), std::string::npos) << "a worker ran: " << w.all();
  }
}

TEST(Launch, HelpDocumentsEveryOption) {
  Weft w({"run", "--help"});
  ASSERT_EQ(w.wait(), 0) << w.all();
  std::string help = w.out();
  for (const char* opt :
       {"-n", "--nproc", "--timeout", "--log-level", "--no-prefix", "--grace", "--env", "PROGRAM",
        "WEFT_RANK", "WEFT_STORE", "WEFT_JOB_TOKEN", "--elastic", "--max-restarts",
        "--oversubscribe", "WEFT_MEMBER", "WEFT_ELASTIC", "weft/evict/", "weft/elastic/dead/",
        "WEFT_STORE_MAX_BYTES"}) {
    EXPECT_NE(help.find(opt), std::string::npos) << opt << " missing from:\n" << help;
  }
}

TEST(Launch, Version) {
  Weft w({"--version"});
  ASSERT_EQ(w.wait(), 0) << w.all();
  EXPECT_EQ(w.out(), "weft 0.1.0\n");
}

TEST(Launch, ConfigListsEverySettingAndHidesTheToken) {
  Weft w({"config"});
  ASSERT_EQ(w.wait(), 0) << w.all();
  auto lines = lines_of(w.out());
  ASSERT_EQ(lines.size(), settings::all().size() + 1) << w.out();
  for (size_t i = 0; i < settings::all().size(); ++i) {
    const auto& s = *settings::all()[i];
    EXPECT_EQ(lines[i + 1].rfind(std::string(s.env) + " ", 0), 0u) << lines[i + 1];
    EXPECT_NE(lines[i + 1].find(std::string(s.doc)), std::string::npos) << lines[i + 1];
  }

  // Values from the environment show, except the token's.
  Process p({weft_bin(), "config"},
            {{"WEFT_JOB_TOKEN", "sekrit-token-0123456789"}, {"WEFT_TIMEOUT", "42"}});
  ASSERT_TRUE(p.wait(kDeadline));
  EXPECT_EQ(p.exit_code(), 0) << p.output();
  EXPECT_EQ(p.output().find("sekrit-token"), std::string::npos);
  static const std::regex re(R"((^|\n)WEFT_TIMEOUT +42 +300 )");
  EXPECT_TRUE(std::regex_search(p.output(), re)) << p.output();
}

TEST(Launch, ConfigMarksInvalidValuesAndUnknownNames) {
  Process p({weft_bin(), "config"}, {{"WEFT_TIMEOUT", "abc"},
                                     {"WEFT_SHM_RING", "3"},
                                     {"WEFT_MODEL_MBPS", "7"},
                                     {"WEFT_ALLREDUCE_ALGO", "ring"},
                                     {"WEFT_TIMOUT", "30"}});
  ASSERT_TRUE(p.wait(kDeadline));
  const std::string out = p.output();
  EXPECT_EQ(p.exit_code(), 1) << out;
  static const std::regex timeout(
      R"((^|\n)WEFT_TIMEOUT +abc \(INVALID\) +300 +INVALID: expected a positive number)");
  static const std::regex ring(
      R"((^|\n)WEFT_SHM_RING +3 \(INVALID\) +0 +INVALID: expected 0 or a power of two in \[64K, 64M\])");
  // Settings read but once absent from the table are listed, valid ones unmarked.
  static const std::regex mbps(R"((^|\n)WEFT_MODEL_MBPS +7 +3000 +cost model)");
  static const std::regex algo(R"((^|\n)WEFT_ALLREDUCE_ALGO +ring +auto +algorithm)");
  EXPECT_TRUE(std::regex_search(out, timeout)) << out;
  EXPECT_TRUE(std::regex_search(out, ring)) << out;
  EXPECT_TRUE(std::regex_search(out, mbps)) << out;
  EXPECT_TRUE(std::regex_search(out, algo)) << out;
  EXPECT_NE(out.find("unknown: WEFT_TIMOUT"), std::string::npos) << out;
  EXPECT_NE(out.find("2 invalid values"), std::string::npos) << out;
}

// weft run checks the WEFT_* variables of its environment (which the
// workers inherit) and of --env before it starts anything.
TEST(Launch, RefusesInvalidSettingsAtStartUp) {
  const std::vector<std::string> run = {"run", "-n", "1", "--", probe_bin(), "env"};
  for (auto [var, value] :
       std::vector<std::pair<std::string, std::string>>{{"WEFT_LOG_LEVEL", "bogus"},
                                                        {"WEFT_REDUCE_ISA", "avx1024"},
                                                        {"WEFT_TIMEOUT", "abc"},
                                                        {"WEFT_SHM_RING", "3"}}) {
    Process p(
        [&] {
          std::vector<std::string> argv = {weft_bin()};
          argv.insert(argv.end(), run.begin(), run.end());
          return argv;
        }(),
        {{var, value}});
    ASSERT_TRUE(p.wait(kDeadline)) << var;
    EXPECT_EQ(p.exit_code(), 2) << p.output();
    EXPECT_NE(p.output().find("weft run: " + var + "='" + value + "' is invalid"),
              std::string::npos)
        << p.output();
    EXPECT_EQ(p.output().find("ready"), std::string::npos) << "a worker started: " << p.output();
  }
  // --env is checked the same way.
  Weft e({"run", "-n", "1", "--env", "WEFT_SHM_RING=96K", "--", probe_bin(), "env"});
  EXPECT_EQ(e.wait(), 2) << e.all();
  EXPECT_NE(e.err().find("WEFT_SHM_RING"), std::string::npos) << e.all();
  // An unknown WEFT_ name is a warning naming it; the job runs.
  Process typo({weft_bin(), "run", "-n", "1", "--", probe_bin(), "env"}, {{"WEFT_TIMOUT", "30"}});
  ASSERT_TRUE(typo.wait(kDeadline));
  EXPECT_EQ(typo.exit_code(), 0) << typo.output();
  EXPECT_NE(typo.output().find("WEFT_TIMOUT is not a Weft setting"), std::string::npos)
      << typo.output();
  EXPECT_NE(typo.output().find("did you mean WEFT_TIMEOUT?"), std::string::npos) << typo.output();
}

TEST(Launch, BadFlagValuesAreUsageErrors) {
  {
    Weft w({"run", "-n", "1", "--timeout", "1e300", "--", probe_bin(), "env"});
    EXPECT_EQ(w.wait(), 2) << w.all();
    EXPECT_NE(w.err().find("--timeout"), std::string::npos) << w.all();
    EXPECT_NE(w.err().find("too large"), std::string::npos) << w.all();
  }
  {
    Weft w({"run", "-n", "1", "--log-level", "bogus", "--", probe_bin(), "env"});
    EXPECT_EQ(w.wait(), 2) << w.all();
    EXPECT_NE(w.err().find("--log-level"), std::string::npos) << w.all();
  }
}

// Multi-node flags up to the point where the launcher would reach the store.
std::vector<std::string> node_args(std::vector<std::string> extra) {
  std::vector<std::string> a = {"run", "--nnodes", "2",           "--node-rank",
                                "0",   "--master", "127.0.0.1:1", "--nproc-per-node",
                                "1"};
  a.insert(a.end(), extra.begin(), extra.end());
  a.insert(a.end(), {"--", probe_bin(), "env"});
  return a;
}

TEST(Launch, TokenFileIsChecked) {
  TempDir dir;
  const std::string good = dir.path() + "/token";
  std::ofstream(good) << "0123456789abcdef0123\n";
  EXPECT_EQ(launch::read_token_file(good), "0123456789abcdef0123");
  auto refused = [](const std::string& path, const std::string& why) {
    try {
      launch::read_token_file(path);
      ADD_FAILURE() << path << " accepted";
    } catch (const launch::LaunchError& e) {
      EXPECT_EQ(e.exit_code(), 2);
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
    }
  };
  refused(dir.path(), "is a directory");
  refused(dir.path() + "/missing", "No such file");
  const std::string fifo = dir.path() + "/fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  refused(fifo, "not a regular file");  // at once: no writer is waited for
  const std::string empty = dir.path() + "/empty";
  std::ofstream(empty) << "\n";
  refused(empty, "is empty");
  const std::string one = dir.path() + "/one";
  std::ofstream(one) << "x";
  refused(one, "at least 16");
  const std::string huge = dir.path() + "/huge";
  std::ofstream(huge) << std::string(5000, 'k');
  refused(huge, "too long");

  // Through weft run: usage errors, before any connection.
  Weft d(node_args({"--token-file", dir.path()}));
  EXPECT_EQ(d.wait(), 2) << d.all();
  EXPECT_NE(d.err().find("is a directory"), std::string::npos) << d.all();
  Weft both(node_args({"--token-file", good, "--allow-unauthenticated"}));
  EXPECT_EQ(both.wait(), 2) << both.all();
  EXPECT_NE(both.err().find("contradict"), std::string::npos) << both.all();
  Process shorty(
      [] {
        auto a = node_args({});
        a.insert(a.begin(), weft_bin());
        return a;
      }(),
      {{"WEFT_JOB_TOKEN", "x"}});
  ASSERT_TRUE(shorty.wait(kDeadline));
  EXPECT_EQ(shorty.exit_code(), 2) << shorty.output();
  EXPECT_NE(shorty.output().find("WEFT_JOB_TOKEN"), std::string::npos) << shorty.output();
  EXPECT_NE(shorty.output().find("at least 16"), std::string::npos) << shorty.output();
}

// weft-bench refuses bad sizes and counts before it starts (exit code 2,
// the flag named), rather than failing in the middle of the sweep.
TEST(Bench, BadInputIsAUsageError) {
  const std::string bench = bin_dir() + "/weft-bench";
  if (::access(bench.c_str(), X_OK) != 0) GTEST_SKIP() << "weft-bench is not built";
  auto run = [&](std::vector<std::string> args) {
    args.insert(args.begin(), bench);
    auto p = std::make_unique<Process>(args);
    EXPECT_TRUE(p->wait(kDeadline));
    return p;
  };
  for (const char* iters : {"0", "-1"}) {
    auto p = run({"allreduce", "--iters", iters});
    EXPECT_EQ(p->exit_code(), 2) << p->output();
    EXPECT_NE(p->output().find("--iters"), std::string::npos) << p->output();
  }
  auto order = run({"allreduce", "--min-bytes", "4M", "--max-bytes", "4K"});
  EXPECT_EQ(order->exit_code(), 2) << order->output();
  EXPECT_NE(order->output().find("--min-bytes 4M is larger than --max-bytes 4K"), std::string::npos)
      << order->output();
  auto huge = run({"allreduce", "--min-bytes", "16384G", "--max-bytes", "16384G"});
  EXPECT_EQ(huge->exit_code(), 2) << huge->output();
  EXPECT_NE(huge->output().find("--max-bytes 16384G"), std::string::npos) << huge->output();
  EXPECT_NE(huge->output().find("49152.0 GiB"), std::string::npos) << huge->output();
  auto bytes = run({"allreduce", "--min-bytes", "4Q"});
  EXPECT_EQ(bytes->exit_code(), 2) << bytes->output();
  EXPECT_NE(bytes->output().find("--min-bytes='4Q'"), std::string::npos) << bytes->output();
  auto flag = run({"allreduce", "--no-such-flag"});
  EXPECT_EQ(flag->exit_code(), 2) << flag->output();
  auto env =
      std::make_unique<Process>(std::vector<std::string>{bench, "allreduce"},
                                std::map<std::string, std::string>{{"WEFT_LOG_LEVEL", "bogus"}});
  ASSERT_TRUE(env->wait(kDeadline));
  EXPECT_EQ(env->exit_code(), 2) << env->output();
  EXPECT_NE(env->output().find("WEFT_LOG_LEVEL='bogus'"), std::string::npos) << env->output();
}

// --- The launcher owns every process of the job (issue 11, item 8).

// The pids of the "[R] child P" lines of stdout.
std::vector<pid_t> child_pids(const std::string& out) {
  static const std::regex re(R"(^\[\d+\] child (\d+)$)");
  std::vector<pid_t> pids;
  for (const auto& line : lines_of(out)) {
    std::smatch m;
    if (std::regex_match(line, m, re)) pids.push_back(std::stoi(m[1]));
  }
  return pids;
}

bool all_gone(const std::vector<pid_t>& pids) {
  std::map<int, pid_t> m;
  for (size_t i = 0; i < pids.size(); ++i) m[static_cast<int>(i)] = pids[i];
  return all_gone(m);
}

TEST(Ownership, WhatAWorkerStartedDiesWithIt) {
  // The workers exit 0 at once, leaving a background sleep each.
  Weft w({"run", "-n", "2", "--", "/bin/sh", "-c", "sleep 300 & echo child $!; exit 0"});
  ASSERT_EQ(w.wait(), 0) << w.all();
  auto kids = child_pids(w.out());
  ASSERT_EQ(kids.size(), 2u) << w.all();
  EXPECT_TRUE(all_gone(kids)) << w.all();
}

TEST(Ownership, WhatAFailedWorkerAndItsPeersStartedDies) {
  // Rank 1 fails; rank 0 (stopped by SIGTERM) and rank 1 both leave a sleep.
  Weft w({"run", "-n", "2", "--", "/bin/sh", "-c",
          "sleep 300 & echo child $!; if [ $WEFT_RANK = 1 ]; then sleep 0.5; exit 3; fi; wait"});
  ASSERT_EQ(w.wait(), 3) << w.all();
  auto kids = child_pids(w.out());
  ASSERT_EQ(kids.size(), 2u) << w.all();
  EXPECT_TRUE(all_gone(kids)) << w.all();
}

TEST(Ownership, OrphansThatLeftTheGroupDieWhenTheJobEnds) {
  // setsid: the sleep leaves the worker's process group and session; it is
  // orphaned to the launcher (a subreaper) when the worker exits.
  Weft w({"run", "-n", "1", "--", "/bin/sh", "-c", "setsid sleep 300 & echo child $!; sleep 0.3"});
  ASSERT_EQ(w.wait(), 0) << w.all();
  auto kids = child_pids(w.out());
  ASSERT_EQ(kids.size(), 1u) << w.all();
  EXPECT_TRUE(all_gone(kids)) << w.all();
}

TEST(Ownership, SigkillOfTheLauncherKillsTheWholeTrees) {
  Weft w({"run", "-n", "2", "--", "/bin/sh", "-c", "sleep 300 & echo child $!; wait"});
  ASSERT_TRUE(w.wait_for_output([](const std::string& o) { return child_pids(o).size() == 2; }))
      << w.all();
  auto kids = child_pids(w.out());
  w.signal(SIGKILL);
  EXPECT_EQ(w.wait(), 128 + SIGKILL);
  EXPECT_TRUE(all_gone(kids)) << "the guardian did not kill the workers' groups";
}

int my_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) != 0) return 1;
  return CPU_COUNT(&set);
}

TEST(Ownership, WorkerCountIsChecked) {
  const int cpus = my_cpus();
  {
    const std::string n = std::to_string(launch::kMaxWorkersPerCpu * cpus + 1);
    Weft w({"run", "-n", n, "--", "/bin/true"});
    EXPECT_EQ(w.wait(), 2) << w.all();
    EXPECT_NE(w.err().find("-n " + n + " is more than 64 workers per CPU"), std::string::npos)
        << w.err();
    EXPECT_NE(w.err().find("--oversubscribe"), std::string::npos) << w.err();
  }
  {
    Weft w({"run", "-n", std::to_string(cpus + 1), "--", "/bin/true"});
    EXPECT_EQ(w.wait(), 0) << w.all();
    EXPECT_NE(w.err().find("warning: " + std::to_string(cpus + 1) + " workers on "),
              std::string::npos)
        << w.err();
  }
  {
    // 100 workers need 64 + 4 * 100 descriptors: above a hard limit of 200.
    Weft w({"run", "--oversubscribe", "-n", "100", "--", "/bin/true"}, {}, "ulimit -n 200; ");
    EXPECT_EQ(w.wait(), 2) << w.all();
    EXPECT_NE(w.err().find("-n 100 needs about 464 open files"), std::string::npos) << w.err();
    EXPECT_NE(w.err().find("the open-file limit is 200"), std::string::npos) << w.err();
  }
  {
    // A soft limit below the need but a hard one above it is raised.
    Weft w({"run", "--oversubscribe", "-n", "40", "--", "/bin/true"}, {},
           "ulimit -H -n 1000; ulimit -S -n 100; ");
    EXPECT_EQ(w.wait(), 0) << w.all();
  }
}

TEST(Ownership, StoreSizeIsBounded) {
  // 1 MiB in all: the third value of 400 KiB is refused; the store keeps serving.
  Weft w({"run", "-n", "1", "--", probe_bin(), "fill", "409600"}, {{"WEFT_STORE_MAX_BYTES", "1M"}});
  ASSERT_EQ(w.wait(), 0) << w.all();
  EXPECT_NE(w.out().find("[0] refused after 2: "), std::string::npos) << w.all();
  EXPECT_NE(w.out().find("the store is full: writing 'fill/2' (409606 bytes) would bring it to"),
            std::string::npos)
      << w.all();
  EXPECT_NE(w.out().find("above its limit of 1048576 bytes (WEFT_STORE_MAX_BYTES"),
            std::string::npos)
      << w.all();
  EXPECT_NE(w.out().find("[0] small ok"), std::string::npos) << w.all();
}

TEST(Ownership, StoreServerBoundCountsEveryWrite) {
  TcpStoreOptions options;
  options.job_token = std::string(32, 't');
  options.max_bytes = 1000;
  TcpStoreServer server("127.0.0.1", 0, options);
  TcpStore store("127.0.0.1", server.port(), options);
  store.set("a", std::string(500, 'x'));                            // 501 bytes
  EXPECT_THROW(store.set("b", std::string(500, 'x')), StoreError);  // 1002
  store.set("a", std::string(900, 'y'));                            // replaces: 901
  EXPECT_THROW(store.compare_set("c", std::nullopt, std::string(200, 'z')), StoreError);
  EXPECT_FALSE(store.try_get("c").has_value());
  EXPECT_TRUE(store.remove("a"));
  store.set("b", std::string(900, 'x'));  // room again after the remove
  EXPECT_EQ(store.add("n", 5), 5);
  try {
    store.set("d", std::string(200, 'x'));
    ADD_FAILURE() << "no error";
  } catch (const StoreError& e) {
    EXPECT_NE(std::string(e.what()).find("above its limit of 1000 bytes"), std::string::npos)
        << e.what();
  }
  EXPECT_EQ(store.get("b").size(), 900u);
}

// --- Elastic mode (issue 11, item 2).

TEST(Elastic, KilledWorkerIsRestartedWithANewMember) {
  Weft w({"run", "--elastic", "1:2", "--", probe_bin(), "elastic_kill"});
  ASSERT_EQ(w.wait(), 0) << w.all();
  EXPECT_NE(w.out().find("[0] dead n0.s1.r0: killed by SIGKILL"), std::string::npos) << w.all();
  EXPECT_NE(w.out().find("[1] member n0.s1.r1"), std::string::npos) << w.all();
  EXPECT_NE(w.out().find("[0] member n0.s0.r0"), std::string::npos) << w.all();
  EXPECT_NE(w.err().find("member n0.s1.r0 (rank 1, pid "), std::string::npos) << w.err();
  EXPECT_NE(w.err().find("was killed by signal 9 (SIGKILL) after "), std::string::npos) << w.err();
  EXPECT_NE(w.err().find("restart 1 of 3 as n0.s1.r1"), std::string::npos) << w.err();
  EXPECT_NE(w.err().find("slot 1 restarted as member n0.s1.r1"), std::string::npos) << w.err();
}

TEST(Elastic, EveryWorkerGetsItsMemberAndTheRange) {
  Weft w({"run", "--elastic", "2:3", "--", "/bin/sh", "-c",
          "echo \"$WEFT_MEMBER $WEFT_ELASTIC $WEFT_RANK $WEFT_WORLD_SIZE\""});
  ASSERT_EQ(w.wait(), 0) << w.all();
  for (int r = 0; r < 3; ++r) {
    std::string line = fmt::format("[{}] n0.s{}.r0 2:3 {} 3", r, r, r);
    EXPECT_NE(w.out().find(line), std::string::npos) << line << "\n" << w.all();
  }
  Weft plain({"run", "-n", "2", "--", "/bin/sh", "-c", "echo \"$WEFT_MEMBER[$WEFT_ELASTIC]\""});
  ASSERT_EQ(plain.wait(), 0) << plain.all();
  EXPECT_NE(plain.out().find("[1] n0.s1.r0[]"), std::string::npos) << plain.all();
}

TEST(Elastic, RestartsRunOut) {
  // Slot 1 always fails; one restart is allowed: slot 1 stays down, and the
  // job succeeds once slot 0 finishes (exits 0; it is not restarted): an
  // elastic job survives members that stay down.
  Weft w({"run", "--elastic", "1:2", "--max-restarts", "1", "--", "/bin/sh", "-c",
          "echo start $WEFT_MEMBER; if [ $WEFT_LOCAL_RANK = 1 ]; then exit 4; fi; sleep 2"});
  EXPECT_EQ(w.wait(), 0) << w.all();
  EXPECT_NE(w.err().find("members that failed and stayed down were survived"), std::string::npos)
      << w.err();
  EXPECT_NE(w.out().find("[1] start n0.s1.r1"), std::string::npos) << w.all();
  EXPECT_EQ(w.out().find("n0.s1.r2"), std::string::npos) << w.all();
  EXPECT_EQ(w.out().find("n0.s0.r1"), std::string::npos) << w.all();
  EXPECT_NE(w.err().find("no restarts left (1 of 1 used): slot 1 stays down"), std::string::npos)
      << w.err();
}

TEST(Elastic, StoppedWorkerIsEvictedAndReplaced) {
  Weft w({"run", "--elastic", "1:2", "--", probe_bin(), "evict"});
  ASSERT_EQ(w.wait(), 0) << w.all();
  auto pids = ready_pids(w.out());
  ASSERT_EQ(pids.count(1), 1u) << w.all();
  EXPECT_TRUE(all_gone(pids));
  EXPECT_EQ(w.out().find("resumed"), std::string::npos) << w.all();
  EXPECT_NE(w.out().find("[0] dead n0.s1.r0: evicted: silent for 5.2 s (declared by rank 0"),
            std::string::npos)
      << w.all();
  EXPECT_NE(w.out().find("[1] member n0.s1.r1"), std::string::npos) << w.all();
  EXPECT_NE(w.err().find("member n0.s1.r0 (rank 1, pid "), std::string::npos) << w.err();
  EXPECT_NE(w.err().find("evicted after "), std::string::npos) << w.err();
}

TEST(Elastic, EvictionEndsANonElasticJob) {
  Weft w({"run", "-n", "2", "--", probe_bin(), "evict"});
  EXPECT_EQ(w.wait(), 128 + SIGKILL) << w.all();
  EXPECT_TRUE(all_gone(ready_pids(w.out())));
  EXPECT_EQ(w.out().find("resumed"), std::string::npos) << w.all();
  EXPECT_NE(w.err().find("was killed by signal 9 (SIGKILL) after its eviction (silent for 5.2 s"),
            std::string::npos)
      << w.err();
}

TEST(Elastic, AnotherNodePollsItsEvictions) {
  // Node 1 does not serve the store: its launcher finds weft/evict/n1.s0.r0
  // (written by rank 0 on node 0) by polling, and kills its stopped worker.
  const std::string master = "127.0.0.1:" + std::to_string(free_port());
  const std::map<std::string, std::string> env = {{"WEFT_JOB_TOKEN", std::string(32, 'k')},
                                                  {"PROBE_VICTIM", "n1.s0.r0"}};
  auto node = [&](int rank) {
    return std::make_unique<Weft>(
        std::vector<std::string>{"run", "--nnodes", "2", "--node-rank", std::to_string(rank),
                                 "--master", master, "--nproc-per-node", "1", "--rdzv-timeout",
                                 "60", "--", probe_bin(), "evict"},
        env);
  };
  auto n0 = node(0);
  auto n1 = node(1);
  EXPECT_EQ(n1->wait(), 128 + SIGKILL) << n1->all();
  n0->wait();
  auto pids = ready_pids(n1->out());
  ASSERT_EQ(pids.size(), 1u) << n1->all();
  EXPECT_TRUE(all_gone(pids));
  EXPECT_EQ(n1->out().find("resumed"), std::string::npos) << n1->all();
  EXPECT_NE(n1->err().find("member n1.s0.r0 (rank 1, pid "), std::string::npos) << n1->err();
  EXPECT_NE(n1->err().find("after its eviction (silent for 5.2 s"), std::string::npos) << n1->err();
}

TEST(Elastic, BadFlagsAreUsageErrors) {
  for (const auto& [args, needle] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"--elastic", "5:2"}, "--elastic 5:2: the minimum is above the maximum"},
           {{"--elastic", "0:2"}, "--elastic 0:2: the minimum must be at least 1"},
           {{"--elastic", "two:4"}, "--elastic two:4: 'two' is not a number"},
           {{"--elastic", "2:x"}, "--elastic 2:x: 'x' is not a number"},
           {{"--elastic", "3"}, "--elastic 3: expected MIN:MAX"},
           {{"--elastic", "1:2", "--max-restarts", "-1"}, "--max-restarts"},
           {{"--elastic", "1:2", "--max-restarts", "many"}, "--max-restarts"},
           {{"-n", "2", "--max-restarts", "2"}, "--max-restarts needs --elastic"},
           {{"-n", "3", "--elastic", "1:2"}, "-n 3 and --elastic 1:2 disagree"},
           {{"--nnodes", "3:1", "--master", "127.0.0.1:1", "--nproc-per-node", "1"},
            "--nnodes 3:1: the minimum is above the maximum"},
           {{"--nnodes", "1:2", "--master", "127.0.0.1:1", "-n", "1"},
            "give each node's number of workers with --nproc-per-node"},
           {{"--nnodes", "1:2", "--master", "127.0.0.1:1", "--elastic", "1:2"},
            "an elastic multi-node job is --nnodes MIN:MAX"},
       }) {
    std::vector<std::string> argv = {"run"};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.insert(argv.end(), {"--", probe_bin(), "env"});
    Weft w(argv);
    EXPECT_EQ(w.wait(), 2) << args[0] << " " << args[1] << "\n" << w.all();
    EXPECT_NE(w.err().find(needle), std::string::npos) << needle << "\n" << w.err();
    EXPECT_EQ(w.out().find("rank="), std::string::npos) << "a worker ran: " << w.all();
  }
}

TEST(Elastic, RepeatedFailuresWaitForTheCoolDown) {
  // In-process: short back-offs and a 1.5 s cool-down. Three failures
  // within the window put the slot in cool-down before its third restart,
  // so the job (4 incarnations) cannot end before the cool-down passed.
  launch::WorkerOptions o;
  o.command = {"/bin/sh", "-c", "exit 5"};
  o.nproc = 1;
  o.elastic_min = 1;
  o.max_restarts = 3;
  o.restart_backoff = 10ms;
  o.max_backoff = 40ms;
  o.cool_down = 1500ms;
  o.prefix_output = false;
  auto start = std::chrono::steady_clock::now();
  int code;
  {
    launch::LocalLauncher launcher(o);
    int failures = 0;
    launcher.on_member_failed([&](const launch::WorkerExit& e) {
      ++failures;
      EXPECT_EQ(e.death(), "exited with code 5");
      EXPECT_EQ(e.member, fmt::format("n0.s0.r{}", failures - 1));
    });
    code = launcher.run(launch::JobLayout{});
    EXPECT_EQ(failures, 4);
  }
  EXPECT_EQ(code, 5);
  EXPECT_GE(std::chrono::steady_clock::now() - start, 1500ms);
}

}  // namespace
}  // namespace weft::testing
