// The TestDaemon helper itself: restarts, failed starts and cleanup, which
// multi-site tests rely on.
#include "testutil/daemon.h"

#include <signal.h>
#include <sys/wait.h>

#include <cerrno>
#include <vector>

#include <catch2/catch.hpp>

#include "testutil/nbd_client.h"

namespace blockrelay::testutil {
namespace {

using Catch::Matchers::Contains;

TEST_CASE("TestDaemon: a restart keeps the ports and the volume's data",
          "[nbd-server][testutil]") {
  TempDir dir("blockrelay-td");
  TestDaemon daemon(dir.path(), SingleSiteConfig(dir.path()));
  Status s = daemon.Start();
  INFO(s.ToString());
  REQUIRE(s.ok());
  const uint16_t port = daemon.nbd_tcp_port();
  REQUIRE(port != 0);
  CHECK(daemon.resolved_config()["nbd"]["listen"] ==
        "127.0.0.1:" + std::to_string(port));
  auto data = Pattern(8192, 1);
  {
    std::string error;
    auto h = ConnectTcp(port, {}, &error);
    INFO(error);
    REQUIRE(h != nullptr);
    REQUIRE(Pwrite(h.get(), data, 4096) == 0);
    REQUIRE(Flush(h.get()) == 0);
  }
  REQUIRE(daemon.Stop() == 0);
  CHECK_FALSE(daemon.running());

  s = daemon.Start();
  INFO(s.ToString());
  REQUIRE(s.ok());
  CHECK(daemon.nbd_tcp_port() == port);
  std::string error;
  auto h = ConnectTcp(port, {}, &error);
  INFO(error);
  REQUIRE(h != nullptr);
  std::vector<std::byte> back(data.size());
  REQUIRE(Pread(h.get(), back, 4096) == 0);
  CHECK(back == data);
  // Both runs are in the log.
  std::string log = daemon.ReadLog();
  CHECK(log.find("serving") != log.rfind("serving"));
  CHECK(daemon.Stop() == 0);
}

TEST_CASE("TestDaemon: a start that fails returns the daemon's complaint",
          "[nbd-server][testutil]") {
  TempDir dir("blockrelay-td");
  auto config = SingleSiteConfig(dir.path());
  config["groups"][0]["volumes"][0]["size"] = 1000;  // not a multiple of 512
  TestDaemon daemon(dir.path(), config);
  Status s = daemon.Start();
  REQUIRE_FALSE(s.ok());
  CHECK_THAT(s.message(), Contains("size"));
  CHECK_FALSE(daemon.running());
}

TEST_CASE("TestDaemon: the destructor kills and reaps a daemon left running",
          "[nbd-server][testutil]") {
  TempDir dir("blockrelay-td");
  pid_t pid = -1;
  {
    TestDaemon daemon(dir.path(), SingleSiteConfig(dir.path()));
    REQUIRE(daemon.Start().ok());
    pid = daemon.pid();
    REQUIRE(pid > 0);
    CHECK(::kill(pid, 0) == 0);
  }
  // Reaped: the PID no longer names our child.
  errno = 0;
  CHECK(::kill(pid, 0) == -1);
  CHECK(errno == ESRCH);
}

TEST_CASE("TestDaemon: a daemon killed with SIGKILL can be started again",
          "[nbd-server][testutil]") {
  TempDir dir("blockrelay-td");
  TestDaemon daemon(dir.path(), SingleSiteConfig(dir.path(), "a", 1 << 20,
                                                 /*tcp=*/false));
  REQUIRE(daemon.Start().ok());
  REQUIRE(daemon.Signal(SIGKILL));
  auto status = daemon.WaitForExit(std::chrono::seconds(5));
  REQUIRE(status.has_value());
  CHECK(WIFSIGNALED(*status));
  // The stale sockets left behind are replaced.
  Status s = daemon.Start();
  INFO(s.ToString());
  REQUIRE(s.ok());
  CHECK(daemon.Control({{"command", "version"}}).ok());
  CHECK(daemon.Stop() == 0);
}

TEST_CASE("RunBlockrelay: captures output and the exit code",
          "[nbd-server][testutil]") {
  ProcessResult r = RunBlockrelay({"--version"});
  REQUIRE(r.exited);
  CHECK(r.exit_code == 0);
  CHECK_FALSE(r.out.empty());
  CHECK_FALSE(r.timed_out);
}

}  // namespace
}  // namespace blockrelay::testutil
