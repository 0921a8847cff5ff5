// Cgroups for tests: a CPU cgroup with a quota, for tests that need a
// process held to a fraction of a core (the host probe, a throttled worker
// under `weft run`), and a memory cgroup with a limit (a worker near its
// memory limit). Needs root
// and a writable cpu hierarchy: cgroup v1 (controller "cpu") or else v2
// (cgroup2 with the cpu controller, which is switched on in the root's
// cgroup.subtree_control when off, and left on). Made at the root of that
// hierarchy as it is mounted, e.g. /sys/fs/cgroup/cpu/weft-test-<pid>.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

namespace weft::testing {

class CpuQuotaGroup {
 public:
  // Why no group can be made here, "" when one can: not root, no cpu
  // hierarchy mounted, or its root cannot hold a new group (read-only).
  // What a test passes to GTEST_SKIP.
  static std::string unavailable();

  // Creates the group `name` with quota_us of CPU time per period_us
  // (quota_us < 0: no quota). Throws std::runtime_error naming the file and
  // the error on any failure; what was made is removed again.
  static std::unique_ptr<CpuQuotaGroup> create(const std::string& name, int64_t quota_us,
                                               int64_t period_us = 100000);

  // Moves the tasks still in the group to its parent and removes it; reports
  // on stderr (never throws) what it could not undo.
  ~CpuQuotaGroup();
  CpuQuotaGroup(const CpuQuotaGroup&) = delete;
  CpuQuotaGroup& operator=(const CpuQuotaGroup&) = delete;

  // A new quota per the same period (quota_us < 0: none). Throws as create.
  void set_quota(int64_t quota_us);
  // Moves the process pid (every thread of it) into the group. Throws as create.
  void add(pid_t pid);
  // The group's directory.
  const std::string& path() const { return path_; }
  // 1 or 2.
  int version() const { return version_; }

 private:
  CpuQuotaGroup(std::string parent, std::string path, int version, int64_t period_us)
      : parent_(std::move(parent)),
        path_(std::move(path)),
        version_(version),
        period_us_(period_us) {}

  std::string parent_;
  std::string path_;
  int version_;
  int64_t period_us_;
};

// A memory cgroup with a limit: v1 (controller "memory", memory.limit_in_bytes)
// or else v2 (memory.max; the controller switched on as for CpuQuotaGroup).
class MemoryLimitGroup {
 public:
  // Why no group can be made here, "" when one can (as CpuQuotaGroup's).
  static std::string unavailable();
  // Creates the group `name` with a limit of limit_bytes (< 0: none).
  // Throws std::runtime_error naming the file and the error on any failure.
  static std::unique_ptr<MemoryLimitGroup> create(const std::string& name, int64_t limit_bytes);
  // Moves the tasks still in the group to its parent and removes it.
  ~MemoryLimitGroup();
  MemoryLimitGroup(const MemoryLimitGroup&) = delete;
  MemoryLimitGroup& operator=(const MemoryLimitGroup&) = delete;

  // A new limit (< 0: none). Throws as create.
  void set_limit(int64_t limit_bytes);
  void add(pid_t pid);
  const std::string& path() const { return path_; }
  // The file that holds the limit (a worker inside may set it itself).
  std::string limit_file() const;
  int version() const { return version_; }

 private:
  MemoryLimitGroup(std::string parent, std::string path, int version)
      : parent_(std::move(parent)), path_(std::move(path)), version_(version) {}

  std::string parent_;
  std::string path_;
  int version_;
};

}  // namespace weft::testing
