// The main job end to end, as real processes under `weft run`: a short
// training run on a subset of Fashion-MNIST must beat a fixed accuracy
// (BSP and local SGD), bad datasets fail with errors naming the file, and
// bad flags are refused at start-up naming the flag.
#include <gtest/gtest.h>
#include <sched.h>
#include <signal.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "dataset.h"
#include "testing/cgroup.h"
#include "testing/testing.h"
#include "weft/checkpoint.h"
#include "weft/data.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Process;

std::string weft_bin() { return testing::bin_dir() + "/weft"; }
std::string job_bin() { return testing::bin_dir() + "/fashion_mnist"; }

bool have_dataset() {
  return std::filesystem::exists(std::string(fashion_mnist::kDefaultDir) +
                                 "/train-images-idx3-ubyte.gz");
}

// The JSON objects rank 0 printed, one per epoch.
std::vector<nlohmann::json> epochs_of(const std::string& output) {
  std::vector<nlohmann::json> out;
  std::istringstream in(output);
  std::string line;
  while (std::getline(in, line)) {
    const auto brace = line.find('{');
    if (line.rfind("[0]", 0) != 0 || brace == std::string::npos) continue;
    auto j = nlohmann::json::parse(line.substr(brace));
    if (j.contains("epoch")) out.push_back(std::move(j));  // not the re-plan events
  }
  return out;
}

// The job's command line for the short runs of these tests: 2 epochs of
// 12000 samples, a 2000-sample test set, JSON lines.
std::vector<std::string> short_run() {
  return {job_bin(),        "--json", "--train-samples", "12000",
          "--test-samples", "2000",   "--epochs",        "2"};
}

std::vector<nlohmann::json> train(int workers, std::vector<std::string> args) {
  std::vector<std::string> argv = {weft_bin(), "run", "-n", std::to_string(workers)};
  for (const auto& part : {short_run(), args}) argv.insert(argv.end(), part.begin(), part.end());
  Process p(argv);
  EXPECT_TRUE(p.wait(420s)) << "training did not finish:\n" << p.output();
  EXPECT_EQ(p.exit_code(), 0) << p.output();
  auto epochs = epochs_of(p.output());
  EXPECT_EQ(epochs.size(), 2u) << p.output();
  return epochs;
}

// 2 workers x batch 32, 2 epochs of 12k samples (372 steps): well above
// 0.75 (about 0.83 in practice); a broken gradient path stays far below.
TEST(FashionMnist, ShortBspRunLearns) {
  if (!have_dataset()) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  auto epochs = train(2, {"--batch-size", "32", "--sync", "bsp", "--seed", "3"});
  ASSERT_EQ(epochs.size(), 2u);
  EXPECT_EQ(epochs[1]["epoch"], 2);
  EXPECT_EQ(epochs[1]["workers"], 2);
  EXPECT_GT(epochs[1]["samples_per_s"].get<double>(), 0.0);
  EXPECT_GE(epochs[1]["test_accuracy"].get<double>(), 0.75);
  EXPECT_LT(epochs[1]["loss"].get<double>(), epochs[0]["loss"].get<double>() + 0.05);
}

// Load balancing in the main job: 3 workers, dynamic shares. Every sample of
// the epoch is trained exactly once (the queue; "samples" is the count
// trained), the shares always sum to the global batch, and the job learns
// as well as the equal-share run.
TEST(FashionMnist, BalancedRunTrainsEverySampleOnceAndLearns) {
  if (!have_dataset()) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  auto epochs = train(
      3, {"--batch-size", "32", "--balance", "dynamic", "--balance-every", "2", "--seed", "3"});
  ASSERT_EQ(epochs.size(), 2u);
  for (const auto& e : epochs) {
    EXPECT_EQ(e["balance"], "dynamic");
    EXPECT_EQ(e["global_batch"], 96);
    EXPECT_EQ(e["samples"], 12000);  // every training sample, once
    int64_t total = 0;
    for (const auto& s : e["shares"]) {
      EXPECT_GE(s.get<int64_t>(), 4);  // the default minimum: batch / 8
      total += s.get<int64_t>();
    }
    EXPECT_EQ(total, 96);
    ASSERT_EQ(e["rates"].size(), 3u);
    ASSERT_EQ(e["worker_figures"].size(), 3u);
    for (const auto& w : e["worker_figures"]) {
      EXPECT_GT(w["rate"].get<double>(), 0.0);
      EXPECT_GT(w["rss_mb"].get<double>(), 0.0);
      EXPECT_GT(w["cpu_ms_per_sample"].get<double>(), 0.0);
      EXPECT_TRUE(w.contains("quota_rate") && w.contains("quota_bound")) << w.dump();
    }
  }
  EXPECT_GE(epochs[1]["test_accuracy"].get<double>(), 0.75);
}

