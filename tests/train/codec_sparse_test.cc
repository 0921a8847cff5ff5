// The sparse and low-rank codecs (top-k and PowerSGD, weft/compress.h):
// top-k's selection, its sparse path against a dense allreduce of what each
// rank sent, the cost model's dense fallback, malformed payloads, the bytes
// it saves; PowerSGD's recovery of low-rank matrices and its exact
// uncompressed tensors; for both, the error-feedback invariant, the same
// bits on every rank and convergence on a small least-squares problem.
// Ranks are threads with a MemoryStore.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <mutex>
#include <numeric>
#include <random>

#include "testing/expect_error.h"
#include "testing/testing.h"
#include "train/codec_testing.h"
#include "train/codecs.h"
#include "weft/compress.h"
#include "weft/weft.h"

namespace weft::train {
namespace {

using namespace std::chrono_literals;
using testing::expect_error;
using testing::run_ranks_ok;

std::shared_ptr<Communicator> make_comm(int rank, int size, const std::shared_ptr<Store>& store) {
  CommOptions o;
  o.timeout = 60s;
  o.job_token = "codec-sparse-test";
  return Communicator::create(rank, size, store, o);
}

// fn(rank, comm) on n ranks (threads).
void with_ranks(int n, const std::function<void(int, Communicator&)>& fn) {
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(n, [&](int rank) {
    auto comm = make_comm(rank, n, store);
    fn(rank, *comm);
  });
}

CodecLayout flat_layout(size_t numel) { return testing::flat_layout(numel, "flat"); }

CompressionOptions topk(double fraction, double momentum = 0.0) {
  CompressionOptions o;
  o.codec = CodecKind::TopK;
  o.topk_fraction = fraction;
  o.momentum = momentum;
  return o;
}

CompressionOptions powersgd(int rank) {
  CompressionOptions o;
  o.codec = CodecKind::PowerSgd;
  o.powersgd_rank = rank;
  return o;
}

std::vector<float> random_vector(size_t n, uint64_t seed, float scale = 1.0f) {
  return testing::random_values(n, seed, scale);
}

float bf16_round(float x) { return bfloat16_to_float(float_to_bfloat16(x)); }

// ---- Top-k -----------------------------------------------------------------

TEST(TopK, SelectsExactlyTheKLargest) {
  const size_t numel = 1000;  // k = ceil(0.013 * 1000) = 13
  auto codec = make_codec(topk(0.013), flat_layout(numel), 1);
  std::vector<float> g = random_vector(numel, 1);
  const std::vector<float> in = g;
  with_ranks(1, [&](int, Communicator& comm) { codec->average(comm, g, 10s); });

  std::vector<size_t> order(numel);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return std::fabs(in[a]) > std::fabs(in[b]); });
  std::vector<size_t> want(order.begin(), order.begin() + 13);
  std::sort(want.begin(), want.end());
  std::vector<size_t> got;
  for (size_t i = 0; i < numel; ++i) {
    if (g[i] != 0.0f) got.push_back(i);
  }
  EXPECT_EQ(got, want);
  auto res = codec->residual();
  for (size_t i = 0; i < numel; ++i) {
    const bool sent = std::binary_search(want.begin(), want.end(), i);
    EXPECT_EQ(g[i], sent ? bf16_round(in[i]) : 0.0f) << i;
    // What was not sent, and the rounding error of what was, stays.
    EXPECT_EQ(res[i], sent ? in[i] - bf16_round(in[i]) : in[i]) << i;
  }
  EXPECT_EQ(codec->stats().calls, 1);
  EXPECT_EQ(codec->stats().bytes_sent, 0u);  // one rank sends nothing
}

