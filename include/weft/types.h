// Element types, reduction operators, devices and buffer views.
//
// A Buffer is a non-owning view: a pointer, an element count, an element
// type (DType) and the device the memory lives on. Weft never frees or
// reallocates the memory behind a view. While an asynchronous operation that
// was given a buffer is in flight, the buffer belongs to Weft: the caller
// must neither read nor write it (nor free it) until the operation's Work
// handle reports completion (Work::wait returned or Work::test is true).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace weft {

// 16-bit IEEE 754 half precision, stored as raw bits. Reductions accumulate
// it in float32.
struct Half {
  uint16_t bits = 0;
};

// bfloat16 (the upper 16 bits of a float32), stored as raw bits. Reductions
// accumulate it in float32.
struct BFloat16 {
  uint16_t bits = 0;
};

// Element type of a buffer. The numeric values are part of the wire protocol
// (they appear in operation descriptors): never renumber them.
enum class DType : uint8_t {
  Float32 = 0,
  Float64 = 1,
  Float16 = 2,
  BFloat16 = 3,
  Int32 = 4,
  Int64 = 5,
  UInt8 = 6,
};
inline constexpr int kNumDTypes = 7;

// Size in bytes of one element.
constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::Float32: return 4;
    case DType::Float64: return 8;
    case DType::Float16: return 2;
    case DType::BFloat16: return 2;
    case DType::Int32: return 4;
    case DType::Int64: return 8;
    case DType::UInt8: return 1;
  }
  return 0;
}

// "float32", "bfloat16", ... ("dtype(N)" for a value out of range).
std::string dtype_name(DType t);

constexpr bool dtype_is_floating(DType t) {
  return t == DType::Float32 || t == DType::Float64 || t == DType::Float16 || t == DType::BFloat16;
}

// DType of a C++ element type, for the typed Buffer constructors.
template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::Float32;
};
template <>
struct DTypeOf<double> {
  static constexpr DType value = DType::Float64;
};
template <>
struct DTypeOf<Half> {
  static constexpr DType value = DType::Float16;
};
template <>
struct DTypeOf<BFloat16> {
  static constexpr DType value = DType::BFloat16;
};
template <>
struct DTypeOf<int32_t> {
  static constexpr DType value = DType::Int32;
};
template <>
struct DTypeOf<int64_t> {
  static constexpr DType value = DType::Int64;
};
template <>
struct DTypeOf<uint8_t> {
  static constexpr DType value = DType::UInt8;
};
template <typename T>
inline constexpr DType dtype_of = DTypeOf<std::remove_cv_t<T>>::value;

// Reduction operator. Avg is Sum divided by the number of ranks and is only
// valid for floating-point types (InvalidArgument otherwise). The numeric
// values are part of the wire protocol.
enum class ReduceOp : uint8_t {
  Sum = 0,
  Avg = 1,
  Min = 2,
  Max = 3,
  Prod = 4,
};
inline constexpr int kNumReduceOps = 5;

// "sum", "avg", ...
std::string reduce_op_name(ReduceOp op);

// The collectives, numbered as in the wire protocol's operation descriptors.
enum class Collective : uint8_t {
  Barrier = 1,
  Broadcast = 2,
  Allreduce = 3,
  Reduce = 4,
  Allgather = 5,
  Allgatherv = 6,
  ReduceScatter = 7,
  Gather = 8,
  Scatter = 9,
  Alltoall = 10,
  Alltoallv = 11,
};
const char* collective_name(Collective c);

// Algorithms a collective can run with. Auto lets the cost model choose
// (latency + bytes / bandwidth per step, for the message size and the
// number of ranks); WEFT_<COLLECTIVE>_ALGO (e.g. WEFT_ALLREDUCE_ALGO=ring)
// overrides Auto for a whole job. Every rank of a call must use the same
// algorithm: a rank that chose another fails the call with MismatchError.
enum class Algorithm : uint8_t {
  Auto = 0,
  Ring = 1,               // pipelined ring: bandwidth-optimal for large messages
  HalvingDoubling = 2,    // recursive halving + doubling (Rabenseifner): mid sizes
  RecursiveDoubling = 3,  // log2(n) exchanges of the whole message: small messages
  Tree = 4,               // binomial tree (broadcast, reduce, gather, scatter)
  Pairwise = 5,           // n-1 pairwise exchanges (alltoall)
  Dissemination = 6,      // log2(n) rounds of empty messages (barrier)
  Linear = 7,             // the root exchanges with every rank directly (gather, scatter)
  // Topology-aware (allreduce, broadcast, allgather, allgatherv): the ranks
  // of each host first combine their data among themselves, the hosts then
  // exchange it in k parallel "lanes" (local rank j of every host forms lane
  // j, k = the fewest ranks any host has), and each host finally spreads the
  // result locally. Auto picks it when the ranks span several hosts with the
  // same number (> 1) of ranks each and the cost model favours it; forced on
  // uneven hosts it still works (k = 1 is the leader-based scheme), and on a
  // single host it is a direct intra-host algorithm.
  Hierarchical = 8,
};
const char* algorithm_name(Algorithm a);
// "ring", "hd", "rd", "tree"... (also accepted: the names of algorithm_name);
// throws InvalidArgument for an unknown name.
Algorithm parse_algorithm(const std::string& name);

