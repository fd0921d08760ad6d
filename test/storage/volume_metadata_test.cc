// VolumeMetadata::Open: creation, checks against the configuration, slot
// reconciliation and recovery.

#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "blockrelay/storage/volume_metadata.h"
#include "storage/metadata_format.h"
#include "testutil/volume_fixture.h"

namespace blockrelay::storage {
namespace {

using testutil::VolumeFixture;

constexpr uint64_t kMiB = 1ull << 20;

Status OpenError(const VolumeMetadataOptions& o) {
  Result<std::unique_ptr<VolumeMetadata>> meta = VolumeMetadata::Open(o);
  REQUIRE_FALSE(meta.ok());
  return meta.status();
}

TEST_CASE("VolumeMetadata: the first open creates the file; later opens keep the uuid",
          "[metadata]") {
  VolumeFixture fx;
  Uuid uuid;
  {
    auto meta = fx.OpenOk(fx.Options());
    CHECK(fx.mem.FileExists(fx.MetaPath()));
    CHECK_FALSE(fx.mem.FileExists(fx.MetaPath() + ".tmp"));
    uuid = meta->volume_uuid();
    CHECK_FALSE(uuid.IsNil());
    CHECK(meta->path() == "/data/g/v.meta");
    REQUIRE(meta->Close().ok());
  }
  auto again = fx.OpenOk(fx.Options());
  CHECK(again->volume_uuid() == uuid);
  CHECK_FALSE(again->recovered_unclean_shutdown());
}

TEST_CASE("VolumeMetadata: a new link gets a slot with every region dirty", "[metadata]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(10 * kMiB + 4096, 64 << 10, {{"b", false}}));
  REQUIRE(meta->slots().size() == 1);
  CHECK(meta->slots()[0].added);
  SlotStats stats = meta->scoreboard().StatsForSlot(0);
  CHECK(stats.site == "b");
  CHECK(stats.dirty_regions == 161);
  CHECK(stats.dirty_bytes == 10 * kMiB + 4096);
}

TEST_CASE("VolumeMetadata: a new link with initial_sync none starts clean", "[metadata]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(10 * kMiB, 64 << 10, {{"b", true}}));
  CHECK(meta->scoreboard().StatsForSlot(0).dirty_regions == 0);
  CHECK(meta->slots()[0].initial_sync_none);
}

TEST_CASE("VolumeMetadata: a link added later is all dirty while the others keep their bits",
          "[metadata]") {
  VolumeFixture fx;
  {
    auto meta = fx.OpenOk(fx.Options(10 * kMiB, 64 << 10, {{"b", true}}));
    REQUIRE(meta->scoreboard().MarkDirty(0, 4096).ok());
    REQUIRE(meta->Close().ok());
  }
  auto meta = fx.OpenOk(fx.Options(10 * kMiB, 64 << 10, {{"b", true}, {"c", false}}));
  REQUIRE(meta->slots().size() == 2);
  CHECK_FALSE(meta->slots()[0].added);
  CHECK(meta->slots()[1].added);
  CHECK(meta->scoreboard().StatsForSlot(*meta->SlotForSite("b")).dirty_regions == 1);
  CHECK(meta->scoreboard().StatsForSlot(*meta->SlotForSite("c")).dirty_regions == 160);
}

TEST_CASE("VolumeMetadata: a link no longer configured frees its slot", "[metadata]") {
  VolumeFixture fx;
  {
    auto meta = fx.OpenOk(fx.Options(10 * kMiB, 64 << 10, {{"b", true}, {"c", true}}));
    REQUIRE(meta->Close().ok());
  }
  {
    auto meta = fx.OpenOk(fx.Options(10 * kMiB, 64 << 10, {{"b", true}}));
    REQUIRE(meta->slots().size() == 1);
    CHECK_FALSE(meta->SlotForSite("c"));
    bool noted = false;
    for (const std::string& n : meta->open_notices()) {
      noted |= n.find("site c is no longer a downstream link") != std::string::npos;
    }
    CHECK(noted);
    REQUIRE(meta->Close().ok());
  }
  // Coming back, c is a new link again: all dirty (it missed everything).
  auto meta = fx.OpenOk(fx.Options(10 * kMiB, 64 << 10, {{"b", true}, {"c", false}}));
  CHECK(meta->scoreboard().StatsForSlot(*meta->SlotForSite("c")).dirty_regions == 160);
}

TEST_CASE("VolumeMetadata: a changed size is refused with both sizes and the way out",
          "[metadata]") {
  VolumeFixture fx;
  REQUIRE(fx.OpenOk(fx.Options(64 * kMiB))->Close().ok());
  Status s = OpenError(fx.Options(128 * kMiB));
  CHECK(s.IsInvalidArgument());
  CHECK_THAT(s.message(), Catch::Contains("size is 134217728 bytes (128 MiB) in the configuration"));
  CHECK_THAT(s.message(), Catch::Contains("made for 67108864 bytes (64 MiB)"));
  CHECK_THAT(s.message(), Catch::Contains("remove /data/g/v.meta"));
}

TEST_CASE("VolumeMetadata: a changed region size is refused", "[metadata]") {
  VolumeFixture fx;
  REQUIRE(fx.OpenOk(fx.Options(64 * kMiB, 64 << 10))->Close().ok());
  Status s = OpenError(fx.Options(64 * kMiB, 128 << 10));
  CHECK(s.IsInvalidArgument());
  CHECK_THAT(s.message(), Catch::Contains("region_size is 128 KiB in the configuration"));
  CHECK_THAT(s.message(), Catch::Contains("uses 64 KiB"));
}

TEST_CASE("VolumeMetadata: a backing file replaced by another file is refused", "[metadata]") {
  VolumeFixture fx;
  REQUIRE(fx.OpenOk(fx.Options())->Close().ok());
  REQUIRE(fx.mem.RemoveFile(VolumeFixture::kBacking).ok());
  REQUIRE(fx.mem.OpenFile(VolumeFixture::kBacking, io::OpenMode::kCreate).ok());  // new inode
  Status s = OpenError(fx.Options());
  CHECK(s.IsInvalidArgument());
  CHECK_THAT(s.message(), Catch::Contains("backing /backing.img is not the one"));
  CHECK_THAT(s.message(), Catch::Contains("it was a regular file, inode"));
  CHECK_THAT(s.message(), Catch::Contains("--accept-backing-change"));
  CHECK_THAT(s.message(), Catch::Contains("remove /data/g/v.meta"));
}

TEST_CASE("VolumeMetadata: accept_backing_change keeps the scoreboard and records the new file",
          "[metadata]") {
  VolumeFixture fx;
  {
    auto meta = fx.OpenOk(fx.Options());
    REQUIRE(meta->scoreboard().MarkDirty(0, 1).ok());
    REQUIRE(meta->Close().ok());
  }
  REQUIRE(fx.mem.RemoveFile(VolumeFixture::kBacking).ok());
  REQUIRE(fx.mem.OpenFile(VolumeFixture::kBacking, io::OpenMode::kCreate).ok());
  VolumeMetadataOptions o = fx.Options();
  o.accept_backing_change = true;
  {
    auto meta = fx.OpenOk(o);
    CHECK(meta->scoreboard().StatsForSlot(0).dirty_regions == 1);
    REQUIRE(meta->Close().ok());
  }
  CHECK(fx.OpenOk(fx.Options())->scoreboard().StatsForSlot(0).dirty_regions == 1);
}

TEST_CASE("VolumeMetadata: a backing file moved to another path (same inode) is accepted",
          "[metadata]") {
  VolumeFixture fx;
  REQUIRE(fx.OpenOk(fx.Options())->Close().ok());
  REQUIRE(fx.mem.RenameFile(VolumeFixture::kBacking, "/moved.img").ok());
  VolumeMetadataOptions o = fx.Options();
  o.backing_path = "/moved.img";
  auto meta = fx.OpenOk(o);
  bool noted = false;
  for (const std::string& n : meta->open_notices()) {
    noted |= n.find("backing moved from /backing.img to /moved.img") != std::string::npos;
  }
  CHECK(noted);
}

TEST_CASE("VolumeMetadata: the same file on a renumbered device is accepted", "[metadata]") {
  VolumeFixture fx;
  REQUIRE(fx.OpenOk(fx.Options())->Close().ok());
  io::FileInfo info = fx.mem.Stat(VolumeFixture::kBacking).value();
  info.device = 77;  // e.g. a device-mapper minor that changed across a reboot
  REQUIRE(fx.mem.SetStatOverride(VolumeFixture::kBacking, info).ok());
  CHECK(VolumeMetadata::Open(fx.Options()).ok());
}

TEST_CASE("VolumeMetadata: a block device with another device number is refused",
          "[metadata]") {
  VolumeFixture fx;
  io::FileInfo info;
  info.type = io::FileType::kBlockDevice;
  info.rdev = (8 << 8) | 16;
  REQUIRE(fx.mem.SetStatOverride(VolumeFixture::kBacking, info).ok());
  REQUIRE(fx.OpenOk(fx.Options())->Close().ok());
  info.rdev = (8 << 8) | 32;
  REQUIRE(fx.mem.SetStatOverride(VolumeFixture::kBacking, info).ok());
  Status s = OpenError(fx.Options());
  CHECK_THAT(s.message(), Catch::Contains("it was a block device 8:16"));
  CHECK_THAT(s.message(), Catch::Contains("now it is a block device 8:32"));
}

TEST_CASE("VolumeMetadata: a missing backing store is refused", "[metadata]") {
  VolumeFixture fx;
  VolumeMetadataOptions o = fx.Options();
  o.backing_path = "/nope.img";
  Status s = OpenError(o);
  CHECK(s.code() == Status::Code::kNotFound);
  CHECK_THAT(s.message(), Catch::Contains("must exist before its metadata is opened"));
}

TEST_CASE("VolumeMetadata: both superblock copies corrupt is refused with the way out",
          "[metadata]") {
  VolumeFixture fx;
  REQUIRE(fx.OpenOk(fx.Options())->Close().ok());
  fx.FlipByte(100);
  fx.FlipByte(4096 + 100);
  Status s = OpenError(fx.Options());
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Catch::Contains("both superblock copies are unreadable"));
  CHECK_THAT(s.message(), Catch::Contains("To start over, remove /data/g/v.meta"));
}

TEST_CASE("VolumeMetadata: a torn newer superblock copy falls back to the older one",
          "[metadata]") {
  VolumeFixture fx;
  {
    auto meta = fx.OpenOk(fx.Options());
    REQUIRE(meta->scoreboard().MarkDirty(0, 1).ok());
    REQUIRE(meta->Close().ok());  // the clean flag went into the newer copy
  }
  // Find the newer copy and tear its last sector.
  uint64_t seq0 = format::GetU64(fx.ReadRaw(format::sb::kSequence, 8), 0);
  uint64_t seq1 = format::GetU64(fx.ReadRaw(4096 + format::sb::kSequence, 8), 0);
  uint64_t newer = seq1 > seq0 ? 4096 : 0;
  fx.WriteRaw(newer + 3584, std::vector<std::byte>(512, std::byte{0x5a}));
  auto meta = fx.OpenOk(fx.Options());
  CHECK(meta->recovered_unclean_shutdown());  // the older copy predates Close
  CHECK(meta->scoreboard().StatsForSlot(0).dirty_regions >= 1);
  bool noted = false;
  for (const std::string& n : meta->open_notices()) {
    noted |= n.find("is unreadable") != std::string::npos;
  }
  CHECK(noted);
}

TEST_CASE("VolumeMetadata: metadata of another format version is refused naming both",
          "[metadata]") {
  VolumeFixture fx;
  REQUIRE(fx.OpenOk(fx.Options())->Close().ok());
  std::vector<std::byte> v(4);
  format::PutU32(v, 0, 2);
  fx.WriteRaw(format::sb::kVersion, v);
  Status s = OpenError(fx.Options());
  CHECK(s.IsNotSupported());
  CHECK_THAT(s.message(), Catch::Contains("format version 2"));
  CHECK_THAT(s.message(), Catch::Contains("reads format version 1 only"));
}

TEST_CASE("VolumeMetadata: a truncated metadata file is refused", "[metadata]") {
  VolumeFixture fx;
  REQUIRE(fx.OpenOk(fx.Options())->Close().ok());
  auto f = fx.mem.OpenFile(fx.MetaPath(), io::OpenMode::kReadWrite);
  REQUIRE(f.ok());
  REQUIRE((*f)->Truncate(20000).ok());
  Status s = OpenError(fx.Options());
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Catch::Contains("truncated"));
}

