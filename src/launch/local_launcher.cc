#include "launch/local_launcher.h"

#include <dirent.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <sched.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <unordered_map>

#include "core/deadline.h"
#include "core/log.h"
#include "core/mutex.h"
#include "core/socket.h"
#include "launch/output_mux.h"

extern char** environ;

namespace weft::launch {
namespace {

constexpr uint64_t kSignalKey = ~uint64_t{0};
constexpr uint64_t kStopKey = ~uint64_t{0} - 1;
constexpr uint64_t kEvictKey = ~uint64_t{0} - 2;
using Clock = std::chrono::steady_clock;

// Every variable the launcher sets itself; --env may not override them.
constexpr const char* kReservedEnv[] = {
    "WEFT_RANK",      "WEFT_WORLD_SIZE", "WEFT_LOCAL_RANK", "WEFT_LOCAL_SIZE", "WEFT_STORE",
    "WEFT_JOB_TOKEN", "WEFT_NNODES",     "WEFT_NODE_RANK",  "WEFT_MEMBER",     "WEFT_ELASTIC"};

void message(std::string_view text) {
  write_fully(STDERR_FILENO, fmt::format("weft run: {}\n", text));
}

std::string plural(int n, std::string_view word) {
  return fmt::format("{} {}{}", n, word, n == 1 ? "" : "s");
}

sigset_t handled_signals() {
  sigset_t set;
  sigemptyset(&set);
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGCHLD, SIGPIPE}) sigaddset(&set, sig);
  return set;
}

bool is_executable_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
}

// One slot of this node: its current incarnation, and in elastic mode its
// restart plan.
struct Worker {
  int local_rank = 0;
  int rank = 0;
  int restart = 0;     // incarnation number (r<restart> of the member id)
  std::string member;  // WEFT_MEMBER of the current incarnation
  pid_t pid = -1;
  bool running = false;
  Clock::time_point started{};
  std::unique_ptr<StreamRelay> out;  // null when output is not prefixed
  std::unique_ptr<StreamRelay> err;
  WorkerExit exit;
  std::string evicted;  // reason, once evicted
  net::Fd status;       // the child writes exec's errno here; EOF: exec worked
  int exec_errno = 0;
  // Elastic mode.
  bool restart_pending = false;
  Clock::time_point restart_at{};
  Clock::time_point died_at{};
  std::deque<Clock::time_point> failures;  // within kCoolDownWindow
  int backoff_step = 0;                    // doubles the back-off per restart
};

std::string seconds_text(Clock::duration d) {
  return fmt::format("{:.1f} s", std::chrono::duration<double>(d).count());
}

// Killing a whole process group; the worker alone if it left its group.
void kill_tree(pid_t pid) {
  if (pid <= 0) return;
  if (::kill(-pid, SIGKILL) != 0) ::kill(pid, SIGKILL);
}

}  // namespace

std::vector<int> worker_cpus(const std::vector<int>& allowed, int local_rank, int nproc) {
  const size_t c = allowed.size(), n = static_cast<size_t>(nproc),
               i = static_cast<size_t>(local_rank);
  if (nproc <= 1 || c < n || local_rank < 0 || i >= n) return {};
  return {allowed.begin() + static_cast<std::ptrdiff_t>(i * c / n),
          allowed.begin() + static_cast<std::ptrdiff_t>((i + 1) * c / n)};
}

std::string signal_name(int sig) {
  const char* abbrev = sigabbrev_np(sig);
  return abbrev ? fmt::format("SIG{}", abbrev) : fmt::format("signal {}", sig);
}

std::string member_id(int node, int slot, int restart) {
  return fmt::format("n{}.s{}.r{}", node, slot, restart);
}

std::string check_worker_count(int nproc, int cpus, bool prefix_output, bool oversubscribe) {
  const int64_t per = prefix_output ? kFdsPerWorker : 1;
  const int64_t need = kFdsBase + per * nproc;
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY &&
      static_cast<int64_t>(lim.rlim_cur) < need) {
    if (lim.rlim_max == RLIM_INFINITY || static_cast<int64_t>(lim.rlim_max) >= need) {
      rlimit raised = lim;
      raised.rlim_cur = static_cast<rlim_t>(need);
      if (::setrlimit(RLIMIT_NOFILE, &raised) != 0) {
        throw LaunchError(fmt::format("-n {} needs about {} open files in the launcher and the "
                                      "limit ({}) cannot be raised: {}",
                                      nproc, need, lim.rlim_cur, net::errno_string(errno)),
                          2);
      }
    } else {
      throw LaunchError(
          fmt::format("-n {} needs about {} open files in the launcher ({} per worker: its output "
                      "relays, exec status and store connection, and {} more) but the open-file "
                      "limit is {} "
                      "(ulimit -n, hard limit {}): start at most {} workers, or raise the limit",
                      nproc, need, per, kFdsBase, lim.rlim_cur, lim.rlim_max,
                      (static_cast<int64_t>(lim.rlim_max) - kFdsBase) / per),
          2);
    }
  }
  if (cpus < 1) cpus = 1;
  if (!oversubscribe && static_cast<int64_t>(nproc) > int64_t{kMaxWorkersPerCpu} * cpus) {
    throw LaunchError(fmt::format("-n {} is more than {} workers per CPU ({} CPU{} here): pass "
                                  "--oversubscribe to start them anyway",
                                  nproc, kMaxWorkersPerCpu, cpus, cpus == 1 ? "" : "s"),
                      2);
  }
  if (!oversubscribe && nproc > cpus) {
    return fmt::format(
        "warning: {} workers on {} CPU{}: they will share CPUs (--oversubscribe silences this)",
        nproc, cpus, cpus == 1 ? "" : "s");
  }
  return "";
}

