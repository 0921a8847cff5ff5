#include "collectives/cases.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>

namespace weft::testing {
namespace {

// Inputs are small integers, exact in every dtype, so that every algorithm
// (whatever its order of operations) must produce exactly the reference.
double value(int rank, size_t i, ReduceOp op) {
  if (op == ReduceOp::Prod) return 1.0 + static_cast<double>((static_cast<size_t>(rank) + i) % 2);
  return static_cast<double>((static_cast<size_t>(rank) * 7 + i * 3) % 10 + 1);
}

void put(void* p, DType t, size_t i, double v) {
  switch (t) {
    case DType::Float32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case DType::Float64: static_cast<double*>(p)[i] = v; break;
    case DType::Float16: static_cast<Half*>(p)[i] = float_to_half(static_cast<float>(v)); break;
    case DType::BFloat16:
      static_cast<BFloat16*>(p)[i] = float_to_bfloat16(static_cast<float>(v));
      break;
    case DType::Int32:
      static_cast<int32_t*>(p)[i] = static_cast<int32_t>(static_cast<int64_t>(v));
      break;
    case DType::Int64: static_cast<int64_t*>(p)[i] = static_cast<int64_t>(v); break;
    case DType::UInt8:
      static_cast<uint8_t*>(p)[i] =
          static_cast<uint8_t>(static_cast<uint64_t>(static_cast<int64_t>(v)));
      break;
  }
}

double get(const void* p, DType t, size_t i) {
  switch (t) {
    case DType::Float32: return static_cast<const float*>(p)[i];
    case DType::Float64: return static_cast<const double*>(p)[i];
    case DType::Float16: return half_to_float(static_cast<const Half*>(p)[i]);
    case DType::BFloat16: return bfloat16_to_float(static_cast<const BFloat16*>(p)[i]);
    case DType::Int32: return static_cast<const int32_t*>(p)[i];
    case DType::Int64: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case DType::UInt8: return static_cast<const uint8_t*>(p)[i];
  }
  return 0;
}

// op over ranks of value(r, i), wrapped like the dtype (uint8).
double reference(ReduceOp op, int n, size_t i, DType t) {
  double acc = value(0, i, op);
  for (int r = 1; r < n; ++r) {
    double v = value(r, i, op);
    switch (op) {
      case ReduceOp::Sum:
      case ReduceOp::Avg: acc += v; break;
      case ReduceOp::Prod: acc *= v; break;
      case ReduceOp::Min: acc = std::min(acc, v); break;
      case ReduceOp::Max: acc = std::max(acc, v); break;
    }
  }
  if (t == DType::UInt8) acc = static_cast<double>(static_cast<uint8_t>(static_cast<int64_t>(acc)));
  if (op == ReduceOp::Avg) acc /= n;
  return acc;
}

class Runner {
 public:
  Runner(Communicator& c, const CaseOptions& o) : c_(c), o_(o), n_(c.size()), r_(c.rank()) {}

  CaseReport run() {
    std::vector<size_t> sizes = {
        0, 1, static_cast<size_t>(n_ > 1 ? n_ - 1 : 2), static_cast<size_t>(n_ + 1), 1003, 300001};
    for (int k = 1; k <= 11; ++k) {
      auto kind = static_cast<Collective>(k);
      if (!o_.only.empty() && std::find(o_.only.begin(), o_.only.end(), kind) == o_.only.end())
        continue;
      for (Algorithm a : algorithms(kind)) {
        for (int d = 0; d < kNumDTypes; ++d) {
          auto dt = static_cast<DType>(d);
          for (ReduceOp op : ops(kind)) {
            if (op == ReduceOp::Avg && !dtype_is_floating(dt)) continue;
            for (size_t count : sizes) {
              // The largest size only for sum, to keep the matrix short.
              if (count > 100000 && op != ReduceOp::Sum) continue;
              run_case(kind, a, dt, op, count);
            }
          }
        }
      }
    }
    // Finalizing reductions (avg; the rounding of 16-bit types) on a
    // payload that shared memory hands to the ring in pieces
    // (Request::consume).
    if (o_.only.empty() ||
        std::find(o_.only.begin(), o_.only.end(), Collective::Allreduce) != o_.only.end()) {
      for (DType dt : {DType::Float32, DType::Float16, DType::BFloat16}) {
        run_case(Collective::Allreduce, Algorithm::Ring, dt, ReduceOp::Avg, 300001);
      }
    }
    if (o_.large) {
      run_case(Collective::Allreduce, Algorithm::Auto, DType::Float32, ReduceOp::Sum, 16u << 20);
      run_case(Collective::Allreduce, Algorithm::Ring, DType::Float32, ReduceOp::Sum, 16u << 20);
      run_case(Collective::Allreduce, Algorithm::Hierarchical, DType::Float32, ReduceOp::Sum,
               16u << 20);
      run_case(Collective::Allgather, Algorithm::Auto, DType::Float32, ReduceOp::Sum,
               (16u << 20) / n_);
    }
    return report_;
  }