TEST_CASE("VolumeMetadata: a torn bitmap page makes only that page's regions dirty",
          "[metadata]") {
  VolumeFixture fx;
  // 4 KiB regions: page 0 covers regions 0..32511, page 1 the next 32512.
  const uint64_t size = 3 * format::kBitsPerPage * 4096;
  VolumeMetadataOptions o = fx.Options(size, 4096);
  {
    auto meta = fx.OpenOk(o);
    REQUIRE(meta->scoreboard().MarkDirty(5 * 4096, 4096).ok());
    REQUIRE(meta->Close().ok());
  }
  Result<format::Geometry> g = format::MakeGeometry(size, 4096, 4 << 20, 1024);
  REQUIRE(g.ok());
  fx.FlipByte(g->PageOffset(0, 1) + 1000);
  auto meta = fx.OpenOk(o);
  Scoreboard& sb = meta->scoreboard();
  CHECK(sb.StatsForSlot(0).dirty_regions == 1 + format::kBitsPerPage);
  CHECK(sb.IsDirty(0, 5));
  CHECK_FALSE(sb.IsDirty(0, 6));
  CHECK(sb.IsDirty(0, format::kBitsPerPage));
  CHECK(sb.IsDirty(0, 2 * format::kBitsPerPage - 1));
  CHECK_FALSE(sb.IsDirty(0, 2 * format::kBitsPerPage));
  bool noted = false;
  for (const std::string& n : meta->open_notices()) {
    noted |= n.find("1 bitmap page(s) torn or corrupt (page 1") != std::string::npos;
  }
  CHECK(noted);
  // The page was rewritten: the next start agrees without a notice.
  REQUIRE(meta->Close().ok());
  meta.reset();
  auto third = fx.OpenOk(o);
  CHECK(third->scoreboard().StatsForSlot(0).dirty_regions == 1 + format::kBitsPerPage);
  for (const std::string& n : third->open_notices()) CHECK(n.find("torn") == std::string::npos);
}

