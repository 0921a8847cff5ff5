// The host probe and process monitor of weft/host.h: the facts of this
// machine, the samples of a busy and a growing process, the parsers on fake
// /proc and cgroup files, the NVML path on a stand-in libnvidia-ml.so.1, and
// a real CPU cgroup with a quota of a quarter core.
#include "weft/host.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "balance/host_parse.h"
#include "testing/cgroup.h"
#include "testing/testing.h"

namespace weft::balance {
namespace {

namespace hd = host_detail;
namespace fs = std::filesystem;

void put(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path) << text;
}

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// ---- This machine ----------------------------------------------------------------

// Also what the coordinator runs on a GPU machine: the line it prints is the
// probe's whole view (ctest -R HostProbe --output-on-failure -V).
TEST(HostProbe, FactsOfThisMachineAreSane) {
  const HostFacts f = probe_host();
  std::cout << "probe_host(): " << f.describe() << "\n";
  EXPECT_FALSE(f.hostname.empty());
  EXPECT_FALSE(f.cpu_model.empty());
  EXPECT_GE(f.cpus_online, 1);
  EXPECT_GE(f.cpus_usable, 1);
  EXPECT_LE(f.cpus_usable, f.cpus_online);
  EXPECT_GT(f.memory_total_bytes, 0u);
  EXPECT_GT(f.memory_available_bytes, 0u);
  EXPECT_LE(f.memory_available_bytes, f.memory_total_bytes);
  EXPECT_GE(f.cpu_quota_cores, 0.0);
  EXPECT_GT(f.cpu_capacity(), 0.0);
  EXPECT_LE(f.cpu_capacity(), f.cpus_usable);
  if (f.cpu_quota_cores > 0) {
    EXPECT_LE(f.cpu_capacity(), f.cpu_quota_cores);
  }
  if (f.gpus.empty()) {
    EXPECT_FALSE(f.gpu_note.empty()) << "no GPU and no reason given";
  }
  for (const auto& g : f.gpus) {
    EXPECT_FALSE(g.name.empty()) << g.index;
    EXPECT_GT(g.memory_total_bytes, 0u) << g.index;
    EXPECT_LE(g.memory_used_bytes, g.memory_total_bytes) << g.index;
    EXPECT_TRUE(g.utilization == -1 || (g.utilization >= 0 && g.utilization <= 1)) << g.index;
  }
  const std::string line = f.describe();
  EXPECT_NE(line.find(f.hostname), std::string::npos) << line;
  EXPECT_NE(line.find(f.cpu_model), std::string::npos) << line;
}

TEST(HostFacts, CapacityIsTheUsableCpusLoweredToTheQuota) {
  HostFacts f;
  f.cpus_online = 8;
  f.cpus_usable = 4;
  EXPECT_EQ(f.cpu_capacity(), 4);
  f.cpu_quota_cores = 0.25;
  EXPECT_EQ(f.cpu_capacity(), 0.25);
  f.cpu_quota_cores = 6;  // a quota above the affinity mask does not raise it
  EXPECT_EQ(f.cpu_capacity(), 4);
  f.cpus_usable = 0;  // unknown: the online CPUs
  f.cpu_quota_cores = 0;
  EXPECT_EQ(f.cpu_capacity(), 8);
  f.cpus_online = 0;  // nothing known: one
  EXPECT_EQ(f.cpu_capacity(), 1);
}

TEST(HostFacts, DescribeNamesEveryFigure) {
  HostFacts f;
  f.hostname = "host-a";
  f.cpu_model = "AMD EPYC";
  f.cpus_online = 4;
  f.cpus_usable = 2;
  f.cpu_quota_cores = 0.25;
  f.memory_total_bytes = 8ull << 30;
  f.memory_available_bytes = 6ull << 30;
  f.memory_limit_bytes = 1ull << 30;
  f.gpu_note = "libnvidia-ml.so.1 not loaded";
  EXPECT_EQ(f.describe(),
            "host-a: 2 x AMD EPYC (of 4 online), quota 0.25 cores, 8.0 GiB (6.0 GiB available, "
            "limit 1.0 GiB), no GPU (libnvidia-ml.so.1 not loaded)");
  f.gpus.push_back({0, "NVIDIA H100 80GB HBM3", 80ull << 30, 2ull << 30, 0.5});
  f.gpu_note.clear();
  EXPECT_NE(f.describe().find("1 GPU: [0] NVIDIA H100 80GB HBM3 80.0 GiB (2.0 GiB used, util 50%)"),
            std::string::npos)
      << f.describe();
}

// ---- Samples of this process ------------------------------------------------------

TEST(ProcessSample, BusyThreadShowsCpuUse) {
  const ProcessSample a = sample_process();
  // Spins until the thread has used 0.2 s of CPU, however long that takes on
  // a loaded machine: the CPU time is what the sample must show.
  std::thread spin([] {
    const double start = thread_cpu_seconds();
    volatile uint64_t x = 0;
    while (thread_cpu_seconds() - start < 0.2) x = x + 1;
  });
  spin.join();
  const ProcessSample b = sample_process();
  const Usage u = usage_between(a, b);
  std::cout << "busy thread: " << u.seconds << " s wall, cpu_utilization " << u.cpu_utilization
            << "\n";
  EXPECT_GT(u.seconds, 0);
  EXPECT_GE(b.cpu_seconds - a.cpu_seconds, 0.2);
  EXPECT_GE(u.cpu_utilization * u.seconds, 0.199);
  EXPECT_GT(u.cpu_utilization, 0);
  EXPECT_TRUE(std::isfinite(u.cpu_utilization));
  EXPECT_GE(u.throttled_fraction, 0);
  EXPECT_LE(u.throttled_fraction, 1);
}

TEST(ProcessSample, RssGrowsAfterTouching64MiB) {
  constexpr size_t kBytes = 64 << 20;
  const ProcessSample a = sample_process();
  EXPECT_GT(a.rss_bytes, 0u);
  void* p = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  volatile char* c = static_cast<char*>(p);
  for (size_t i = 0; i < kBytes; i += 4096) c[i] = 1;
  const ProcessSample b = sample_process();
  munmap(p, kBytes);
  const Usage u = usage_between(a, b);
  EXPECT_EQ(u.rss_bytes, b.rss_bytes);
  EXPECT_GE(b.rss_bytes, a.rss_bytes + (48u << 20))
      << "rss " << a.rss_bytes << " -> " << b.rss_bytes;
  const ProcessSample after = sample_process();
  EXPECT_LT(after.rss_bytes, b.rss_bytes);  // unmapped: resident no more
}

TEST(ProcessSample, CostIsLogged) {
  sample_process();  // resolves the cgroup paths and NVML once
  constexpr int kN = 2000;
  const auto t0 = std::chrono::steady_clock::now();
  uint64_t rss = 0;
  for (int i = 0; i < kN; ++i) rss += sample_process().rss_bytes;
  const double us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / kN;
  std::cout << "sample_process(): " << us << " us per call (" << kN << " calls)\n";
  RecordProperty("sample_process_us", std::to_string(us));
  EXPECT_GT(rss, 0u);
}

TEST(UsageBetween, EqualSamplesGiveZerosNotNaN) {
  const ProcessSample s = sample_process();
  for (const Usage& u : {usage_between(s, s), usage_between(ProcessSample{}, ProcessSample{})}) {
    EXPECT_EQ(u.seconds, 0);
    EXPECT_EQ(u.cpu_utilization, 0);
    EXPECT_EQ(u.throttled_fraction, 0);
    EXPECT_TRUE(std::isfinite(u.memory_pressure));
    EXPECT_TRUE(std::isfinite(u.gpu_utilization));
  }
  EXPECT_EQ(usage_between(ProcessSample{}, ProcessSample{}).memory_pressure, 0);
  EXPECT_EQ(usage_between(ProcessSample{}, ProcessSample{}).gpu_utilization, -1);
}

TEST(UsageBetween, FiguresFromConstructedSamples) {
  ProcessSample a;
  a.wall_seconds = 100;
  a.cpu_seconds = 10;
  a.throttled_ns = 1'000'000'000;
  ProcessSample b = a;
  b.wall_seconds = 102;
  b.cpu_seconds = 13;              // 3 s over 2 s: 1.5 cores
  b.throttled_ns = 1'500'000'000;  // 0.5 s throttled over 2 s
  b.rss_bytes = 256 << 20;
  b.memory_limit_bytes = 1024 << 20;  // a quarter
  b.gpu_utilization = {0.5, -1, 0.7};
  b.cpu_quota_cores = 0.25;
  Usage u = usage_between(a, b);
  EXPECT_DOUBLE_EQ(u.seconds, 2);
  EXPECT_DOUBLE_EQ(u.cpu_seconds, 3);
  EXPECT_DOUBLE_EQ(u.cpu_utilization, 1.5);
  EXPECT_DOUBLE_EQ(u.cpu_quota_cores, 0.25);  // the later sample's
  EXPECT_DOUBLE_EQ(u.throttled_fraction, 0.25);
  EXPECT_DOUBLE_EQ(u.memory_pressure, 0.25);
  EXPECT_DOUBLE_EQ(u.gpu_utilization, 0.6);  // the unknown GPU left out
  EXPECT_EQ(u.rss_bytes, 256u << 20);

  // Reversed (later before earlier): no rates, never negative.
  u = usage_between(b, a);
  EXPECT_EQ(u.seconds, 0);
  EXPECT_EQ(u.cpu_seconds, 0);
  EXPECT_EQ(u.cpu_utilization, 0);
  EXPECT_EQ(u.throttled_fraction, 0);

  // A throttle counter summed over CPUs may pass the wall time: capped at 1;
  // one that went back (another group) counts nothing.
  b.throttled_ns = a.throttled_ns + 9'000'000'000;
  EXPECT_EQ(usage_between(a, b).throttled_fraction, 1);
  b.throttled_ns = 0;
  EXPECT_EQ(usage_between(a, b).throttled_fraction, 0);
  b.wall_seconds = NAN;
  EXPECT_EQ(usage_between(a, b).cpu_utilization, 0);
}

// ---- Parsers ------------------------------------------------------------------------

TEST(HostParse, Numbers) {
  EXPECT_EQ(hd::parse_u64("42"), 42u);
  EXPECT_EQ(hd::parse_u64(" 42\n"), 42u);
  EXPECT_EQ(hd::parse_u64("18446744073709551615"), UINT64_MAX);
  EXPECT_EQ(hd::parse_u64("18446744073709551616"), std::nullopt);  // overflow
  EXPECT_EQ(hd::parse_u64("99999999999999999999999"), std::nullopt);
  EXPECT_EQ(hd::parse_u64("-1"), std::nullopt);
  EXPECT_EQ(hd::parse_u64("+1"), std::nullopt);
  EXPECT_EQ(hd::parse_u64("12a"), std::nullopt);
  EXPECT_EQ(hd::parse_u64("1 2"), std::nullopt);
  EXPECT_EQ(hd::parse_u64(""), std::nullopt);
  EXPECT_EQ(hd::parse_u64("\n"), std::nullopt);
}

TEST(HostParse, CpuinfoMeminfoStatm) {
  EXPECT_EQ(hd::parse_cpuinfo_model("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 1\n"
                                    "model name\t: AMD EPYC 7763 64-Core Processor\n"
                                    "processor\t: 1\nmodel name\t: other\n"),
            "AMD EPYC 7763 64-Core Processor");
  EXPECT_EQ(hd::parse_cpuinfo_model("processor : 0\nBogoMIPS : 50.00\n"), "");
  EXPECT_EQ(hd::parse_cpuinfo_model(""), "");

  auto m = hd::parse_meminfo(
      "MemTotal:       16305420 kB\nMemFree:         1000 kB\nMemAvailable:   12000000 kB\n");
  EXPECT_EQ(m.total_bytes, 16305420ull * 1024);
  EXPECT_EQ(m.available_bytes, 12000000ull * 1024);
  m = hd::parse_meminfo("MemTotal: lots kB\nMemAvailable: 99999999999999999999 kB\n");
  EXPECT_EQ(m.total_bytes, 0u);
  EXPECT_EQ(m.available_bytes, 0u);
  m = hd::parse_meminfo("MemTotal: 18014398509481984 kB\n");  // 2^54 kB: overflows in bytes
  EXPECT_EQ(m.total_bytes, 0u);

  EXPECT_EQ(hd::parse_statm_resident_pages("12345 678 90 1 0 200 0\n"), 678u);
  EXPECT_EQ(hd::parse_statm_resident_pages("12345"), std::nullopt);
  EXPECT_EQ(hd::parse_statm_resident_pages("12345 x 1"), std::nullopt);
}

TEST(HostParse, ProcSelfCgroupAndMountinfo) {
  const auto lines =
      hd::parse_proc_cgroup("4:memory:/process_api/abc\n3:cpu,cpuacct:/\n0::/user.slice\nbad\n");
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0].controllers, std::vector<std::string>{"memory"});
  EXPECT_EQ(lines[0].path, "/process_api/abc");
  EXPECT_EQ(lines[1].controllers, (std::vector<std::string>{"cpu", "cpuacct"}));
  EXPECT_EQ(lines[2].hierarchy, "0");
  EXPECT_TRUE(lines[2].controllers.empty());

  const auto mounts = hd::parse_mountinfo_cgroups(
      "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
      "31 30 0:28 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n"
      "40 30 0:37 /docker/x /sys/fs/cgroup/my\\040dir rw - cgroup2 cgroup2 rw\n"
      "41 30 0:37 / /truncated rw - cgroup2\n"
      "broken line\n");
  ASSERT_EQ(mounts.size(), 3u);
  EXPECT_EQ(mounts[0].version, 1);
  EXPECT_EQ(mounts[0].mount_point, "/sys/fs/cgroup/cpu");
  EXPECT_EQ(mounts[0].controllers, (std::vector<std::string>{"rw", "cpu", "cpuacct"}));
  EXPECT_EQ(mounts[1].version, 2);
  EXPECT_EQ(mounts[1].root, "/docker/x");
  EXPECT_EQ(mounts[1].mount_point, "/sys/fs/cgroup/my dir");
  EXPECT_EQ(mounts[2].mount_point, "/truncated");
}

