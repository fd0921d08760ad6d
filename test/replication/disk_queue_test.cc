// The disk queue ("queue": "disk") with real daemons on loopback: site a
// (primary) replicates group "g" to site b (secondary). While b is down a's
// link keeps every write in order in data_dir/queue-g-b.log ("queuing");
// when b returns it catches up from the queue without a resync, also after
// a clean restart of a. After a crash of a (the queue is not known to be
// complete) or past max_queue the link falls back to the scoreboard
// ("logging") and resyncs. Every check ends with the backing files of both
// sites compared byte for byte. Waits are bounded polls; the tests signal
// only their own daemons.
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "testutil/daemon.h"
#include "testutil/nbd_client.h"
#include "testutil/sites.h"

namespace blockrelay {
namespace {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using nlohmann::json;
using testutil::CheckIdentical;
using testutil::NbdHandle;
using testutil::PairLink;
using testutil::RequireCaughtUp;
using testutil::RequireKilled;
using testutil::RequireLink;
using testutil::RequireStarted;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kVolumeBytes = 4 * kMiB;
constexpr uint64_t kWriteBytes = 256 * kKiB;

uint64_t FileSize(const fs::path& path) {
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  return ec ? 0 : size;
}

bool StateIs(const json& link, const std::string& state) {
  return link.value("state", "") == state;
}
uint64_t Field(const json& link, const char* key) {
  return link.value(key, uint64_t{0});
}

// Site a (primary, async link to b with a disk queue of at most
// `max_queue`) and site b (secondary), on blank volumes of kVolumeBytes
// declared in sync ("initial_sync": "none").
class DiskQueuePair : public testutil::SitePair {
 public:
  DiskQueuePair(const std::vector<std::string>& volumes,
                const std::string& max_queue)
      : SitePair(Options(volumes, max_queue)) {}

  fs::path queue_file() const { return a().dir() / "data" / "queue-g-b.log"; }

  // Both sites up and caught up, then b killed: a's link must go
  // "queuing".
  void StartThenKillB() {
    RequireStarted(*this);
    RequireCaughtUp(*this);
    RequireKilled(b());
    RequireLink(*this, "state queuing", [](const json& l) { return StateIs(l, "queuing"); });
  }

  // b started again: a's link must catch up. Returns the link's status.
  json RestartB() {
    RequireStarted(b());
    RequireCaughtUp(*this);
    return PairLink(*this);
  }

  // `bytes` of fresh data to volume `v` of a at `offset`, in kWriteBytes
  // writes; every write must succeed.
  void Write(const std::string& v, uint64_t offset, uint64_t bytes) {
    NbdHandle h = testutil::RequireConnect(a(), v);
    for (uint64_t done = 0; done < bytes; done += kWriteBytes) {
      auto data = testutil::Pattern(kWriteBytes, ++seed_);
      INFO("write at " << offset + done);
      REQUIRE(testutil::Pwrite(h.get(), data, offset + done) == 0);
    }
  }

 private:
  static testutil::PairOptions Options(const std::vector<std::string>& volumes,
                                       const std::string& max_queue) {
    testutil::PairOptions o;
    o.volumes.clear();
    for (const auto& v : volumes) o.volumes.push_back({v, kVolumeBytes});
    o.link = {{"queue", "disk"}, {"max_queue", max_queue}};
    return o;
  }

