// The training engine without a tensor library: bucket plans, buckets
// filled out of order, BSP equivalence with one big batch, local SGD
// averaging, state buffers, the model check, misuse, LR schedules and the
// sampler as a training loop uses it. Ranks are threads with a MemoryStore.
#include "weft/train.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>

#include "testing/testing.h"
#include "weft/data.h"
#include "weft/weft.h"

namespace weft::train {
namespace {

using namespace std::chrono_literals;
using testing::run_ranks;
using testing::run_ranks_ok;

std::shared_ptr<Communicator> make_comm(int rank, int size, const std::shared_ptr<Store>& store) {
  CommOptions o;
  o.timeout = 60s;
  o.job_token = "train-test";
  return Communicator::create(rank, size, store, o);
}

Parameter param(std::string name, std::vector<float>& data, std::vector<float>* grad = nullptr) {
  return Parameter{std::move(name),
                   DType::Float32,
                   {static_cast<int64_t>(data.size())},
                   data.data(),
                   grad ? grad->data() : nullptr};
}

Parameter sized(size_t numel, DType dtype = DType::Float32, bool trainable = true) {
  Parameter p;
  p.name = "p";
  p.dtype = dtype;
  p.shape = {static_cast<int64_t>(numel)};
  p.trainable = trainable;
  return p;
}

// ---- Bucket plans ----------------------------------------------------------

TEST(Buckets, ReverseOrderFirstSmallLastPartial) {
  // 10 float32 parameters of 100 elements (400 bytes) each.
  std::vector<Parameter> ps(10, sized(100));
  auto plan = assign_buckets(ps, {.bucket_bytes = 1200, .first_bucket_bytes = 400});
  ASSERT_EQ(plan.size(), 4u);
  EXPECT_EQ(plan[0].params, (std::vector<size_t>{9}));  // first bucket: small
  EXPECT_EQ(plan[1].params, (std::vector<size_t>{8, 7, 6}));
  EXPECT_EQ(plan[2].params, (std::vector<size_t>{5, 4, 3}));
  EXPECT_EQ(plan[3].params, (std::vector<size_t>{2, 1, 0}));  // last: partial would be fine too
  EXPECT_EQ(plan[1].offsets, (std::vector<size_t>{0, 100, 200}));
  EXPECT_EQ(plan[1].numel, 300u);
  EXPECT_EQ(plan[1].bytes(), 1200u);

  std::vector<Parameter> ps2(8, sized(100));
  auto plan2 = assign_buckets(ps2, {.bucket_bytes = 1200, .first_bucket_bytes = 400});
  ASSERT_EQ(plan2.size(), 4u);
  EXPECT_EQ(plan2[3].params, (std::vector<size_t>{0}));  // the last bucket is partial
}

TEST(Buckets, ManySizesDtypesFrozenAndHugeParameters) {
  std::mt19937 rng(7);
  std::vector<Parameter> ps;
  const DType types[] = {DType::Float32, DType::Float64, DType::Float16};
  for (int i = 0; i < 200; ++i) {
    size_t n = std::uniform_int_distribution<size_t>(0, 5000)(rng);
    if (i % 37 == 0) n = 100000;  // larger than any bucket
    ps.push_back(sized(n, types[i % 3], i % 11 != 5));
  }
  BucketOptions opts{.bucket_bytes = 16384, .first_bucket_bytes = 1024};
  auto plan = assign_buckets(ps, opts);
  std::vector<int> seen(ps.size(), 0);
  std::vector<int> closed(kNumDTypes, 0);
  for (const Bucket& b : plan) {
    ASSERT_FALSE(b.params.empty());
    size_t off = 0;
    for (size_t k = 0; k < b.params.size(); ++k) {
      const Parameter& p = ps[b.params[k]];
      EXPECT_EQ(p.dtype, b.dtype);
      EXPECT_TRUE(p.trainable);
      EXPECT_EQ(b.offsets[k], off);
      off += p.numel();
      seen[b.params[k]] += 1;
      if (k > 0) {
        EXPECT_LT(b.params[k], b.params[k - 1]);  // reverse order within a bucket
      }
    }
    EXPECT_EQ(b.numel, off);
    // Only the last parameter may take a bucket over its limit.
    const size_t limit =
        closed[static_cast<int>(b.dtype)]++ ? opts.bucket_bytes : opts.first_bucket_bytes;
    const size_t without_last = (b.numel - ps[b.params.back()].numel()) * dtype_size(b.dtype);
    EXPECT_LT(without_last, limit);
  }
  for (size_t i = 0; i < ps.size(); ++i) EXPECT_EQ(seen[i], ps[i].trainable ? 1 : 0) << i;
  // Buckets are ordered by their first (highest-index) parameter, descending.
  for (size_t b = 1; b < plan.size(); ++b) EXPECT_GT(plan[b - 1].params[0], plan[b].params[0]);
  EXPECT_THROW(assign_buckets(ps, {.bucket_bytes = 0}), InvalidArgument);
  EXPECT_TRUE(assign_buckets(std::span<const Parameter>{}).empty());
}

// ---- Buckets at work -------------------------------------------------------

// Gradients of many sizes, some in their engine slot, some in the caller's
// memory, some never reported; every rank reports them in its own random
// order (so buckets fill out of order, differently on each rank). After
// finish_gradients() each gradient is the average over the ranks.
TEST(DataParallel, BucketsFilledOutOfOrderAverageEverything) {
  const int n = 3;
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(n, [&](int r) {
    auto comm = make_comm(r, n, store);
    std::mt19937 sizes_rng(1);  // same model on every rank
    const size_t count = 60;
    std::vector<std::vector<float>> values(count), grads(count);
    std::vector<Parameter> ps;
    for (size_t i = 0; i < count; ++i) {
      size_t numel = std::uniform_int_distribution<size_t>(1, 3000)(sizes_rng);
      if (i == 17) numel = 20000;
      values[i].assign(numel, 0.f);
      grads[i].assign(numel, 0.f);
      // Every third parameter keeps its gradient in the engine's slot.
      ps.push_back(param(fmt::format("p{}", i), values[i], i % 3 == 0 ? nullptr : &grads[i]));
    }
    DataParallelOptions opts;
    opts.buckets = {.bucket_bytes = 8192, .first_bucket_bytes = 512};
    DataParallel dp(comm, ps, {}, opts);
    ASSERT_GT(dp.buckets().size(), 10u);
    std::mt19937 order_rng(100 + r);  // a different order on every rank
    for (int step = 0; step < 3; ++step) {
      auto value = [&](int rank, size_t i, size_t j) {
        return static_cast<float>((rank + 1) * (step + 1)) + static_cast<float>(i % 5) * 0.5f +
               static_cast<float>(j % 3);
      };
      std::vector<size_t> order(count);
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), order_rng);
      for (size_t i : order) {
        float* g = i % 3 == 0 ? static_cast<float*>(dp.grad_slot(i).data()) : grads[i].data();
        for (size_t j = 0; j < values[i].size(); ++j) g[j] = value(r, i, j);
        if (i % 7 != 3) dp.grad_ready(i);  // the others are never reported
      }
      dp.finish_gradients();
      for (size_t i = 0; i < count; ++i) {
        const float* g =
            i % 3 == 0 ? static_cast<const float*>(dp.grad_slot(i).data()) : grads[i].data();
        for (size_t j = 0; j < values[i].size(); ++j) {
          float expect = 0;
          for (int q = 0; q < n; ++q) expect += value(q, i, j);
          expect /= n;
          ASSERT_NEAR(g[j], expect, 1e-4f) << "param " << i << " element " << j << " step " << step;
        }
      }
      dp.end_step();
    }
    EXPECT_EQ(dp.step(), 3);
    auto st = dp.stats();
    EXPECT_EQ(st.averaged_steps, 3);
    EXPECT_EQ(st.bucket_allreduces, 3 * static_cast<int64_t>(dp.buckets().size()));
  });
}

