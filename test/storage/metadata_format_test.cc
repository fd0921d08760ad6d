// The metadata codec, byte by byte (in the style of leveldb db/log_test.cc):
// every field that can be wrong is refused with a message naming it.

#include <cstring>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "storage/metadata_format.h"

namespace blockrelay::storage::format {
namespace {

Superblock SampleSuperblock() {
  Superblock sb;
  sb.sequence = 7;
  sb.clean_shutdown = true;
  sb.volume_uuid = *Uuid::Parse("0123abcd-4567-4890-8bcd-ef0123456789");
  sb.size_bytes = 10ull << 30;
  sb.region_size_bytes = 64 << 10;
  sb.intent_extent_bytes = 4 << 20;
  sb.max_intent_extents = 1024;
  sb.generation = Generation{*Uuid::Parse("11111111-2222-4333-8444-555555555555"), 3};
  sb.generation_history = {Generation{*Uuid::Parse("aaaaaaaa-2222-4333-8444-555555555555"), 2},
                           Generation{*Uuid::Parse("bbbbbbbb-2222-4333-8444-555555555555"), 1}};
  sb.group = "db";
  sb.volume = "wal.1";
  sb.backing = BackingIdentity{BackingKind::kFile, "/srv/wal.img", 2049, 131, 0};
  sb.slots[0] = SlotEntry{true, 0, 2, "b"};
  sb.slots[3] = SlotEntry{true, kSlotFlagInitialSyncNone, 7, "site-c"};
  return sb;
}

// An encoded superblock that a test corrupts field by field.
struct SuperblockBytes {
  SuperblockBytes() : bytes(EncodeSuperblock(SampleSuperblock())) {}
  void U32(size_t off, uint32_t v) { PutU32(bytes, off, v); }
  void U64(size_t off, uint64_t v) { PutU64(bytes, off, v); }
  void Byte(size_t off, uint8_t v) { bytes[off] = std::byte(v); }
  void Fix() { FixSuperblockChecksum(bytes); }
  Result<Superblock> Decode() const { return DecodeSuperblock(bytes); }
  std::vector<std::byte> bytes;
};

void CheckCorrupt(const SuperblockBytes& b, const std::string& expect) {
  Result<Superblock> r = b.Decode();
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().IsCorruption());
  CHECK_THAT(r.status().message(), Catch::Contains(expect));
}

Geometry SampleGeometry() {
  Result<Geometry> g = MakeGeometry(10ull << 30, 64 << 10, 4 << 20, 1024);
  REQUIRE(g.ok());
  return *g;
}

TEST_CASE("Superblock: encode then decode gives every field back", "[metadata]") {
  Superblock sb = SampleSuperblock();
  std::vector<std::byte> bytes = EncodeSuperblock(sb);
  REQUIRE(bytes.size() == kBlockBytes);
  Result<Superblock> back = DecodeSuperblock(bytes);
  REQUIRE(back.ok());
  CHECK(*back == sb);
}

TEST_CASE("Superblock: a flipped bit in region_size is refused as corruption", "[metadata]") {
  SuperblockBytes b;
  b.bytes[sb::kRegionBytes + 2] ^= std::byte{0x01};
  CheckCorrupt(b, "checksum mismatch");
}

TEST_CASE("Superblock: a flipped bit anywhere after the checksum is refused", "[metadata]") {
  for (size_t off : {size_t{16}, sb::kSizeBytes, sb::kGroupName + 1, sb::kSlots + 17,
                     size_t{kBlockBytes - 1}}) {
    SuperblockBytes b;
    b.bytes[off] ^= std::byte{0x80};
    CAPTURE(off);
    CheckCorrupt(b, "checksum mismatch");
  }
}

TEST_CASE("Superblock: another format version is refused naming both versions", "[metadata]") {
  SuperblockBytes b;
  b.U32(sb::kVersion, 2);
  Result<Superblock> r = b.Decode();
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().IsNotSupported());
  CHECK_THAT(r.status().message(), Catch::Contains("format version 2"));
  CHECK_THAT(r.status().message(), Catch::Contains("format version 1 only"));
}

TEST_CASE("Superblock: a block without the magic is refused", "[metadata]") {
  SuperblockBytes b;
  b.U32(sb::kMagic, 0);
  CheckCorrupt(b, "not a blockrelay metadata superblock");
}