 private:
  static std::vector<Algorithm> algorithms(Collective k) {
    switch (k) {
      case Collective::Barrier: return {Algorithm::Auto};
      case Collective::Broadcast:
        return {Algorithm::Auto, Algorithm::Tree, Algorithm::Ring, Algorithm::Hierarchical};
      case Collective::Allreduce:
        return {Algorithm::Auto, Algorithm::RecursiveDoubling, Algorithm::HalvingDoubling,
                Algorithm::Ring, Algorithm::Hierarchical};
      case Collective::Allgather:
      case Collective::Allgatherv:
        return {Algorithm::Auto, Algorithm::Ring, Algorithm::Hierarchical};
      case Collective::Reduce: return {Algorithm::Auto, Algorithm::Tree, Algorithm::Ring};
      case Collective::Gather:
      case Collective::Scatter: return {Algorithm::Auto, Algorithm::Tree, Algorithm::Linear};
      default: return {Algorithm::Auto};
    }
  }
  static std::vector<ReduceOp> ops(Collective k) {
    if (k == Collective::Allreduce || k == Collective::Reduce || k == Collective::ReduceScatter) {
      return {ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Min, ReduceOp::Max, ReduceOp::Prod};
    }
    return {ReduceOp::Sum};
  }

  void fail(const std::string& what) {
    if (report_.failures.size() < 50)
      report_.failures.push_back(fmt::format("rank {}: {}", r_, what));
  }

  // Compares element i of got with the reference value.
  bool same(const void* got, DType t, size_t i, double expect, ReduceOp op) {
    if (op == ReduceOp::Avg) {
      double g = get(got, t, i);
      double tol = (t == DType::Float16 || t == DType::BFloat16) ? 0.02 : 1e-6;
      return std::fabs(g - expect) <= tol * std::max(1.0, std::fabs(expect));
    }
    std::vector<uint8_t> e(dtype_size(t));
    put(e.data(), t, 0, expect);
    return std::memcmp(e.data(), static_cast<const uint8_t*>(got) + i * dtype_size(t),
                       dtype_size(t)) == 0;
  }

  void check(const std::string& what, const void* got, DType t, size_t count,
             const std::function<double(size_t)>& expect, ReduceOp op = ReduceOp::Sum) {
    for (size_t i = 0; i < count; ++i) {
      double e = expect(i);
      if (!same(got, t, i, e, op)) {
        fail(fmt::format("{}: element {} is {} instead of {}", what, i, get(got, t, i), e));
        return;
      }
    }
  }

