// FileStore specifics: file names, several objects and processes sharing a
// directory, and a directory that cannot be used.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "store/store_testing.h"
#include "weft/errors.h"
#include "weft/store.h"

namespace weft::store_test {
namespace {

std::vector<std::string> entries(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    names.push_back(e.path().filename().string());
  }
  return names;
}

TEST(FileStore, OneSafelyNamedFilePerKey) {
  testing::TempDir dir;
  FileStore s(dir.path() + "/nested/store/", 5s);
  s.set("world/0/addr", "10.0.0.1:5000");
  s.set(std::string(1000, 'x'), "long");
  s.set("../escape", "no");
  for (const auto& name : entries(dir.path() + "/nested/store")) {
    EXPECT_LE(name.size(), 255u) << name;
    EXPECT_EQ(name.find('/'), std::string::npos) << name;
    EXPECT_NE(name.rfind("k.", 0) == 0 || name.rfind("h.", 0) == 0 || name == ".lock", false)
        << name;
  }
  EXPECT_FALSE(std::filesystem::exists(dir.path() + "/nested/escape"));
  std::ifstream in(dir.path() + "/nested/store/k.world%2f0%2faddr");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "10.0.0.1:5000");
  // Long keys are hashed: close keys stay distinct.
  std::string a(500, 'a'), b = a;
  b.back() = 'b';
  s.set(a, "A");
  s.set(b, "B");
  EXPECT_EQ(s.get(a), "A");
  EXPECT_EQ(s.get(b), "B");
}

TEST(FileStore, ObjectsOnTheSameDirectoryShareKeys) {
  testing::TempDir dir;
  FileStore a(dir.path(), 5s), b(dir.path(), 5s);
  a.set("k", "v");
  EXPECT_EQ(b.get("k"), "v");
  EXPECT_EQ(a.add("n", 1), 1);
  EXPECT_EQ(b.add("n", 1), 2);
  EXPECT_TRUE(b.remove("k"));
  EXPECT_EQ(a.try_get("k"), std::nullopt);
}

TEST(FileStore, AddIsAtomicAcrossProcesses) {
  testing::TempDir dir;
  const std::string path = dir.path();
  constexpr int kProcs = 4, kAdds = 100;
  std::vector<pid_t> pids;
  for (int i = 0; i < kProcs; ++i) {
    pids.push_back(fork_child([&path, i] {
      FileStore s(path, 20s);
      for (int k = 0; k < kAdds; ++k) s.add("count", 1);
      s.set("done/" + std::to_string(i), "1");
      return 0;
    }));
  }
  FileStore s(path, 30s);
  s.wait({"done/0", "done/1", "done/2", "done/3"});
  for (pid_t pid : pids) EXPECT_EQ(wait_child(pid, 30s), 0);
  EXPECT_EQ(s.get("count"), std::to_string(kProcs * kAdds));
  // No temporary file is left behind.
  for (const auto& name : entries(path)) EXPECT_NE(name.rfind(".tmp", 0), 0u) << name;
}

TEST(FileStore, UnusableDirectoryIsAStoreError) {
  testing::TempDir dir;
  std::ofstream(dir.path() + "/file") << "x";
  EXPECT_THROW(FileStore(dir.path() + "/file", 1s), StoreError);
  EXPECT_THROW(FileStore(dir.path() + "/file/sub", 1s), StoreError);
  EXPECT_THROW(FileStore("", 1s), InvalidArgument);
}

TEST(FileStore, GarbageInAKeyFileIsAnError) {
  testing::TempDir dir;
  FileStore s(dir.path(), 1s);
  std::ofstream(dir.path() + "/k.n") << "not a number";
  EXPECT_EQ(s.get("n"), "not a number");
  EXPECT_THROW(s.add("n", 1), StoreError);
}

}  // namespace
}  // namespace weft::store_test
