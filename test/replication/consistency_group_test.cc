// Write order across the volumes of one consistency group (DESIGN.md,
// Invariant 3), with real daemons: a client writes a WAL record and only
// after it completed the table record that depends on it, the way a
// database does. Whatever moment the downstream dies at, once it has
// replayed its journal it must never hold a table record whose WAL record
// it lacks.
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "testutil/daemon.h"
#include "testutil/nbd_client.h"
#include "testutil/sites.h"

namespace blockrelay {
namespace {

namespace fs = std::filesystem;
using testutil::NbdHandle;
using testutil::RequireConnect;
using testutil::RequireStarted;
using testutil::SitePair;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kRecordBytes = 4 * kKiB;
constexpr uint64_t kWalBytes = 1 * kMiB;     // kWalSlots records, reused
constexpr uint64_t kTableBytes = 16 * kMiB;  // kTableSlots records
constexpr uint64_t kWalSlots = kWalBytes / kRecordBytes;
constexpr uint64_t kTableSlots = kTableBytes / kRecordBytes;
constexpr uint64_t kWalMagic = 0x57414c5245434f52ull;    // "WALRECOR"
constexpr uint64_t kTableMagic = 0x5441424c45524543ull;  // "TABLEREC"

uint64_t Fnv(const std::byte* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) {
    h ^= static_cast<uint8_t>(p[i]);
    h *= 0x100000001b3ull;
  }
  return h;
}

// One 4 KiB record: u64 magic | u64 id | filler derived from both | u64
// FNV-1a of everything before it (host byte order; this machine only).
std::vector<std::byte> MakeRecord(uint64_t magic, uint64_t id) {
  std::vector<std::byte> r = testutil::Pattern(kRecordBytes, magic ^ (id * 31));
  std::memcpy(r.data(), &magic, 8);
  std::memcpy(r.data() + 8, &id, 8);
  const uint64_t sum = Fnv(r.data(), kRecordBytes - 8);
  std::memcpy(r.data() + kRecordBytes - 8, &sum, 8);
  return r;
}

struct Parsed {
  bool empty = false;    // all zero: never written
  bool corrupt = false;  // neither empty nor a whole record
  uint64_t id = 0;
};

Parsed ParseRecord(const char* p, uint64_t magic) {
  Parsed out;
  bool zero = true;
  for (size_t i = 0; i < kRecordBytes && zero; ++i) zero = p[i] == 0;
  if (zero) {
    out.empty = true;
    return out;
  }
  uint64_t m, id, sum;
  std::memcpy(&m, p, 8);
  std::memcpy(&id, p + 8, 8);
  std::memcpy(&sum, p + kRecordBytes - 8, 8);
  if (m != magic ||
      sum != Fnv(reinterpret_cast<const std::byte*>(p), kRecordBytes - 8)) {
    out.corrupt = true;
    return out;
  }
  out.id = id;
  return out;
}

struct Verdict {
  uint64_t table_records = 0;  // table records present
  uint64_t wal_records = 0;
  uint64_t corrupt = 0;        // blocks that are neither empty nor records
  uint64_t violations = 0;     // table records whose WAL record is missing
  std::string first_violation;
};

// For every table record i in `table`, the WAL slot i % kWalSlots of `wal`
// must hold record i or a later one (a later record reuses the slot).
Verdict CheckWriteOrder(const std::string& wal, const std::string& table) {
  Verdict v;
  std::vector<std::optional<uint64_t>> wal_ids(kWalSlots);
  for (uint64_t s = 0; s < kWalSlots; ++s) {
    if ((s + 1) * kRecordBytes > wal.size()) break;
    Parsed p = ParseRecord(wal.data() + s * kRecordBytes, kWalMagic);
    if (p.corrupt || (!p.empty && p.id % kWalSlots != s)) {
      ++v.corrupt;
    } else if (!p.empty) {
      wal_ids[s] = p.id;
      ++v.wal_records;
    }
  }
  for (uint64_t s = 0; s < kTableSlots; ++s) {
    if ((s + 1) * kRecordBytes > table.size()) break;
    Parsed p = ParseRecord(table.data() + s * kRecordBytes, kTableMagic);
    if (p.empty) continue;
    if (p.corrupt || p.id % kTableSlots != s) {
      ++v.corrupt;
      continue;
    }
    ++v.table_records;
    const auto& w = wal_ids[p.id % kWalSlots];
    if (!w || *w < p.id) {
      if (v.violations++ == 0) {
        v.first_violation =
            "table record " + std::to_string(p.id) + " is present but WAL slot " +
            std::to_string(p.id % kWalSlots) + " holds " +
            (w ? "record " + std::to_string(*w) : std::string("nothing"));
      }
    }
  }
  return v;
}

// The client: WAL record i, and once that write completed, table record i.
// Runs on its own thread until stopped or a write fails (no Catch macros
// there; the main thread checks `failed_errno`).
class Client {
 public:
  Client(NbdHandle wal, NbdHandle table)
      : wal_(std::move(wal)), table_(std::move(table)),
        thread_([this] { Run(); }) {}
  ~Client() { Stop(); }

  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  uint64_t records() const { return records_.load(); }
  int failed_errno() const { return failed_errno_.load(); }