std::string WorkerExit::death() const {
  if (!evicted.empty()) return "evicted: " + evicted;
  if (signal != 0) return "killed by " + signal_name(signal);
  return fmt::format("exited with code {}", exit_code);
}

std::string WorkerExit::describe() const {
  std::string text = signal != 0
                         ? fmt::format("was killed by signal {} ({})", signal, signal_name(signal))
                         : fmt::format("exited with code {}", exit_code);
  if (!evicted.empty()) text += fmt::format(" after its eviction ({})", evicted);
  if (!stopped.empty()) {
    text += fmt::format("; {} is stopped (state T, e.g. by SIGSTOP): the likely cause", stopped);
  }
  return text;
}

namespace {

// The state letter of /proc/<pid>/stat ('R', 'S', 'T', ...; 0 if unknown).
char process_state(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/stat", pid));
  std::string line;
  std::getline(in, line);
  size_t close = line.rfind(')');
  if (close == std::string::npos || close + 2 >= line.size()) return 0;
  return line[close + 2];
}

}  // namespace

std::string find_program(const std::string& program, const std::string& path) {
  if (program.empty()) throw LaunchError("no program to run", 2);
  if (program.find('/') != std::string::npos) {
    struct stat st {};
    if (::stat(program.c_str(), &st) != 0) {
      throw LaunchError(fmt::format("cannot run '{}': {}", program, net::errno_string(errno)), 127);
    }
    if (!S_ISREG(st.st_mode) || ::access(program.c_str(), X_OK) != 0) {
      throw LaunchError(fmt::format("cannot run '{}': not an executable file", program), 127);
    }
    return program;
  }
  std::string not_executable;
  size_t begin = 0;
  for (;;) {
    size_t end = path.find(':', begin);
    std::string dir =
        path.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
    std::string candidate = (dir.empty() ? std::string(".") : dir) + "/" + program;
    if (is_executable_file(candidate)) return candidate;
    if (not_executable.empty() && ::access(candidate.c_str(), F_OK) == 0)
      not_executable = candidate;
    if (end == std::string::npos) break;
    begin = end + 1;
  }
  if (!not_executable.empty()) {
    throw LaunchError(
        fmt::format("cannot run '{}': {} is not an executable file", program, not_executable), 127);
  }
  throw LaunchError(fmt::format("cannot run '{}': command not found in PATH", program), 127);
}

namespace {

// The guardian: a process forked before any thread, that learns the
// workers' process groups over a pipe (+pgid when one starts, -pgid once it
// was killed) and SIGKILLs those it still knows when the pipe closes, that
// is when the launcher exits or dies (even by SIGKILL).
class Guardian {
 public:
  explicit Guardian(size_t capacity) {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) throw Error(fmt::format("pipe: {}", net::errno_string(errno)));
    net::Fd read_end(p[0]);
    write_end_.reset(p[1]);
    // Allocated before the fork: the guardian allocates nothing.
    std::vector<pid_t> groups(capacity, 0);
    pid_t pid = ::fork();
    if (pid < 0) throw Error(fmt::format("fork: {}", net::errno_string(errno)));
    if (pid == 0) {
      ::close(p[1]);
      ::setpgid(0, 0);  // out of the terminal's Ctrl-C
      sigset_t all;
      sigfillset(&all);
      ::sigprocmask(SIG_SETMASK, &all, nullptr);
      size_t used = 0;
      for (;;) {
        int32_t msg = 0;
        ssize_t n = ::read(p[0], &msg, sizeof msg);
        if (n < 0 && errno == EINTR) continue;
        if (n != static_cast<ssize_t>(sizeof msg)) break;  // the launcher is gone
        if (msg > 0) {
          size_t i = 0;
          while (i < used && groups[i] != 0) ++i;
          if (i == used && used < groups.size()) ++used;
          if (i < used) groups[i] = msg;
        } else if (msg < 0) {
          for (size_t i = 0; i < used; ++i)
            if (groups[i] == -msg) groups[i] = 0;
        }
      }
      for (size_t i = 0; i < used; ++i)
        if (groups[i] > 0) ::kill(-groups[i], SIGKILL);
      ::_exit(0);
    }
    pid_ = pid;
  }
  ~Guardian() {
    write_end_.reset();
    int st;
    while (pid_ > 0 && ::waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
    }
  }
  pid_t pid() const { return pid_; }
  void reaped() { pid_ = -1; }
  void add(pid_t pgid) { send(static_cast<int32_t>(pgid)); }
  void remove(pid_t pgid) { send(-static_cast<int32_t>(pgid)); }

