// The training state (weft/checkpoint.h): images round trip, every kind of
// damage is refused naming what is wrong and changes nothing, and the disk
// writer is atomic, keeps the newest K and is read back by load_latest.
#include "weft/checkpoint.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <thread>

#include "testing/expect_error.h"
#include "testing/testing.h"
#include "weft/errors.h"
#include "weft/shard_queue.h"
#include "weft/store.h"
#include "weft/train.h"
#include "weft/version.h"
#include "weft/weft.h"

namespace weft::train {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

using testing::expect_error;

// A small model's worth of live state: two tensors, a counter, a data
// ledger (the shard queue) and an opaque blob.
struct Live {
  std::vector<float> weight = std::vector<float>(6 * 4);
  std::vector<double> bias = std::vector<double>(4);
  int64_t step = 0;
  data::ShardQueue queue{100, 3, {.shard_samples = 8, .seed = 5}};
  std::string rng = "rng-state";

  explicit Live(uint32_t seed) {
    std::mt19937 g(seed);
    for (auto& w : weight) w = static_cast<float>(g() % 1000) / 7.0f;
    for (auto& b : bias) b = static_cast<double>(g() % 1000) / 3.0;
    step = static_cast<int64_t>(seed);
    queue.start_epoch(seed % 4);
    for (uint32_t k = 0; k < seed % 3 + 1; ++k) {
      queue.take_step({4, 5, 6});
      queue.complete_step();
    }
    rng = fmt::format("rng-{}", seed);
  }

  void add_to(TrainState& s) {
    s.add_tensor("fc.weight", DType::Float32, {6, 4}, weight.data());
    s.add_tensor("fc.bias", DType::Float64, {4}, bias.data());
    s.add_int("step", &step);
    s.add_blob(
        "data", [this] { return queue.serialize(); },
        [this](std::string_view b) { queue = data::ShardQueue::deserialize(b); },
        [](std::string_view b) { (void)data::ShardQueue::deserialize(b); });
    s.add_blob(
        "rng", [this] { return rng; }, [this](std::string_view b) { rng = std::string(b); });
  }

