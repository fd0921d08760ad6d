// GroupJournal: recovery of WRITE_GROUP frames, header slots, torn tails and
// crashes (in the style of leveldb db/log_test.cc and
// db/fault_injection_test.cc).

#include <algorithm>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <xxhash.h>

#include "blockrelay/io/mem_env.h"
#include "replication/journal.h"
#include "replication/protocol.h"
#include "testutil/fault_injection_env.h"
#include "testutil/power_switch.h"

namespace blockrelay::replication {
namespace {

using testutil::FaultInjectionEnv;
using testutil::FaultOp;
using testutil::PowerSwitch;

constexpr char kDir[] = "/data";
constexpr char kPath[] = "/data/journal-g.log";
constexpr uint64_t kSlotBytes = 512;

// One WRITE_GROUP frame: group `seq`, one write of `data_bytes` bytes whose
// content depends on seq.
Bytes MakeFrame(uint64_t seq, size_t data_bytes = 100) {
  Bytes data(data_bytes);
  for (size_t i = 0; i < data_bytes; ++i) data[i] = std::byte((seq * 131 + i) & 0xff);
  WriteGroup g;
  g.link_seq = seq;
  g.group_seq = seq;
  g.flags = kGroupDurable;
  g.ops.push_back(Op{OpType::kWrite, 0, seq * 4096, data_bytes, data});
  Bytes out;
  EncodeWriteGroup(g, out);
  return out;
}

// Each record is the header's epoch and a tag (8 bytes each), then the
// frame.
constexpr uint64_t kRecordPrefix = 16;

uint64_t RecordBytes(const Bytes& frame) { return kRecordPrefix + frame.size(); }

uint64_t TotalBytes(const std::vector<Bytes>& frames) {
  uint64_t n = 0;
  for (const Bytes& f : frames) n += RecordBytes(f);
  return n;
}

// The raw journal file, for corrupting it under the journal's feet.
struct JournalFixture {
  JournalFixture() { REQUIRE(mem.CreateDirs(kDir).ok()); }

  std::unique_ptr<GroupJournal> OpenOk(io::Env& env, GroupJournal::Recovered* r) {
    Result<std::unique_ptr<GroupJournal>> j = GroupJournal::Open(env, kPath, r);
    INFO((j.ok() ? std::string() : j.status().ToString()));
    REQUIRE(j.ok());
    return std::move(j).value();
  }
  std::unique_ptr<GroupJournal> OpenOk(GroupJournal::Recovered* r) { return OpenOk(mem, r); }
  Status OpenError() {
    GroupJournal::Recovered r;
    Result<std::unique_ptr<GroupJournal>> j = GroupJournal::Open(mem, kPath, &r);
    REQUIRE_FALSE(j.ok());
    return j.status();
  }
  // A journal holding `frames`, appended and synced.
  void WriteFrames(const std::vector<Bytes>& frames) {
    GroupJournal::Recovered r;
    auto j = OpenOk(&r);
    for (const Bytes& f : frames) REQUIRE(j->Append(f).ok());
    REQUIRE(j->Sync().ok());
  }

  std::unique_ptr<io::RandomRWFile> Raw() {
    auto f = mem.OpenFile(kPath, io::OpenMode::kReadWrite);
    REQUIRE(f.ok());
    return std::move(*f);
  }
  uint64_t FileSize() {
    Result<uint64_t> size = Raw()->Size();
    REQUIRE(size.ok());
    return *size;
  }
  void ShrinkSize(uint64_t bytes) { REQUIRE(Raw()->Truncate(FileSize() - bytes).ok()); }
  void IncrementByte(uint64_t offset) {
    auto f = Raw();
    std::byte b[1];
    REQUIRE(f->PRead(offset, b).ok());
    b[0] = std::byte(std::to_integer<uint8_t>(b[0]) + 1);
    REQUIRE(f->PWrite(offset, b).ok());
  }
  void WriteAt(uint64_t offset, std::span<const std::byte> bytes) {
    REQUIRE(Raw()->PWrite(offset, bytes).ok());
  }

