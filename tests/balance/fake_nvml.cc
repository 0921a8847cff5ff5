// A stand-in libnvidia-ml.so.1 for host_test, so that the NVML path of
// weft/host.h (dlopen, the symbols, the figures, the failures) runs where no
// GPU is. Two GPUs: GPU 0 at 37 % utilisation, GPU 1 unable to report it
// (NVML_ERROR_NOT_SUPPORTED, as MIG instances do). FAKE_NVML_INIT_FAIL=1 in
// the environment makes nvmlInit_v2 fail with NVML_ERROR_DRIVER_NOT_LOADED.
#include <cstdlib>
#include <cstring>

namespace {

struct Device {
  int index;
};
Device devices[2] = {{0}, {1}};
bool initialised = false;

constexpr int kSuccess = 0;
constexpr int kInvalidArgument = 2;
constexpr int kNotSupported = 3;
constexpr int kUninitialized = 1;
constexpr int kInsufficientSize = 7;
constexpr int kDriverNotLoaded = 9;

struct Memory {
  unsigned long long total, free, used;
};
struct Utilization {
  unsigned int gpu, memory;
};

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int nvmlInit_v2() {
  const char* fail = std::getenv("FAKE_NVML_INIT_FAIL");
  if (fail != nullptr && std::strcmp(fail, "1") == 0) return kDriverNotLoaded;
  initialised = true;
  return kSuccess;
}

__attribute__((visibility("default"))) int nvmlShutdown() {
  initialised = false;
  return kSuccess;
}

__attribute__((visibility("default"))) const char* nvmlErrorString(int rc) {
  switch (rc) {
    case kSuccess: return "Success";
    case kDriverNotLoaded: return "Driver Not Loaded";
    case kNotSupported: return "Not Supported";
    default: return "Unknown Error";
  }
}

__attribute__((visibility("default"))) int nvmlDeviceGetCount_v2(unsigned int* count) {
  if (!initialised) return kUninitialized;
  if (count == nullptr) return kInvalidArgument;
  *count = 2;
  return kSuccess;
}

__attribute__((visibility("default"))) int nvmlDeviceGetHandleByIndex_v2(unsigned int i,
                                                                         void** device) {
  if (!initialised) return kUninitialized;
  if (i >= 2 || device == nullptr) return kInvalidArgument;
  *device = &devices[i];
  return kSuccess;
}

__attribute__((visibility("default"))) int nvmlDeviceGetName(void* device, char* name,
                                                             unsigned int length) {
  if (!initialised) return kUninitialized;
  if (device == nullptr || name == nullptr) return kInvalidArgument;
  const char* n = static_cast<Device*>(device)->index == 0 ? "Fake GPU A" : "Fake GPU B";
  if (length < std::strlen(n) + 1) return kInsufficientSize;
  std::strcpy(name, n);
  return kSuccess;
}

__attribute__((visibility("default"))) int nvmlDeviceGetMemoryInfo(void* device, void* memory) {
  if (!initialised) return kUninitialized;
  if (device == nullptr || memory == nullptr) return kInvalidArgument;
  Memory* m = static_cast<Memory*>(memory);
  m->total = 80ULL << 30;
  m->used = static_cast<unsigned long long>(static_cast<Device*>(device)->index + 1) << 30;
  m->free = m->total - m->used;
  return kSuccess;
}

__attribute__((visibility("default"))) int nvmlDeviceGetUtilizationRates(void* device,
                                                                         void* utilization) {
  if (!initialised) return kUninitialized;
  if (device == nullptr || utilization == nullptr) return kInvalidArgument;
  if (static_cast<Device*>(device)->index == 1) return kNotSupported;
  Utilization* u = static_cast<Utilization*>(utilization);
  u->gpu = 37;
  u->memory = 12;
  return kSuccess;
}

}  // extern "C"