// Per tensor, as DGC selects per layer: a tensor of gradients 1000 times
// smaller than its neighbour's still sends its own ceil(F * numel) largest
// every step; a layout whose tensors do not tile the bucket is one tensor.
TEST(TopK, SelectsPerTensor) {
  CodecLayout two;
  two.numel = 1100;
  two.tensors = {{"fc.weight", 0, {1000}}, {"conv.bias", 1000, {100}}};
  std::vector<float> g = random_vector(1000, 2);
  const std::vector<float> small = random_vector(100, 3, 1e-3f);
  g.insert(g.end(), small.begin(), small.end());
  const std::vector<float> in = g;
  auto codec = make_codec(topk(0.02), two, 1);  // k = 20 + 2
  with_ranks(1, [&](int, Communicator& comm) { codec->average(comm, g, 10s); });
  auto sent_in = [&](size_t begin, size_t end) {
    size_t count = 0;
    for (size_t i = begin; i < end; ++i) count += g[i] != 0.0f;
    return count;
  };
  EXPECT_EQ(sent_in(0, 1000), 20u);
  EXPECT_EQ(sent_in(1000, 1100), 2u);
  // The two sent in the small tensor are its two largest.
  std::vector<float> mags;
  for (size_t i = 1000; i < 1100; ++i) mags.push_back(std::fabs(in[i]));
  std::sort(mags.begin(), mags.end(), std::greater<>());
  for (size_t i = 1000; i < 1100; ++i) {
    if (g[i] != 0.0f) {
      EXPECT_GE(std::fabs(in[i]), mags[1]) << i;
    }
  }
  // Overlapping tensors: the whole bucket is one, k = ceil(0.02 * 1100) =
  // 22, all of them in the large values.
  CodecLayout overlap = two;
  overlap.tensors[1].offset = 900;
  g = in;
  auto whole = make_codec(topk(0.02), overlap, 1);
  with_ranks(1, [&](int, Communicator& comm) { whole->average(comm, g, 10s); });
  EXPECT_EQ(sent_in(0, 1000), 22u);
  EXPECT_EQ(sent_in(1000, 1100), 0u);
}

// Runs `steps` average() calls of `options` on n ranks with random
// gradients; checks that every rank ends each step with the same bits and
// returns, per rank, the codec.
struct CodecRun {
  std::vector<std::unique_ptr<GradientCodec>> codecs;
  std::vector<double> sum_grads;     // over ranks and steps
  std::vector<double> sum_averages;  // over steps (rank 0's)
};

CodecRun run_random(const CompressionOptions& options, const CodecLayout& layout, int n, int steps,
                    uint64_t seed) {
  CodecRun run;
  for (int r = 0; r < n; ++r) run.codecs.push_back(make_codec(options, layout, n));
  run.sum_grads.assign(layout.numel, 0.0);
  run.sum_averages.assign(layout.numel, 0.0);
  std::vector<std::vector<float>> out(static_cast<size_t>(n));
  std::mutex mu;
  with_ranks(n, [&](int rank, Communicator& comm) {
    for (int s = 0; s < steps; ++s) {
      std::vector<float> g =
          random_vector(layout.numel, seed * 1000 + static_cast<uint64_t>(rank * 100 + s));
      {
        std::lock_guard<std::mutex> lock(mu);
        for (size_t i = 0; i < g.size(); ++i) run.sum_grads[i] += g[i];
      }
      run.codecs[static_cast<size_t>(rank)]->average(comm, g, 30s);
      {
        // The barrier orders these; the lock lets ThreadSanitizer see it (it
        // does not see the synchronization of messages through sockets).
        std::lock_guard<std::mutex> lock(mu);
        out[static_cast<size_t>(rank)] = g;
      }
      comm.barrier();
      if (rank == 0) {
        std::lock_guard<std::mutex> lock(mu);
        for (int r = 1; r < n; ++r) {
          EXPECT_EQ(0, std::memcmp(out[0].data(), out[static_cast<size_t>(r)].data(),
                                   out[0].size() * sizeof(float)))
              << "rank " << r << " differs from rank 0 at step " << s;
        }
        for (size_t i = 0; i < g.size(); ++i) run.sum_averages[i] += g[i];
      }
      comm.barrier();
    }
  });
  return run;
}

// Summed over the ranks: residuals + n * sum of averages == sum of gradients.
void expect_invariant(CodecRun& run, int n, double tol) {
  double worst = 0;
  for (size_t i = 0; i < run.sum_grads.size(); ++i) {
    double lhs = n * run.sum_averages[i];
    for (auto& c : run.codecs) lhs += c->residual()[i];
    worst = std::max(worst, std::fabs(lhs - run.sum_grads[i]));
  }
  EXPECT_LT(worst, tol);
}