  io::MemEnv mem;
};

// A version 1 header slot (no epoch), or one of an unknown version with
// that layout, for tests that forge one.
Bytes ForgeSlot(uint16_t version, uint64_t counter, uint64_t applied) {
  Bytes slot(kSlotBytes);
  auto put = [&](size_t off, uint64_t v, size_t n) {
    for (size_t i = 0; i < n; ++i) slot[off + i] = std::byte(v >> (8 * i));
  };
  put(0, 0x484a5242, 4);  // "BRJH"
  put(4, version, 2);
  put(8, counter, 8);
  put(16, applied, 8);
  put(24, XXH3_64bits(slot.data(), 24), 8);
  return slot;
}

TEST_CASE("GroupJournal: a new journal recovers nothing", "[replication][journal]") {
  JournalFixture fx;
  GroupJournal::Recovered r;
  r.applied_group_seq = 99;  // overwritten
  auto j = fx.OpenOk(&r);
  CHECK(r.applied_group_seq == 0);
  CHECK(r.frames.empty());
  CHECK(r.torn_tail_bytes == 0);
  CHECK(j->log_bytes() == 0);
  CHECK(j->applied_group_seq() == 0);
  CHECK(j->path() == kPath);
  CHECK(fx.FileSize() == GroupJournal::kLogStart);
  CHECK_FALSE(fx.mem.FileExists(std::string(kPath) + ".tmp"));

  j.reset();
  GroupJournal::Recovered again;
  fx.OpenOk(&again);
  CHECK(again.applied_group_seq == 0);
  CHECK(again.frames.empty());
}

TEST_CASE("GroupJournal: appended and synced frames come back in order after reopen",
          "[replication][journal]") {
  JournalFixture fx;
  std::vector<Bytes> frames = {MakeFrame(1, 10), MakeFrame(2, 5000), MakeFrame(3, 0),
                               MakeFrame(4, 700)};
  {
    GroupJournal::Recovered r;
    auto j = fx.OpenOk(&r);
    for (const Bytes& f : frames) REQUIRE(j->Append(f).ok());
    CHECK(j->log_bytes() == TotalBytes(frames));
    REQUIRE(j->Sync().ok());
  }
  GroupJournal::Recovered r;
  auto j = fx.OpenOk(&r);
  CHECK(r.frames == frames);
  CHECK(r.torn_tail_bytes == 0);
  CHECK(j->log_bytes() == TotalBytes(frames));
}

TEST_CASE("GroupJournal: frames appended after a reopen follow the recovered ones",
          "[replication][journal]") {
  JournalFixture fx;
  fx.WriteFrames({MakeFrame(1), MakeFrame(2)});
  {
    GroupJournal::Recovered r;
    auto j = fx.OpenOk(&r);
    REQUIRE(j->Append(MakeFrame(3)).ok());
    REQUIRE(j->Sync().ok());
  }
  GroupJournal::Recovered r;
  fx.OpenOk(&r);
  CHECK(r.frames == std::vector<Bytes>{MakeFrame(1), MakeFrame(2), MakeFrame(3)});
}

TEST_CASE("GroupJournal: Reset drops the frames and keeps applied_group_seq across reopen",
          "[replication][journal]") {
  JournalFixture fx;
  {
    GroupJournal::Recovered r;
    auto j = fx.OpenOk(&r);
    REQUIRE(j->Append(MakeFrame(1)).ok());
    REQUIRE(j->Append(MakeFrame(2)).ok());
    REQUIRE(j->Sync().ok());
    const uint64_t size = fx.FileSize();
    REQUIRE(j->Reset(2).ok());
    CHECK(j->log_bytes() == 0);
    CHECK(j->applied_group_seq() == 2);
    CHECK(fx.FileSize() == size);  // kept for reuse
  }
  {
    GroupJournal::Recovered r;
    auto j = fx.OpenOk(&r);
    CHECK(r.applied_group_seq == 2);
    CHECK(r.frames.empty());
    CHECK(j->applied_group_seq() == 2);
    // The next Reset goes to the other slot; the newer one still wins.
    REQUIRE(j->Append(MakeFrame(3)).ok());
    REQUIRE(j->Sync().ok());
    REQUIRE(j->Reset(3).ok());
    REQUIRE(j->Append(MakeFrame(4)).ok());
    REQUIRE(j->Sync().ok());
  }
  GroupJournal::Recovered r;
  fx.OpenOk(&r);
  CHECK(r.applied_group_seq == 3);
  CHECK(r.frames == std::vector<Bytes>{MakeFrame(4)});
}

TEST_CASE("GroupJournal: a frame cut short is a torn tail", "[replication][journal]") {
  JournalFixture fx;
  std::vector<Bytes> frames = {MakeFrame(1, 300), MakeFrame(2, 300), MakeFrame(3, 300)};
  fx.WriteFrames(frames);
  uint64_t cut = 0;
  SECTION("inside the payload") { cut = 100; }
  SECTION("inside the frame header") { cut = frames[2].size() - 10; }
  SECTION("all but one byte of the frame") { cut = frames[2].size() - 1; }
  // Shorter than a record's prefix: a fragment, not a record of this epoch.
  uint64_t want_torn = RecordBytes(frames[2]) - cut;
  SECTION("all but one byte of the record") {
    cut = RecordBytes(frames[2]) - 1;
    want_torn = 0;
  }
  fx.ShrinkSize(cut);
  const uint64_t good_end =
      GroupJournal::kLogStart + RecordBytes(frames[0]) + RecordBytes(frames[1]);
  {
    GroupJournal::Recovered r;
    auto j = fx.OpenOk(&r);
    CHECK(r.frames == std::vector<Bytes>{frames[0], frames[1]});
    CHECK(r.torn_tail_bytes == want_torn);
    CHECK(fx.FileSize() == good_end);  // cut off on open
    CHECK(j->log_bytes() == good_end - GroupJournal::kLogStart);
    // Usable: the next frame goes right after the last good one.
    REQUIRE(j->Append(MakeFrame(4)).ok());
    REQUIRE(j->Sync().ok());
  }
  GroupJournal::Recovered r;
  fx.OpenOk(&r);
  CHECK(r.frames == std::vector<Bytes>{frames[0], frames[1], MakeFrame(4)});
  CHECK(r.torn_tail_bytes == 0);
}

TEST_CASE("GroupJournal: a damaged byte in the last frame makes it a torn tail",
          "[replication][journal]") {
  JournalFixture fx;
  std::vector<Bytes> frames = {MakeFrame(1), MakeFrame(2), MakeFrame(3)};
  fx.WriteFrames(frames);
  const uint64_t last =
      GroupJournal::kLogStart + RecordBytes(frames[0]) + RecordBytes(frames[1]);
  fx.IncrementByte(last + kRecordPrefix + kFrameHeaderBytes + 40);  // payload
  {
    GroupJournal::Recovered r;
    auto j = fx.OpenOk(&r);
    CHECK(r.frames == std::vector<Bytes>{frames[0], frames[1]});
    CHECK(r.torn_tail_bytes == RecordBytes(frames[2]));
    CHECK(fx.FileSize() == last);
    REQUIRE(j->Append(MakeFrame(4)).ok());
    REQUIRE(j->Sync().ok());
  }
  GroupJournal::Recovered r;
  fx.OpenOk(&r);
  CHECK(r.frames == std::vector<Bytes>{frames[0], frames[1], MakeFrame(4)});
}

// Goal: a whole, valid frame after a torn one is never returned; it was
// appended after the torn frame, so it was not durable either.
TEST_CASE("GroupJournal: nothing after a torn frame is returned", "[replication][journal]") {
  JournalFixture fx;
  std::vector<Bytes> frames = {MakeFrame(1), MakeFrame(2), MakeFrame(3)};
  fx.WriteFrames(frames);
  const uint64_t second = GroupJournal::kLogStart + RecordBytes(frames[0]);
  const uint64_t frame = second + kRecordPrefix;
  uint64_t torn = RecordBytes(frames[1]) + RecordBytes(frames[2]);
  SECTION("damaged payload") { fx.IncrementByte(frame + kFrameHeaderBytes + 5); }
  SECTION("damaged magic") { fx.IncrementByte(frame); }
  SECTION("damaged length") { fx.IncrementByte(frame + 9); }
  SECTION("damaged epoch: read as a record from before, not a torn one") {
    fx.IncrementByte(second + 2);
    torn = 0;
  }
  GroupJournal::Recovered r;
  fx.OpenOk(&r);
  CHECK(r.frames == std::vector<Bytes>{frames[0]});
  CHECK(r.torn_tail_bytes == torn);
  CHECK(fx.FileSize() == second);  // cut after the frames to replay
}

TEST_CASE("GroupJournal: a damaged header slot falls back to the other slot",
          "[replication][journal]") {
  JournalFixture fx;
  {
    GroupJournal::Recovered r;
    auto j = fx.OpenOk(&r);  // slot 0: counter 1, applied 0
    REQUIRE(j->Reset(5).ok());  // slot 1: counter 2, applied 5
  }
  fx.IncrementByte(kSlotBytes + 17);  // slot 1's applied_group_seq
  {
    GroupJournal::Recovered r;
    auto j = fx.OpenOk(&r);
    CHECK(r.applied_group_seq == 0);  // the older slot
    // The next update must overwrite the damaged slot, not the only good one.
    REQUIRE(j->Reset(11).ok());
  }
  {
    GroupJournal::Recovered r;
    fx.OpenOk(&r);
    CHECK(r.applied_group_seq == 11);
  }
  fx.IncrementByte(kSlotBytes + 17);
  GroupJournal::Recovered r;
  fx.OpenOk(&r);
  CHECK(r.applied_group_seq == 0);  // slot 0 survived both updates
}

TEST_CASE("GroupJournal: both header slots damaged is Corruption naming the file",
          "[replication][journal]") {
  JournalFixture fx;
  fx.WriteFrames({MakeFrame(1)});
  {
    GroupJournal::Recovered r;
    REQUIRE(fx.OpenOk(&r)->Reset(1).ok());  // both slots written
  }
  fx.IncrementByte(3);
  fx.IncrementByte(kSlotBytes + 30);  // slot 1's epoch
  Status s = fx.OpenError();
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Catch::Contains(kPath));
  CHECK_THAT(s.message(), Catch::Contains("journal header is unreadable"));
  CHECK_THAT(s.message(), Catch::Contains("full resync"));
  CHECK_THAT(s.message(), Catch::Contains("remove"));
}

TEST_CASE("GroupJournal: a file without a journal header is Corruption",
          "[replication][journal]") {
  JournalFixture fx;
  auto f = fx.mem.OpenFile(kPath, io::OpenMode::kCreate);
  REQUIRE(f.ok());
  REQUIRE((*f)->PWrite(0, MakeFrame(1)).ok());
  Status s = fx.OpenError();
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Catch::Contains(kPath));
}

