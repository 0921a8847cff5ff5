// Tests of the reduction kernels against a scalar reference written
// independently here (weft::half_to_float & co. from types.h plus the
// documented semantics), on every instruction-set tier this CPU supports.
//
// Elements are handled as raw bit patterns (uint64_t) so that one reference
// and one comparison cover every dtype, and comparisons are bitwise (NaN
// results must be the canonical NaN, -0.0 must stay -0.0).
#include "collectives/reduce_kernels.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "testing/testing.h"
#include "weft/errors.h"
#include "weft/types.h"

namespace weft::coll {
namespace detail {
// Test names and messages print the tier's name.
void PrintTo(Isa isa, std::ostream* os) { *os << isa_name(isa); }
}  // namespace detail
namespace {

using detail::Isa;

// ---------------------------------------------------------------------------
// Reference

constexpr uint32_t kNaN32 = 0x7fc00000u;
constexpr uint64_t kNaN64 = 0x7ff8000000000000u;
constexpr uint16_t kNaN16 = 0x7e00u;
constexpr uint16_t kNaNBf16 = 0x7fc0u;

float f32(uint64_t bits) {
  const auto u = static_cast<uint32_t>(bits);
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
double f64(uint64_t bits) {
  double d;
  std::memcpy(&d, &bits, sizeof d);
  return d;
}
uint64_t bits_of(float f) {
  if (std::isnan(f)) return kNaN32;
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
uint64_t bits_of(double d) {
  if (std::isnan(d)) return kNaN64;
  uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return u;
}
uint64_t half_bits(float f) { return std::isnan(f) ? kNaN16 : float_to_half(f).bits; }
uint64_t bf16_bits(float f) { return std::isnan(f) ? kNaNBf16 : float_to_bfloat16(f).bits; }
float from_half(uint64_t bits) { return half_to_float(Half{static_cast<uint16_t>(bits)}); }
float from_bf16(uint64_t bits) { return bfloat16_to_float(BFloat16{static_cast<uint16_t>(bits)}); }

// IEEE 754-2019 minimum / maximum: NaN propagates, -0 < +0.
template <class F>
F ref_minmax(F a, F b, bool max) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<F>::quiet_NaN();
  if (a == b) {  // equal, or zeros of either sign
    const bool a_neg = std::signbit(a);
    return max ? (a_neg ? b : a) : (a_neg ? a : b);
  }
  return max ? (a > b ? a : b) : (a < b ? a : b);
}

template <class F>
F ref_float(ReduceOp op, F a, F b) {
  switch (op) {
    case ReduceOp::Sum:
    case ReduceOp::Avg: return a + b;
    case ReduceOp::Prod: return a * b;
    case ReduceOp::Min: return ref_minmax(a, b, false);
    case ReduceOp::Max: return ref_minmax(a, b, true);
  }
  return 0;
}

template <class S>
uint64_t ref_int(ReduceOp op, uint64_t a_bits, uint64_t b_bits) {
  using U = std::make_unsigned_t<S>;
  const U ua = static_cast<U>(a_bits);
  const U ub = static_cast<U>(b_bits);
  const S sa = static_cast<S>(ua);
  const S sb = static_cast<S>(ub);
  switch (op) {
    case ReduceOp::Sum: return static_cast<U>(ua + ub);
    case ReduceOp::Prod: return static_cast<U>(ua * ub);
    case ReduceOp::Min: return static_cast<U>(std::min(sa, sb));
    case ReduceOp::Max: return static_cast<U>(std::max(sa, sb));
    case ReduceOp::Avg: break;
  }
  ADD_FAILURE() << "avg on an integer type in the reference";
  return 0;
}

uint64_t ref_reduce(DType t, ReduceOp op, uint64_t a, uint64_t b) {
  switch (t) {
    case DType::Float32: return bits_of(ref_float(op, f32(a), f32(b)));
    case DType::Float64: return bits_of(ref_float(op, f64(a), f64(b)));
    case DType::Float16: return half_bits(ref_float(op, from_half(a), from_half(b)));
    case DType::BFloat16: return bf16_bits(ref_float(op, from_bf16(a), from_bf16(b)));
    case DType::Int32: return ref_int<int32_t>(op, a, b);
    case DType::Int64: return ref_int<int64_t>(op, a, b);
    case DType::UInt8: return ref_int<uint8_t>(op, a, b);
  }
  return 0;
}

// float32 value of a float32/float16/bfloat16 element.
float to_float(DType t, uint64_t bits) {
  switch (t) {
    case DType::Float16: return from_half(bits);
    case DType::BFloat16: return from_bf16(bits);
    default: return f32(bits);
  }
}
// A float32 value rounded to a float32/float16/bfloat16 element.
uint64_t from_float(DType t, float f) {
  switch (t) {
    case DType::Float16: return half_bits(f);
    case DType::BFloat16: return bf16_bits(f);
    default: return bits_of(f);
  }
}

// ---------------------------------------------------------------------------
// Test data

const std::vector<DType> kAllDTypes = {DType::Float32,  DType::Float64, DType::Float16,
                                       DType::BFloat16, DType::Int32,   DType::Int64,
                                       DType::UInt8};
const std::vector<ReduceOp> kAllOps = {ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Min, ReduceOp::Max,
                                       ReduceOp::Prod};
const std::vector<size_t> kSizes = {0, 1, 7, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 1000, 4099};

// Values every dtype must get right: zeros of both signs, ±inf, NaNs with
// payloads and signs (quiet and signaling), subnormals, the extremes.
std::vector<uint64_t> specials(DType t) {
  switch (t) {
    case DType::Float32:
      return {0x00000000, 0x80000000, 0x3f800000, 0xbf800000, 0x7f800000, 0xff800000,
              0x7fc00000, 0xffc00000, 0x7f800001, 0x7fc12345, 0xffa00001, 0x00000001,
              0x80000001, 0x007fffff, 0x00800000, 0x80800000, 0x7f7fffff, 0xff7fffff,
              0x7f000000, 0x3eaaaaab, 0x40490fdb, 0x33800000, 0x477ff000, 0x38800000};
    case DType::Float64:
      return {0x0000000000000000, 0x8000000000000000, 0x3ff0000000000000, 0xbff0000000000000,
              0x7ff0000000000000, 0xfff0000000000000, 0x7ff8000000000000, 0xfff8000000000000,
              0x7ff0000000000001, 0x7ff8123456789abc, 0x0000000000000001, 0x8000000000000001,
              0x000fffffffffffff, 0x0010000000000000, 0x7fefffffffffffff, 0xffefffffffffffff,
              0x7fe0000000000000, 0x3fd5555555555555, 0x400921fb54442d18};
    case DType::Float16:
      return {0x0000, 0x8000, 0x3c00, 0xbc00, 0x7c00, 0xfc00, 0x7e00, 0xfe00, 0x7c01,
              0x7d23, 0xfd01, 0x0001, 0x8001, 0x03ff, 0x83ff, 0x0400, 0x8400, 0x0200,
              0x7bff, 0xfbff, 0x7800, 0x3555, 0x4248, 0x1400, 0x3c01, 0x0002};
    case DType::BFloat16:
      return {0x0000, 0x8000, 0x3f80, 0xbf80, 0x7f80, 0xff80, 0x7fc0, 0xffc0,
              0x7f81, 0x7fa5, 0x0001, 0x8001, 0x007f, 0x0080, 0x8080, 0x7f7f,
              0xff7f, 0x7f00, 0x3eab, 0x4049, 0x3f81, 0x0002};
    case DType::Int32:
      return {0,          1, 0xffffffff, 0x80000000, 0x7fffffff, 0x80000001,
              0x7ffffffe, 2, 0x10000,    0xffff0000, 46341};
    case DType::Int64:
      return {0,
              1,
              0xffffffffffffffff,
              0x8000000000000000,
              0x7fffffffffffffff,
              0x8000000000000001,
              0x7ffffffffffffffe,
              2,
              0x100000000,
              0xffffffff00000000,
              3037000500};
    case DType::UInt8: return {0, 1, 2, 0x7f, 0x80, 0xff, 0xfe, 16, 15};
  }
  return {};
}

class Rng {
 public:
  explicit Rng(uint64_t seed) : gen_(seed) {}
  uint64_t bits() { return gen_(); }
  double uniform(double lo, double hi) {
    return std::uniform_real_distribution<double>(lo, hi)(gen_);
  }
  size_t index(size_t n) { return static_cast<size_t>(gen_() % n); }

 private:
  std::mt19937_64 gen_;
};

// A random element: a special value 1 time in 8, otherwise random bits (all
// exponents, NaNs, subnormals) or a moderate value (so that sums and
// products round non-trivially), half and half.
uint64_t random_value(DType t, Rng& rng) {
  const uint64_t r = rng.bits();
  if (r % 8 == 0) {
    const auto s = specials(t);
    return s[rng.index(s.size())];
  }
  const bool moderate = (r >> 8) % 2 == 0;
  const double v = rng.uniform(-1000, 1000) * std::ldexp(1.0, static_cast<int>((r >> 16) % 16) - 8);
  switch (t) {
    case DType::Float32:
      return moderate ? bits_of(static_cast<float>(v)) : rng.bits() & 0xffffffffu;
    case DType::Float64: return moderate ? bits_of(v) : rng.bits();
    case DType::Float16: return moderate ? half_bits(static_cast<float>(v)) : rng.bits() & 0xffffu;
    case DType::BFloat16: return moderate ? bf16_bits(static_cast<float>(v)) : rng.bits() & 0xffffu;
    case DType::Int32: return rng.bits() & 0xffffffffu;
    case DType::Int64: return rng.bits();
    case DType::UInt8: return rng.bits() & 0xffu;
  }
  return 0;
}

// n elements of a dtype at an offset of `off` elements into storage framed
// by guard bytes, to check that nothing outside [0, n) is written.
class Array {
 public:
  static constexpr size_t kGuard = 64;
  static constexpr uint8_t kPattern = 0xa5;

  Array(DType t, size_t n, size_t off)
      : t_(t),
        esz_(dtype_size(t)),
        n_(n),
        off_(off),
        storage_(2 * kGuard + (n + off) * esz_, kPattern) {}

  void* data() { return storage_.data() + kGuard + off_ * esz_; }
  const void* data() const { return storage_.data() + kGuard + off_ * esz_; }
  size_t size() const { return n_; }
  DType dtype() const { return t_; }
  uint64_t get(size_t i) const {
    uint64_t v = 0;
    std::memcpy(&v, static_cast<const uint8_t*>(data()) + i * esz_, esz_);
    return v;
  }
  void set(size_t i, uint64_t v) {
    std::memcpy(static_cast<uint8_t*>(data()) + i * esz_, &v, esz_);
  }
  void fill_random(Rng& rng) {
    for (size_t i = 0; i < n_; ++i) set(i, random_value(t_, rng));
  }
  void copy_from(const Array& o) {
    for (size_t i = 0; i < n_; ++i) set(i, o.get(i));
  }
  bool guards_intact() const {
    const size_t begin = kGuard + off_ * esz_;
    const size_t end = begin + n_ * esz_;
    for (size_t i = 0; i < storage_.size(); ++i) {
      if ((i < begin || i >= end) && storage_[i] != kPattern) return false;
    }
    return true;
  }

 private:
  DType t_;
  size_t esz_;
  size_t n_;
  size_t off_;
  std::vector<uint8_t> storage_;
};

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// Compares an array with expected bits; reports the first few mismatches.
// Returns whether everything matched.
bool expect_bits(const Array& got, const std::vector<uint64_t>& want, const std::string& what,
                 const Array* in_a = nullptr, const Array* in_b = nullptr) {
  size_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (got.get(i) == want[i]) continue;
    if (++bad <= 3) {
      ADD_FAILURE() << what << ": element " << i << " is " << hex(got.get(i)) << ", expected "
                    << hex(want[i])
                    << (in_a != nullptr ? " (a " + hex(in_a->get(i)) + ")" : std::string())
                    << (in_b != nullptr ? " (b " + hex(in_b->get(i)) + ")" : std::string());
    }
  }
  if (bad > 3) ADD_FAILURE() << what << ": " << bad << " mismatching elements in all";
  if (!got.guards_intact()) {
    ADD_FAILURE() << what << ": bytes outside the " << want.size() << " elements were written";
    return false;
  }
  return bad == 0;
}

bool is_int(DType t) { return !dtype_is_floating(t); }

// ---------------------------------------------------------------------------
// Tests run once per tier (skipped where the CPU lacks it).

class ReduceKernels : public ::testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    if (!detail::isa_supported(GetParam())) {
      GTEST_SKIP() << detail::isa_name(GetParam()) << " is not supported here";
    }
    detail::set_isa(GetParam());
    ASSERT_EQ(detail::active_isa(), GetParam());
  }
  void TearDown() override { detail::set_isa(detail::best_isa()); }

