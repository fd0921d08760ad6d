// blockrelay: the command line. Subcommands map to the DESIGN.md CLI
// contract. Exit codes: 0 done, 1 failed, 2 usage or config error.
#include <malloc.h>
#include <unistd.h>
#include <signal.h>

#include <cstdio>
#include <functional>
#include <iostream>
#include <list>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include <CLI/CLI.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/signal_set.hpp>
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include "blockrelay/config/site_config.h"
#include "blockrelay/control/control_client.h"
#include "control/status_format.h"
#include "blockrelay/storage/inspect.h"
#include "site/site.h"
#include "util/logging.h"

namespace {

using namespace blockrelay;

constexpr int kExitOk = 0;
constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;

int ConfigError(const Status& s) {
  fmt::print(stderr, "blockrelay: config error: {}\n", s.message());
  return kExitUsage;
}

int RunDaemon(const std::string& config_path,
              const std::vector<std::string>& accept_backing_change) {
  auto config = config::LoadSiteConfig(config_path);
  if (!config.ok()) return ConfigError(config.status());
  if (Status s = config::CheckSiteEnvironment(*config); !s.ok()) {
    return ConfigError(s);
  }
  ::signal(SIGPIPE, SIG_IGN);
  // Request buffers of up to 64 MiB are allocated and freed per request on
  // different threads. glibc would mmap/munmap each one (page faults, and
  // TLB shootdowns across threads); keep them in the heap instead.
  ::mallopt(M_MMAP_THRESHOLD, 128 << 20);
  ::mallopt(M_TRIM_THRESHOLD, 256 << 20);
  asio::io_context ctx(1);
  auto site = site::Site::Open(
      std::move(config).value(), ctx,
      std::set<std::string>(accept_backing_change.begin(), accept_backing_change.end()));
  if (!site.ok()) {
    fmt::print(stderr, "blockrelay: cannot open site: {}\n",
               site.status().ToString());
    return kExitFailed;
  }
  if (Status s = (*site)->Start(); !s.ok()) {
    fmt::print(stderr, "blockrelay: cannot start: {}\n", s.ToString());
    return kExitFailed;
  }
  int exit_code = kExitOk;
  bool shutting_down = false;
  asio::signal_set signals(ctx, SIGINT, SIGTERM);
  std::function<void(const asio::error_code&, int)> on_signal =
      [&](const asio::error_code& ec, int signo) {
        if (ec) return;
        if (shutting_down) {
          BR_LOG_WARN("site", "signal {} again while shutting down; still "
                      "finishing requests in flight", signo);
          signals.async_wait(on_signal);
          return;
        }
        shutting_down = true;
        BR_LOG_INFO("site", "signal {}: finishing requests in flight, "
                    "flushing, exiting", signo);
        signals.async_wait(on_signal);
        asio::co_spawn(ctx, (*site)->Shutdown(),
                       [&](std::exception_ptr e, Status s) {
                         if (e || !s.ok()) exit_code = kExitFailed;
                         signals.cancel();
                         ctx.stop();
                       });
      };
  signals.async_wait(on_signal);
  (*site)->Run();
  site->reset();
  BR_LOG_INFO("site", "stopped (exit {})", exit_code);
  return exit_code;
}

int CheckConfig(const std::string& path) {
  auto config = config::LoadSiteConfig(path);
  if (!config.ok()) return ConfigError(config.status());
  if (Status s = config::CheckSiteEnvironment(*config); !s.ok()) {
    return ConfigError(s);
  }
  size_t volumes = 0;
  for (const auto& g : config->groups) volumes += g.volumes.size();
  fmt::print("{}: OK (site {}, {} group(s), {} volume(s))\n", path,
             config->site, config->groups.size(), volumes);
  return kExitOk;
}

// The control socket from --socket, or from the config file.
std::optional<std::filesystem::path> ResolveSocket(const std::string& config_path,
                                                   const std::string& socket,
                                                   int& exit_code) {
  if (!socket.empty()) return std::filesystem::path(socket);
  if (config_path.empty()) {
    fmt::print(stderr, "blockrelay: give --config FILE or --socket PATH\n");
    exit_code = kExitUsage;
    return std::nullopt;
  }
  auto config = config::LoadSiteConfig(config_path);
  if (!config.ok()) {
    exit_code = ConfigError(config.status());
    return std::nullopt;
  }
  return config->control_socket;
}

// A subcommand that talks to the running site over its control socket.
// Besides its own options each has --config FILE or --socket PATH (not
// both; names the site) and --json; ControlCommand adds those, sends the
// requests, prints what went wrong and the reply. Exit codes: 0 done,
// 1 failed (no answer, an error reply, or what the subcommand decides),
// 2 usage or config error.
class ControlCommand {
 public:
  using Runner = std::function<int(ControlCommand&)>;

