// Throughput of the reduction kernels: in-place sum (reduce(dst, src), what
// a collective does with each received segment) of float32, float16 and
// bfloat16 buffers of 4 KiB, 64 KiB, 1 MiB and 16 MiB, on every
// instruction-set tier this CPU supports, plus float16/bfloat16 accumulation
// into float32 (accumulate_f32).
//
//   build/bin/reduce_bench [--benchmark_filter=...]
//
// bytes_per_second counts the bytes of ONE buffer (the segment reduced): the
// memory traffic is three times that (read dst, read src, write dst).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "collectives/reduce_kernels.h"
#include "weft/types.h"

namespace {

using weft::DType;
using weft::ReduceOp;
namespace coll = weft::coll;

void fill(std::vector<uint8_t>& buf, DType t) {
  const size_t n = buf.size() / weft::dtype_size(t);
  for (size_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(i % 1000) * 0.001f + 1.0f;
    switch (t) {
      case DType::Float16: {
        const uint16_t h = weft::float_to_half(v).bits;
        std::memcpy(buf.data() + 2 * i, &h, 2);
        break;
      }
      case DType::BFloat16: {
        const uint16_t b = weft::float_to_bfloat16(v).bits;
        std::memcpy(buf.data() + 2 * i, &b, 2);
        break;
      }
      default: std::memcpy(buf.data() + 4 * i, &v, 4); break;
    }
  }
}

void bench_reduce(benchmark::State& state, coll::detail::Isa isa, DType t, size_t bytes) {
  coll::detail::set_isa(isa);
  const size_t n = bytes / weft::dtype_size(t);
  std::vector<uint8_t> dst(bytes), src(bytes);
  fill(dst, t);
  fill(src, t);
  for (auto _ : state) {
    coll::reduce(dst.data(), src.data(), n, t, ReduceOp::Sum);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
}

// bytes: of the 16-bit source segment (the float32 accumulator is twice that).
void bench_accumulate(benchmark::State& state, coll::detail::Isa isa, DType t, size_t bytes) {
  coll::detail::set_isa(isa);
  const size_t n = bytes / weft::dtype_size(t);
  std::vector<float> acc(n, 1.0f);
  std::vector<uint8_t> src(bytes);
  fill(src, t);
  for (auto _ : state) {
    coll::accumulate_f32(acc.data(), src.data(), n, t, ReduceOp::Sum);
    benchmark::DoNotOptimize(acc.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
}

std::string size_name(size_t bytes) {
  if (bytes >= (size_t{1} << 20)) return std::to_string(bytes >> 20) + "MiB";
  return std::to_string(bytes >> 10) + "KiB";
}

}  // namespace

int main(int argc, char** argv) {
  const size_t sizes[] = {size_t{4} << 10, size_t{64} << 10, size_t{1} << 20, size_t{16} << 20};
  for (coll::detail::Isa isa : coll::detail::supported_isas()) {
    const std::string isa_name = coll::detail::isa_name(isa);
    for (DType t : {DType::Float32, DType::Float16, DType::BFloat16}) {
      for (size_t bytes : sizes) {
        benchmark::RegisterBenchmark(
            ("reduce_sum/" + isa_name + "/" + weft::dtype_name(t) + "/" + size_name(bytes)).c_str(),
            bench_reduce, isa, t, bytes);
      }
    }
    for (DType t : {DType::Float16, DType::BFloat16}) {
      for (size_t bytes : sizes) {
        benchmark::RegisterBenchmark(
            ("accumulate_f32_sum/" + isa_name + "/" + weft::dtype_name(t) + "/" + size_name(bytes))
                .c_str(),
            bench_accumulate, isa, t, bytes);
      }
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