  std::string where(DType t, ReduceOp op) const {
    return std::string(detail::isa_name(GetParam())) + " " + dtype_name(t) + " " +
           reduce_op_name(op);
  }
};

enum class Mode { Reduce, ReduceSelf, Reduce3, Reduce3DstIsA, Reduce3DstIsB };
const char* mode_name(Mode m) {
  switch (m) {
    case Mode::Reduce: return "reduce(dst, src)";
    case Mode::ReduceSelf: return "reduce(x, x)";
    case Mode::Reduce3: return "reduce3(out, a, b)";
    case Mode::Reduce3DstIsA: return "reduce3(a, a, b)";
    case Mode::Reduce3DstIsB: return "reduce3(b, a, b)";
  }
  return "?";
}

// Runs one mode on inputs a and b (their values are copied) and checks the
// result and that the inputs that must stay unchanged did.
bool run_mode(Mode mode, DType t, ReduceOp op, const Array& a0, const Array& b0, size_t off,
              const std::string& what) {
  const size_t n = a0.size();
  Array a(t, n, off), b(t, n, off), out(t, n, off);
  a.copy_from(a0);
  b.copy_from(b0);
  std::vector<uint64_t> want(n);
  for (size_t i = 0; i < n; ++i) {
    want[i] = mode == Mode::ReduceSelf ? ref_reduce(t, op, a0.get(i), a0.get(i))
                                       : ref_reduce(t, op, a0.get(i), b0.get(i));
  }
  const std::string w =
      what + " " + mode_name(mode) + " n=" + std::to_string(n) + " offset=" + std::to_string(off);
  std::vector<uint64_t> a_bits(n), b_bits(n);
  for (size_t i = 0; i < n; ++i) {
    a_bits[i] = a0.get(i);
    b_bits[i] = b0.get(i);
  }
  switch (mode) {
    case Mode::Reduce:
      reduce(a.data(), b.data(), n, t, op);
      return expect_bits(a, want, w, &a0, &b0) && expect_bits(b, b_bits, w + " (src)");
    case Mode::ReduceSelf:
      reduce(a.data(), a.data(), n, t, op);
      return expect_bits(a, want, w, &a0);
    case Mode::Reduce3:
      reduce3(out.data(), a.data(), b.data(), n, t, op);
      return expect_bits(out, want, w, &a0, &b0) && expect_bits(a, a_bits, w + " (a)") &&
             expect_bits(b, b_bits, w + " (b)");
    case Mode::Reduce3DstIsA:
      reduce3(a.data(), a.data(), b.data(), n, t, op);
      return expect_bits(a, want, w, &a0, &b0) && expect_bits(b, b_bits, w + " (b)");
    case Mode::Reduce3DstIsB:
      reduce3(b.data(), a.data(), b.data(), n, t, op);
      return expect_bits(b, want, w, &a0, &b0) && expect_bits(a, a_bits, w + " (a)");
  }
  return false;
}