 private:
  void send(int32_t msg) {
    if (!write_end_.valid()) return;
    ssize_t n;
    do {
      n = ::write(write_end_.get(), &msg, sizeof msg);
    } while (n < 0 && errno == EINTR);
  }
  net::Fd write_end_;
  pid_t pid_ = -1;
};

// What a worker's child needs before it execs.
struct ChildArgs {
  char** argv;
  char** envp;
  pid_t parent;
  int devnull, out_fd, err_fd, status_fd;
  bool prefix_output, bind;
  cpu_set_t cpus;
};

constexpr size_t kChildStackBytes = 256u << 10;

// Under a sanitizer the child forks instead: the runtimes keep state (fd
// tables, thread state) that intercepted calls in a child sharing our
// memory would change.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kCloneVm = false;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
constexpr bool kCloneVm = false;
#else
constexpr bool kCloneVm = true;
#endif
#else
constexpr bool kCloneVm = true;
#endif

// The child, cloned with CLONE_VM | CLONE_VFORK: it shares the launcher's
// memory until execve, so it makes system calls only (nothing that
// allocates or takes a lock), and the launcher installs no signal handlers
// that could run here.
int child_main(void* arg) {
  const ChildArgs& a = *static_cast<const ChildArgs*>(arg);
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != a.parent) ::_exit(127);  // the launcher died already
  ::setpgid(0, 0);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  if (a.bind) ::sched_setaffinity(0, sizeof a.cpus, &a.cpus);  // best effort
  if (a.devnull >= 0) ::dup2(a.devnull, STDIN_FILENO);
  if (a.prefix_output) {
    ::dup2(a.out_fd, STDOUT_FILENO);
    ::dup2(a.err_fd, STDERR_FILENO);
  }
  ::execve(a.argv[0], a.argv, a.envp);
  int e = errno;
  [[maybe_unused]] ssize_t n = ::write(a.status_fd, &e, sizeof e);
  ::_exit(127);
}

// The processes whose parent is this one (threads' children included).
std::vector<pid_t> my_children() {
  std::vector<pid_t> kids;
  DIR* dir = ::opendir("/proc/self/task");
  if (dir == nullptr) return kids;
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream in(fmt::format("/proc/self/task/{}/children", e->d_name));
    for (pid_t pid; in >> pid;) kids.push_back(pid);
  }
  ::closedir(dir);
  return kids;
}

}  // namespace

struct LocalLauncher::Impl {
  WorkerOptions opts;
  std::string program;  // the resolved path
  sigset_t old_mask{};
  net::Fd sigfd;
  net::Fd epfd;
  net::Fd stopfd;   // eventfd: stop() was called
  net::Fd evictfd;  // eventfd: evict() was called
  std::unique_ptr<Guardian> guardian;
  Mutex stop_mu;
  std::string stop_reason GUARDED_BY(stop_mu);
  int stop_code GUARDED_BY(stop_mu) = 0;
  std::vector<std::pair<std::string, std::string>> evictions GUARDED_BY(stop_mu);
  std::vector<std::string> live GUARDED_BY(stop_mu);
  std::vector<Worker> workers;
  std::unordered_map<pid_t, size_t> by_pid;  // running workers
  std::function<void(const WorkerExit&)> on_failure;
  std::function<void(const WorkerExit&)> on_member_failed;
  std::vector<char> child_stack;  // the stack of a child until it execs
  bool started = false;
  JobLayout job;

  bool stopping = false;
  bool killed = false;  // SIGKILL sent
  int stop_signal = SIGTERM;
  Deadline kill_deadline;
  bool failed = false;  // a worker failed (or could not start)
  int exit_code = 0;
  // Elastic mode.
  int restarts_used = 0;
  int elastic_failure_code = 0;  // of the last failed incarnation of a slot that stays down
  int finished_ok = 0;           // workers that exited 0

  bool elastic() const { return opts.elastic_min > 0; }

  int running() const { return static_cast<int>(by_pid.size()); }
  int pending_restarts() const {
    int n = 0;
    for (const auto& w : workers) n += w.restart_pending ? 1 : 0;
    return n;
  }

  void update_live() {
    std::vector<std::string> members;
    for (const auto& w : workers)
      if (w.running) members.push_back(w.member);
    MutexLock lk(&stop_mu);
    live = std::move(members);
  }

  void signal_all(int sig) {
    for (const auto& w : workers) {
      if (!w.running) continue;
      // The worker's process group, or the worker alone if it left it.
      if (::kill(-w.pid, sig) != 0) ::kill(w.pid, sig);
    }
  }

  void kill_all() {
    signal_all(SIGKILL);
    killed = true;
  }