// ---- Start: broadcast and model check -------------------------------------

TEST(DataParallel, BroadcastsRankZeroModelAndBuffersAtStart) {
  const int n = 3;
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(n, [&](int r) {
    auto comm = make_comm(r, n, store);
    std::vector<float> w(1000, static_cast<float>(r + 1)), b(10, static_cast<float>(-r));
    std::vector<double> running(7, r * 10.0);
    std::vector<int64_t> counter(1, 100 + r);
    std::vector<Parameter> ps = {param("w", w), param("b", b)};
    ps[1].trainable = false;
    std::vector<StateBuffer> bufs = {{"running", DType::Float64, {7}, running.data()},
                                     {"counter", DType::Int64, {}, counter.data()}};
    DataParallel dp(comm, ps, bufs);
    for (float x : w) ASSERT_EQ(x, 1.f);
    for (float x : b) ASSERT_EQ(x, 0.f);
    for (double x : running) ASSERT_EQ(x, 0.0);
    EXPECT_EQ(counter[0], 100);
    EXPECT_EQ(dp.buckets().size(), 1u);  // b is frozen
    EXPECT_THROW(dp.grad_slot(1), InvalidArgument);
  });
}

void expect_mismatch(const std::function<std::vector<Parameter>(int, std::vector<float>&)>& model,
                     const std::vector<std::string>& parts) {
  const int n = 3;
  auto store = std::make_shared<MemoryStore>();
  auto errors = run_ranks(n, [&](int r) {
    auto comm = make_comm(r, n, store);
    std::vector<float> storage(100000, 0.f);
    DataParallel dp(comm, model(r, storage));
  });
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(errors[r]) << "rank " << r << " did not fail";
    try {
      std::rethrow_exception(errors[r]);
    } catch (const InvalidArgument& e) {
      for (const auto& p : parts)
        EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "rank " << r << ": unexpected " << e.what();
    }
  }
}

