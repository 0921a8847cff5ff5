// What a worker runs on, and what it uses: the hardware facts of its host
// (CPUs, CPU model, memory, the cgroup limits of this process, GPUs through
// NVML) and samples of the process's own use (CPU time, resident memory,
// cgroup throttling), from which the load balancer (weft/balance.h) derives
// each worker's utilisation. Linux only; every figure that cannot be read is
// left at its "unknown" value and the reason kept, never an exception.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace weft::balance {

struct GpuFacts {
  int index = 0;
  std::string name;  // "NVIDIA H100 80GB HBM3"
  uint64_t memory_total_bytes = 0;
  uint64_t memory_used_bytes = 0;
  double utilization = -1;  // 0..1 over NVML's last sample period, -1 unknown
};

struct HostFacts {
  std::string hostname;
  std::string cpu_model;                // /proc/cpuinfo "model name", "unknown" if absent
  int cpus_online = 0;                  // CPUs online on the host
  int cpus_usable = 0;                  // CPUs this process may run on (affinity mask)
  double cpu_quota_cores = 0;           // cgroup CPU quota of this process in cores, 0: no quota
  uint64_t memory_total_bytes = 0;      // MemTotal
  uint64_t memory_available_bytes = 0;  // MemAvailable when probed
  uint64_t memory_limit_bytes = 0;      // cgroup memory limit of this process, 0: no limit
  std::vector<GpuFacts> gpus;           // through NVML; empty where none is seen
  // Why there are no GPUs ("NVML not loaded: libnvidia-ml.so.1: cannot open shared object
  // file..."), or, beside GPUs, why a GPU that NVML lists was left out; "" otherwise.
  std::string gpu_note;

  // CPUs this process can use: cpus_usable, lowered to the quota if any.
  double cpu_capacity() const;
  // One line for logs: "host-a: 2 x AMD EPYC, quota 0.25 cores, 23.4 GiB (limit -), no GPU".
  std::string describe() const;
};

// Reads the facts of this host and process now.
HostFacts probe_host();

// The process's use at one instant (sample_process()); two samples give the
// use over the time between them (usage_between()).
struct ProcessSample {
  double wall_seconds = 0;  // steady clock
  double cpu_seconds = 0;   // user + system time of every thread of this process
  uint64_t rss_bytes = 0;   // resident set size now
  // Cgroup CPU throttled time, total, of the group whose quota binds this
  // process (the smallest quota from its own group up; its own group where
  // none has one). The group is resolved on the first sample and again by
  // every probe_host() (a process moved to another group is seen there).
  uint64_t throttled_ns = 0;
  uint64_t memory_limit_bytes = 0;  // cgroup memory limit now, 0: none
  // The cgroup CPU quota now, in cores (the smallest from the process's own
  // group up), 0: none. Read at every sample: a quota can change while the
  // job runs.
  double cpu_quota_cores = 0;
  std::vector<double> gpu_utilization;  // per GPU, 0..1 (NVML), empty where none
};
ProcessSample sample_process();

struct Usage {
  double seconds = 0;             // wall time between the samples
  double cpu_seconds = 0;         // CPU time the process used between the samples
  double cpu_utilization = 0;     // CPU seconds / wall seconds (1 = one core busy)
  double cpu_quota_cores = 0;     // the quota at the later sample, 0: none
  uint64_t rss_bytes = 0;         // at the later sample
  double throttled_fraction = 0;  // throttled time / wall time, 0..1
  // rss / cgroup memory limit at the later sample, 0 where there is no limit.
  double memory_pressure = 0;
  double gpu_utilization = -1;  // mean over GPUs at the later sample, -1 where none
};
// The use between two samples, `later` taken after `earlier`.
Usage usage_between(const ProcessSample& earlier, const ProcessSample& later);

}  // namespace weft::balance