  void begin_stop(int sig) {
    stopping = true;
    stop_signal = sig;
    for (auto& w : workers) {
      if (w.restart_pending) {
        w.restart_pending = false;
        message(fmt::format("slot {}: restart cancelled, the job is stopping", w.local_rank));
      }
    }
    if (opts.grace.count() <= 0) {
      kill_all();
      return;
    }
    signal_all(sig);
    kill_deadline = Deadline::after(opts.grace);
  }

  std::vector<std::string> worker_env(const Worker& w) const {
    std::map<std::string, std::string> set;
    for (const auto& [k, v] : opts.env) set[k] = v;
    set["WEFT_RANK"] = std::to_string(w.rank);
    set["WEFT_WORLD_SIZE"] = std::to_string(job.world_size);
    set["WEFT_LOCAL_RANK"] = std::to_string(w.local_rank);
    set["WEFT_LOCAL_SIZE"] = std::to_string(opts.nproc);
    set["WEFT_NNODES"] = std::to_string(job.nnodes);
    set["WEFT_NODE_RANK"] = std::to_string(job.node_rank);
    set["WEFT_MEMBER"] = w.member;
    if (elastic()) {
      set["WEFT_ELASTIC"] = fmt::format("{}:{}", opts.elastic_min,
                                        opts.elastic_max > 0 ? opts.elastic_max : opts.nproc);
    }
    if (!job.store.empty()) set["WEFT_STORE"] = job.store;
    set["WEFT_JOB_TOKEN"] = job.job_token;
    std::vector<std::string> env;
    for (char** e = environ; *e != nullptr; ++e) {
      std::string_view kv(*e);
      size_t eq = kv.find('=');
      if (eq != std::string_view::npos && set.count(std::string(kv.substr(0, eq)))) continue;
      env.emplace_back(kv);
    }
    for (const auto& [k, v] : set) env.push_back(k + "=" + v);
    return env;
  }

  // Forks and execs one incarnation of slot w. A failed exec is found by
  // reap() (Worker::exec_errno).
  void spawn(Worker& w) {
    w.member = member_id(job.node_rank, w.local_rank, w.restart);
    w.exit = WorkerExit{};
    w.evicted.clear();
    std::vector<std::string> env = worker_env(w);
    std::vector<char*> argv, envp;
    argv.push_back(program.data());
    for (size_t i = 1; i < opts.command.size(); ++i) argv.push_back(opts.command[i].data());
    argv.push_back(nullptr);
    for (auto& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);

    auto make_pipe = [](net::Fd& read_end, net::Fd& write_end) {
      int p[2];
      if (::pipe2(p, O_CLOEXEC) != 0)
        throw Error(fmt::format("pipe: {}", net::errno_string(errno)));
      read_end.reset(p[0]);
      write_end.reset(p[1]);
    };
    net::Fd out_r, out_w, err_r, err_w, status_r, status_w;
    make_pipe(status_r, status_w);
    if (opts.prefix_output) {
      make_pipe(out_r, out_w);
      make_pipe(err_r, err_w);
    }
    const int out_fd = out_w.get(), err_fd = err_w.get(), status_fd = status_w.get();
    int devnull = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    net::Fd devnull_fd(devnull);
    const pid_t parent = ::getpid();
    // The CPU set is built here: the child may only make async-signal-safe calls.
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    bool bind = false;
    if (opts.bind == WorkerOptions::Bind::Auto) {
      cpu_set_t mine;
      if (::sched_getaffinity(0, sizeof mine, &mine) == 0) {
        std::vector<int> allowed;
        for (int c = 0; c < CPU_SETSIZE; ++c)
          if (CPU_ISSET(c, &mine)) allowed.push_back(c);
        for (int c : worker_cpus(allowed, w.local_rank, opts.nproc)) CPU_SET(c, &cpus);
        bind = CPU_COUNT(&cpus) > 0;
      }
    }

    ChildArgs args{argv.data(), envp.data(),        parent, devnull, out_fd, err_fd,
                   status_fd,   opts.prefix_output, bind,   cpus};
    // The child shares our memory and runs on its own stack until it execs
    // (or exits), while this thread waits, as posix_spawn does: no page
    // tables are copied, which keeps starting thousands of workers cheap.
    pid_t pid;
    if (kCloneVm) {
      if (child_stack.empty()) child_stack.resize(kChildStackBytes);
      pid = ::clone(child_main, child_stack.data() + child_stack.size(),
                    CLONE_VM | CLONE_VFORK | SIGCHLD, &args);
      if (pid < 0) throw Error(fmt::format("clone: {}", net::errno_string(errno)));
    } else {
      pid = ::fork();
      if (pid < 0) throw Error(fmt::format("fork: {}", net::errno_string(errno)));
      if (pid == 0) child_main(&args);  // does not return
    }
    ::setpgid(pid, pid);  // also here, so that no signal can precede it
    if (guardian) guardian->add(pid);
    status_w.reset();
    out_w.reset();
    err_w.reset();

    // Whether exec worked is read later, from the supervision loop (a
    // launcher of many workers does not wait for each one to be scheduled).
    net::set_nonblocking(status_r.get());
    w.status = std::move(status_r);
    w.exec_errno = 0;
    w.pid = pid;
    w.running = true;
    w.started = Clock::now();
    by_pid[pid] = static_cast<size_t>(w.local_rank);
    if (opts.prefix_output) {
      std::string prefix = fmt::format("[{}] ", w.rank);
      w.out = std::make_unique<StreamRelay>(std::move(out_r), STDOUT_FILENO, prefix);
      w.err = std::make_unique<StreamRelay>(std::move(err_r), STDERR_FILENO, prefix);
      watch(w.out->fd(), static_cast<uint64_t>(w.local_rank) * 3);
      watch(w.err->fd(), static_cast<uint64_t>(w.local_rank) * 3 + 1);
    }
    watch(w.status.get(), static_cast<uint64_t>(w.local_rank) * 3 + 2);
    WEFT_DEBUG("launcher: started rank {} as {} (pid {})", w.rank, w.member, pid);
  }