  // Adds subcommand `name` to `app`: the options `add_own` declares, then
  // --config/-c, --socket/-s and --json (`json_help`), in that order in
  // --help. `run` does the work when the subcommand is given.
  ControlCommand(CLI::App& app, const std::string& name, const std::string& help,
                 const std::function<void(CLI::App&)>& add_own, Runner run,
                 const std::string& json_help = "Print the JSON reply")
      : cmd_(app.add_subcommand(name, help)), run_(std::move(run)) {
    add_own(*cmd_);
    auto* config = cmd_->add_option("--config,-c", config_, "Site configuration file");
    cmd_->add_option("--socket,-s", socket_, "Control socket path")->excludes(config);
    cmd_->add_flag("--json", json_, json_help);
  }
  ControlCommand(const ControlCommand&) = delete;
  ControlCommand& operator=(const ControlCommand&) = delete;

  // True when this subcommand was given; then Run() does it.
  bool given() const { return cmd_->parsed(); }
  int Run() { return run_(*this); }

  bool json() const { return json_; }

  // Sends `request` and waits at most `timeout` for the reply. Returns it
  // when it says ok; otherwise prints why and returns nullopt, and
  // exit_code() tells 1 (no answer, an error reply) or 2 (no usable
  // --config or --socket).
  std::optional<nlohmann::json> Call(const nlohmann::json& request,
                                     std::chrono::milliseconds timeout) {
    if (!path_) path_ = ResolveSocket(config_, socket_, exit_code_);
    if (!path_) return std::nullopt;
    exit_code_ = kExitFailed;
    auto reply = control::Call(*path_, request, timeout);
    if (!reply.ok()) {
      fmt::print(stderr, "blockrelay: {}\n", reply.status().message());
      return std::nullopt;
    }
    if (!reply->value("ok", false)) {
      fmt::print(stderr, "blockrelay: {}\n", reply->value("error", "failed"));
      return std::nullopt;
    }
    exit_code_ = kExitOk;
    return *reply;
  }
  int exit_code() const { return exit_code_; }

  // Prints `reply`: as JSON with --json, else by `text`.
  void Print(const nlohmann::json& reply,
             const std::function<void(const nlohmann::json&)>& text) const {
    if (json_) {
      fmt::print("{}\n", reply.dump(2));
    } else {
      text(reply);
    }
  }

  // Call(), then Print() the reply. Returns the exit code.
  int Request(const nlohmann::json& request, std::chrono::milliseconds timeout,
              const std::function<void(const nlohmann::json&)>& text) {
    auto reply = Call(request, timeout);
    if (!reply) return exit_code();
    Print(*reply, text);
    return kExitOk;
  }

