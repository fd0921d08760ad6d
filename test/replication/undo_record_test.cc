// UndoRecord: the saved-range index, round trips, torn tails, damaged
// records and a full data_dir (in the style of leveldb db/log_test.cc).

#include <cerrno>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "blockrelay/io/mem_env.h"
#include "replication/undo_record.h"
#include "testutil/fault_injection_env.h"

namespace blockrelay::replication {
namespace {

using Catch::Matchers::Contains;
using testutil::FaultInjectionEnv;
using testutil::FaultOp;
using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;

constexpr char kDir[] = "/data";
constexpr char kPath[] = "/data/undo-g.log";
constexpr uint64_t kRec = UndoRecord::kRecordHeaderBytes;

std::vector<std::byte> Pattern(size_t n, int seed) {
  std::vector<std::byte> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = std::byte((seed * 37 + i * 7) & 0xff);
  return out;
}

struct Saved {
  uint32_t volume;
  uint64_t offset;
  std::vector<std::byte> data;
  bool operator==(const Saved&) const = default;
};

struct UndoFixture {
  UndoFixture() { REQUIRE(mem.CreateDirs(kDir).ok()); }

  std::unique_ptr<UndoRecord> CreateOk(uint64_t base = 7) {
    auto u = UndoRecord::Create(mem, kPath, base);
    INFO((u.ok() ? std::string() : u.status().ToString()));
    REQUIRE(u.ok());
    return std::move(u).value();
  }
  std::unique_ptr<UndoRecord> OpenOk(UndoRecord::Recovered* r) {
    auto u = UndoRecord::Open(mem, kPath, r);
    INFO((u.ok() ? std::string() : u.status().ToString()));
    REQUIRE(u.ok());
    return std::move(u).value();
  }
  Status OpenError() {
    UndoRecord::Recovered r;
    auto u = UndoRecord::Open(mem, kPath, &r);
    REQUIRE_FALSE(u.ok());
    return u.status();
  }
  static std::vector<Saved> All(UndoRecord& u) {
    std::vector<Saved> out;
    REQUIRE(u.ForEachNewestFirst([&](uint32_t v, uint64_t off, uint64_t length,
                                     std::span<const std::byte> d) {
                 // A range of zeros comes without data.
                 std::vector<std::byte> bytes(d.begin(), d.end());
                 if (d.empty()) bytes.assign(length, std::byte{0});
                 out.push_back(Saved{v, off, bytes});
                 return Status::OK();
               }).ok());
    return out;
  }
  std::unique_ptr<io::RandomRWFile> Raw() {
    auto f = mem.OpenFile(kPath, io::OpenMode::kReadWrite);
    REQUIRE(f.ok());
    return std::move(*f);
  }
  uint64_t FileSize() { return *Raw()->Size(); }
  void ShrinkSize(uint64_t bytes) { REQUIRE(Raw()->Truncate(FileSize() - bytes).ok()); }
  void IncrementByte(uint64_t offset) {
    auto f = Raw();
    std::byte b[1];
    REQUIRE(f->PRead(offset, b).ok());
    b[0] = std::byte(std::to_integer<uint8_t>(b[0]) + 1);
    REQUIRE(f->PWrite(offset, b).ok());
  }