TEST(DataParallel, ModelsThatDifferFailOnEveryRankNamingTheParameter) {
  auto make = [](std::vector<float>& s, std::vector<std::pair<std::string, int64_t>> spec) {
    std::vector<Parameter> ps;
    size_t off = 0;
    for (auto& [name, len] : spec) {
      ps.push_back({name, DType::Float32, {len}, s.data() + off, nullptr});
      off += static_cast<size_t>(len);
    }
    return ps;
  };
  // A different shape on rank 2.
  expect_mismatch(
      [&](int r, std::vector<float>& s) {
        return make(s,
                    {{"conv.weight", 288}, {"fc.weight", r == 2 ? 1000 : 1280}, {"fc.bias", 10}});
      },
      {"'fc.weight'", "[1280]", "[1000]", "rank 2", "rank 0"});
  // A different name on rank 1 (and a different shape on rank 2, later).
  expect_mismatch(
      [&](int r, std::vector<float>& s) {
        return make(s, {{"a", 5}, {r == 1 ? "bb" : "b", 5}, {"c", r == 2 ? 6 : 5}});
      },
      {"'b'", "'bb'", "rank 1"});
  // A parameter missing on rank 1.
  expect_mismatch(
      [&](int r, std::vector<float>& s) {
        if (r == 1) return make(s, {{"a", 5}});
        return make(s, {{"a", 5}, {"b", 5}});
      },
      {"'b'", "rank 1", "nothing"});
}

// ---- BSP equivalence -------------------------------------------------------

// Linear regression y = x.w + b with loss mean((x.w + b - y)^2) / 2 and SGD
// with momentum, gradients computed by hand.
struct Linear {
  static constexpr int kIn = 13;
  std::vector<float> w = std::vector<float>(kIn), b = std::vector<float>(1);
  std::vector<float> gw = std::vector<float>(kIn), gb = std::vector<float>(1);
  std::vector<float> mw = std::vector<float>(kIn), mb = std::vector<float>(1);

  void init(uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> d(0.f, 1.f);
    for (float& x : w) x = d(rng);
    b[0] = d(rng);
  }
  // Gradient of the mean loss over samples [first, first + count).
  void gradient(const std::vector<float>& x, const std::vector<float>& y, size_t first,
                size_t count) {
    std::fill(gw.begin(), gw.end(), 0.f);
    gb[0] = 0;
    for (size_t i = first; i < first + count; ++i) {
      float err = b[0] - y[i];
      for (int k = 0; k < kIn; ++k) err += x[i * kIn + k] * w[k];
      for (int k = 0; k < kIn; ++k) gw[k] += err * x[i * kIn + k] / static_cast<float>(count);
      gb[0] += err / static_cast<float>(count);
    }
  }
  void sgd(float lr) {
    for (int k = 0; k < kIn; ++k) {
      mw[k] = 0.9f * mw[k] + gw[k];
      w[k] -= lr * mw[k];
    }
    mb[0] = 0.9f * mb[0] + gb[0];
    b[0] -= lr * mb[0];
  }
  std::vector<Parameter> parameters() { return {param("w", w, &gw), param("b", b, &gb)}; }
};

