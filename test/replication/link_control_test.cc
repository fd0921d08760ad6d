// The operator's controls of a replication link, through the real CLI
// against real daemons on loopback (site a primary, site b secondary, group
// "g"): pause and resume, resync --full, wait, max_lag throttling writers,
// and the errors for a group or link that does not exist. Checks end with
// the backing files of both sites compared byte for byte. Waits are bounded
// polls; the tests signal only their own daemons, and a test that stops b
// with SIGSTOP kills it if anything fails, so no stopped process is left.
#include <libnbd.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "testutil/daemon.h"
#include "testutil/nbd_client.h"

namespace blockrelay {
namespace {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using nlohmann::json;
using testutil::NbdHandle;
using testutil::ProcessResult;
using testutil::TestDaemon;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kRegionBytes = 64 * kKiB;  // the default region_size
constexpr auto kCatchUpTimeout = std::chrono::seconds(30);
constexpr auto kStateTimeout = std::chrono::seconds(15);

json SiteConfig(const fs::path& dir, const std::string& site,
                const std::string& role, uint64_t volume_bytes) {
  json group = {{"name", "g"},
                {"role", role},
                {"volumes", json::array({{{"name", "data"},
                                          {"path", (dir / "data.img").string()},
                                          {"size", volume_bytes}}})}};
  json config = {{"site", site},
                 {"data_dir", (dir / "data").string()},
                 {"control_socket", (dir / "control.sock").string()},
                 {"nbd", {{"unix_socket", (dir / "nbd.sock").string()}}}};
  if (role == "secondary") {
    group["upstream"] = {{"site", "a"}};
    config["replication"] = {{"listen", "127.0.0.1:0"}};
  }
  config["groups"] = json::array({group});
  return config;
}

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// "" when both files hold the same bytes; otherwise where they differ.
std::string Differences(const fs::path& x, const fs::path& y) {
  const std::string a = ReadFile(x), b = ReadFile(y);
  if (a == b) return "";
  if (a.size() != b.size()) {
    return fmt::format("{} has {} bytes, {} has {}", x.string(), a.size(),
                       y.string(), b.size());
  }
  size_t first = 0;
  while (first < a.size() && a[first] == b[first]) ++first;
  size_t differing = 0;
  for (size_t i = first; i < a.size(); ++i) differing += a[i] != b[i];
  return fmt::format("{} and {} differ in {} byte(s), the first at offset {}",
                     x.string(), y.string(), differing, first);
}

// Site a (primary, one async link to b with `link` settings on top) and
// site b (secondary), one volume "data", blank and declared in sync.
class LinkPair {
 public:
  LinkPair(uint64_t volume_bytes, json link)
      : b_dir_(Subdir("b")),
        a_dir_(Subdir("a")),
        b_(b_dir_, SiteConfig(b_dir_, "b", "secondary", volume_bytes)),
        a_(a_dir_, SiteConfig(a_dir_, "a", "primary", volume_bytes)),
        link_(std::move(link)) {}

  TestDaemon& a() { return a_; }
  TestDaemon& b() { return b_; }
  fs::path a_volume() const { return a_dir_ / "data.img"; }
  fs::path b_volume() const { return b_dir_ / "data.img"; }

  void Start() {
    Status s = b_.Start();
    INFO(s.ToString());
    REQUIRE(s.ok());
    json link = {{"site", "b"},
                 {"address", fmt::format("127.0.0.1:{}", b_.port("/replication/listen"))},
                 {"mode", "async"},
                 {"initial_sync", "none"}};
    link.update(link_);
    a_.config()["groups"][0]["downstream"] = json::array({link});
    s = a_.Start();
    INFO(s.ToString());
    REQUIRE(s.ok());
  }

  // `blockrelay <args> --socket <a's control socket>`.
  ProcessResult Cli(std::vector<std::string> args,
                    std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    args.push_back("--socket");
    args.push_back(a_.control_socket().string());
    return testutil::RunBlockrelay(args, timeout);
  }

  // The status of a: groups[0] (null if a does not answer).
  json Group() const {
    auto reply = a_.Control({{"command", "status"}});
    if (!reply.ok() || !reply->value("ok", false)) return nullptr;
    return (*reply)["groups"][0];
  }
  json Link() const {
    json g = Group();
    if (g.is_null() || g["downstream"].empty()) return nullptr;
    return g["downstream"][0];
  }
  // groups[0].volumes[0].links[b].dirty_regions.
  uint64_t DirtyRegions() const {
    json g = Group();
    if (g.is_null()) return 0;
    for (const auto& l : g["volumes"][0]["links"]) {
      if (l.value("site", "") == "b") return l.value("dirty_regions", uint64_t{0});
    }
    return 0;
  }

