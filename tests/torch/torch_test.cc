// The libtorch adapter on small modules (ranks as threads): BSP equivalence
// with one big batch, zero-copy gradients, buffers, unused parameters,
// gradients reset to undefined, local SGD, and models that differ.
#include "weft/torch.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

#include "testing/testing.h"
#include "weft/weft.h"

namespace weft::torch {
namespace {

using namespace std::chrono_literals;
using testing::run_ranks;
using testing::run_ranks_ok;
namespace F = ::torch::nn::functional;

std::shared_ptr<Communicator> make_comm(int rank, int size, const std::shared_ptr<Store>& store) {
  CommOptions o;
  o.timeout = 60s;
  o.job_token = "torch-test";
  return Communicator::create(rank, size, store, o);
}

struct MlpImpl : ::torch::nn::Module {
  explicit MlpImpl(int hidden = 16)
      : l1(register_module("l1", ::torch::nn::Linear(8, hidden))),
        l2(register_module("l2", ::torch::nn::Linear(hidden, 3))),
        unused(register_parameter("unused", ::torch::ones({5}))) {}
  ::torch::Tensor forward(::torch::Tensor x) { return l2->forward(::torch::tanh(l1->forward(x))); }
  ::torch::nn::Linear l1, l2;
  ::torch::Tensor unused;  // takes no part in the loss
};

struct BnNetImpl : ::torch::nn::Module {
  BnNetImpl()
      : l1(register_module("l1", ::torch::nn::Linear(8, 6))),
        bn(register_module("bn", ::torch::nn::BatchNorm1d(6))),
        l2(register_module("l2", ::torch::nn::Linear(6, 3))) {}
  ::torch::Tensor forward(::torch::Tensor x) {
    return l2->forward(::torch::relu(bn->forward(l1->forward(x))));
  }
  ::torch::nn::Linear l1;
  ::torch::nn::BatchNorm1d bn;
  ::torch::nn::Linear l2;
};

struct Data {
  ::torch::Tensor x, y;
  explicit Data(int64_t n) {
    auto g = ::torch::make_generator<at::CPUGeneratorImpl>(7);
    x = ::torch::randn({n, 8}, g);
    y = ::torch::randint(0, 3, {n}, g);
  }
};

class TorchAdapter : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { set_threads(1); }
};

std::vector<::torch::Tensor> copy_params(::torch::nn::Module& m) {
  std::vector<::torch::Tensor> out;
  for (const auto& p : m.parameters()) out.push_back(p.detach().clone());
  return out;
}

void load_params(::torch::nn::Module& m, const std::vector<::torch::Tensor>& values) {
  ::torch::NoGradGuard g;
  auto ps = m.parameters();
  for (size_t i = 0; i < ps.size(); ++i) ps[i].copy_(values[i]);
}

TEST_F(TorchAdapter, BspWithNWorkersEqualsOneWorkerWithNTimesTheBatch) {
  const int n = 3, batch = 8, steps = 12;
  Data data(n * batch * steps);
  ::torch::manual_seed(1);
  std::vector<std::shared_ptr<MlpImpl>> replicas;
  for (int r = 0; r < n; ++r) replicas.push_back(std::make_shared<MlpImpl>());
  auto single = std::make_shared<MlpImpl>();
  load_params(*single, copy_params(*replicas[0]));  // rank 0's start is broadcast
  {
    ::torch::optim::SGD opt(single->parameters(), ::torch::optim::SGDOptions(0.1).momentum(0.9));
    for (int s = 0; s < steps; ++s) {
      opt.zero_grad();
      auto idx = ::torch::arange(s * n * batch, (s + 1) * n * batch);
      F::cross_entropy(single->forward(data.x.index_select(0, idx)), data.y.index_select(0, idx))
          .backward();
      // The unused parameter gets a zero gradient on the workers (it is averaged).
      single->unused.mutable_grad() = ::torch::zeros({5});
      opt.step();
    }
  }
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(n, [&](int r) {
    auto comm = make_comm(r, n, store);
    auto& m = replicas[r];
    DataParallel dp(m, comm);
    ASSERT_EQ(dp.engine().parameters().size(), 5u);
    ::torch::optim::SGD opt(m->parameters(), ::torch::optim::SGDOptions(0.1).momentum(0.9));
    for (int s = 0; s < steps; ++s) {
      if (s % 2 == 0) {
        dp.zero_grad();
      } else {
        opt.zero_grad();  // libtorch 1.13 zeroes in place: the slots stay
      }
      auto idx = ::torch::arange((s * n + r) * batch, (s * n + r + 1) * batch);
      F::cross_entropy(m->forward(data.x.index_select(0, idx)), data.y.index_select(0, idx))
          .backward();
      dp.step(opt);
      // Zero copy: every gradient is still the tensor over its bucket slot.
      const auto& ps = dp.engine().parameters();
      for (size_t i = 0; i < ps.size(); ++i) {
        const auto& p = m->named_parameters()[ps[i].name];
        ASSERT_EQ(p.grad().data_ptr(), dp.engine().grad_slot(i).data()) << ps[i].name;
      }
    }
    EXPECT_EQ(dp.steps(), steps);
  });
  auto ref = single->named_parameters();
  for (int r = 0; r < n; ++r) {
    for (const auto& item : replicas[r]->named_parameters()) {
      EXPECT_TRUE(::torch::allclose(item.value(), ref[item.key()], 1e-4, 1e-5))
          << "rank " << r << " " << item.key();
      EXPECT_TRUE(::torch::equal(item.value(), replicas[0]->named_parameters()[item.key()]))
          << "replicas drifted apart: rank " << r << " " << item.key();
    }
  }
}

TEST_F(TorchAdapter, GradientsResetToUndefinedStillWork) {
  const int n = 2, batch = 4;
  Data data(64);
  auto store = std::make_shared<MemoryStore>();
  std::vector<std::vector<::torch::Tensor>> grads(n);
  run_ranks_ok(n, [&](int r) {
    auto comm = make_comm(r, n, store);
    auto m = std::make_shared<MlpImpl>();
    DataParallel dp(m, comm);
    ::torch::optim::SGD opt(m->parameters(), ::torch::optim::SGDOptions(0.1));
    for (int s = 0; s < 3; ++s) {
      for (auto& p : m->parameters()) p.mutable_grad().reset();  // set_to_none
      auto idx = ::torch::arange((2 * s + r) * batch, (2 * s + r + 1) * batch);
      F::cross_entropy(m->forward(data.x.index_select(0, idx)), data.y.index_select(0, idx))
          .backward();
      dp.finish_gradients();
      opt.step();
      dp.end_step();
    }
    for (auto& p : m->parameters()) {
      ASSERT_TRUE(p.grad().defined());
      grads[r].push_back(p.grad().clone());
    }
    dp.zero_grad();  // puts the slots back
    for (size_t i = 0; i < dp.engine().parameters().size(); ++i) {
      EXPECT_EQ(m->parameters()[i].grad().data_ptr(), dp.engine().grad_slot(i).data());
    }
  });
  for (size_t i = 0; i < grads[0].size(); ++i)
    EXPECT_TRUE(::torch::equal(grads[0][i], grads[1][i]));
}

TEST_F(TorchAdapter, BatchNormBuffersStayConsistent) {
  const int n = 3, batch = 6;
  Data data(n * batch * 4);
  auto store = std::make_shared<MemoryStore>();
  std::vector<std::shared_ptr<BnNetImpl>> nets(n);
  run_ranks_ok(n, [&](int r) {
    auto comm = make_comm(r, n, store);
    nets[r] = std::make_shared<BnNetImpl>();
    DataParallel dp(nets[r], comm);
    ::torch::optim::SGD opt(nets[r]->parameters(), ::torch::optim::SGDOptions(0.05));
    for (int s = 0; s < 4; ++s) {
      dp.zero_grad();
      auto idx = ::torch::arange((s * n + r) * batch, (s * n + r + 1) * batch);
      F::cross_entropy(nets[r]->forward(data.x.index_select(0, idx)), data.y.index_select(0, idx))
          .backward();
      dp.step(opt);
    }
  });
  for (int r = 1; r < n; ++r) {
    for (const auto& item : nets[0]->named_buffers()) {
      EXPECT_TRUE(::torch::equal(item.value(), nets[r]->named_buffers()[item.key()]))
          << "rank " << r << " " << item.key();
    }
  }
  EXPECT_EQ(nets[0]->bn->num_batches_tracked.item<int64_t>(), 4);
  EXPECT_GT(nets[0]->bn->running_mean.abs().sum().item<double>(), 0.0);
}

TEST_F(TorchAdapter, LocalSgdAveragesEveryHSteps) {
  const int n = 2, batch = 4, h = 2;
  Data data(n * batch * 6);
  auto store = std::make_shared<MemoryStore>();
  run_ranks_ok(n, [&](int r) {
    auto comm = make_comm(r, n, store);
    auto m = std::make_shared<MlpImpl>();
    train::DataParallelOptions opts;
    opts.sync = train::SyncMode::LocalSGD;
    opts.local_steps = h;
    DataParallel dp(m, comm, opts);
    ::torch::optim::SGD opt(m->parameters(), ::torch::optim::SGDOptions(0.1).momentum(0.9));
    for (int s = 0; s < 5; ++s) {
      dp.zero_grad();
      auto idx = ::torch::arange((s * n + r) * batch, (s * n + r + 1) * batch);
      F::cross_entropy(m->forward(data.x.index_select(0, idx)), data.y.index_select(0, idx))
          .backward();
      dp.step(opt);
      auto w = m->l1->weight.detach().clone();
      auto hi = w.clone(), lo = w.clone();
      comm->allreduce(Buffer(hi.data_ptr(), static_cast<size_t>(hi.numel()), DType::Float32),
                      ReduceOp::Max);
      comm->allreduce(Buffer(lo.data_ptr(), static_cast<size_t>(lo.numel()), DType::Float32),
                      ReduceOp::Min);
      EXPECT_EQ(::torch::equal(hi, lo), (s + 1) % h == 0) << "step " << s;
    }
    dp.synchronize();  // 5 % 2 != 0: averages
    auto w = m->l1->weight.detach().clone();
    auto hi = w.clone();
    comm->allreduce(Buffer(hi.data_ptr(), static_cast<size_t>(hi.numel()), DType::Float32),
                    ReduceOp::Max);
    EXPECT_TRUE(::torch::equal(hi, w));
  });
}

TEST_F(TorchAdapter, ModelsThatDifferFailNamingTheParameter) {
  const int n = 2;
  auto store = std::make_shared<MemoryStore>();
  auto errors = run_ranks(n, [&](int r) {
    auto comm = make_comm(r, n, store);
    auto m = std::make_shared<MlpImpl>(r == 1 ? 17 : 16);
    DataParallel dp(m, comm);
  });
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(errors[r]);
    try {
      std::rethrow_exception(errors[r]);
    } catch (const InvalidArgument& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("'l1.weight' float32 [16, 8]"), std::string::npos) << msg;
      EXPECT_NE(msg.find("'l1.weight' float32 [17, 8]"), std::string::npos) << msg;
      EXPECT_NE(msg.find("rank 1"), std::string::npos) << msg;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "rank " << r << ": unexpected " << e.what();
    }
  }
}