struct Regression {
  std::vector<float> x, y;
  explicit Regression(size_t n) : x(n * Linear::kIn), y(n) {
    std::mt19937 rng(3);
    std::normal_distribution<float> d(0.f, 1.f);
    for (float& v : x) v = d(rng);
    for (size_t i = 0; i < n; ++i) {
      y[i] = 0.5f;
      for (int k = 0; k < Linear::kIn; ++k)
        y[i] += x[i * Linear::kIn + k] * static_cast<float>(k % 4 - 1);
    }
  }
};

TEST(DataParallel, BspWithNWorkersEqualsOneWorkerWithNTimesTheBatch) {
  const int n = 4, batch = 8, steps = 25;
  Regression data(n * batch * steps);
  Linear single;
  single.init(42);
  for (int s = 0; s < steps; ++s) {
    single.gradient(data.x, data.y, static_cast<size_t>(s * n * batch), n * batch);
    single.sgd(0.05f);
  }
  auto store = std::make_shared<MemoryStore>();
  std::vector<Linear> replicas(n);
  run_ranks_ok(n, [&](int r) {
    auto comm = make_comm(r, n, store);
    Linear& m = replicas[r];
    m.init(r == 0 ? 42 : 1000 + r);  // rank 0's start is broadcast to the others
    DataParallel dp(comm, m.parameters());
    for (int s = 0; s < steps; ++s) {
      m.gradient(data.x, data.y, static_cast<size_t>((s * n + r) * batch), batch);
      dp.grad_ready(1);
      dp.grad_ready(0);
      dp.finish_gradients();
      m.sgd(0.05f);
      dp.end_step();
    }
  });
  Linear ref;
  ref.init(42);
  ASSERT_NE(ref.w, single.w);  // it trained
  for (int r = 0; r < n; ++r) {
    for (int k = 0; k < Linear::kIn; ++k) {
      EXPECT_NEAR(replicas[r].w[k], single.w[k], 1e-4f) << "rank " << r << " w[" << k << "]";
      EXPECT_EQ(replicas[r].w[k], replicas[0].w[k]);  // replicas never drift apart
    }
    EXPECT_NEAR(replicas[r].b[0], single.b[0], 1e-4f);
  }
}

// Uneven shares (load balancing): rank r computes the mean gradient over its
// own s_r samples of each step's B, weighted by W * s_r / B
// (set_gradient_weight); the average must then be the mean gradient of the
// B samples, as one worker computing the global batch gets it. Shares change
// every step, and one rank has no sample in some steps (weight 0: it sends
// zeros even though its gradient buffer holds NaN).
TEST(DataParallel, WeightedUnevenSharesEqualOneWorkerWithTheGlobalBatch) {
  const int n = 3, global = 24, steps = 20;
  auto shares_of = [&](int s) {
    std::vector<int> sh{4 + s % 5, 12 - s % 7, 0};
    sh[2] = global - sh[0] - sh[1];
    if (s % 4 == 3) sh[0] += sh[2], sh[2] = 0;  // rank 2 idle this step
    return sh;
  };
  Regression data(static_cast<size_t>(global * steps));
  Linear single;
  single.init(42);
  for (int s = 0; s < steps; ++s) {
    single.gradient(data.x, data.y, static_cast<size_t>(s * global), global);
    single.sgd(0.05f);
  }
  auto store = std::make_shared<MemoryStore>();
  std::vector<Linear> replicas(n);
  run_ranks_ok(n, [&](int r) {
    auto comm = make_comm(r, n, store);
    Linear& m = replicas[r];
    m.init(r == 0 ? 42 : 1000 + r);
    DataParallel dp(comm, m.parameters());
    for (int s = 0; s < steps; ++s) {
      const std::vector<int> sh = shares_of(s);
      int first = s * global;
      for (int k = 0; k < r; ++k) first += sh[k];
      const int mine = sh[static_cast<size_t>(r)];
      dp.set_gradient_weight(static_cast<double>(n) * mine / global);
      if (mine > 0) {
        m.gradient(data.x, data.y, static_cast<size_t>(first), static_cast<size_t>(mine));
      } else {
        std::fill(m.gw.begin(), m.gw.end(), std::nanf(""));
        m.gb[0] = std::nanf("");
      }
      dp.grad_ready(1);
      dp.grad_ready(0);
      dp.finish_gradients();
      m.sgd(0.05f);
      dp.end_step();
    }
  });
  Linear ref;
  ref.init(42);
  ASSERT_NE(ref.w, single.w);
  for (int r = 0; r < n; ++r) {
    for (int k = 0; k < Linear::kIn; ++k) {
      EXPECT_NEAR(replicas[r].w[k], single.w[k], 1e-4f) << "rank " << r << " w[" << k << "]";
      EXPECT_EQ(replicas[r].w[k], replicas[0].w[k]);
    }
    EXPECT_NEAR(replicas[r].b[0], single.b[0], 1e-4f);
  }
}