  bool same_as(const Live& o) const {
    return weight == o.weight && bias == o.bias && step == o.step &&
           queue.serialize() == o.queue.serialize() && rng == o.rng;
  }
};

CheckpointMeta meta_of(int64_t step) {
  CheckpointMeta m;
  m.step = step;
  m.epoch = 2;
  m.world_size = 3;
  m.generation = 7;
  m.membership = "n0.s0.r0 n0.s1.r0 n0.s2.r1";
  return m;
}

TEST(TrainState, SnapshotRoundTrip) {
  Live a(1), b(2);
  TrainState sa, sb;
  a.add_to(sa);
  b.add_to(sb);
  EXPECT_EQ(sa.fingerprint(), sb.fingerprint());
  EXPECT_EQ(sa.fingerprint(),
            "tensor fc.weight float32 [6, 4]\ntensor fc.bias float64 [4]\nint step\nblob data\n"
            "blob rng\n");
  ASSERT_FALSE(a.same_as(b));
  const auto image = sa.snapshot(meta_of(11));
  const CheckpointMeta m = sb.restore(image);
  EXPECT_TRUE(a.same_as(b));
  EXPECT_EQ(m.step, 11);
  EXPECT_EQ(m.epoch, 2);
  EXPECT_EQ(m.world_size, 3);
  EXPECT_EQ(m.generation, 7u);
  EXPECT_EQ(m.membership, "n0.s0.r0 n0.s1.r0 n0.s2.r1");
  EXPECT_EQ(m.weft_version, weft::version());
  EXPECT_EQ(m.model, sa.fingerprint());
  const CheckpointMeta r = read_meta(image);
  EXPECT_EQ(r.step, 11);
  EXPECT_EQ(r.model, m.model);
  // The restored queue hands out the same samples as the original.
  EXPECT_EQ(a.queue.take_step({1, 2, 3}), b.queue.take_step({1, 2, 3}));
}

// Every parameter and state buffer of an engine, by name.
TEST(TrainState, EngineEntries) {
  auto store = std::make_shared<MemoryStore>();
  CommOptions o;
  o.timeout = 60s;
  o.job_token = "checkpoint-test";
  auto comm = Communicator::create(0, 1, store, o);
  std::vector<float> w(10, 1.0f), g(10), mean(3, 0.5f);
  std::vector<int64_t> count(1, 9);
  std::vector<Parameter> params{{"w", DType::Float32, {2, 5}, w.data(), g.data()}};
  std::vector<StateBuffer> buffers{{"bn.mean", DType::Float32, {3}, mean.data()},
                                   {"bn.count", DType::Int64, {}, count.data()}};
  DataParallel dp(comm, params, buffers);
  TrainState s;
  s.add_engine(dp);
  EXPECT_EQ(s.fingerprint(),
            "tensor w float32 [2, 5]\ntensor bn.mean float32 [3]\ntensor bn.count int64 []\n");
  const auto image = s.snapshot(meta_of(1));
  w.assign(10, 0.0f);
  mean.assign(3, 0.0f);
  count[0] = 0;
  s.restore(image);
  EXPECT_EQ(w, std::vector<float>(10, 1.0f));
  EXPECT_EQ(mean, std::vector<float>(3, 0.5f));
  EXPECT_EQ(count[0], 9);
}

TEST(TrainState, BadRegistrationsAreRefused) {
  TrainState s;
  float x = 0;
  int64_t i = 0;
  s.add_tensor("x", DType::Float32, {}, &x);
  expect_error<InvalidArgument>([&] { s.add_int("x", &i); }, {"'x' is added twice"});
  expect_error<InvalidArgument>([&] { s.add_tensor("y", DType::Float32, {1}, nullptr); },
                                {"'y' has no data"});
  expect_error<InvalidArgument>([&] { s.add_tensor("y", DType::Float32, {-1}, &x); },
                                {"'y' has a bad shape"});
  expect_error<InvalidArgument>([&] { s.add_int("", &i); }, {"name of 0 bytes"});
  expect_error<InvalidArgument>([&] { s.add_int("a\nb", &i); }, {"newline"});
  expect_error<InvalidArgument>([&] { s.add_blob("b", {}, {}); }, {"needs save and load"});
  EXPECT_EQ(s.size(), 1u);
}

// Each byte of an image flipped: refused (DataError: a checksum or a bound;
// or InvalidArgument: the version or the layout differ) and nothing
// written into the live state.
TEST(TrainState, EveryCorruptByteIsRefusedAndChangesNothing) {
  Live a(1);
  TrainState sa;
  a.add_to(sa);
  const auto image = sa.snapshot(meta_of(3));
  Live b(2), b0(2);
  TrainState sb;
  b.add_to(sb);
  for (size_t i = 0; i < image.size(); ++i) {
    auto bad = image;
    bad[i] ^= std::byte{0x20};
    EXPECT_THROW((void)sb.restore(bad), Error) << "byte " << i;
    ASSERT_TRUE(b.same_as(b0)) << "byte " << i << " changed the live state";
  }
  // A flipped byte in the payload of the first tensor: its checksum.
  const auto* first = reinterpret_cast<const std::byte*>(a.weight.data());
  const auto it = std::search(image.begin(), image.end(), first, first + 16);
  ASSERT_NE(it, image.end());
  const auto payload = static_cast<size_t>(it - image.begin()) + 5;
  auto bad = image;
  bad[payload] ^= std::byte{1};
  expect_error<DataError>([&] { (void)sb.restore(bad); }, {"checksum mismatch", "fc.weight"});
  // read_meta checks the entries too.
  EXPECT_THROW((void)read_meta(bad), DataError);
}

TEST(TrainState, EveryTruncationIsRefused) {
  Live a(1), b(2), b0(2);
  TrainState sa, sb;
  a.add_to(sa);
  b.add_to(sb);
  const auto image = sa.snapshot(meta_of(3));
  for (size_t len = 0; len < image.size(); ++len) {
    EXPECT_THROW((void)sb.restore(std::span(image).first(len)), DataError) << len;
  }
  ASSERT_TRUE(b.same_as(b0));
  expect_error<DataError>([&] { (void)sb.restore(std::span(image).first(image.size() - 3)); },
                          {"truncated"});
  auto longer = image;
  longer.push_back(std::byte{0});
  expect_error<DataError>([&] { (void)sb.restore(longer); }, {"1 bytes of trailing data"});
}

void put_u32(std::vector<std::byte>& b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + i] = static_cast<std::byte>(v >> (8 * i));
}
void put_u64(std::vector<std::byte>& b, size_t at, uint64_t v) {
  for (int i = 0; i < 8; ++i) b[at + i] = static_cast<std::byte>(v >> (8 * i));
}

