// Helpers for the test suite: temporary directories, ranks as threads, and
// real child processes (spawn, signal, wait with a deadline, captured output).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <exception>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace weft::testing {

// Directory of the built binaries (build/bin).
std::string bin_dir();

// A fresh directory under $TMPDIR, removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Runs fn(rank) on n threads and returns the exception each threw (null
// when it returned normally).
std::vector<std::exception_ptr> run_ranks(int n, const std::function<void(int)>& fn);
// Same, but rethrows the first exception.
void run_ranks_ok(int n, const std::function<void(int)>& fn);

// Polls cond (every millisecond) until it holds (true) or timeout passes
// (false). What a test waits for instead of sleeping: an observable state,
// such as a store's count of blocked calls or a line of a child's output.
bool wait_until(const std::function<bool()>& cond,
                std::chrono::milliseconds timeout = std::chrono::seconds(30));

// A child process with its stdout and stderr captured to a file.
class Process {
 public:
  // Starts argv[0] (a path) with argv and the current environment plus `env`.
  Process(std::vector<std::string> argv, std::map<std::string, std::string> env = {});
  ~Process();  // kills the child if it still runs
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  pid_t pid() const { return pid_; }
  void signal(int sig);
  // Waits up to timeout; returns true when the child exited. Then
  // exit_code() is its code, or 128+signal when a signal ended it.
  bool wait(std::chrono::milliseconds timeout);
  int exit_code() const { return exit_code_; }
  bool exited() const { return exited_; }
  int term_signal() const { return term_signal_; }
  // Everything the child wrote so far (stdout and stderr interleaved).
  std::string output() const;

 private:
  pid_t pid_ = -1;
  bool exited_ = false;
  int exit_code_ = -1;
  int term_signal_ = 0;
  std::string out_path_;
};

// A free TCP port on 127.0.0.1 (bound then released; racy but adequate).
int free_port();

// The names in /dev/shm, sorted (to check that a test leaves nothing behind).
std::vector<std::string> dev_shm();

}  // namespace weft::testing