TEST(DataParallel, GradientWeightIsCheckedAndRefusedInsideAStep) {
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(1, [&](int r) {
    auto comm = make_comm(r, 1, store);
    Linear m;
    DataParallel dp(comm, m.parameters());
    EXPECT_DOUBLE_EQ(dp.gradient_weight(), 1.0);
    EXPECT_THROW(dp.set_gradient_weight(-1), InvalidArgument);
    EXPECT_THROW(dp.set_gradient_weight(std::nan("")), InvalidArgument);
    EXPECT_THROW(dp.set_gradient_weight(INFINITY), InvalidArgument);
    dp.set_gradient_weight(0.5);
    dp.begin_step();
    EXPECT_THROW(dp.set_gradient_weight(1), InvalidArgument);
    dp.end_step();
    EXPECT_DOUBLE_EQ(dp.gradient_weight(), 0.5);
  });
}

// ---- Local SGD ---------------------------------------------------------------

TEST(DataParallel, LocalSgdAveragesParametersEveryHStepsAfterWarmup) {
  const int n = 3, batch = 4, steps = 13, h = 3, warmup = 2;
  Regression data(static_cast<size_t>(n * batch * steps));
  // Reference: the algorithm simulated in one thread.
  std::vector<Linear> sim(n);
  for (auto& m : sim) m.init(42);
  std::vector<std::vector<float>> synced_w;  // w after each sync point
  for (int s = 0; s < steps; ++s) {
    for (int r = 0; r < n; ++r) {
      sim[r].gradient(data.x, data.y, static_cast<size_t>((s * n + r) * batch), batch);
    }
    if (s < warmup) {
      for (int k = 0; k < Linear::kIn; ++k) {
        float g = 0;
        for (auto& m : sim) g += m.gw[k];
        for (auto& m : sim) m.gw[k] = g / n;
      }
      float g = 0;
      for (auto& m : sim) g += m.gb[0];
      for (auto& m : sim) m.gb[0] = g / n;
    }
    for (auto& m : sim) m.sgd(0.05f);
    if (s >= warmup && (s - warmup + 1) % h == 0) {
      for (int k = 0; k < Linear::kIn; ++k) {
        float w = 0;
        for (auto& m : sim) w += m.w[k];
        for (auto& m : sim) m.w[k] = w / n;
      }
      float b = 0;
      for (auto& m : sim) b += m.b[0];
      for (auto& m : sim) m.b[0] = b / n;
    }
  }

  auto store = std::make_shared<MemoryStore>();
  std::vector<Linear> replicas(n);
  std::vector<std::vector<int>> equal_after(n);
  run_ranks_ok(n, [&](int r) {
    auto comm = make_comm(r, n, store);
    Linear& m = replicas[r];
    m.init(42);
    DataParallelOptions opts;
    opts.sync = SyncMode::LocalSGD;
    opts.local_steps = h;
    opts.warmup_steps = warmup;
    DataParallel dp(comm, m.parameters(), {}, opts);
    EXPECT_EQ(dp.policy().name(), "local-sgd(H=3, warmup=2)");
    for (int s = 0; s < steps; ++s) {
      m.gradient(data.x, data.y, static_cast<size_t>((s * n + r) * batch), batch);
      dp.grad_ready(0);
      dp.grad_ready(1);
      dp.finish_gradients();
      m.sgd(0.05f);
      dp.end_step();
      // Every rank checks whether the ranks agree, with an allreduce of w.
      std::vector<float> max_w = m.w, min_w = m.w;
      comm->allreduce(max_w, ReduceOp::Max);
      comm->allreduce(min_w, ReduceOp::Min);
      if (max_w == min_w) equal_after[r].push_back(s);
    }
    EXPECT_TRUE(dp.policy().parameters_may_differ(dp.step()));  // 11 local steps, 11 % 3 != 0
    const auto before = dp.stats().parameter_averages;
    dp.synchronize();
    EXPECT_EQ(dp.stats().parameter_averages, before + 1);
    dp.synchronize();  // no-op: nothing changed since
    EXPECT_EQ(dp.stats().parameter_averages, before + 1);
  });
  // Ranks agree after the warm-up steps and after every H-th local step only.
  const std::vector<int> expect_equal = {0, 1, 4, 7, 10};
  for (int r = 0; r < n; ++r) EXPECT_EQ(equal_after[r], expect_equal) << "rank " << r;
  // Before the final synchronize() the replicas matched the simulation; after
  // it they all hold the simulation's average.
  for (int k = 0; k < Linear::kIn; ++k) {
    float avg = 0;
    for (auto& m : sim) avg += m.w[k];
    avg /= n;
    for (int r = 0; r < n; ++r) EXPECT_NEAR(replicas[r].w[k], avg, 1e-5f) << r << " " << k;
  }
}