// Forged length fields (with the checksum they would need left wrong, and
// also at the very front, before any checksum can be checked) are bounded
// by the bytes present: no allocation of what they claim.
TEST(TrainState, HugeLengthFieldsAreBounded) {
  Live a(1);
  TrainState sa;
  a.add_to(sa);
  const auto image = sa.snapshot(meta_of(3));
  const size_t membership_at = 4 + 4 + 8 + 8 + 4 + 4;
  for (uint32_t huge : {0xffffffffu, 0x7fffffffu, 1u << 30, 1u << 20}) {
    auto bad = image;
    put_u32(bad, membership_at, huge);
    expect_error<DataError>([&] { (void)read_meta(bad); }, {"membership"});
  }
  // The entry count.
  const size_t fp = sa.fingerprint().size();
  const size_t version = std::strlen(weft::version());
  const size_t count_at = membership_at + 4 + meta_of(3).membership.size() + 4 + version + 4 + fp;
  for (uint64_t huge : {~uint64_t{0}, uint64_t{1} << 40, uint64_t{1000}}) {
    auto bad = image;
    put_u64(bad, count_at, huge);
    expect_error<DataError>([&] { (void)read_meta(bad); }, {"entries cannot fit"});
  }
  // The first entry: its name length, its number of dimensions, its
  // payload length.
  const size_t entry = count_at + 8 + 4;
  {
    auto bad = image;
    put_u32(bad, entry, 0xffffffffu);
    expect_error<DataError>([&] { (void)read_meta(bad); }, {"entry 0", "name length"});
  }
  const size_t name = std::strlen("fc.weight");
  {
    auto bad = image;
    put_u32(bad, entry + 4 + name + 2, 1u << 31);
    expect_error<DataError>([&] { (void)read_meta(bad); }, {"fc.weight", "dimensions"});
  }
  {
    auto bad = image;
    put_u64(bad, entry + 4 + name + 2 + 4 + 16, uint64_t{1} << 62);
    expect_error<DataError>([&] { (void)read_meta(bad); }, {"fc.weight", "payload of"});
  }
  {
    // A shape whose size overflows.
    auto bad = image;
    put_u64(bad, entry + 4 + name + 2 + 4, uint64_t{1} << 62);
    expect_error<DataError>([&] { (void)read_meta(bad); }, {"fc.weight", "does not match"});
  }
}

TEST(TrainState, AnotherModelIsRefusedNamingTheEntry) {
  Live a(1);
  TrainState sa;
  a.add_to(sa);
  const auto image = sa.snapshot(meta_of(3));

  // Another shape.
  std::vector<float> w(6 * 5);
  Live b(2), b0(2);
  TrainState other;
  other.add_tensor("fc.weight", DType::Float32, {6, 5}, w.data());
  other.add_tensor("fc.bias", DType::Float64, {4}, b.bias.data());
  other.add_int("step", &b.step);
  expect_error<InvalidArgument>(
      [&] { (void)other.restore(image); },
      {"another model", "entry 0", "tensor fc.weight float32 [6, 4]' in the checkpoint",
       "'tensor fc.weight float32 [6, 5]' here"});
  EXPECT_EQ(b.step, b0.step);
  // Another dtype.
  TrainState dtype;
  std::vector<float> bias32(4);
  dtype.add_tensor("fc.weight", DType::Float32, {6, 4}, w.data());
  dtype.add_tensor("fc.bias", DType::Float32, {4}, bias32.data());
  expect_error<InvalidArgument>([&] { (void)dtype.restore(image); },
                                {"another model", "entry 1", "fc.bias float64 [4]"});
  // An entry missing.
  TrainState fewer;
  Live c(3), c0(3);
  c.add_to(fewer);
  int64_t extra = 5;
  fewer.add_int("extra", &extra);
  expect_error<InvalidArgument>([&] { (void)fewer.restore(image); },
                                {"another model", "entry 5", "(nothing)", "int extra"});
  EXPECT_TRUE(c.same_as(c0));
  EXPECT_EQ(extra, 5);
}

TEST(TrainState, AnotherWeftVersionIsRefused) {
  Live a(1), b(2), b0(2);
  TrainState sa, sb;
  a.add_to(sa);
  b.add_to(sb);
  CheckpointMeta m = meta_of(3);
  m.weft_version = "0.0.1-old";
  const auto image = sa.snapshot(m);
  EXPECT_EQ(read_meta(image).weft_version, "0.0.1-old");
  expect_error<InvalidArgument>([&] { (void)sb.restore(image); },
                                {"Weft 0.0.1-old", std::string("this is Weft ") + weft::version()});
  EXPECT_TRUE(b.same_as(b0));
}

