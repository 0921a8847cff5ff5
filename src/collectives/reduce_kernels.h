// Reduction kernels: the element-wise arithmetic the collectives (allreduce,
// reduce, reduce_scatter) run on every segment they receive.
//
//   coll::reduce(acc, segment, n, DType::Float32, ReduceOp::Sum);  // acc[i] += segment[i]
//
// These loops are on the hot path of every reducing collective, so each one
// is compiled several times (one copy per instruction-set tier, see Isa
// below) and the best copy the CPU supports is chosen once, at the first
// call. All copies produce bit-identical results: a job whose ranks run on
// different CPUs (AVX-512 on some hosts, only SSE2 on others) still computes
// the same bits everywhere.
//
// Semantics, for every entry point below
// --------------------------------------
//
// * Avg. The kernels never divide while reducing: for ReduceOp::Avg they
//   perform Sum, and the collective calls divide() (or finalize_avg_f32())
//   once, on the final sum. Avg is only valid for floating-point dtypes: on
//   integer dtypes every entry point throws weft::InvalidArgument.
//
// * Integers (Int32, Int64, UInt8). Sum and Prod wrap around modulo 2^bits
//   (two's complement for the signed types; computed in unsigned arithmetic,
//   so there is no undefined behaviour). Min and Max compare as signed for
//   Int32/Int64 and as unsigned for UInt8.
//
// * Floating point (Float32, Float64, Float16, BFloat16). IEEE 754 arithmetic
//   with round-to-nearest-even; no fused multiply-add, no reassociation: the
//   result of each element is op(dst[i], src[i]) computed exactly once.
//   Float16 and BFloat16 are converted to float32, combined in float32, and
//   rounded once back (round to nearest even). (For + and * of two 16-bit
//   values this equals the correctly rounded 16-bit result: float32 has at
//   least 2p+2 significand bits for both formats, so the double rounding is
//   innocuous.)
//
// * Min / Max on floating point are IEEE 754-2019 minimum / maximum:
//   - NaN propagates: if either operand is NaN the result is NaN;
//   - -0.0 is smaller than +0.0 (min(-0, +0) = -0, max(-0, +0) = +0);
//   so both are commutative, which Sum and Prod are too (up to NaN payloads,
//   see the next point).
//
// * NaN results are canonical. Every NaN the kernels write (reduce, reduce3,
//   accumulate_f32, convert between two different dtypes, divide,
//   finalize_avg_f32) is the positive quiet NaN with only the top mantissa
//   bit set: float32 0x7FC00000, float64 0x7FF8000000000000, float16 0x7E00,
//   bfloat16 0x7FC0. Which input payload a hardware NaN carries depends on
//   operand order and on the instruction (F16C vs the software conversion),
//   so without this the ISA tiers, and therefore ranks on different CPUs,
//   could disagree on the bits of a NaN.
//
// * ±inf, subnormals (including float16 subnormals) and signed zeros follow
//   IEEE 754 (overflow rounds to ±inf). The kernels assume the default
//   floating-point environment (round to nearest even); if the process sets
//   flush-to-zero / denormals-are-zero in MXCSR, float32/float64 arithmetic
//   follows that setting on every tier alike.
//
// * Determinism. Given the same inputs in the same order, every call, every
//   thread, every tier and every rank produces the same bits.
//
// * Memory. n counts elements (not bytes). Pointers need only the alignment
//   of their element type (no vector alignment). An
//   output may be exactly the same buffer as an input where stated; other
//   partial overlaps are not supported. With n == 0 no pointer is touched
//   (they may be null). All buffers are CPU memory.
#pragma once

#include <cstddef>
#include <string_view>
#include <vector>

#include "weft/types.h"