  void RequireLink(const std::string& what,
                   const std::function<bool(const json&)>& pred,
                   std::chrono::milliseconds timeout = kStateTimeout) {
    json last;
    bool ok = testutil::WaitUntil(
        [&] {
          last = Link();
          return !last.is_null() && pred(last);
        },
        timeout);
    INFO("waiting for: " << what);
    INFO("last link status: " << last.dump());
    INFO("site a log:\n" << a_.ReadLog());
    REQUIRE(ok);
  }

  // `blockrelay wait g --link b` must report the link caught up.
  void RequireCaughtUp() {
    ProcessResult r = Cli({"wait", "g", "--link", "b", "--timeout",
                           std::to_string(kCatchUpTimeout.count())},
                          kCatchUpTimeout + std::chrono::seconds(15));
    INFO("wait: exit " << r.exit_code << ", stdout: " << r.out
                       << ", stderr: " << r.err);
    INFO("site a log:\n" << a_.ReadLog());
    INFO("site b log:\n" << b_.ReadLog());
    REQUIRE(r.exited);
    REQUIRE(r.exit_code == 0);
  }

  void RequireIdentical() {
    CHECK(Differences(a_volume(), b_volume()) == "");
  }

  NbdHandle Connect() {
    testutil::NbdOptions options;
    options.export_name = "data";
    std::string error;
    NbdHandle h = testutil::ConnectUnix(*a_.nbd_unix_socket(), options, &error);
    INFO("libnbd: " << error);
    REQUIRE(h != nullptr);
    return h;
  }

  void Write(uint64_t offset, uint64_t bytes) {
    NbdHandle h = Connect();
    auto data = testutil::Pattern(bytes, ++seed_);
    INFO("write of " << bytes << " bytes at " << offset);
    REQUIRE(testutil::Pwrite(h.get(), data, offset) == 0);
  }

 private:
  fs::path Subdir(const std::string& name) {
    fs::path p = root_.path() / name;
    fs::create_directories(p);
    return p;
  }

