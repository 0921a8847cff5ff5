// The parsers and file readers of host_parse.h: /proc, cgroup v1 and v2.
#include "balance/host_parse.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <limits>

namespace weft::balance::host_detail {

namespace {

constexpr std::string_view kBlank = " \t\r\n";

std::string_view trim(std::string_view s) {
  const size_t b = s.find_first_not_of(kBlank);
  if (b == std::string_view::npos) return {};
  const size_t e = s.find_last_not_of(kBlank);
  return s.substr(b, e - b + 1);
}

// Calls fn(line) for each line of text (without its newline).
template <typename Fn>
void for_each_line(std::string_view text, Fn&& fn) {
  while (!text.empty()) {
    const size_t nl = text.find('\n');
    const std::string_view line = text.substr(0, nl);
    if (!fn(line)) return;
    if (nl == std::string_view::npos) return;
    text.remove_prefix(nl + 1);
  }
}

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  for (;;) {
    const size_t p = s.find(sep);
    out.push_back(s.substr(0, p));
    if (p == std::string_view::npos) return out;
    s.remove_prefix(p + 1);
  }
}

// "16305420 kB" (or a bare number) in bytes; nullopt if malformed or absurd.
std::optional<uint64_t> parse_kib(std::string_view s) {
  s = trim(s);
  uint64_t scale = 1;
  if (s.size() >= 2 && s.substr(s.size() - 2) == "kB") {
    scale = 1024;
    s.remove_suffix(2);
  }
  auto v = parse_u64(s);
  if (!v || *v > std::numeric_limits<uint64_t>::max() / scale) return std::nullopt;
  return *v * scale;
}

// mountinfo escapes blanks, tabs, newlines and backslashes as \ooo.
std::string unescape_octal(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '3' && s[i + 2] >= '0' &&
        s[i + 2] <= '7' && s[i + 3] >= '0' && s[i + 3] <= '7') {
      out.push_back(
          static_cast<char>((s[i + 1] - '0') * 64 + (s[i + 2] - '0') * 8 + (s[i + 3] - '0')));
      i += 3;
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

bool contains(const std::vector<std::string>& v, std::string_view x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

// The directories from the group `path` (as /proc/self/cgroup names it) up to
// the root of `mount`, own group first. When the group is not below the
// mount's root (a view from another cgroup namespace), only the mount point.
std::vector<std::string> group_chain(const CgroupMount& mount, std::string_view path) {
  std::string_view root = mount.root;
  while (root.size() > 1 && root.back() == '/') root.remove_suffix(1);
  std::string_view rel;
  if (root == "/") {
    rel = path;
  } else if (path == root || (path.size() > root.size() && path.substr(0, root.size()) == root &&
                              path[root.size()] == '/')) {
    rel = path.substr(root.size());
  } else {
    return {mount.mount_point};
  }
  std::vector<std::string_view> parts;
  for (std::string_view p : split(rel, '/')) {
    if (p.empty() || p == ".") continue;
    if (p == "..") return {mount.mount_point};
    parts.push_back(p);
  }
  std::string base = mount.mount_point;
  while (base.size() > 1 && base.back() == '/') base.pop_back();
  std::vector<std::string> chain;
  for (size_t n = parts.size() + 1; n-- > 0;) {
    std::string dir = base;
    for (size_t i = 0; i < n; ++i) {
      if (dir.empty() || dir.back() != '/') dir.push_back('/');
      dir.append(parts[i]);
    }
    chain.push_back(std::move(dir));
  }
  return chain;
}

// The chain of directories of `controller`: v1 where this process is in a v1
// hierarchy holding it and that hierarchy is mounted, else v2.
void resolve_controller(const std::vector<CgroupLine>& lines,
                        const std::vector<CgroupMount>& mounts, std::string_view controller,
                        int& version, std::vector<std::string>& dirs) {
  version = 0;
  dirs.clear();
  // The mount of a hierarchy may be bound more than once: prefer one whose
  // root holds the group.
  auto pick = [&](int v, const CgroupLine& line) -> bool {
    const CgroupMount* best = nullptr;
    for (const auto& m : mounts) {
      if (m.version != v || (v == 1 && !contains(m.controllers, controller))) continue;
      if (best == nullptr) best = &m;
      const std::string_view r = m.root;
      if (r == "/" || line.path == r ||
          (line.path.size() > r.size() && line.path.compare(0, r.size(), r) == 0 &&
           line.path[r.size()] == '/')) {
        best = &m;
        break;
      }
    }
    if (best == nullptr) return false;
    version = v;
    dirs = group_chain(*best, line.path);
    return true;
  };
  for (const auto& line : lines) {
    if (contains(line.controllers, controller) && pick(1, line)) return;
  }
  for (const auto& line : lines) {
    if (line.hierarchy == "0" && line.controllers.empty() && pick(2, line)) return;
  }
}

}  // namespace

std::optional<uint64_t> parse_u64(std::string_view s) {
  s = trim(s);
  if (s.empty() || s.size() > 20) return std::nullopt;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    const auto d = static_cast<uint64_t>(c - '0');
    if (v > (std::numeric_limits<uint64_t>::max() - d) / 10) return std::nullopt;
    v = v * 10 + d;
  }
  return v;
}

long read_small(const char* path, char* buf, size_t cap) {
  if (cap == 0) return -1;
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  size_t len = 0;
  while (len + 1 < cap) {
    const ssize_t n = ::read(fd, buf + len, cap - 1 - len);
    if (n < 0) {
      if (errno == EINTR) continue;
      ::close(fd);
      return -1;
    }
    if (n == 0) break;
    len += static_cast<size_t>(n);
  }
  ::close(fd);
  buf[len] = '\0';
  return static_cast<long>(len);
}

std::optional<std::string> read_text(const std::string& path, size_t max_bytes) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  std::string out;
  char buf[8192];
  while (out.size() < max_bytes) {
    const ssize_t n = ::read(fd, buf, std::min(sizeof buf, max_bytes - out.size()));
    if (n < 0) {
      if (errno == EINTR) continue;
      ::close(fd);
      return std::nullopt;
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

std::string parse_cpuinfo_model(std::string_view cpuinfo) {
  std::string model;
  for_each_line(cpuinfo, [&](std::string_view line) {
    const size_t colon = line.find(':');
    if (colon == std::string_view::npos || trim(line.substr(0, colon)) != "model name") {
      return true;
    }
    model = std::string(trim(line.substr(colon + 1)));
    return false;
  });
  return model;
}

MemInfo parse_meminfo(std::string_view meminfo) {
  MemInfo m;
  for_each_line(meminfo, [&](std::string_view line) {
    const size_t colon = line.find(':');
    if (colon == std::string_view::npos) return true;
    const std::string_view key = line.substr(0, colon);
    if (key == "MemTotal" || key == "MemAvailable") {
      if (auto v = parse_kib(line.substr(colon + 1))) {
        (key == "MemTotal" ? m.total_bytes : m.available_bytes) = *v;
      }
    }
    return true;
  });
  return m;
}

std::optional<uint64_t> parse_statm_resident_pages(std::string_view statm) {
  const auto fields = split(trim(statm), ' ');
  if (fields.size() < 2) return std::nullopt;
  return parse_u64(fields[1]);
}

std::vector<CgroupLine> parse_proc_cgroup(std::string_view text) {
  std::vector<CgroupLine> out;
  for_each_line(text, [&](std::string_view line) {
    const size_t c1 = line.find(':');
    if (c1 == std::string_view::npos) return true;
    const size_t c2 = line.find(':', c1 + 1);
    if (c2 == std::string_view::npos) return true;
    CgroupLine l;
    l.hierarchy = std::string(line.substr(0, c1));
    const std::string_view ctl = line.substr(c1 + 1, c2 - c1 - 1);
    if (!ctl.empty()) {
      for (auto c : split(ctl, ',')) l.controllers.emplace_back(c);
    }
    l.path = std::string(line.substr(c2 + 1));
    if (l.hierarchy.empty() || l.path.empty() || l.path[0] != '/') return true;
    out.push_back(std::move(l));
    return true;
  });
  return out;
}

std::vector<CgroupMount> parse_mountinfo_cgroups(std::string_view text) {
  std::vector<CgroupMount> out;
  for_each_line(text, [&](std::string_view line) {
    const auto f = split(line, ' ');
    // id parent major:minor root mount-point options [optional...] - fstype source super
    size_t dash = 6;
    while (dash < f.size() && f[dash] != "-") ++dash;
    if (f.size() < 7 || dash + 1 >= f.size()) return true;
    const std::string_view fstype = f[dash + 1];
    CgroupMount m;
    if (fstype == "cgroup") {
      m.version = 1;
      if (dash + 3 < f.size()) {
        for (auto o : split(f[dash + 3], ',')) m.controllers.emplace_back(o);
      }
    } else if (fstype == "cgroup2") {
      m.version = 2;
    } else {
      return true;
    }
    m.root = unescape_octal(f[3]);
    m.mount_point = unescape_octal(f[4]);
    if (m.root.empty() || m.mount_point.empty() || m.mount_point[0] != '/') return true;
    out.push_back(std::move(m));
    return true;
  });
  return out;
}

CgroupPaths resolve_cgroups(std::string_view proc_self_cgroup, std::string_view mountinfo) {
  const auto lines = parse_proc_cgroup(proc_self_cgroup);
  const auto mounts = parse_mountinfo_cgroups(mountinfo);
  CgroupPaths p;
  resolve_controller(lines, mounts, "cpu", p.cpu_version, p.cpu_dirs);
  resolve_controller(lines, mounts, "memory", p.memory_version, p.memory_dirs);
  for (const auto& d : p.memory_dirs) {
    p.memory_limit_files.push_back(
        d + (p.memory_version == 1 ? "/memory.limit_in_bytes" : "/memory.max"));
  }
  for (const auto& d : p.cpu_dirs) {
    p.cpu_quota_files.push_back(
        p.cpu_version == 1
            ? CgroupPaths::QuotaFiles{d + "/cpu.cfs_quota_us", d + "/cpu.cfs_period_us"}
            : CgroupPaths::QuotaFiles{d + "/cpu.max", ""});
  }
  return p;
}

namespace {

// Kernel bounds are 1 ms .. 1 s for the period; a quota above a million
// cores is no quota anyone set on purpose.
constexpr double kMaxQuotaCores = 1 << 20;

double quota_cores(std::optional<uint64_t> quota, std::optional<uint64_t> period) {
  if (!quota || !period || *quota == 0 || *period == 0) return 0;
  const double cores = static_cast<double>(*quota) / static_cast<double>(*period);
  return cores > 0 && cores <= kMaxQuotaCores ? cores : 0;
}

}  // namespace

double parse_cpu_max(std::string_view cpu_max) {
  const auto f = split(trim(cpu_max), ' ');
  if (f.empty() || f[0] == "max") return 0;
  return quota_cores(parse_u64(f[0]), f.size() >= 2 ? parse_u64(f[1]) : std::nullopt);
}

double cpu_quota_v1(std::string_view quota_us, std::string_view period_us) {
  // -1 = no quota; parse_u64 refuses the sign, so it gives 0 as well.
  return quota_cores(parse_u64(quota_us), parse_u64(period_us));
}

double read_cpu_quota(int version, const CgroupPaths::QuotaFiles& files) {
  char a[128];
  char b[128];
  if (version == 1) {
    if (read_small(files.quota.c_str(), a, sizeof a) < 0) return 0;
    if (read_small(files.period.c_str(), b, sizeof b) < 0) return 0;
    return cpu_quota_v1(a, b);
  }
  if (version == 2) {
    if (read_small(files.quota.c_str(), a, sizeof a) < 0) return 0;
    return parse_cpu_max(a);
  }
  return 0;
}

double read_cpu_quota(const CgroupPaths& paths) {
  double best = 0;
  for (const auto& f : paths.cpu_quota_files) {
    const double q = read_cpu_quota(paths.cpu_version, f);
    if (q > 0 && (best == 0 || q < best)) best = q;
  }
  return best;
}

uint64_t parse_memory_limit(int version, std::string_view text) {
  text = trim(text);
  if (version == 2 && text == "max") return 0;
  const auto v = parse_u64(text);
  if (!v) return 0;
  // v1 "unlimited" is PAGE_COUNTER_MAX pages, about 2^63 bytes.
  if (*v >= (uint64_t{1} << 62)) return 0;
  return *v;
}

uint64_t read_memory_limit(const CgroupPaths& paths) {
  uint64_t best = 0;
  char buf[128];
  for (const auto& f : paths.memory_limit_files) {
    if (read_small(f.c_str(), buf, sizeof buf) < 0) continue;
    const uint64_t v = parse_memory_limit(paths.memory_version, buf);
    if (v > 0 && (best == 0 || v < best)) best = v;
  }
  return best;
}

std::optional<uint64_t> parse_throttled_ns(int version, std::string_view cpu_stat) {
  const std::string_view key = version == 1 ? "throttled_time" : "throttled_usec";
  std::optional<uint64_t> out;
  for_each_line(cpu_stat, [&](std::string_view line) {
    line = trim(line);
    if (line.size() <= key.size() || line.substr(0, key.size()) != key ||
        (line[key.size()] != ' ' && line[key.size()] != '\t')) {
      return true;
    }
    auto v = parse_u64(line.substr(key.size()));
    if (v && version == 2) {
      v = *v > std::numeric_limits<uint64_t>::max() / 1000 ? std::nullopt
                                                           : std::optional<uint64_t>(*v * 1000);
    }
    out = v;
    return false;
  });
  return out;
}

void resolve_cpu_stat(CgroupPaths& paths) {
  paths.cpu_stat.clear();
  if (paths.cpu_dirs.empty()) return;
  const std::string* dir = &paths.cpu_dirs.front();
  double best = 0;
  for (size_t i = 0; i < paths.cpu_dirs.size() && i < paths.cpu_quota_files.size(); ++i) {
    const double q = read_cpu_quota(paths.cpu_version, paths.cpu_quota_files[i]);
    if (q > 0 && (best == 0 || q < best)) {
      best = q;
      dir = &paths.cpu_dirs[i];
    }
  }
  paths.cpu_stat = *dir + "/cpu.stat";
}

uint64_t read_throttled_ns(const CgroupPaths& paths) {
  if (paths.cpu_stat.empty()) return 0;
  char buf[4096];
  const long n = read_small(paths.cpu_stat.c_str(), buf, sizeof buf);
  if (n < 0) return 0;
  return parse_throttled_ns(paths.cpu_version, std::string_view(buf, static_cast<size_t>(n)))
      .value_or(0);
}

FileFacts read_file_facts(const ProcFiles& files) {
  FileFacts f;
  // The first processor's lines are at the start: 64 KiB is plenty even
  // where /proc/cpuinfo runs to megabytes.
  if (auto t = read_text(files.cpuinfo, 64 << 10)) f.cpu_model = parse_cpuinfo_model(*t);
  if (auto t = read_text(files.meminfo, 64 << 10)) f.memory = parse_meminfo(*t);
  const auto cg = read_text(files.self_cgroup, 64 << 10);
  const auto mi = read_text(files.mountinfo, 4 << 20);
  if (cg && mi) {
    f.cgroups = resolve_cgroups(*cg, *mi);
    resolve_cpu_stat(f.cgroups);
    f.cpu_quota_cores = read_cpu_quota(f.cgroups);
    f.memory_limit_bytes = read_memory_limit(f.cgroups);
  }
  return f;
}

}  // namespace weft::balance::host_detail