TEST_CASE("Superblock: a block of the wrong size is refused", "[metadata]") {
  SuperblockBytes b;
  b.bytes.resize(512);
  CheckCorrupt(b, "512 bytes");
}

// Each field below gets a valid checksum, so only the field check can
// refuse it.
#define SUPERBLOCK_FIELD_TEST(title, mutate, expect) \
  TEST_CASE("Superblock: " title, "[metadata]") {    \
    SuperblockBytes b;                               \
    mutate;                                          \
    b.Fix();                                         \
    CheckCorrupt(b, expect);                         \
  }

SUPERBLOCK_FIELD_TEST("sequence 0 is refused", b.U64(sb::kSequence, 0), "sequence is 0")
SUPERBLOCK_FIELD_TEST("unknown flag bits are refused", b.U32(sb::kFlags, 0x3), "unknown flags")
SUPERBLOCK_FIELD_TEST("another max_slots is refused", b.U32(sb::kMaxSlotsField, 8), "max_slots 8")
SUPERBLOCK_FIELD_TEST("a nil volume uuid is refused",
                      std::memset(b.bytes.data() + sb::kVolumeUuid, 0, 16), "volume_uuid is nil")
SUPERBLOCK_FIELD_TEST("a size of 0 is refused", b.U64(sb::kSizeBytes, 0), "size_bytes 0")
SUPERBLOCK_FIELD_TEST("a size not a multiple of 512 is refused", b.U64(sb::kSizeBytes, 1000),
                      "size_bytes 1000")
SUPERBLOCK_FIELD_TEST("a region size that is not a power of 2 is refused",
                      b.U64(sb::kRegionBytes, 65 << 10), "region_size_bytes 66560")
SUPERBLOCK_FIELD_TEST("a region size below 4 KiB is refused", b.U64(sb::kRegionBytes, 2048),
                      "region_size_bytes 2048")
SUPERBLOCK_FIELD_TEST("a region size above 16 MiB is refused",
                      b.U64(sb::kRegionBytes, 32ull << 20), "region_size_bytes 33554432")
SUPERBLOCK_FIELD_TEST("an intent extent not a multiple of the region is refused",
                      b.U64(sb::kExtentBytes, 96 << 10), "intent_extent_bytes 98304")
SUPERBLOCK_FIELD_TEST("max_intent_extents 0 is refused", b.U32(sb::kMaxIntentExtentsField, 0),
                      "max_intent_extents 0")
SUPERBLOCK_FIELD_TEST("another intent log length is refused",
                      b.U32(sb::kIntentLogRecordsField, 9), "intent_log_records 9")
SUPERBLOCK_FIELD_TEST("a nil generation uuid is refused",
                      std::memset(b.bytes.data() + sb::kGeneration, 0, 16),
                      "generation uuid is nil")
SUPERBLOCK_FIELD_TEST("a generation counter of 0 is refused", b.U64(sb::kGeneration + 16, 0),
                      "generation counter is 0")
SUPERBLOCK_FIELD_TEST("more than 4 history entries are refused", b.U32(sb::kHistoryCount, 5),
                      "generation_history_count 5")
SUPERBLOCK_FIELD_TEST("a history entry past the count is refused",
                      b.U32(sb::kHistoryCount, 1), "unused generation_history[1] is not zero")
SUPERBLOCK_FIELD_TEST("a bad history entry is refused",
                      b.U64(sb::kHistory + sb::kGenerationBytes + 16, 0),
                      "generation_history[1] counter is 0")
SUPERBLOCK_FIELD_TEST("the reserved word at 108 must be zero", b.U32(sb::kReserved108, 1),
                      "reserved field at byte 108")
SUPERBLOCK_FIELD_TEST("an empty group name is refused", b.Byte(sb::kGroupName, 0),
                      "group name length 0")
SUPERBLOCK_FIELD_TEST("a group name longer than 64 is refused", b.Byte(sb::kGroupName, 65),
                      "group name length 65")
SUPERBLOCK_FIELD_TEST("a volume name with a slash is refused",
                      b.Byte(sb::kVolumeName + 1, '/'), "volume name has characters")
SUPERBLOCK_FIELD_TEST("garbage after a name is refused", b.Byte(sb::kVolumeName + 70, 1),
                      "volume name padding is not zero")
