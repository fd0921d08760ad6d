// Integration tests of site-to-site replication: real blockrelay daemons on
// loopback (site a primary, site b secondary), driven with libnbd on a and
// checked by comparing the backing files of both sites byte for byte and by
// reading the status JSON. Waits use the "wait" control request or bounded
// polling; a test kills only its own daemons.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "testutil/daemon.h"
#include "testutil/nbd_client.h"
#include "testutil/sites.h"

namespace blockrelay {
namespace {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using nlohmann::json;
using testutil::NbdHandle;
using testutil::Pattern;
using testutil::RequireCaughtUp;
using testutil::RequireConnect;
using testutil::RequireStarted;
using testutil::SitePair;
using testutil::TestDaemon;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kRegionBytes = 64 * kKiB;  // the default region_size
constexpr auto kCatchUpTimeout = std::chrono::seconds(20);
constexpr auto kStateTimeout = std::chrono::seconds(5);

std::string LinkState(const TestDaemon& d, const std::string& site = "b") {
  auto link = testutil::LinkStatus(d, "g", site);
  return link ? link->value("state", "") : "";
}

// Bytes [offset, offset+length) of a file.
std::vector<std::byte> ReadRange(const fs::path& path, uint64_t offset,
                                 uint64_t length) {
  std::vector<std::byte> out(length);
  std::ifstream in(path, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  in.read(reinterpret_cast<char*>(out.data()),
          static_cast<std::streamsize>(length));
  if (!in) out.clear();  // short or unreadable: never equal to the data
  return out;
}

// Writes `size` bytes of a pattern over a whole backing file (before the
// daemon that owns it starts), so "unchanged" means something.
void FillFile(const fs::path& path, uint64_t size, uint64_t seed) {
  auto data = Pattern(size, seed);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data.data()),
            static_cast<std::streamsize>(data.size()));
  REQUIRE(out.good());
}

// One NBD connection per volume of the group, and a seeded mix of writes,
// trims and zeroings (many overlapping in a hot first MiB), with FUA writes
// and flushes in between.
class Workload {
 public:
  Workload(const TestDaemon& d, const std::vector<testutil::VolumeSpec>& volumes,
           uint64_t seed)
      : rng_(seed), volumes_(volumes) {
    for (const auto& v : volumes_) handles_.push_back(RequireConnect(d, v.name));
  }

  // Runs `ops` operations; every one must succeed.
  void Run(int ops) {
    for (int i = 0; i < ops; ++i) Step();
  }

  // One write of `length` bytes at `offset` of volume `v`; returns its errno.
  int Write(size_t v, uint64_t offset, uint64_t length, uint32_t flags = 0) {
    auto data = Pattern(length, ++pattern_seed_);
    return testutil::Pwrite(handles_[v].get(), data, offset, flags);
  }

  void FlushAll() {
    for (auto& h : handles_) REQUIRE(testutil::Flush(h.get()) == 0);
  }

  nbd_handle* handle(size_t v) { return handles_[v].get(); }

 private:
  uint64_t Uniform(uint64_t lo, uint64_t hi) {  // [lo, hi]
    return std::uniform_int_distribution<uint64_t>(lo, hi)(rng_);
  }

  void Step() {
    const size_t v = Uniform(0, volumes_.size() - 1);
    nbd_handle* h = handles_[v].get();
    const uint64_t size = volumes_[v].size_bytes;
    const uint64_t length = Uniform(1, 128) * 512 * (Uniform(0, 3) == 0 ? 8 : 1);
    // Half of the operations land in the first MiB, so they overlap.
    const uint64_t span = Uniform(0, 1) ? std::min<uint64_t>(kMiB, size) : size;
    const uint64_t offset = Uniform(0, (span - std::min(span, length)) / 512) * 512;
    const uint64_t len = std::min(length, size - offset);
    const uint64_t kind = Uniform(0, 99);
    int rc;
    std::string what;
    if (kind < 55) {
      what = "write";
      rc = Write(v, offset, len, Uniform(0, 9) == 0 ? LIBNBD_CMD_FLAG_FUA : 0);
    } else if (kind < 70 && nbd_can_trim(h) == 1) {
      what = "trim";
      rc = testutil::Trim(h, len, offset);
    } else if (kind < 90 && nbd_can_zero(h) == 1) {
      what = "write_zeroes";
      rc = testutil::Zero(h, len, offset);
    } else {
      what = "flush";
      rc = testutil::Flush(h);
    }
    INFO(what << " on volume " << volumes_[v].name << " at " << offset << "+"
              << len);
    REQUIRE(rc == 0);
  }