 private:
  CLI::App* cmd_;
  std::string config_, socket_;
  bool json_ = false;
  Runner run_;
  std::optional<std::filesystem::path> path_;  // resolved by the first Call()
  int exit_code_ = kExitOk;
};

int ShowStatus(ControlCommand& c) {
  return c.Request({{"command", "status"}}, std::chrono::seconds(10),
                   [](const nlohmann::json& reply) {
                     fmt::print("{}", control::FormatStatus(reply));
                   });
}

// Polls the site until every link of `group` (or just `link`) is caught
// up: tests and scripts use it instead of sleeps.
int WaitCaughtUp(ControlCommand& c, const std::string& group,
                 const std::string& link, double timeout_seconds) {
  nlohmann::json request = {{"command", "wait"}, {"group", group}};
  if (!link.empty()) request["link"] = link;
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_seconds));
  nlohmann::json last;
  for (;;) {
    auto reply = c.Call(request, std::chrono::seconds(10));
    if (!reply) return c.exit_code();
    last = *reply;
    if (reply->value("caught_up", false)) break;
    if (std::chrono::steady_clock::now() >= deadline) {
      if (c.json()) fmt::print("{}\n", last.dump(2));
      fmt::print(stderr, "blockrelay: group {}{} not caught up after {} s:\n",
                 group, link.empty() ? "" : " link " + link, timeout_seconds);
      for (const auto& l : last["links"]) {
        if (!link.empty() && l.value("site", "") != link) continue;
        fmt::print(stderr, "  link {}: {}, {} bytes queued, lag {:.1f} s{}\n",
                   l.value("site", "?"), l.value("state", "?"),
                   l.value("queue_bytes", 0ull), l.value("lag_seconds", 0.0),
                   l.contains("last_error")
                       ? ", last error: " + l["last_error"].get<std::string>()
                       : "");
      }
      return kExitFailed;
    }
    // A status request costs the daemon microseconds; a coarser poll
    // would add its interval to whatever a script times with `wait`.
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  c.Print(last, [&](const nlohmann::json&) {
    fmt::print("group {}{}: caught up\n", group, link.empty() ? "" : " link " + link);
  });
  return kExitOk;
}

// promote GROUP [--force] / demote GROUP.
int RoleControl(ControlCommand& c, const std::string& command,
                const std::string& group, bool force) {
  nlohmann::json request = {{"command", command}, {"group", group}};
  if (command == "promote") request["force"] = force;
  auto reply = c.Call(request, std::chrono::seconds(120));
  if (!reply) return c.exit_code();
  c.Print(*reply, [&](const nlohmann::json& r) {
    if (command == "promote") {
      fmt::print("group {}: primary, generation {}\n", group, r.value("generation", "?"));
    } else {
      fmt::print("group {}: secondary (read-only), waiting for an upstream\n", group);
    }
  });
  if (reply->contains("links_error")) {
    fmt::print(stderr, "blockrelay: the group's links did not start: {}\n",
               (*reply)["links_error"].get<std::string>());
    return kExitFailed;
  }
  return kExitOk;
}

// pause / resume / resync GROUP --link SITE.
int LinkControl(ControlCommand& c, const std::string& command,
                const std::string& group, const std::string& link, bool full,
                bool discard_local) {
  nlohmann::json request = {{"command", command}, {"group", group}, {"link", link}};
  if (command == "resync") request["full"] = full;
  if (command == "resync" && discard_local) request["discard_local"] = true;
  return c.Request(request, std::chrono::seconds(30), [&](const nlohmann::json& reply) {
    if (discard_local) {
      fmt::print("group {}: the next connection from site {} overwrites this "
                 "site's own writes\n", group, link);
      return;
    }
    const std::string what =
        command == "resync" ? (full ? "full resync started" : "resync started")
        : reply.value("paused", false) ? "paused" : "resumed";
    fmt::print("group {} link {}: {} (state {})\n", group, link, what,
               reply.value("state", "?"));
  });
}

// rollback GROUP: returns a secondary group whose resync was cut off to its
// last consistent state. Exit 0 also when it was consistent already (the
// reply and the message say so): a script may run it before every promote.
int Rollback(ControlCommand& c, const std::string& group) {
  // Writing back a large undo record takes a while.
  return c.Request({{"command", "rollback"}, {"group", group}}, std::chrono::hours(1),
                   [&](const nlohmann::json& reply) {
                     if (reply.value("rolled_back", false)) {
                       fmt::print("group {}: rolled back to group {} ({} bytes "
                                  "restored); consistent\n",
                                  group, reply.value("applied_group_seq", 0ull),
                                  reply.value("restored_bytes", 0ull));
                     } else {
                       fmt::print("group {}: already consistent, nothing to roll back\n",
                                  group);
                     }
                   });
}