TEST(TopK, ErrorFeedbackInvariantAndSameBitsOnOneTwoThreeRanks) {
  for (int n : {1, 2, 3}) {
    for (double f : {0.01, 0.9}) {
      SCOPED_TRACE(fmt::format("{} ranks, fraction {}", n, f));
      CodecRun run = run_random(topk(f), flat_layout(5000), n, 6, 7);
      expect_invariant(run, n, 1e-4);
      double res = 0;
      for (float x : run.codecs[0]->residual()) res += std::fabs(x);
      EXPECT_GT(res, 0.0);  // something was kept back
    }
  }
}

TEST(TopK, SparsePathEqualsDenseAllreduceOfTheDecodedVectors) {
  const int n = 3;
  const size_t numel = 20000;
  std::vector<std::vector<float>> got(n), want(n);
  std::vector<std::string> names(n);
  with_ranks(n, [&](int rank, Communicator& comm) {
    auto codec = make_codec(topk(0.01), flat_layout(numel), n);
    names[static_cast<size_t>(rank)] = codec->name();
    std::vector<float> g = random_vector(numel, 40 + static_cast<uint64_t>(rank));
    std::vector<float> x = g;
    for (int s = 0; s < 3; ++s) {
      // x = g + residual before; what was sent = x - residual after (exact).
      std::vector<float> before(codec->residual().begin(), codec->residual().end());
      for (size_t i = 0; i < numel; ++i) x[i] = g[i] + before[i];
      std::vector<float> out = g;
      codec->average(comm, out, 30s);
      std::vector<float> sent(numel);
      size_t nonzero = 0;
      for (size_t i = 0; i < numel; ++i) {
        sent[i] = x[i] - codec->residual()[i];
        nonzero += sent[i] != 0.0f;
      }
      EXPECT_EQ(nonzero, 200u);
      comm.allreduce(Buffer(sent), AllreduceOptions{ReduceOp::Avg});
      for (size_t i = 0; i < numel; ++i) {
        ASSERT_NEAR(out[i], sent[i], 1e-6 * std::max(1.0f, std::fabs(sent[i]))) << i;
      }
    }
    const CodecStats st = codec->stats();
    EXPECT_EQ(st.calls, 3);
    EXPECT_GT(st.bytes_sent, 0u);
    EXPECT_LT(st.bytes_sent, 3 * codecs::ring_allreduce_bytes(numel * 4, n) / 20);
  });
  for (const auto& name : names) EXPECT_EQ(name, "topk:0.01(sparse)");
}

TEST(TopK, DenseFallbackWhenKIsLarge) {
  const int n = 4;
  const size_t numel = 3000;
  auto probe = make_codec(topk(0.9), flat_layout(numel), n);
  EXPECT_EQ(probe->name(), "topk:0.9(dense)");
  EXPECT_EQ(probe->wire_bytes(n), codecs::ring_allreduce_bytes(numel * 4, n));
  EXPECT_EQ(make_codec(topk(0.01), flat_layout(numel), n)->name(), "topk:0.01(sparse)");

  CodecRun run = run_random(topk(0.9), flat_layout(numel), n, 3, 11);
  expect_invariant(run, n, 1e-4);
  for (auto& c : run.codecs) {
    EXPECT_EQ(c->stats().bytes_sent, 3 * codecs::ring_allreduce_bytes(numel * 4, n));
  }
}