// The layout of this machine: v1 controllers, the unified hierarchy empty.
TEST(HostParse, ResolvesV1BeforeV2OnAHybridHost) {
  const auto p =
      hd::resolve_cgroups("9:name=systemd:/\n4:memory:/process_api/c3d6\n1:cpu:/\n0::/\n",
                          "31 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
                          "34 30 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
                          "40 30 0:37 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n");
  EXPECT_EQ(p.cpu_version, 1);
  EXPECT_EQ(p.cpu_dirs, std::vector<std::string>{"/sys/fs/cgroup/cpu"});
  EXPECT_EQ(p.memory_version, 1);
  EXPECT_EQ(p.memory_dirs, (std::vector<std::string>{"/sys/fs/cgroup/memory/process_api/c3d6",
                                                     "/sys/fs/cgroup/memory/process_api",
                                                     "/sys/fs/cgroup/memory"}));
  EXPECT_EQ(p.memory_limit_files.front(),
            "/sys/fs/cgroup/memory/process_api/c3d6/memory.limit_in_bytes");
  ASSERT_EQ(p.cpu_quota_files.size(), 1u);
  EXPECT_EQ(p.cpu_quota_files[0].quota, "/sys/fs/cgroup/cpu/cpu.cfs_quota_us");
  EXPECT_EQ(p.cpu_quota_files[0].period, "/sys/fs/cgroup/cpu/cpu.cfs_period_us");
}