  std::mt19937_64 rng_;
  std::vector<testutil::VolumeSpec> volumes_;
  std::vector<NbdHandle> handles_;
  uint64_t pattern_seed_ = 1000;
};

// Goal: the basic promise of an async link. Whatever mix of writes, trims
// and zeroings a group's volumes take, once the link reports caught up the
// downstream's backing files hold exactly the primary's bytes.
TEST_CASE("Replication: async link leaves the downstream's volumes "
          "byte-identical once caught up",
          "[replication]") {
  testutil::PairOptions options;
  options.volumes = {{"wal", 4 * kMiB}, {"data", 12 * kMiB}};
  SitePair pair(options);
  RequireStarted(pair);
  RequireCaughtUp(pair, kCatchUpTimeout);

  Workload work(pair.a(), options.volumes, /*seed=*/11);
  work.Run(300);
  RequireCaughtUp(pair, kCatchUpTimeout);
  const std::string diff = pair.CompareVolumes();
  INFO("site a log:\n" << pair.a().ReadLog());
  CHECK(diff == "");
  auto link = testutil::LinkStatus(pair.a(), "g", "b");
  REQUIRE(link.has_value());
  CHECK(link->value("state", "") == "replicating");
  CHECK(link->value("bytes_sent", uint64_t{0}) > 0);
  CHECK(link->value("last_acked_seq", uint64_t{0}) > 0);
  CHECK(link->value("queue_bytes", uint64_t{1}) == 0);
  CHECK(link->value("lag_bytes", uint64_t{1}) == 0);
}

// Goal: the operator can tell a secondary's slot for its upstream (kept for
// a failover) from a downstream link that is down.
TEST_CASE("Replication: a secondary's status shows its slot for the "
          "upstream as mode upstream, state tracking",
          "[replication]") {
  SitePair pair;
  // With an address the upstream gets a slot (docs/replication.md).
  pair.b().config()["groups"][0]["upstream"]["address"] =
      fmt::format("127.0.0.1:{}", testutil::PickFreeTcpPort());
  RequireStarted(pair);
  RequireCaughtUp(pair, kCatchUpTimeout);
  auto g = testutil::GroupStatus(pair.b(), "g");
  REQUIRE(g.has_value());
  REQUIRE(g->contains("volumes"));
  int slots_for_a = 0;
  for (const auto& v : (*g)["volumes"]) {
    for (const auto& l : v.value("links", json::array())) {
      if (l.value("site", "") != "a") continue;
      ++slots_for_a;
      CHECK(l.value("mode", "") == "upstream");
      CHECK(l.value("state", "") == "tracking");
    }
  }
  CHECK(slots_for_a == static_cast<int>((*g)["volumes"].size()));
  CHECK(slots_for_a > 0);
}

// Goal: acknowledgements (plus the periodic sweep) clear the scoreboard, so
// a healthy link does not carry a growing dirty set into its next resync.
TEST_CASE("Replication: a caught-up async link's scoreboard drains to zero "
          "dirty regions",
          "[replication]") {
  testutil::PairOptions options;
  options.volumes = {{"wal", 4 * kMiB}, {"data", 12 * kMiB}};
  SitePair pair(options);
  RequireStarted(pair);
  Workload work(pair.a(), options.volumes, /*seed=*/12);
  work.Run(200);
  work.FlushAll();
  RequireCaughtUp(pair, kCatchUpTimeout);
  std::optional<testutil::DirtyTotals> dirty;
  bool clean = testutil::WaitUntil(
      [&] {
        dirty = testutil::DirtyFor(pair.a(), "g", "b");
        return dirty && dirty->regions == 0 && dirty->bytes == 0;
      },
      kStateTimeout);
  INFO("dirty regions for link b: " << (dirty ? dirty->regions : ~0ull));
  CHECK(clean);
}

// Goal: Invariant 4 on a sync link. A FLUSH that returned on the primary
// means the downstream has applied the data, not just received it.
TEST_CASE("Replication: after FLUSH returns on a sync link, the downstream's "
          "volume already holds the data",
          "[replication]") {
  testutil::PairOptions options;
  options.mode = "sync";
  SitePair pair(options);
  RequireStarted(pair);
  RequireCaughtUp(pair, kCatchUpTimeout);
  NbdHandle h = RequireConnect(pair.a(), "data");
  for (uint64_t k = 0; k < 12; ++k) {
    const uint64_t offset = k * (1 * kMiB + 4 * kKiB);
    const uint64_t length = 4 * kKiB * (1 + k * 7 % 32);
    auto data = Pattern(length, 500 + k);
    REQUIRE(testutil::Pwrite(h.get(), data, offset) == 0);
    REQUIRE(testutil::Flush(h.get()) == 0);
    INFO("write " << k << " at " << offset << "+" << length);
    CHECK(ReadRange(pair.b_volume("data"), offset, length) == data);
  }
}

TEST_CASE("Replication: after a FUA write returns on a sync link, the "
          "downstream's volume already holds it",
          "[replication]") {
  testutil::PairOptions options;
  options.mode = "sync";
  SitePair pair(options);
  RequireStarted(pair);
  RequireCaughtUp(pair, kCatchUpTimeout);
  NbdHandle h = RequireConnect(pair.a(), "data");
  for (uint64_t k = 0; k < 12; ++k) {
    const uint64_t offset = 3 * kMiB + k * 96 * kKiB;
    const uint64_t length = 64 * kKiB;
    auto data = Pattern(length, 900 + k);
    REQUIRE(testutil::Pwrite(h.get(), data, offset, LIBNBD_CMD_FLAG_FUA) == 0);
    INFO("FUA write " << k << " at " << offset << "+" << length);
    CHECK(ReadRange(pair.b_volume("data"), offset, length) == data);
  }
}

// Goal: group commit across a sync link. Writes that arrive while the
// downstream has not yet acknowledged the group in flight share the next
// group (one frame, journal append and acknowledgement for all of them)
// instead of one group each, and each still reaches the downstream.
TEST_CASE("Replication: on a sync link, writes in flight together share "
          "groups and all reach the downstream",
          "[replication]") {
  testutil::PairOptions options;
  options.mode = "sync";
  SitePair pair(options);
  RequireStarted(pair);
  RequireCaughtUp(pair, kCatchUpTimeout);
  auto before = testutil::LinkStatus(pair.a(), "g", "b");
  REQUIRE(before.has_value());
  const uint64_t groups_before = before->value("groups_sent", uint64_t{0});

  NbdHandle h = RequireConnect(pair.a(), "data");
  constexpr int kWrites = 256;
  constexpr uint64_t kLength = 4 * kKiB;
  std::vector<std::vector<std::byte>> data;
  std::vector<int64_t> cookies;
  for (int i = 0; i < kWrites; ++i) {
    data.push_back(Pattern(kLength, 7000 + i));
    cookies.push_back(nbd_aio_pwrite(h.get(), data.back().data(), kLength,
                                     static_cast<uint64_t>(i) * 3 * kLength,
                                     NBD_NULL_COMPLETION, 0));
  }
  for (int64_t cookie : cookies) REQUIRE(testutil::Await(h.get(), cookie) == 0);
  REQUIRE(testutil::Flush(h.get()) == 0);

  auto after = testutil::LinkStatus(pair.a(), "g", "b");
  REQUIRE(after.has_value());
  const uint64_t groups = after->value("groups_sent", uint64_t{0}) - groups_before;
  INFO("groups sent for " << kWrites << " pipelined writes: " << groups);
  CHECK(groups > 0);
  // One group per write was the behaviour before group commit.
  CHECK(groups < kWrites / 2);
  for (int i = 0; i < kWrites; ++i) {
    INFO("write " << i);
    CHECK(ReadRange(pair.b_volume("data"), static_cast<uint64_t>(i) * 3 * kLength,
                    kLength) == data[i]);
  }
}

// Journal syncs site b made for received groups (its upstream status).
uint64_t JournalSyncs(const TestDaemon& b) {
  auto up = testutil::UpstreamStatus(b, "g");
  REQUIRE(up.has_value());
  REQUIRE(up->contains("journal_syncs"));
  return up->value("journal_syncs", uint64_t{0});
}

// Starts `pair`, waits until its link is caught up, checks that b's
// upstream reports `durability` (from the HELLO: "lazy" or "prompt") and
// returns b's journal syncs so far.
uint64_t StartCaughtUp(SitePair& pair, const std::string& durability) {
  RequireStarted(pair);
  RequireCaughtUp(pair, kCatchUpTimeout);
  auto upstream = testutil::UpstreamStatus(pair.b(), "g");
  REQUIRE(upstream.has_value());
  CHECK(upstream->value("durability", "") == durability);
  return JournalSyncs(pair.b());
}

// Writes kFlushedWrites 4 KiB blocks on `pair`'s primary, each followed by
// a FLUSH.
constexpr int kFlushedWrites = 60;
void WriteEachFlushed(SitePair& pair) {
  NbdHandle h = RequireConnect(pair.a(), "data");
  for (int i = 0; i < kFlushedWrites; ++i) {
    auto data = Pattern(4 * kKiB, 8100 + i);
    REQUIRE(testutil::Pwrite(h.get(), data, static_cast<uint64_t>(i) * 64 * kKiB) == 0);
    REQUIRE(testutil::Flush(h.get()) == 0);
  }
}

// Goal: a writer that flushes every few writes does not make an async
// downstream sync its journal once per flush (each sync is a file system
// commit and a disk cache flush, and nothing waits for it): b syncs once
// the groups stop coming for 50 ms, or once the oldest has waited a second
// (receiver.cc, kLazySyncDelay), and still catches up with every byte.
TEST_CASE("Replication: an async downstream syncs its journal for many "
          "flushed groups at once",
          "[replication]") {
  SitePair pair;
  const uint64_t syncs_before = StartCaughtUp(pair, "lazy");
  // Every sync for these groups falls between the first write and the
  // link's catch-up (b acknowledges a group as durable only once synced).
  const auto start = Clock::now();
  WriteEachFlushed(pair);
  RequireCaughtUp(pair, kCatchUpTimeout);
  const auto elapsed_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
  const uint64_t syncs = JournalSyncs(pair.b()) - syncs_before;
  INFO(kFlushedWrites << " flushed writes caught up in " << elapsed_ms
                      << " ms, journal syncs on b: " << syncs);
  CHECK(syncs > 0);
  // A sync takes every group waiting, and the next one needs 50 ms
  // without a group after the last: at most one per 50 ms, plus the first.
  CHECK(syncs <= static_cast<uint64_t>(elapsed_ms / 50) + 1);
  testutil::CheckIdentical(pair);
}

// ... and while the groups keep coming, b syncs for them about once a
// second, not every 50 ms (what it did in session 11: 10-20 % of the IOPS
// of a writer flushing every 32 writes on a disk both sites share).
TEST_CASE("Replication: an async downstream syncs its journal about once a "
          "second while flushed groups keep coming",
          "[replication]") {
  SitePair pair;
  const uint64_t syncs_before = StartCaughtUp(pair, "lazy");
  const auto start = Clock::now();
  const auto write_for = std::chrono::milliseconds(1500);
  int writes = 0;
  {
    NbdHandle h = RequireConnect(pair.a(), "data");
    for (; Clock::now() - start < write_for; ++writes) {
      auto data = Pattern(4 * kKiB, 8300 + writes);
      REQUIRE(testutil::Pwrite(h.get(), data, static_cast<uint64_t>(writes % 256) * 64 * kKiB) ==
              0);
      REQUIRE(testutil::Flush(h.get()) == 0);
    }
  }
  const auto wrote_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
  const uint64_t syncs_while_writing = JournalSyncs(pair.b()) - syncs_before;
  RequireCaughtUp(pair, kCatchUpTimeout);
  INFO(writes << " flushed writes in " << wrote_ms << " ms, journal syncs on b meanwhile: "
              << syncs_while_writing);
  REQUIRE(writes >= 30);
  // One a second, plus one for each pause of 50 ms of a writer that a busy
  // machine may hold up: far below the one per 50 ms of a 50 ms batch.
  CHECK(syncs_while_writing <= static_cast<uint64_t>(wrote_ms / 250) + 1);
  testutil::CheckIdentical(pair);
}

// ... whereas a sync link's FLUSH returns only once b's journal is synced,
// so every one of them costs b a sync.
TEST_CASE("Replication: a sync downstream syncs its journal for every flush "
          "the writer waits for",
          "[replication]") {
  testutil::PairOptions options;
  options.mode = "sync";
  SitePair pair(options);
  const uint64_t syncs_before = StartCaughtUp(pair, "prompt");
  WriteEachFlushed(pair);
  const uint64_t syncs = JournalSyncs(pair.b()) - syncs_before;
  INFO("journal syncs on b for " << kFlushedWrites << " flushed writes: " << syncs);
  CHECK(syncs >= static_cast<uint64_t>(kFlushedWrites));
}

// Journal syncs b made for kFlushedWrites flushed writes through an async
// link with the `link` settings, whose HELLO must ask for prompt
// durability.
uint64_t PromptSyncsForFlushedWrites(const json& link) {
  testutil::PairOptions options;
  options.link = link;
  SitePair pair(options);
  const uint64_t syncs_before = StartCaughtUp(pair, "prompt");
  WriteEachFlushed(pair);
  RequireCaughtUp(pair, kCatchUpTimeout);
  return JournalSyncs(pair.b()) - syncs_before;
}

// ... and so does an async link's with max_lag, whose writers wait for the
// downstream's durable acknowledgements too (the lag is measured up to
// them): a lazy sync would hold them up to a second each time.
TEST_CASE("Replication: an async downstream with max_lag syncs its journal "
          "for every flush",
          "[replication]") {
  const uint64_t syncs = PromptSyncsForFlushedWrites({{"max_lag", "1s"}});
  INFO("journal syncs on b for " << kFlushedWrites << " flushed writes: " << syncs);
  // Flushed groups that reach b while it syncs share the next sync.
  CHECK(syncs > static_cast<uint64_t>(kFlushedWrites) / 4);
}

// ... and so does an async link's with a disk queue, which keeps each group
// whole in memory until the downstream's durable acknowledgement (bounded
// by max_queue): a sync about once a second would let a second of writes
// pile up there and overflow it.
TEST_CASE("Replication: an async downstream fed from a disk queue syncs its "
          "journal for every flush",
          "[replication]") {
  const uint64_t syncs = PromptSyncsForFlushedWrites({{"queue", "disk"}});
  INFO("journal syncs on b for " << kFlushedWrites << " flushed writes: " << syncs);
  CHECK(syncs > static_cast<uint64_t>(kFlushedWrites) / 4);
}

// Goal: a downstream added to a volume that already holds data gets a slot
// with every region dirty (initial_sync "full") and receives the data by
// resync, then streams.
TEST_CASE("Replication: a new downstream receives data written before it "
          "existed by a full resync",
          "[replication]") {
  testutil::PairOptions options;
  options.initial_sync = "full";
  options.volumes = {{"data", 16 * kMiB}};
  SitePair pair(options);
  // Site a first runs without any downstream and takes writes.
  json link = pair.a().config()["groups"][0]["downstream"];
  pair.a().config()["groups"][0].erase("downstream");
  RequireStarted(pair.a());
  uint64_t written = 0;
  {
    NbdHandle h = RequireConnect(pair.a(), "data");
    for (uint64_t k = 0; k < 6; ++k) {
      const uint64_t offset = k * 2 * kMiB + k * 12 * kKiB;
      const uint64_t length = 128 * kKiB * (k + 1);
      auto data = Pattern(length, 40 + k);
      REQUIRE(testutil::Pwrite(h.get(), data, offset) == 0);
      written += length;
    }
    REQUIRE(testutil::Flush(h.get()) == 0);
  }
  REQUIRE(pair.a().Stop() == 0);
  // Now site b exists, and a is configured with it.
  pair.a().config()["groups"][0]["downstream"] = link;
  RequireStarted(pair);
  RequireCaughtUp(pair, kCatchUpTimeout);

  CHECK(pair.CompareVolumes() == "");
  auto status = testutil::LinkStatus(pair.a(), "g", "b");
  REQUIRE(status.has_value());
  CHECK(status->value("state", "") == "replicating");
  // Whole regions holding data went over as resync data.
  CHECK(status->value("resync_bytes_sent", uint64_t{0}) >= written);
  const std::string log = pair.a().ReadLog();
  INFO("site a log:\n" << log);
  const size_t resyncing = log.find("link to b: connecting -> resyncing");
  REQUIRE(resyncing != std::string::npos);
  CHECK(log.find("link to b: resyncing -> replicating", resyncing) !=
        std::string::npos);
}

// Goal: Invariants 1, 2 and 5 across a downstream crash. While b is gone
// the link logs to the scoreboard and writes keep succeeding; after b
// returns, the resync sends only what was marked, and the volumes match.
TEST_CASE("Replication: after a downstream outage, resync sends only the "
          "dirty regions and the volumes match",
          "[replication]") {
  testutil::PairOptions options;
  options.volumes = {{"data", 32 * kMiB}};
  SitePair pair(options);
  RequireStarted(pair);
  RequireCaughtUp(pair, kCatchUpTimeout);
  Workload work(pair.a(), options.volumes, /*seed=*/21);
  // Some data first, fully replicated and acknowledged.
  REQUIRE(work.Write(0, 0, 256 * kKiB) == 0);
  work.FlushAll();
  RequireCaughtUp(pair, kCatchUpTimeout);
  REQUIRE(testutil::WaitUntil(
      [&] {
        auto d = testutil::DirtyFor(pair.a(), "g", "b");
        return d && d->regions == 0;
      },
      kStateTimeout));

  REQUIRE(pair.b().Signal(SIGKILL));
  REQUIRE(pair.b().WaitForExit(std::chrono::seconds(5)).has_value());
  CHECK(testutil::WaitUntil([&] { return LinkState(pair.a()) == "logging"; },
                            kStateTimeout));

  std::mt19937_64 rng(22);
  int ranges = 0;
  for (int i = 0; i < 10; ++i) {
    const uint64_t length =
        std::uniform_int_distribution<uint64_t>(1, 50)(rng) * 4 * kKiB;
    const uint64_t offset =
        std::uniform_int_distribution<uint64_t>(0, (32 * kMiB - length) / 512)(rng) * 512;
    INFO("write " << i << " at " << offset << "+" << length);
    REQUIRE(work.Write(0, offset, length) == 0);
    ++ranges;
  }
  work.FlushAll();
  CHECK(LinkState(pair.a()) == "logging");
  auto dirty = testutil::DirtyFor(pair.a(), "g", "b");
  REQUIRE(dirty.has_value());
  CHECK(dirty->regions > 0);
  CHECK(dirty->bytes > 0);
  auto before = testutil::LinkStatus(pair.a(), "g", "b");
  REQUIRE(before.has_value());
  const uint64_t resync_before = before->value("resync_bytes_sent", uint64_t{0});

  RequireStarted(pair.b());
  RequireCaughtUp(pair, kCatchUpTimeout);
  CHECK(pair.CompareVolumes() == "");
  auto after = testutil::LinkStatus(pair.a(), "g", "b");
  REQUIRE(after.has_value());
  const uint64_t resync_bytes =
      after->value("resync_bytes_sent", uint64_t{0}) - resync_before;
  INFO("dirty before restart: " << dirty->bytes << " bytes in "
                                << dirty->regions << " regions; resync sent "
                                << resync_bytes);
  CHECK(resync_bytes > 0);
  CHECK(resync_bytes <= dirty->bytes + ranges * kRegionBytes);
  CHECK(pair.a().ReadLog().find("link to b: logging -> resyncing") !=
        std::string::npos);
}

// A pair where b differs from a as `mismatch` makes it (applied to the
// configs before start), with b's backing files pre-filled: a's link must
// end up logging with every one of `expect` in last_error, b must report
// its upstream "refused" with the same, and b's files must not change.
void ExpectHelloRefused(const std::function<void(SitePair&)>& mismatch,
                        const std::vector<std::string>& expect) {
  SitePair pair;
  mismatch(pair);
  std::vector<fs::path> b_files;
  uint64_t seed = 70;
  for (const auto& v : pair.b().config()["groups"][0]["volumes"]) {
    fs::path path = v.at("path").get<std::string>();
    fs::create_directories(path.parent_path());
    FillFile(path, v.at("size").get<uint64_t>(), ++seed);
    b_files.push_back(path);
  }
  std::vector<uint64_t> sums;
  for (const auto& f : b_files) sums.push_back(testutil::FileChecksum(f));

  RequireStarted(pair);
  {
    NbdHandle h = RequireConnect(pair.a(), "data");
    auto data = Pattern(256 * kKiB, 3);
    REQUIRE(testutil::Pwrite(h.get(), data, 64 * kKiB) == 0);
    REQUIRE(testutil::Flush(h.get()) == 0);
  }
  auto has_all = [&](const std::string& text) {
    for (const auto& e : expect) {
      if (text.find(e) == std::string::npos) return false;
    }
    return true;
  };
  std::optional<json> link, up;
  bool a_reports = testutil::WaitUntil(
      [&] {
        link = testutil::LinkStatus(pair.a(), "g", "b");
        return link && link->value("state", "") == "logging" &&
               has_all(link->value("last_error", ""));
      },
      kStateTimeout);
  bool b_reports = testutil::WaitUntil(
      [&] {
        up = testutil::UpstreamStatus(pair.b(), "g");
        return up && up->value("state", "") == "refused" &&
               has_all(up->value("last_error", ""));
      },
      kStateTimeout);
  INFO("a's link: " << (link ? link->dump() : "none"));
  INFO("b's upstream: " << (up ? up->dump() : "none"));
  CHECK(a_reports);
  CHECK(b_reports);
  if (up) {
    CHECK(up->value("groups_received", uint64_t{1}) == 0);
    CHECK(up->value("applied_group_seq", uint64_t{1}) == 0);
  }
  CHECK(pair.b().Stop() == 0);
  for (size_t i = 0; i < b_files.size(); ++i) {
    INFO("file " << b_files[i]);
    CHECK(testutil::FileChecksum(b_files[i]) == sums[i]);
  }
}

TEST_CASE("Replication: a downstream whose volume size differs refuses the "
          "HELLO and stays unchanged",
          "[replication]") {
  ExpectHelloRefused(
      [](SitePair& pair) {
        pair.b().config()["groups"][0]["volumes"][0]["size"] = 8 * kMiB;
      },
      {"data", "8388608", "16777216", "site a", "site b"});
}

TEST_CASE("Replication: a downstream whose region_size differs refuses the "
          "HELLO and stays unchanged",
          "[replication]") {
  ExpectHelloRefused(
      [](SitePair& pair) {
        pair.b().config()["groups"][0]["region_size"] = "128KiB";
      },
      {"region_size", "131072", "65536", "site a", "site b"});
}

TEST_CASE("Replication: a downstream whose volume names differ refuses the "
          "HELLO and stays unchanged",
          "[replication]") {
  ExpectHelloRefused(
      [](SitePair& pair) {
        auto& v = pair.b().config()["groups"][0]["volumes"][0];
        v["name"] = "other";
        v["path"] = (pair.b().dir() / "other.img").string();
      },
      {"\"other\"", "\"data\"", "site a", "site b"});
}

TEST_CASE("Replication: a site that is not the configured upstream is "
          "refused with a message naming both sites",
          "[replication]") {
  ExpectHelloRefused(
      [](SitePair& pair) {
        pair.b().config()["groups"][0]["upstream"]["site"] = "c";
      },
      {"site a", "site b", "upstream"});
}

// A primary with one sync link to a port where nothing listens.
json SyncLinkToNowhere(const fs::path& dir) {
  json config = testutil::GroupSiteConfig(dir, "a", "primary",
                                          {{"data", 16 * kMiB}});
  testutil::AddDownstream(config, "b", testutil::PickFreeTcpPort(), "sync");
  return config;
}

// Goal: on_sync_failure "logging" (the default) lets writes go on while the
// sync downstream is unreachable; they are marked for resync instead.
TEST_CASE("Replication: with on_sync_failure logging, writes succeed while "
          "the sync downstream is unreachable",
          "[replication]") {
  testutil::TempDir dir("blockrelay-rep");
  TestDaemon a(dir.path(), SyncLinkToNowhere(dir.path()));
  RequireStarted(a);
  REQUIRE(testutil::WaitUntil([&] { return LinkState(a) == "logging"; },
                              kStateTimeout));
  NbdHandle h = RequireConnect(a, "data");
  const auto start = Clock::now();
  for (uint64_t k = 0; k < 8; ++k) {
    auto data = Pattern(64 * kKiB, k);
    REQUIRE(testutil::Pwrite(h.get(), data, k * kMiB) == 0);
    REQUIRE(testutil::Pwrite(h.get(), data, k * kMiB + 64 * kKiB,
                             LIBNBD_CMD_FLAG_FUA) == 0);
  }
  REQUIRE(testutil::Flush(h.get()) == 0);
  CHECK(Clock::now() - start < std::chrono::seconds(2));
  auto dirty = testutil::DirtyFor(a, "g", "b");
  REQUIRE(dirty.has_value());
  CHECK(dirty->regions > 0);
}

// Goal: on_sync_failure "block" fails a write with EIO once sync_timeout
// passes without the sync downstream, and the site keeps serving.
TEST_CASE("Replication: with on_sync_failure block, a write fails with EIO "
          "after sync_timeout and the site keeps serving",
          "[replication]") {
  testutil::TempDir dir("blockrelay-rep");
  json config = SyncLinkToNowhere(dir.path());
  config["groups"][0]["on_sync_failure"] = "block";
  config["groups"][0]["sync_timeout"] = "1s";
  TestDaemon a(dir.path(), config);
  RequireStarted(a);
  REQUIRE(testutil::WaitUntil([&] { return LinkState(a) == "logging"; },
                              kStateTimeout));
  NbdHandle h = RequireConnect(a, "data");
  auto data = Pattern(64 * kKiB, 1);
  const auto start = Clock::now();
  const int rc = testutil::Pwrite(h.get(), data, 0);
  const double seconds =
      std::chrono::duration<double>(Clock::now() - start).count();
  INFO("write took " << seconds << " s; errno " << rc << " ("
                     << std::strerror(rc) << ")");
  CHECK(rc == EIO);
  CHECK(seconds >= 0.9);
  CHECK(seconds <= 5.0);
  // Still serving: the same connection reads, the control socket answers.
  std::vector<std::byte> back(4 * kKiB);
  CHECK(testutil::Pread(h.get(), back, 0) == 0);
  CHECK(a.running());
  auto status = testutil::StatusOf(a);
  REQUIRE(status.has_value());
  CHECK(LinkState(a) == "logging");
}

// Goal: journal reuse (docs/replication.md, "Journal reuse"). The
// downstream keeps a retired journal as the spare and recycles it at the
// next rotation; killed right after writing over the same bytes into the
// recycled file, whose older records of the same size still follow the new
// ones, it replays only the new ones.
TEST_CASE("Replication: the downstream reuses its journal file, and a crash "
          "after the reuse replays no record from before it",
          "[replication]") {
  SitePair pair;
  RequireStarted(pair);
  RequireCaughtUp(pair, kCatchUpTimeout);
  const std::filesystem::path data_b = pair.b().dir() / "data";
  const std::filesystem::path journal = data_b / "journal-g.log";
  const std::filesystem::path spare = data_b / "journal-g.log.spare";
  auto inode = [](const std::filesystem::path& p) -> ino_t {
    struct stat st;
    return ::stat(p.c_str(), &st) == 0 ? st.st_ino : 0;
  };
  const ino_t first = inode(journal);
  REQUIRE(first != 0);

  NbdHandle h = RequireConnect(pair.a(), "data");
  // Eight 64 KiB writes over the same bytes, one group each (FUA closes
  // the group), so every record has the same size.
  auto write_round = [&](uint64_t seed) {
    for (uint64_t i = 0; i < 8; ++i) {
      auto data = Pattern(64 * kKiB, seed * 100 + i);
      REQUIRE(testutil::Pwrite(h.get(), data, (i % 2) * 64 * kKiB, LIBNBD_CMD_FLAG_FUA) == 0);
    }
    RequireCaughtUp(pair, kCatchUpTimeout);
  };
  write_round(1);
  // Idle for a second: the journal is retired, and kept as the spare once
  // the volumes are flushed.
  REQUIRE(testutil::WaitUntil([&] { return inode(spare) == first; }, std::chrono::seconds(15)));
  write_round(2);
  REQUIRE(testutil::WaitUntil([&] { return inode(journal) == first; },
                              std::chrono::seconds(15)));
  // The first file is the journal again. Fewer records than it holds from
  // round 1: the old ones follow the new ones.
  for (uint64_t i = 0; i < 3; ++i) {
    auto data = Pattern(64 * kKiB, 300 + i);
    REQUIRE(testutil::Pwrite(h.get(), data, (i % 2) * 64 * kKiB, LIBNBD_CMD_FLAG_FUA) == 0);
  }
  RequireCaughtUp(pair, kCatchUpTimeout);
  testutil::RequireKilled(pair.b());
  RequireStarted(pair);
  RequireCaughtUp(pair, kCatchUpTimeout);
  INFO("site b log:\n" << pair.b().ReadLog());
  CHECK(pair.CompareVolumes() == "");
}

}  // namespace
}  // namespace blockrelay