// The pid of the worker of launcher `launcher` whose WEFT_MEMBER is
// `member` (workers are the launcher's children), or -1.
pid_t worker_of(pid_t launcher, const std::string& member) {
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string name = entry.path().filename();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat(entry.path() / "stat");
    std::string line;
    std::getline(stat, line);
    const auto close = line.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(line.substr(close + 1));
    std::string state;
    pid_t ppid = 0;
    rest >> state >> ppid;
    if (ppid != launcher) continue;
    std::ifstream env(entry.path() / "environ");
    std::string var;
    while (std::getline(env, var, '\0')) {
      if (var == "WEFT_MEMBER=" + member) return static_cast<pid_t>(std::stoi(name));
    }
  }
  return -1;
}

// A 3-worker elastic job (--elastic 2:3, one restart allowed) of 2 epochs
// of 12000 samples with `extra` flags, returned once it trains (its first
// re-plan printed).
std::unique_ptr<Process> start_elastic_job(const std::vector<std::string>& extra) {
  std::vector<std::string> argv = {weft_bin(),       "run", "-n", "3", "--elastic", "2:3",
                                   "--max-restarts", "1",   "--"};
  const std::vector<std::string> seeded = {"--batch-size", "32", "--seed", "5"};
  for (const auto& part : {short_run(), seeded, extra}) {
    argv.insert(argv.end(), part.begin(), part.end());
  }
  auto p = std::make_unique<Process>(argv);
  EXPECT_TRUE(testing::wait_until(
      [&] { return p->output().find("\"event\": \"replan\"") != std::string::npos; }, 300s))
      << p->output();
  return p;
}

// The job finished with success, `member` left it, every sample of both
// epochs was trained exactly once (the ledger's count) and it learned.
// Returns its epochs.
std::vector<nlohmann::json> expect_finished_without(Process& p, const std::string& member) {
  EXPECT_TRUE(p.wait(420s)) << "training did not finish:\n" << p.output();
  EXPECT_EQ(p.exit_code(), 0) << p.output();
  const std::string out = p.output();
  EXPECT_NE(out.find("left [" + member + "]"), std::string::npos) << out;
  EXPECT_NE(out.find("\"event\": \"membership\""), std::string::npos) << out;
  auto epochs = epochs_of(out);
  EXPECT_EQ(epochs.size(), 2u) << out;
  for (const auto& e : epochs) EXPECT_EQ(e["samples"], 12000) << out;  // each sample once
  if (epochs.size() == 2) {
    EXPECT_GE(epochs[1]["test_accuracy"].get<double>(), 0.7) << out;
  }
  return epochs;
}

// Elastic: a worker SIGKILLed in the middle of the first epoch. The
// survivors go on in the same processes from the last commit, the launcher
// restarts the worker, which joins again; every sample of every epoch is
// trained exactly once (the ledger's count) and the job learns.
TEST(FashionMnist, ElasticRunSurvivesAKilledWorker) {
  if (!have_dataset()) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  auto p = start_elastic_job({});
  const pid_t victim = worker_of(p->pid(), "n0.s1.r0");
  ASSERT_GT(victim, 0) << p->output();
  ASSERT_EQ(::kill(victim, SIGKILL), 0);
  expect_finished_without(*p, "n0.s1.r0");
}