  void run_case(Collective kind, Algorithm algo, DType t, ReduceOp op, size_t count) {
    ++report_.cases;
    const size_t es = dtype_size(t), n = static_cast<size_t>(n_);
    const bool in_place = (count % 2) == 1;  // alternate the in-place and out-of-place forms
    const int root = static_cast<int>(count % n);
    std::string what =
        fmt::format("{} {} {} {} count {}{}", collective_name(kind), algorithm_name(algo),
                    dtype_name(t), reduce_op_name(op), count, in_place ? " in-place" : "");
    auto fill = [&](std::vector<uint8_t>& b, size_t elems, const std::function<double(size_t)>& f) {
      b.assign(std::max<size_t>(1, elems * es), 0xcd);
      for (size_t i = 0; i < elems; ++i) put(b.data(), t, i, f(i));
    };
    std::vector<uint8_t> in, out;
    switch (kind) {
      case Collective::Barrier: c_.barrier(); return;
      case Collective::Broadcast: {
        fill(out, count, [&](size_t i) { return r_ == root ? value(root, i, op) : -1; });
        BroadcastOptions bo{root, kDefaultTimeout, algo};
        c_.broadcast(Buffer(out.data(), count, t), bo);
        check(what, out.data(), t, count, [&](size_t i) { return value(root, i, op); });
        return;
      }
      case Collective::Allreduce: {
        fill(in, count, [&](size_t i) { return value(r_, i, op); });
        AllreduceOptions ao{op, kDefaultTimeout, algo};
        if (in_place) {
          c_.allreduce(Buffer(in.data(), count, t), ao);
          out = in;
        } else {
          out.assign(std::max<size_t>(1, count * es), 0xcd);
          c_.allreduce(ConstBuffer(in.data(), count, t), Buffer(out.data(), count, t), ao);
          check(what + " (input kept)", in.data(), t, count,
                [&](size_t i) { return value(r_, i, op); });
        }
        check(
            what, out.data(), t, count, [&](size_t i) { return reference(op, n_, i, t); }, op);
        if (op == ReduceOp::Avg && count > 0) identical_everywhere(what, out.data(), count * es);
        return;
      }
      case Collective::Reduce: {
        fill(in, count, [&](size_t i) { return value(r_, i, op); });
        ReduceOptions ro{op, root, kDefaultTimeout, algo};
        if (in_place && r_ == root) {
          c_.reduce(ConstBuffer(in.data(), count, t), Buffer(in.data(), count, t), ro);
          out = in;
        } else {
          out.assign(std::max<size_t>(1, count * es), 0xcd);
          c_.reduce(ConstBuffer(in.data(), count, t), Buffer(out.data(), r_ == root ? count : 0, t),
                    ro);
        }
        if (r_ == root)
          check(
              what, out.data(), t, count, [&](size_t i) { return reference(op, n_, i, t); }, op);
        return;
      }
      case Collective::ReduceScatter: {
        fill(in, count * n, [&](size_t i) { return value(r_, i, op); });
        ReduceScatterOptions so{op, kDefaultTimeout, algo};
        const uint8_t* got;
        if (in_place) {
          c_.reduce_scatter(ConstBuffer(in.data(), count * n, t),
                            Buffer(in.data() + r_ * count * es, count, t), so);
          got = in.data() + r_ * count * es;
        } else {
          out.assign(std::max<size_t>(1, count * es), 0xcd);
          c_.reduce_scatter(ConstBuffer(in.data(), count * n, t), Buffer(out.data(), count, t), so);
          got = out.data();
        }
        check(
            what, got, t, count, [&](size_t i) { return reference(op, n_, r_ * count + i, t); },
            op);
        return;
      }
      case Collective::Allgather: {
        CollectiveOptions co{kDefaultTimeout, algo};
        out.assign(std::max<size_t>(1, count * n * es), 0xcd);
        if (in_place) {
          for (size_t i = 0; i < count; ++i)
            put(out.data() + r_ * count * es, t, i, value(r_, i, op));
          c_.allgather(ConstBuffer(out.data() + r_ * count * es, count, t),
                       Buffer(out.data(), count * n, t), co);
        } else {
          fill(in, count, [&](size_t i) { return value(r_, i, op); });
          c_.allgather(ConstBuffer(in.data(), count, t), Buffer(out.data(), count * n, t), co);
        }
        check(what, out.data(), t, count * n, [&](size_t i) {
          return value(static_cast<int>(i / std::max<size_t>(1, count)),
                       i % std::max<size_t>(1, count), op);
        });
        return;
      }
      case Collective::Allgatherv: {
        std::vector<size_t> counts(n), offs(n + 1, 0);
        for (size_t j = 0; j < n; ++j) {
          counts[j] = (count + j) % 4 + count / 2;
          offs[j + 1] = offs[j] + counts[j];
        }
        fill(in, counts[r_], [&](size_t i) { return value(r_, i, op); });
        out.assign(std::max<size_t>(1, offs[n] * es), 0xcd);
        c_.allgatherv(ConstBuffer(in.data(), counts[r_], t), Buffer(out.data(), offs[n], t), counts,
                      CollectiveOptions{kDefaultTimeout, algo});
        for (size_t j = 0; j < n; ++j) {
          check(what + fmt::format(" block {}", j), out.data() + offs[j] * es, t, counts[j],
                [&](size_t i) { return value(static_cast<int>(j), i, op); });
        }
        return;
      }
      case Collective::Gather: {
        RootedOptions go{root, kDefaultTimeout, algo};
        out.assign(std::max<size_t>(1, count * n * es), 0xcd);
        if (in_place && r_ == root) {
          for (size_t i = 0; i < count; ++i)
            put(out.data() + r_ * count * es, t, i, value(r_, i, op));
          c_.gather(ConstBuffer(out.data() + r_ * count * es, count, t),
                    Buffer(out.data(), count * n, t), go);
        } else {
          fill(in, count, [&](size_t i) { return value(r_, i, op); });
          c_.gather(ConstBuffer(in.data(), count, t),
                    Buffer(out.data(), r_ == root ? count * n : 0, t), go);
        }
        if (r_ == root) {
          check(what, out.data(), t, count * n, [&](size_t i) {
            return value(static_cast<int>(i / std::max<size_t>(1, count)),
                         i % std::max<size_t>(1, count), op);
          });
        }
        return;
      }
      case Collective::Scatter: {
        RootedOptions so{root, kDefaultTimeout, algo};
        fill(in, count * n, [&](size_t i) {
          return value(root * 100 + static_cast<int>(i / std::max<size_t>(1, count)), i, op);
        });
        out.assign(std::max<size_t>(1, count * es), 0xcd);
        if (in_place && r_ == root) {
          c_.scatter(ConstBuffer(in.data(), count * n, t),
                     Buffer(in.data() + r_ * count * es, count, t), so);
          check(what, in.data() + r_ * count * es, t, count,
                [&](size_t i) { return value(root * 100 + r_, r_ * count + i, op); });
        } else {
          c_.scatter(ConstBuffer(in.data(), r_ == root ? count * n : 0, t),
                     Buffer(out.data(), count, t), so);
          check(what, out.data(), t, count,
                [&](size_t i) { return value(root * 100 + r_, r_ * count + i, op); });
        }
        return;
      }
      case Collective::Alltoall: {
        // Block j of rank r's input (for rank j) holds value(r * 31 + j, i).
        fill(in, count * n, [&](size_t i) {
          return value(r_ * 31 + static_cast<int>(i / std::max<size_t>(1, count)),
                       i % std::max<size_t>(1, count), op);
        });
        out.assign(std::max<size_t>(1, count * n * es), 0xcd);
        c_.alltoall(ConstBuffer(in.data(), count * n, t), Buffer(out.data(), count * n, t),
                    CollectiveOptions{kDefaultTimeout, algo});
        check(what, out.data(), t, count * n, [&](size_t i) {
          return value(static_cast<int>(i / std::max<size_t>(1, count)) * 31 + r_,
                       i % std::max<size_t>(1, count), op);
        });
        return;
      }
      case Collective::Alltoallv: {
        auto amount = [&](size_t from, size_t to) {
          return (from + 2 * to + count) % 5 + count / 3;
        };
        std::vector<size_t> sc(n), rc(n), soff(n + 1, 0), roff(n + 1, 0);
        for (size_t j = 0; j < n; ++j) {
          sc[j] = amount(r_, j);
          rc[j] = amount(j, r_);
          soff[j + 1] = soff[j] + sc[j];
          roff[j + 1] = roff[j] + rc[j];
        }
        in.assign(std::max<size_t>(1, soff[n] * es), 0xcd);
        for (size_t j = 0; j < n; ++j) {
          for (size_t i = 0; i < sc[j]; ++i)
            put(in.data() + soff[j] * es, t, i, value(r_ * 31 + static_cast<int>(j), i, op));
        }
        out.assign(std::max<size_t>(1, roff[n] * es), 0xcd);
        c_.alltoallv(ConstBuffer(in.data(), soff[n], t), sc, Buffer(out.data(), roff[n], t), rc,
                     CollectiveOptions{kDefaultTimeout, algo});
        for (size_t j = 0; j < n; ++j) {
          check(what + fmt::format(" from {}", j), out.data() + roff[j] * es, t, rc[j],
                [&](size_t i) { return value(static_cast<int>(j) * 31 + r_, i, op); });
        }
        return;
      }
    }
  }

  // Every rank holds the same bytes (the results of reductions must not drift apart).
  void identical_everywhere(const std::string& what, const uint8_t* data, size_t bytes) {
    std::vector<uint8_t> all(bytes * static_cast<size_t>(n_));
    c_.allgather(ConstBuffer(data, bytes, DType::UInt8),
                 Buffer(all.data(), all.size(), DType::UInt8));
    for (int j = 0; j < n_; ++j) {
      if (std::memcmp(all.data() + j * bytes, data, bytes) != 0) {
        fail(fmt::format("{}: rank {} holds different bits", what, j));
        return;
      }
    }
  }

  Communicator& c_;
  CaseOptions o_;
  const int n_, r_;
  CaseReport report_;
};

}  // namespace

CaseReport run_collective_cases(Communicator& comm, const CaseOptions& options) {
  return Runner(comm, options).run();
}

}  // namespace weft::testing