SUPERBLOCK_FIELD_TEST("an unknown backing kind is refused", b.U32(sb::kBackingKind, 3),
                      "backing_kind 3 is unknown")
SUPERBLOCK_FIELD_TEST("a backing path longer than 1024 is refused",
                      b.U32(sb::kBackingPathLength, 1025), "backing_path_length 1025")
SUPERBLOCK_FIELD_TEST("a NUL inside the backing path is refused",
                      b.Byte(sb::kBackingPath + 3, 0), "contains a NUL")
SUPERBLOCK_FIELD_TEST("garbage after the backing path is refused",
                      b.Byte(sb::kBackingPath + 500, 'x'), "backing_path padding")
SUPERBLOCK_FIELD_TEST("a backing file with an rdev is refused", b.U64(sb::kBackingRdev, 5),
                      "backing_kind file needs a path and no backing_rdev")
SUPERBLOCK_FIELD_TEST("a block device with an inode is refused",
                      b.U32(sb::kBackingKind, 2), "backing_kind block device")
SUPERBLOCK_FIELD_TEST("no backing but device numbers is refused",
                      (b.U32(sb::kBackingKind, 0), b.U32(sb::kBackingPathLength, 0),
                       std::memset(b.bytes.data() + sb::kBackingPath, 0, 64)),
                      "backing_kind none with a path")
SUPERBLOCK_FIELD_TEST("slot in_use other than 0 or 1 is refused",
                      b.Byte(sb::kSlots + sb::kSlotInUse, 2), "slot 0 in_use is 2")
SUPERBLOCK_FIELD_TEST("an unused slot with bytes in it is refused",
                      b.Byte(sb::kSlots + sb::kSlotBytes + 40, 1), "unused slot 1 is not zero")
SUPERBLOCK_FIELD_TEST("slot reserved bytes must be zero", b.Byte(sb::kSlots + 2, 1),
                      "slot 0 reserved bytes")
SUPERBLOCK_FIELD_TEST("unknown slot flags are refused", b.U32(sb::kSlots + sb::kSlotFlags, 4),
                      "slot 0 has unknown flags")
SUPERBLOCK_FIELD_TEST("a slot created after the superblock is refused",
                      b.U64(sb::kSlots + sb::kSlotCreatedSequence, 8),
                      "slot 0 created_sequence 8 is not in 1..7")
SUPERBLOCK_FIELD_TEST("a slot with an empty site is refused",
                      b.Byte(sb::kSlots + sb::kSlotSite, 0), "slot 0 site length 0")
SUPERBLOCK_FIELD_TEST("two slots for one site are refused",
                      (b.Byte(sb::kSlots + 3 * sb::kSlotBytes + sb::kSlotSite, 1),
                       b.Byte(sb::kSlots + 3 * sb::kSlotBytes + sb::kSlotSite + 1, 'b'),
                       std::memset(b.bytes.data() + sb::kSlots + 3 * sb::kSlotBytes +
                                       sb::kSlotSite + 2,
                                   0, 5)),
                      "site b has two slots")
SUPERBLOCK_FIELD_TEST("bytes after the slot table must be zero", b.Byte(sb::kEnd + 10, 1),
                      "reserved bytes 2960..4096")

// ------------------------------------------------------------ intent records

TEST_CASE("IntentRecord: encode then decode gives the extents back", "[metadata]") {
  Geometry g = SampleGeometry();
  IntentRecord r{9, 3, {0, 5, 2559}};
  std::vector<std::byte> bytes = EncodeIntentRecord(r, 42, g);
  CHECK(bytes.size() == kBlockBytes);
  bytes.resize(g.intent_record_bytes);  // the slot as read back
  CHECK(IntentRecordIsWhole(bytes, g));
  Result<IntentRecord> back = DecodeIntentRecord(bytes, 42, 3, g);
  REQUIRE(back.ok());
  CHECK(back->sequence == 9);
  CHECK(back->extents == r.extents);
}

TEST_CASE("IntentRecord: a torn record is not whole", "[metadata]") {
  Geometry g = SampleGeometry();
  std::vector<std::byte> bytes = EncodeIntentRecord(IntentRecord{9, 0, {1, 2}}, 42, g);
  bytes[ir::kExtents + 4] ^= std::byte{1};
  CHECK_FALSE(IntentRecordIsWhole(bytes, g));
  CHECK(DecodeIntentRecord(bytes, 42, 0, g).status().IsCorruption());
}