TEST_CASE("GroupJournal: a header slot of another format version is refused",
          "[replication][journal]") {
  JournalFixture fx;
  fx.WriteFrames({});
  fx.WriteAt(kSlotBytes, ForgeSlot(3, 7, 3));
  Status s = fx.OpenError();
  CHECK(s.IsNotSupported());
  CHECK_THAT(s.message(), Catch::Contains(kPath));
  CHECK_THAT(s.message(), Catch::Contains("version 3"));
}

TEST_CASE("GroupJournal: a frame that is not a WRITE_GROUP is Corruption",
          "[replication][journal]") {
  JournalFixture fx;
  std::vector<Bytes> frames = {MakeFrame(1)};
  fx.WriteFrames(frames);
  Bytes ping;
  EncodePing(Ping{42}, ping);
  // A whole record of this epoch whose frame is a PING.
  const uint64_t second = GroupJournal::kLogStart + RecordBytes(frames[0]);
  Bytes prefix(kRecordPrefix);
  REQUIRE(fx.Raw()->PRead(GroupJournal::kLogStart, prefix).ok());  // the epoch
  uint64_t epoch = 0;
  std::memcpy(&epoch, prefix.data(), 8);  // little-endian, as on x86-64
  const uint64_t tag = XXH3_64bits_withSeed(ping.data(), kFrameHeaderBytes, epoch);
  std::memcpy(prefix.data() + 8, &tag, 8);
  fx.WriteAt(second, prefix);
  fx.WriteAt(second + kRecordPrefix, ping);
  Status s = fx.OpenError();
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Catch::Contains(kPath));
  CHECK_THAT(s.message(), Catch::Contains("PING"));
  CHECK_THAT(s.message(),
             Catch::Contains(fmt::format("offset {}", second + kRecordPrefix)));
}

