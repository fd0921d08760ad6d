// The on-disk format of a volume's metadata file: a pure codec.
//
// Bytes in, structs or Status::Corruption out; no I/O, so tests can corrupt
// any byte (the style of leveldb db/log_format.h). volume_metadata.cc and
// scoreboard.cc do the reading and writing; docs/metadata-format.md explains
// the design.
//
// Grammar (format version 1; every integer little-endian; a "block" is 4096
// bytes; checksums are XXH3-64 over the bytes after the checksum field):
//
//   metadata_file := superblock[2] intent_log bitmap_area[kMaxSlots]
//       offset 0:    superblock copy 0
//       offset 4096: superblock copy 1
//       offset 8192: intent_log
//       then:        bitmap_area of slot 0, 1, ... kMaxSlots-1 (unused slots
//                    are never written: holes in a sparse file)
//
//   superblock := (one block; the copy with the highest valid `sequence`
//                  wins; updates alternate copies: sequence n goes to copy
//                  n % 2, so a torn update leaves the other copy intact)
//       0    u32  magic = "BRMD"
//       4    u32  format_version = 1   (checked before anything else)
//       8    u64  checksum of bytes [16, 4096)
//       16   u64  sequence              (>= 1)
//       24   u32  flags                 bit 0: clean_shutdown; others 0
//       28   u32  max_slots = kMaxSlots
//       32   u8[16] volume_uuid         (not nil)
//       48   u64  size_bytes            (> 0, multiple of 512)
//       56   u64  region_size_bytes     (power of 2, 4 KiB .. 16 MiB)
//       64   u64  intent_extent_bytes   (multiple of region_size_bytes, <= 1 GiB)
//       72   u32  max_intent_extents    (1 .. 65536)
//       76   u32  intent_log_records = kIntentLogRecords
//       80   generation                 current (uuid not nil, counter >= 1)
//       104  u32  generation_history_count (<= 4)
//       108  u32  reserved = 0
//       112  generation[4]              history, newest first; unused = 0
//       208  name  group
//       288  name  volume
//       368  u32  backing_kind          0 none, 1 regular file, 2 block device
//       372  u32  backing_path_length   (<= 1024; 0 iff kind is none)
//       376  u64  backing_device        st_dev  (files; 0 otherwise)
//       384  u64  backing_inode         st_ino  (files; 0 otherwise)
//       392  u64  backing_rdev          st_rdev (block devices; 0 otherwise)
//       400  u8[1024] backing_path      (no NUL inside; zero padded)
//       1424 slot[kMaxSlots]
//       2960 .. 4096 reserved = 0
//   generation := u8[16] uuid, u64 counter                         (24 bytes)
//   name := u8 length (1..64), u8[64] [A-Za-z0-9._-] zero padded,
//           u8[15] reserved = 0                                     (80 bytes)
//   slot := u8 in_use (0|1), u8[3] reserved = 0, u32 flags (bit 0:
//           created with initial_sync none), u64 created_sequence,
//           name site                                               (96 bytes)
//           (an unused slot is all zero; in-use sites are unique)
//
//   intent_log := intent_record[kIntentLogRecords], each
//           intent_record_bytes = round_up(48 + 4 * max_intent_extents, 4096)
//       A ring; every record lists the complete set of hot intent extents
//       at the time it was written, so recovery needs only the valid record
//       with the highest sequence. A torn record fails its checksum and the
//       one before it (synced earlier) is used.
//   intent_record :=
//       0    u32  magic = "BRIL"
//       4    u32  format_version = 1
//       8    u64  checksum of bytes [16, 48 + 4 * count)
//       16   u64  sequence              (>= 1)
//       24   u64  salt = volume_uuid's first 8 bytes (little-endian)
//       32   u32  ring_index            (= its position in the ring)
//       36   u32  count                 (<= max_intent_extents)
//       40   u64  reserved = 0
//       48   u32  extent[count]         strictly ascending, < extent_count
//
//   bitmap_area := bitmap_page[pages_per_slot]
//       pages_per_slot = ceil(region_count / kBitsPerPage)
//   bitmap_page := (one block, written in place; a torn page fails its
//                   checksum and is read as "every region dirty")
//       0    u32  magic = "BRBM"
//       4    u32  slot index
//       8    u64  checksum of bytes [16, 4096)
//       16   u32  page index
//       20   u32  reserved = 0
//       24   u64  salt = volume_uuid's first 8 bytes
//       32   u64[508] bits: region page_index * kBitsPerPage + 64 * w + b is
//                 dirty iff bit b of word w is set; bits past the last
//                 region are 0.
//
// Thread safety: pure functions over caller-owned buffers.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "blockrelay/status.h"
#include "blockrelay/storage/generation.h"
#include "blockrelay/storage/uuid.h"