TEST(TopK, MomentumCorrectionAccumulatesVelocityAndMasksWhatWasSent) {
  // One rank: the average is what was sent, so the test can follow DGC:
  // u = m u + g; v = v + u; send the top k of v; clear them from v and u.
  const size_t numel = 400;
  const float m = 0.9f;
  auto codec = make_codec(topk(0.05, 0.9), flat_layout(numel), 1);
  std::vector<float> u(numel, 0.0f), v(numel, 0.0f);
  with_ranks(1, [&](int, Communicator& comm) {
    for (int s = 0; s < 8; ++s) {
      std::vector<float> g = random_vector(numel, 500 + static_cast<uint64_t>(s));
      for (size_t i = 0; i < numel; ++i) {
        u[i] = m * u[i] + g[i];
        v[i] += u[i];
      }
      std::vector<float> out = g;
      codec->average(comm, out, 10s);
      size_t sent = 0;
      for (size_t i = 0; i < numel; ++i) {
        if (out[i] != 0.0f) {
          ++sent;
          EXPECT_EQ(out[i], bf16_round(v[i]));
          u[i] = 0.0f;
        }
        v[i] -= out[i];
        ASSERT_EQ(codec->residual()[i], v[i]) << "step " << s << " index " << i;
      }
      EXPECT_EQ(sent, 20u);
    }
  });
  codec->reset();
  for (float x : codec->residual()) EXPECT_EQ(x, 0.0f);
}

TEST(TopK, SendsFiftyTimesFewerBytesThanFloat32RingAllreduce) {
  const int n = 4;
  const size_t numel = 400000;
  const uint64_t dense = codecs::ring_allreduce_bytes(numel * 4, n);
  std::vector<uint64_t> sent(n);
  with_ranks(n, [&](int rank, Communicator& comm) {
    auto codec = make_codec(topk(0.01), flat_layout(numel), n);
    EXPECT_LE(codec->wire_bytes(n) * 50, dense);
    std::vector<float> g = random_vector(numel, 900 + static_cast<uint64_t>(rank));
    codec->average(comm, g, 30s);
    sent[static_cast<size_t>(rank)] = codec->stats().bytes_sent;
  });
  for (uint64_t s : sent) {
    EXPECT_GT(s, 4000u * 3 * 3);  // k = 4000 pairs of >= 3 bytes to 3 ranks
    EXPECT_LE(s * 50, dense) << s << " bytes against " << dense;
  }
}

// Rank 0 averages a top-k bucket of 100 values (5%) while rank 1 plays a
// broken peer (`peer` issues its side of the collectives); returns what
// rank 0's codec threw.
std::exception_ptr against_broken_peer(const std::function<void(Communicator*)>& peer) {
  auto store = std::make_shared<MemoryStore>();
  auto codec = make_codec(topk(0.05), flat_layout(100), 2);
  std::exception_ptr error;
  run_ranks_ok(2, [&](int rank) {
    auto comm = make_comm(rank, 2, store);
    if (rank == 1) {
      peer(comm.get());
      return;
    }
    std::vector<float> g = random_vector(100, 3);
    try {
      codec->average(*comm, g, 10s);
    } catch (...) {
      error = std::current_exception();
    }
  });
  return error;
}

