// The host probe and process monitor of weft/host.h. GPUs are read through
// NVML loaded at run time (dlopen), so that Weft neither builds nor links
// against the CUDA toolkit and runs the same where no GPU is.
#include "weft/host.h"

#include <dlfcn.h>
#include <fmt/format.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <mutex>

#include "balance/host_parse.h"
#include "core/mutex.h"

namespace weft::balance {

namespace hd = host_detail;

namespace {

// ---- NVML, declared here (the ABI of nvml.h) ----------------------------------

using nvmlReturn_t = int;  // an enum in nvml.h; 0 = NVML_SUCCESS
constexpr nvmlReturn_t kNvmlSuccess = 0;
struct nvmlDevice_st;
using nvmlDevice_t = nvmlDevice_st*;
struct nvmlMemory_t {
  unsigned long long total;
  unsigned long long free;
  unsigned long long used;
};
struct nvmlUtilization_t {
  unsigned int gpu;
  unsigned int memory;
};
constexpr unsigned kNvmlNameBuffer = 96;  // NVML_DEVICE_NAME_V2_BUFFER_SIZE
constexpr unsigned kMaxGpus = 1024;       // a bound before allocating per device

struct Nvml {
  std::string note;  // why there are no GPUs; "" when devices were found
  std::vector<std::pair<int, nvmlDevice_t>> devices;  // NVML index, handle
  nvmlReturn_t (*get_name)(nvmlDevice_t, char*, unsigned) = nullptr;
  nvmlReturn_t (*get_memory)(nvmlDevice_t, nvmlMemory_t*) = nullptr;
  nvmlReturn_t (*get_utilization)(nvmlDevice_t, nvmlUtilization_t*) = nullptr;
};

template <typename F>
bool load(void* lib, const char* name, F& fn, std::string& note) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (fn == nullptr) note = fmt::format("libnvidia-ml.so.1 lacks {}", name);
  return fn != nullptr;
}

// Loads and initialises NVML; kept for the life of the process (the library
// stays loaded, NVML initialised), as NVML's own tools do.
void init_nvml(Nvml& n) {
  dlerror();
  void* lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* err = dlerror();
    n.note = fmt::format("NVML not loaded: {}", err ? err : "libnvidia-ml.so.1 not found");
    return;
  }
  nvmlReturn_t (*init)() = nullptr;
  nvmlReturn_t (*shutdown)() = nullptr;
  nvmlReturn_t (*count)(unsigned*) = nullptr;
  nvmlReturn_t (*handle)(unsigned, nvmlDevice_t*) = nullptr;
  if (!load(lib, "nvmlInit_v2", init, n.note) || !load(lib, "nvmlShutdown", shutdown, n.note) ||
      !load(lib, "nvmlDeviceGetCount_v2", count, n.note) ||
      !load(lib, "nvmlDeviceGetHandleByIndex_v2", handle, n.note) ||
      !load(lib, "nvmlDeviceGetName", n.get_name, n.note) ||
      !load(lib, "nvmlDeviceGetMemoryInfo", n.get_memory, n.note) ||
      !load(lib, "nvmlDeviceGetUtilizationRates", n.get_utilization, n.note)) {
    dlclose(lib);
    return;
  }
  // Optional: the text of an error code.
  auto error_string =
      reinterpret_cast<const char* (*)(nvmlReturn_t)>(dlsym(lib, "nvmlErrorString"));
  auto why = [&](nvmlReturn_t rc) -> std::string {
    const char* s = error_string != nullptr ? error_string(rc) : nullptr;
    return s != nullptr ? fmt::format("{} ({})", s, rc) : fmt::format("error {}", rc);
  };
  if (const nvmlReturn_t rc = init(); rc != kNvmlSuccess) {
    n.note = fmt::format("nvmlInit_v2 failed: {}", why(rc));
    dlclose(lib);
    return;
  }
  unsigned devices = 0;
  if (const nvmlReturn_t rc = count(&devices); rc != kNvmlSuccess) {
    n.note = fmt::format("nvmlDeviceGetCount_v2 failed: {}", why(rc));
    shutdown();
    dlclose(lib);
    return;
  }
  if (devices > kMaxGpus) {
    n.note = fmt::format("NVML reports {} GPUs, more than the {} believed", devices, kMaxGpus);
    shutdown();
    dlclose(lib);
    return;
  }
  std::string failed;
  for (unsigned i = 0; i < devices; ++i) {
    nvmlDevice_t d = nullptr;
    if (const nvmlReturn_t rc = handle(i, &d); rc != kNvmlSuccess || d == nullptr) {
      // A GPU NVML cannot open (no permission, lost): left out, the reason kept.
      failed = fmt::format("GPU {}: nvmlDeviceGetHandleByIndex_v2 failed: {}", i, why(rc));
      continue;
    }
    n.devices.emplace_back(static_cast<int>(i), d);
  }
  if (n.devices.empty()) {
    n.note = devices == 0 ? "NVML sees no GPU" : failed;
    shutdown();
    dlclose(lib);
  } else {
    n.note = failed;  // about a GPU left out, if any
  }
}

