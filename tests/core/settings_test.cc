#include "core/settings.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include "core/log.h"
#include "core/socket.h"
#include "weft/errors.h"
#include "weft/options.h"
#include "weft/store.h"

namespace weft {
namespace {

using namespace std::chrono_literals;

// Sets (or unsets, with nullptr) a variable for the scope of a test.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value)
      setenv(name, value, 1);
    else
      unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_)
      setenv(name_.c_str(), old_->c_str(), 1);
    else
      unsetenv(name_.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::optional<std::string> old_;
};

// The message of the InvalidArgument that f throws ("" when it throws none).
template <typename F>
std::string invalid(F f) {
  try {
    f();
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

TEST(Settings, Bytes) {
  EXPECT_EQ(settings::parse_bytes("4096", "X"), 4096u);
  EXPECT_EQ(settings::parse_bytes("64K", "X"), 65536u);
  EXPECT_EQ(settings::parse_bytes("4M", "X"), 4u << 20);
  EXPECT_EQ(settings::parse_bytes("1G", "X"), 1u << 30);
  EXPECT_THROW(settings::parse_bytes("4Q", "X"), InvalidArgument);
  EXPECT_THROW(settings::parse_bytes("-1", "X"), InvalidArgument);
  EXPECT_THROW(settings::parse_bytes(" 1", "X"), InvalidArgument);
  EXPECT_THROW(settings::parse_bytes("", "X"), InvalidArgument);
  EXPECT_THROW(settings::parse_bytes("99999999999999999999", "X"), InvalidArgument);
}

TEST(Settings, Seconds) {
  EXPECT_EQ(settings::parse_seconds("2.5", "X"), 2500ms);
  EXPECT_EQ(settings::parse_seconds("0.0001", "X"), 1ms);
  EXPECT_TRUE(contains(invalid([] { settings::parse_seconds("abc", "--t"); }), "--t='abc'"));
  EXPECT_TRUE(contains(invalid([] { settings::parse_seconds("-1", "--t"); }), "positive"));
  EXPECT_TRUE(contains(invalid([] { settings::parse_seconds("0", "--t"); }), "positive"));
  // Too large is not "not positive".
  const std::string big = invalid([] { settings::parse_seconds("1e300", "--timeout"); });
  EXPECT_TRUE(contains(big, "too large")) << big;
  EXPECT_FALSE(contains(big, "positive")) << big;
  EXPECT_TRUE(contains(invalid([] { settings::parse_seconds("inf", "--t"); }), "too large"));
  EXPECT_NE(invalid([] { settings::parse_seconds("nan", "--t"); }), "");
}

TEST(Settings, TypedReadsUseTheDeclaration) {
  {
    ScopedEnv e("WEFT_SPIN_US", nullptr);
    EXPECT_EQ(settings::get(settings::kSpinUs), 20);
  }
  {
    ScopedEnv e("WEFT_SPIN_US", "17");
    EXPECT_EQ(settings::get(settings::kSpinUs), 17);
  }
  {
    ScopedEnv e("WEFT_SPIN_US", "20000");  // above the declared 10000
    const std::string m = invalid([] { settings::get(settings::kSpinUs); });
    EXPECT_TRUE(contains(m, "WEFT_SPIN_US='20000'")) << m;
    EXPECT_TRUE(contains(m, "[0, 10000]")) << m;
  }
  {
    ScopedEnv e("WEFT_TIMEOUT", "2.5");
    EXPECT_EQ(settings::get(settings::kTimeout), 2500ms);
  }
  {
    ScopedEnv e("WEFT_TIMEOUT", "abc");
    EXPECT_TRUE(contains(invalid([] { settings::get(settings::kTimeout); }), "WEFT_TIMEOUT"));
  }
  {
    ScopedEnv e("WEFT_SHM", "off");
    EXPECT_FALSE(settings::get(settings::kShm));
  }
  {
    ScopedEnv e("WEFT_SHM", "maybe");
    EXPECT_TRUE(contains(invalid([] { settings::get(settings::kShm); }), "WEFT_SHM='maybe'"));
  }
  {
    ScopedEnv e("WEFT_REDUCE_ISA", "avx1024");
    const std::string m = invalid([] { settings::get(settings::kReduceIsa); });
    EXPECT_TRUE(contains(m, "WEFT_REDUCE_ISA='avx1024'")) << m;
    EXPECT_TRUE(contains(m, "auto, avx512, avx2 or generic")) << m;
  }
  {
    ScopedEnv e("WEFT_ALLREDUCE_ALGO", "fastest");
    EXPECT_TRUE(
        contains(invalid([] { settings::get(settings::kAllreduceAlgo); }), "WEFT_ALLREDUCE_ALGO"));
  }
  {
    ScopedEnv e("WEFT_JOB_TOKEN", "short");
    const std::string m = invalid([] { settings::get(settings::kJobToken); });
    EXPECT_TRUE(contains(m, "WEFT_JOB_TOKEN")) << m;
    EXPECT_FALSE(contains(m, "short'")) << "the secret is printed: " << m;
  }
  {
    ScopedEnv e("WEFT_STORE", "nohost");
    EXPECT_TRUE(contains(invalid([] { settings::get(settings::kStore); }), "WEFT_STORE"));
  }
}

TEST(Settings, RingMustBeZeroOrAPowerOfTwoInRange) {
  auto ring = [](const char* v) { return settings::problem(settings::kShmRing, v); };
  EXPECT_EQ(ring("0"), "");
  EXPECT_EQ(ring("64K"), "");
  EXPECT_EQ(ring("1M"), "");
  EXPECT_EQ(ring("64M"), "");
  EXPECT_TRUE(contains(ring("3"), "power of two")) << ring("3");
  EXPECT_TRUE(contains(ring("96K"), "not a power of two")) << ring("96K");
  EXPECT_NE(ring("32K"), "");
  EXPECT_NE(ring("128M"), "");
  ScopedEnv e("WEFT_SHM_RING", "3");
  EXPECT_TRUE(contains(invalid([] { settings::get(settings::kShmRing); }), "WEFT_SHM_RING='3'"));
}

TEST(Settings, ReadingAnUndeclaredVariableIsAProgrammingError) {
  ScopedEnv e("WEFT_NOT_DECLARED", "1");
  // A declaration that is not listed in the table.
  static constexpr settings::IntSetting kStray{"WEFT_NOT_DECLARED", 0, 0, 1, "not listed"};
  EXPECT_THROW(settings::get(kStray), InternalError);
  EXPECT_THROW(settings::get("WEFT_NOT_DECLARED"), InternalError);
  EXPECT_THROW(settings::get_int("WEFT_NOT_DECLARED", 0, 0, 1), InternalError);
  // A copy of a declaration with the same name is not the declaration.
  static constexpr settings::IntSetting kCopy{"WEFT_SPIN_US", 1, 0, 5, "a second default"};
  EXPECT_THROW(settings::get(kCopy), InternalError);
  // Other launchers' variables are not Weft's to declare.
  ScopedEnv o("OMPI_COMM_WORLD_SIZE", "4");
  EXPECT_EQ(settings::get_int("OMPI_COMM_WORLD_SIZE", 1, 1, 8), 4);
  // Run-time bounds apply on top of the declared ones.
  ScopedEnv r("WEFT_RANK", "3");
  EXPECT_EQ(settings::get_int("WEFT_RANK", 0, 0, 3), 3);
  EXPECT_THROW(settings::get_int("WEFT_RANK", 0, 0, 2), InvalidArgument);
}

TEST(Settings, DeclarationsAreConsistent) {
  std::set<std::string_view> names;
  for (const settings::Setting* s : settings::all()) {
    EXPECT_TRUE(s->env.starts_with("WEFT_")) << s->env;
    EXPECT_TRUE(names.insert(s->env).second) << s->env << " declared twice";
    EXPECT_FALSE(s->doc.empty()) << s->env;
    EXPECT_EQ(settings::find(s->env), s);
    // The default a setting falls back to is itself a valid value.
    if (!(s->flags & settings::kNoDefault)) {
      EXPECT_EQ(settings::problem(*s, settings::default_text(*s)), "")
          << s->env << " default " << settings::default_text(*s);
    }
    if (s->type == settings::Type::Int || s->type == settings::Type::Bytes) {
      EXPECT_LE(s->min, s->max) << s->env;
    }
  }
  // Each collective's algorithm setting is named after it.
  for (int i = 1; i <= 11; ++i) {
    const auto c = static_cast<Collective>(i);
    std::string want = "WEFT_";
    for (const char* p = collective_name(c); *p; ++p) want += static_cast<char>(std::toupper(*p));
    EXPECT_EQ(settings::algorithm_setting(c).env, want + "_ALGO");
  }
}

// The defaults of CommOptions and of the declarations are the same: the
// options read from an environment without WEFT_* variables are the
// struct's defaults.
TEST(Settings, DeclaredDefaultsMatchTheOptions) {
  std::vector<std::unique_ptr<ScopedEnv>> clear;
  for (const settings::Setting* s : settings::all()) {
    clear.push_back(std::make_unique<ScopedEnv>(std::string(s->env).c_str(), nullptr));
  }
  const CommOptions d;
  const CommOptions e = CommOptions::from_env();
  EXPECT_EQ(e.timeout, d.timeout);
  EXPECT_EQ(e.shm, d.shm);
  EXPECT_EQ(e.shm_single_copy, d.shm_single_copy);
  EXPECT_EQ(e.shm_single_copy_min_bytes, d.shm_single_copy_min_bytes);
  EXPECT_EQ(e.shm_ring_bytes, d.shm_ring_bytes);
  EXPECT_EQ(e.sockets_per_peer, d.sockets_per_peer);
  EXPECT_EQ(e.socket_buffer_bytes, d.socket_buffer_bytes);
  EXPECT_EQ(e.max_unexpected_bytes, d.max_unexpected_bytes);
  EXPECT_EQ(e.allow_unauthenticated, d.allow_unauthenticated);
  EXPECT_EQ(e.heartbeat_interval, d.heartbeat_interval);
  EXPECT_EQ(e.heartbeat_timeout, d.heartbeat_timeout);
  EXPECT_EQ(settings::get(settings::kStoreTimeout), kDefaultStoreTimeout);
}

TEST(Settings, StartUpCheckRefusesInvalidValuesAndWarnsOfUnknownNames) {
  EXPECT_NO_THROW(settings::validate_environment());
  {
    ScopedEnv e("WEFT_LOG_LEVEL", "bogus");
    const std::string m = invalid([] { settings::validate_environment(); });
    EXPECT_TRUE(contains(m, "WEFT_LOG_LEVEL='bogus'")) << m;
  }
  {
    ScopedEnv e("WEFT_REDUCE_ISA", "avx1024");
    EXPECT_TRUE(contains(invalid([] { settings::validate_environment(); }), "WEFT_REDUCE_ISA"));
  }
  {
    ScopedEnv e("WEFT_SHM_RING", "3");
    EXPECT_TRUE(contains(invalid([] { settings::validate_environment(); }), "WEFT_SHM_RING"));
  }
  {
    ScopedEnv e("WEFT_TIMEOUT", "");  // empty: unset
    EXPECT_NO_THROW(settings::validate_environment());
  }
  ScopedEnv e("WEFT_TIMOUT", "30");
  auto unknown = settings::unknown_variables();
  EXPECT_NE(std::find(unknown.begin(), unknown.end(), "WEFT_TIMOUT"), unknown.end());
  ::testing::internal::CaptureStderr();
  EXPECT_NO_THROW(settings::validate_environment());
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_TRUE(contains(err, "WEFT_TIMOUT is not a Weft setting")) << err;
  EXPECT_TRUE(contains(err, "did you mean WEFT_TIMEOUT?")) << err;
}

TEST(Log, LevelsAreTheDeclaredChoices) {
  for (const char* l : {"trace", "debug", "info", "warn", "error", "off"}) {
    EXPECT_NO_THROW(log::parse_level(l));
    EXPECT_EQ(settings::problem(settings::kLogLevel, l), "") << l;
  }
  EXPECT_THROW(log::parse_level("bogus"), InvalidArgument);
  EXPECT_NE(settings::problem(settings::kLogLevel, "bogus"), "");
}

TEST(Log, RateLimiterCountsWhatItHoldsBack) {
  log::RateLimiter rl("test lines", 3, std::chrono::seconds(10));
  const auto t0 = log::RateLimiter::Clock::now();
  for (int i = 0; i < 3; ++i) {
    auto d = rl.admit(t0 + std::chrono::milliseconds(i));
    EXPECT_TRUE(d.write) << i;
    EXPECT_EQ(d.last, i == 2) << i;
    EXPECT_EQ(d.held_back, 0u);
  }
  for (int i = 0; i < 100; ++i) EXPECT_FALSE(rl.admit(t0 + std::chrono::seconds(5)).write);
  EXPECT_EQ(rl.suppressed(), 100u);
  // The next period: written again, with the count of those held back.
  auto d = rl.admit(t0 + std::chrono::seconds(11));
  EXPECT_TRUE(d.write);
  EXPECT_EQ(d.held_back, 100u);
  EXPECT_EQ(rl.events(), 104u);
  // report() writes the count of lines held back since the last one written.
  for (int i = 0; i < 5; ++i) rl.admit(t0 + std::chrono::seconds(12));
  log::set_level(log::Level::Warn);
  rl.write(log::Level::Warn, "one more");  // within the period: held back
  ::testing::internal::CaptureStderr();
  rl.report();
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_TRUE(contains(err, "4 more test lines were not logged (110 in all)")) << err;
}

// Every WEFT_ name in a string literal of the sources is a declared
// setting: a variable read, set for a worker or named in a message that
// `weft config` does not list is caught here.
std::vector<std::string> string_literals(const std::string& src) {
  std::vector<std::string> out;
  size_t i = 0;
  const size_t n = src.size();
  while (i < n) {
    if (src.compare(i, 2, "//") == 0) {
      i = src.find('\n', i);
      if (i == std::string::npos) break;
    } else if (src.compare(i, 2, "/*") == 0) {
      i = src.find("*/", i + 2);
      if (i == std::string::npos) break;
      i += 2;
    } else if (src[i] == '\'') {
      // A character literal (or a digit separator: skip just the quote).
      if (i + 2 < n && src[i + 1] == '\\') {
        size_t end = src.find('\'', i + 2);
        i = end == std::string::npos ? n : end + 1;
      } else if (i + 2 < n && src[i + 2] == '\'') {
        i += 3;
      } else {
        ++i;
      }
    } else if (src[i] == 'R' && i + 1 < n && src[i + 1] == '"' &&
               (i == 0 ||
                !(std::isalnum(static_cast<unsigned char>(src[i - 1])) || src[i - 1] == '_'))) {
      size_t open = src.find('(', i + 2);
      if (open == std::string::npos) break;
      const std::string close = ")" + src.substr(i + 2, open - i - 2) + "\"";
      size_t end = src.find(close, open + 1);
      if (end == std::string::npos) break;
      out.push_back(src.substr(open + 1, end - open - 1));
      i = end + close.size();
    } else if (src[i] == '"') {
      std::string lit;
      ++i;
      while (i < n && src[i] != '"') {
        if (src[i] == '\\' && i + 1 < n) ++i;
        lit += src[i++];
      }
      ++i;
      out.push_back(lit);
    } else {
      ++i;
    }
  }
  return out;
}

TEST(Settings, EveryVariableInTheSourcesIsDeclared) {
  namespace fs = std::filesystem;
  const fs::path root = WEFT_SOURCE_DIR;
  const std::regex name(R"(WEFT_[A-Z0-9_]*[A-Z0-9])");
  std::map<std::string, std::string> undeclared;  // name -> first file
  std::set<std::string> seen;
  size_t files = 0;
  for (const char* dir : {"src", "include", "tools", "examples", "bench"}) {
    if (!fs::exists(root / dir)) continue;
    for (const auto& entry : fs::recursive_directory_iterator(root / dir)) {
      const std::string ext = entry.path().extension().string();
      if (!entry.is_regular_file() ||
          (ext != ".h" && ext != ".cc" && ext != ".cpp" && ext != ".hpp"))
        continue;
      ++files;
      std::ifstream in(entry.path());
      std::stringstream ss;
      ss << in.rdbuf();
      for (const std::string& lit : string_literals(ss.str())) {
        for (std::sregex_iterator it(lit.begin(), lit.end(), name), end; it != end; ++it) {
          const std::string v = it->str();
          seen.insert(v);
          if (settings::find(v) == nullptr) {
            undeclared.emplace(v, fs::relative(entry.path(), root).string());
          }
        }
      }
    }
  }
  for (const auto& [v, file] : undeclared) {
    ADD_FAILURE() << v << " (in " << file << ") is not declared in src/core/settings.h";
  }
  // The scan saw the sources (not an empty or wrong directory).
  EXPECT_GT(files, 50u);
  EXPECT_TRUE(seen.count("WEFT_JOB_TOKEN") && seen.count("WEFT_RANK")) << seen.size();
}

TEST(Settings, TheScanFindsNamesInLiteralsOnly) {
  const auto lits = string_literals(
      "// \"WEFT_IN_COMMENT\"\nauto a = \"WEFT_A\"; char c = '\"'; /* \"WEFT_B\" */\n"
      "auto r = R\"x(WEFT_RAW \"q\")x\"; auto e = \"esc \\\" WEFT_E\";");
  ASSERT_EQ(lits.size(), 3u);
  EXPECT_EQ(lits[0], "WEFT_A");
  EXPECT_EQ(lits[1], "WEFT_RAW \"q\"");
  EXPECT_EQ(lits[2], "esc \" WEFT_E");
}

TEST(Net, HostPort) {
  EXPECT_EQ(net::split_host_port("127.0.0.1:29500", "X"),
            std::make_pair(std::string("127.0.0.1"), uint16_t(29500)));
  EXPECT_EQ(net::split_host_port("[::1]:80", "X"),
            std::make_pair(std::string("::1"), uint16_t(80)));
  EXPECT_EQ(net::split_host_port("node-1:1", "X").first, "node-1");
  EXPECT_THROW(net::split_host_port("nohost", "X"), InvalidArgument);
  EXPECT_THROW(net::split_host_port("h:0", "X"), InvalidArgument);
  EXPECT_THROW(net::split_host_port("h:99999", "X"), InvalidArgument);
  EXPECT_EQ(net::join_host_port("::1", 5), "[::1]:5");
}

}  // namespace
}  // namespace weft