TEST(HostParse, ResolvesV2AndContainerViews) {
  // Pure v2.
  auto p = hd::resolve_cgroups("0::/system.slice/job.service\n",
                               "40 30 0:37 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
  EXPECT_EQ(p.cpu_version, 2);
  EXPECT_EQ(p.cpu_dirs,
            (std::vector<std::string>{"/sys/fs/cgroup/system.slice/job.service",
                                      "/sys/fs/cgroup/system.slice", "/sys/fs/cgroup"}));
  EXPECT_EQ(p.memory_limit_files.back(), "/sys/fs/cgroup/memory.max");
  ASSERT_EQ(p.cpu_quota_files.size(), 3u);
  EXPECT_EQ(p.cpu_quota_files.front().quota, "/sys/fs/cgroup/system.slice/job.service/cpu.max");
  EXPECT_EQ(p.cpu_quota_files.front().period, "");
  // A container that sees its own group mounted as the root of the hierarchy.
  p = hd::resolve_cgroups("0::/docker/abc\n",
                          "40 30 0:37 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
  EXPECT_EQ(p.cpu_dirs, std::vector<std::string>{"/sys/fs/cgroup"});
  // A group outside the mounted root (another namespace's view): the mount only.
  p = hd::resolve_cgroups("0::/../other\n",
                          "40 30 0:37 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
  EXPECT_EQ(p.cpu_dirs, std::vector<std::string>{"/sys/fs/cgroup"});
  // No cgroup mounted at all.
  p = hd::resolve_cgroups("0::/\n", "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n");
  EXPECT_EQ(p.cpu_version, 0);
  EXPECT_TRUE(p.cpu_dirs.empty());
  EXPECT_EQ(hd::read_cpu_quota(p), 0);
  EXPECT_EQ(hd::read_memory_limit(p), 0u);
  EXPECT_EQ(hd::read_throttled_ns(p), 0u);
}

TEST(HostParse, QuotaAndLimitTexts) {
  EXPECT_EQ(hd::cpu_quota_v1("-1\n", "100000\n"), 0);
  EXPECT_DOUBLE_EQ(hd::cpu_quota_v1("25000\n", "100000\n"), 0.25);
  EXPECT_DOUBLE_EQ(hd::cpu_quota_v1("150000", "50000"), 3);
  EXPECT_EQ(hd::cpu_quota_v1("25000", "0"), 0);
  EXPECT_EQ(hd::cpu_quota_v1("25000", "garbage"), 0);
  EXPECT_EQ(hd::cpu_quota_v1("999999999999999999", "1"), 0);  // absurd
  EXPECT_EQ(hd::parse_cpu_max("max 100000\n"), 0);
  EXPECT_DOUBLE_EQ(hd::parse_cpu_max("25000 100000\n"), 0.25);
  EXPECT_EQ(hd::parse_cpu_max("25000\n"), 0);
  EXPECT_EQ(hd::parse_cpu_max(""), 0);
  EXPECT_EQ(hd::parse_memory_limit(1, "9223372036854771712\n"), 0u);  // v1 "unlimited"
  EXPECT_EQ(hd::parse_memory_limit(1, "1073741824\n"), 1u << 30);
  EXPECT_EQ(hd::parse_memory_limit(2, "max\n"), 0u);
  EXPECT_EQ(hd::parse_memory_limit(2, "536870912\n"), 512u << 20);
  EXPECT_EQ(hd::parse_memory_limit(1, "max\n"), 0u);
  EXPECT_EQ(hd::parse_memory_limit(2, "-5\n"), 0u);
  EXPECT_EQ(hd::parse_throttled_ns(1, "nr_periods 10\nnr_throttled 3\nthrottled_time 12345\n"),
            12345u);
  EXPECT_EQ(hd::parse_throttled_ns(2, "usage_usec 9\nthrottled_usec 7\nnr_bursts 0\n"), 7000u);
  EXPECT_EQ(hd::parse_throttled_ns(2, "throttled_usec_total 7\n"), std::nullopt);
  EXPECT_EQ(hd::parse_throttled_ns(1, "throttled_time x\n"), std::nullopt);
  EXPECT_EQ(hd::parse_throttled_ns(2, "throttled_usec 99999999999999999999\n"), std::nullopt);
}

// Fake /proc files and a v1 tree in a temporary directory: the limits of the
// ancestors apply, the smallest wins; cpu.stat is the binding group's.
TEST(HostFiles, V1TreeWithLimitsOnAncestors) {
  testing::TempDir t;
  const std::string d = t.path();
  put(d + "/proc/cpuinfo", "processor\t: 0\nmodel name\t: Fake CPU 3000\n");
  put(d + "/proc/meminfo", "MemTotal: 2048 kB\nMemAvailable: 1024 kB\n");
  put(d + "/proc/cgroup", "5:memory:/a/b\n3:cpu,cpuacct:/a/b\n0::/\n");
  put(d + "/proc/mountinfo", "31 30 0:28 / " + d + "/cpu rw - cgroup cgroup rw,cpu,cpuacct\n" +
                                 "34 30 0:31 / " + d + "/memory rw - cgroup cgroup rw,memory\n");
  put(d + "/cpu/cpu.cfs_quota_us", "-1\n");
  put(d + "/cpu/cpu.cfs_period_us", "100000\n");
  put(d + "/cpu/a/cpu.cfs_quota_us", "50000\n");
  put(d + "/cpu/a/cpu.cfs_period_us", "100000\n");
  put(d + "/cpu/a/cpu.stat", "nr_periods 4\nnr_throttled 2\nthrottled_time 777\n");
  put(d + "/cpu/a/b/cpu.cfs_quota_us", "-1\n");
  put(d + "/cpu/a/b/cpu.cfs_period_us", "100000\n");
  put(d + "/cpu/a/b/cpu.stat", "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n");
  put(d + "/memory/memory.limit_in_bytes", "9223372036854771712\n");
  put(d + "/memory/a/memory.limit_in_bytes", "2147483648\n");
  put(d + "/memory/a/b/memory.limit_in_bytes", "1073741824\n");

  hd::ProcFiles files{d + "/proc/cpuinfo", d + "/proc/meminfo", d + "/proc/cgroup",
                      d + "/proc/mountinfo"};
  auto f = hd::read_file_facts(files);
  EXPECT_EQ(f.cpu_model, "Fake CPU 3000");
  EXPECT_EQ(f.memory.total_bytes, 2048u * 1024);
  EXPECT_EQ(f.memory.available_bytes, 1024u * 1024);
  EXPECT_DOUBLE_EQ(f.cpu_quota_cores, 0.5);
  EXPECT_EQ(f.memory_limit_bytes, 1u << 30);
  EXPECT_EQ(f.cgroups.cpu_stat, d + "/cpu/a/cpu.stat");
  EXPECT_EQ(hd::read_throttled_ns(f.cgroups), 777u);

  // A smaller quota on the own group binds instead; malformed and missing
  // files are no limit, never an error.
  put(d + "/cpu/a/b/cpu.cfs_quota_us", "20000\n");
  put(d + "/memory/a/b/memory.limit_in_bytes", "lots\n");
  fs::remove(d + "/memory/a/memory.limit_in_bytes");
  f = hd::read_file_facts(files);
  EXPECT_DOUBLE_EQ(f.cpu_quota_cores, 0.2);
  EXPECT_EQ(f.cgroups.cpu_stat, d + "/cpu/a/b/cpu.stat");
  EXPECT_EQ(hd::read_throttled_ns(f.cgroups), 0u);
  EXPECT_EQ(f.memory_limit_bytes, 0u);
}

TEST(HostFiles, V2Tree) {
  testing::TempDir t;
  const std::string d = t.path();
  put(d + "/proc/cgroup", "0::/job/step\n");
  put(d + "/proc/mountinfo", "40 30 0:37 / " + d + "/unified rw - cgroup2 cgroup2 rw\n");
  put(d + "/unified/job/cpu.max", "25000 100000\n");
  put(d + "/unified/job/cpu.stat", "usage_usec 5\nthrottled_usec 42\n");
  put(d + "/unified/job/memory.max", "536870912\n");
  put(d + "/unified/job/step/cpu.max", "max 100000\n");
  put(d + "/unified/job/step/cpu.stat", "usage_usec 5\nthrottled_usec 1\n");
  put(d + "/unified/job/step/memory.max", "max\n");
  hd::ProcFiles files{d + "/proc/cpuinfo", d + "/proc/meminfo", d + "/proc/cgroup",
                      d + "/proc/mountinfo"};
  const auto f = hd::read_file_facts(files);
  EXPECT_EQ(f.cpu_model, "");  // no such file
  EXPECT_EQ(f.memory.total_bytes, 0u);
  EXPECT_EQ(f.cgroups.cpu_version, 2);
  EXPECT_DOUBLE_EQ(f.cpu_quota_cores, 0.25);
  EXPECT_EQ(f.memory_limit_bytes, 512u << 20);
  EXPECT_EQ(hd::read_throttled_ns(f.cgroups), 42000u);
}

TEST(HostFiles, NothingReadableGivesUnknowns) {
  hd::ProcFiles files{"/nonexistent/a", "/nonexistent/b", "/nonexistent/c", "/nonexistent/d"};
  const auto f = hd::read_file_facts(files);
  EXPECT_EQ(f.cpu_model, "");
  EXPECT_EQ(f.memory.total_bytes, 0u);
  EXPECT_EQ(f.cpu_quota_cores, 0);
  EXPECT_EQ(f.memory_limit_bytes, 0u);
  char buf[8];
  EXPECT_EQ(hd::read_small("/nonexistent/x", buf, sizeof buf), -1);
  // A file longer than the buffer is cut, still terminated.
  testing::TempDir t;
  put(t.path() + "/long", "0123456789");
  EXPECT_EQ(hd::read_small((t.path() + "/long").c_str(), buf, sizeof buf), 7);
  EXPECT_STREQ(buf, "0123456");
  EXPECT_EQ(hd::read_text(t.path() + "/long", 4), "0123");
}

// ---- NVML, on the stand-in library of fake_nvml.cc ------------------------------------

// Run in a child process by the next test, with the stand-in first on
// LD_LIBRARY_PATH.
TEST(HostNvmlChild, DISABLED_SeesTheFakeGpus) {
  const char* mode = std::getenv("WEFT_FAKE_NVML_MODE");
  ASSERT_NE(mode, nullptr);
  const HostFacts f = probe_host();
  std::cout << "probe_host(): " << f.describe() << "\n";
  if (std::string(mode) == "init-fails") {
    EXPECT_TRUE(f.gpus.empty());
    EXPECT_EQ(f.gpu_note, "nvmlInit_v2 failed: Driver Not Loaded (9)");
    EXPECT_TRUE(sample_process().gpu_utilization.empty());
    return;
  }
  ASSERT_EQ(f.gpus.size(), 2u) << f.gpu_note;
  EXPECT_EQ(f.gpu_note, "");
  EXPECT_EQ(f.gpus[0].index, 0);
  EXPECT_EQ(f.gpus[0].name, "Fake GPU A");
  EXPECT_EQ(f.gpus[0].memory_total_bytes, 80ull << 30);
  EXPECT_EQ(f.gpus[0].memory_used_bytes, 1ull << 30);
  EXPECT_DOUBLE_EQ(f.gpus[0].utilization, 0.37);
  EXPECT_EQ(f.gpus[1].index, 1);
  EXPECT_EQ(f.gpus[1].name, "Fake GPU B");
  EXPECT_EQ(f.gpus[1].memory_used_bytes, 2ull << 30);
  EXPECT_EQ(f.gpus[1].utilization, -1);  // not supported
  const ProcessSample s = sample_process();
  ASSERT_EQ(s.gpu_utilization.size(), 2u);
  EXPECT_DOUBLE_EQ(s.gpu_utilization[0], 0.37);
  EXPECT_EQ(s.gpu_utilization[1], -1);
  EXPECT_DOUBLE_EQ(usage_between(s, s).gpu_utilization, 0.37);
  EXPECT_NE(f.describe().find("2 GPUs: [0] Fake GPU A 80.0 GiB (1.0 GiB used, util 37%) [1] Fake "
                              "GPU B 80.0 GiB (2.0 GiB used, util ?)"),
            std::string::npos);
}

TEST(HostNvml, ReadsGpusThroughTheLibraryLoadedAtRunTime) {
  for (const char* mode : {"ok", "init-fails"}) {
    std::map<std::string, std::string> env{{"WEFT_FAKE_NVML_MODE", mode},
                                           {"LD_LIBRARY_PATH", WEFT_FAKE_NVML_DIR}};
    if (std::string(mode) == "init-fails") env["FAKE_NVML_INIT_FAIL"] = "1";
    testing::Process child({testing::bin_dir() + "/host_test", "--gtest_filter=HostNvmlChild.*",
                            "--gtest_also_run_disabled_tests"},
                           env);
    ASSERT_TRUE(child.wait(std::chrono::seconds(60))) << mode;
    EXPECT_EQ(child.exit_code(), 0) << mode << "\n" << child.output();
    EXPECT_NE(child.output().find("[  PASSED  ] 1 test"), std::string::npos) << mode << "\n"
                                                                             << child.output();
  }
}

// ---- A real cgroup ------------------------------------------------------------------

struct ChildReport {
  double quota_cores = -1;
  uint64_t throttled_before = 0;
  uint64_t throttled_after = 0;
  double cpu_utilization = -1;
  double throttled_fraction = -1;
  double sampled_quota = -1;          // sample_process()'s quota at 25 ms per 100 ms
  double sampled_quota_changed = -1;  // and after the quota became 50 ms
};

// A child moves itself into a v1 (else v2) cpu group with a quota of 25 ms
// per 100 ms and reports what the probe sees there; spinning for 0.3 s it
// must also be throttled, and the sample must show it, and the quota, also
// after it was changed.
TEST(HostCgroup, ChildInAQuarterCoreGroupSeesTheQuota) {
  if (const std::string why = testing::CpuQuotaGroup::unavailable(); !why.empty()) {
    GTEST_SKIP() << why;
  }
  auto group = testing::CpuQuotaGroup::create("weft-test-" + std::to_string(getpid()), -1, 100000);
  group->set_quota(25000);
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    close(fds[0]);
    ChildReport r;
    try {
      group->add(getpid());
      r.quota_cores = probe_host().cpu_quota_cores;
      const ProcessSample a = sample_process();
      const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(300);
      volatile uint64_t x = 0;
      while (std::chrono::steady_clock::now() < until) x = x + 1;
      const ProcessSample b = sample_process();
      r.throttled_before = a.throttled_ns;
      r.throttled_after = b.throttled_ns;
      const Usage u = usage_between(a, b);
      r.cpu_utilization = u.cpu_utilization;
      r.throttled_fraction = u.throttled_fraction;
      r.sampled_quota = b.cpu_quota_cores;
      group->set_quota(50000);  // a quota changed while the process runs is seen at once
      r.sampled_quota_changed = sample_process().cpu_quota_cores;
    } catch (const std::exception& e) {
      std::cerr << "child: " << e.what() << "\n";
    }
    const ssize_t n = write(fds[1], &r, sizeof r);
    _exit(n == static_cast<ssize_t>(sizeof r) ? 0 : 1);
  }
  close(fds[1]);
  ChildReport r;
  pollfd p{fds[0], POLLIN, 0};
  const bool ready = poll(&p, 1, 60'000) == 1;
  const ssize_t n = ready ? read(fds[0], &r, sizeof r) : -1;
  close(fds[0]);
  if (!ready) kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(ready) << "the child reported nothing in 60 s";
  ASSERT_EQ(n, static_cast<ssize_t>(sizeof r));
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  std::cout << "in " << group->path() << ": quota " << r.quota_cores << " cores, cpu_utilization "
            << r.cpu_utilization << ", throttled_fraction " << r.throttled_fraction << "\n";
  EXPECT_DOUBLE_EQ(r.quota_cores, 0.25);
  EXPECT_DOUBLE_EQ(r.sampled_quota, 0.25);
  EXPECT_DOUBLE_EQ(r.sampled_quota_changed, 0.5);
  EXPECT_GT(r.throttled_after, r.throttled_before);
  EXPECT_GT(r.throttled_fraction, 0);
  EXPECT_LE(r.throttled_fraction, 1);
}

}  // namespace
}  // namespace weft::balance
