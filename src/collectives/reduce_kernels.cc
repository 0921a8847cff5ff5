// Reduction kernels (see reduce_kernels.h for the semantics).
//
// How the code is organized
// -------------------------
// Every kernel is one loop over vectors of W lanes written once, with GCC
// vector extensions (Vec<T, W>), and instantiated three times: for the
// Generic tier (16-byte vectors, the build's baseline ISA), the Avx2 tier
// (32 bytes) and the Avx512 tier (64 bytes). A tier is a struct whose kernel
// entry points carry __attribute__((target(...), flatten)): `flatten` inlines
// the whole call tree (loads, operator, stores) into the entry point, so the
// generic helpers below are compiled with the entry point's ISA. The loops
// are vectorized by construction (no reliance on the auto-vectorizer or on
// its alias analysis): each iteration loads whole vectors of both inputs
// before storing the output, which also makes dst == a / dst == b safe.
// The last n % W elements go through the same vector code on a zero-padded
// copy on the stack.
//
// Storage formats (Flt<float>, F16Soft, F16C256, Bf16, Plain<int32_t>...)
// turn W stored elements into a compute vector (float32 for the 16-bit
// types) and back. Stores of floating-point formats canonicalize NaN, so
// every NaN written is the canonical one whatever produced it.
//
// The helpers take and return vectors wider than the baseline ABI allows
// (hence -Wno-psabi on this file): that is only sound because they are
// always inlined into an entry point of the right ISA, which needs the
// optimizer (flatten does nothing at -O0): hence the #error below.
#include "collectives/reduce_kernels.h"

#include <atomic>
#include <bit>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "core/log.h"
#include "core/settings.h"
#include "weft/errors.h"

// src/collectives/CMakeLists.txt adds -O3 to this file, Debug builds included.
#if !defined(__OPTIMIZE__)
#error "reduce_kernels.cc must be compiled with optimization"
#endif

// WEFT_RK_GENERIC_ONLY leaves the x86 kernels out: the clang build of `make
// ci-thread-safety` sets it, as Debian's clang 14 cannot compile them (GCC
// vector returns under target attributes) and they hold no locks to check.
#if defined(__x86_64__) && !defined(WEFT_RK_GENERIC_ONLY)
#include <immintrin.h>
#define WEFT_RK_X86 1
#else
#define WEFT_RK_X86 0
#endif