  io::MemEnv mem;
};

TEST_CASE("UndoRecord: Unsaved returns the gaps between saved ranges",
          "[replication][undo]") {
  UndoFixture fx;
  auto u = fx.CreateOk();
  CHECK(u->Unsaved(0, 100, 50) == Ranges{{100, 50}});
  REQUIRE(u->Append(0, 100, Pattern(50, 1)).ok());
  REQUIRE(u->Append(0, 300, Pattern(100, 2)).ok());
  CHECK(u->Unsaved(0, 100, 50).empty());
  CHECK(u->Unsaved(0, 120, 10).empty());
  CHECK(u->Unsaved(0, 0, 1000) == Ranges{{0, 100}, {150, 150}, {400, 600}});
  CHECK(u->Unsaved(0, 140, 200) == Ranges{{150, 150}});
  CHECK(u->Unsaved(1, 100, 50) == Ranges{{100, 50}});  // another volume
  CHECK(u->Unsaved(0, 5, 0).empty());
  // Touching ranges merge: [150,300) fills the gap.
  REQUIRE(u->Append(0, 150, Pattern(150, 3)).ok());
  CHECK(u->Unsaved(0, 0, 1000) == Ranges{{0, 100}, {400, 600}});
  CHECK(u->saved_bytes() == 300);
}

TEST_CASE("UndoRecord: records round trip through reopen, newest first",
          "[replication][undo]") {
  UndoFixture fx;
  {
    auto u = fx.CreateOk(42);
    REQUIRE(u->Append(0, 4096, Pattern(4096, 1)).ok());
    REQUIRE(u->Append(1, 0, Pattern(10, 2)).ok());
    REQUIRE(u->Append(0, 0, Pattern(512, 3)).ok());
    REQUIRE(u->Sync().ok());
    CHECK(u->size_bytes() == UndoRecord::kHeaderBytes + 3 * kRec + 4096 + 10 + 512);
  }
  UndoRecord::Recovered r;
  auto u = fx.OpenOk(&r);
  CHECK(r.records == 3);
  CHECK(r.torn_tail_bytes == 0);
  CHECK(u->base_group_seq() == 42);
  CHECK(u->saved_bytes() == 4096 + 10 + 512);
  CHECK(UndoFixture::All(*u) == std::vector<Saved>{{0, 0, Pattern(512, 3)},
                                                   {1, 0, Pattern(10, 2)},
                                                   {0, 4096, Pattern(4096, 1)}});
  // The index is rebuilt: nothing saved is saved again.
  CHECK(u->Unsaved(0, 0, 8192) == Ranges{{512, 3584}});
  // And appends go after what was recovered.
  REQUIRE(u->Append(0, 512, Pattern(8, 4)).ok());
  REQUIRE(u->Sync().ok());
  UndoRecord::Recovered again;
  CHECK(UndoFixture::All(*fx.OpenOk(&again)).front() == Saved{0, 512, Pattern(8, 4)});
}

TEST_CASE("UndoRecord: a range of zeros is saved as a header without data "
          "and round trips through reopen",
          "[replication][undo]") {
  UndoFixture fx;
  constexpr uint64_t kBig = 3 * UndoRecord::kMaxRecordBytes + 512;
  {
    auto u = fx.CreateOk(7);
    REQUIRE(u->AppendZeros(0, 0, kBig).ok());
    REQUIRE(u->Append(0, kBig, Pattern(100, 9)).ok());
    REQUIRE(u->Sync().ok());
    CHECK(u->size_bytes() == UndoRecord::kHeaderBytes + 2 * kRec + 100);
    CHECK(u->saved_bytes() == kBig + 100);
  }
  UndoRecord::Recovered r;
  auto u = fx.OpenOk(&r);
  CHECK(r.records == 2);
  CHECK(u->saved_bytes() == kBig + 100);
  CHECK(u->Unsaved(0, 0, kBig + 200) == Ranges{{kBig + 100, 100}});
  auto all = UndoFixture::All(*u);
  REQUIRE(all.size() == 2);
  CHECK(all[0] == Saved{0, kBig, Pattern(100, 9)});
  CHECK(all[1] == Saved{0, 0, std::vector<std::byte>(kBig, std::byte{0})});
}

TEST_CASE("UndoRecord: a record with unknown flags is refused when records "
          "follow it",
          "[replication][undo]") {
  UndoFixture fx;
  {
    auto u = fx.CreateOk(1);
    REQUIRE(u->AppendZeros(0, 0, 4096).ok());
    REQUIRE(u->Append(0, 4096, Pattern(10, 1)).ok());
    REQUIRE(u->Sync().ok());
  }
  fx.IncrementByte(UndoRecord::kHeaderBytes + 21);  // flags 1 -> 0x101
  Status s = fx.OpenError();
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Catch::Contains("flags"));
}

TEST_CASE("UndoRecord: a save larger than kMaxRecordBytes is split into records",
          "[replication][undo]") {
  UndoFixture fx;
  const size_t n = UndoRecord::kMaxRecordBytes * 2 + 100;
  auto data = Pattern(n, 5);
  {
    auto u = fx.CreateOk();
    REQUIRE(u->Append(0, 0, data).ok());
    REQUIRE(u->Sync().ok());
  }
  UndoRecord::Recovered r;
  auto u = fx.OpenOk(&r);
  CHECK(r.records == 3);
  std::vector<std::byte> joined(n);
  for (const Saved& s : UndoFixture::All(*u)) {
    std::copy(s.data.begin(), s.data.end(), joined.begin() + s.offset);
  }
  CHECK(joined == data);
}

TEST_CASE("UndoRecord: a torn last record is cut off", "[replication][undo]") {
  UndoFixture fx;
  {
    auto u = fx.CreateOk();
    REQUIRE(u->Append(0, 0, Pattern(100, 1)).ok());
    REQUIRE(u->Append(0, 1000, Pattern(100, 2)).ok());
    REQUIRE(u->Sync().ok());
  }
  const uint64_t full = fx.FileSize();
  SECTION("data cut short") { fx.ShrinkSize(10); }
  SECTION("header cut short") { fx.ShrinkSize(100 + kRec - 5); }
  SECTION("last record's data damaged") { fx.IncrementByte(full - 1); }
  UndoRecord::Recovered r;
  auto u = fx.OpenOk(&r);
  CHECK(r.records == 1);
  CHECK(r.torn_tail_bytes > 0);
  CHECK(UndoFixture::All(*u) == std::vector<Saved>{{0, 0, Pattern(100, 1)}});
  CHECK(fx.FileSize() == UndoRecord::kHeaderBytes + kRec + 100);
  // The range of the torn record was never saved: it is unsaved again.
  CHECK(u->Unsaved(0, 1000, 100) == Ranges{{1000, 100}});
}

TEST_CASE("UndoRecord: zeroes after the last record are a torn tail",
          "[replication][undo]") {
  UndoFixture fx;
  {
    auto u = fx.CreateOk();
    REQUIRE(u->Append(0, 0, Pattern(100, 1)).ok());
    REQUIRE(u->Sync().ok());
  }
  REQUIRE(fx.Raw()->Truncate(fx.FileSize() + 3 * kRec).ok());
  UndoRecord::Recovered r;
  auto u = fx.OpenOk(&r);
  CHECK(r.records == 1);
  CHECK(r.torn_tail_bytes == 3 * kRec);
}

TEST_CASE("UndoRecord: a damaged record followed by more records is refused",
          "[replication][undo]") {
  UndoFixture fx;
  {
    auto u = fx.CreateOk();
    REQUIRE(u->Append(0, 0, Pattern(100, 1)).ok());
    REQUIRE(u->Append(0, 1000, Pattern(100, 2)).ok());
    REQUIRE(u->Sync().ok());
  }
  SECTION("data byte") { fx.IncrementByte(UndoRecord::kHeaderBytes + kRec + 50); }
  SECTION("offset field") { fx.IncrementByte(UndoRecord::kHeaderBytes + 8); }
  SECTION("magic") { fx.IncrementByte(UndoRecord::kHeaderBytes); }
  Status s = fx.OpenError();
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Contains(kPath));
  CHECK_THAT(s.message(), Contains("at offset 4096"));
}