// Elastic with --straggler drop: a worker held to 2% of a core by a cgroup
// quota in the middle of the first epoch falls below 10% of the median rate
// and, after three exchanges, leaves the job at a commit; it exits 0 and is
// not restarted. The other two go on from that commit; every sample of
// every epoch is trained exactly once and the job learns.
TEST(FashionMnist, ElasticRunDropsAPersistentStraggler) {
  if (!have_dataset()) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  const std::string why = testing::CpuQuotaGroup::unavailable();
  if (!why.empty()) GTEST_SKIP() << why;
  auto slow =
      testing::CpuQuotaGroup::create("weft-straggler-test-" + std::to_string(getpid()), 2000);
  auto p = start_elastic_job({"--straggler", "drop"});
  const pid_t victim = worker_of(p->pid(), "n0.s2.r0");
  ASSERT_GT(victim, 0) << p->output();
  slow->add(victim);
  const auto epochs = expect_finished_without(*p, "n0.s2.r0");
  const std::string out = p->output();
  EXPECT_NE(out.find("\"event\": \"straggler_drop\""), std::string::npos) << out;
  EXPECT_EQ(out.find("restart 1 of 1"), std::string::npos) << out;  // it left; nothing failed
  if (epochs.size() == 2) {
    EXPECT_EQ(epochs[1]["workers"], 2) << out;
  }
}

TEST(FashionMnist, ShortLocalSgdRunLearns) {
  if (!have_dataset()) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  auto epochs =
      train(2, {"--batch-size", "32", "--sync", "local-sgd", "--local-steps", "8", "--seed", "3"});
  ASSERT_EQ(epochs.size(), 2u);
  EXPECT_EQ(epochs[1]["sync"], "local-sgd");
  EXPECT_GE(epochs[1]["test_accuracy"].get<double>(), 0.75);
}

