// The parsers and file readers behind weft/host.h, apart from the probe so
// that the tests can run them on fake /proc and cgroup files in a temporary
// directory. Nothing here throws for a missing, unreadable or malformed file:
// the figure stays at its "unknown" value (nullopt, 0 or an empty string).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace weft::balance::host_detail {

// ---- Numbers and small files -----------------------------------------------

// A decimal unsigned number, surrounding blanks and a final newline allowed,
// nothing else (no sign, no suffix, no overflow); nullopt otherwise.
std::optional<uint64_t> parse_u64(std::string_view s);

// Reads at most cap - 1 bytes of a (small, pseudo-) file into buf with
// open/read/close and NUL-terminates it; returns the length, or -1 when the
// file cannot be opened or read. No allocation: what sample_process() uses.
long read_small(const char* path, char* buf, size_t cap);

// The whole text of a file up to max_bytes (more is cut off), or nullopt.
std::optional<std::string> read_text(const std::string& path, size_t max_bytes = 1 << 20);

// ---- /proc ------------------------------------------------------------------

// The first "model name" of /proc/cpuinfo, "" where there is none.
std::string parse_cpuinfo_model(std::string_view cpuinfo);

struct MemInfo {
  uint64_t total_bytes = 0;      // MemTotal, 0 unknown
  uint64_t available_bytes = 0;  // MemAvailable, 0 unknown
};
MemInfo parse_meminfo(std::string_view meminfo);

// Resident pages (the second field of /proc/self/statm), nullopt if malformed.
std::optional<uint64_t> parse_statm_resident_pages(std::string_view statm);

// ---- cgroups ----------------------------------------------------------------

// One line of /proc/self/cgroup: "4:cpu,cpuacct:/a/b" (v1), "0::/a/b" (v2).
struct CgroupLine {
  std::string hierarchy;                 // "4", "0"
  std::vector<std::string> controllers;  // {"cpu", "cpuacct"}; empty for v2
  std::string path;                      // "/a/b"
};
std::vector<CgroupLine> parse_proc_cgroup(std::string_view text);

// One cgroup mount of /proc/self/mountinfo (other mounts are left out).
struct CgroupMount {
  std::string root;                      // the cgroup mounted there ("/" unless a container's view)
  std::string mount_point;               // "/sys/fs/cgroup/cpu" (octal escapes decoded)
  int version = 0;                       // 1 (fstype cgroup) or 2 (cgroup2)
  std::vector<std::string> controllers;  // v1: from the super options ("cpu", "memory")
};
std::vector<CgroupMount> parse_mountinfo_cgroups(std::string_view text);

// Where this process's CPU and memory limits live: for each controller the
// cgroup version and the directories from the process's own group up to the
// root of the mounted hierarchy (own group first).
struct CgroupPaths {
  int cpu_version = 0;  // 0: no cpu controller found
  std::vector<std::string> cpu_dirs;
  int memory_version = 0;  // 0: no memory controller found
  std::vector<std::string> memory_dirs;
  // The limit file of each of memory_dirs (memory.limit_in_bytes or
  // memory.max), made once so that reading them allocates nothing.
  std::vector<std::string> memory_limit_files;
  // The quota file(s) of each of cpu_dirs, made once likewise: v1
  // cpu.cfs_quota_us and cpu.cfs_period_us, v2 cpu.max (period "").
  struct QuotaFiles {
    std::string quota, period;
  };
  std::vector<QuotaFiles> cpu_quota_files;
  // The cpu.stat whose throttled time sample_process() reports: the one of
  // the group whose quota binds (the smallest on the way up), else the
  // process's own group. Set by resolve_cpu_stat(); "" when none.
  std::string cpu_stat;
};
// From the texts of /proc/self/cgroup and /proc/self/mountinfo. A v1
// hierarchy with the controller is preferred to the v2 one (the layout of a
// hybrid host, where the unified hierarchy holds no controllers).
CgroupPaths resolve_cgroups(std::string_view proc_self_cgroup, std::string_view mountinfo);

// The CPU quota of one group in cores, 0 where it has none or it cannot be
// read: v1 cpu.cfs_quota_us / cpu.cfs_period_us (-1 = none), v2 cpu.max
// ("max 100000" = none, "25000 100000" = 0.25).
double parse_cpu_max(std::string_view cpu_max);
double cpu_quota_v1(std::string_view quota_us, std::string_view period_us);
double read_cpu_quota(int version, const CgroupPaths::QuotaFiles& files);
// The smallest quota over the groups (0: none anywhere); no allocation.
double read_cpu_quota(const CgroupPaths& paths);

// The memory limit of one group in bytes, 0 where none (v1: a huge value;
// v2: "max") or unreadable.
uint64_t parse_memory_limit(int version, std::string_view text);
// The smallest limit over the groups, 0 where none; no allocation.
uint64_t read_memory_limit(const CgroupPaths& paths);

// Throttled time in ns from the text of a cpu.stat (v1 "throttled_time" ns,
// v2 "throttled_usec"), nullopt where absent.
std::optional<uint64_t> parse_throttled_ns(int version, std::string_view cpu_stat);
// Sets paths.cpu_stat (see CgroupPaths::cpu_stat).
void resolve_cpu_stat(CgroupPaths& paths);
// From paths.cpu_stat; 0 where unknown; no allocation.
uint64_t read_throttled_ns(const CgroupPaths& paths);

// ---- Everything the probe reads from files ------------------------------------

// The files probe_host() reads, replaceable by the tests.
struct ProcFiles {
  std::string cpuinfo = "/proc/cpuinfo";
  std::string meminfo = "/proc/meminfo";
  std::string self_cgroup = "/proc/self/cgroup";
  std::string mountinfo = "/proc/self/mountinfo";
};
struct FileFacts {
  std::string cpu_model;  // "" where unknown
  MemInfo memory;
  CgroupPaths cgroups;
  double cpu_quota_cores = 0;
  uint64_t memory_limit_bytes = 0;
};
FileFacts read_file_facts(const ProcFiles& files);

}  // namespace weft::balance::host_detail