TEST_P(ReduceKernels, EveryDTypeOpSizeOffsetAndAliasing) {
  Rng rng(42);
  for (DType t : kAllDTypes) {
    for (ReduceOp op : kAllOps) {
      if (is_int(t) && op == ReduceOp::Avg) continue;
      bool ok = true;
      for (size_t n : kSizes) {
        for (size_t off : {size_t{0}, size_t{1}}) {
          Array a(t, n, 0), b(t, n, 0);
          a.fill_random(rng);
          b.fill_random(rng);
          for (Mode mode : {Mode::Reduce, Mode::ReduceSelf, Mode::Reduce3, Mode::Reduce3DstIsA,
                            Mode::Reduce3DstIsB}) {
            ok = run_mode(mode, t, op, a, b, off, where(t, op)) && ok;
          }
          if (!ok) break;
        }
        if (!ok) break;
      }
    }
  }
}

// Every pair of special values, for every dtype and op.
TEST_P(ReduceKernels, SpecialValuePairs) {
  for (DType t : kAllDTypes) {
    const auto s = specials(t);
    const size_t n = s.size() * s.size();
    Array a(t, n, 0), b(t, n, 0);
    for (size_t i = 0; i < s.size(); ++i) {
      for (size_t j = 0; j < s.size(); ++j) {
        a.set(i * s.size() + j, s[i]);
        b.set(i * s.size() + j, s[j]);
      }
    }
    for (ReduceOp op : kAllOps) {
      if (is_int(t) && op == ReduceOp::Avg) continue;
      run_mode(Mode::Reduce3, t, op, a, b, 0, where(t, op));
      run_mode(Mode::Reduce, t, op, a, b, 1, where(t, op));
    }
  }
}