TEST_CASE("GroupJournal: Append refuses what is not one WRITE_GROUP frame",
          "[replication][journal]") {
  JournalFixture fx;
  GroupJournal::Recovered r;
  auto j = fx.OpenOk(&r);
  Bytes ping;
  EncodePing(Ping{1}, ping);
  Bytes frame = MakeFrame(1);
  Bytes two = frame;
  two.insert(two.end(), frame.begin(), frame.end());
  Bytes cut(frame.begin(), frame.end() - 1);
  for (const Bytes& bad : {ping, two, cut, Bytes(10)}) {
    Status s = j->Append(bad);
    CHECK(s.IsInvalidArgument());
    CHECK_THAT(s.message(), Catch::Contains(kPath));
  }
  CHECK(j->log_bytes() == 0);
  CHECK(j->Append(frame).ok());  // not sticky
  CHECK(j->log_bytes() == RecordBytes(frame));
}

TEST_CASE("GroupJournal: a failed sync is sticky", "[replication][journal]") {
  JournalFixture fx;
  FaultInjectionEnv env(&fx.mem);
  GroupJournal::Recovered r;
  auto j = fx.OpenOk(env, &r);
  REQUIRE(j->Append(MakeFrame(1)).ok());
  env.FailNth(FaultOp::kSync, 1, EIO);
  Status s = j->Sync();
  REQUIRE(s.IsIOError());
  CHECK(s.errno_value() == EIO);
  CHECK_THAT(s.message(), Catch::StartsWith(fmt::format("journal {}: sync", kPath)));
  CHECK(j->Sync().message() == s.message());
  CHECK(j->Append(MakeFrame(2)).message() == s.message());
  CHECK(j->Reset(1).message() == s.message());
}

