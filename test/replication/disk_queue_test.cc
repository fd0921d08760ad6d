// The disk queue ("queue": "disk") with real daemons on loopback: site a
// (primary) replicates group "g" to site b (secondary). While b is down a's
// link keeps every write in order in data_dir/queue-g-b.log ("queuing");
// when b returns it catches up from the queue without a resync, also after
// a clean restart of a. After a crash of a (the queue is not known to be
// complete) or past max_queue the link falls back to the scoreboard
// ("logging") and resyncs. Every check ends with the backing files of both
// sites compared byte for byte. Waits are bounded polls; the tests signal
// only their own daemons.
#include <signal.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
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
using testutil::TestDaemon;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kVolumeBytes = 4 * kMiB;
constexpr uint64_t kWriteBytes = 256 * kKiB;
// Generous: the machine running the tests may be heavily loaded. A
// reconnect waits for the link's back-off (at most 5 s) on top.
constexpr auto kCatchUpTimeout = std::chrono::seconds(30);
constexpr auto kStateTimeout = std::chrono::seconds(15);

// One site's config with group "g" of `role` holding `volumes` (backing
// files <dir>/<name>.img of kVolumeBytes).
json SiteConfig(const fs::path& dir, const std::string& site,
                const std::string& role,
                const std::vector<std::string>& volumes) {
  json vols = json::array();
  for (const auto& v : volumes) {
    vols.push_back({{"name", v},
                    {"path", (dir / (v + ".img")).string()},
                    {"size", kVolumeBytes}});
  }
  json group = {{"name", "g"}, {"role", role}, {"volumes", vols}};
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

uint64_t FileSize(const fs::path& path) {
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  return ec ? 0 : size;
}

// Site a (primary, async link to b with a disk queue) and site b
// (secondary), on blank volumes declared in sync ("initial_sync": "none").
class DiskQueuePair {
 public:
  DiskQueuePair(std::vector<std::string> volumes, const std::string& max_queue)
      : volumes_(std::move(volumes)),
        b_dir_(Subdir("b")),
        a_dir_(Subdir("a")),
        b_(b_dir_, SiteConfig(b_dir_, "b", "secondary", volumes_)),
        a_(a_dir_, SiteConfig(a_dir_, "a", "primary", volumes_)),
        max_queue_(max_queue) {}

  TestDaemon& a() { return a_; }
  TestDaemon& b() { return b_; }
  fs::path queue_file() const { return a_dir_ / "data" / "queue-g-b.log"; }

  // b first: a's link needs b's replication port.
  void Start() {
    Status s = b_.Start();
    INFO(s.ToString());
    REQUIRE(s.ok());
    a_.config()["groups"][0]["downstream"] = json::array(
        {{{"site", "b"},
          {"address", fmt::format("127.0.0.1:{}", b_.port("/replication/listen"))},
          {"mode", "async"},
          {"queue", "disk"},
          {"max_queue", max_queue_},
          {"initial_sync", "none"}}});
    s = a_.Start();
    INFO(s.ToString());
    REQUIRE(s.ok());
  }

  void RestartA() {
    Status s = a_.Start();
    INFO(s.ToString());
    REQUIRE(s.ok());
  }
  void RestartB() {
    Status s = b_.Start();
    INFO(s.ToString());
    REQUIRE(s.ok());
  }

  void KillA() { Kill(a_); }
  void KillB() { Kill(b_); }

  // groups[0].downstream[0] of a's status (null if a does not answer).
  json Link() const {
    auto reply = a_.Control({{"command", "status"}});
    if (!reply.ok() || !reply->value("ok", false)) return nullptr;
    const json& ds = (*reply)["groups"][0]["downstream"];
    if (!ds.is_array() || ds.empty()) return nullptr;
    return ds[0];
  }

  // Polls a's link status until `pred` holds; the last status on failure.
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

  // The "wait" control request until it answers caught_up.
  void RequireCaughtUp() {
    json last;
    bool ok = testutil::WaitUntil(
        [&] {
          auto reply = a_.Control({{"command", "wait"}, {"group", "g"}, {"link", "b"}});
          if (!reply.ok()) return false;
          last = *reply;
          return reply->value("caught_up", false);
        },
        kCatchUpTimeout);
    INFO("last wait reply: " << last.dump());
    INFO("site a log:\n" << a_.ReadLog());
    INFO("site b log:\n" << b_.ReadLog());
    REQUIRE(ok);
  }

  void RequireIdentical() {
    for (const auto& v : volumes_) {
      const std::string diff =
          Differences(a_dir_ / (v + ".img"), b_dir_ / (v + ".img"));
      INFO("volume " << v);
      CHECK(diff == "");
    }
  }

  // `bytes` of fresh data to volume `v` at `offset`, in kWriteBytes writes;
  // every write must succeed.
  void Write(const std::string& v, uint64_t offset, uint64_t bytes) {
    NbdHandle h = Connect(v);
    for (uint64_t done = 0; done < bytes; done += kWriteBytes) {
      auto data = testutil::Pattern(kWriteBytes, ++seed_);
      INFO("write at " << offset + done);
      REQUIRE(testutil::Pwrite(h.get(), data, offset + done) == 0);
    }
  }

 private:
  NbdHandle Connect(const std::string& v) {
    testutil::NbdOptions options;
    options.export_name = v;
    std::string error;
    NbdHandle h = testutil::ConnectUnix(*a_.nbd_unix_socket(), options, &error);
    INFO("libnbd connecting to " << v << ": " << error);
    REQUIRE(h != nullptr);
    return h;
  }
  fs::path Subdir(const std::string& name) {
    fs::path p = root_ / name;
    fs::create_directories(p);
    return p;
  }
  static void Kill(TestDaemon& d) {
    REQUIRE(d.Signal(SIGKILL));
    REQUIRE(d.WaitForExit(std::chrono::seconds(10)).has_value());
  }

  std::vector<std::string> volumes_;
  testutil::TempDir root_{"blockrelay-diskq"};
  fs::path b_dir_, a_dir_;
  TestDaemon b_, a_;
  std::string max_queue_;
  uint64_t seed_ = 0;
};

bool StateIs(const json& link, const std::string& state) {
  return link.value("state", "") == state;
}
uint64_t Field(const json& link, const char* key) {
  return link.value(key, uint64_t{0});
}

TEST_CASE("Disk queue: while the downstream is down writes are queued in "
          "order in the queue file, and it catches up from them without a "
          "resync",
          "[replication]") {
  DiskQueuePair pair({"data0", "data1"}, "64MiB");
  pair.Start();
  pair.RequireCaughtUp();

  pair.KillB();
  pair.RequireLink("state queuing", [](const json& l) { return StateIs(l, "queuing"); });

  // Writes go on while b is down, and the queue file takes them.
  pair.Write("data0", 0, 1 * kMiB);
  pair.Write("data1", 2 * kMiB, 1 * kMiB);
  pair.RequireLink("the first 2 MiB in the disk queue", [&](const json& l) {
    return Field(l, "disk_queue_groups") > 0 &&
           Field(l, "disk_queue_bytes") >= 2 * kMiB &&
           FileSize(pair.queue_file()) >= 2 * kMiB;
  });
  const uint64_t first_size = FileSize(pair.queue_file());
  pair.Write("data1", 0, 1 * kMiB);
  pair.Write("data0", 1 * kMiB + 4 * kKiB, 1 * kMiB);  // not region-aligned
  pair.RequireLink("the queue file growing by the next 2 MiB", [&](const json& l) {
    return Field(l, "disk_queue_bytes") >= 4 * kMiB &&
           FileSize(pair.queue_file()) >= first_size + 2 * kMiB;
  });
  {
    json link = pair.Link();
    INFO(link.dump());
    CHECK(StateIs(link, "queuing"));
    CHECK(link.value("disk_queue_complete", false));
  }

  pair.RestartB();
  pair.RequireCaughtUp();
  json link = pair.Link();
  INFO(link.dump());
  CHECK(StateIs(link, "replicating"));
  CHECK(Field(link, "resync_bytes_sent") == 0);
  CHECK(Field(link, "bytes_sent") >= 4 * kMiB);
  pair.RequireIdentical();
}

TEST_CASE("Disk queue: a clean restart of the primary keeps the queue, and "
          "the downstream catches up from it without a resync",
          "[replication]") {
  DiskQueuePair pair({"data"}, "64MiB");
  pair.Start();
  pair.RequireCaughtUp();

  pair.KillB();
  pair.RequireLink("state queuing", [](const json& l) { return StateIs(l, "queuing"); });
  pair.Write("data", 0, 2 * kMiB);
  pair.RequireLink("2 MiB in the disk queue", [](const json& l) {
    return Field(l, "disk_queue_bytes") >= 2 * kMiB;
  });

  auto rc = pair.a().Stop();
  {
    INFO("site a log:\n" << pair.a().ReadLog());
    REQUIRE(rc.has_value());
    CHECK(*rc == 0);
    CHECK_THAT(pair.a().ReadLog(), Contains("disk queue saved with"));
  }

  // a comes back first, with the queue from before, and takes more writes
  // behind it; then b returns.
  pair.RestartA();
  CHECK_THAT(pair.a().ReadLog(), Contains("from before the restart"));
  pair.RequireLink("the saved queue restored", [](const json& l) {
    return StateIs(l, "queuing") && Field(l, "disk_queue_bytes") >= 2 * kMiB &&
           l.value("disk_queue_complete", false);
  });
  pair.Write("data", 1 * kMiB, 2 * kMiB);  // overlaps the queued writes

  pair.RestartB();
  pair.RequireCaughtUp();
  json link = pair.Link();
  INFO(link.dump());
  CHECK(Field(link, "resync_bytes_sent") == 0);
  CHECK(Field(link, "bytes_sent") >= 4 * kMiB);
  pair.RequireIdentical();
}

TEST_CASE("Disk queue: after a crash of the primary the queue is dropped "
          "and the link resyncs from the scoreboard",
          "[replication]") {
  DiskQueuePair pair({"data"}, "64MiB");
  pair.Start();
  pair.RequireCaughtUp();

  pair.KillB();
  pair.RequireLink("state queuing", [](const json& l) { return StateIs(l, "queuing"); });
  pair.Write("data", 512 * kKiB, 2 * kMiB);
  pair.RequireLink("2 MiB in the disk queue", [](const json& l) {
    return Field(l, "disk_queue_groups") > 0 &&
           Field(l, "disk_queue_bytes") >= 2 * kMiB;
  });

  pair.KillA();
  pair.RestartA();
  {
    const std::string log = pair.a().ReadLog();
    INFO("site a log:\n" << log);
    CHECK_THAT(log, Contains("not known to be complete"));
    CHECK_THAT(log, Contains("dropping its"));
  }
  pair.RequireLink("the queue dropped", [](const json& l) {
    return Field(l, "disk_queue_groups") == 0 &&
           !l.value("disk_queue_complete", true);
  });

  pair.RestartB();
  pair.RequireCaughtUp();
  json link = pair.Link();
  INFO(link.dump());
  CHECK(Field(link, "resync_bytes_sent") > 0);
  pair.RequireIdentical();
}

TEST_CASE("Disk queue: past max_queue the queue is dropped, the link falls "
          "back to logging and resyncs when the downstream returns",
          "[replication]") {
  DiskQueuePair pair({"data"}, "1MiB");
  pair.Start();
  pair.RequireCaughtUp();

  pair.KillB();
  pair.RequireLink("state queuing", [](const json& l) { return StateIs(l, "queuing"); });
  // Three times max_queue, contiguous: the resync afterwards reads it in
  // 1 MiB runs, which must not count against max_queue either.
  pair.Write("data", 0, 3 * kMiB);
  pair.RequireLink("state logging", [](const json& l) { return StateIs(l, "logging"); });
  {
    json link = pair.Link();
    INFO(link.dump());
    CHECK(Field(link, "disk_queue_groups") == 0);
    CHECK_FALSE(link.value("disk_queue_complete", true));
    CHECK_THAT(pair.a().ReadLog(), Contains("dropping the disk queue"));
  }

  pair.RestartB();
  pair.RequireCaughtUp();
  json link = pair.Link();
  INFO(link.dump());
  CHECK(Field(link, "resync_bytes_sent") >= 3 * kMiB);
  // The queue overflowed once, while b was down; the resync did not.
  const std::string log = pair.a().ReadLog();
  size_t overflows = 0;
  for (size_t at = log.find("dropping the disk queue"); at != std::string::npos;
       at = log.find("dropping the disk queue", at + 1)) {
    ++overflows;
  }
  CHECK(overflows == 1);
  pair.RequireIdentical();
}

}  // namespace
}  // namespace blockrelay
