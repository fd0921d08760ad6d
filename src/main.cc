// blockrelay: the command line. Subcommands map to the DESIGN.md CLI
// contract. Exit codes: 0 done, 1 failed, 2 usage or config error.
#include <malloc.h>
#include <unistd.h>
#include <signal.h>

#include <cstdio>
#include <iostream>
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
  ctx.run();
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

int ShowStatus(const std::string& config_path, const std::string& socket,
               bool json) {
  int exit_code = kExitOk;
  auto path = ResolveSocket(config_path, socket, exit_code);
  if (!path) return exit_code;
  auto reply = control::Call(*path, {{"command", "status"}},
                             std::chrono::seconds(10));
  if (!reply.ok()) {
    fmt::print(stderr, "blockrelay: {}\n", reply.status().message());
    return kExitFailed;
  }
  if (!reply->value("ok", false)) {
    fmt::print(stderr, "blockrelay: {}\n", reply->value("error", "failed"));
    return kExitFailed;
  }
  if (json) {
    fmt::print("{}\n", reply->dump(2));
  } else {
    fmt::print("{}", control::FormatStatus(*reply));
  }
  return kExitOk;
}

// Polls the site until every link of `group` (or just `link`) is caught
// up: tests and scripts use it instead of sleeps.
int WaitCaughtUp(const std::string& config_path, const std::string& socket,
                 const std::string& group, const std::string& link,
                 double timeout_seconds, bool json) {
  int exit_code = kExitOk;
  auto path = ResolveSocket(config_path, socket, exit_code);
  if (!path) return exit_code;
  nlohmann::json request = {{"command", "wait"}, {"group", group}};
  if (!link.empty()) request["link"] = link;
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_seconds));
  nlohmann::json last;
  for (;;) {
    auto reply = control::Call(*path, request, std::chrono::seconds(10));
    if (!reply.ok()) {
      fmt::print(stderr, "blockrelay: {}\n", reply.status().message());
      return kExitFailed;
    }
    if (!reply->value("ok", false)) {
      fmt::print(stderr, "blockrelay: {}\n", reply->value("error", "failed"));
      return kExitFailed;
    }
    last = *reply;
    if (reply->value("caught_up", false)) break;
    if (std::chrono::steady_clock::now() >= deadline) {
      if (json) fmt::print("{}\n", last.dump(2));
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
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  if (json) {
    fmt::print("{}\n", last.dump(2));
  } else {
    fmt::print("group {}{}: caught up\n", group, link.empty() ? "" : " link " + link);
  }
  return kExitOk;
}

// promote GROUP [--force] / demote GROUP.
int RoleControl(const std::string& command, const std::string& config_path,
                const std::string& socket, const std::string& group, bool force,
                bool json) {
  int exit_code = kExitOk;
  auto path = ResolveSocket(config_path, socket, exit_code);
  if (!path) return exit_code;
  nlohmann::json request = {{"command", command}, {"group", group}};
  if (command == "promote") request["force"] = force;
  auto reply = control::Call(*path, request, std::chrono::seconds(120));
  if (!reply.ok()) {
    fmt::print(stderr, "blockrelay: {}\n", reply.status().message());
    return kExitFailed;
  }
  if (!reply->value("ok", false)) {
    fmt::print(stderr, "blockrelay: {}\n", reply->value("error", "failed"));
    return kExitFailed;
  }
  if (json) {
    fmt::print("{}\n", reply->dump(2));
  } else if (command == "promote") {
    fmt::print("group {}: primary, generation {}\n", group,
               reply->value("generation", "?"));
  } else {
    fmt::print("group {}: secondary (read-only), waiting for an upstream\n", group);
  }
  if (reply->contains("links_error")) {
    fmt::print(stderr, "blockrelay: the group's links did not start: {}\n",
               (*reply)["links_error"].get<std::string>());
    return kExitFailed;
  }
  return kExitOk;
}

// pause / resume / resync GROUP --link SITE.
int LinkControl(const std::string& command, const std::string& config_path,
                const std::string& socket, const std::string& group,
                const std::string& link, bool full, bool discard_local, bool json) {
  int exit_code = kExitOk;
  auto path = ResolveSocket(config_path, socket, exit_code);
  if (!path) return exit_code;
  nlohmann::json request = {{"command", command}, {"group", group}, {"link", link}};
  if (command == "resync") request["full"] = full;
  if (command == "resync" && discard_local) request["discard_local"] = true;
  auto reply = control::Call(*path, request, std::chrono::seconds(30));
  if (!reply.ok()) {
    fmt::print(stderr, "blockrelay: {}\n", reply.status().message());
    return kExitFailed;
  }
  if (!reply->value("ok", false)) {
    fmt::print(stderr, "blockrelay: {}\n", reply->value("error", "failed"));
    return kExitFailed;
  }
  if (json) {
    fmt::print("{}\n", reply->dump(2));
  } else {
    if (discard_local) {
      fmt::print("group {}: the next connection from site {} overwrites this "
                 "site's own writes\n", group, link);
      return kExitOk;
    }
    const std::string what =
        command == "resync" ? (full ? "full resync started" : "resync started")
        : reply->value("paused", false) ? "paused" : "resumed";
    fmt::print("group {} link {}: {} (state {})\n", group, link, what,
               reply->value("state", "?"));
  }
  return kExitOk;
}

// rollback GROUP: returns a secondary group whose resync was cut off to its
// last consistent state. Exit 0 also when it was consistent already (the
// reply and the message say so): a script may run it before every promote.
int Rollback(const std::string& config_path, const std::string& socket,
             const std::string& group, bool json) {
  int exit_code = kExitOk;
  auto path = ResolveSocket(config_path, socket, exit_code);
  if (!path) return exit_code;
  // Writing back a large undo record takes a while.
  auto reply = control::Call(*path, {{"command", "rollback"}, {"group", group}},
                             std::chrono::hours(1));
  if (!reply.ok()) {
    fmt::print(stderr, "blockrelay: {}\n", reply.status().message());
    return kExitFailed;
  }
  if (!reply->value("ok", false)) {
    fmt::print(stderr, "blockrelay: {}\n", reply->value("error", "failed"));
    return kExitFailed;
  }
  if (json) {
    fmt::print("{}\n", reply->dump(2));
  } else if (reply->value("rolled_back", false)) {
    fmt::print("group {}: rolled back to group {} ({} bytes restored); consistent\n",
               group, reply->value("applied_group_seq", 0ull),
               reply->value("restored_bytes", 0ull));
  } else {
    fmt::print("group {}: already consistent, nothing to roll back\n", group);
  }
  return kExitOk;
}

// verify GROUP --link SITE [--fix]: starts the compare, prints a progress
// line while it runs, then the result. Exit 0: identical (or fixed with
// --fix); 1: mismatches found, or the verify failed.
int Verify(const std::string& config_path, const std::string& socket,
           const std::string& group, const std::string& link, bool fix,
           double timeout_seconds, bool json) {
  int exit_code = kExitOk;
  auto path = ResolveSocket(config_path, socket, exit_code);
  if (!path) return exit_code;
  auto call = [&](const nlohmann::json& request) -> std::optional<nlohmann::json> {
    auto reply = control::Call(*path, request, std::chrono::seconds(10));
    if (!reply.ok()) {
      fmt::print(stderr, "blockrelay: {}\n", reply.status().message());
      return std::nullopt;
    }
    if (!reply->value("ok", false)) {
      fmt::print(stderr, "blockrelay: {}\n", reply->value("error", "failed"));
      return std::nullopt;
    }
    return *reply;
  };
  auto started = call({{"command", "verify"}, {"group", group}, {"link", link}, {"fix", fix}});
  if (!started) return kExitFailed;
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
    auto status = call({{"command", "verify_status"}, {"group", group}, {"link", link}});
    if (!status) return kExitFailed;
    last = *status;
    const uint64_t done = last.value("regions_done", 0ull), total = last.value("regions_total", 0ull);
    fmt::print(stderr, "{}verify {} -> {}: {}/{} regions ({:.0f}%), {} mismatching{}",
               tty ? "\r" : "", group, link, done, total,
               total ? 100.0 * done / total : 100.0,
               last.value("mismatched_regions", 0ull), tty ? "" : "\n");
  }
  if (tty) fmt::print(stderr, "\n");
  if (json) fmt::print("{}\n", last.dump(2));
  if (last.contains("error")) {
    fmt::print(stderr, "blockrelay: verify failed: {}\n", last["error"].get<std::string>());
    return kExitFailed;
  }
  const uint64_t mismatched = last.value("mismatched_regions", 0ull);
  if (!json) {
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

  std::string status_config, status_socket;
  bool status_json = false;
  auto* status = app.add_subcommand("status", "Show the running site's health");
  auto* status_config_opt = status->add_option("--config,-c", status_config,
                                               "Site configuration file");
  status->add_option("--socket,-s", status_socket, "Control socket path")
      ->excludes(status_config_opt);
  status->add_flag("--json", status_json, "Print the raw JSON reply");

  std::string wait_config, wait_socket, wait_group, wait_link;
  double wait_timeout = 60;
  bool wait_json = false;
  auto* wait = app.add_subcommand(
      "wait", "Wait until a group's downstream links are caught up");
  wait->add_option("group", wait_group, "Consistency group name")->required();
  wait->add_option("--link,-l", wait_link, "Only this downstream site");
  wait->add_option("--timeout,-t", wait_timeout,
                   "Give up after this many seconds (exit 1)")
      ->check(CLI::PositiveNumber);
  auto* wait_config_opt =
      wait->add_option("--config,-c", wait_config, "Site configuration file");
  wait->add_option("--socket,-s", wait_socket, "Control socket path")
      ->excludes(wait_config_opt);
  wait->add_flag("--json", wait_json, "Print the links' JSON");

  // pause / resume share their options.
  struct LinkCommand {
    CLI::App* app = nullptr;
    std::string config, socket, group, link;
    bool json = false;
  };
  LinkCommand pause_cmd, resume_cmd, resync_cmd;
  bool resync_full = false, resync_discard_local = false;
  for (auto* lc : {&pause_cmd, &resume_cmd, &resync_cmd}) {
    const char* name = lc == &pause_cmd ? "pause" : lc == &resume_cmd ? "resume" : "resync";
    const char* help =
        lc == &pause_cmd
            ? "Stop replicating to a downstream site (writes are logged in the scoreboard)"
        : lc == &resume_cmd
            ? "Reconnect a paused link; it resyncs what changed"
            : "Reconnect a link and resync its dirty regions (--full: every region)";
    lc->app = app.add_subcommand(name, help);
    if (lc == &resync_cmd) {
      auto* full_flag =
          lc->app->add_flag("--full", resync_full, "Mark every region dirty first");
      lc->app
          ->add_flag("--discard-local", resync_discard_local,
                     "On a secondary: let the next connection from site --link "
                     "overwrite this site's own writes (split brain)")
          ->excludes(full_flag);
    }
    lc->app->add_option("group", lc->group, "Consistency group name")->required();
    lc->app->add_option("--link,-l", lc->link, "Downstream site")->required();
    auto* cfg = lc->app->add_option("--config,-c", lc->config, "Site configuration file");
    lc->app->add_option("--socket,-s", lc->socket, "Control socket path")->excludes(cfg);
    lc->app->add_flag("--json", lc->json, "Print the JSON reply");
  }

  std::string verify_config, verify_socket, verify_group, verify_link;
  bool verify_fix = false, verify_json = false;
  double verify_timeout = 86400;
  auto* verify = app.add_subcommand(
      "verify", "Compare a group's volumes with a downstream site, online");
  verify->add_option("group", verify_group, "Consistency group name")->required();
  verify->add_option("--link,-l", verify_link, "Downstream site")->required();
  verify->add_flag("--fix", verify_fix, "Mark mismatching regions dirty so resync repairs them");
  verify->add_option("--timeout,-t", verify_timeout, "Give up after this many seconds")
      ->check(CLI::PositiveNumber);
  auto* verify_config_opt =
      verify->add_option("--config,-c", verify_config, "Site configuration file");
  verify->add_option("--socket,-s", verify_socket, "Control socket path")
      ->excludes(verify_config_opt);
  verify->add_flag("--json", verify_json, "Print the JSON result");

  std::string rollback_config, rollback_socket, rollback_group;
  bool rollback_json = false;
  auto* rollback = app.add_subcommand(
      "rollback",
      "Return a secondary group whose resync was cut off to its last consistent "
      "state (refused while its upstream is connected)");
  rollback->add_option("group", rollback_group, "Consistency group name")->required();
  auto* rollback_config_opt =
      rollback->add_option("--config,-c", rollback_config, "Site configuration file");
  rollback->add_option("--socket,-s", rollback_socket, "Control socket path")
      ->excludes(rollback_config_opt);
  rollback->add_flag("--json", rollback_json, "Print the JSON reply");
  struct RoleCommand {
    CLI::App* app = nullptr;
    std::string config, socket, group;
    bool force = false, json = false;
  };
  RoleCommand promote_cmd, demote_cmd;
  promote_cmd.app = app.add_subcommand(
      "promote", "Make a group primary here (writable; a new generation)");
  promote_cmd.app->add_flag("--force", promote_cmd.force,
                            "Even while its upstream is connected (drops it)");
  demote_cmd.app = app.add_subcommand(
      "demote", "Make a primary group secondary here (read-only; takes an upstream)");
  for (auto* rc : {&promote_cmd, &demote_cmd}) {
    rc->app->add_option("group", rc->group, "Consistency group name")->required();
    auto* cfg = rc->app->add_option("--config,-c", rc->config, "Site configuration file");
    rc->app->add_option("--socket,-s", rc->socket, "Control socket path")->excludes(cfg);
    rc->app->add_flag("--json", rc->json, "Print the JSON reply");
  }

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
  if (*status) return ShowStatus(status_config, status_socket, status_json);
  if (*inspect) return Inspect(inspect_config, inspect_json);
  for (auto* lc : {&pause_cmd, &resume_cmd, &resync_cmd}) {
    if (*lc->app) {
      return LinkControl(lc == &pause_cmd ? "pause" : lc == &resume_cmd ? "resume" : "resync",
                         lc->config, lc->socket, lc->group, lc->link, resync_full,
                         resync_discard_local, lc->json);
    }
  }
  for (auto* rc : {&promote_cmd, &demote_cmd}) {
    if (*rc->app) {
      return RoleControl(rc == &promote_cmd ? "promote" : "demote", rc->config,
                         rc->socket, rc->group, rc->force, rc->json);
    }
  }
  if (*verify) {
    return Verify(verify_config, verify_socket, verify_group, verify_link,
                  verify_fix, verify_timeout, verify_json);
  }
  if (*rollback) {
    return Rollback(rollback_config, rollback_socket, rollback_group, rollback_json);
  }
  if (*wait) {
    return WaitCaughtUp(wait_config, wait_socket, wait_group, wait_link,
                        wait_timeout, wait_json);
  }
  return kExitUsage;
}