// A million random float16 / bfloat16 pairs (every bit pattern is likely).
TEST_P(ReduceKernels, SixteenBitRandomPairs) {
  Rng rng(7);
  constexpr size_t n = size_t{1} << 20;
  for (DType t : {DType::Float16, DType::BFloat16}) {
    Array a(t, n, 0), b(t, n, 0);
    for (size_t i = 0; i < n; ++i) {
      a.set(i, rng.bits() & 0xffff);
      b.set(i, rng.bits() & 0xffff);
    }
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max}) {
      run_mode(Mode::Reduce3, t, op, a, b, 0, where(t, op));
    }
  }
}

// Sums that overflow wrap around (two's complement), products too.
TEST_P(ReduceKernels, IntegerWraparound) {
  int32_t a32[3] = {std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min(),
                    65536};
  const int32_t b32[3] = {1, -1, 65536};
  reduce(a32, b32, 3, DType::Int32, ReduceOp::Sum);
  EXPECT_EQ(a32[0], std::numeric_limits<int32_t>::min());
  EXPECT_EQ(a32[1], std::numeric_limits<int32_t>::max());
  reduce(a32 + 2, b32 + 2, 1, DType::Int32, ReduceOp::Prod);
  EXPECT_EQ(a32[2], 0);  // (65536 + 65536) * 65536 = 2^33 wraps to 0
  int64_t a64[1] = {std::numeric_limits<int64_t>::max()};
  const int64_t b64[1] = {2};
  reduce(a64, b64, 1, DType::Int64, ReduceOp::Sum);
  EXPECT_EQ(a64[0], std::numeric_limits<int64_t>::min() + 1);
  uint8_t a8[2] = {200, 16};
  const uint8_t b8[2] = {100, 16};
  reduce(a8, b8, 2, DType::UInt8, ReduceOp::Sum);
  EXPECT_EQ(a8[0], 44);
  reduce(a8 + 1, b8 + 1, 1, DType::UInt8, ReduceOp::Prod);
  EXPECT_EQ(a8[1], 0);  // 32 * 16 = 512 -> 0
}

