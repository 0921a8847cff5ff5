#include "testing/cgroup.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

namespace weft::testing {

namespace {

struct Hierarchy {
  std::string mount_point;  // "" when none
  int version = 0;
};

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string part;
  while (std::getline(in, part, sep)) out.push_back(part);
  return out;
}

// The blank-separated words of a file ("" where it cannot be read).
bool file_has_word(const std::string& path, const std::string& word) {
  std::ifstream in(path);
  std::string w;
  while (in >> w) {
    if (w == word) return true;
  }
  return false;
}

// The hierarchy of `controller` ("cpu", "memory") as this process sees it
// mounted: v1 with that controller, else cgroup2 whose root offers it.
Hierarchy find_hierarchy(const std::string& controller) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  Hierarchy v2;
  while (std::getline(in, line)) {
    const auto f = split(line, ' ');
    size_t dash = 6;
    while (dash < f.size() && f[dash] != "-") ++dash;
    if (f.size() < 7 || dash + 3 >= f.size()) continue;
    const std::string& fstype = f[dash + 1];
    if (fstype == "cgroup") {
      for (const auto& o : split(f[dash + 3], ',')) {
        if (o == controller) return {f[4], 1};
      }
    } else if (fstype == "cgroup2" && v2.version == 0) {
      if (file_has_word(f[4] + "/cgroup.controllers", controller)) v2 = {f[4], 2};
    }
  }
  return v2;
}

void write_file(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
  const ssize_t n = ::write(fd, text.data(), text.size());
  const int err = errno;
  ::close(fd);
  if (n != static_cast<ssize_t>(text.size())) {
    throw std::runtime_error("cannot write '" + text + "' to " + path + ": " +
                             (n < 0 ? std::strerror(err) : "short write"));
  }
}

std::string quota_text(int version, int64_t quota_us, int64_t period_us) {
  if (version == 1) return std::to_string(quota_us < 0 ? -1 : quota_us);
  return (quota_us < 0 ? std::string("max") : std::to_string(quota_us)) + " " +
         std::to_string(period_us);
}

}  // namespace

