#include "weft/types.h"

#include <fmt/format.h>

#include <cctype>
#include <cstring>

#include "core/deadline.h"
#include "core/describe.h"
#include "weft/errors.h"
#include "weft/version.h"

namespace weft {

const char* version() { return "0.1.0"; }

std::string dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Int32: return "int32";
    case DType::Int64: return "int64";
    case DType::UInt8: return "uint8";
  }
  return fmt::format("dtype({})", static_cast<int>(t));
}

std::string reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return "sum";
    case ReduceOp::Avg: return "avg";
    case ReduceOp::Min: return "min";
    case ReduceOp::Max: return "max";
    case ReduceOp::Prod: return "prod";
  }
  return fmt::format("op({})", static_cast<int>(op));
}

float half_to_float(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t mant = h.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      u = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

Half float_to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00u)};   // NaN
  if (abs >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (abs < 0x38800000u) {  // result is subnormal or zero
    if (abs < 0x33000000u) return Half{sign};
    const uint32_t e = abs >> 23;
    const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24
    // round to nearest even on the bits shifted out
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    uint32_t q = m >> shift;
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return Half{static_cast<uint16_t>(sign | q)};
  }
  uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);  // round to nearest even
  return Half{static_cast<uint16_t>(sign | (r >> 13))};
}

const char* collective_name(Collective c) {
  switch (c) {
    case Collective::Barrier: return "barrier";
    case Collective::Broadcast: return "broadcast";
    case Collective::Allreduce: return "allreduce";
    case Collective::Reduce: return "reduce";
    case Collective::Allgather: return "allgather";
    case Collective::Allgatherv: return "allgatherv";
    case Collective::ReduceScatter: return "reduce_scatter";
    case Collective::Gather: return "gather";
    case Collective::Scatter: return "scatter";
    case Collective::Alltoall: return "alltoall";
    case Collective::Alltoallv: return "alltoallv";
  }
  return "collective";
}

const char* algorithm_name(Algorithm a) {
  switch (a) {
    case Algorithm::Auto: return "auto";
    case Algorithm::Ring: return "ring";
    case Algorithm::HalvingDoubling: return "hd";
    case Algorithm::RecursiveDoubling: return "rd";
    case Algorithm::Tree: return "tree";
    case Algorithm::Pairwise: return "pairwise";
    case Algorithm::Dissemination: return "dissemination";
    case Algorithm::Linear: return "linear";
    case Algorithm::Hierarchical: return "hierarchical";
  }
  return "unknown";
}

Algorithm parse_algorithm(const std::string& name) {
  std::string s;
  for (char c : name) s += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (s == "auto" || s.empty()) return Algorithm::Auto;
  if (s == "ring" || s == "chain") return Algorithm::Ring;
  if (s == "hd" || s == "halving-doubling" || s == "halving_doubling" || s == "rabenseifner")
    return Algorithm::HalvingDoubling;
  if (s == "rd" || s == "recursive-doubling" || s == "recursive_doubling")
    return Algorithm::RecursiveDoubling;
  if (s == "tree" || s == "binomial") return Algorithm::Tree;
  if (s == "pairwise") return Algorithm::Pairwise;
  if (s == "dissemination") return Algorithm::Dissemination;
  if (s == "linear" || s == "direct") return Algorithm::Linear;
  if (s == "hierarchical" || s == "hier" || s == "2d") return Algorithm::Hierarchical;
  throw InvalidArgument(
      fmt::format("unknown algorithm '{}' (expected auto, ring, hd, rd, tree, pairwise, "
                  "dissemination, linear or hierarchical)",
                  name));
}

std::string describe_collective(Collective kind, uint64_t seq, DType dtype, size_t count,
                                ReduceOp op, int root, Algorithm algorithm) {
  std::string args = fmt::format("{} x {}", dtype_name(dtype), count);
  if (kind == Collective::Allreduce || kind == Collective::Reduce ||
      kind == Collective::ReduceScatter) {
    args += ", " + reduce_op_name(op);
  }
  if (kind == Collective::Broadcast || kind == Collective::Reduce || kind == Collective::Gather ||
      kind == Collective::Scatter) {
    args += fmt::format(", root {}", root);
  }
  if (algorithm != Algorithm::Auto) args += std::string(", ") + algorithm_name(algorithm);
  if (kind == Collective::Barrier) {
    return algorithm == Algorithm::Auto
               ? fmt::format("barrier #{}", seq)
               : fmt::format("barrier #{} ({})", seq, algorithm_name(algorithm));
  }
  return fmt::format("{} #{} ({})", collective_name(kind), seq, args);
}

std::string format_timeout(Timeout t) {
  if (t.count() % 1000 == 0) return fmt::format("{} s", t.count() / 1000);
  return fmt::format("{:.3f} s", static_cast<double>(t.count()) / 1000.0);
}

}  // namespace weft