TEST_F(TorchAdapter, RejectsWhatItCannotHandle) {
  auto comm = make_comm(0, 1, std::make_shared<MemoryStore>());
  EXPECT_THROW(DataParallel(nullptr, comm), InvalidArgument);
  EXPECT_THROW(DataParallel(std::make_shared<MlpImpl>(), nullptr), InvalidArgument);
  struct Strided : ::torch::nn::Module {
    Strided() { register_parameter("t", ::torch::ones({4, 4}).t()); }
  };
  EXPECT_THROW(DataParallel(std::make_shared<Strided>(), comm), InvalidArgument);
  EXPECT_THROW(set_threads(0), InvalidArgument);
}

}  // namespace
}  // namespace weft::torch

namespace weft::torch {
namespace {

// add_to_state: a snapshot taken mid-training and restored into a fresh
// model and optimizer goes on exactly as the original (parameters, buffers,
// momentum, the default generator), and a damaged optimizer blob is refused
// before anything changes.
TEST_F(TorchAdapter, StateRestoresModelOptimizerAndRng) {
  Data data(64);
  auto run_steps = [&](DataParallel& dp, BnNetImpl& m, ::torch::optim::Optimizer& opt, int from,
                       int n) {
    for (int s = from; s < from + n; ++s) {
      dp.zero_grad();
      auto idx = ::torch::arange(s * 8, (s + 1) * 8);
      F::cross_entropy(m.forward(data.x.index_select(0, idx)), data.y.index_select(0, idx))
          .backward();
      dp.step(opt);
    }
  };
  ::torch::manual_seed(1);
  auto a = std::make_shared<BnNetImpl>();
  auto comm_a = make_comm(0, 1, std::make_shared<MemoryStore>());
  DataParallel dp_a(a, comm_a);
  ::torch::optim::SGD opt_a(a->parameters(), ::torch::optim::SGDOptions(0.1).momentum(0.9));
  run_steps(dp_a, *a, opt_a, 0, 3);
  train::TrainState sa;
  add_to_state(sa, dp_a, opt_a);
  const auto image = sa.snapshot({.step = 3});
  const auto draw_a = ::torch::rand({4});
  run_steps(dp_a, *a, opt_a, 3, 3);

  ::torch::manual_seed(99);
  auto b = std::make_shared<BnNetImpl>();
  auto comm_b = make_comm(0, 1, std::make_shared<MemoryStore>());
  DataParallel dp_b(b, comm_b);
  ::torch::optim::SGD opt_b(b->parameters(), ::torch::optim::SGDOptions(0.1).momentum(0.9));
  train::TrainState sb;
  add_to_state(sb, dp_b, opt_b);
  EXPECT_EQ(sa.fingerprint(), sb.fingerprint());
  EXPECT_NE(sb.fingerprint().find("tensor bn.running_mean float32 [6]"), std::string::npos)
      << sb.fingerprint();

  // A forged image: the same layout, but an optimizer blob that is no archive.
  train::TrainState forged;
  forged.add_engine(dp_a.engine());
  forged.add_blob(
      "torch.optimizer", [] { return std::string("not an archive"); }, [](std::string_view) {});
  forged.add_blob(
      "torch.rng", [] { return std::string(5, 'x'); }, [](std::string_view) {});
  const auto before = copy_params(*b);
  try {
    (void)sb.restore(forged.snapshot({.step = 3}));
    ADD_FAILURE() << "a damaged optimizer blob was accepted";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("torch.optimizer"), std::string::npos) << e.what();
  }
  const auto unchanged = copy_params(*b);
  for (size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(::torch::equal(before[i], unchanged[i]));

  EXPECT_EQ(sb.restore(image).step, 3);
  EXPECT_TRUE(::torch::equal(::torch::rand({4}), draw_a));  // the generator's state
  run_steps(dp_b, *b, opt_b, 3, 3);
  const auto pa = a->named_parameters(), pb = b->named_parameters();
  for (const auto& item : pa) {
    EXPECT_TRUE(::torch::equal(item.value(), pb[item.key()])) << item.key();
  }
  const auto ba = a->named_buffers(), bb = b->named_buffers();
  for (const auto& item : ba) {
    EXPECT_TRUE(::torch::equal(item.value(), bb[item.key()])) << item.key();
  }
}

}  // namespace
}  // namespace weft::torch