  uint64_t seed_ = 0;
};

TEST_CASE("Disk queue: while the downstream is down writes are queued in "
          "order in the queue file, and it catches up from them without a "
          "resync",
          "[replication]") {
  DiskQueuePair pair({"data0", "data1"}, "64MiB");
  pair.StartThenKillB();

  // Writes go on while b is down, and the queue file takes them.
  pair.Write("data0", 0, 1 * kMiB);
  pair.Write("data1", 2 * kMiB, 1 * kMiB);
  RequireLink(pair, "the first 2 MiB in the disk queue", [&](const json& l) {
    return Field(l, "disk_queue_groups") > 0 &&
           Field(l, "disk_queue_bytes") >= 2 * kMiB &&
           FileSize(pair.queue_file()) >= 2 * kMiB;
  });
  const uint64_t first_size = FileSize(pair.queue_file());
  pair.Write("data1", 0, 1 * kMiB);
  pair.Write("data0", 1 * kMiB + 4 * kKiB, 1 * kMiB);  // not region-aligned
  RequireLink(pair, "the queue file growing by the next 2 MiB", [&](const json& l) {
    return Field(l, "disk_queue_bytes") >= 4 * kMiB &&
           FileSize(pair.queue_file()) >= first_size + 2 * kMiB;
  });
  {
    json link = PairLink(pair);
    INFO(link.dump());
    CHECK(StateIs(link, "queuing"));
    CHECK(link.value("disk_queue_complete", false));
  }

  json link = pair.RestartB();
  INFO(link.dump());
  CHECK(StateIs(link, "replicating"));
  CHECK(Field(link, "resync_bytes_sent") == 0);
  CHECK(Field(link, "bytes_sent") >= 4 * kMiB);
  CheckIdentical(pair);
}

TEST_CASE("Disk queue: a clean restart of the primary keeps the queue, and "
          "the downstream catches up from it without a resync",
          "[replication]") {
  DiskQueuePair pair({"data"}, "64MiB");
  pair.StartThenKillB();
  pair.Write("data", 0, 2 * kMiB);
  RequireLink(pair, "2 MiB in the disk queue", [](const json& l) {
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
  RequireStarted(pair.a());
  CHECK_THAT(pair.a().ReadLog(), Contains("from before the restart"));
  RequireLink(pair, "the saved queue restored", [](const json& l) {
    return StateIs(l, "queuing") && Field(l, "disk_queue_bytes") >= 2 * kMiB &&
           l.value("disk_queue_complete", false);
  });
  pair.Write("data", 1 * kMiB, 2 * kMiB);  // overlaps the queued writes

  json link = pair.RestartB();
  INFO(link.dump());
  CHECK(Field(link, "resync_bytes_sent") == 0);
  CHECK(Field(link, "bytes_sent") >= 4 * kMiB);
  CheckIdentical(pair);
}

TEST_CASE("Disk queue: after a crash of the primary the queue is dropped "
          "and the link resyncs from the scoreboard",
          "[replication]") {
  DiskQueuePair pair({"data"}, "64MiB");
  pair.StartThenKillB();
  pair.Write("data", 512 * kKiB, 2 * kMiB);
  RequireLink(pair, "2 MiB in the disk queue", [](const json& l) {
    return Field(l, "disk_queue_groups") > 0 &&
           Field(l, "disk_queue_bytes") >= 2 * kMiB;
  });

  RequireKilled(pair.a());
  RequireStarted(pair.a());
  {
    const std::string log = pair.a().ReadLog();
    INFO("site a log:\n" << log);
    CHECK_THAT(log, Contains("not known to be complete"));
    CHECK_THAT(log, Contains("dropping its"));
  }
  RequireLink(pair, "the queue dropped", [](const json& l) {
    return Field(l, "disk_queue_groups") == 0 &&
           !l.value("disk_queue_complete", true);
  });

  json link = pair.RestartB();
  INFO(link.dump());
  CHECK(Field(link, "resync_bytes_sent") > 0);
  CheckIdentical(pair);
}

TEST_CASE("Disk queue: past max_queue the queue is dropped, the link falls "
          "back to logging and resyncs when the downstream returns",
          "[replication]") {
  DiskQueuePair pair({"data"}, "1MiB");
  pair.StartThenKillB();
  // Three times max_queue, contiguous: the resync afterwards reads it in
  // 1 MiB runs, which must not count against max_queue either.
  pair.Write("data", 0, 3 * kMiB);
  RequireLink(pair, "state logging", [](const json& l) { return StateIs(l, "logging"); });
  {
    json link = PairLink(pair);
    INFO(link.dump());
    CHECK(Field(link, "disk_queue_groups") == 0);
    CHECK_FALSE(link.value("disk_queue_complete", true));
    CHECK_THAT(pair.a().ReadLog(), Contains("dropping the disk queue"));
  }

  json link = pair.RestartB();
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
  CheckIdentical(pair);
}

}  // namespace
}  // namespace blockrelay