namespace weft::coll {
namespace {

// ---------------------------------------------------------------------------
// Vectors

template <class T, int N>
struct VecOf {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};
// N lanes of T.
template <class T, int N>
using Vec = typename VecOf<T, N>::type;

template <class V>
using Lane = std::remove_cvref_t<decltype(std::declval<V>()[0])>;
template <class V>
inline constexpr int kLanes = static_cast<int>(sizeof(V) / sizeof(Lane<V>));

// The same bits as another vector type of the same size.
template <class To, class From>
inline To as(From v) {
  static_assert(sizeof(To) == sizeof(From));
  return std::bit_cast<To>(v);
}

template <class V>
inline V splat(Lane<V> x) {
  V v;
  for (int i = 0; i < kLanes<V>; ++i) v[i] = x;
  return v;
}

template <class V>
inline V load_vec(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class V>
inline void store_vec(void* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// Integer types of the width of a float lane.
template <class F>
struct BitsOf;
template <>
struct BitsOf<float> {
  using S = int32_t;
  using U = uint32_t;
  static constexpr U kCanonicalNaN = 0x7fc00000u;
};
template <>
struct BitsOf<double> {
  using S = int64_t;
  using U = uint64_t;
  static constexpr U kCanonicalNaN = 0x7ff8000000000000u;
};

// v with every NaN lane replaced by the canonical quiet NaN.
template <class V>
inline V canonicalize(V v) {
  using F = Lane<V>;
  using S = Vec<typename BitsOf<F>::S, kLanes<V>>;
  const V nan = as<V>(splat<S>(static_cast<typename BitsOf<F>::S>(BitsOf<F>::kCanonicalNaN)));
  return v == v ? v : nan;
}

// ---------------------------------------------------------------------------
// Storage formats. Each has Storage (the element in memory), Compute (the
// lane type operators work on), load<W>(p) and store<W>(p, v).

// float32 / float64: stored as computed, NaN canonicalized on store.
template <class F>
struct Flt {
  using Storage = F;
  using Compute = F;
  template <int W>
  static Vec<F, W> load(const F* p) {
    return load_vec<Vec<F, W>>(p);
  }
  template <int W>
  static void store(F* p, Vec<F, W> v) {
    store_vec(p, canonicalize(v));
  }
};

// Integers: plain copies.
template <class T>
struct Plain {
  using Storage = T;
  using Compute = T;
  template <int W>
  static Vec<T, W> load(const T* p) {
    return load_vec<Vec<T, W>>(p);
  }
  template <int W>
  static void store(T* p, Vec<T, W> v) {
    store_vec(p, v);
  }
};

// float32 bits (not a NaN) rounded to nearest even to bfloat16, in the low
// 16 bits of each lane (the canonical NaN 0x7FC00000 gives 0x7FC0).
template <class U>
inline U bf16_round(U u) {
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// bfloat16 <-> float32 with integer shifts; to bfloat16: round to nearest
// even, NaN -> 0x7FC0 (same as weft::float_to_bfloat16 for non-NaN values).
struct Bf16 {
  using Storage = uint16_t;
  using Compute = float;
  template <int W>
  static Vec<float, W> load(const uint16_t* p) {
    using U = Vec<uint32_t, W>;
    const U u = __builtin_convertvector(load_vec<Vec<uint16_t, W>>(p), U);
    return as<Vec<float, W>>(u << 16);
  }
  template <int W>
  static void store(uint16_t* p, Vec<float, W> v) {
    const auto r = bf16_round(as<Vec<uint32_t, W>>(canonicalize(v)));
    store_vec(p, __builtin_convertvector(r, Vec<uint16_t, W>));
  }
};

// float16 <-> float32 in portable integer/float vector code (the Generic
// tier, which cannot assume F16C). Bit-exact with weft::half_to_float /
// weft::float_to_half (round to nearest even), except that NaN becomes the
// canonical NaN. Independent of FTZ/DAZ: the only float operations work on
// normal numbers (or produce a float16 zero from a float32 subnormal either
// way).
struct F16Soft {
  using Storage = uint16_t;
  using Compute = float;
  template <int W>
  static Vec<float, W> load(const uint16_t* p) {
    using U = Vec<uint32_t, W>;
    using S = Vec<int32_t, W>;
    using F = Vec<float, W>;
    const U h = __builtin_convertvector(load_vec<Vec<uint16_t, W>>(p), U);
    const U sign = (h & 0x8000u) << 16;
    const U em = h & 0x7fffu;  // exponent and mantissa
    const S exp = as<S>(h & 0x7c00u);
    const U normal = (em << 13) + 0x38000000u;  // rebias 15 -> 127
    const U inf_nan = (em << 13) | 0x7f800000u;
    // Zero or subnormal: mantissa * 2^-24, exact.
    const U sub = as<U>(__builtin_convertvector(as<S>(em), F) * 0x1p-24f);
    const S r = exp == 0 ? as<S>(sub) : (exp == 0x7c00 ? as<S>(inf_nan) : as<S>(normal));
    return as<F>(as<U>(r) | sign);
  }
  template <int W>
  static void store(uint16_t* p, Vec<float, W> v) {
    using U = Vec<uint32_t, W>;
    using S = Vec<int32_t, W>;
    using F = Vec<float, W>;
    const U u = as<U>(v);
    const U sign = (u >> 16) & 0x8000u;
    const U abs_u = u & 0x7fffffffu;
    const S abs = as<S>(abs_u);
    // Normal float16 result: rebias 127 -> 15 and round the 13 dropped bits.
    U normal = abs_u - 0x38000000u;
    normal = (normal + 0xfffu + ((normal >> 13) & 1u)) >> 13;
    // Subnormal (or zero) float16 result: adding 0.5 leaves the float16
    // subnormal step (2^-24) as the float's last place, so the float
    // addition does the rounding to nearest even.
    const U sub = as<U>(as<F>(abs_u) + 0.5f) - 0x3f000000u;
    S r = abs < 0x38800000 ? as<S>(sub) : (abs >= 0x477ff000 ? splat<S>(0x7c00) : as<S>(normal));
    r = as<S>(as<U>(r) | sign);
    r = abs > 0x7f800000 ? splat<S>(0x7e00) : r;
    store_vec(p, __builtin_convertvector(as<U>(r), Vec<uint16_t, W>));
  }
};

#if WEFT_RK_X86
#define WEFT_RK_TARGET_AVX2 "avx2,f16c"
#define WEFT_RK_TARGET_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c"

// float16 <-> float32 with F16C, 8 lanes (vcvtph2ps / vcvtps2ph on ymm).
struct F16C256 {
  using Storage = uint16_t;
  using Compute = float;
  template <int W>
  __attribute__((target("avx,f16c"))) static Vec<float, W> load(const uint16_t* p) {
    static_assert(W == 8);
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  template <int W>
  __attribute__((target("avx,f16c"))) static void store(uint16_t* p, Vec<float, W> v) {
    static_assert(W == 8);
    const __m128i h = _mm256_cvtps_ph(canonicalize(v), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
};

// float16 <-> float32 with AVX-512F, 16 lanes (vcvtph2ps / vcvtps2ph on zmm).
struct F16C512 {
  using Storage = uint16_t;
  using Compute = float;
  template <int W>
  __attribute__((target("avx512f"))) static Vec<float, W> load(const uint16_t* p) {
    static_assert(W == 16);
    // The maskz forms with a full mask are the plain instructions; the unmasked
    // intrinsics trip -Wmaybe-uninitialized in GCC 12's headers.
    return _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  template <int W>
  __attribute__((target("avx512f"))) static void store(uint16_t* p, Vec<float, W> v) {
    static_assert(W == 16);
    const __m256i h = _mm512_maskz_cvtps_ph(0xffff, canonicalize(v), _MM_FROUND_TO_NEAREST_INT);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  }
};

// bfloat16 with AVX2 / AVX-512 integer instructions: the same arithmetic as
// Bf16 (one vpmovzxwd per load, NaN canonicalized in float32 first so that
// the rounding maps it to 0x7FC0), written with intrinsics because GCC
// widens and narrows 16-bit vectors poorly on these ISAs.
struct Bf16Avx2 {
  using Storage = uint16_t;
  using Compute = float;
  template <int W>
  __attribute__((target("avx2"))) static Vec<float, W> load(const uint16_t* p) {
    static_assert(W == 8);
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
  template <int W>
  __attribute__((target("avx2"))) static void store(uint16_t* p, Vec<float, W> v) {
    static_assert(W == 8);
    const __m256i r = as<__m256i>(bf16_round(as<Vec<uint32_t, 8>>(canonicalize(v))));
    // Every lane is <= 0xffff, so the saturating pack is a plain narrowing.
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
};

struct Bf16Avx512 {
  using Storage = uint16_t;
  using Compute = float;
  template <int W>
  __attribute__((target("avx512f"))) static Vec<float, W> load(const uint16_t* p) {
    static_assert(W == 16);
    // maskz forms with a full mask: see F16C512.
    const __m512i u = _mm512_maskz_cvtepu16_epi32(
        0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return as<Vec<float, W>>(as<Vec<uint32_t, W>>(u) << 16);
  }
  template <int W>
  __attribute__((target("avx512f"))) static void store(uint16_t* p, Vec<float, W> v) {
    static_assert(W == 16);
    const __m512i r = as<__m512i>(bf16_round(as<Vec<uint32_t, 16>>(canonicalize(v))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_maskz_cvtepi32_epi16(0xffff, r));
  }
};
#endif

// ---------------------------------------------------------------------------
// Operators on compute vectors.

struct OpSum {
  template <class V>
  static V apply(V a, V b) {
    using L = Lane<V>;
    if constexpr (std::is_integral_v<L>) {
      using U = Vec<std::make_unsigned_t<L>, kLanes<V>>;  // wraps, no UB
      return as<V>(as<U>(a) + as<U>(b));
    } else {
      return a + b;
    }
  }
};

struct OpProd {
  template <class V>
  static V apply(V a, V b) {
    using L = Lane<V>;
    if constexpr (std::is_integral_v<L>) {
      using U = Vec<std::make_unsigned_t<L>, kLanes<V>>;
      return as<V>(as<U>(a) * as<U>(b));
    } else {
      return a * b;
    }
  }
};

// Min (kMax false) or Max (kMax true). Floats: IEEE 754-2019 minimum /
// maximum. Each float maps to a signed integer key that orders like the
// value with -0 < +0 (negative floats get their magnitude bits flipped).
template <bool kMax>
struct OpMinMax {
  template <class V>
  static V apply(V a, V b) {
    using L = Lane<V>;
    if constexpr (std::is_integral_v<L>) {
      if constexpr (kMax) {
        return a < b ? b : a;
      } else {
        return b < a ? b : a;
      }
    } else {
      using SL = typename BitsOf<L>::S;
      using S = Vec<SL, kLanes<V>>;
      constexpr int kTop = static_cast<int>(sizeof(SL) * 8 - 1);
      const SL magnitude = static_cast<SL>(~(typename BitsOf<L>::U{1} << kTop));
      const S ia = as<S>(a);
      const S ib = as<S>(b);
      const S ka = ia ^ ((ia >> kTop) & magnitude);
      const S kb = ib ^ ((ib >> kTop) & magnitude);
      V r;
      if constexpr (kMax) {
        r = ka < kb ? b : a;
      } else {
        r = kb < ka ? b : a;
      }
      const S unordered = (a != a) | (b != b);
      return unordered ? a + b : r;  // a NaN (canonicalized by the store)
    }
  }
};
using OpMin = OpMinMax<false>;
using OpMax = OpMinMax<true>;

// Unary functions (convert, divide).
struct FnCopy {
  template <class V>
  static V apply(V v, int) {
    return v;
  }
};

struct FnDivide {
  template <class V>
  static V apply(V v, int divisor) {
    return v / splat<V>(static_cast<Lane<V>>(divisor));
  }
};

// ---------------------------------------------------------------------------
// The loops. VB: vector bytes of the tier.

template <int VB, class FD, class FA, class FB, class Op>
inline void binary_loop(void* dst, const void* a, const void* b, size_t n) {
  using C = typename FD::Compute;
  static_assert(std::is_same_v<C, typename FA::Compute> && std::is_same_v<C, typename FB::Compute>);
  constexpr int W = VB / static_cast<int>(sizeof(C));
  using SD = typename FD::Storage;
  using SA = typename FA::Storage;
  using SB = typename FB::Storage;
  auto* d = static_cast<SD*>(dst);
  const auto* pa = static_cast<const SA*>(a);
  const auto* pb = static_cast<const SB*>(b);
  size_t i = 0;
  for (; i + W <= n; i += W) {
    const auto va = FA::template load<W>(pa + i);
    const auto vb = FB::template load<W>(pb + i);
    FD::template store<W>(d + i, Op::apply(va, vb));
  }
  if (i < n) {
    const size_t rest = n - i;
    SA ta[W] = {};
    SB tb[W] = {};
    SD td[W];
    std::memcpy(ta, pa + i, rest * sizeof(SA));
    std::memcpy(tb, pb + i, rest * sizeof(SB));
    FD::template store<W>(td, Op::apply(FA::template load<W>(ta), FB::template load<W>(tb)));
    std::memcpy(d + i, td, rest * sizeof(SD));
  }
}

template <int VB, class FD, class FS, class Fn>
inline void unary_loop(void* dst, const void* src, size_t n, int param) {
  using C = typename FD::Compute;
  static_assert(std::is_same_v<C, typename FS::Compute>);
  constexpr int W = VB / static_cast<int>(sizeof(C));
  using SD = typename FD::Storage;
  using SS = typename FS::Storage;
  auto* d = static_cast<SD*>(dst);
  const auto* s = static_cast<const SS*>(src);
  size_t i = 0;
  for (; i + W <= n; i += W) {
    FD::template store<W>(d + i, Fn::apply(FS::template load<W>(s + i), param));
  }
  if (i < n) {
    const size_t rest = n - i;
    SS ts[W] = {};
    SD td[W];
    std::memcpy(ts, s + i, rest * sizeof(SS));
    FD::template store<W>(td, Fn::apply(FS::template load<W>(ts), param));
    std::memcpy(d + i, td, rest * sizeof(SD));
  }
}

// ---------------------------------------------------------------------------
// Tiers: the entry points, compiled for each ISA.

using BinaryFn = void (*)(void* dst, const void* a, const void* b, size_t n);
using UnaryFn = void (*)(void* dst, const void* src, size_t n, int param);

struct GenericTier {
  using F16 = F16Soft;
  using BF16 = Bf16;
  template <class FD, class FA, class FB, class Op>
  __attribute__((flatten)) static void binary(void* dst, const void* a, const void* b, size_t n) {
    binary_loop<16, FD, FA, FB, Op>(dst, a, b, n);
  }
  template <class FD, class FS, class Fn>
  __attribute__((flatten)) static void unary(void* dst, const void* src, size_t n, int param) {
    unary_loop<16, FD, FS, Fn>(dst, src, n, param);
  }
};

#if WEFT_RK_X86
struct Avx2Tier {
  using F16 = F16C256;
  using BF16 = Bf16Avx2;
  template <class FD, class FA, class FB, class Op>
  __attribute__((target(WEFT_RK_TARGET_AVX2), flatten)) static void binary(void* dst, const void* a,
                                                                           const void* b,
                                                                           size_t n) {
    binary_loop<32, FD, FA, FB, Op>(dst, a, b, n);
  }
  template <class FD, class FS, class Fn>
  __attribute__((target(WEFT_RK_TARGET_AVX2), flatten)) static void unary(void* dst,
                                                                          const void* src, size_t n,
                                                                          int param) {
    unary_loop<32, FD, FS, Fn>(dst, src, n, param);
  }
};

struct Avx512Tier {
  using F16 = F16C512;
  using BF16 = Bf16Avx512;
  template <class FD, class FA, class FB, class Op>
  __attribute__((target(WEFT_RK_TARGET_AVX512), flatten)) static void binary(void* dst,
                                                                             const void* a,
                                                                             const void* b,
                                                                             size_t n) {
    binary_loop<64, FD, FA, FB, Op>(dst, a, b, n);
  }
  template <class FD, class FS, class Fn>
  __attribute__((target(WEFT_RK_TARGET_AVX512), flatten)) static void unary(void* dst,
                                                                            const void* src,
                                                                            size_t n, int param) {
    unary_loop<64, FD, FS, Fn>(dst, src, n, param);
  }
};
#endif

// ---------------------------------------------------------------------------
// Kernel tables, one per tier.

constexpr int kSum = static_cast<int>(ReduceOp::Sum);
constexpr int kAvg = static_cast<int>(ReduceOp::Avg);
constexpr int kMin = static_cast<int>(ReduceOp::Min);
constexpr int kMax = static_cast<int>(ReduceOp::Max);
constexpr int kProd = static_cast<int>(ReduceOp::Prod);

// The 16-bit-capable float formats, in this order, index the convert,
// accumulate and finalize tables.
enum FloatSlot { kSlotF32 = 0, kSlotF16 = 1, kSlotBf16 = 2, kNumFloatSlots = 3 };

struct Table {
  BinaryFn reduce[kNumDTypes][kNumReduceOps] = {};          // null: invalid (Avg on integers)
  BinaryFn accumulate[kNumFloatSlots][kNumReduceOps] = {};  // acc f32 op= src slot
  UnaryFn convert[kNumFloatSlots][kNumFloatSlots] = {};     // [dst slot][src slot]
  UnaryFn divide[kNumDTypes] = {};                          // null: integers
  UnaryFn finalize[kNumFloatSlots] = {};                    // dst slot <- f32 / divisor
};

template <class Tier, class FD, class FA, class FB>
constexpr void fill_ops(BinaryFn* row, bool floating) {
  row[kSum] = &Tier::template binary<FD, FA, FB, OpSum>;
  row[kAvg] = floating ? row[kSum] : nullptr;
  row[kMin] = &Tier::template binary<FD, FA, FB, OpMin>;
  row[kMax] = &Tier::template binary<FD, FA, FB, OpMax>;
  row[kProd] = &Tier::template binary<FD, FA, FB, OpProd>;
}

// kSlot: the float slot of F, or -1 (float64).
template <class Tier, class F, int kSlot>
constexpr void fill_float(Table& t, DType dtype) {
  fill_ops<Tier, F, F, F>(t.reduce[static_cast<int>(dtype)], true);
  t.divide[static_cast<int>(dtype)] = &Tier::template unary<F, F, FnDivide>;
  if constexpr (kSlot >= 0) {
    fill_ops<Tier, Flt<float>, Flt<float>, F>(t.accumulate[kSlot], true);
    t.finalize[kSlot] = &Tier::template unary<F, Flt<float>, FnDivide>;
  }
}

template <class Tier, class FD, class FS>
constexpr void fill_convert(Table& t, int dst_slot, int src_slot) {
  t.convert[dst_slot][src_slot] = &Tier::template unary<FD, FS, FnCopy>;
}

template <class Tier>
constexpr Table make_table() {
  using F16 = typename Tier::F16;
  using BF16 = typename Tier::BF16;
  Table t;
  fill_float<Tier, Flt<float>, kSlotF32>(t, DType::Float32);
  fill_float<Tier, Flt<double>, -1>(t, DType::Float64);
  fill_float<Tier, F16, kSlotF16>(t, DType::Float16);
  fill_float<Tier, BF16, kSlotBf16>(t, DType::BFloat16);
  fill_ops<Tier, Plain<int32_t>, Plain<int32_t>, Plain<int32_t>>(
      t.reduce[static_cast<int>(DType::Int32)], false);
  fill_ops<Tier, Plain<int64_t>, Plain<int64_t>, Plain<int64_t>>(
      t.reduce[static_cast<int>(DType::Int64)], false);
  fill_ops<Tier, Plain<uint8_t>, Plain<uint8_t>, Plain<uint8_t>>(
      t.reduce[static_cast<int>(DType::UInt8)], false);
  fill_convert<Tier, Flt<float>, F16>(t, kSlotF32, kSlotF16);
  fill_convert<Tier, Flt<float>, BF16>(t, kSlotF32, kSlotBf16);
  fill_convert<Tier, F16, Flt<float>>(t, kSlotF16, kSlotF32);
  fill_convert<Tier, F16, BF16>(t, kSlotF16, kSlotBf16);
  fill_convert<Tier, BF16, Flt<float>>(t, kSlotBf16, kSlotF32);
  fill_convert<Tier, BF16, F16>(t, kSlotBf16, kSlotF16);
  return t;
}

constexpr Table kGenericTable = make_table<GenericTier>();
#if WEFT_RK_X86
constexpr Table kAvx2Table = make_table<Avx2Tier>();
constexpr Table kAvx512Table = make_table<Avx512Tier>();
#endif

const Table* table_of(detail::Isa isa) {
  switch (isa) {
#if WEFT_RK_X86
    case detail::Isa::Avx512: return &kAvx512Table;
    case detail::Isa::Avx2: return &kAvx2Table;
#endif
    default: return &kGenericTable;
  }
}

// ---------------------------------------------------------------------------
// Tier selection.

std::atomic<const Table*> g_table{nullptr};  // null until the first call or set_isa()

detail::Isa isa_of(const Table* t) {
#if WEFT_RK_X86
  if (t == &kAvx512Table) return detail::Isa::Avx512;
  if (t == &kAvx2Table) return detail::Isa::Avx2;
#endif
  (void)t;
  return detail::Isa::Generic;
}

detail::Isa select_from_env() {
  const std::string value = settings::get(settings::kReduceIsa);
  const detail::Isa requested = detail::parse_isa(value);
  const detail::Isa best = detail::best_isa();
  const detail::Isa isa = static_cast<int>(requested) < static_cast<int>(best) ? requested : best;
  WEFT_DEBUG("reduce kernels: {} (WEFT_REDUCE_ISA={}, best supported {})", detail::isa_name(isa),
             value, detail::isa_name(best));
  return isa;
}

const Table& table() {
  const Table* t = g_table.load(std::memory_order_acquire);
  if (t != nullptr) [[likely]] {
    return *t;
  }
  static const detail::Isa initial = select_from_env();  // once; retried if it throws
  const Table* expected = nullptr;
  // A concurrent set_isa() wins over the environment.
  g_table.compare_exchange_strong(expected, table_of(initial), std::memory_order_acq_rel);
  return *g_table.load(std::memory_order_acquire);
}

// ---------------------------------------------------------------------------
// Argument checks.

[[noreturn]] void throw_invalid(const std::string& message) { throw InvalidArgument(message); }

void check_dtype(const char* fn, DType dtype) {
  if (static_cast<int>(dtype) >= kNumDTypes) {
    throw_invalid(std::string(fn) + ": invalid dtype " + dtype_name(dtype));
  }
}

BinaryFn reduce_fn(const char* fn, DType dtype, ReduceOp op) {
  check_dtype(fn, dtype);
  if (static_cast<int>(op) >= kNumReduceOps) {
    throw_invalid(std::string(fn) + ": invalid reduce op " + reduce_op_name(op));
  }
  BinaryFn f = table().reduce[static_cast<int>(dtype)][static_cast<int>(op)];
  if (f == nullptr) {
    throw_invalid(std::string(fn) + ": " + reduce_op_name(op) +
                  " is only valid for floating-point dtypes, not " + dtype_name(dtype));
  }
  return f;
}

// Slot of a float32/float16/bfloat16 dtype, -1 for the others.
int float_slot(DType dtype) {
  switch (dtype) {
    case DType::Float32: return kSlotF32;
    case DType::Float16: return kSlotF16;
    case DType::BFloat16: return kSlotBf16;
    default: return -1;
  }
}

void check_divisor(const char* fn, int divisor) {
  if (divisor <= 0) {
    throw_invalid(std::string(fn) + ": the divisor must be positive, got " +
                  std::to_string(divisor));
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Public entry points.

void reduce(void* dst, const void* src, size_t n, DType dtype, ReduceOp op) {
  const BinaryFn f = reduce_fn("reduce", dtype, op);
  if (n != 0) f(dst, dst, src, n);
}

void reduce3(void* dst, const void* a, const void* b, size_t n, DType dtype, ReduceOp op) {
  const BinaryFn f = reduce_fn("reduce3", dtype, op);
  if (n != 0) f(dst, a, b, n);
}

void accumulate_f32(float* acc, const void* src, size_t n, DType src_dtype, ReduceOp op) {
  check_dtype("accumulate_f32", src_dtype);
  const int slot = float_slot(src_dtype);
  if (slot < 0) {
    throw_invalid("accumulate_f32: the source must be float32, float16 or bfloat16, not " +
                  dtype_name(src_dtype));
  }
  if (static_cast<int>(op) >= kNumReduceOps) {
    throw_invalid("accumulate_f32: invalid reduce op " + reduce_op_name(op));
  }
  const BinaryFn f = table().accumulate[slot][static_cast<int>(op)];
  if (n != 0) f(acc, acc, src, n);
}

void convert(void* dst, DType dst_dtype, const void* src, DType src_dtype, size_t n) {
  check_dtype("convert", dst_dtype);
  check_dtype("convert", src_dtype);
  const int ds = float_slot(dst_dtype);
  const int ss = float_slot(src_dtype);
  if (ds < 0 || ss < 0) {
    throw_invalid("convert: only float32, float16 and bfloat16 convert, not " +
                  dtype_name(src_dtype) + " to " + dtype_name(dst_dtype));
  }
  if (n == 0) return;
  if (ds == ss) {
    if (dst != src) std::memmove(dst, src, n * dtype_size(dst_dtype));
    return;
  }
  table().convert[ds][ss](dst, src, n, 0);
}

void divide(void* buf, size_t n, DType dtype, int divisor) {
  check_dtype("divide", dtype);
  if (!dtype_is_floating(dtype)) {
    throw_invalid("divide: avg is only valid for floating-point dtypes, not " + dtype_name(dtype));
  }
  check_divisor("divide", divisor);
  if (n != 0) table().divide[static_cast<int>(dtype)](buf, buf, n, divisor);
}

void finalize_avg_f32(void* dst, DType dst_dtype, const float* acc, size_t n, int divisor) {
  check_dtype("finalize_avg_f32", dst_dtype);
  const int slot = float_slot(dst_dtype);
  if (slot < 0) {
    throw_invalid("finalize_avg_f32: the destination must be float32, float16 or bfloat16, not " +
                  dtype_name(dst_dtype));
  }
  check_divisor("finalize_avg_f32", divisor);
  if (n != 0) table().finalize[slot](dst, acc, n, divisor);
}

// ---------------------------------------------------------------------------
// Tiers.

namespace detail {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Generic: return "generic";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
  }
  return "unknown";
}

Isa parse_isa(std::string_view text) {
  if (text == "auto") return best_isa();
  if (text == "avx512") return Isa::Avx512;
  if (text == "avx2") return Isa::Avx2;
  if (text == "generic") return Isa::Generic;
  throw InvalidArgument("WEFT_REDUCE_ISA='" + std::string(text) +
                        "' is invalid: expected auto, avx512, avx2 or generic");
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::Generic: return true;
#if WEFT_RK_X86
    case Isa::Avx2:
      __builtin_cpu_init();
      // __builtin_cpu_supports also checks that the OS saves the registers.
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    case Isa::Avx512:
      __builtin_cpu_init();
      return isa_supported(Isa::Avx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq");
#endif
    default: return false;
  }
}

Isa best_isa() {
  static const Isa best = [] {
    if (isa_supported(Isa::Avx512)) return Isa::Avx512;
    if (isa_supported(Isa::Avx2)) return Isa::Avx2;
    return Isa::Generic;
  }();
  return best;
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::Generic, Isa::Avx2, Isa::Avx512}) {
    if (isa_supported(isa)) out.push_back(isa);
  }
  return out;
}

Isa active_isa() { return isa_of(&table()); }

void set_isa(Isa isa) {
  if (!isa_supported(isa)) {
    throw InvalidArgument(std::string("reduce kernels: ") + isa_name(isa) +
                          " is not supported by this CPU or build");
  }
  g_table.store(table_of(isa), std::memory_order_release);
}

}  // namespace detail
}  // namespace weft::coll