enum class DeviceType : uint8_t {
  CPU = 0,
  CUDA = 1,  // reserved: no CUDA transport yet
};

// Where a buffer's memory lives. For CUDA, index is the device ordinal and
// stream the cudaStream_t the data is ordered on (reserved for the CUDA
// transport; CPU buffers ignore both).
struct Device {
  DeviceType type = DeviceType::CPU;
  int index = -1;
  void* stream = nullptr;

  static Device cpu() { return Device{}; }
  bool is_cpu() const { return type == DeviceType::CPU; }
};

// A read-only view of elements: the input side of an operation.
class ConstBuffer {
 public:
  ConstBuffer() = default;
  ConstBuffer(const void* data, size_t count, DType dtype, Device device = Device::cpu())
      : data_(data), count_(count), dtype_(dtype), device_(device) {}
  template <typename T>
  ConstBuffer(std::span<const T> s)  // NOLINT(google-explicit-constructor)
      : ConstBuffer(s.data(), s.size(), dtype_of<T>) {}
  template <typename T>
  ConstBuffer(std::span<T> s)  // NOLINT(google-explicit-constructor)
      : ConstBuffer(s.data(), s.size(), dtype_of<T>) {}
  template <typename T, typename A>
  ConstBuffer(const std::vector<T, A>& v)  // NOLINT(google-explicit-constructor)
      : ConstBuffer(v.data(), v.size(), dtype_of<T>) {}

  const void* data() const { return data_; }
  size_t count() const { return count_; }
  DType dtype() const { return dtype_; }
  const Device& device() const { return device_; }
  size_t bytes() const { return count_ * dtype_size(dtype_); }
  // Elements [offset, offset + n) as a view of the same dtype and device.
  ConstBuffer slice(size_t offset, size_t n) const {
    return ConstBuffer(static_cast<const char*>(data_) + offset * dtype_size(dtype_), n, dtype_,
                       device_);
  }

 private:
  const void* data_ = nullptr;
  size_t count_ = 0;
  DType dtype_ = DType::Float32;
  Device device_;
};

// A writable view of elements: the output (or in-place) side of an operation.
class Buffer {
 public:
  Buffer() = default;
  Buffer(void* data, size_t count, DType dtype, Device device = Device::cpu())
      : data_(data), count_(count), dtype_(dtype), device_(device) {}
  template <typename T>
  requires(!std::is_const_v<T>) Buffer(std::span<T> s)  // NOLINT(google-explicit-constructor)
      : Buffer(s.data(), s.size(), dtype_of<T>) {}
  template <typename T, typename A>
  Buffer(std::vector<T, A>& v)  // NOLINT(google-explicit-constructor)
      : Buffer(v.data(), v.size(), dtype_of<T>) {}

  void* data() const { return data_; }
  size_t count() const { return count_; }
  DType dtype() const { return dtype_; }
  const Device& device() const { return device_; }
  size_t bytes() const { return count_ * dtype_size(dtype_); }
  Buffer slice(size_t offset, size_t n) const {
    return Buffer(static_cast<char*>(data_) + offset * dtype_size(dtype_), n, dtype_, device_);
  }
  operator ConstBuffer() const {  // NOLINT(google-explicit-constructor)
    return ConstBuffer(data_, count_, dtype_, device_);
  }

 private:
  void* data_ = nullptr;
  size_t count_ = 0;
  DType dtype_ = DType::Float32;
  Device device_;
};

// Conversions between float32 and the 16-bit types (round to nearest even).
float half_to_float(Half h);
Half float_to_half(float f);
inline float bfloat16_to_float(BFloat16 b) {
  uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline BFloat16 float_to_bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}

}  // namespace weft