namespace {

// On v2 a controller must be on in the root's subtree for a new group to
// have its files (cpu.max, memory.max): switched on when off (and left on).
// Where the root is a container's, whose own processes live in it, the
// kernel refuses (EBUSY, the rule of no processes in inner groups). "" when
// done.
std::string enable_controller(const Hierarchy& h, const std::string& controller) {
  if (h.version != 2) return "";
  const std::string file = h.mount_point + "/cgroup.subtree_control";
  if (file_has_word(file, controller)) return "";
  try {
    write_file(file, "+" + controller);
  } catch (const std::exception& e) {
    return "cannot switch on the " + controller + " controller: " + e.what();
  }
  return "";
}

// Why no group of `controller` with a writable `file` (v1 name, v2 name)
// can be made here; "" when one can.
std::string group_unavailable(const std::string& controller, const std::string& v1_file,
                              const std::string& v2_file) {
  if (geteuid() != 0) {
    return "not root (euid " + std::to_string(geteuid()) + "): making a cgroup needs root";
  }
  const Hierarchy h = find_hierarchy(controller);
  if (h.version == 0) {
    return "no cgroup v1 '" + controller + "' hierarchy and no cgroup2 hierarchy offering '" +
           controller + "' is mounted (/proc/self/mountinfo)";
  }
  if (std::string why = enable_controller(h, controller); !why.empty()) return why;
  // The real question: can a group with that file be made there?
  const std::string probe = h.mount_point + "/weft-probe-" + std::to_string(getpid());
  if (::mkdir(probe.c_str(), 0755) != 0) {
    return "cannot make a cgroup under " + h.mount_point + ": " + std::strerror(errno);
  }
  const std::string file = probe + "/" + (h.version == 1 ? v1_file : v2_file);
  const bool writable = ::access(file.c_str(), W_OK) == 0;
  ::rmdir(probe.c_str());
  if (!writable) return "a new cgroup under " + h.mount_point + " has no writable " + file;
  return "";
}

// Makes the group `name` at the root of the hierarchy of `controller`.
// Throws std::runtime_error (prefixed by `who`) on any failure.
std::pair<Hierarchy, std::string> make_group(const std::string& who, const std::string& name,
                                             const std::string& controller,
                                             const std::string& why_unavailable) {
  if (name.empty() || name.find('/') != std::string::npos || name[0] == '.') {
    throw std::runtime_error(who + ": bad group name '" + name + "'");
  }
  const Hierarchy h = find_hierarchy(controller);
  if (h.version == 0) throw std::runtime_error(who + ": " + why_unavailable);
  if (std::string why = enable_controller(h, controller); !why.empty()) {
    throw std::runtime_error(who + ": " + why);
  }
  const std::string path = h.mount_point + "/" + name;
  if (::mkdir(path.c_str(), 0755) != 0) {
    throw std::runtime_error("cannot make cgroup " + path + ": " + std::strerror(errno));
  }
  return {h, path};
}

// Moves the tasks still in the group to its parent and removes it: tasks
// first (an exiting one may leave the group busy for a moment), then the
// directory; given up after about 5 s, reported on stderr.
void remove_group(const std::string& who, const std::string& parent, const std::string& path) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (;;) {
    std::ifstream procs(path + "/cgroup.procs");
    std::string pid;
    while (procs >> pid) {
      try {
        write_file(parent + "/cgroup.procs", pid);
      } catch (const std::exception&) {
        // The task may have exited in between: only the rmdir below decides.
      }
    }
    if (::rmdir(path.c_str()) == 0 || errno == ENOENT) return;
    if (std::chrono::steady_clock::now() >= until) {
      std::cerr << who << ": cannot remove " << path << ": " << std::strerror(errno) << "\n";
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

}  // namespace

std::string CpuQuotaGroup::unavailable() {
  return group_unavailable("cpu", "cpu.cfs_quota_us", "cpu.max");
}

std::unique_ptr<CpuQuotaGroup> CpuQuotaGroup::create(const std::string& name, int64_t quota_us,
                                                     int64_t period_us) {
  const auto [h, path] = make_group("CpuQuotaGroup", name, "cpu", unavailable());
  std::unique_ptr<CpuQuotaGroup> g(new CpuQuotaGroup(h.mount_point, path, h.version, period_us));
  if (h.version == 1) {
    write_file(path + "/cpu.cfs_period_us", std::to_string(period_us));
  }
  g->set_quota(quota_us);  // throws; g's destructor removes the group then
  return g;
}

void CpuQuotaGroup::set_quota(int64_t quota_us) {
  write_file(path_ + (version_ == 1 ? "/cpu.cfs_quota_us" : "/cpu.max"),
             quota_text(version_, quota_us, period_us_));
}

void CpuQuotaGroup::add(pid_t pid) { write_file(path_ + "/cgroup.procs", std::to_string(pid)); }

CpuQuotaGroup::~CpuQuotaGroup() { remove_group("CpuQuotaGroup", parent_, path_); }

std::string MemoryLimitGroup::unavailable() {
  return group_unavailable("memory", "memory.limit_in_bytes", "memory.max");
}

std::unique_ptr<MemoryLimitGroup> MemoryLimitGroup::create(const std::string& name,
                                                           int64_t limit_bytes) {
  const auto [h, path] = make_group("MemoryLimitGroup", name, "memory", unavailable());
  std::unique_ptr<MemoryLimitGroup> g(new MemoryLimitGroup(h.mount_point, path, h.version));
  g->set_limit(limit_bytes);  // throws; g's destructor removes the group then
  return g;
}

std::string MemoryLimitGroup::limit_file() const {
  return path_ + (version_ == 1 ? "/memory.limit_in_bytes" : "/memory.max");
}

void MemoryLimitGroup::set_limit(int64_t limit_bytes) {
  write_file(limit_file(), limit_bytes < 0 ? std::string(version_ == 1 ? "-1" : "max")
                                           : std::to_string(limit_bytes));
}

void MemoryLimitGroup::add(pid_t pid) { write_file(path_ + "/cgroup.procs", std::to_string(pid)); }

MemoryLimitGroup::~MemoryLimitGroup() { remove_group("MemoryLimitGroup", parent_, path_); }

}  // namespace weft::testing