 private:
  void Run() {
    for (uint64_t i = 1; !stop_; ++i) {
      auto w = MakeRecord(kWalMagic, i);
      int rc = testutil::Pwrite(wal_.get(), w, (i % kWalSlots) * kRecordBytes);
      if (rc == 0) {
        auto t = MakeRecord(kTableMagic, i);
        rc = testutil::Pwrite(table_.get(), t, (i % kTableSlots) * kRecordBytes);
      }
      if (rc != 0) {
        failed_errno_ = rc;
        return;
      }
      records_ = i;
    }
  }

  NbdHandle wal_, table_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> records_{0};
  std::atomic<int> failed_errno_{0};
  std::thread thread_;
};

testutil::PairOptions WalTablePair() {
  testutil::PairOptions options;
  options.volumes = {{"wal", kWalBytes}, {"table", kTableBytes}};
  options.initial_sync = "none";  // a fresh blank pair: nothing to resync
  return options;
}

uint64_t TestSeed() {
  if (const char* env = std::getenv("BLOCKRELAY_TEST_SEED")) {
    return std::strtoull(env, nullptr, 10);
  }
  return 20240611;
}

// The checker itself, so that the daemon tests below cannot pass vacuously.
TEST_CASE("Consistency group: the write-order check flags a table record "
          "whose WAL record is missing",
          "[replication]") {
  std::string wal(kWalBytes, '\0'), table(kTableBytes, '\0');
  auto put = [](std::string& file, uint64_t magic, uint64_t id, uint64_t slots) {
    auto r = MakeRecord(magic, id);
    std::memcpy(file.data() + (id % slots) * kRecordBytes, r.data(), r.size());
  };
  put(wal, kWalMagic, 5, kWalSlots);
  put(table, kTableMagic, 5, kTableSlots);
  put(wal, kWalMagic, 6 + kWalSlots, kWalSlots);  // reused slot: later record
  put(table, kTableMagic, 6, kTableSlots);
  Verdict ok = CheckWriteOrder(wal, table);
  CHECK(ok.table_records == 2);
  CHECK(ok.violations == 0);
  CHECK(ok.corrupt == 0);

  put(table, kTableMagic, 7, kTableSlots);  // WAL record 7 never written
  Verdict missing = CheckWriteOrder(wal, table);
  CHECK(missing.violations == 1);
  CHECK_THAT(missing.first_violation, Catch::Matchers::Contains("record 7"));

  std::string stale = wal;
  put(stale, kWalMagic, 5, kWalSlots);
  put(table, kTableMagic, 5 + kWalSlots, kTableSlots);  // WAL slot holds only 5
  CHECK(CheckWriteOrder(stale, table).violations == 2);

  table[8 * kRecordBytes + 100] = 1;  // neither empty nor a record
  CHECK(CheckWriteOrder(wal, table).corrupt == 1);
}

// Goal: Invariant 3 across the volumes of a group, at a downstream crash.
// Each iteration uses a fresh pair: kill -9 b after a random number of
// records, stop a so nothing more arrives, start b alone (it replays its
// journal while it opens) and stop it, then read b's backing files.
TEST_CASE("Consistency group: a killed downstream never holds a table "
          "record without the WAL record written before it",
          "[replication]") {
  const uint64_t seed = TestSeed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  uint64_t table_records_seen = 0;
  for (int iteration = 0; iteration < 4; ++iteration) {
    CAPTURE(iteration);
    const uint64_t kill_after =
        std::uniform_int_distribution<uint64_t>(50, 3000)(rng);
    CAPTURE(kill_after);
    SitePair pair(WalTablePair());
    RequireStarted(pair);
    REQUIRE(testutil::WaitCaughtUp(pair.a(), "g", "b", std::chrono::seconds(10)));
    uint64_t written = 0;
    {
      Client client(RequireConnect(pair.a(), "wal"), RequireConnect(pair.a(), "table"));
      REQUIRE(testutil::WaitUntil(
          [&] { return client.records() >= kill_after || client.failed_errno(); },
          std::chrono::seconds(20)));
      REQUIRE(client.failed_errno() == 0);
      REQUIRE(pair.b().Signal(SIGKILL));
      REQUIRE(pair.b().WaitForExit(std::chrono::seconds(5)).has_value());
      client.Stop();
      // Writes keep succeeding on a with its downstream gone.
      CHECK(client.failed_errno() == 0);
      written = client.records();
    }
    INFO("records written on a: " << written);
    CHECK(pair.a().Stop() == 0);
    RequireStarted(pair.b());  // replays b's journal before it answers
    CHECK(pair.b().Stop() == 0);

    Verdict v = CheckWriteOrder(testutil::ReadWholeFile(pair.b_volume("wal")),
                                testutil::ReadWholeFile(pair.b_volume("table")));
    INFO("on b: " << v.table_records << " table record(s), " << v.wal_records
                  << " WAL record(s); " << v.first_violation);
    INFO("site b log:\n" << pair.b().ReadLog());
    CHECK(v.corrupt == 0);
    CHECK(v.violations == 0);
    table_records_seen += v.table_records;
  }
  // The iterations must have replicated something, or they proved nothing.
  CHECK(table_records_seen > 0);
}

// Goal: a downstream that stops answering for a moment (SIGSTOP) and comes
// back catches up without gaps: both sites end byte-identical.
TEST_CASE("Consistency group: a paused downstream catches up to identical "
          "volumes",
          "[replication]") {
  SitePair pair(WalTablePair());
  RequireStarted(pair);
  REQUIRE(testutil::WaitCaughtUp(pair.a(), "g", "b", std::chrono::seconds(10)));
  {
    Client client(RequireConnect(pair.a(), "wal"), RequireConnect(pair.a(), "table"));
    auto reach = [&](uint64_t n) {
      return testutil::WaitUntil(
          [&] { return client.records() >= n || client.failed_errno(); },
          std::chrono::seconds(20));
    };
    REQUIRE(reach(500));
    REQUIRE(pair.b().Signal(SIGSTOP));
    // Paused while the client writes another few hundred records.
    const bool wrote = reach(client.records() + 400);
    REQUIRE(pair.b().Signal(SIGCONT));
    REQUIRE(wrote);
    REQUIRE(reach(client.records() + 400));
    client.Stop();
    REQUIRE(client.failed_errno() == 0);
  }
  nlohmann::json last;
  bool caught_up = testutil::WaitCaughtUp(pair.a(), "g", "b",
                                          std::chrono::seconds(20), &last);
  INFO("last wait reply: " << last.dump());
  INFO("site a log:\n" << pair.a().ReadLog());
  REQUIRE(caught_up);
  CHECK(pair.CompareVolumes() == "");
  Verdict v = CheckWriteOrder(testutil::ReadWholeFile(pair.b_volume("wal")),
                              testutil::ReadWholeFile(pair.b_volume("table")));
  CHECK(v.corrupt == 0);
  CHECK(v.violations == 0);
  CHECK(v.table_records > 0);
}

}  // namespace
}  // namespace blockrelay
