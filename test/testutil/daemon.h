// TestDaemon: runs the real `blockrelay run --config F` binary for
// integration tests, plus the small process helpers those tests need.
//
// A test builds a site config as JSON (SingleSiteConfig() gives a working
// one), hands it to a TestDaemon with a directory of its own, and calls
// Start(). Start() substitutes a free loopback port for every "listen"
// endpoint written "127.0.0.1:0" (the config parser refuses port 0), writes
// <dir>/config.json, fork/execs BLOCKRELAY_BINARY with stdout and stderr
// appended to <dir>/daemon.log, and waits until the control socket answers
// "status". If the daemon exits during start-up because a picked port was
// taken meanwhile, Start() picks new ports and tries again. Start() after
// Stop() restarts the site on the same ports, so peers that were given them
// can reconnect (crash-restart tests).
//
// Several TestDaemons may run at once (one per site); give each its own
// directory. A second site can point at the first one's ports after the
// first has started (port("/replication/listen")).
//
// Every wait is bounded. The destructor SIGKILLs the daemon's own PID (never
// anything else) if it still runs and reaps it, giving up after a few
// seconds rather than hanging. The child also gets PR_SET_PDEATHSIG so a
// crashed test binary does not leave daemons behind; hence Start() must be
// called from a thread that outlives the daemon (the test's main thread).
//
// Thread safety: one TestDaemon is used from one thread.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "blockrelay/status.h"

namespace blockrelay::testutil {

// A fresh directory under std::filesystem::temp_directory_path(), removed
// recursively (with whatever it holds) by the destructor.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "blockrelay-test");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const {
    return path_ / name;
  }

 private:
  std::filesystem::path path_;
};

// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, read
// back, closed). Another process may take it before it is used; callers
// retry on EADDRINUSE.
uint16_t PickFreeTcpPort();

// Calls `condition` until it returns true or `timeout` passes (polling every
// few milliseconds). Returns the last result.
bool WaitUntil(const std::function<bool()>& condition,
               std::chrono::milliseconds timeout);

// The outcome of a finished child process.
struct ProcessResult {
  bool exited = false;   // false: killed by a signal or timed out
  int exit_code = -1;    // valid when exited
  int signal = 0;        // the terminating signal, when !exited
  bool timed_out = false;
  std::string out;       // stdout
  std::string err;       // stderr
};

// Runs BLOCKRELAY_BINARY with `args` (argv[1..]), capturing stdout and
// stderr, and waits at most `timeout` (then SIGKILLs it).
ProcessResult RunBlockrelay(const std::vector<std::string>& args,
                            std::chrono::milliseconds timeout =
                                std::chrono::seconds(10));

// A config for one primary site named `site` with one group "g" and one
// volume "data" of `size_bytes` (a sparse file in `dir`), NBD on a Unix
// socket in `dir` and, when `tcp`, on 127.0.0.1:0 (a free port at Start()).
nlohmann::json SingleSiteConfig(const std::filesystem::path& dir,
                                const std::string& site = "a",
                                uint64_t size_bytes = 16ull << 20,
                                bool tcp = true);

class TestDaemon {
 public:
  // `dir` must exist; the daemon's config, log and (with SingleSiteConfig)
  // sockets and backing files live there.
  TestDaemon(std::filesystem::path dir, nlohmann::json config);
  ~TestDaemon();
  TestDaemon(const TestDaemon&) = delete;
  TestDaemon& operator=(const TestDaemon&) = delete;

  // The config; edit it before Start().
  nlohmann::json& config() { return config_; }

  // Starts (or, after Stop(), restarts) the daemon and waits until its
  // control socket answers. REQUIRES: not running. On failure the daemon is
  // not running and the Status message ends with the daemon's log. A test
  // that needs a crash uses Signal(SIGKILL) + WaitForExit(), then Start().
  Status Start(std::chrono::milliseconds timeout = std::chrono::seconds(10));

  // SIGTERM, then waits for the exit. Returns the exit code, or nullopt if
  // the daemon died of a signal or did not exit in time (it is SIGKILLed
  // then). REQUIRES: started.
  std::optional<int> Stop(std::chrono::milliseconds timeout =
                              std::chrono::seconds(15));

  // Sends `signo` to the daemon's PID; false if it is not running.
  bool Signal(int signo);
  // Waits until the daemon exits; the raw wait status, or nullopt on
  // timeout.
  std::optional<int> WaitForExit(std::chrono::milliseconds timeout);
  // Reaps the daemon if it has exited; true while it runs.
  bool running();

  pid_t pid() const { return pid_; }
  const std::filesystem::path& dir() const { return dir_; }
  std::filesystem::path config_path() const { return dir_ / "config.json"; }
  std::filesystem::path log_path() const { return dir_ / "daemon.log"; }
  std::string ReadLog() const;

  // The config as written by the last Start() (ports filled in).
  const nlohmann::json& resolved_config() const { return resolved_; }

  // Paths and ports from the config as written at Start().
  std::filesystem::path control_socket() const;
  std::optional<std::filesystem::path> nbd_unix_socket() const;
  // The port substituted at `json_pointer` (e.g. "/nbd/listen"); 0 if none.
  uint16_t port(const std::string& json_pointer) const;
  uint16_t nbd_tcp_port() const { return port("/nbd/listen"); }
  // "nbd+unix:///<export>?socket=<path>"
  std::string NbdUnixUri(const std::string& export_name = "") const;

  // One control request; bounded by `timeout`.
  Result<nlohmann::json> Control(const nlohmann::json& request,
                                 std::chrono::milliseconds timeout =
                                     std::chrono::seconds(5)) const;

 private:
  // Replaces every "listen": "127.0.0.1:0" with a free port.
  void AssignPorts(nlohmann::json& doc, const std::string& pointer);
  Status SpawnOnce(std::chrono::milliseconds timeout, bool* port_clash);

  std::filesystem::path dir_;
  nlohmann::json config_;     // as given (with :0 ports)
  nlohmann::json resolved_;   // as written at the last Start()
  std::map<std::string, uint16_t> ports_;
  pid_t pid_ = -1;
  std::optional<int> wait_status_;
};

}  // namespace blockrelay::testutil