// What a randomized test expects of the journal, and the random operations
// that change it.
struct JournalModel {
  std::vector<Bytes> appended;  // since the last Reset
  size_t synced = 0;            // appended[0, synced) are durable
  uint64_t applied = 0;         // applied_group_seq of the last Reset
  uint64_t seq = 0;             // the last group appended

  // 1 to max_ops random appends (of frame_bytes(rng) bytes each), syncs and
  // resets on `j`.
  template <typename FrameBytes>
  void RandomOps(GroupJournal& j, std::mt19937_64& rng, int max_ops, FrameBytes frame_bytes) {
    const int ops = 1 + static_cast<int>(rng() % max_ops);
    for (int i = 0; i < ops; ++i) {
      switch (rng() % 8) {
        case 0:
          REQUIRE(j.Sync().ok());
          synced = appended.size();
          break;
        case 1:
          REQUIRE(j.Reset(seq).ok());
          appended.clear();
          synced = 0;
          applied = seq;
          break;
        default: {
          Bytes f = MakeFrame(++seq, frame_bytes(rng));
          REQUIRE(j.Append(f).ok());
          appended.push_back(std::move(f));
        }
      }
    }
  }
};

// Goal: the contract the receiver's acks rely on. Random appends, syncs and
// resets, then a power loss of each kind; the reopened journal holds every
// frame appended before the last Sync() and is a prefix of what was appended.
TEST_CASE("GroupJournal: power loss keeps every synced frame and returns a clean prefix",
          "[replication][journal]") {
  constexpr int kIterations = 300;
  for (int iteration = 0; iteration < kIterations; ++iteration) {
    const uint64_t seed = 1000 + iteration;
    INFO("seed " << seed);
    std::mt19937_64 rng(seed);
    JournalFixture fx;
    FaultInjectionEnv env(&fx.mem);
    JournalModel m;
    {
      GroupJournal::Recovered r;
      auto j = fx.OpenOk(env, &r);
      m.RandomOps(*j, rng, 20, [](std::mt19937_64& g) { return g() % 2000; });
    }
    int mode = static_cast<int>(rng() % 3);
    INFO("crash mode " << mode);
    if (mode == 0) env.DropUnsyncedWrites();
    if (mode == 1) env.DropRandomUnsyncedWrites(rng);
    if (mode == 2) env.TearUnsyncedWrites(512, rng);

    GroupJournal::Recovered r;
    auto j = fx.OpenOk(env, &r);
    CHECK(r.applied_group_seq == m.applied);
    REQUIRE(r.frames.size() >= m.synced);
    REQUIRE(r.frames.size() <= m.appended.size());
    for (size_t i = 0; i < r.frames.size(); ++i) REQUIRE(r.frames[i] == m.appended[i]);
    CHECK(j->log_bytes() == TotalBytes(r.frames));
    // Still usable after the cut.
    Bytes next = MakeFrame(++m.seq, 50);
    REQUIRE(j->Append(next).ok());
    REQUIRE(j->Sync().ok());
    j.reset();
    GroupJournal::Recovered again;
    fx.OpenOk(env, &again);
    r.frames.push_back(next);
    CHECK(again.frames == r.frames);
    CHECK(again.torn_tail_bytes == 0);
  }
}