TEST_CASE("VolumeMetadata: after a clean shutdown the dirty set comes back exactly",
          "[metadata]") {
  VolumeFixture fx;
  {
    auto meta = fx.OpenOk(fx.Options());
    REQUIRE(meta->scoreboard().MarkDirty(3 * 65536, 2 * 65536).ok());
    REQUIRE(meta->scoreboard().MarkDirty(40 * kMiB, 1).ok());
    REQUIRE(meta->Close().ok());
  }
  auto meta = fx.OpenOk(fx.Options());
  CHECK(meta->scoreboard().StatsForSlot(0).dirty_regions == 3);
  CHECK(meta->scoreboard().IsDirty(0, 3));
  CHECK(meta->scoreboard().IsDirty(0, 4));
  CHECK(meta->scoreboard().IsDirty(0, 640));
}

TEST_CASE("VolumeMetadata: after a crash the dirty set is the bitmap plus every intent extent",
          "[metadata]") {
  VolumeFixture fx;
  {
    auto meta = fx.OpenOk(fx.Options());  // 4 MiB extents = 64 regions
    REQUIRE(meta->scoreboard().MarkDirty(65536, 1).ok());
    // Crash: no Close, and whatever was not synced is lost.
  }
  fx.env.DropUnsyncedWrites();
  auto meta = fx.OpenOk(fx.Options());
  CHECK(meta->recovered_unclean_shutdown());
  CHECK(meta->scoreboard().StatsForSlot(0).dirty_regions == 64);
}