// A blob whose validator refuses it (here a shard queue ledger with a bad
// checksum, resealed at the checkpoint level) changes nothing.
TEST(TrainState, RefusedBlobChangesNothing) {
  Live a(1), b(2), b0(2);
  TrainState sa, sb;
  a.add_to(sa);
  b.add_to(sb);
  std::string ledger = a.queue.serialize();
  ledger[ledger.size() - 1] ^= 1;  // the ledger's own checksum
  TrainState forged;
  forged.add_tensor("fc.weight", DType::Float32, {6, 4}, a.weight.data());
  forged.add_tensor("fc.bias", DType::Float64, {4}, a.bias.data());
  forged.add_int("step", &a.step);
  forged.add_blob(
      "data", [&] { return ledger; }, [](std::string_view) {});
  forged.add_blob(
      "rng", [] { return std::string("x"); }, [](std::string_view) {});
  const auto image = forged.snapshot(meta_of(3));
  expect_error<DataError>([&] { (void)sb.restore(image); },
                          {"blob data", "refused", "shard queue state: checksum mismatch"});
  EXPECT_TRUE(b.same_as(b0));
}

// ---------------------------------------------------------------------------
// Disk
// ---------------------------------------------------------------------------

std::vector<std::string> files_of(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

TEST(CheckpointWriter, KeepsTheNewestK) {
  testing::TempDir tmp;
  const std::string dir = tmp.path() + "/a/b";  // created with its parents
  Live a(1);
  TrainState s;
  a.add_to(s);
  {
    CheckpointWriter w(dir, 2);
    for (int64_t step : {5, 10, 15, 20}) {
      a.step = step;
      w.write(s.snapshot(meta_of(step)), meta_of(step));
      w.flush();
    }
    EXPECT_EQ(w.written(), 4);
  }
  EXPECT_EQ(files_of(dir),
            (std::vector<std::string>{"ckpt-000000000015.weft", "ckpt-000000000020.weft"}));
  auto latest = load_latest(dir);
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->first.step, 20);
  Live b(2);
  TrainState sb;
  b.add_to(sb);
  sb.restore(latest->second);
  EXPECT_EQ(b.step, 20);
  EXPECT_TRUE(a.same_as(b));
}

// Queued writes return at once; a write waiting behind another is replaced
// by a newer one; the destructor writes what is pending.
TEST(CheckpointWriter, QueuedWritesAndDestructor) {
  testing::TempDir tmp;
  Live a(1);
  TrainState s;
  a.add_to(s);
  int64_t dropped = 0;
  {
    CheckpointWriter w(tmp.path(), 100);
    for (int64_t step = 1; step <= 50; ++step) w.write(s.snapshot(meta_of(step)), meta_of(step));
    dropped = w.dropped();
  }
  // Every write either reached the disk or was replaced by a newer one, and
  // the last one always reaches it.
  const auto files = files_of(tmp.path());
  EXPECT_EQ(static_cast<int64_t>(files.size()) + dropped, 50);
  ASSERT_FALSE(files.empty());
  EXPECT_EQ(files.back(), "ckpt-000000000050.weft");
}

// No partial file is ever visible under a checkpoint's name: a reader
// polling the directory while large images are written finds only complete,
// valid checkpoints.
TEST(CheckpointWriter, AtomicNoPartialFileVisible) {
  testing::TempDir tmp;
  std::vector<float> big(1 << 20);  // 4 MiB per image
  std::iota(big.begin(), big.end(), 0.0f);
  TrainState s;
  s.add_tensor("big", DType::Float32, {static_cast<int64_t>(big.size())}, big.data());
  std::atomic<bool> done{false};
  std::atomic<int> checked{0};
  std::string problem;
  std::thread reader([&] {
    while (!done.load()) {
      for (const auto& e : fs::directory_iterator(tmp.path())) {
        const std::string name = e.path().filename().string();
        if (name.rfind("ckpt-", 0) != 0) continue;
        std::ifstream in(e.path(), std::ios::binary);
        if (!in) continue;  // removed by pruning meanwhile
        std::vector<char> bytes((std::istreambuf_iterator<char>(in)),
                                std::istreambuf_iterator<char>());
        if (bytes.empty() && !fs::exists(e.path())) continue;
        try {
          (void)read_meta(std::as_bytes(std::span(bytes)));
          ++checked;
        } catch (const std::exception& x) {
          if (fs::exists(e.path())) problem = name + ": " + x.what();
        }
      }
    }
  });
  {
    CheckpointWriter w(tmp.path(), 2);
    for (int64_t step = 1; step <= 8; ++step) {
      big[0] = static_cast<float>(step);
      w.write(s.snapshot(meta_of(step)), meta_of(step));
      w.flush();
    }
  }
  done = true;
  reader.join();
  EXPECT_EQ(problem, "");
  EXPECT_GT(checked.load(), 0);
  // No temporary file is left behind.
  for (const auto& name : files_of(tmp.path())) EXPECT_EQ(name.find(".tmp"), std::string::npos);
}

