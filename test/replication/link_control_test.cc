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
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "testutil/daemon.h"
#include "testutil/nbd_client.h"
#include "testutil/sites.h"

namespace blockrelay {
namespace {

using Catch::Matchers::Contains;
using nlohmann::json;
using testutil::CheckIdentical;
using testutil::NbdHandle;
using testutil::PairLink;
using testutil::ProcessResult;
using testutil::RequireLink;
using testutil::RequireStarted;
using testutil::RunCli;
using testutil::TestDaemon;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kRegionBytes = 64 * kKiB;  // the default region_size
constexpr auto kCatchUpTimeout = std::chrono::seconds(30);
constexpr auto kStateTimeout = std::chrono::seconds(15);

// Site a (primary, one async link to b with `link` settings on top) and
// site b (secondary), one volume "data", blank and declared in sync.
class LinkPair : public testutil::SitePair {
 public:
  LinkPair(uint64_t volume_bytes, json link)
      : SitePair(Options(volume_bytes, std::move(link))) {}

  // `blockrelay <args>` against a.
  ProcessResult Cli(std::vector<std::string> args,
                    std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    return RunCli(a(), std::move(args), timeout);
  }

  // The regions a's scoreboard holds dirty for b.
  uint64_t DirtyRegions() const {
    auto dirty = testutil::DirtyFor(a(), "g", "b");
    return dirty ? dirty->regions : 0;
  }

  // `blockrelay wait g --link b` must report the link caught up.
  void RequireCliCaughtUp() {
    ProcessResult r = Cli({"wait", "g", "--link", "b", "--timeout",
                           std::to_string(kCatchUpTimeout.count())},
                          kCatchUpTimeout + std::chrono::seconds(15));
    INFO("wait: exit " << r.exit_code << ", stdout: " << r.out
                       << ", stderr: " << r.err);
    INFO("site a log:\n" << a().ReadLog());
    INFO("site b log:\n" << b().ReadLog());
    REQUIRE(r.exited);
    REQUIRE(r.exit_code == 0);
  }

  // `bytes` of fresh data to a at `offset`, in one write.
  void Write(uint64_t offset, uint64_t bytes) {
    NbdHandle h = testutil::RequireConnect(a(), "data");
    auto data = testutil::Pattern(bytes, ++seed_);
    INFO("write of " << bytes << " bytes at " << offset);
    REQUIRE(testutil::Pwrite(h.get(), data, offset) == 0);
  }

 private:
  static testutil::PairOptions Options(uint64_t volume_bytes, json link) {
    testutil::PairOptions o;
    o.volumes = {{"data", volume_bytes}};
    o.link = std::move(link);
    return o;
  }

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
  RequireStarted(pair);
  pair.Write(0, 512 * kKiB);
  pair.RequireCliCaughtUp();

