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

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
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
      for (const auto& c : split(slurp(f[4] + "/cgroup.controllers"), ' ')) {
        if (c == "cpu" || c == "cpu\n") v2 = {f[4], 2};
      }
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

std::string CpuQuotaGroup::unavailable() {
  if (geteuid() != 0) {
    return "not root (euid " + std::to_string(geteuid()) + "): making a cgroup needs root";
  }
  const Hierarchy h = find_hierarchy();
  if (h.version == 0) {
    return "no cgroup v1 'cpu' hierarchy and no cgroup2 hierarchy offering 'cpu' is mounted "
           "(/proc/self/mountinfo)";
  }
  // The real question: can a group be made there?
  const std::string probe = h.mount_point + "/weft-probe-" + std::to_string(getpid());
  if (::mkdir(probe.c_str(), 0755) != 0) {
    return "cannot make a cgroup under " + h.mount_point + ": " + std::strerror(errno);
  }
  ::rmdir(probe.c_str());
  return "";
}

std::unique_ptr<CpuQuotaGroup> CpuQuotaGroup::create(const std::string& name, int64_t quota_us,
                                                     int64_t period_us) {
  if (name.empty() || name.find('/') != std::string::npos || name[0] == '.') {
    throw std::runtime_error("CpuQuotaGroup: bad group name '" + name + "'");
  }
  const Hierarchy h = find_hierarchy();
  if (h.version == 0) throw std::runtime_error("CpuQuotaGroup: " + unavailable());
  if (h.version == 2) {
    // The cpu controller must be on in the root's subtree for cpu.max to exist.
    const std::string ctl = slurp(h.mount_point + "/cgroup.subtree_control");
    bool on = false;
    for (const auto& c : split(ctl, ' ')) on = on || c == "cpu" || c == "cpu\n";
    if (!on) write_file(h.mount_point + "/cgroup.subtree_control", "+cpu");
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