TEST_P(ReduceKernels, MinMaxNaNAndSignedZero) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float a[4] = {nan, 1.0f, -0.0f, 0.0f};
  const float b[4] = {1.0f, nan, 0.0f, -0.0f};
  float out[4];
  reduce3(out, a, b, 4, DType::Float32, ReduceOp::Min);
  EXPECT_EQ(bits_of(out[0]), kNaN32);
  EXPECT_EQ(bits_of(out[1]), kNaN32);
  EXPECT_TRUE(std::signbit(out[2]) && out[2] == 0.0f);
  EXPECT_TRUE(std::signbit(out[3]) && out[3] == 0.0f);
  reduce3(out, a, b, 4, DType::Float32, ReduceOp::Max);
  EXPECT_TRUE(std::isnan(out[0]) && std::isnan(out[1]));
  EXPECT_TRUE(!std::signbit(out[2]) && !std::signbit(out[3]));
}

TEST_P(ReduceKernels, AccumulateF32) {
  Rng rng(11);
  for (DType st : {DType::Float32, DType::Float16, DType::BFloat16}) {
    for (ReduceOp op : kAllOps) {
      for (size_t n : kSizes) {
        for (size_t off : {size_t{0}, size_t{1}}) {
          Array acc(DType::Float32, n, off), src(st, n, off), src0(st, n, 0);
          src0.fill_random(rng);
          src.copy_from(src0);
          std::vector<uint64_t> want(n), src_bits(n);
          for (size_t i = 0; i < n; ++i) {
            acc.set(i, random_value(DType::Float32, rng));
            want[i] = bits_of(ref_float(op, f32(acc.get(i)), to_float(st, src.get(i))));
            src_bits[i] = src.get(i);
          }
          const std::string w = where(st, op) + " accumulate_f32 n=" + std::to_string(n) +
                                " offset=" + std::to_string(off);
          accumulate_f32(static_cast<float*>(acc.data()), src.data(), n, st, op);
          if (!expect_bits(acc, want, w, nullptr, &src0)) return;
          expect_bits(src, src_bits, w + " (src)");
        }
      }
    }
  }
}