  RequireExit(pair.Cli({"pause", "g", "--link", "b"}), 0);
  RequireLink(pair, "paused, logging", [](const json& l) {
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
    json link = PairLink(pair);
    INFO(link.dump());
    CHECK(StateOf(link) == "logging");  // no reconnect on its own
    CHECK(link.value("paused", false));
  }
  CHECK(pair.DirtyRegions() >= dirty_after);

  ProcessResult resume = pair.Cli({"resume", "g", "--link", "b"});
  RequireExit(resume, 0);
  CHECK_THAT(resume.out, Contains("resumed"));
  pair.RequireCliCaughtUp();
  {
    json link = PairLink(pair);
    INFO(link.dump());
    CHECK_FALSE(link.value("paused", true));
    CHECK(StateOf(link) == "replicating");
  }
  CheckIdentical(pair);
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
  RequireStarted(pair);
  pair.Write(0, 1 * kMiB);
  pair.RequireCliCaughtUp();
  CheckIdentical(pair);

  // b is at rest (everything applied); change one written byte and one
  // byte of a never-written (zero) region in its backing file directly.
  {
    std::fstream f(pair.b_volume("data"), std::ios::in | std::ios::out | std::ios::binary);
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
  REQUIRE(pair.CompareVolumes() != "");
  const uint64_t resync_before = PairLink(pair).value("resync_bytes_sent", uint64_t{0});

  ProcessResult resync = pair.Cli({"resync", "g", "--link", "b", "--full"});
  RequireExit(resync, 0);
  CHECK_THAT(resync.out, Contains("full resync started"));
  pair.RequireCliCaughtUp();
  json link = PairLink(pair);
  INFO(link.dump());
  // The whole written MiB went again (zero regions go as zero operations).
  CHECK(link.value("resync_bytes_sent", uint64_t{0}) >= resync_before + 1 * kMiB);
  CheckIdentical(pair);
}

// Writes `total` bytes to `h` from a thread of its own, one `chunk` at a
// time, counting what completed.
// With `wrap`, it writes the first `total` bytes over and over until
// Join(); the data differs on every pass.
class BackgroundWriter {
 public:
  BackgroundWriter(NbdHandle h, uint64_t total, uint64_t chunk, bool wrap = false)
      : h_(std::move(h)), total_(total), chunk_(chunk), wrap_(wrap) {}
  ~BackgroundWriter() { Join(); }

  void Start() {
    thread_ = std::thread([this] {
      for (uint64_t n = 0; (wrap_ || n < total_) && !stop_; n += chunk_) {
        auto data = testutil::Pattern(chunk_, 7000 + n);
        int rc = testutil::Await(
            h_.get(),
            nbd_aio_pwrite(h_.get(), data.data(), data.size(), n % total_,
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
  const bool wrap_;
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
  RequireStarted(pair);
  pair.RequireCliCaughtUp();

  BackgroundWriter writer(testutil::RequireConnect(pair.a(), "data"), kTotal, kChunk);
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
  json link = PairLink(pair);
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
  pair.RequireCliCaughtUp();
  CheckIdentical(pair);
}

constexpr uint64_t kOverflowVolume = 8 * kMiB;

// A pair whose async link has a 1 MiB max_queue, started and caught up.
// The connection lasts a second at least before it overflows, so what it
// drains is at most ~1 MB/s: far below a writer's pace.
void StartSmallQueuePair(LinkPair& pair) {
  RequireStarted(pair);
  pair.RequireCliCaughtUp();
  std::this_thread::sleep_for(std::chrono::seconds(1));
}

// Stops b, starts `writer` and waits until a's link has overflowed and
// holds (docs/replication.md, "Congestion"); then lets b go on. A failure
// on the way kills b, so no stopped process is left.
void OverflowWhileBStopped(LinkPair& pair, BackgroundWriter& writer) {
  struct KillOnFailure {
    TestDaemon& b;
    bool armed = true;
    ~KillOnFailure() {
      if (armed) b.Signal(SIGKILL);
    }
  } guard{pair.b()};
  REQUIRE(pair.b().Signal(SIGSTOP));
  REQUIRE(testutil::WaitUntil([&] { return ProcState(pair.b().pid()) == 'T'; },
                              std::chrono::seconds(5)));
  writer.Start();
  RequireLink(pair, "the queue overflowed and the link holds", [](const json& l) {
    return StateOf(l) == "logging" && l.contains("congestion_hold");
  });
  REQUIRE(pair.b().Signal(SIGCONT));
  guard.armed = false;
}

// A pair whose async link (max_queue 1 MiB) overflowed while b was stopped
// and now holds, b running again, and a writer that goes on writing over
// the volume until Join().
struct HeldLink {
  HeldLink() : pair(kOverflowVolume, {{"max_queue", "1MiB"}, {"keepalive", "60s"}}) {
    StartSmallQueuePair(pair);
    writer.emplace(testutil::RequireConnect(pair.a(), "data"), kOverflowVolume, 128 * kKiB,
                   /*wrap=*/true);
    OverflowWhileBStopped(pair, *writer);
  }
  LinkPair pair;
  std::optional<BackgroundWriter> writer;
};

TEST_CASE("Link control: after its queue overflows, an async link stays in "
          "logging mode while writers go on faster than it drained, and "
          "resyncs once they slow down",
          "[replication]") {
  HeldLink held;
  LinkPair& pair = held.pair;
  BackgroundWriter& writer = *held.writer;

  // b answers again, but the writer goes on: no reconnect for 2 s.
  const uint64_t written_before = writer.completed();
  const auto until = Clock::now() + std::chrono::seconds(2);
  while (Clock::now() < until) {
    json link = PairLink(pair);
    INFO("link: " << link.dump());
    REQUIRE(StateOf(link) == "logging");
    REQUIRE(link.contains("congestion_hold"));
    REQUIRE(link.value("connects", uint64_t{0}) == 1);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  INFO("written during the hold: " << writer.completed() - written_before);
  REQUIRE(writer.error() == 0);
  REQUIRE(writer.completed() - written_before >= 4 * kMiB);

  writer.Join();
  pair.RequireCliCaughtUp();
  json link = PairLink(pair);
  INFO("link: " << link.dump());
  CHECK(link.value("connects", uint64_t{0}) == 2);
  CHECK(link.value("congestion_holds", uint64_t{0}) == 1);
  CHECK_FALSE(link.contains("congestion_hold"));
  CHECK_THAT(pair.a().ReadLog(), Contains("the writers outran the link"));
  CheckIdentical(pair);
}

TEST_CASE("Link control: the operator's resync ends a congestion hold while "
          "the writers go on",
          "[replication]") {
  HeldLink held;
  LinkPair& pair = held.pair;
  BackgroundWriter& writer = *held.writer;

  RequireExit(pair.Cli({"resync", "g", "--link", "b"}), 0);
  // (It may overflow and hold again later: b is slower than the writer.)
  RequireLink(pair, "reconnected while the writer goes on", [&](const json& l) {
    return l.value("connects", uint64_t{0}) >= 2;
  });
  CHECK_FALSE(writer.done());  // it was still writing

  writer.Join();
  REQUIRE(writer.error() == 0);
  pair.RequireCliCaughtUp();
  CheckIdentical(pair);
}

TEST_CASE("Link control: pause, resume, resync and wait name an unknown "
          "group or link and exit 1",
          "[replication]") {
  testutil::TempDir dir("blockrelay-linkctl");
  json config = testutil::GroupSiteConfig(dir.path(), "a", "primary",
                                          {{"data", 4 * kMiB}});
  // Nothing listens there: the link just keeps retrying.
  testutil::AddDownstream(config, "b", 9);
  TestDaemon a(dir.path(), config);
  RequireStarted(a);
  auto cli = [&](std::vector<std::string> args) { return RunCli(a, std::move(args)); };

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