// ---- State buffers ---------------------------------------------------------

TEST(DataParallel, BspAveragesFloatingBuffersAndCopiesCountersEachStep) {
  const int n = 2;
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(n, [&](int r) {
    auto comm = make_comm(r, n, store);
    std::vector<float> w(10, 0.f), gw(10, 0.f);
    std::vector<float> mean(4, 0.f);
    std::vector<int32_t> count(1, 0);
    DataParallel dp(
        comm, {param("w", w, &gw)},
        {{"mean", DType::Float32, {4}, mean.data()}, {"count", DType::Int32, {1}, count.data()}});
    for (int s = 0; s < 2; ++s) {
      std::fill(mean.begin(), mean.end(), static_cast<float>(r * 4 + s));  // "forward"
      count[0] = 10 * (r + 1) + s;
      dp.grad_ready(0);
      dp.finish_gradients();
      for (float x : mean) EXPECT_FLOAT_EQ(x, 2.f + static_cast<float>(s));
      EXPECT_EQ(count[0], 10 + s);  // rank 0's
      dp.end_step();
    }
  });
}

// ---- Misuse ----------------------------------------------------------------

TEST(DataParallel, MisuseIsReportedClearly) {
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(2, [&](int r) {
    auto comm = make_comm(r, 2, store);
    std::vector<float> a(10), ga(10), b(5), gb(5);
    DataParallel dp(comm, {param("a", a, &ga), param("b", b, &gb)});
    EXPECT_THROW(dp.grad_ready(2), InvalidArgument);
    dp.grad_ready(0);
    try {
      dp.grad_ready(0);
      ADD_FAILURE() << "no error for a gradient reported twice";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("'a' reported twice"), std::string::npos) << e.what();
    }
    EXPECT_THROW(dp.average_parameters(), InvalidArgument);
    EXPECT_THROW(dp.synchronize(), InvalidArgument);
    dp.finish_gradients();
    dp.finish_gradients();  // harmless
    EXPECT_THROW(dp.grad_ready(1), InvalidArgument);
    dp.end_step();
    dp.grad_ready(1);  // a new step
    dp.end_step();     // finishes implicitly
    EXPECT_EQ(dp.step(), 2);
  });
  auto comm = make_comm(0, 1, std::make_shared<MemoryStore>());
  std::vector<float> a(4);
  std::vector<int32_t> ints(4);
  Parameter bad{"i", DType::Int32, {4}, ints.data()};
  EXPECT_THROW(DataParallel(comm, {bad}), InvalidArgument);
  EXPECT_THROW(DataParallel(comm, {param("a", a), param("a", a)}), InvalidArgument);
  EXPECT_THROW(DataParallel(nullptr, {param("a", a)}), InvalidArgument);
  DataParallelOptions opts;
  opts.sync = SyncMode::LocalSGD;
  opts.local_steps = 0;
  EXPECT_THROW(DataParallel(comm, {param("a", a)}, {}, opts), InvalidArgument);
}

// Asking whether a step averages its gradients changes nothing: the policy
// is asked once, when the step opens (begin_step() or the first
// grad_ready()), and an idle engine stays idle (so average_parameters()
// between steps still works after the question).
class CountingPolicy final : public SyncPolicy {
 public:
  std::string name() const override { return "counting"; }
  bool average_gradients(int64_t step) override {
    ++asked;
    return step % 2 == 0;
  }
  void after_update(int64_t, DataParallel&) override {}
  bool parameters_may_differ(int64_t) const override { return true; }
  int asked = 0;
};

