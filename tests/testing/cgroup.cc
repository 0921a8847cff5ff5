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

// The cpu hierarchy as this process sees it mounted: v1 with the "cpu"
// controller, else cgroup2 whose root offers "cpu".
Hierarchy find_hierarchy() {
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
        if (o == "cpu") return {f[4], 1};
      }
    } else if (fstype == "cgroup2" && v2.version == 0) {
      if (file_has_word(f[4] + "/cgroup.controllers", "cpu")) v2 = {f[4], 2};
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

// On v2 the cpu controller must be on in the root's subtree for a new
// group to have cpu.max: switched on when off (and left on). Where the root
// is a container's, whose own processes live in it, the kernel refuses
// (EBUSY, the rule of no processes in inner groups). "" when done.
std::string enable_cpu_controller(const Hierarchy& h) {
  if (h.version != 2) return "";
  const std::string file = h.mount_point + "/cgroup.subtree_control";
  if (file_has_word(file, "cpu")) return "";
  try {
    write_file(file, "+cpu");
  } catch (const std::exception& e) {
    return std::string("cannot switch on the cpu controller: ") + e.what();
  }
  return "";
}

}  // namespace

std::string CpuQuotaGroup::unavailable() {
  if (geteuid() != 0) {
    return "not root (euid " + std::to_string(geteuid()) + "): making a cgroup needs root";
  }
  const Hierarchy h = find_hierarchy();
  if (h.version == 0) {
    return "no cgroup v1 'cpu' hierarchy and no cgroup2 hierarchy offering 'cpu' is mounted "
           "(/proc/self/mountinfo)";
  }
  if (std::string why = enable_cpu_controller(h); !why.empty()) return why;
  // The real question: can a group with a quota file be made there?
  const std::string probe = h.mount_point + "/weft-probe-" + std::to_string(getpid());
  if (::mkdir(probe.c_str(), 0755) != 0) {
    return "cannot make a cgroup under " + h.mount_point + ": " + std::strerror(errno);
  }
  const std::string quota = probe + (h.version == 1 ? "/cpu.cfs_quota_us" : "/cpu.max");
  const bool has_quota = ::access(quota.c_str(), W_OK) == 0;
  ::rmdir(probe.c_str());
  if (!has_quota) return "a new cgroup under " + h.mount_point + " has no writable " + quota;
  return "";
}

std::unique_ptr<CpuQuotaGroup> CpuQuotaGroup::create(const std::string& name, int64_t quota_us,
                                                     int64_t period_us) {
  if (name.empty() || name.find('/') != std::string::npos || name[0] == '.') {
    throw std::runtime_error("CpuQuotaGroup: bad group name '" + name + "'");
  }
  const Hierarchy h = find_hierarchy();
  if (h.version == 0) throw std::runtime_error("CpuQuotaGroup: " + unavailable());
  if (std::string why = enable_cpu_controller(h); !why.empty()) {
    throw std::runtime_error("CpuQuotaGroup: " + why);
  }
  const std::string path = h.mount_point + "/" + name;
  if (::mkdir(path.c_str(), 0755) != 0) {
    throw std::runtime_error("cannot make cgroup " + path + ": " + std::strerror(errno));
  }
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

CpuQuotaGroup::~CpuQuotaGroup() {
  // Tasks first (an exiting one may leave the group busy for a moment), then
  // the directory; given up after about 5 s.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (;;) {
    std::ifstream procs(path_ + "/cgroup.procs");
    std::string pid;
    while (procs >> pid) {
      try {
        write_file(parent_ + "/cgroup.procs", pid);
      } catch (const std::exception&) {
        // The task may have exited in between: only the rmdir below decides.
      }
    }
    if (::rmdir(path_.c_str()) == 0 || errno == ENOENT) return;
    if (std::chrono::steady_clock::now() >= until) {
      std::cerr << "CpuQuotaGroup: cannot remove " << path_ << ": " << std::strerror(errno) << "\n";
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

}  // namespace weft::testing