  void watch(int fd, uint64_t key) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = key;
    if (::epoll_ctl(epfd.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
      throw Error(fmt::format("epoll_ctl: {}", net::errno_string(errno)));
    }
  }

  // A worker that is stopped (SIGSTOP, SIGTSTP, a debugger) while another
  // fails is the likely cause: its peers timed out waiting for it.
  std::string find_stopped() const {
    for (const auto& w : workers) {
      if (!w.running) continue;
      char st = process_state(w.pid);
      if (st == 'T' || st == 't') return fmt::format("rank {} (pid {})", w.rank, w.pid);
    }
    return "";
  }

  void worker_failed(const WorkerExit& failed_exit) {
    WorkerExit e = failed_exit;
    e.stopped = find_stopped();
    failed = true;
    exit_code = e.launcher_exit_code();
    int others = running();
    std::string text = fmt::format("rank {} (pid {}) {}", e.rank, e.pid, e.describe());
    if (others > 0) {
      text += fmt::format("; stopping the other {}", plural(others, "worker"));
    }
    message(text);
    if (on_failure) {
      try {
        on_failure(e);
      } catch (const std::exception& ex) {
        message(fmt::format("could not publish the failure: {}", ex.what()));
      }
    }
    begin_stop(SIGTERM);
    if (!e.stopped.empty()) {
      // A stopped worker takes SIGTERM only once it runs again.
      signal_all(SIGCONT);
      message(
          fmt::format("job failed: {} was stopped (state T) and the others timed out waiting "
                      "for it",
                      e.stopped));
    }
  }

  // Elastic mode: one incarnation of slot w failed; plan its restart.
  void member_failed(Worker& w) {
    const WorkerExit& e = w.exit;
    const auto now = Clock::now();
    w.died_at = now;
    if (on_member_failed) {
      try {
        on_member_failed(e);
      } catch (const std::exception& ex) {
        message(fmt::format("could not record the death of {}: {}", w.member, ex.what()));
      }
    }
    std::string text = fmt::format("member {} (rank {}, pid {}) {} after {}", w.member, w.rank,
                                   e.pid, e.describe(), seconds_text(now - w.started));
    if (stopping) {
      message(text + "; the job is stopping: no restart");
      elastic_failure_code = e.launcher_exit_code();
      return;
    }
    if (restarts_used >= opts.max_restarts) {
      elastic_failure_code = e.launcher_exit_code();
      int alive = running() + pending_restarts();
      text += fmt::format("; no restarts left ({} of {} used): slot {} stays down, {} alive",
                          restarts_used, opts.max_restarts, w.local_rank, plural(alive, "worker"));
      // (Under --nnodes MIN:MAX the other nodes' workers count too: only
      // the workers know.)
      if (opts.elastic_max <= opts.nproc && alive < opts.elastic_min) {
        text += fmt::format(
            " (below --elastic minimum {}: the workers wait for joins and fail "
            "on their own deadline)",
            opts.elastic_min);
      }
      message(text);
      return;
    }
    ++restarts_used;
    w.failures.push_back(now);
    while (!w.failures.empty() && now - w.failures.front() > kCoolDownWindow) {
      w.failures.pop_front();
    }
    std::chrono::milliseconds delay = opts.restart_backoff;
    for (int i = 0; i < w.backoff_step && delay < opts.max_backoff; ++i) delay *= 2;
    delay = std::min(delay, opts.max_backoff);
    ++w.backoff_step;
    if (static_cast<int>(w.failures.size()) >= kCoolDownFailures) {
      delay = std::max(delay, opts.cool_down);
      text +=
          fmt::format("; slot {} failed {} times within {} s: cool-down of {} before", w.local_rank,
                      w.failures.size(), kCoolDownWindow.count(), seconds_text(delay));
      w.failures.clear();
    } else {
      text += fmt::format("; back-off {} before", seconds_text(delay));
    }
    text += fmt::format(" restart {} of {} as {}", restarts_used, opts.max_restarts,
                        member_id(job.node_rank, w.local_rank, w.restart + 1));
    message(text);
    w.restart_pending = true;
    w.restart_at = now + delay;
  }