TEST(TopK, MalformedPayloadIsADataErrorNotACrash) {
  // Rank 1 speaks the protocol with a crafted payload; rank 0's codec must
  // refuse it by name.
  struct Case {
    std::vector<uint8_t> payload;
    std::string what;
  };
  const std::vector<Case> cases = {
      {{0xff}, "truncated varint"},
      {{5, 0, 0, 0}, "cannot fit"},                   // 5 pairs in 3 bytes
      {{200, 1, 1, 0, 0}, "pairs for a bucket"},      // 200 > numel
      {{1, 100, 0, 0}, "beyond the bucket"},          // index 100 of 100
      {{2, 98, 5, 0, 0, 0, 0}, "beyond the bucket"},  // 98, then 104
      {{1, 3, 0, 0, 0}, "bytes of values"},           // 3 value bytes
      {{1, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x7f, 0, 0}, "varint"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    const std::exception_ptr error = against_broken_peer([&](Communicator* comm) {
      std::vector<int64_t> sizes(2);
      const auto mine = static_cast<int64_t>(c.payload.size());
      comm->allgather(ConstBuffer(&mine, 1, DType::Int64), Buffer(sizes.data(), 2, DType::Int64));
      std::vector<size_t> counts = {static_cast<size_t>(sizes[0]), c.payload.size()};
      std::vector<uint8_t> all(counts[0] + counts[1]);
      comm->allgatherv(ConstBuffer(c.payload.data(), c.payload.size(), DType::UInt8),
                       Buffer(all.data(), all.size(), DType::UInt8), counts);
    });
    ASSERT_TRUE(error);
    expect_error<DataError>([&] { std::rethrow_exception(error); },
                            {"topk payload of rank 1", c.what});
  }
  // An announced size beyond any payload of the bucket.
  const std::exception_ptr error = against_broken_peer([&](Communicator* comm) {
    std::vector<int64_t> sizes(2);
    const int64_t huge = int64_t{1} << 40;
    comm->allgather(ConstBuffer(&huge, 1, DType::Int64), Buffer(sizes.data(), 2, DType::Int64));
  });
  ASSERT_TRUE(error);
  expect_error<DataError>([&] { std::rethrow_exception(error); },
                          {"rank 1 announces a payload of 1099511627776 bytes"});
}

// ---- PowerSGD ----------------------------------------------------------------

TEST(PowerSgd, RecoversAMatrixOfRankAtMostRAfterWarmStartedSteps) {
  // On each of 2 ranks a rank-2 matrix A B_r^T with the same A: their
  // average has rank 2. At rank 2 and rank 4 (more than the matrix has)
  // the approximation is almost exact, and stays so.
  const size_t rows = 24, cols = 40;
  CodecLayout layout;
  layout.numel = rows * cols;
  layout.tensors.push_back(CodecTensor{"w", 0, {int64_t(rows), int64_t(cols)}});
  const std::vector<float> A = random_vector(rows * 2, 77);
  std::vector<std::vector<float>> grads(2);
  std::vector<double> avg(rows * cols, 0.0);
  for (int r = 0; r < 2; ++r) {
    const std::vector<float> B = random_vector(cols * 2, 80 + static_cast<uint64_t>(r));
    grads[static_cast<size_t>(r)].resize(rows * cols);
    for (size_t i = 0; i < rows; ++i) {
      for (size_t c = 0; c < cols; ++c) {
        const float v = A[i * 2] * B[c * 2] + A[i * 2 + 1] * B[c * 2 + 1];
        grads[static_cast<size_t>(r)][i * cols + c] = v;
        avg[i * cols + c] += v / 2;
      }
    }
  }
  double scale = 0;
  for (double v : avg) scale = std::max(scale, std::fabs(v));
  for (int rank : {2, 4}) {
    SCOPED_TRACE(fmt::format("rank {}", rank));
    with_ranks(2, [&](int me, Communicator& comm) {
      auto codec = make_codec(powersgd(rank), layout, 2);
      for (int s = 0; s < 3; ++s) {
        std::vector<float> g = grads[static_cast<size_t>(me)];
        codec->average(comm, g, 10s);
        if (s == 0) continue;  // the first Q is random: one step to find the span
        double err = 0;
        for (size_t i = 0; i < g.size(); ++i) err = std::max(err, std::fabs(g[i] - avg[i]));
        EXPECT_LT(err, 1e-4 * scale) << "step " << s;
        // Each rank keeps its own M minus the average: the residuals sum to 0.
        std::vector<float> res(codec->residual().begin(), codec->residual().end());
        comm.allreduce(Buffer(res), AllreduceOptions{ReduceOp::Sum});
        double worst = 0;
        for (float x : res) worst = std::max(worst, double(std::fabs(x)));
        EXPECT_LT(worst, 1e-4 * scale) << "step " << s;
      }
      EXPECT_EQ(codec->stats().bytes_sent, 3 * (codecs::ring_allreduce_bytes(rows * rank * 4, 2) +
                                                codecs::ring_allreduce_bytes(cols * rank * 4, 2)));
    });
  }
}

CodecLayout mixed_layout() {
  // w: 16 x 2 x 16 (a matrix 16 x 32), b: 1-D, t: 5 x 1 (rank 2 saves
  // nothing: uncompressed), v: 12 x 20.
  CodecLayout l;
  l.tensors.push_back(CodecTensor{"w", 0, {16, 2, 16}});
  l.tensors.push_back(CodecTensor{"b", 512, {16}});
  l.tensors.push_back(CodecTensor{"t", 528, {5, 1}});
  l.tensors.push_back(CodecTensor{"v", 533, {12, 20}});
  l.numel = 533 + 240;
  return l;
}

TEST(PowerSgd, LeavesOneDimensionalAndSmallTensorsExact) {
  const int n = 3;
  const CodecLayout layout = mixed_layout();
  with_ranks(n, [&](int rank, Communicator& comm) {
    auto codec = make_codec(powersgd(2), layout, n);
    EXPECT_EQ(codec->name(), "powersgd:2(752 of 773 values in 2 matrices)");
    for (int s = 0; s < 2; ++s) {
      std::vector<float> g =
          random_vector(layout.numel, 300 + static_cast<uint64_t>(rank * 10 + s));
      std::vector<float> want = g;
      comm.allreduce(Buffer(want), AllreduceOptions{ReduceOp::Avg});
      codec->average(comm, g, 10s);
      for (size_t i = 512; i < 533; ++i) {
        EXPECT_NEAR(g[i], want[i], 1e-6) << i;
        EXPECT_EQ(codec->residual()[i], 0.0f) << i;
      }
    }
    // One allreduce of the P's with the 21 uncompressed values, one of the Q's.
    const uint64_t p = (16 * 2 + 12 * 2 + 21) * 4, q = (32 * 2 + 20 * 2) * 4;
    EXPECT_EQ(codec->wire_bytes(n),
              codecs::ring_allreduce_bytes(p, n) + codecs::ring_allreduce_bytes(q, n));
    EXPECT_EQ(codec->stats().bytes_sent, 2 * codec->wire_bytes(n));
  });
}

TEST(PowerSgd, ErrorFeedbackInvariantAndSameBitsOnOneTwoThreeRanks) {
  for (int n : {1, 2, 3}) {
    SCOPED_TRACE(fmt::format("{} ranks", n));
    CodecRun run = run_random(powersgd(2), mixed_layout(), n, 5, 13);
    expect_invariant(run, n, 1e-4);
  }
}

TEST(PowerSgd, BucketWithoutACompressibleMatrixIsSentUncompressed) {
  CodecLayout layout = flat_layout(50);
  layout.tensors[0].shape = {5, 10};  // rank 4 saves nothing: 4 * 15 >= 50
  CodecRun run = run_random(powersgd(4), layout, 2, 2, 17);
  for (auto& c : run.codecs) {
    EXPECT_EQ(c->name(), "powersgd:4(0 of 50 values in 0 matrices)");
    for (float x : c->residual()) EXPECT_EQ(x, 0.0f);
    EXPECT_EQ(c->stats().bytes_sent, 2 * codecs::ring_allreduce_bytes(50 * 4, 2));
  }
  expect_invariant(run, 2, 1e-5);
}

TEST(PowerSgd, RefusesRankBelowOneAndValidateNamesTheLargestMatrix) {
  CompressionOptions zero = powersgd(1);
  zero.powersgd_rank = 0;
  expect_error<InvalidArgument>([&] { make_codec(zero, mixed_layout(), 1); },
                                {"--compress powersgd:0", ">= 1"});
  CodecLayout conv;
  conv.tensors.push_back(CodecTensor{"conv1.weight", 0, {32, 1, 5, 5}});
  conv.tensors.push_back(CodecTensor{"fc1.weight", 800, {128, 3136}});
  conv.tensors.push_back(CodecTensor{"fc1.bias", 800 + 128 * 3136, {128}});
  conv.numel = 800 + 128 * 3136 + 128;
  const std::vector<CodecLayout> model = {conv};
  expect_error<InvalidArgument>([&] { validate_compression(powersgd(200), model); },
                                {"--compress powersgd:200", "fc1.weight [128, 3136]", "122"});
  validate_compression(powersgd(122), model);
  EXPECT_THROW(validate_compression(powersgd(123), model), InvalidArgument);
  EXPECT_EQ(make_codec(powersgd(4), conv, 2)->name(),
            "powersgd:4(402208 of 402336 values in 2 matrices)");
}

// ---- Convergence -------------------------------------------------------------

// Least squares y = W x + b with W 16 x 48 on 3 ranks, each with its own
// 96 samples; full-batch gradient steps of SGD through `options`. Returns
// the final loss (mean over all samples, the same on every rank).
double train_least_squares(const CompressionOptions& options, int steps, float lr) {
  const int n = 3;
  const size_t out = 16, in = 48, samples = 96;
  CodecLayout layout;
  layout.tensors.push_back(CodecTensor{"W", 0, {int64_t(out), int64_t(in)}});
  layout.tensors.push_back(CodecTensor{"b", out * in, {int64_t(out)}});
  layout.numel = out * in + out;
  const std::vector<float> W_true = random_vector(out * in, 1234, 0.5f);
  const std::vector<float> b_true = random_vector(out, 1235);
  std::vector<double> losses(n);
  with_ranks(n, [&](int rank, Communicator& comm) {
    const std::vector<float> X = random_vector(samples * in, 2000 + static_cast<uint64_t>(rank));
    const std::vector<float> noise =
        random_vector(samples * out, 3000 + static_cast<uint64_t>(rank), 0.01f);
    std::vector<float> Y(samples * out);
    for (size_t s = 0; s < samples; ++s) {
      for (size_t o = 0; o < out; ++o) {
        float y = b_true[o] + noise[s * out + o];
        for (size_t i = 0; i < in; ++i) y += W_true[o * in + i] * X[s * in + i];
        Y[s * out + o] = y;
      }
    }
    auto codec = make_codec(options, layout, n);
    std::vector<float> params(layout.numel, 0.0f), grad(layout.numel), err(out);
    auto loss_and_grad = [&] {
      std::fill(grad.begin(), grad.end(), 0.0f);
      double loss = 0;
      for (size_t s = 0; s < samples; ++s) {
        for (size_t o = 0; o < out; ++o) {
          float y = params[out * in + o];
          for (size_t i = 0; i < in; ++i) y += params[o * in + i] * X[s * in + i];
          err[o] = y - Y[s * out + o];
          loss += 0.5 * double(err[o]) * err[o];
        }
        for (size_t o = 0; o < out; ++o) {
          for (size_t i = 0; i < in; ++i) grad[o * in + i] += err[o] * X[s * in + i] / samples;
          grad[out * in + o] += err[o] / samples;
        }
      }
      return loss / samples;
    };
    for (int step = 0; step < steps; ++step) {
      loss_and_grad();
      codec->average(comm, grad, 30s);
      for (size_t i = 0; i < params.size(); ++i) params[i] -= lr * grad[i];
    }
    double loss = loss_and_grad();
    comm.allreduce(Buffer(&loss, 1, DType::Float64), AllreduceOptions{ReduceOp::Avg});
    losses[static_cast<size_t>(rank)] = loss;
  });
  EXPECT_EQ(losses[0], losses[1]);
  EXPECT_EQ(losses[0], losses[2]);
  return losses[0];
}

TEST(Convergence, TopKAndPowerSgdReachTheLossOfUncompressedSgd) {
  // Error feedback with 1% of the values per step needs a smaller step
  // than SGD could take (0.2 diverges); at 0.05 all converge.
  const int steps = 1500;
  const float lr = 0.05f;
  const double initial = train_least_squares(CompressionOptions{}, 0, lr);
  const double sgd = train_least_squares(CompressionOptions{}, steps, lr);
  const double top1 = train_least_squares(topk(0.01), steps, lr);
  const double top1m = train_least_squares(topk(0.01, 0.5), steps, lr);
  const double psgd = train_least_squares(powersgd(2), steps, lr);
  fmt::print(
      "loss: initial {:.4g}, sgd {:.4g}, topk:0.01 {:.4g}, topk:0.01 momentum {:.4g}, "
      "powersgd:2 {:.4g}\n",
      initial, sgd, top1, top1m, psgd);
  EXPECT_LT(sgd, 1e-2 * initial);
  for (double l : {top1, top1m, psgd}) {
    EXPECT_LT(l, 2 * sgd);  // what is still in the residuals costs a little
  }
}

}  // namespace
}  // namespace weft::train