// verify GROUP --link SITE [--fix]: starts the compare, prints a progress
// line while it runs, then the result. Exit 0: identical (or fixed with
// --fix); 1: mismatches found, or the verify failed.
int Verify(ControlCommand& c, const std::string& group, const std::string& link,
           bool fix, double timeout_seconds) {
  auto started = c.Call({{"command", "verify"}, {"group", group}, {"link", link}, {"fix", fix}},
                        std::chrono::seconds(10));
  if (!started) return c.exit_code();
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_seconds));
  nlohmann::json last = *started;
  const bool tty = ::isatty(2);
  while (last.value("running", false)) {
    if (std::chrono::steady_clock::now() >= deadline) {
      fmt::print(stderr, "\nblockrelay: verify still running after {} s\n", timeout_seconds);
      return kExitFailed;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    auto status = c.Call({{"command", "verify_status"}, {"group", group}, {"link", link}},
                         std::chrono::seconds(10));
    if (!status) return c.exit_code();
    last = *status;
    const uint64_t done = last.value("regions_done", 0ull), total = last.value("regions_total", 0ull);
    fmt::print(stderr, "{}verify {} -> {}: {}/{} regions ({:.0f}%), {} mismatching{}",
               tty ? "\r" : "", group, link, done, total,
               total ? 100.0 * done / total : 100.0,
               last.value("mismatched_regions", 0ull), tty ? "" : "\n");
  }
  if (tty) fmt::print(stderr, "\n");
  if (c.json()) fmt::print("{}\n", last.dump(2));
  if (last.contains("error")) {
    fmt::print(stderr, "blockrelay: verify failed: {}\n", last["error"].get<std::string>());
    return kExitFailed;
  }
  const uint64_t mismatched = last.value("mismatched_regions", 0ull);
  if (!c.json()) {
    fmt::print("verify {} -> {}: {} regions compared in {:.1f} s, {} mismatching ({} bytes)\n",
               group, link, last.value("regions_done", 0ull),
               last.value("elapsed_seconds", 0.0), mismatched,
               last.value("mismatched_bytes", 0ull));
    for (const auto& m : last["mismatches"]) {
      fmt::print("  volume {} region {} (offset {})\n", m.value("volume", "?"),
                 m.value("region", 0ull), m.value("offset", 0ull));
    }
    if (fix && mismatched) {
      fmt::print("{} region(s) marked dirty; the link resyncs them now\n",
                 last.value("fixed_regions", 0ull));
    }
  }
  return mismatched && !fix ? kExitFailed : kExitOk;
}