TEST_CASE("VolumeMetadata: generations start at 1 and keep a short history", "[metadata]") {
  VolumeFixture fx;
  Generation first;
  {
    auto meta = fx.OpenOk(fx.Options());
    first = meta->generation();
    CHECK(first.counter == 1);
    CHECK(meta->generation_history().empty());
    for (int i = 0; i < 6; ++i) REQUIRE(meta->StartNewGeneration().ok());
    REQUIRE(meta->Close().ok());
  }
  auto meta = fx.OpenOk(fx.Options());
  CHECK(meta->generation().counter == 7);
  REQUIRE(meta->generation_history().size() == 4);
  CHECK(meta->generation_history()[0].counter == 6);
  CHECK(meta->generation_history()[3].counter == 3);
}

TEST_CASE("VolumeMetadata: bad options are refused before anything is written", "[metadata]") {
  VolumeFixture fx;
  VolumeMetadataOptions o = fx.Options();
  SECTION("a bad volume name") {
    o.volume = "a/b";
    CHECK_THAT(OpenError(o).message(), Catch::Contains("volume name \"a/b\""));
  }
  SECTION("a site listed twice") {
    o.downstream = {{"b", true}, {"b", false}};
    CHECK_THAT(OpenError(o).message(), Catch::Contains("listed twice"));
  }
  SECTION("more links than slots") {
    o.downstream.clear();
    for (int i = 0; i < 17; ++i) o.downstream.push_back({"s" + std::to_string(i), true});
    CHECK_THAT(OpenError(o).message(), Catch::Contains("at most 16"));
  }
  SECTION("a region size out of range") {
    o.region_size_bytes = 32ull << 20;
    CHECK_THAT(OpenError(o).message(), Catch::Contains("region_size_bytes 33554432"));
  }
  SECTION("an intent extent that is not a multiple of the region") {
    o.intent_extent_bytes = 96 << 10;
    CHECK_THAT(OpenError(o).message(), Catch::Contains("intent_extent_bytes 98304"));
  }
  CHECK_FALSE(fx.mem.FileExists(fx.MetaPath()));
}