// Goal: whichever operation inside Reset the power fails before, and
// whichever unsynced bytes survive, the journal opens (no Corruption) with
// the old applied_group_seq and the old frames, or the new one with no
// frames or with the old, already applied frames (replaying those is
// harmless).
TEST_CASE("GroupJournal: a crash inside Reset recovers the old state or the new one",
          "[replication][journal]") {
  const std::vector<Bytes> frames = {MakeFrame(4, 1000), MakeFrame(5, 3000)};
  const uint64_t old_seq = 3;
  const uint64_t new_seq = 5;
  bool saw_old = false, saw_new_empty = false;
  for (int64_t budget = 0; budget <= 6; ++budget) {
    for (int mode = 0; mode < 3; ++mode) {
      INFO("operations before the cut: " << budget << ", crash mode " << mode);
      JournalFixture fx;
      PowerSwitch power;
      FaultInjectionEnv env(&fx.mem, &power);
      std::mt19937_64 rng(budget * 3 + mode);
      {
        GroupJournal::Recovered r;
        auto j = fx.OpenOk(env, &r);
        REQUIRE(j->Reset(old_seq).ok());
        for (const Bytes& f : frames) REQUIRE(j->Append(f).ok());
        REQUIRE(j->Sync().ok());
        power.CutAfter(budget);
        REQUIRE(j->Reset(new_seq).ok());  // a dead process does not know
      }
      if (mode == 0) env.DropUnsyncedWrites();
      if (mode == 1) env.DropRandomUnsyncedWrites(rng);
      if (mode == 2) env.TearUnsyncedWrites(512, rng);
      power.Restore();

      GroupJournal::Recovered r;
      fx.OpenOk(env, &r);
      if (r.applied_group_seq == old_seq) {
        CHECK(r.frames == frames);
        saw_old = true;
      } else {
        REQUIRE(r.applied_group_seq == new_seq);
        CHECK((r.frames.empty() || r.frames == frames));
        saw_new_empty = saw_new_empty || r.frames.empty();
      }
    }
  }
  CHECK(saw_old);
  CHECK(saw_new_empty);
}

// Goal: a step inside Reset that fails, forced with errors: the new header
// is not written, or never becomes durable; after the crash the journal
// opens cleanly with the old state.
TEST_CASE("GroupJournal: a failed step inside Reset leaves a state that opens",
          "[replication][journal]") {
  const std::vector<Bytes> frames = {MakeFrame(4), MakeFrame(5)};
  JournalFixture fx;
  FaultInjectionEnv env(&fx.mem);
  {
    GroupJournal::Recovered r;
    auto j = fx.OpenOk(env, &r);
    REQUIRE(j->Reset(3).ok());
    for (const Bytes& f : frames) REQUIRE(j->Append(f).ok());
    REQUIRE(j->Sync().ok());
  }
  FaultOp op = FaultOp::kAny;
  uint64_t want_seq = 0;
  SECTION("header write fails") {
    op = FaultOp::kWrite;
    want_seq = 3;
  }
  SECTION("header sync fails") {
    op = FaultOp::kSync;
    want_seq = 3;
  }
  {
    GroupJournal::Recovered r;
    auto j = fx.OpenOk(env, &r);
    env.FailNth(op, 1, EIO);
    Status s = j->Reset(5);
    REQUIRE(s.IsIOError());
    CHECK_THAT(s.message(), Catch::Contains(kPath));
  }
  env.DropUnsyncedWrites();
  GroupJournal::Recovered r;
  fx.OpenOk(env, &r);
  CHECK(r.applied_group_seq == want_seq);
  CHECK(r.frames == frames);
}