int Inspect(const std::string& config_path, bool json) {
  auto config = config::LoadSiteConfig(config_path);
  if (!config.ok()) return ConfigError(config.status());
  auto report = storage::InspectVolumeMetadata(*config);
  if (!report.ok()) {
    fmt::print(stderr, "blockrelay: {}\n", report.status().message());
    return kExitFailed;
  }
  if (json) {
    fmt::print("{}\n", report->dump(2));
  } else {
    fmt::print("{}", storage::RenderInspectText(*report));
  }
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"blockrelay: a replicating block device served over NBD"};
  app.set_version_flag("--version", std::string("blockrelay ") + BLOCKRELAY_VERSION);
  app.require_subcommand(1);

  std::string log_level = "info";
  app.add_option("--log-level", log_level, "debug, info, warning or error")
      ->check(CLI::IsMember({"debug", "info", "warning", "error"}));

  std::string config_path;
  auto* run = app.add_subcommand("run", "Run the site's daemon in the foreground");
  run->add_option("--config,-c", config_path, "Site configuration file")
      ->required();
  std::vector<std::string> accept_backing_change;
  run->add_option("--accept-backing-change", accept_backing_change,
                  "Volume whose backing file or device was replaced by one "
                  "holding the same data (restored, moved, renumbered): keep "
                  "its scoreboard (repeatable)");

  std::string check_path;
  auto* check = app.add_subcommand("check-config",
                                   "Validate a configuration file and exit");
  check->add_option("file", check_path, "Site configuration file")->required();

  // The control subcommands: each states its own options and what it does;
  // ControlCommand adds --config, --socket and --json. Only one subcommand
  // runs, so they share the variables of what they have in common.
  std::list<ControlCommand> control;  // CLI11 keeps pointers into each
  std::string group, link;
  bool resync_full = false, resync_discard_local = false, force = false, fix = false;
  double wait_timeout = 60, verify_timeout = 86400;
  const auto add_group = [&](CLI::App& c) {
    c.add_option("group", group, "Consistency group name")->required();
  };
  const auto add_group_and_link = [&](CLI::App& c) {
    add_group(c);
    c.add_option("--link,-l", link, "Downstream site")->required();
  };
  const auto link_control = [&](const std::string& command) {
    return [&, command](ControlCommand& c) {
      return LinkControl(c, command, group, link, resync_full, resync_discard_local);
    };
  };
  const auto role_control = [&](const std::string& command) {
    return [&, command](ControlCommand& c) { return RoleControl(c, command, group, force); };
  };

  control.emplace_back(
      app, "status", "Show the running site's health", [](CLI::App&) {}, ShowStatus,
      "Print the raw JSON reply");
  control.emplace_back(
      app, "wait", "Wait until a group's downstream links are caught up",
      [&](CLI::App& c) {
        add_group(c);
        c.add_option("--link,-l", link, "Only this downstream site");
        c.add_option("--timeout,-t", wait_timeout, "Give up after this many seconds (exit 1)")
            ->check(CLI::PositiveNumber);
      },
      [&](ControlCommand& c) { return WaitCaughtUp(c, group, link, wait_timeout); },
      "Print the links' JSON");
  control.emplace_back(
      app, "pause",
      "Stop replicating to a downstream site (writes are logged in the scoreboard)",
      add_group_and_link, link_control("pause"));
  control.emplace_back(app, "resume", "Reconnect a paused link; it resyncs what changed",
                       add_group_and_link, link_control("resume"));
  control.emplace_back(
      app, "resync", "Reconnect a link and resync its dirty regions (--full: every region)",
      [&](CLI::App& c) {
        auto* full_flag = c.add_flag("--full", resync_full, "Mark every region dirty first");
        c.add_flag("--discard-local", resync_discard_local,
                   "On a secondary: let the next connection from site --link "
                   "overwrite this site's own writes (split brain)")
            ->excludes(full_flag);
        add_group_and_link(c);
      },
      link_control("resync"));
  control.emplace_back(
      app, "verify", "Compare a group's volumes with a downstream site, online",
      [&](CLI::App& c) {
        add_group_and_link(c);
        c.add_flag("--fix", fix, "Mark mismatching regions dirty so resync repairs them");
        c.add_option("--timeout,-t", verify_timeout, "Give up after this many seconds")
            ->check(CLI::PositiveNumber);
      },
      [&](ControlCommand& c) { return Verify(c, group, link, fix, verify_timeout); },
      "Print the JSON result");
  control.emplace_back(
      app, "rollback",
      "Return a secondary group whose resync was cut off to its last consistent "
      "state (refused while its upstream is connected)",
      add_group, [&](ControlCommand& c) { return Rollback(c, group); });
  control.emplace_back(
      app, "promote", "Make a group primary here (writable; a new generation)",
      [&](CLI::App& c) {
        c.add_flag("--force", force, "Even while its upstream is connected (drops it)");
        add_group(c);
      },
      role_control("promote"));
  control.emplace_back(
      app, "demote", "Make a primary group secondary here (read-only; takes an upstream)",
      add_group, role_control("demote"));

  std::string inspect_config;
  bool inspect_json = false;
  auto* inspect = app.add_subcommand(
      "inspect", "Print the metadata in data_dir (the daemon must be stopped)");
  inspect->add_option("--config,-c", inspect_config, "Site configuration file")
      ->required();
  inspect->add_flag("--json", inspect_json, "Print JSON");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return kExitUsage;
  }

  using blockrelay::util::LogLevel;
  blockrelay::util::SetLogLevel(log_level == "debug"     ? LogLevel::kDebug
                                : log_level == "warning" ? LogLevel::kWarning
                                : log_level == "error"   ? LogLevel::kError
                                                         : LogLevel::kInfo);
  if (*run) return RunDaemon(config_path, accept_backing_change);
  if (*check) return CheckConfig(check_path);
  if (*inspect) return Inspect(inspect_config, inspect_json);
  for (ControlCommand& c : control) {
    if (c.given()) return c.Run();
  }
  return kExitUsage;
}