// float16 -> float32 -> float16 for all 65536 values, and the same for
// bfloat16; float16 <-> bfloat16 for all values of each.
TEST_P(ReduceKernels, ConvertEverySixteenBitValue) {
  constexpr size_t n = 65536;
  for (DType t : {DType::Float16, DType::BFloat16}) {
    const DType other = t == DType::Float16 ? DType::BFloat16 : DType::Float16;
    Array h(t, n, 1), f(DType::Float32, n, 1), back(t, n, 1), cross(other, n, 1);
    std::vector<uint64_t> want_f(n), want_back(n), want_cross(n);
    for (size_t i = 0; i < n; ++i) {
      h.set(i, i);
      const float v = to_float(t, i);
      want_f[i] = bits_of(v);
      want_back[i] = std::isnan(v) ? (t == DType::Float16 ? kNaN16 : kNaNBf16) : i;
      want_cross[i] = from_float(other, v);
    }
    const std::string w = std::string(detail::isa_name(GetParam())) + " " + dtype_name(t);
    convert(f.data(), DType::Float32, h.data(), t, n);
    expect_bits(f, want_f, w + " -> float32");
    convert(back.data(), t, f.data(), DType::Float32, n);
    expect_bits(back, want_back, w + " -> float32 -> " + dtype_name(t));
    convert(cross.data(), other, h.data(), t, n);
    expect_bits(cross, want_cross, w + " -> " + dtype_name(other));
  }
}

// float32 -> float16 / bfloat16 rounding: every tie (midpoint between two
// neighbouring 16-bit values) and its float32 neighbours, overflow limits,
// and random float32 bit patterns.
TEST_P(ReduceKernels, ConvertFloat32RoundsToNearestEven) {
  for (DType t : {DType::Float16, DType::BFloat16}) {
    std::vector<float> in;
    for (uint32_t h = 0; h < 0x10000; ++h) {
      const float lo = to_float(t, h);
      const float hi = to_float(t, h + 1);
      if (!std::isfinite(lo) || !std::isfinite(hi) || (h & 0x7fff) == 0x7fff) continue;
      const float mid = lo + (hi - lo) / 2;  // exact: needs one more bit than the 16-bit type
      for (float v : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, mid * 2), lo}) {
        in.push_back(v);
      }
    }
    for (uint32_t u : {0x477fefffu, 0x477ff000u, 0xc77ff000u, 0x7f7fffffu, 0x7f7f8000u, 0x7f7f7fffu,
                       0x00000001u, 0x80000001u, 0x33000000u, 0x33000001u, 0x387fe000u, 0x387ff000u,
                       0x7f800000u, 0x7f800001u, 0xffc00001u}) {
      in.push_back(f32(u));
    }
    Rng rng(3);
    for (int i = 0; i < 1000000; ++i) in.push_back(f32(rng.bits() & 0xffffffffu));
    const size_t n = in.size();
    Array src(DType::Float32, n, 1), out(t, n, 1);
    std::vector<uint64_t> want(n);
    for (size_t i = 0; i < n; ++i) {
      src.set(i, bits_of(in[i]) == kNaN32 ? rng.bits() | 0x7f800001u : bits_of(in[i]));
      want[i] = from_float(t, in[i]);
    }
    convert(out.data(), t, src.data(), DType::Float32, n);
    expect_bits(out, want,
                std::string(detail::isa_name(GetParam())) + " float32 -> " + dtype_name(t), &src);
  }
}

TEST_P(ReduceKernels, ConvertSameDTypeCopiesBits) {
  const uint16_t in[3] = {0x7c01, 0xfe12, 0x3c00};  // NaN payloads are kept by a plain copy
  uint16_t out[3] = {};
  convert(out, DType::Float16, in, DType::Float16, 3);
  EXPECT_EQ(std::memcmp(in, out, sizeof in), 0);
  convert(out, DType::BFloat16, out, DType::BFloat16, 3);  // dst == src: nothing to do
  EXPECT_EQ(std::memcmp(in, out, sizeof in), 0);
  convert(nullptr, DType::Float32, nullptr, DType::Float16, 0);
}

TEST_P(ReduceKernels, DivideForAvg) {
  Rng rng(5);
  for (DType t : {DType::Float32, DType::Float64, DType::Float16, DType::BFloat16}) {
    for (int divisor : {1, 2, 3, 7, 1000, 16777216, 1 << 30}) {
      for (size_t n : kSizes) {
        Array buf(t, n, n % 2), orig(t, n, 0);
        orig.fill_random(rng);
        buf.copy_from(orig);
        std::vector<uint64_t> want(n);
        for (size_t i = 0; i < n; ++i) {
          if (t == DType::Float64) {
            want[i] = bits_of(f64(orig.get(i)) / static_cast<double>(divisor));
          } else {
            want[i] = from_float(t, to_float(t, orig.get(i)) / static_cast<float>(divisor));
          }
        }
        divide(buf.data(), n, t, divisor);
        if (!expect_bits(buf, want,
                         std::string(detail::isa_name(GetParam())) + " divide " + dtype_name(t) +
                             " by " + std::to_string(divisor) + " n=" + std::to_string(n),
                         &orig)) {
          return;
        }
      }
    }
  }
}