  testutil::TempDir root_{"blockrelay-linkctl"};
  fs::path b_dir_, a_dir_;
  TestDaemon b_, a_;
  json link_;
  uint64_t seed_ = 1000;
};

std::string StateOf(const json& link) { return link.value("state", ""); }

void RequireExit(const ProcessResult& r, int code) {
  INFO("exit " << r.exit_code << (r.timed_out ? " (timed out)" : "")
               << ", stdout: " << r.out << ", stderr: " << r.err);
  REQUIRE(r.exited);
  REQUIRE(r.exit_code == code);
}

TEST_CASE("Link control: a paused link logs writes in the scoreboard, wait "
          "times out, and resume catches it up",
          "[replication]") {
  LinkPair pair(4 * kMiB, json::object());
  pair.Start();
  pair.Write(0, 512 * kKiB);
  pair.RequireCaughtUp();

  RequireExit(pair.Cli({"pause", "g", "--link", "b"}), 0);
  pair.RequireLink("paused, logging", [](const json& l) {
    return StateOf(l) == "logging" && l.value("paused", false);
  });

  // Writes go on, and only the scoreboard keeps them.
  const uint64_t dirty_before = pair.DirtyRegions();
  const std::vector<uint64_t> offsets = {1 * kMiB, 1 * kMiB + 512 * kKiB,
                                         2 * kMiB, 3 * kMiB + kRegionBytes};
  for (uint64_t off : offsets) pair.Write(off, kRegionBytes);
  const uint64_t dirty_after = pair.DirtyRegions();
  CHECK(dirty_after > dirty_before);
  CHECK(dirty_after >= offsets.size());

  ProcessResult wait = pair.Cli({"wait", "g", "--link", "b", "--timeout", "1"});
  RequireExit(wait, 1);
  CHECK_THAT(wait.err, Contains("not caught up"));
  {
    json link = pair.Link();
    INFO(link.dump());
    CHECK(StateOf(link) == "logging");  // no reconnect on its own
    CHECK(link.value("paused", false));
  }
  CHECK(pair.DirtyRegions() >= dirty_after);

  ProcessResult resume = pair.Cli({"resume", "g", "--link", "b"});
  RequireExit(resume, 0);
  CHECK_THAT(resume.out, Contains("resumed"));
  pair.RequireCaughtUp();
  {
    json link = pair.Link();
    INFO(link.dump());
    CHECK_FALSE(link.value("paused", true));
    CHECK(StateOf(link) == "replicating");
  }
  pair.RequireIdentical();
  // Everything marked while paused is cleared once it is durable at b.
  bool clean = testutil::WaitUntil([&] { return pair.DirtyRegions() == 0; },
                                   kStateTimeout);
  INFO("dirty regions: " << pair.DirtyRegions());
  CHECK(clean);
}

TEST_CASE("Link control: resync --full repairs bytes changed behind "
          "blockrelay's back on the downstream",
          "[replication]") {
  LinkPair pair(4 * kMiB, json::object());
  pair.Start();
  pair.Write(0, 1 * kMiB);
  pair.RequireCaughtUp();
  pair.RequireIdentical();

  // b is at rest (everything applied); change one written byte and one
  // byte of a never-written (zero) region in its backing file directly.
  {
    std::fstream f(pair.b_volume(), std::ios::in | std::ios::out | std::ios::binary);
    REQUIRE(f.good());
    f.seekg(100);
    char c = 0;
    f.read(&c, 1);
    c = static_cast<char>(~c);
    f.seekp(100);
    f.write(&c, 1);
    f.seekp(3 * kMiB + 5);
    f.put('\xff');
    f.flush();
    REQUIRE(f.good());
  }
  REQUIRE(Differences(pair.a_volume(), pair.b_volume()) != "");
  const uint64_t resync_before = pair.Link().value("resync_bytes_sent", uint64_t{0});

  ProcessResult resync = pair.Cli({"resync", "g", "--link", "b", "--full"});
  RequireExit(resync, 0);
  CHECK_THAT(resync.out, Contains("full resync started"));
  pair.RequireCaughtUp();
  json link = pair.Link();
  INFO(link.dump());
  // The whole written MiB went again (zero regions go as zero operations).
  CHECK(link.value("resync_bytes_sent", uint64_t{0}) >= resync_before + 1 * kMiB);
  pair.RequireIdentical();
}

// Writes `total` bytes to `h` from a thread of its own, one `chunk` at a
// time, counting what completed.
class BackgroundWriter {
 public:
  BackgroundWriter(NbdHandle h, uint64_t total, uint64_t chunk)
      : h_(std::move(h)), total_(total), chunk_(chunk) {}
  ~BackgroundWriter() { Join(); }

  void Start() {
    thread_ = std::thread([this] {
      for (uint64_t off = 0; off < total_ && !stop_; off += chunk_) {
        auto data = testutil::Pattern(chunk_, 7000 + off);
        int rc = testutil::Await(
            h_.get(),
            nbd_aio_pwrite(h_.get(), data.data(), data.size(), off,
                           NBD_NULL_COMPLETION, 0),
            std::chrono::seconds(60));
        if (rc != 0) {
          error_ = rc;
          break;
        }
        completed_ += chunk_;
      }
      done_ = true;
    });
  }
  void Join() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  uint64_t completed() const { return completed_; }
  bool done() const { return done_; }
  int error() const { return error_; }