TEST(CheckpointWriter, UnwritableDirectoryIsRefusedNamingIt) {
  testing::TempDir tmp;
  const std::string file = tmp.path() + "/plain-file";
  std::ofstream(file) << "x";
  expect_error<InvalidArgument>([&] { CheckpointWriter w(file + "/sub"); },
                                {file + "/sub", "cannot be created"});
  expect_error<InvalidArgument>([&] { CheckpointWriter w(file); }, {file, "Not a directory"});
  expect_error<InvalidArgument>([&] { CheckpointWriter w(tmp.path(), 0); }, {"keep 0"});
  if (::geteuid() != 0) {
    const std::string ro = tmp.path() + "/ro";
    fs::create_directory(ro);
    fs::permissions(ro, fs::perms::owner_read | fs::perms::owner_exec);
    expect_error<InvalidArgument>([&] { CheckpointWriter w(ro); }, {ro, "cannot be written"});
    fs::permissions(ro, fs::perms::owner_all);
  }
}

// A write that fails (the directory vanished) is reported by flush() and
// names the file.
TEST(CheckpointWriter, WriteErrorIsRethrownByFlush) {
  testing::TempDir tmp;
  const std::string dir = tmp.path() + "/gone";
  CheckpointWriter w(dir);
  fs::remove_all(dir);
  std::ofstream(dir) << "now a file";
  int64_t step = 1;
  TrainState s;
  s.add_int("step", &step);
  w.write(s.snapshot(meta_of(1)), meta_of(1));
  expect_error<DataError>([&] { w.flush(); }, {dir + "/ckpt-000000000001.weft"});
  // Reported once; the next write goes on.
  EXPECT_NO_THROW(w.flush());
}

TEST(LoadLatest, SkipsCorruptAndTruncatedNewestNamingThem) {
  testing::TempDir tmp;
  Live a(1);
  TrainState s;
  a.add_to(s);
  {
    CheckpointWriter w(tmp.path(), 5);
    for (int64_t step : {100, 200, 300}) {
      a.step = step;
      w.write(s.snapshot(meta_of(step)), meta_of(step));
      w.flush();
    }
  }
  const std::string newest = tmp.path() + "/ckpt-000000000300.weft";
  const std::string middle = tmp.path() + "/ckpt-000000000200.weft";
  {
    // A flipped byte in the newest, a truncation of the next.
    // The payload of the last entry ("rng-1"), just before its checksum.
    const auto at = static_cast<std::streamoff>(fs::file_size(newest) - 6);
    std::fstream f(newest, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(at);
    char c = 0;
    f.read(&c, 1);
    f.seekp(at);
    c ^= 0x40;
    f.write(&c, 1);
  }
  fs::resize_file(middle, fs::file_size(middle) - 100);
  // Files that are not checkpoints are ignored.
  std::ofstream(tmp.path() + "/.ckpt-000000000400.weft.tmp.123") << "partial";
  std::ofstream(tmp.path() + "/notes.txt") << "hello";
  std::vector<std::string> skipped;
  auto latest = load_latest(tmp.path(), &skipped);
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->first.step, 100);
  ASSERT_EQ(skipped.size(), 2u);
  EXPECT_NE(skipped[0].find(newest), std::string::npos) << skipped[0];
  EXPECT_NE(skipped[0].find("checksum mismatch"), std::string::npos) << skipped[0];
  EXPECT_NE(skipped[1].find(middle), std::string::npos) << skipped[1];
  EXPECT_NE(skipped[1].find("truncated"), std::string::npos) << skipped[1];

  // A file renamed to another step's name is refused too.
  fs::rename(tmp.path() + "/ckpt-000000000100.weft", tmp.path() + "/ckpt-000000000150.weft");
  skipped.clear();
  EXPECT_FALSE(load_latest(tmp.path(), &skipped).has_value());
  ASSERT_EQ(skipped.size(), 3u);
  EXPECT_NE(skipped[2].find("its name says step 150, its image step 100"), std::string::npos);
}

TEST(LoadLatest, MissingOrEmptyDirectory) {
  testing::TempDir tmp;
  EXPECT_FALSE(load_latest(tmp.path() + "/nowhere").has_value());
  EXPECT_FALSE(load_latest(tmp.path()).has_value());
  std::ofstream(tmp.path() + "/file") << "x";
  EXPECT_THROW((void)load_latest(tmp.path() + "/file"), DataError);
}

}  // namespace
}  // namespace weft::train