TEST_P(ReduceKernels, FinalizeAvgF32) {
  Rng rng(9);
  for (DType t : {DType::Float32, DType::Float16, DType::BFloat16}) {
    for (int divisor : {1, 3, 8, 1000}) {
      for (size_t n : kSizes) {
        Array acc(DType::Float32, n, 1), out(t, n, 0);
        acc.fill_random(rng);
        std::vector<uint64_t> want(n);
        for (size_t i = 0; i < n; ++i) {
          want[i] = from_float(t, f32(acc.get(i)) / static_cast<float>(divisor));
        }
        const std::string w = std::string(detail::isa_name(GetParam())) + " finalize_avg_f32 " +
                              dtype_name(t) + " /" + std::to_string(divisor) +
                              " n=" + std::to_string(n);
        finalize_avg_f32(out.data(), t, static_cast<const float*>(acc.data()), n, divisor);
        if (!expect_bits(out, want, w, &acc)) return;
        if (t == DType::Float32) {  // in place
          finalize_avg_f32(acc.data(), t, static_cast<const float*>(acc.data()), n, divisor);
          if (!expect_bits(acc, want, w + " in place")) return;
        }
      }
    }
  }
}

// A typical Avg allreduce step by step: accumulate bfloat16 contributions in
// float32, then divide once and round once.
TEST_P(ReduceKernels, AvgPipeline) {
  constexpr int kRanks = 5;
  constexpr size_t n = 100;
  std::vector<std::vector<uint16_t>> contrib(kRanks, std::vector<uint16_t>(n));
  for (int r = 0; r < kRanks; ++r) {
    for (size_t i = 0; i < n; ++i) {
      contrib[r][i] = float_to_bfloat16(static_cast<float>(r + 1) * 0.25f + i).bits;
    }
  }
  std::vector<float> acc(n, 0.0f);
  for (int r = 0; r < kRanks; ++r) {
    accumulate_f32(acc.data(), contrib[r].data(), n, DType::BFloat16, ReduceOp::Avg);
  }
  std::vector<uint16_t> out(n);
  finalize_avg_f32(out.data(), DType::BFloat16, acc.data(), n, kRanks);
  for (size_t i = 0; i < n; ++i) {
    float sum = 0;
    for (int r = 0; r < kRanks; ++r) sum += bfloat16_to_float(BFloat16{contrib[r][i]});
    EXPECT_EQ(out[i], float_to_bfloat16(sum / kRanks).bits) << i;
  }
}

TEST_P(ReduceKernels, InvalidArguments) {
  int32_t i32[2] = {1, 2};
  float f[2] = {1, 2};
  for (DType t : {DType::Int32, DType::Int64, DType::UInt8}) {
    EXPECT_THROW(reduce(i32, i32, 0, t, ReduceOp::Avg), InvalidArgument) << dtype_name(t);
    EXPECT_THROW(reduce3(i32, i32, i32, 0, t, ReduceOp::Avg), InvalidArgument);
    EXPECT_THROW(divide(i32, 0, t, 2), InvalidArgument);
    EXPECT_THROW(accumulate_f32(f, i32, 1, t, ReduceOp::Sum), InvalidArgument);
    EXPECT_THROW(convert(f, DType::Float32, i32, t, 1), InvalidArgument);
    EXPECT_THROW(finalize_avg_f32(i32, t, f, 1, 2), InvalidArgument);
  }
  try {
    reduce(i32, i32, 2, DType::Int32, ReduceOp::Avg);
    ADD_FAILURE() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("int32"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("avg"), std::string::npos) << e.what();
  }
  EXPECT_EQ(i32[0], 1);
  EXPECT_THROW(divide(f, 2, DType::Float32, 0), InvalidArgument);
  EXPECT_THROW(divide(f, 2, DType::Float32, -2), InvalidArgument);
  EXPECT_THROW(finalize_avg_f32(f, DType::Float32, f, 2, 0), InvalidArgument);
  EXPECT_THROW(convert(f, DType::Float64, f, DType::Float32, 1), InvalidArgument);
  EXPECT_THROW(accumulate_f32(f, f, 1, DType::Float64, ReduceOp::Sum), InvalidArgument);
  EXPECT_THROW(reduce(f, f, 2, static_cast<DType>(kNumDTypes), ReduceOp::Sum), InvalidArgument);
  EXPECT_THROW(reduce(f, f, 2, DType::Float32, static_cast<ReduceOp>(kNumReduceOps)),
               InvalidArgument);
  EXPECT_THROW(accumulate_f32(f, f, 2, DType::Float32, static_cast<ReduceOp>(9)), InvalidArgument);
  EXPECT_EQ(f[0], 1.0f);
  // n == 0 touches nothing.
  reduce(nullptr, nullptr, 0, DType::Float16, ReduceOp::Sum);
  reduce3(nullptr, nullptr, nullptr, 0, DType::Int64, ReduceOp::Prod);
  accumulate_f32(nullptr, nullptr, 0, DType::BFloat16, ReduceOp::Max);
  divide(nullptr, 0, DType::Float64, 3);
  finalize_avg_f32(nullptr, DType::Float16, nullptr, 0, 3);
}

