// The `weft` command:
//   weft run -n N [options] [--] PROGRAM [ARGS...]   start a job on this machine
//   weft config                                      the WEFT_* settings
//   weft --version
// This file only parses the command line; launching lives in src/launch.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "core/log.h"
#include "core/settings.h"
#include "launch/run.h"
#include "weft/errors.h"
#include "weft/version.h"

namespace {

constexpr const char* kRunFooter =
    R"(Each worker gets the environment of the launcher, the --env variables, and:
  WEFT_RANK, WEFT_WORLD_SIZE       its rank and the number of ranks
  WEFT_LOCAL_RANK, WEFT_LOCAL_SIZE its rank and the number of ranks on this host
  WEFT_NNODES, WEFT_NODE_RANK      1 and 0 (single node)
  WEFT_STORE                       host:port of the rendezvous store the launcher serves
  WEFT_JOB_TOKEN                   the job's secret, fresh for every job
Workers run in process groups of their own with stdin from /dev/null, and are
killed if the launcher dies. When a worker exits non-zero or is killed, the
others are stopped and weft run exits with its code (128 + signal if killed).
SIGINT, SIGTERM and SIGHUP are forwarded to the workers; a second one kills them.)";

struct RunArgs {
  weft::launch::WorkerOptions workers;
  std::string timeout;
  std::string log_level;
  double grace_seconds = 5;
  bool no_prefix = false;
  std::vector<std::string> env;
};

void add_run_options(CLI::App* run, RunArgs& a) {
  run->add_option("-n,--nproc", a.workers.nproc,
                  "Number of worker processes to start (ranks 0..N-1)")
      ->required()
      ->type_name("N")
      ->check(CLI::Range(1, 1 << 20));
  run->add_option("--timeout", a.timeout,
                  "Deadline of every communication call in the workers, in seconds "
                  "(exported as WEFT_TIMEOUT; default 300)")
      ->type_name("SECONDS")
      ->check([](const std::string& s) {
        try {
          weft::settings::parse_seconds(s, "--timeout");
          return std::string();
        } catch (const weft::Error&) {
          return "'" + s + "' is not a positive number of seconds (e.g. 30 or 0.5)";
        }
      });
  run->add_option("--log-level", a.log_level,
                  "Log level of the workers and of the launcher: trace, debug, info, warn, error "
                  "or off (exported as WEFT_LOG_LEVEL; default warn)")
      ->type_name("LEVEL")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  run->add_flag("--no-prefix", a.no_prefix,
                "Do not prefix output lines with [RANK]: workers write straight to the launcher's "
                "stdout and stderr");
  run->add_option("--grace", a.grace_seconds,
                  "Seconds between SIGTERM (or a forwarded signal) and SIGKILL when stopping the "
                  "workers; 0 kills at once")
      ->type_name("SECONDS")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1e6));
  run->add_option("--env", a.env,
                  "Set an environment variable in every worker (repeatable; the last one wins)")
      ->type_name("K=V")
      ->allow_extra_args(false)
      ->check([](const std::string& kv) {
        size_t eq = kv.find('=');
        return eq == std::string::npos || eq == 0 ? "expected K=V, got '" + kv + "'"
                                                  : std::string();
      });
  // Reserved for multi-node jobs (not available yet): --nnodes, --node-rank,
  // --master ADDR:PORT, --nproc-per-node.
  run->add_option("PROGRAM", a.workers.command,
                  "The program to start (a path, or a name looked up in PATH) and its arguments; "
                  "put '--' before it if it starts with '-'")
      ->required()
      ->type_name("[ARGS...]");
  run->positionals_at_end();
  run->footer(kRunFooter);
}

int do_run(RunArgs& a) {
  auto& w = a.workers;
  w.prefix_output = !a.no_prefix;
  w.grace = std::chrono::milliseconds(static_cast<int64_t>(a.grace_seconds * 1000 + 0.5));
  for (const auto& kv : a.env) {
    size_t eq = kv.find('=');
    w.env.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
  }
  if (!a.timeout.empty()) w.env.emplace_back("WEFT_TIMEOUT", a.timeout);
  if (!a.log_level.empty()) {
    w.env.emplace_back("WEFT_LOG_LEVEL", a.log_level);
    weft::log::set_level(weft::log::parse_level(a.log_level));
  }
  try {
    return weft::launch::run_local(std::move(w));
  } catch (const weft::launch::LaunchError& e) {
    std::fprintf(stderr, "weft run: %s\n", e.what());
    return e.exit_code();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "weft run: %s\n", e.what());
    return 1;
  }
}

// `weft config`: a table of every setting with its current value.
int do_config() {
  struct Row {
    std::string env, value, def, doc;
  };
  std::vector<Row> rows{{"VARIABLE", "VALUE", "DEFAULT", "DESCRIPTION"}};
  for (const auto& s : weft::settings::all()) {
    auto v = weft::settings::get(s.env);
    std::string value = !v ? "-" : s.env == "WEFT_JOB_TOKEN" ? "(set, hidden)" : *v;
    rows.push_back({std::string(s.env), value,
                    s.default_value.empty() ? "-" : std::string(s.default_value),
                    std::string(s.doc)});
  }
  size_t w0 = 0, w1 = 0, w2 = 0;
  for (const auto& r : rows) {
    w0 = std::max(w0, r.env.size());
    w1 = std::max(w1, r.value.size());
    w2 = std::max(w2, r.def.size());
  }
  for (const auto& r : rows) {
    std::printf("%-*s  %-*s  %-*s  %s\n", static_cast<int>(w0), r.env.c_str(), static_cast<int>(w1),
                r.value.c_str(), static_cast<int>(w2), r.def.c_str(), r.doc.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Weft: run distributed training jobs.", "weft"};
  app.set_version_flag("--version", std::string("weft ") + weft::version());
  app.require_subcommand(1);

  RunArgs run_args;
  CLI::App* run = app.add_subcommand("run", "Start N worker processes of a job on this machine");
  add_run_options(run, run_args);
  CLI::App* config = app.add_subcommand(
      "config", "Print every WEFT_* setting: its value here, default and meaning");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  if (run->parsed()) return do_run(run_args);
  if (config->parsed()) return do_config();
  return 2;
}