namespace blockrelay::storage::format {

inline constexpr uint32_t kBlockBytes = 4096;
inline constexpr uint32_t kFormatVersion = 1;
inline constexpr uint32_t kSuperblockMagic = 0x444d5242;    // "BRMD"
inline constexpr uint32_t kIntentRecordMagic = 0x4c495242;  // "BRIL"
inline constexpr uint32_t kBitmapPageMagic = 0x4d425242;    // "BRBM"

inline constexpr uint32_t kMaxSlots = 16;
inline constexpr uint32_t kMaxNameBytes = 64;
inline constexpr uint32_t kMaxBackingPathBytes = 1024;
inline constexpr uint32_t kMaxGenerationHistory = 4;
inline constexpr uint32_t kIntentLogRecords = 8;
inline constexpr uint32_t kIntentRecordHeaderBytes = 48;
inline constexpr uint32_t kMaxIntentExtents = 65536;
inline constexpr uint64_t kMinRegionBytes = 4096;
inline constexpr uint64_t kMaxRegionBytes = 16ull << 20;
inline constexpr uint64_t kMaxIntentExtentBytes = 1ull << 30;
inline constexpr uint64_t kMaxExtentCount = 1ull << 32;  // u32 extent numbers

inline constexpr uint32_t kBitmapPageHeaderBytes = 32;
inline constexpr uint32_t kWordsPerPage = (kBlockBytes - kBitmapPageHeaderBytes) / 8;  // 508
inline constexpr uint64_t kBitsPerPage = uint64_t{kWordsPerPage} * 64;               // 32512

inline constexpr uint32_t kSuperblockFlagCleanShutdown = 1u << 0;
inline constexpr uint32_t kSlotFlagInitialSyncNone = 1u << 0;

// Byte offsets of superblock fields (the grammar above), for the codec and
// for tests that corrupt one field.
namespace sb {
inline constexpr size_t kMagic = 0;
inline constexpr size_t kVersion = 4;
inline constexpr size_t kChecksum = 8;
inline constexpr size_t kSequence = 16;
inline constexpr size_t kFlags = 24;
inline constexpr size_t kMaxSlotsField = 28;
inline constexpr size_t kVolumeUuid = 32;
inline constexpr size_t kSizeBytes = 48;
inline constexpr size_t kRegionBytes = 56;
inline constexpr size_t kExtentBytes = 64;
inline constexpr size_t kMaxIntentExtentsField = 72;
inline constexpr size_t kIntentLogRecordsField = 76;
inline constexpr size_t kGeneration = 80;
inline constexpr size_t kHistoryCount = 104;
inline constexpr size_t kReserved108 = 108;
inline constexpr size_t kHistory = 112;
inline constexpr size_t kGenerationBytes = 24;
inline constexpr size_t kGroupName = 208;
inline constexpr size_t kVolumeName = 288;
inline constexpr size_t kNameFieldBytes = 80;
inline constexpr size_t kBackingKind = 368;
inline constexpr size_t kBackingPathLength = 372;
inline constexpr size_t kBackingDevice = 376;
inline constexpr size_t kBackingInode = 384;
inline constexpr size_t kBackingRdev = 392;
inline constexpr size_t kBackingPath = 400;
inline constexpr size_t kSlots = 1424;
inline constexpr size_t kSlotBytes = 96;
inline constexpr size_t kSlotInUse = 0;
inline constexpr size_t kSlotFlags = 4;
inline constexpr size_t kSlotCreatedSequence = 8;
inline constexpr size_t kSlotSite = 16;
inline constexpr size_t kEnd = kSlots + kMaxSlots * kSlotBytes;  // 2960
}  // namespace sb

// Byte offsets inside an intent record and a bitmap page.
namespace ir {
inline constexpr size_t kMagic = 0;
inline constexpr size_t kVersion = 4;
inline constexpr size_t kChecksum = 8;
inline constexpr size_t kSequence = 16;
inline constexpr size_t kSalt = 24;
inline constexpr size_t kRingIndex = 32;
inline constexpr size_t kCount = 36;
inline constexpr size_t kReserved = 40;
inline constexpr size_t kExtents = 48;
}  // namespace ir
namespace bp {
inline constexpr size_t kMagic = 0;
inline constexpr size_t kSlot = 4;
inline constexpr size_t kChecksum = 8;
inline constexpr size_t kPageIndex = 16;
inline constexpr size_t kReserved = 20;
inline constexpr size_t kSalt = 24;
inline constexpr size_t kBits = 32;
}  // namespace bp

enum class BackingKind : uint32_t { kNone = 0, kFile = 1, kBlockDevice = 2 };
const char* ToString(BackingKind kind);

using storage::Generation;

struct BackingIdentity {
  BackingKind kind = BackingKind::kNone;
  std::string path;
  uint64_t device = 0;
  uint64_t inode = 0;
  uint64_t rdev = 0;
  friend bool operator==(const BackingIdentity&, const BackingIdentity&) = default;
};

// "regular file, inode 131 on device 8:1", "block device 8:16",
// "nothing recorded".
std::string DescribeBacking(const BackingIdentity& backing);

struct SlotEntry {
  bool in_use = false;
  uint32_t flags = 0;
  uint64_t created_sequence = 0;  // superblock sequence that added the slot
  std::string site;
  friend bool operator==(const SlotEntry&, const SlotEntry&) = default;
};

struct Superblock {
  uint64_t sequence = 1;
  bool clean_shutdown = false;
  Uuid volume_uuid;
  uint64_t size_bytes = 0;
  uint64_t region_size_bytes = 0;
  uint64_t intent_extent_bytes = 0;
  uint32_t max_intent_extents = 0;
  Generation generation;
  std::vector<Generation> generation_history;  // newest first
  std::string group;
  std::string volume;
  BackingIdentity backing;
  std::array<SlotEntry, kMaxSlots> slots;
  friend bool operator==(const Superblock&, const Superblock&) = default;
};

// The layout that follows from a volume's size and region/extent sizes.
struct Geometry {
  uint64_t size_bytes = 0;
  uint64_t region_size_bytes = 0;
  uint64_t intent_extent_bytes = 0;
  uint32_t max_intent_extents = 0;