Nvml& nvml() {
  static std::once_flag once;
  static Nvml n;
  std::call_once(once, [] { init_nvml(n); });
  return n;
}

double utilization_of(const Nvml& n, nvmlDevice_t d) {
  nvmlUtilization_t u{};
  if (n.get_utilization(d, &u) != kNvmlSuccess || u.gpu > 100) return -1;
  return u.gpu / 100.0;
}

// ---- The cgroup paths of this process, resolved once --------------------------

struct CgroupCache {
  Mutex mu;
  pid_t pid GUARDED_BY(mu) =
      -1;  // the process they were resolved for (a forked child resolves anew)
  hd::CgroupPaths paths GUARDED_BY(mu);
};

CgroupCache& cgroup_cache() {
  static CgroupCache c;
  return c;
}

// Resolves the paths when this process has none yet. Needs c.mu held.
void ensure_resolved(CgroupCache& c) REQUIRES(c.mu) {
  const pid_t pid = getpid();
  if (c.pid == pid) return;
  const auto cg = hd::read_text("/proc/self/cgroup", 64 << 10);
  const auto mi = hd::read_text("/proc/self/mountinfo", 4 << 20);
  c.paths = cg && mi ? hd::resolve_cgroups(*cg, *mi) : hd::CgroupPaths{};
  hd::resolve_cpu_stat(c.paths);
  c.pid = pid;
}

int usable_cpus() {
  const long online = sysconf(_SC_NPROCESSORS_CONF);
  for (int n = static_cast<int>(std::max(1024L, online > 0 ? online * 2 : 0)); n <= (1 << 20);
       n *= 2) {
    cpu_set_t* set = CPU_ALLOC(n);
    if (set == nullptr) return 0;
    const size_t size = CPU_ALLOC_SIZE(n);
    CPU_ZERO_S(size, set);
    if (sched_getaffinity(0, size, set) == 0) {
      const int count = CPU_COUNT_S(size, set);
      CPU_FREE(set);
      return count;
    }
    const int err = errno;
    CPU_FREE(set);
    if (err != EINVAL) return 0;  // EINVAL: the mask is smaller than the kernel's
  }
  return 0;
}

std::string gib(uint64_t bytes) {
  return fmt::format("{:.1f} GiB", static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0));
}

}  // namespace

double HostFacts::cpu_capacity() const {
  double cpus = cpus_usable > 0 ? cpus_usable : (cpus_online > 0 ? cpus_online : 1);
  if (cpu_quota_cores > 0) cpus = std::min(cpus, cpu_quota_cores);
  return cpus;
}

std::string HostFacts::describe() const {
  std::string s = fmt::format("{}: {} x {}", hostname.empty() ? "?" : hostname, cpus_usable,
                              cpu_model.empty() ? "unknown" : cpu_model);
  if (cpus_online != cpus_usable) s += fmt::format(" (of {} online)", cpus_online);
  s += cpu_quota_cores > 0 ? fmt::format(", quota {:.2f} cores", cpu_quota_cores) : ", no quota";
  s += fmt::format(", {} ({} available, limit {})",
                   memory_total_bytes > 0 ? gib(memory_total_bytes) : "? GiB",
                   memory_available_bytes > 0 ? gib(memory_available_bytes) : "?",
                   memory_limit_bytes > 0 ? gib(memory_limit_bytes) : "-");
  if (gpus.empty()) {
    s += gpu_note.empty() ? ", no GPU" : fmt::format(", no GPU ({})", gpu_note);
    return s;
  }
  s += fmt::format(", {} GPU{}:", gpus.size(), gpus.size() == 1 ? "" : "s");
  for (const auto& g : gpus) {
    s += fmt::format(" [{}] {} {} ({} used, util {})", g.index, g.name, gib(g.memory_total_bytes),
                     gib(g.memory_used_bytes),
                     g.utilization >= 0 ? fmt::format("{:.0f}%", g.utilization * 100) : "?");
  }
  if (!gpu_note.empty()) s += fmt::format(" ({})", gpu_note);
  return s;
}

