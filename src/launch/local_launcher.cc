#include "launch/local_launcher.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sched.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>

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

// Every variable the launcher sets itself; --env may not override them.
constexpr const char* kReservedEnv[] = {"WEFT_RANK",       "WEFT_WORLD_SIZE", "WEFT_LOCAL_RANK",
                                        "WEFT_LOCAL_SIZE", "WEFT_STORE",      "WEFT_JOB_TOKEN",
                                        "WEFT_NNODES",     "WEFT_NODE_RANK"};

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

struct Worker {
  int local_rank = 0;
  int rank = 0;
  pid_t pid = -1;
  bool running = false;
  std::unique_ptr<StreamRelay> out;  // null when output is not prefixed
  std::unique_ptr<StreamRelay> err;
  WorkerExit exit;
};

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

std::string WorkerExit::describe() const {
  std::string text = signal != 0
                         ? fmt::format("was killed by signal {} ({})", signal, signal_name(signal))
                         : fmt::format("exited with code {}", exit_code);
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

struct LocalLauncher::Impl {
  WorkerOptions opts;
  std::string program;  // the resolved path
  sigset_t old_mask{};
  net::Fd sigfd;
  net::Fd epfd;
  net::Fd stopfd;  // eventfd: stop() was called
  Mutex stop_mu;
  std::string stop_reason GUARDED_BY(stop_mu);
  int stop_code GUARDED_BY(stop_mu) = 0;
  std::vector<Worker> workers;
  std::function<void(const WorkerExit&)> on_failure;
  bool started = false;

  bool stopping = false;
  bool killed = false;  // SIGKILL sent
  int stop_signal = SIGTERM;
  Deadline kill_deadline;
  bool failed = false;  // a worker failed (or could not start)
  int exit_code = 0;

  int running() const {
    int n = 0;
    for (const auto& w : workers) n += w.running ? 1 : 0;
    return n;
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
    if (opts.grace.count() <= 0) {
      kill_all();
      return;
    }
    signal_all(sig);
    kill_deadline = Deadline::after(opts.grace);
  }

  std::vector<std::string> worker_env(const JobLayout& job, const Worker& w) const {
    std::map<std::string, std::string> set;
    for (const auto& [k, v] : opts.env) set[k] = v;
    set["WEFT_RANK"] = std::to_string(w.rank);
    set["WEFT_WORLD_SIZE"] = std::to_string(job.world_size);
    set["WEFT_LOCAL_RANK"] = std::to_string(w.local_rank);
    set["WEFT_LOCAL_SIZE"] = std::to_string(opts.nproc);
    set["WEFT_NNODES"] = std::to_string(job.nnodes);
    set["WEFT_NODE_RANK"] = std::to_string(job.node_rank);
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

  // Forks and execs one worker. Returns the errno of a failed exec (0 on
  // success); the worker is then reaped already.
  int spawn(const JobLayout& job, Worker& w) {
    std::vector<std::string> env = worker_env(job, w);
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

    pid_t pid = ::fork();
    if (pid < 0) throw Error(fmt::format("fork: {}", net::errno_string(errno)));
    if (pid == 0) {
      // The child: async-signal-safe calls only (the launcher has threads).
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);  // the launcher died already
      ::setpgid(0, 0);
      sigset_t none;
      sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      if (bind) ::sched_setaffinity(0, sizeof cpus, &cpus);  // best effort
      if (devnull >= 0) ::dup2(devnull, STDIN_FILENO);
      if (opts.prefix_output) {
        ::dup2(out_fd, STDOUT_FILENO);
        ::dup2(err_fd, STDERR_FILENO);
      }
      ::execve(argv[0], argv.data(), envp.data());
      int e = errno;
      [[maybe_unused]] ssize_t n = ::write(status_fd, &e, sizeof e);
      ::_exit(127);
    }
    ::setpgid(pid, pid);  // also here, so that no signal can precede it
    status_w.reset();
    out_w.reset();
    err_w.reset();

    int exec_errno = 0;
    ssize_t n;
    do {
      n = ::read(status_r.get(), &exec_errno, sizeof exec_errno);
    } while (n < 0 && errno == EINTR);
    if (n == static_cast<ssize_t>(sizeof exec_errno)) {
      int st;
      while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
      }
      return exec_errno != 0 ? exec_errno : EIO;
    }

    w.pid = pid;
    w.running = true;
    if (opts.prefix_output) {
      std::string prefix = fmt::format("[{}] ", w.rank);
      w.out = std::make_unique<StreamRelay>(std::move(out_r), STDOUT_FILENO, prefix);
      w.err = std::make_unique<StreamRelay>(std::move(err_r), STDERR_FILENO, prefix);
      watch(w.out->fd(), static_cast<uint64_t>(w.local_rank) * 2);
      watch(w.err->fd(), static_cast<uint64_t>(w.local_rank) * 2 + 1);
    }
    WEFT_DEBUG("launcher: started rank {} (pid {})", w.rank, pid);
    return 0;
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

  void reap() {
    // Of the failures reaped together, a death by signal is reported first:
    // the others are usually its consequence (their peer vanished), and
    // worker order says nothing about which came first.
    const WorkerExit* cause = nullptr;
    for (auto& w : workers) {
      if (!w.running) continue;
      int st = 0;
      pid_t r = ::waitpid(w.pid, &st, WNOHANG);
      if (r == 0 || (r < 0 && errno != ECHILD)) continue;
      w.running = false;
      w.exit.rank = w.rank;
      w.exit.pid = w.pid;
      if (r > 0 && WIFSIGNALED(st)) {
        w.exit.signal = WTERMSIG(st);
      } else if (r > 0) {
        w.exit.exit_code = WEXITSTATUS(st);
      }
      // What it wrote before it exited, before any message about it.
      if (w.out) w.out->drain();
      if (w.err) w.err->drain();
      WEFT_DEBUG("launcher: rank {} (pid {}) {}", w.rank, w.pid, w.exit.describe());
      if (w.exit.failed() && (cause == nullptr || (cause->signal == 0 && w.exit.signal != 0)))
        cause = &w.exit;
    }
    if (cause != nullptr && !stopping) worker_failed(*cause);
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
    while (running() > 0) {
      int timeout = stopping && !killed ? kill_deadline.poll_ms() : -1;
      int n = ::epoll_wait(epfd.get(), events.data(), static_cast<int>(events.size()), timeout);
      if (n < 0 && errno != EINTR) {
        throw Error(fmt::format("epoll_wait: {}", net::errno_string(errno)));
      }
      for (int i = 0; i < n; ++i) {
        uint64_t key = events[static_cast<size_t>(i)].data.u64;
        if (key == kSignalKey) {
          read_signals();
        } else if (key == kStopKey) {
          on_stop_request();
        } else {
          Worker& w = workers[key / 2];
          StreamRelay* relay = key % 2 == 0 ? w.out.get() : w.err.get();
          if (relay) relay->on_readable();
        }
      }
      if (stopping && !killed && kill_deadline.expired() && running() > 0) {
        message(fmt::format("{} still running {} after {}; sending SIGKILL",
                            plural(running(), "worker"), format_timeout(opts.grace),
                            signal_name(stop_signal)));
        kill_all();
      }
    }
    return exit_code;
  }

  void kill_and_reap_all() {
    for (auto& w : workers) {
      if (!w.running) continue;
      if (::kill(-w.pid, SIGKILL) != 0) ::kill(w.pid, SIGKILL);
      int st;
      while (::waitpid(w.pid, &st, 0) < 0 && errno == EINTR) {
      }
      w.running = false;
    }
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
  if (!m.stopfd.valid()) {
    ::pthread_sigmask(SIG_SETMASK, &m.old_mask, nullptr);
    throw Error(fmt::format("eventfd: {}", net::errno_string(errno)));
  }
  m.watch(m.stopfd.get(), kStopKey);
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

LocalLauncher::~LocalLauncher() {
  Impl& m = *impl_;
  m.kill_and_reap_all();
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

int LocalLauncher::run(const JobLayout& job) {
  Impl& m = *impl_;
  if (m.started) throw InvalidArgument("LocalLauncher::run may be called once");
  m.started = true;
  m.workers.resize(static_cast<size_t>(m.opts.nproc));
  for (int i = 0; i < m.opts.nproc; ++i) {
    Worker& w = m.workers[static_cast<size_t>(i)];
    w.local_rank = i;
    w.rank = job.first_rank + i;
    int e = m.spawn(job, w);
    if (e != 0) {
      message(fmt::format("cannot execute '{}': {}", m.program, net::errno_string(e)));
      m.failed = true;
      m.exit_code = 127;
      if (m.running() > 0) m.begin_stop(SIGTERM);
      break;
    }
  }
  return m.supervise();
}

}  // namespace weft::launch