 private:
  NbdHandle h_;
  const uint64_t total_, chunk_;
  std::thread thread_;
  std::atomic<uint64_t> completed_{0};
  std::atomic<int> error_{0};
  std::atomic<bool> done_{false}, stop_{false};
};

// The process state letter from /proc/<pid>/stat ('T' when stopped).
char ProcState(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/stat", pid));
  std::string line;
  std::getline(in, line);
  const auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() ? line[close + 2] : '?';
}

TEST_CASE("Link control: with max_lag writers stall while the downstream "
          "acknowledges nothing, and complete once it does",
          "[replication]") {
  constexpr uint64_t kTotal = 8 * kMiB;
  constexpr uint64_t kChunk = 128 * kKiB;
  // keepalive far above the stall: the link must stay up (a link that is
  // down does not slow anyone).
  LinkPair pair(kTotal, {{"max_lag", "1MiB"}, {"keepalive", "60s"}});
  pair.Start();
  pair.RequireCaughtUp();

  BackgroundWriter writer(pair.Connect(), kTotal, kChunk);
  // Declared after the writer: runs first. If the test fails while b is
  // stopped, b is killed (a's link drops, writers go on) and the writer
  // joined.
  struct Cleanup {
    TestDaemon& b;
    BackgroundWriter& writer;
    bool b_stopped = false;
    ~Cleanup() {
      if (b_stopped) b.Signal(SIGKILL);
      writer.Join();
    }
  } cleanup{pair.b(), writer};

  cleanup.b_stopped = true;
  REQUIRE(pair.b().Signal(SIGSTOP));
  REQUIRE(testutil::WaitUntil([&] { return ProcState(pair.b().pid()) == 'T'; },
                              std::chrono::seconds(5)));
  writer.Start();

  // The writes stall: no progress for a second, well short of the total.
  uint64_t last = 0;
  auto last_change = Clock::now();
  bool stalled = testutil::WaitUntil(
      [&] {
        const uint64_t now_done = writer.completed();
        if (writer.done()) return true;
        if (now_done != last) {
          last = now_done;
          last_change = Clock::now();
          return false;
        }
        return Clock::now() - last_change >= std::chrono::seconds(1);
      },
      std::chrono::seconds(20));
  const uint64_t at_stall = writer.completed();
  json link = pair.Link();
  INFO("completed at the stall: " << at_stall << " bytes; link: " << link.dump());
  REQUIRE(stalled);
  REQUIRE_FALSE(writer.done());
  CHECK(at_stall <= 4 * kMiB);
  CHECK(StateOf(link) != "logging");  // still connected: it is max_lag
  CHECK(link.value("lag_bytes", uint64_t{0}) > 1 * kMiB);

  REQUIRE(pair.b().Signal(SIGCONT));
  cleanup.b_stopped = false;

  bool finished = testutil::WaitUntil([&] { return writer.done(); },
                                      std::chrono::seconds(60));
  INFO("completed: " << writer.completed() << " bytes, error " << writer.error());
  REQUIRE(finished);
  REQUIRE(writer.error() == 0);
  REQUIRE(writer.completed() == kTotal);
  pair.RequireCaughtUp();
  pair.RequireIdentical();
}

TEST_CASE("Link control: pause, resume, resync and wait name an unknown "
          "group or link and exit 1",
          "[replication]") {
  testutil::TempDir dir("blockrelay-linkctl");
  json config = SiteConfig(dir.path(), "a", "primary", 4 * kMiB);
  // Nothing listens there: the link just keeps retrying.
  config["groups"][0]["downstream"] = json::array(
      {{{"site", "b"}, {"address", "127.0.0.1:9"}, {"mode", "async"}}});
  TestDaemon a(dir.path(), config);
  Status s = a.Start();
  INFO(s.ToString());
  REQUIRE(s.ok());
  auto cli = [&](std::vector<std::string> args) {
    args.push_back("--socket");
    args.push_back(a.control_socket().string());
    return testutil::RunBlockrelay(args, std::chrono::seconds(20));
  };

  const std::vector<std::vector<std::string>> commands = {
      {"pause"}, {"resume"}, {"resync"}, {"resync", "--full"}};
  for (const auto& command : commands) {
    {
      auto args = command;
      args.insert(args.end(), {"nosuch", "--link", "b"});
      ProcessResult r = cli(args);
      INFO(command[0] << " nosuch --link b");
      RequireExit(r, 1);
      CHECK_THAT(r.err, Contains("group \"nosuch\""));
      CHECK_THAT(r.err, Contains("site \"b\""));
    }
    {
      auto args = command;
      args.insert(args.end(), {"g", "--link", "nosuch"});
      ProcessResult r = cli(args);
      INFO(command[0] << " g --link nosuch");
      RequireExit(r, 1);
      CHECK_THAT(r.err, Contains("group \"g\""));
      CHECK_THAT(r.err, Contains("site \"nosuch\""));
    }
  }
  // wait fails at once (long before its --timeout) naming what is missing.
  {
    ProcessResult r = cli({"wait", "g", "--link", "nosuch", "--timeout", "60"});
    RequireExit(r, 1);
    CHECK_THAT(r.err, Contains("group g"));
    CHECK_THAT(r.err, Contains("site \"nosuch\""));
  }
  {
    ProcessResult r = cli({"wait", "nosuch", "--link", "b", "--timeout", "60"});
    RequireExit(r, 1);
    CHECK_THAT(r.err, Contains("group \"nosuch\""));
  }
  // Nothing was paused by any of it.
  auto status = a.Control({{"command", "status"}});
  REQUIRE(status.ok());
  CHECK_FALSE((*status)["groups"][0]["downstream"][0].value("paused", true));
}

}  // namespace
}  // namespace blockrelay