// Runs the job on a dataset directory and returns its output; expects failure.
std::string run_failing(const std::string& dir, const std::vector<std::string>& extra = {}) {
  std::vector<std::string> argv = {weft_bin(),   "run", "-n",       "1", job_bin(),
                                   "--data-dir", dir,   "--epochs", "1"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  Process p(argv);
  EXPECT_TRUE(p.wait(120s)) << p.output();
  EXPECT_NE(p.exit_code(), 0) << p.output();
  return p.output();
}

// Compressed gradients still learn: PowerSGD rank 4, and top-k 1% with DGC's
// momentum correction (in place of SGD's momentum). Each JSON epoch names
// the codec and what a step sent.
TEST(FashionMnist, CompressedRunsLearn) {
  if (!have_dataset()) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  for (const char* spec : {"powersgd:4", "topk:0.01"}) {
    SCOPED_TRACE(spec);
    auto epochs = train(2, {"--batch-size", "32", "--seed", "3", "--compress", spec});
    ASSERT_EQ(epochs.size(), 2u);
    const std::string codec = epochs[1]["compress"];
    EXPECT_EQ(codec.rfind(std::string(spec).substr(0, 4), 0), 0u) << codec;
    // Uncompressed, 2 ranks send the model's 421,642 float32 gradients
    // once each way per step: 1.69 MB.
    const double wire = epochs[1]["wire_bytes_per_step"].get<double>();
    EXPECT_GT(wire, 0.0);
    EXPECT_LT(wire, 1.69e6 / 10);
    EXPECT_GE(epochs[1]["test_accuracy"].get<double>(), 0.7);
  }
}

// The automatic choice on 2 emulated hosts (scripts/cluster.sh: network
// namespaces, one worker each): float32 on unshaped links, a codec on
// 10 Mbit/s links, where the uncompressed allreduce of the model (1.7 MB)
// takes over a second and PowerSGD's factors about 50 KB.
TEST(FashionMnist, AutomaticCompressionFollowsTheLink) {
  if (!have_dataset()) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  const std::string script = std::string(WEFT_SOURCE_DIR) + "/scripts/cluster.sh";
  {
    Process check({script, "check"});
    ASSERT_TRUE(check.wait(60s));
    if (check.exit_code() != 0) GTEST_SKIP() << "no emulated cluster here: " << check.output();
  }
  const std::string prefix = "wfc" + std::to_string(::getpid());
  struct Down {
    std::string script, prefix;
    ~Down() {
      Process p({script, "down", prefix});
      p.wait(60s);
    }
  } down{script, prefix};
  int port = 29700;
  auto choice = [&](const std::string& rate) {
    Process up({script, "up", prefix, "2", rate});
    EXPECT_TRUE(up.wait(60s));
    EXPECT_EQ(up.exit_code(), 0) << up.output();
    const std::string master = "10.77.0.1:" + std::to_string(port++);
    std::vector<std::unique_ptr<Process>> nodes;
    for (int node = 0; node < 2; ++node) {
      nodes.push_back(std::make_unique<Process>(
          std::vector<std::string>{script,
                                   "exec",
                                   prefix,
                                   std::to_string(node + 1),
                                   weft_bin(),
                                   "run",
                                   "--nnodes",
                                   "2",
                                   "--node-rank",
                                   std::to_string(node),
                                   "--master",
                                   master,
                                   "--nproc-per-node",
                                   "1",
                                   "--rdzv-timeout",
                                   "60",
                                   job_bin(),
                                   "--json",
                                   "--epochs",
                                   "1",
                                   "--max-steps",
                                   "3",
                                   "--train-samples",
                                   "1024",
                                   "--test-samples",
                                   "256",
                                   "--compress",
                                   "auto"},
          std::map<std::string, std::string>{{"WEFT_JOB_TOKEN", "compress-auto-test-token"}}));
    }
    for (auto& n : nodes) {
      EXPECT_TRUE(n->wait(300s)) << n->output();
      EXPECT_EQ(n->exit_code(), 0) << n->output();
    }
    auto epochs = epochs_of(nodes[0]->output());
    EXPECT_EQ(epochs.size(), 1u) << nodes[0]->output();
    return epochs.empty() ? std::string("(no epoch)") : epochs[0]["compress"].get<std::string>();
  };
  EXPECT_EQ(choice("0"), "auto->none");
  const std::string slow = choice("10mbit");
  EXPECT_EQ(slow.rfind("auto->", 0), 0u) << slow;
  EXPECT_NE(slow, "auto->none");
}

// A codec the model cannot take is refused before training, naming the flag.
TEST(FashionMnist, CompressionTheModelRefusesExitsBeforeTraining) {
  if (!have_dataset()) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  Process p(
      {job_bin(), "--train-samples", "256", "--test-samples", "64", "--compress", "powersgd:200"});
  ASSERT_TRUE(p.wait(120s)) << p.output();
  EXPECT_EQ(p.exit_code(), 2) << p.output();
  EXPECT_NE(p.output().find("--compress powersgd:200"), std::string::npos) << p.output();
  EXPECT_NE(p.output().find("allows 122"), std::string::npos) << p.output();
  EXPECT_EQ(p.output().find("epoch"), std::string::npos) << p.output();
}

TEST(FashionMnist, BadDatasetsFailNamingTheFile) {
  testing::TempDir dir;
  // Missing directory.
  std::string out = run_failing(dir.path() + "/nowhere");
  EXPECT_NE(out.find(dir.path() + "/nowhere"), std::string::npos) << out;

  // A truncated images file (the header promises 100 images, 50 are there).
  const std::vector<uint32_t> image_dims = {100, 28, 28}, label_dims = {100};
  std::vector<uint8_t> pixels(100 * 28 * 28, 7), labels(100, 1);
  for (const char* split : {"train", "t10k"}) {
    data::write_idx(dir.path() + "/" + split + "-images-idx3-ubyte.gz", image_dims, pixels, true);
    data::write_idx(dir.path() + "/" + split + "-labels-idx1-ubyte.gz", label_dims, labels, true);
  }
  const std::string raw = dir.path() + "/train-images-idx3-ubyte";
  std::filesystem::remove(raw + ".gz");
  data::write_idx(raw, image_dims, pixels, false);
  std::filesystem::resize_file(raw, 16 + 50 * 28 * 28);
  out = run_failing(dir.path());
  EXPECT_NE(out.find(raw), std::string::npos) << out;
  EXPECT_NE(out.find("truncated"), std::string::npos) << out;

  // A corrupt labels file (not IDX at all).
  data::write_idx(raw, image_dims, pixels, false);
  const std::string labels_path = dir.path() + "/train-labels-idx1-ubyte.gz";
  std::ofstream(labels_path, std::ios::trunc) << "this is not a dataset";
  out = run_failing(dir.path());
  EXPECT_NE(out.find(labels_path), std::string::npos) << out;
}

// Every refused flag value: the job ends at start-up with exit code 2 (as
// `weft run` does for its own flags), a message naming the flag, and no
// C++ exception or libtorch stack trace. The data directory does not exist,
// so a value that got past the checks would fail on the dataset instead.
TEST(FashionMnist, BadFlagsAreRefusedAtStartNamingTheFlag) {
  cpu_set_t set;
  CPU_ZERO(&set);
  ASSERT_EQ(sched_getaffinity(0, sizeof(set), &set), 0);
  const std::string too_many_threads = std::to_string(CPU_COUNT(&set) + 1);
  const std::vector<std::vector<std::string>> cases = {
      {"--lr", "nan"},
      {"--lr", "1e308"},
      {"--lr", "0"},
      {"--lr", "-0.1"},
      {"--lr", "inf"},
      {"--momentum", "nan"},
      {"--momentum", "-5"},
      {"--momentum", "1"},
      {"--weight-decay", "nan"},
      {"--weight-decay", "-1"},
      {"--warmup-epochs", "nan"},
      {"--bucket-mb", "1e30"},
      {"--bucket-mb", "nan"},
      {"--bucket-mb", "0"},
      {"--first-bucket-mb", "-1"},
      {"--train-samples", "-5"},
      {"--test-samples", "-1"},
      {"--max-steps", "-1"},
      {"--threads", too_many_threads},
      {"--threads", "0"},
      {"--epochs", "many"},
      {"--batch-size", "0"},
      {"--balance", "fast"},
      {"--balance-every", "0"},
      {"--min-share", "-1"},
      {"--shard-samples", "0"},
      {"--straggler", "sometimes"},
      {"--straggler", "drop"},  // not under `weft run --elastic`
      {"--min-share", "65"},    // above --batch-size 64
      {"--checkpoint-every", "0"},
      {"--checkpoint-every", "-5"},
      {"--checkpoint-every", "10"},  // without --checkpoint-dir
      {"--checkpoint-keep", "0"},
      {"--checkpoint-dir", "/proc/version/ckpt"},  // cannot be created
      {"--resume", "/nonexistent/ckpt"},
      {"--compress", "zip"},
      {"--compress", "topk:0"},
      {"--compress", "topk:2"},
      {"--compress", "topk:x"},
      {"--compress", "powersgd:0"},
      {"--compress", "fp16:2"},
  };
  const std::string nowhere = "/nonexistent/weft-fashion-mnist";
  for (const auto& c : cases) {
    std::vector<std::string> argv = {job_bin(), "--data-dir", nowhere};
    argv.insert(argv.end(), c.begin(), c.end());
    Process p(argv);
    const std::string what = c[0] + " " + c[1];
    ASSERT_TRUE(p.wait(60s)) << what << ":\n" << p.output();
    const std::string out = p.output();
    EXPECT_EQ(p.exit_code(), 2) << what << ":\n" << out;
    EXPECT_NE(out.find(c[0]), std::string::npos) << what << ":\n" << out;
    EXPECT_EQ(out.find(nowhere), std::string::npos) << what << " got past the checks:\n" << out;
    EXPECT_EQ(out.find("terminate"), std::string::npos) << what << ":\n" << out;
    EXPECT_EQ(out.find("Exception raised from"), std::string::npos) << what << ":\n" << out;
  }
  // The message says why (the reason the issue found missing for --bucket-mb 1e30).
  Process p({job_bin(), "--bucket-mb", "1e30"});
  ASSERT_TRUE(p.wait(60s)) << p.output();
  EXPECT_NE(p.output().find("--bucket-mb: 1e30 is not in ["), std::string::npos) << p.output();
  Process t({job_bin(), "--threads", too_many_threads});
  ASSERT_TRUE(t.wait(60s)) << t.output();
  EXPECT_NE(t.output().find("more than the"), std::string::npos) << t.output();
}

// The bounds themselves are accepted: the job gets past the checks and fails
// on the missing dataset instead, naming it.
TEST(FashionMnist, FlagsAtTheirBoundsAreAccepted) {
  testing::TempDir dir;
  const std::string out = run_failing(dir.path() + "/nowhere", {"--lr",
                                                                "1000",
                                                                "--momentum",
                                                                "0",
                                                                "--weight-decay",
                                                                "1",
                                                                "--bucket-mb",
                                                                "65536",
                                                                "--first-bucket-mb",
                                                                "9.5367431640625e-07",
                                                                "--train-samples",
                                                                "0",
                                                                "--test-samples",
                                                                "0",
                                                                "--max-steps",
                                                                "0",
                                                                "--threads",
                                                                "1",
                                                                "--warmup-epochs",
                                                                "0"});
  EXPECT_NE(out.find(dir.path() + "/nowhere"), std::string::npos) << out;
  EXPECT_NE(out.find("dataset-fashion-mnist"), std::string::npos) << out;
}

// The JSON events rank 0 printed (re-plans, the resume).
std::vector<nlohmann::json> events_of(const std::string& output, const std::string& kind) {
  std::vector<nlohmann::json> out;
  std::istringstream in(output);
  std::string line;
  while (std::getline(in, line)) {
    const auto brace = line.find('{');
    if (line.rfind("[0]", 0) != 0 || brace == std::string::npos) continue;
    auto j = nlohmann::json::parse(line.substr(brace));
    if (j.value("event", "") == kind) out.push_back(std::move(j));
  }
  return out;
}

std::vector<std::string> checkpoints_in(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("ckpt-", 0) == 0) out.push_back(name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// A run stopped in the middle of its epoch after a checkpoint exists, then
// resumed on another number of workers: the epoch finishes with every
// training sample trained exactly once (what the checkpoint's ledger says
// was trained plus what the resumed run trained is the whole set), and the
// resumed run keeps checkpointing with growing steps.
TEST(FashionMnist, StoppedRunResumesOnAnotherWorldSizeTrainingEachSampleOnce) {
  if (!have_dataset()) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  testing::TempDir tmp;
  const std::string dir = tmp.path() + "/ckpt";
  const std::vector<std::string> common = {job_bin(),
                                           "--json",
                                           "--train-samples",
                                           "9600",
                                           "--test-samples",
                                           "500",
                                           "--epochs",
                                           "1",
                                           "--batch-size",
                                           "32",
                                           "--seed",
                                           "3",
                                           "--checkpoint-dir",
                                           dir,
                                           "--checkpoint-every",
                                           "10",
                                           "--checkpoint-keep",
                                           "2"};
  std::vector<std::string> first = {weft_bin(), "run", "-n", "2"};
  first.insert(first.end(), common.begin(), common.end());
  Process p1(first);
  ASSERT_TRUE(testing::wait_until(
      [&] { return std::filesystem::exists(dir) && !checkpoints_in(dir).empty(); }, 300s))
      << p1.output();
  p1.signal(SIGTERM);  // 150 steps in the epoch: stopped well before its end
  ASSERT_TRUE(p1.wait(120s)) << p1.output();
  ASSERT_NE(p1.exit_code(), 0) << "the first run finished before it was stopped:\n" << p1.output();
  EXPECT_TRUE(epochs_of(p1.output()).empty()) << p1.output();
  const auto before = checkpoints_in(dir);
  ASSERT_FALSE(before.empty());
  EXPECT_LE(before.size(), 2u);

  std::vector<std::string> second = {weft_bin(), "run", "-n", "3"};
  second.insert(second.end(), common.begin(), common.end());  // resumes from --checkpoint-dir
  Process p2(second);
  ASSERT_TRUE(p2.wait(420s)) << p2.output();
  ASSERT_EQ(p2.exit_code(), 0) << p2.output();
  const auto resumed = events_of(p2.output(), "resume");
  ASSERT_EQ(resumed.size(), 1u) << p2.output();
  EXPECT_EQ(resumed[0]["workers_then"], 2);
  EXPECT_EQ(resumed[0]["checkpoint"], dir + "/" + before.back());
  const int64_t trained = resumed[0]["trained"];
  const int64_t step = resumed[0]["step"];
  EXPECT_GT(step, 0);
  EXPECT_EQ(step % 10, 0);
  EXPECT_EQ(trained, step * 64);  // full global batches of 2 x 32
  EXPECT_LT(trained, 9600);
  const auto epochs = epochs_of(p2.output());
  ASSERT_EQ(epochs.size(), 1u) << p2.output();
  EXPECT_EQ(epochs[0]["workers"], 3);
  EXPECT_EQ(epochs[0]["samples"], 9600);
  EXPECT_EQ(epochs[0]["samples_this_run"].get<int64_t>() + trained, 9600);
  // The resumed run's checkpoints come after the first run's.
  const auto after = checkpoints_in(dir);
  ASSERT_FALSE(after.empty());
  EXPECT_GT(after.back(), before.back());
  auto latest = train::load_latest(dir);
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->first.world_size, 3);
  EXPECT_GT(latest->first.step, step);
}

// Checkpoints that cannot be used end the job before training starts, with
// exit code 2 naming the flag and the reason, and nothing in the directory
// is overwritten or added.
TEST(FashionMnist, UnusableCheckpointsAreRefusedBeforeTraining) {
  if (!have_dataset()) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  testing::TempDir tmp;
  auto write_image = [&](const std::string& dir, const train::TrainState& s,
                         const train::CheckpointMeta& m) {
    std::filesystem::create_directories(dir);
    const auto image = s.snapshot(m);
    std::ofstream(dir + "/" + train::checkpoint_file_name(m.step), std::ios::binary)
        .write(reinterpret_cast<const char*>(image.data()),
               static_cast<std::streamsize>(image.size()));
  };
  auto snapshot_of = [](const std::string& dir) {
    std::map<std::string, std::string> out;
    for (const auto& e : std::filesystem::directory_iterator(dir)) {
      std::ifstream in(e.path(), std::ios::binary);
      out[e.path().filename().string()] =
          std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    }
    return out;
  };
  std::vector<float> weights(10, 1.0f);
  int64_t step = 7;
  train::TrainState other;  // another model
  other.add_tensor("fc.weight", DType::Float32, {10}, weights.data());
  other.add_int("step", &step);
  const std::string model_dir = tmp.path() + "/other-model";
  write_image(model_dir, other, {.step = 7, .epoch = 0, .world_size = 2});
  const std::string version_dir = tmp.path() + "/other-version";
  write_image(version_dir, other,
              {.step = 7, .epoch = 0, .world_size = 2, .weft_version = "0.0.0-old"});
  const std::string empty_dir = tmp.path() + "/empty";
  std::filesystem::create_directories(empty_dir);

  struct Case {
    std::vector<std::string> args;
    std::string dir;
    std::vector<std::string> parts;
  };
  const std::vector<Case> cases = {
      {{"--resume", model_dir}, model_dir, {"--resume", "another model", "fc.weight"}},
      {{"--checkpoint-dir", model_dir}, model_dir, {"--checkpoint-dir", "another model"}},
      {{"--resume", version_dir, "--checkpoint-dir", version_dir},
       version_dir,
       {"--resume", "Weft 0.0.0-old"}},
      {{"--resume", empty_dir}, empty_dir, {"--resume", "no valid checkpoint"}},
  };
  for (const auto& c : cases) {
    const auto files = snapshot_of(c.dir);
    std::vector<std::string> argv = {
        weft_bin(),       "run", "-n",       "2", job_bin(), "--json", "--train-samples", "640",
        "--test-samples", "100", "--epochs", "1"};
    argv.insert(argv.end(), c.args.begin(), c.args.end());
    Process p(argv);
    ASSERT_TRUE(p.wait(180s)) << p.output();
    const std::string out = p.output();
    EXPECT_EQ(p.exit_code(), 2) << out;
    for (const auto& part : c.parts) EXPECT_NE(out.find(part), std::string::npos) << part << out;
    EXPECT_TRUE(epochs_of(out).empty()) << out;
    EXPECT_EQ(snapshot_of(c.dir), files) << "the directory changed:\n" << out;
  }
}

}  // namespace
}  // namespace weft