// Goal: a crash while a new journal is created never leaves a file that the
// next Open refuses (a file without a durable header would demand a resync).
TEST_CASE("GroupJournal: a crash while creating the journal leaves none or a whole one",
          "[replication][journal]") {
  for (int64_t budget = 0; budget <= 6; ++budget) {
    for (int mode = 0; mode < 2; ++mode) {
      INFO("operations before the cut: " << budget << ", crash mode " << mode);
      JournalFixture fx;
      PowerSwitch power;
      FaultInjectionEnv env(&fx.mem, &power);
      std::mt19937_64 rng(budget);
      power.CutAfter(budget);
      {
        GroupJournal::Recovered r;
        GroupJournal::Open(env, kPath, &r).status().IgnoreError();  // may fail: power is off
      }
      if (mode == 0) env.DropUnsyncedWrites();
      if (mode == 1) env.TearUnsyncedWrites(512, rng);
      power.Restore();
      GroupJournal::Recovered r;
      auto j = fx.OpenOk(env, &r);
      CHECK(r.applied_group_seq == 0);
      CHECK(r.frames.empty());
    }
  }
}

// Goal: the point of epochs. A Reset keeps the file, and frames written
// before it never come back, even where a new record ends exactly where an
// old, whole record begins.
TEST_CASE("GroupJournal: after Reset a whole record from before is not replayed",
          "[replication][journal]") {
  JournalFixture fx;
  {
    GroupJournal::Recovered r;
    auto j = fx.OpenOk(&r);
    for (uint64_t seq = 1; seq <= 3; ++seq) REQUIRE(j->Append(MakeFrame(seq, 500)).ok());
    REQUIRE(j->Sync().ok());
    const uint64_t size = fx.FileSize();
    REQUIRE(j->Reset(3).ok());
    // Same size as group 1: group 2's old record follows it directly.
    REQUIRE(j->Append(MakeFrame(4, 500)).ok());
    REQUIRE(j->Sync().ok());
    CHECK(fx.FileSize() == size);
  }
  GroupJournal::Recovered r;
  auto j = fx.OpenOk(&r);
  CHECK(r.applied_group_seq == 3);
  CHECK(r.frames == std::vector<Bytes>{MakeFrame(4, 500)});
  CHECK(r.torn_tail_bytes == 0);
}

// Goal: a record of this epoch past a torn one (written after it, never
// acknowledged) must not come back behind a frame appended after the
// reopen: with nothing to replay, Open starts a new epoch.
TEST_CASE("GroupJournal: a record past a torn first record never follows a later one",
          "[replication][journal]") {
  JournalFixture fx;
  {
    GroupJournal::Recovered r;
    auto j = fx.OpenOk(&r);
    REQUIRE(j->Reset(1).ok());
    REQUIRE(j->Append(MakeFrame(2, 300)).ok());
    REQUIRE(j->Append(MakeFrame(3, 300)).ok());
    REQUIRE(j->Sync().ok());
  }
  // The first record tore; the second reached the disk whole.
  fx.IncrementByte(GroupJournal::kLogStart + kRecordPrefix + kFrameHeaderBytes + 7);
  const uint64_t size = fx.FileSize();
  {
    GroupJournal::Recovered r;
    auto j = fx.OpenOk(&r);
    CHECK(r.frames.empty());
    CHECK(r.torn_tail_bytes == size - GroupJournal::kLogStart);
    CHECK(fx.FileSize() == size);  // kept: a new epoch disowns it instead
    // Same size as the torn one: group 3's old record follows it directly.
    REQUIRE(j->Append(MakeFrame(4, 300)).ok());
    REQUIRE(j->Sync().ok());
  }
  GroupJournal::Recovered r;
  fx.OpenOk(&r);
  CHECK(r.applied_group_seq == 1);
  CHECK(r.frames == std::vector<Bytes>{MakeFrame(4, 300)});
}

TEST_CASE("GroupJournal: Recycle empties a journal without cutting it",
          "[replication][journal]") {
  JournalFixture fx;
  fx.WriteFrames({MakeFrame(1, 800), MakeFrame(2, 800)});
  const uint64_t size = fx.FileSize();
  REQUIRE(GroupJournal::Recycle(fx.mem, kPath, 9).ok());
  CHECK(fx.FileSize() == size);
  GroupJournal::Recovered r;
  auto j = fx.OpenOk(&r);
  CHECK(r.applied_group_seq == 9);
  CHECK(r.frames.empty());
  CHECK(j->log_bytes() == 0);
}