TEST_CASE("UndoRecord: a damaged header is refused", "[replication][undo]") {
  UndoFixture fx;
  fx.CreateOk();
  SECTION("magic") {
    fx.IncrementByte(0);
    CHECK_THAT(fx.OpenError().message(), Contains("bad header magic"));
  }
  SECTION("base_group_seq") {
    fx.IncrementByte(8);
    CHECK_THAT(fx.OpenError().message(), Contains("header checksum mismatch"));
  }
  SECTION("truncated") {
    REQUIRE(fx.Raw()->Truncate(100).ok());
    CHECK_THAT(fx.OpenError().message(), Contains("header truncated"));
  }
}

TEST_CASE("UndoRecord: a record damaged after reopen is refused at rollback",
          "[replication][undo]") {
  UndoFixture fx;
  auto u = fx.CreateOk();
  REQUIRE(u->Append(0, 0, Pattern(100, 1)).ok());
  REQUIRE(u->Sync().ok());
  fx.IncrementByte(UndoRecord::kHeaderBytes + kRec + 3);
  Status s = u->ForEachNewestFirst(
      [](uint32_t, uint64_t, uint64_t, std::span<const std::byte>) { return Status::OK(); });
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Contains("no longer reads back intact"));
}

// Goal: a full data_dir stops the resync cleanly: the error names the file
// and is sticky, so no write whose undo is not durable can be applied.
TEST_CASE("UndoRecord: a full data_dir gives a sticky NoSpace error",
          "[replication][undo]") {
  io::MemEnv mem;
  REQUIRE(mem.CreateDirs(kDir).ok());
  FaultInjectionEnv env(&mem);
  auto u = UndoRecord::Create(env, kPath, 1);
  REQUIRE(u.ok());
  env.FailNth(FaultOp::kWrite, 1, ENOSPC);
  Status s = (*u)->Append(0, 0, Pattern(100, 1));
  CHECK(s.IsNoSpace());
  CHECK_THAT(s.message(), Contains(kPath));
  CHECK((*u)->Append(0, 200, Pattern(10, 1)).IsNoSpace());
  CHECK((*u)->Sync().IsNoSpace());
}

TEST_CASE("UndoRecord: Remove deletes the file and tolerates a missing one",
          "[replication][undo]") {
  UndoFixture fx;
  fx.CreateOk();
  REQUIRE(fx.mem.FileExists(kPath));
  REQUIRE(UndoRecord::Remove(fx.mem, kPath).ok());
  CHECK_FALSE(fx.mem.FileExists(kPath));
  CHECK(UndoRecord::Remove(fx.mem, kPath).ok());
  CHECK_FALSE(fx.mem.FileExists(std::string(kPath) + ".tmp"));
}

}  // namespace
}  // namespace blockrelay::replication