TEST(DataParallel, StepQueriesHaveNoSideEffects) {
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(2, [&](int r) {
    auto comm = make_comm(r, 2, store);
    std::vector<float> a(10, static_cast<float>(r)), ga(10, static_cast<float>(r));
    auto policy = std::make_shared<CountingPolicy>();
    DataParallelOptions opts;
    opts.policy = policy;
    DataParallel dp(comm, {param("a", a, &ga)}, {}, opts);

    // Idle: the questions are answered without asking the policy.
    EXPECT_FALSE(dp.step_open());
    try {
      (void)dp.step_averages_gradients();
      ADD_FAILURE() << "no error for a question about a step that is not open";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("begin_step()"), std::string::npos) << e.what();
    }
    EXPECT_EQ(policy->asked, 0);
    EXPECT_FALSE(dp.step_open());
    std::fill(a.begin(), a.end(), static_cast<float>(r));
    dp.average_parameters();  // still between steps
    EXPECT_EQ(a[0], 0.5f);

    // Step 0 (averaged): opened explicitly, asked about any number of times.
    dp.begin_step();
    dp.begin_step();
    EXPECT_TRUE(dp.step_open());
    EXPECT_TRUE(dp.step_averages_gradients());
    EXPECT_TRUE(dp.step_averages_gradients());
    EXPECT_EQ(policy->asked, 1);
    EXPECT_THROW(dp.average_parameters(), InvalidArgument);
    std::fill(ga.begin(), ga.end(), static_cast<float>(r));
    dp.grad_ready(0);
    dp.finish_gradients();
    EXPECT_EQ(ga[0], 0.5f);
    EXPECT_EQ(policy->asked, 1);
    dp.end_step();
    EXPECT_FALSE(dp.step_open());

    // Step 1 (not averaged): opened by its first gradient.
    std::fill(ga.begin(), ga.end(), static_cast<float>(r));
    dp.grad_ready(0);
    EXPECT_EQ(policy->asked, 2);
    EXPECT_FALSE(dp.step_averages_gradients());
    dp.end_step();
    EXPECT_EQ(ga[0], static_cast<float>(r));
    EXPECT_EQ(policy->asked, 2);
  });
}

// A rank that abandons a step with a bucket in flight (an exception during
// backward destroys its engine) makes its peer fail fast, not hang until the
// deadline.
TEST(DataParallel, AbandonedStepFailsThePeerQuickly) {
  auto store = std::make_shared<MemoryStore>();
  auto errors = run_ranks(2, [&](int r) {
    auto comm = make_comm(r, 2, store);
    std::vector<float> a(1000), ga(1000), b(1000), gb(1000);
    DataParallelOptions opts;
    opts.buckets = {.bucket_bytes = 100, .first_bucket_bytes = 100};  // one bucket each
    if (r == 0) {
      DataParallel dp(comm, {param("a", a, &ga), param("b", b, &gb)}, {}, opts);
      comm->barrier();
      dp.grad_ready(1);  // bucket 0 starts, then the step is abandoned
      return;
    }
    // Rank 1: once rank 0's abort reached it (its bucket 0 still unmatched),
    // what it does fails with a CommError.
    const auto t0 = std::chrono::steady_clock::now();
    bool failed = false;
    try {
      DataParallel dp(comm, {param("a", a, &ga), param("b", b, &gb)}, {}, opts);
      comm->barrier();
      EXPECT_TRUE(testing::wait_until([&] { return comm->error() != nullptr; }));
      dp.grad_ready(1);
      dp.grad_ready(0);
      dp.finish_gradients();
    } catch (const CommError&) {
      failed = true;
    }
    EXPECT_TRUE(failed);
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 30s);
  });
  EXPECT_FALSE(errors[0]);
  EXPECT_FALSE(errors[1]);
}

TEST(DataParallel, WorldOfOneTouchesNothing) {
  auto comm = make_comm(0, 1, std::make_shared<MemoryStore>());
  std::vector<float> a(4, 1.f), ga(4, 2.f);
  DataParallel dp(comm, {param("a", a, &ga)});
  dp.grad_ready(0);
  dp.finish_gradients();
  dp.end_step();
  EXPECT_EQ(ga, std::vector<float>(4, 2.f));
  EXPECT_EQ(dp.stats().bytes_allreduced, 0u);
}