TEST_CASE("GroupJournal: Recycle of a file without a journal header is Corruption",
          "[replication][journal]") {
  JournalFixture fx;
  auto f = fx.mem.OpenFile(kPath, io::OpenMode::kCreate);
  REQUIRE(f.ok());
  REQUIRE((*f)->PWrite(0, Bytes(2048, std::byte{0x33})).ok());
  Status s = GroupJournal::Recycle(fx.mem, kPath, 1);
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Catch::Contains(kPath));
}

// Goal: a journal an earlier release wrote (version 1: bare frames) is
// replayed, and becomes version 2 (cut once) at its first Reset.
TEST_CASE("GroupJournal: a version 1 journal is replayed and becomes version 2 at Reset",
          "[replication][journal]") {
  JournalFixture fx;
  const std::vector<Bytes> frames = {MakeFrame(1), MakeFrame(2)};
  {
    auto f = fx.mem.OpenFile(kPath, io::OpenMode::kCreate);
    REQUIRE(f.ok());
    REQUIRE((*f)->PWrite(0, ForgeSlot(1, 1, 0)).ok());
    uint64_t at = GroupJournal::kLogStart;
    for (const Bytes& frame : frames) {
      REQUIRE((*f)->PWrite(at, frame).ok());
      at += frame.size();
    }
  }
  {
    GroupJournal::Recovered r;
    auto j = fx.OpenOk(&r);
    CHECK(r.frames == frames);
    // Appends stay version 1 until the Reset.
    REQUIRE(j->Append(MakeFrame(3)).ok());
    REQUIRE(j->Sync().ok());
    REQUIRE(j->RecordApplied(1).ok());
  }
  {
    GroupJournal::Recovered r;
    auto j = fx.OpenOk(&r);
    CHECK(r.applied_group_seq == 1);
    CHECK(r.frames == std::vector<Bytes>{MakeFrame(1), MakeFrame(2), MakeFrame(3)});
    REQUIRE(j->Reset(3).ok());
    CHECK(fx.FileSize() == GroupJournal::kLogStart);
    REQUIRE(j->Append(MakeFrame(4)).ok());
    REQUIRE(j->Sync().ok());
    CHECK(j->log_bytes() == RecordBytes(MakeFrame(4)));
  }
  GroupJournal::Recovered r;
  fx.OpenOk(&r);
  CHECK(r.applied_group_seq == 3);
  CHECK(r.frames == std::vector<Bytes>{MakeFrame(4)});
}

// Goal: reuse under repeated crashes. Each iteration runs several
// open / random appends, syncs and resets / power loss cycles on one file,
// so records of many earlier epochs (and torn ones) lie around in it; after
// every crash the journal returns a prefix of what was appended since the
// last Reset, holding at least what was synced, and never a stale record.
TEST_CASE("GroupJournal: repeated power losses of a reused journal never replay a stale record",
          "[replication][journal]") {
  constexpr int kIterations = 200;
  constexpr int kCrashes = 6;
  for (int iteration = 0; iteration < kIterations; ++iteration) {
    const uint64_t seed = 5000 + iteration;
    INFO("seed " << seed);
    std::mt19937_64 rng(seed);
    JournalFixture fx;
    FaultInjectionEnv env(&fx.mem);
    JournalModel m;  // appended: recovered, then new
    for (int crash = 0; crash < kCrashes; ++crash) {
      INFO("crash " << crash);
      {
        GroupJournal::Recovered r;
        auto j = fx.OpenOk(env, &r);
        REQUIRE(r.applied_group_seq == m.applied);
        REQUIRE(r.frames.size() >= m.synced);
        REQUIRE(r.frames.size() <= m.appended.size());
        for (size_t i = 0; i < r.frames.size(); ++i) REQUIRE(r.frames[i] == m.appended[i]);
        m.appended.resize(r.frames.size());
        m.synced = m.appended.size();  // read back, and the cut is synced
        // Few sizes, so that records of different epochs line up.
        m.RandomOps(*j, rng, 16, [](std::mt19937_64& g) { return 100 * (1 + g() % 4); });
      }
      switch (rng() % 3) {
        case 0: env.DropUnsyncedWrites(); break;
        case 1: env.DropRandomUnsyncedWrites(rng); break;
        default: env.TearUnsyncedWrites(512, rng); break;
      }
    }
  }
}

}  // namespace
}  // namespace blockrelay::replication