  void restart_due() {
    const auto now = Clock::now();
    for (auto& w : workers) {
      if (!w.restart_pending || now < w.restart_at) continue;
      w.restart_pending = false;
      const std::string previous = w.member;
      ++w.restart;
      spawn(w);
      message(fmt::format("slot {} restarted as member {} (rank {}, pid {}), {} after {} died",
                          w.local_rank, w.member, w.rank, w.pid, seconds_text(now - w.died_at),
                          previous));
      update_live();
    }
  }

  // The deadline of the supervision loop's next wake-up, in ms (-1: none).
  int next_timeout_ms() const {
    int timeout = stopping && !killed ? kill_deadline.poll_ms() : -1;
    const auto now = Clock::now();
    for (const auto& w : workers) {
      if (!w.restart_pending) continue;
      auto ms = std::chrono::ceil<std::chrono::milliseconds>(w.restart_at - now).count();
      int t = static_cast<int>(std::clamp<int64_t>(ms, 0, 1 << 30));
      timeout = timeout < 0 ? t : std::min(timeout, t);
    }
    return timeout;
  }

  // Reads the exec status of w's child (until EOF).
  void read_exec_status(Worker& w) {
    if (!w.status.valid()) return;
    int e = 0;
    ssize_t n;
    do {
      n = ::read(w.status.get(), &e, sizeof e);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n == static_cast<ssize_t>(sizeof e)) w.exec_errno = e != 0 ? e : EIO;
    w.status.reset();  // EOF, an error or the errno: nothing more comes
  }

  void ended(Worker& w, int st, bool have_status) {
    read_exec_status(w);  // the child is gone: its errno, if any, is there
    w.running = false;
    by_pid.erase(w.pid);
    // What it left behind in its process group dies with it.
    kill_tree(w.pid);
    if (guardian) guardian->remove(w.pid);
    w.exit.rank = w.rank;
    w.exit.pid = w.pid;
    w.exit.member = w.member;
    w.exit.evicted = w.evicted;
    if (have_status && WIFSIGNALED(st)) {
      w.exit.signal = WTERMSIG(st);
    } else if (have_status) {
      w.exit.exit_code = WEXITSTATUS(st);
    }
    // What it wrote before it exited, before any message about it.
    if (w.out) w.out->drain();
    if (w.err) w.err->drain();
    w.out.reset();
    w.err.reset();
    WEFT_DEBUG("launcher: rank {} ({}, pid {}) {}", w.rank, w.member, w.pid, w.exit.describe());
  }

  void reap() {
    // Of the failures reaped together, a death by signal is reported first:
    // the others are usually its consequence (their peer vanished), and
    // worker order says nothing about which came first.
    const WorkerExit* cause = nullptr;
    std::vector<size_t> failed_slots;
    for (;;) {
      int st = 0;
      pid_t r = ::waitpid(-1, &st, WNOHANG);
      if (r == 0 || (r < 0 && errno == ECHILD)) break;
      if (r < 0) {
        if (errno == EINTR) continue;
        break;
      }
      auto it = by_pid.find(r);
      if (it == by_pid.end()) {
        // An orphan of a worker (we are a subreaper), or the guardian.
        if (guardian && r == guardian->pid()) {
          guardian->reaped();
          message("the guardian process ended: worker process trees may outlive a killed launcher");
        }
        continue;
      }
      Worker& w = workers[it->second];
      ended(w, st, true);
      if (w.exec_errno != 0) {
        exec_failed(w);
        continue;
      }
      if (!w.exit.failed()) {
        ++finished_ok;
        continue;
      }
      failed_slots.push_back(static_cast<size_t>(w.local_rank));
      if (cause == nullptr || (cause->signal == 0 && w.exit.signal != 0)) cause = &w.exit;
    }
    update_live();
    if (elastic()) {
      for (size_t i : failed_slots) member_failed(workers[i]);
      return;
    }
    if (cause != nullptr && !stopping) worker_failed(*cause);
  }

  void exec_failed(Worker& w) {
    const std::string why = net::errno_string(w.exec_errno);
    if (w.restart > 0) {  // elastic: retrying cannot help
      message(fmt::format("slot {}: cannot execute '{}' for {}: {}; the slot stays down",
                          w.local_rank, program, w.member, why));
      elastic_failure_code = 127;
      return;
    }
    if (stopping) return;
    message(fmt::format("cannot execute '{}': {}", program, why));
    failed = true;
    exit_code = 127;
    begin_stop(SIGTERM);
  }

  void on_signal(int sig) {
    if (!stopping) {
      if (!failed) exit_code = 128 + sig;
      message(
          fmt::format("received {}; stopping {} (SIGKILL after {}, or at once on a second signal)",
                      signal_name(sig), plural(running(), "worker"), format_timeout(opts.grace)));
      begin_stop(sig);
    } else if (!killed) {
      message(fmt::format("received {} again; killing {}", signal_name(sig),
                          plural(running(), "worker")));
      kill_all();
    }
  }