TEST_CASE("IntentRecord: a never-written (zero) record is not whole", "[metadata]") {
  Geometry g = SampleGeometry();
  std::vector<std::byte> zero(g.intent_record_bytes, std::byte{0});
  CHECK_FALSE(IntentRecordIsWhole(zero, g));
}

TEST_CASE("IntentRecord: an extent past the volume is refused", "[metadata]") {
  Geometry g = SampleGeometry();
  std::vector<std::byte> bytes = EncodeIntentRecord(IntentRecord{9, 0, {1}}, 42, g);
  PutU32(bytes, ir::kExtents, 2560);
  FixIntentRecordChecksum(bytes);
  CHECK(IntentRecordIsWhole(bytes, g));
  Result<IntentRecord> r = DecodeIntentRecord(bytes, 42, 0, g);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().message(), Catch::Contains("extent 2560 is beyond"));
}

TEST_CASE("IntentRecord: extents out of order are refused", "[metadata]") {
  Geometry g = SampleGeometry();
  std::vector<std::byte> bytes = EncodeIntentRecord(IntentRecord{9, 0, {4, 4}}, 42, g);
  CHECK_THAT(DecodeIntentRecord(bytes, 42, 0, g).status().message(),
             Catch::Contains("not strictly ascending"));
}

TEST_CASE("IntentRecord: a record in the wrong ring position is refused", "[metadata]") {
  Geometry g = SampleGeometry();
  std::vector<std::byte> bytes = EncodeIntentRecord(IntentRecord{9, 2, {}}, 42, g);
  CHECK_THAT(DecodeIntentRecord(bytes, 42, 5, g).status().message(),
             Catch::Contains("says it is record 2"));
}

TEST_CASE("IntentRecord: a record of another volume is refused", "[metadata]") {
  Geometry g = SampleGeometry();
  std::vector<std::byte> bytes = EncodeIntentRecord(IntentRecord{9, 0, {}}, 42, g);
  CHECK_THAT(DecodeIntentRecord(bytes, 43, 0, g).status().message(),
             Catch::Contains("salt mismatch"));
}

TEST_CASE("IntentRecord: sequence 0 and a reserved field are refused", "[metadata]") {
  Geometry g = SampleGeometry();
  std::vector<std::byte> bytes = EncodeIntentRecord(IntentRecord{9, 0, {}}, 42, g);
  PutU64(bytes, ir::kSequence, 0);
  FixIntentRecordChecksum(bytes);
  CHECK_THAT(DecodeIntentRecord(bytes, 42, 0, g).status().message(),
             Catch::Contains("sequence is 0"));
  bytes = EncodeIntentRecord(IntentRecord{9, 0, {}}, 42, g);
  PutU64(bytes, ir::kReserved, 1);
  FixIntentRecordChecksum(bytes);
  CHECK_THAT(DecodeIntentRecord(bytes, 42, 0, g).status().message(),
             Catch::Contains("reserved field"));
}

// -------------------------------------------------------------- bitmap pages

std::vector<uint64_t> SampleWords() {
  std::vector<uint64_t> words(kWordsPerPage, 0);
  words[0] = 0x8000000000000001ull;
  words[100] = 0xdeadbeef;
  return words;
}

TEST_CASE("BitmapPage: encode then decode gives the bits back", "[metadata]") {
  Geometry g = SampleGeometry();
  std::vector<std::byte> block(kBlockBytes);
  EncodeBitmapPage(2, 1, 42, SampleWords(), block);
  std::vector<uint64_t> words(kWordsPerPage);
  REQUIRE(DecodeBitmapPage(block, 2, 1, 42, g, words).ok());
  CHECK(words == SampleWords());
}

TEST_CASE("BitmapPage: a torn page (half old, half new) is refused", "[metadata]") {
  Geometry g = SampleGeometry();
  std::vector<std::byte> old_block(kBlockBytes), new_block(kBlockBytes);
  EncodeBitmapPage(0, 0, 42, std::vector<uint64_t>(kWordsPerPage, 0), old_block);
  EncodeBitmapPage(0, 0, 42, SampleWords(), new_block);
  std::memcpy(old_block.data(), new_block.data(), 512);  // first sector new
  std::vector<uint64_t> words(kWordsPerPage);
  Status s = DecodeBitmapPage(old_block, 0, 0, 42, g, words);
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Catch::Contains("torn"));
}