TEST(SyncMode, Names) {
  EXPECT_EQ(parse_sync_mode("bsp"), SyncMode::BSP);
  EXPECT_EQ(parse_sync_mode("local-sgd"), SyncMode::LocalSGD);
  EXPECT_EQ(sync_mode_name(SyncMode::LocalSGD), "local-sgd");
  EXPECT_THROW(parse_sync_mode("ssp"), InvalidArgument);
}

// ---- Learning-rate schedules ------------------------------------------------

TEST(LrSchedule, ConstantStepCosineWithWarmup) {
  LrSchedule c{.kind = LrScheduleKind::Constant, .base_lr = 0.1};
  EXPECT_DOUBLE_EQ(c.at(0), 0.1);
  EXPECT_DOUBLE_EQ(c.at(100000), 0.1);

  LrSchedule w{.kind = LrScheduleKind::Constant,
               .base_lr = 0.1,
               .warmup_steps = 10,
               .warmup_start_factor = 0.0};
  EXPECT_DOUBLE_EQ(w.at(0), 0.0);
  EXPECT_DOUBLE_EQ(w.at(5), 0.05);
  EXPECT_DOUBLE_EQ(w.at(10), 0.1);

  LrSchedule s{.kind = LrScheduleKind::Step,
               .base_lr = 1.0,
               .warmup_steps = 2,
               .milestones = {10, 20},
               .gamma = 0.5};
  EXPECT_DOUBLE_EQ(s.at(2), 1.0);
  EXPECT_DOUBLE_EQ(s.at(11), 1.0);
  EXPECT_DOUBLE_EQ(s.at(12), 0.5);
  EXPECT_DOUBLE_EQ(s.at(22), 0.25);

  LrSchedule cos{.kind = LrScheduleKind::Cosine,
                 .base_lr = 1.0,
                 .warmup_steps = 10,
                 .total_steps = 110,
                 .min_lr = 0.1};
  EXPECT_DOUBLE_EQ(cos.at(10), 1.0);
  EXPECT_NEAR(cos.at(60), 0.55, 1e-12);
  EXPECT_DOUBLE_EQ(cos.at(110), 0.1);
  EXPECT_DOUBLE_EQ(cos.at(500), 0.1);
  for (int64_t t = 11; t <= 110; ++t) EXPECT_LE(cos.at(t), cos.at(t - 1));

  EXPECT_EQ(parse_lr_schedule("cosine"), LrScheduleKind::Cosine);
  EXPECT_EQ(lr_schedule_name(LrScheduleKind::Step), "step");
  EXPECT_THROW(parse_lr_schedule("linear"), InvalidArgument);
}

// ---- The sampler as a training loop uses it ---------------------------------

// Each epoch every rank runs common_steps_per_epoch() batches of its shard:
// no sample is seen twice, fewer than world * batch are skipped, and ranks
// see disjoint samples.
TEST(Sampler, TrainingLoopCoversTheEpoch) {
  for (int world : {1, 2, 3, 4}) {
    for (int64_t n : {int64_t{1000}, int64_t{1003}, int64_t{60000}}) {
      const int64_t batch = 64;
      std::vector<data::DistributedSampler> samplers;
      for (int r = 0; r < world; ++r)
        samplers.emplace_back(n, world, r, data::SamplerOptions{.seed = 5});
      const int64_t steps = samplers[0].common_steps_per_epoch(batch, false);
      for (int64_t epoch = 0; epoch < 2; ++epoch) {
        std::vector<int> seen(static_cast<size_t>(n), 0);
        for (int r = 0; r < world; ++r) {
          EXPECT_EQ(samplers[r].common_steps_per_epoch(batch, false), steps);
          auto shard = samplers[r].shard(epoch);
          for (int64_t k = 0; k < steps; ++k) {
            for (int64_t i : data::batch_indices(shard, batch, k)) seen[static_cast<size_t>(i)]++;
          }
        }
        int64_t skipped = 0;
        for (int c : seen) {
          ASSERT_LE(c, 1);
          skipped += c == 0;
        }
        EXPECT_LT(skipped, world * batch) << "world " << world << " n " << n;
      }
    }
  }
}

}  // namespace
}  // namespace weft::train