namespace weft::coll {

// In place: dst[i] = op(dst[i], src[i]) for i in [0, n). ReduceOp::Avg
// performs Sum. dst and src must not overlap (dst == src is allowed and
// computes op(x, x)). Throws weft::InvalidArgument for Avg on an integer
// dtype or a dtype/op value out of range.
void reduce(void* dst, const void* src, size_t n, DType dtype, ReduceOp op);

// Out of place: dst[i] = op(a[i], b[i]) for i in [0, n). dst may be the same
// buffer as a or b (or both); no other overlap is allowed. Same errors as
// reduce().
void reduce3(void* dst, const void* a, const void* b, size_t n, DType dtype, ReduceOp op);

// Accumulates a low-precision segment into a float32 accumulator:
// acc[i] = op(acc[i], float(src[i])) for src_dtype Float16, BFloat16 or
// Float32 (the float conversion is exact). Lets a collective sum many
// float16/bfloat16 contributions with one rounding at the end (convert() or
// finalize_avg_f32()). Avg performs Sum. Throws weft::InvalidArgument for
// any other src_dtype.
void accumulate_f32(float* acc, const void* src, size_t n, DType src_dtype, ReduceOp op);

// Converts n elements between Float32, Float16 and BFloat16 (any pair;
// to 16 bits: round to nearest even, overflow to ±inf, NaN to the canonical
// NaN). Same dtype on both sides: a plain copy of the bits (dst == src is a
// no-op). The buffers must not overlap otherwise. Throws
// weft::InvalidArgument for any other dtype.
void convert(void* dst, DType dst_dtype, const void* src, DType src_dtype, size_t n);

// The division that completes Avg: buf[i] = buf[i] / divisor, in the
// element's precision (Float16 and BFloat16 through float32, rounded once;
// Float64 in double). divisor is converted to the compute type (exact up to
// 2^24 for float32). Throws weft::InvalidArgument for an integer dtype (Avg
// is rejected on integer types) and for divisor <= 0.
void divide(void* buf, size_t n, DType dtype, int divisor);

// Completes an Avg accumulated in float32: dst[i] = acc[i] / divisor,
// computed in float32 and rounded once to dst_dtype (Float32, Float16 or
// BFloat16). With dst_dtype Float32, dst may be acc itself. Throws
// weft::InvalidArgument for another dst_dtype or divisor <= 0.
void finalize_avg_f32(void* dst, DType dst_dtype, const float* acc, size_t n, int divisor);

// ---------------------------------------------------------------------------
// Instruction-set tiers (for tests, benchmarks and diagnostics).
//
// Every kernel exists in up to three copies:
//   Generic  baseline of the build (SSE2 on x86-64), 16-byte vectors,
//            float16 converted in software;
//   Avx2     AVX2 + F16C, 32-byte vectors (x86-64 only);
//   Avx512   AVX-512 F/BW/VL/DQ + F16C, 64-byte vectors (x86-64 only).
// At the first kernel call the best tier the CPU (and OS) supports is chosen,
// capped by the environment variable WEFT_REDUCE_ISA (auto, avx512, avx2 or
// generic; default auto): WEFT_REDUCE_ISA=avx2 on an AVX-512 machine uses the
// Avx2 copies, and on a machine without AVX2 the Generic ones. An invalid
// value makes that first call throw weft::InvalidArgument.
namespace detail {

enum class Isa : uint8_t { Generic = 0, Avx2 = 1, Avx512 = 2 };

// "generic", "avx2", "avx512".
const char* isa_name(Isa isa);
// Parses a WEFT_REDUCE_ISA value: "auto" (returns best_isa()), "avx512",
// "avx2" or "generic" (returned as is, not capped); throws
// weft::InvalidArgument naming WEFT_REDUCE_ISA otherwise.
Isa parse_isa(std::string_view text);
// Whether this build has the tier and this CPU can run it.
bool isa_supported(Isa isa);
// The best supported tier, and every supported tier (Generic first).
Isa best_isa();
std::vector<Isa> supported_isas();
// The tier the kernels use now (selecting it from WEFT_REDUCE_ISA first if
// no kernel ran yet).
Isa active_isa();
// Makes every later kernel call use `isa` (tests and benchmarks only; not
// meant to race with kernel calls of other threads, though it is safe).
// Throws weft::InvalidArgument when !isa_supported(isa).
void set_isa(Isa isa);

}  // namespace detail
}  // namespace weft::coll
