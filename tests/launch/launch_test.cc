// End-to-end tests of `weft run`: the built weft binary launches
// launch_probe workers (launch_probe.cc). Deadlines are generous: nothing
// here asserts on speed.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>

#include <fstream>
#include <map>
#include <memory>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "core/settings.h"
#include "launch/local_launcher.h"
#include "testing/testing.h"

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
  explicit Weft(std::vector<std::string> args) : err_path_(dir_.path() + "/stderr") {
    std::vector<std::string> argv = {"/bin/sh", "-c", "exec \"$0\" \"$@\" 2>\"$WEFT_TEST_STDERR\"",
                                     weft_bin()};
    argv.insert(argv.end(), args.begin(), args.end());
    proc_ = std::make_unique<Process>(
        argv, std::map<std::string, std::string>{{"WEFT_TEST_STDERR", err_path_}});
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
  Weft w({"run", "-n", "4", "--timeout", "12", "--log-level", "info", "--env",
          "WEFT_PROBE_EXTRA=a=b", "--", probe_bin(), "env"});
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
  Weft w({"run", "-n", std::to_string(kRanks), probe_bin(), "lines", std::to_string(kLines)});
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
  for (const char* opt : {"-n", "--nproc", "--timeout", "--log-level", "--no-prefix", "--grace",
                          "--env", "PROGRAM", "WEFT_RANK", "WEFT_STORE", "WEFT_JOB_TOKEN"}) {
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
    const auto& s = settings::all()[i];
    EXPECT_EQ(lines[i + 1].rfind(std::string(s.env) + " ", 0), 0u) << lines[i + 1];
    EXPECT_NE(lines[i + 1].find(std::string(s.doc)), std::string::npos) << lines[i + 1];
  }

  // Values from the environment show, except the token's.
  Process p({weft_bin(), "config"}, {{"WEFT_JOB_TOKEN", "sekrit-token"}, {"WEFT_TIMEOUT", "42"}});
  ASSERT_TRUE(p.wait(kDeadline));
  EXPECT_EQ(p.output().find("sekrit-token"), std::string::npos);
  static const std::regex re(R"((^|\n)WEFT_TIMEOUT +42 +300 )");
  EXPECT_TRUE(std::regex_search(p.output(), re)) << p.output();
}

}  // namespace
}  // namespace weft::testing