INSTANTIATE_TEST_SUITE_P(Isa, ReduceKernels,
                         ::testing::Values(Isa::Generic, Isa::Avx2, Isa::Avx512),
                         [](const ::testing::TestParamInfo<Isa>& param_info) {
                           return std::string(detail::isa_name(param_info.param));
                         });

// ---------------------------------------------------------------------------
// Tier selection

TEST(ReduceIsa, SupportedTiers) {
  const auto isas = detail::supported_isas();
  ASSERT_FALSE(isas.empty());
  EXPECT_EQ(isas.front(), Isa::Generic);
  EXPECT_EQ(isas.back(), detail::best_isa());
  for (Isa isa : {Isa::Generic, Isa::Avx2, Isa::Avx512}) {
    const bool listed = std::find(isas.begin(), isas.end(), isa) != isas.end();
    EXPECT_EQ(detail::isa_supported(isa), listed) << detail::isa_name(isa);
    if (!listed) {
      EXPECT_THROW(detail::set_isa(isa), InvalidArgument);
    }
  }
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    EXPECT_EQ(detail::best_isa(), Isa::Avx512);
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
    EXPECT_EQ(detail::best_isa(), Isa::Avx2);
  }
#endif
}

TEST(ReduceIsa, ParsesTheEnvironmentValues) {
  EXPECT_EQ(detail::parse_isa("generic"), Isa::Generic);
  EXPECT_EQ(detail::parse_isa("avx2"), Isa::Avx2);
  EXPECT_EQ(detail::parse_isa("avx512"), Isa::Avx512);
  EXPECT_EQ(detail::parse_isa("auto"), detail::best_isa());
  try {
    detail::parse_isa("sse9");
    ADD_FAILURE() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("WEFT_REDUCE_ISA"), std::string::npos) << e.what();
  }
}

// Run in a child process by the next test, with WEFT_REDUCE_ISA set.
TEST(ReduceIsaChild, DISABLED_FollowsTheEnvironment) {
  const char* value = std::getenv("WEFT_REDUCE_ISA");
  ASSERT_NE(value, nullptr);
  float a[3] = {1, 2, 3};
  const float b[3] = {1, 1, 1};
  if (std::string(value) == "bogus") {
    EXPECT_THROW(reduce(a, b, 3, DType::Float32, ReduceOp::Sum), InvalidArgument);
    EXPECT_THROW(detail::active_isa(), InvalidArgument);
    return;
  }
  reduce(a, b, 3, DType::Float32, ReduceOp::Sum);
  EXPECT_EQ(a[2], 4.0f);
  const Isa requested = detail::parse_isa(value);
  const Isa want = std::min(requested, detail::best_isa());
  EXPECT_EQ(detail::active_isa(), want) << value;
}

TEST(ReduceIsa, EnvironmentCapsTheTier) {
  for (const char* value : {"generic", "avx2", "avx512", "auto", "bogus"}) {
    testing::Process child({testing::bin_dir() + "/reduce_kernels_test",
                            "--gtest_filter=ReduceIsaChild.*", "--gtest_also_run_disabled_tests"},
                           {{"WEFT_REDUCE_ISA", value}});
    ASSERT_TRUE(child.wait(std::chrono::seconds(60))) << value;
    EXPECT_EQ(child.exit_code(), 0) << value << "\n" << child.output();
    EXPECT_NE(child.output().find("[  PASSED  ] 1 test"), std::string::npos) << value << "\n"
                                                                             << child.output();
  }
}

}  // namespace
}  // namespace weft::coll