TEST_CASE("BitmapPage: a page written to the wrong place is refused", "[metadata]") {
  Geometry g = SampleGeometry();
  std::vector<std::byte> block(kBlockBytes);
  EncodeBitmapPage(1, 0, 42, SampleWords(), block);
  std::vector<uint64_t> words(kWordsPerPage);
  CHECK_THAT(DecodeBitmapPage(block, 2, 0, 42, g, words).message(),
             Catch::Contains("misdirected"));
}

TEST_CASE("BitmapPage: bits past the last region are refused", "[metadata]") {
  Result<Geometry> g = MakeGeometry(100 * 4096, 4096, 4096, 4);  // 100 regions
  REQUIRE(g.ok());
  std::vector<uint64_t> words(kWordsPerPage, 0);
  words[1] = uint64_t{1} << 36;  // region 100
  std::vector<std::byte> block(kBlockBytes);
  EncodeBitmapPage(0, 0, 42, words, block);
  std::vector<uint64_t> out(kWordsPerPage);
  CHECK_THAT(DecodeBitmapPage(block, 0, 0, 42, *g, out).message(),
             Catch::Contains("past the volume's last region"));
  words[1] = uint64_t{1} << 35;  // region 99, the last one
  EncodeBitmapPage(0, 0, 42, words, block);
  CHECK(DecodeBitmapPage(block, 0, 0, 42, *g, out).ok());
}

TEST_CASE("BitmapPage: a page of another volume is refused", "[metadata]") {
  Geometry g = SampleGeometry();
  std::vector<std::byte> block(kBlockBytes);
  EncodeBitmapPage(0, 0, 42, SampleWords(), block);
  std::vector<uint64_t> words(kWordsPerPage);
  CHECK_THAT(DecodeBitmapPage(block, 0, 0, 7, g, words).message(),
             Catch::Contains("salt mismatch"));
}

// ------------------------------------------------------------------ geometry

TEST_CASE("Geometry: a volume not a multiple of the region size has a short last region",
          "[metadata]") {
  Result<Geometry> g = MakeGeometry(3 * 65536 + 512, 65536, 1 << 20, 16);
  REQUIRE(g.ok());
  CHECK(g->region_count == 4);
  CHECK(g->RegionBytes(3) == 512);
  CHECK(g->RegionBytes(0) == 65536);
  CHECK(g->extent_count == 1);
}

TEST_CASE("Geometry: a volume smaller than one region has one region", "[metadata]") {
  Result<Geometry> g = MakeGeometry(4096, 16 << 20, 16 << 20, 1);
  REQUIRE(g.ok());
  CHECK(g->region_count == 1);
  CHECK(g->RegionBytes(0) == 4096);
  CHECK(g->pages_per_slot == 1);
}

TEST_CASE("Geometry: region sizes from 4 KiB to 16 MiB are accepted, others refused",
          "[metadata]") {
  CHECK(MakeGeometry(1 << 20, 4096, 4096, 1).ok());
  CHECK(MakeGeometry(1 << 30, 16 << 20, 16 << 20, 1).ok());
  CHECK(MakeGeometry(1 << 20, 2048, 4096, 1).status().IsInvalidArgument());
  CHECK(MakeGeometry(1 << 30, 32 << 20, 32 << 20, 1).status().IsInvalidArgument());
  CHECK(MakeGeometry(1 << 20, 4096, 6144, 1).status().IsInvalidArgument());
}

TEST_CASE("Geometry: a 16 TiB volume at 64 KiB regions has 8257 bitmap pages per slot",
          "[metadata]") {
  Result<Geometry> g = MakeGeometry(16ull << 40, 64 << 10, 4 << 20, 1024);
  REQUIRE(g.ok());
  CHECK(g->region_count == (1ull << 28));
  CHECK(g->pages_per_slot == 8257);
  CHECK(g->intent_record_bytes == 8192);
}

}  // namespace
}  // namespace blockrelay::storage::format