TEST_CASE("VolumeMetadata: a file left half-made by a crash during creation is ignored",
          "[metadata]") {
  VolumeFixture fx;
  REQUIRE(fx.mem.CreateDirs("/data/g").ok());
  auto tmp = fx.mem.OpenFile(fx.MetaPath() + ".tmp", io::OpenMode::kCreate);
  REQUIRE(tmp.ok());
  REQUIRE((*tmp)->PWrite(0, std::vector<std::byte>(100, std::byte{1})).ok());
  auto meta = fx.OpenOk(fx.Options());
  CHECK_FALSE(fx.mem.FileExists(fx.MetaPath() + ".tmp"));
}

TEST_CASE("VolumeMetadata: a slot freed in this start is not reused until the next",
          "[metadata]") {
  // Goal: a torn superblock update can never give a returning site the
  // bitmap pages of the site that replaced it.
  VolumeFixture fx;
  std::vector<DownstreamSlotOptions> sixteen;
  for (int i = 0; i < 16; ++i) sixteen.push_back({"s" + std::to_string(i), true});
  REQUIRE(fx.OpenOk(fx.Options(64 * kMiB, 64 << 10, sixteen))->Close().ok());
  std::vector<DownstreamSlotOptions> swapped = sixteen;
  swapped[3] = {"new", false};
  Status s = OpenError(fx.Options(64 * kMiB, 64 << 10, swapped));
  CHECK_THAT(s.message(), Catch::Contains("no free scoreboard slot for new downstream site new"));
  std::vector<DownstreamSlotOptions> without = sixteen;
  without.erase(without.begin() + 3);
  REQUIRE(fx.OpenOk(fx.Options(64 * kMiB, 64 << 10, without))->Close().ok());
  auto meta = fx.OpenOk(fx.Options(64 * kMiB, 64 << 10, swapped));
  CHECK(meta->SlotForSite("new") == 3u);
}

}  // namespace
}  // namespace blockrelay::storage