  uint64_t region_count = 0;
  uint64_t regions_per_extent = 0;
  uint64_t extent_count = 0;
  uint64_t pages_per_slot = 0;
  uint64_t intent_record_bytes = 0;
  uint64_t intent_log_offset = 0;
  uint64_t bitmap_offset = 0;
  uint64_t file_bytes = 0;

  uint64_t SuperblockOffset(uint32_t copy) const { return uint64_t{copy} * kBlockBytes; }
  uint64_t IntentRecordOffset(uint32_t ring_index) const {
    return intent_log_offset + uint64_t{ring_index} * intent_record_bytes;
  }
  uint64_t PageOffset(uint32_t slot, uint64_t page) const {
    return bitmap_offset + (uint64_t{slot} * pages_per_slot + page) * kBlockBytes;
  }
  // Bytes of the volume in `region` (the last one may be short).
  uint64_t RegionBytes(uint64_t region) const;
};

// Validates the sizes and computes the layout. InvalidArgument names the
// offending value and the allowed range.
Result<Geometry> MakeGeometry(uint64_t size_bytes, uint64_t region_size_bytes,
                              uint64_t intent_extent_bytes, uint32_t max_intent_extents);

// "64 KiB", "1 GiB", "4608 bytes": binary units when exact, for messages.
std::string FormatBytes(uint64_t bytes);
// "8:1": a dev_t as major:minor, for messages.
std::string FormatDeviceNumber(uint64_t dev);

// Names of groups, volumes and sites: [A-Za-z0-9._-]{1,64}.
bool IsValidName(std::string_view name);

// --- superblock ---
// REQUIRES: `sb` is valid (DecodeSuperblock would accept the result).
std::vector<std::byte> EncodeSuperblock(const Superblock& sb);
// Checks magic, then the version (NotSupported naming both versions), then
// the checksum, then every field. Corruption names the field.
Result<Superblock> DecodeSuperblock(std::span<const std::byte> block);
// Recomputes the checksum in place (for tests that forge a field).
void FixSuperblockChecksum(std::span<std::byte> block);

// --- intent records ---
struct IntentRecord {
  uint64_t sequence = 0;
  uint32_t ring_index = 0;
  std::vector<uint32_t> extents;  // strictly ascending
};
// Returns the bytes to write at IntentRecordOffset(ring_index): the used
// part, rounded up to whole blocks. REQUIRES: extents.size() <=
// max_intent_extents, ascending, each < extent_count.
std::vector<std::byte> EncodeIntentRecord(const IntentRecord& record, uint64_t salt,
                                          const Geometry& geometry);
// `bytes` is the whole record slot (intent_record_bytes).
Result<IntentRecord> DecodeIntentRecord(std::span<const std::byte> bytes, uint64_t salt,
                                        uint32_t ring_index, const Geometry& geometry);
void FixIntentRecordChecksum(std::span<std::byte> bytes);
// Whether `bytes` holds a record that was written whole: magic, version,
// count and checksum agree. False for never-written and torn records, which
// recovery skips; a record that passes this but fails DecodeIntentRecord is
// corrupt.
bool IntentRecordIsWhole(std::span<const std::byte> bytes, const Geometry& geometry);

// --- bitmap pages ---
// Writes one block into `out` (kBlockBytes). `words` has kWordsPerPage words.
void EncodeBitmapPage(uint32_t slot, uint32_t page_index, uint64_t salt,
                      std::span<const uint64_t> words, std::span<std::byte> out);
// Fills `words` (kWordsPerPage) or returns Corruption (torn, misplaced,
// bits past the end).
Status DecodeBitmapPage(std::span<const std::byte> block, uint32_t slot, uint32_t page_index,
                        uint64_t salt, const Geometry& geometry, std::span<uint64_t> words);
void FixBitmapPageChecksum(std::span<std::byte> block);

// Little-endian field access, shared with tests.
void PutU32(std::span<std::byte> buf, size_t offset, uint32_t value);
void PutU64(std::span<std::byte> buf, size_t offset, uint64_t value);
uint32_t GetU32(std::span<const std::byte> buf, size_t offset);
uint64_t GetU64(std::span<const std::byte> buf, size_t offset);

}  // namespace blockrelay::storage::format