  void on_stop_request() {
    uint64_t v;
    [[maybe_unused]] ssize_t n = ::read(stopfd.get(), &v, sizeof v);
    if (stopping) return;
    std::string reason;
    {
      MutexLock lk(&stop_mu);
      reason = stop_reason;
      exit_code = stop_code;
    }
    failed = true;
    message(fmt::format("{}; stopping {}", reason, plural(running(), "worker")));
    begin_stop(SIGTERM);
  }

  void on_evict_request() {
    uint64_t v;
    [[maybe_unused]] ssize_t n = ::read(evictfd.get(), &v, sizeof v);
    std::vector<std::pair<std::string, std::string>> todo;
    {
      MutexLock lk(&stop_mu);
      todo.swap(evictions);
    }
    for (const auto& [member, reason] : todo) {
      for (auto& w : workers) {
        if (!w.running || w.member != member || !w.evicted.empty()) continue;
        w.evicted = reason.empty() ? std::string("no reason given") : reason;
        message(fmt::format(
            "member {} (rank {}, pid {}) evicted after {}: {}; killing its "
            "process group",
            w.member, w.rank, w.pid, seconds_text(Clock::now() - w.started), w.evicted));
        kill_tree(w.pid);
      }
    }
  }

  void read_signals() {
    signalfd_siginfo si;
    bool child = false;
    while (::read(sigfd.get(), &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
      int sig = static_cast<int>(si.ssi_signo);
      if (sig == SIGCHLD) {
        child = true;
      } else if (sig == SIGINT || sig == SIGTERM || sig == SIGHUP) {
        on_signal(sig);
      }  // SIGPIPE: a closed stdout or stderr; that output is dropped
    }
    if (child) reap();
  }

  int supervise() {
    std::vector<epoll_event> events(64);
    while (running() > 0 || pending_restarts() > 0) {
      int n = ::epoll_wait(epfd.get(), events.data(), static_cast<int>(events.size()),
                           next_timeout_ms());
      if (n < 0 && errno != EINTR) {
        throw Error(fmt::format("epoll_wait: {}", net::errno_string(errno)));
      }
      for (int i = 0; i < n; ++i) {
        uint64_t key = events[static_cast<size_t>(i)].data.u64;
        if (key == kSignalKey) {
          read_signals();
        } else if (key == kStopKey) {
          on_stop_request();
        } else if (key == kEvictKey) {
          on_evict_request();
        } else {
          Worker& w = workers[key / 3];
          if (key % 3 == 2) {
            read_exec_status(w);
            continue;
          }
          StreamRelay* relay = key % 3 == 0 ? w.out.get() : w.err.get();
          if (relay) relay->on_readable();
        }
      }
      if (stopping && !killed && kill_deadline.expired() && running() > 0) {
        message(fmt::format("{} still running {} after {}; sending SIGKILL",
                            plural(running(), "worker"), format_timeout(opts.grace),
                            signal_name(stop_signal)));
        kill_all();
      }
      if (!stopping) restart_due();
    }
    kill_orphans();
    // Elastic: the job succeeded when training finished (a worker exited
    // 0 and none of those running to the end failed); members that died on
    // the way and stayed down were survived.
    if (elastic() && exit_code == 0 && finished_ok == 0) exit_code = elastic_failure_code;
    if (elastic() && exit_code == 0 && elastic_failure_code != 0) {
      message(
          fmt::format("the job finished; {} worker(s) exited 0, members that failed and "
                      "stayed down were survived",
                      finished_ok));
    }
    return exit_code;
  }

  // Orphans of the workers that left their worker's process group came
  // back to us (subreaper): the job is over, so they die.
  void kill_orphans() {
    for (int round = 0; round < 100; ++round) {
      std::vector<pid_t> kids = my_children();
      bool any = false;
      for (pid_t pid : kids) {
        if ((guardian && pid == guardian->pid()) || by_pid.count(pid)) continue;
        ::kill(pid, SIGKILL);
        any = true;
      }
      if (!any) return;
      for (pid_t pid : kids) {
        if ((guardian && pid == guardian->pid()) || by_pid.count(pid)) continue;
        int st;
        while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
        }
      }
    }
  }

  void kill_and_reap_all() {
    for (auto& w : workers) {
      if (!w.running) continue;
      kill_tree(w.pid);
      int st;
      while (::waitpid(w.pid, &st, 0) < 0 && errno == EINTR) {
      }
      kill_tree(w.pid);
      if (guardian) guardian->remove(w.pid);
      w.running = false;
    }
    by_pid.clear();
    kill_orphans();
  }
};