HostFacts probe_host() {
  HostFacts f;
  char host[HOST_NAME_MAX + 2] = {};
  if (gethostname(host, sizeof host - 1) == 0) f.hostname = host;

  const auto files = hd::read_file_facts(hd::ProcFiles{});
  f.cpu_model = files.cpu_model.empty() ? "unknown" : files.cpu_model;
  f.memory_total_bytes = files.memory.total_bytes;
  f.memory_available_bytes = files.memory.available_bytes;
  f.cpu_quota_cores = files.cpu_quota_cores;
  f.memory_limit_bytes = files.memory_limit_bytes;
  {
    // What sample_process() reads from now on: resolved afresh here, as
    // the process may have moved to another group since.
    auto& c = cgroup_cache();
    MutexLock lock(&c.mu);
    c.paths = files.cgroups;
    c.pid = getpid();
  }

  const long online = sysconf(_SC_NPROCESSORS_ONLN);
  f.cpus_online = online > 0 && online <= INT_MAX ? static_cast<int>(online) : 0;
  f.cpus_usable = usable_cpus();

  const Nvml& n = nvml();
  f.gpu_note = n.note;
  for (const auto& [index, d] : n.devices) {
    GpuFacts g;
    g.index = index;
    char name[kNvmlNameBuffer] = {};
    if (n.get_name(d, name, sizeof name) == kNvmlSuccess) {
      name[sizeof name - 1] = '\0';
      g.name = name;
    }
    nvmlMemory_t mem{};
    if (n.get_memory(d, &mem) == kNvmlSuccess && mem.used <= mem.total) {
      g.memory_total_bytes = mem.total;
      g.memory_used_bytes = mem.used;
    }
    g.utilization = utilization_of(n, d);
    f.gpus.push_back(std::move(g));
  }
  return f;
}

ProcessSample sample_process() {
  ProcessSample s;
  s.wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  timespec ts{};
  if (clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts) == 0) {
    s.cpu_seconds = static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
  }
  static const long page = sysconf(_SC_PAGESIZE);
  char buf[256];
  if (const long len = hd::read_small("/proc/self/statm", buf, sizeof buf); len > 0 && page > 0) {
    if (auto pages =
            hd::parse_statm_resident_pages(std::string_view(buf, static_cast<size_t>(len)));
        pages && *pages <= UINT64_MAX / static_cast<uint64_t>(page)) {
      s.rss_bytes = *pages * static_cast<uint64_t>(page);
    }
  }
  {
    auto& c = cgroup_cache();
    MutexLock lock(&c.mu);
    ensure_resolved(c);
    s.throttled_ns = hd::read_throttled_ns(c.paths);
    s.memory_limit_bytes = hd::read_memory_limit(c.paths);
    s.cpu_quota_cores = hd::read_cpu_quota(c.paths);
  }
  const Nvml& n = nvml();
  if (!n.devices.empty()) {
    s.gpu_utilization.reserve(n.devices.size());
    for (const auto& dev : n.devices) s.gpu_utilization.push_back(utilization_of(n, dev.second));
  }
  return s;
}

Usage usage_between(const ProcessSample& earlier, const ProcessSample& later) {
  Usage u;
  u.rss_bytes = later.rss_bytes;
  u.cpu_quota_cores = later.cpu_quota_cores;
  if (later.memory_limit_bytes > 0) {
    u.memory_pressure =
        static_cast<double>(later.rss_bytes) / static_cast<double>(later.memory_limit_bytes);
  }
  double gpu_sum = 0;
  int gpu_n = 0;
  for (double g : later.gpu_utilization) {
    if (std::isfinite(g) && g >= 0) {
      gpu_sum += g;
      ++gpu_n;
    }
  }
  if (gpu_n > 0) u.gpu_utilization = gpu_sum / gpu_n;

  const double wall = later.wall_seconds - earlier.wall_seconds;
  if (!std::isfinite(wall) || wall <= 0) return u;  // no time between them: no rates
  u.seconds = wall;
  const double cpu = later.cpu_seconds - earlier.cpu_seconds;
  if (std::isfinite(cpu) && cpu > 0) {
    u.cpu_seconds = cpu;
    u.cpu_utilization = cpu / wall;
  }
  // A counter that went back (the process changed group) gives no figure.
  if (later.throttled_ns > earlier.throttled_ns) {
    const double t = static_cast<double>(later.throttled_ns - earlier.throttled_ns) * 1e-9;
    u.throttled_fraction = std::clamp(t / wall, 0.0, 1.0);
  }
  return u;
}

}  // namespace weft::balance