LocalLauncher::LocalLauncher(WorkerOptions options) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.opts = std::move(options);
  if (m.opts.command.empty()) throw LaunchError("no program to run", 2);
  if (m.opts.nproc < 1) {
    throw LaunchError(
        fmt::format("the number of workers must be at least 1 (got {})", m.opts.nproc), 2);
  }
  if (m.opts.grace.count() < 0) throw LaunchError("the grace period must not be negative", 2);
  if (m.opts.elastic_min < 0 || m.opts.elastic_min > m.opts.nproc) {
    throw LaunchError(fmt::format("--elastic {}:{}: the minimum must be in 1..{}",
                                  m.opts.elastic_min, m.opts.nproc, m.opts.nproc),
                      2);
  }
  if (m.opts.max_restarts < 0) {
    throw LaunchError(
        fmt::format("--max-restarts must not be negative (got {})", m.opts.max_restarts), 2);
  }
  std::string path = "/usr/local/bin:/usr/bin:/bin";
  if (const char* p = std::getenv("PATH")) path = p;
  for (const auto& [k, v] : m.opts.env) {
    if (k.empty() || k.find('=') != std::string::npos) {
      throw LaunchError(fmt::format("invalid environment variable name '{}'", k), 2);
    }
    for (const char* reserved : kReservedEnv) {
      if (k == reserved) throw LaunchError(fmt::format("{} is set by weft run itself", k), 2);
    }
    if (k == "PATH") path = v;
  }
  m.program = find_program(m.opts.command[0], path);
  int cpus = 1;
  cpu_set_t mine;
  if (::sched_getaffinity(0, sizeof mine, &mine) == 0) cpus = CPU_COUNT(&mine);
  std::string warning =
      check_worker_count(m.opts.nproc, cpus, m.opts.prefix_output, m.opts.oversubscribe);
  if (!warning.empty()) message(warning);

  // Orphans of the workers come back to the launcher, and the guardian
  // (forked before any thread) kills the workers' groups if it dies.
  ::prctl(PR_SET_CHILD_SUBREAPER, 1);
  m.guardian = std::make_unique<Guardian>(static_cast<size_t>(m.opts.nproc) + 16);

  sigset_t set = handled_signals();
  if (::pthread_sigmask(SIG_BLOCK, &set, &m.old_mask) != 0) throw Error("cannot block signals");
  m.sigfd = net::Fd(::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC));
  m.epfd = net::Fd(::epoll_create1(EPOLL_CLOEXEC));
  if (!m.sigfd.valid() || !m.epfd.valid()) {
    ::pthread_sigmask(SIG_SETMASK, &m.old_mask, nullptr);
    throw Error(fmt::format("signalfd/epoll: {}", net::errno_string(errno)));
  }
  m.watch(m.sigfd.get(), kSignalKey);
  m.stopfd = net::Fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  m.evictfd = net::Fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!m.stopfd.valid() || !m.evictfd.valid()) {
    ::pthread_sigmask(SIG_SETMASK, &m.old_mask, nullptr);
    throw Error(fmt::format("eventfd: {}", net::errno_string(errno)));
  }
  m.watch(m.stopfd.get(), kStopKey);
  m.watch(m.evictfd.get(), kEvictKey);
}

void LocalLauncher::stop(const std::string& reason, int exit_code) {
  Impl& m = *impl_;
  {
    MutexLock lk(&m.stop_mu);
    if (!m.stop_reason.empty()) return;
    m.stop_reason = reason.empty() ? std::string("stopped") : reason;
    m.stop_code = exit_code;
  }
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(m.stopfd.get(), &one, sizeof one);
}

std::vector<std::string> LocalLauncher::live_members() const {
  MutexLock lk(&impl_->stop_mu);
  return impl_->live;
}

void LocalLauncher::evict(const std::string& member, const std::string& reason) {
  Impl& m = *impl_;
  {
    MutexLock lk(&m.stop_mu);
    m.evictions.emplace_back(member, reason);
  }
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(m.evictfd.get(), &one, sizeof one);
}

LocalLauncher::~LocalLauncher() {
  Impl& m = *impl_;
  m.kill_and_reap_all();
  m.guardian.reset();  // closes its pipe and reaps it
  ::prctl(PR_SET_CHILD_SUBREAPER, 0);
  // Consume what is pending (a SIGPIPE from a closed stdout, a late SIGCHLD)
  // so that restoring the mask does not deliver it.
  signalfd_siginfo si;
  while (::read(m.sigfd.get(), &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
  }
  ::pthread_sigmask(SIG_SETMASK, &m.old_mask, nullptr);
}

void LocalLauncher::on_failure(std::function<void(const WorkerExit&)> callback) {
  impl_->on_failure = std::move(callback);
}

void LocalLauncher::on_member_failed(std::function<void(const WorkerExit&)> callback) {
  impl_->on_member_failed = std::move(callback);
}

int LocalLauncher::run(const JobLayout& job) {
  Impl& m = *impl_;
  if (m.started) throw InvalidArgument("LocalLauncher::run may be called once");
  m.started = true;
  m.job = job;
  m.workers.resize(static_cast<size_t>(m.opts.nproc));
  for (int i = 0; i < m.opts.nproc; ++i) {
    Worker& w = m.workers[static_cast<size_t>(i)];
    w.local_rank = i;
    w.rank = job.first_rank + i;
    m.spawn(w);
  }
  m.update_live();
  return m.supervise();
}

}  // namespace weft::launch
