// Codec for the metadata file: see metadata_format.h for the grammar.

#include "storage/metadata_format.h"

#include <sys/sysmacros.h>
#include "util/xxhash.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <set>

#include <fmt/format.h>

namespace blockrelay::storage::format {

void PutU32(std::span<std::byte> buf, size_t offset, uint32_t value) {
  for (size_t i = 0; i < 4; ++i) buf[offset + i] = std::byte(value >> (8 * i));
}
void PutU64(std::span<std::byte> buf, size_t offset, uint64_t value) {
  for (size_t i = 0; i < 8; ++i) buf[offset + i] = std::byte(value >> (8 * i));
}
uint32_t GetU32(std::span<const std::byte> buf, size_t offset) {
  uint32_t v = 0;
  for (size_t i = 0; i < 4; ++i) v |= uint32_t(std::to_integer<uint8_t>(buf[offset + i])) << (8 * i);
  return v;
}
uint64_t GetU64(std::span<const std::byte> buf, size_t offset) {
  uint64_t v = 0;
  for (size_t i = 0; i < 8; ++i) v |= uint64_t(std::to_integer<uint8_t>(buf[offset + i])) << (8 * i);
  return v;
}

namespace {

uint64_t Checksum(std::span<const std::byte> bytes) {
  return XXH3_64bits(bytes.data(), bytes.size());
}

bool AllZero(std::span<const std::byte> bytes) {
  return std::all_of(bytes.begin(), bytes.end(), [](std::byte b) { return b == std::byte{0}; });
}

void PutUuid(std::span<std::byte> buf, size_t offset, const Uuid& uuid) {
  std::memcpy(buf.data() + offset, uuid.bytes.data(), uuid.bytes.size());
}
Uuid GetUuid(std::span<const std::byte> buf, size_t offset) {
  Uuid u;
  std::memcpy(u.bytes.data(), buf.data() + offset, u.bytes.size());
  return u;
}

void PutName(std::span<std::byte> buf, size_t offset, const std::string& name) {
  buf[offset] = std::byte(static_cast<uint8_t>(name.size()));
  std::memcpy(buf.data() + offset + 1, name.data(), name.size());
}

Status DecodeName(std::span<const std::byte> buf, size_t offset, std::string_view field,
                  std::string* out) {
  size_t len = std::to_integer<uint8_t>(buf[offset]);
  if (len == 0 || len > kMaxNameBytes) {
    return Status::Corruption(
        fmt::format("superblock: {} length {} is outside 1..{}", field, len, kMaxNameBytes));
  }
  std::string name(reinterpret_cast<const char*>(buf.data() + offset + 1), len);
  if (!IsValidName(name)) {
    return Status::Corruption(
        fmt::format("superblock: {} has characters outside [A-Za-z0-9._-]", field));
  }
  if (!AllZero(buf.subspan(offset + 1 + len, sb::kNameFieldBytes - 1 - len))) {
    return Status::Corruption(fmt::format("superblock: {} padding is not zero", field));
  }
  *out = std::move(name);
  return Status::OK();
}

void PutGeneration(std::span<std::byte> buf, size_t offset, const Generation& g) {
  PutUuid(buf, offset, g.uuid);
  PutU64(buf, offset + 16, g.counter);
}

Status DecodeGeneration(std::span<const std::byte> buf, size_t offset, std::string_view field,
                        Generation* out) {
  out->uuid = GetUuid(buf, offset);
  out->counter = GetU64(buf, offset + 16);
  if (out->uuid.IsNil()) {
    return Status::Corruption(fmt::format("superblock: {} uuid is nil", field));
  }
  if (out->counter == 0) {
    return Status::Corruption(fmt::format("superblock: {} counter is 0", field));
  }
  return Status::OK();
}

}  // namespace

std::string FormatBytes(uint64_t bytes) {
  if (bytes >= (1ull << 40) && bytes % (1ull << 40) == 0) return fmt::format("{} TiB", bytes >> 40);
  if (bytes >= (1ull << 30) && bytes % (1ull << 30) == 0) return fmt::format("{} GiB", bytes >> 30);
  if (bytes >= (1ull << 20) && bytes % (1ull << 20) == 0) return fmt::format("{} MiB", bytes >> 20);
  if (bytes >= (1ull << 10) && bytes % (1ull << 10) == 0) return fmt::format("{} KiB", bytes >> 10);
  return fmt::format("{} bytes", bytes);
}

std::string FormatDeviceNumber(uint64_t dev) {
  return fmt::format("{}:{}", major(static_cast<dev_t>(dev)), minor(static_cast<dev_t>(dev)));
}

const char* ToString(BackingKind kind) {
  switch (kind) {
    case BackingKind::kNone: return "none";
    case BackingKind::kFile: return "file";
    case BackingKind::kBlockDevice: return "block device";
  }
  return "?";
}

std::string DescribeBacking(const BackingIdentity& b) {
  switch (b.kind) {
    case BackingKind::kNone:
      return "nothing recorded";
    case BackingKind::kFile:
      return fmt::format("regular file, inode {} on device {}", b.inode,
                         FormatDeviceNumber(b.device));
    case BackingKind::kBlockDevice:
      return fmt::format("block device {}", FormatDeviceNumber(b.rdev));
  }
  return "?";
}

bool IsValidName(std::string_view name) {
  if (name.empty() || name.size() > kMaxNameBytes) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '_' || c == '-';
  });
}

uint64_t Geometry::RegionBytes(uint64_t region) const {
  uint64_t start = region * region_size_bytes;
  return std::min(region_size_bytes, size_bytes - start);
}

Result<Geometry> MakeGeometry(uint64_t size_bytes, uint64_t region_size_bytes,
                              uint64_t intent_extent_bytes, uint32_t max_intent_extents) {
  if (size_bytes == 0 || size_bytes % 512 != 0 || size_bytes > (1ull << 62)) {
    return Status::InvalidArgument(
        fmt::format("size_bytes {} must be a positive multiple of 512", size_bytes));
  }
  if (!std::has_single_bit(region_size_bytes) || region_size_bytes < kMinRegionBytes ||
      region_size_bytes > kMaxRegionBytes) {
    return Status::InvalidArgument(fmt::format(
        "region_size_bytes {} must be a power of 2 between 4 KiB and 16 MiB", region_size_bytes));
  }
  if (intent_extent_bytes < region_size_bytes || intent_extent_bytes % region_size_bytes != 0 ||
      intent_extent_bytes > kMaxIntentExtentBytes) {
    return Status::InvalidArgument(
        fmt::format("intent_extent_bytes {} must be a multiple of region_size_bytes {} and at "
                    "most 1 GiB",
                    intent_extent_bytes, region_size_bytes));
  }
  if (max_intent_extents < 1 || max_intent_extents > kMaxIntentExtents) {
    return Status::InvalidArgument(fmt::format("max_intent_extents {} must be between 1 and {}",
                                               max_intent_extents, kMaxIntentExtents));
  }
  Geometry g;
  g.size_bytes = size_bytes;
  g.region_size_bytes = region_size_bytes;
  g.intent_extent_bytes = intent_extent_bytes;
  g.max_intent_extents = max_intent_extents;
  g.region_count = (size_bytes + region_size_bytes - 1) / region_size_bytes;
  g.regions_per_extent = intent_extent_bytes / region_size_bytes;
  g.extent_count = (size_bytes + intent_extent_bytes - 1) / intent_extent_bytes;
  if (g.extent_count > kMaxExtentCount) {
    return Status::InvalidArgument(fmt::format(
        "size_bytes {} has more than 2^32 intent extents of {}", size_bytes,
        FormatBytes(intent_extent_bytes)));
  }
  g.pages_per_slot = (g.region_count + kBitsPerPage - 1) / kBitsPerPage;
  uint64_t record = kIntentRecordHeaderBytes + 4ull * max_intent_extents;
  g.intent_record_bytes = (record + kBlockBytes - 1) / kBlockBytes * kBlockBytes;
  g.intent_log_offset = 2ull * kBlockBytes;
  g.bitmap_offset = g.intent_log_offset + kIntentLogRecords * g.intent_record_bytes;
  g.file_bytes = g.bitmap_offset + uint64_t{kMaxSlots} * g.pages_per_slot * kBlockBytes;
  return g;
}

// ---------------------------------------------------------------- superblock

std::vector<std::byte> EncodeSuperblock(const Superblock& s) {
  std::vector<std::byte> block(kBlockBytes, std::byte{0});
  std::span<std::byte> b(block);
  PutU32(b, sb::kMagic, kSuperblockMagic);
  PutU32(b, sb::kVersion, kFormatVersion);
  PutU64(b, sb::kSequence, s.sequence);
  PutU32(b, sb::kFlags, s.clean_shutdown ? kSuperblockFlagCleanShutdown : 0);
  PutU32(b, sb::kMaxSlotsField, kMaxSlots);
  PutUuid(b, sb::kVolumeUuid, s.volume_uuid);
  PutU64(b, sb::kSizeBytes, s.size_bytes);
  PutU64(b, sb::kRegionBytes, s.region_size_bytes);
  PutU64(b, sb::kExtentBytes, s.intent_extent_bytes);
  PutU32(b, sb::kMaxIntentExtentsField, s.max_intent_extents);
  PutU32(b, sb::kIntentLogRecordsField, kIntentLogRecords);
  PutGeneration(b, sb::kGeneration, s.generation);
  PutU32(b, sb::kHistoryCount, static_cast<uint32_t>(s.generation_history.size()));
  for (size_t i = 0; i < s.generation_history.size(); ++i) {
    PutGeneration(b, sb::kHistory + i * sb::kGenerationBytes, s.generation_history[i]);
  }
  PutName(b, sb::kGroupName, s.group);
  PutName(b, sb::kVolumeName, s.volume);
  PutU32(b, sb::kBackingKind, static_cast<uint32_t>(s.backing.kind));
  PutU32(b, sb::kBackingPathLength, static_cast<uint32_t>(s.backing.path.size()));
  PutU64(b, sb::kBackingDevice, s.backing.device);
  PutU64(b, sb::kBackingInode, s.backing.inode);
  PutU64(b, sb::kBackingRdev, s.backing.rdev);
  std::memcpy(block.data() + sb::kBackingPath, s.backing.path.data(), s.backing.path.size());
  for (size_t i = 0; i < kMaxSlots; ++i) {
    const SlotEntry& slot = s.slots[i];
    if (!slot.in_use) continue;
    size_t base = sb::kSlots + i * sb::kSlotBytes;
    b[base + sb::kSlotInUse] = std::byte{1};
    PutU32(b, base + sb::kSlotFlags, slot.flags);
    PutU64(b, base + sb::kSlotCreatedSequence, slot.created_sequence);
    PutName(b, base + sb::kSlotSite, slot.site);
  }
  FixSuperblockChecksum(b);
  return block;
}

void FixSuperblockChecksum(std::span<std::byte> block) {
  PutU64(block, sb::kChecksum, Checksum(block.subspan(16)));
}

Result<Superblock> DecodeSuperblock(std::span<const std::byte> b) {
  if (b.size() != kBlockBytes) {
    return Status::Corruption(
        fmt::format("superblock: {} bytes instead of {}", b.size(), kBlockBytes));
  }
  uint32_t magic = GetU32(b, sb::kMagic);
  if (magic != kSuperblockMagic) {
    return Status::Corruption(fmt::format(
        "superblock: magic 0x{:08x} is not a blockrelay metadata superblock", magic));
  }
  // The version comes before the checksum: another version may place the
  // checksum elsewhere, and the operator needs to hear "version", not
  // "corrupt".
  uint32_t version = GetU32(b, sb::kVersion);
  if (version != kFormatVersion) {
    return Status::NotSupported(fmt::format(
        "metadata format version {} was written by another blockrelay release; this one reads "
        "format version {} only",
        version, kFormatVersion));
  }
  uint64_t stored = GetU64(b, sb::kChecksum);
  uint64_t actual = Checksum(b.subspan(16));
  if (stored != actual) {
    return Status::Corruption(fmt::format(
        "superblock: checksum mismatch (stored {:016x}, computed {:016x}): torn or corrupt",
        stored, actual));
  }

  Superblock s;
  s.sequence = GetU64(b, sb::kSequence);
  if (s.sequence == 0) return Status::Corruption("superblock: sequence is 0");
  uint32_t flags = GetU32(b, sb::kFlags);
  if ((flags & ~kSuperblockFlagCleanShutdown) != 0) {
    return Status::Corruption(fmt::format("superblock: unknown flags 0x{:x}", flags));
  }
  s.clean_shutdown = (flags & kSuperblockFlagCleanShutdown) != 0;
  uint32_t max_slots = GetU32(b, sb::kMaxSlotsField);
  if (max_slots != kMaxSlots) {
    return Status::Corruption(
        fmt::format("superblock: max_slots {} instead of {}", max_slots, kMaxSlots));
  }
  s.volume_uuid = GetUuid(b, sb::kVolumeUuid);
  if (s.volume_uuid.IsNil()) return Status::Corruption("superblock: volume_uuid is nil");
  s.size_bytes = GetU64(b, sb::kSizeBytes);
  s.region_size_bytes = GetU64(b, sb::kRegionBytes);
  s.intent_extent_bytes = GetU64(b, sb::kExtentBytes);
  s.max_intent_extents = GetU32(b, sb::kMaxIntentExtentsField);
  Result<Geometry> geometry = MakeGeometry(s.size_bytes, s.region_size_bytes,
                                           s.intent_extent_bytes, s.max_intent_extents);
  if (!geometry.ok()) {
    return Status::Corruption("superblock: " + geometry.status().message());
  }
  uint32_t records = GetU32(b, sb::kIntentLogRecordsField);
  if (records != kIntentLogRecords) {
    return Status::Corruption(fmt::format("superblock: intent_log_records {} instead of {}",
                                          records, kIntentLogRecords));
  }
  Status st = DecodeGeneration(b, sb::kGeneration, "generation", &s.generation);
  if (!st.ok()) return st;
  uint32_t history = GetU32(b, sb::kHistoryCount);
  if (history > kMaxGenerationHistory) {
    return Status::Corruption(fmt::format("superblock: generation_history_count {} exceeds {}",
                                          history, kMaxGenerationHistory));
  }
  if (GetU32(b, sb::kReserved108) != 0) {
    return Status::Corruption("superblock: reserved field at byte 108 is not zero");
  }
  for (uint32_t i = 0; i < kMaxGenerationHistory; ++i) {
    size_t off = sb::kHistory + i * sb::kGenerationBytes;
    if (i < history) {
      Generation g;
      st = DecodeGeneration(b, off, fmt::format("generation_history[{}]", i), &g);
      if (!st.ok()) return st;
      s.generation_history.push_back(g);
    } else if (!AllZero(b.subspan(off, sb::kGenerationBytes))) {
      return Status::Corruption(
          fmt::format("superblock: unused generation_history[{}] is not zero", i));
    }
  }
  st = DecodeName(b, sb::kGroupName, "group name", &s.group);
  if (!st.ok()) return st;
  st = DecodeName(b, sb::kVolumeName, "volume name", &s.volume);
  if (!st.ok()) return st;

  uint32_t kind = GetU32(b, sb::kBackingKind);
  if (kind > static_cast<uint32_t>(BackingKind::kBlockDevice)) {
    return Status::Corruption(fmt::format("superblock: backing_kind {} is unknown", kind));
  }
  s.backing.kind = static_cast<BackingKind>(kind);
  uint32_t path_len = GetU32(b, sb::kBackingPathLength);
  if (path_len > kMaxBackingPathBytes) {
    return Status::Corruption(fmt::format("superblock: backing_path_length {} exceeds {}",
                                          path_len, kMaxBackingPathBytes));
  }
  s.backing.device = GetU64(b, sb::kBackingDevice);
  s.backing.inode = GetU64(b, sb::kBackingInode);
  s.backing.rdev = GetU64(b, sb::kBackingRdev);
  s.backing.path.assign(reinterpret_cast<const char*>(b.data() + sb::kBackingPath), path_len);
  if (s.backing.path.find('\0') != std::string::npos) {
    return Status::Corruption("superblock: backing_path contains a NUL byte");
  }
  if (!AllZero(b.subspan(sb::kBackingPath + path_len, kMaxBackingPathBytes - path_len))) {
    return Status::Corruption("superblock: backing_path padding is not zero");
  }
  switch (s.backing.kind) {
    case BackingKind::kNone:
      if (path_len != 0 || s.backing.device != 0 || s.backing.inode != 0 || s.backing.rdev != 0) {
        return Status::Corruption("superblock: backing_kind none with a path or device numbers");
      }
      break;
    case BackingKind::kFile:
      if (path_len == 0 || s.backing.rdev != 0) {
        return Status::Corruption(
            "superblock: backing_kind file needs a path and no backing_rdev");
      }
      break;
    case BackingKind::kBlockDevice:
      if (path_len == 0 || s.backing.device != 0 || s.backing.inode != 0) {
        return Status::Corruption(
            "superblock: backing_kind block device needs a path and only backing_rdev");
      }
      break;
  }

  std::set<std::string> sites;
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    size_t base = sb::kSlots + i * sb::kSlotBytes;
    auto entry = b.subspan(base, sb::kSlotBytes);
    uint8_t in_use = std::to_integer<uint8_t>(entry[sb::kSlotInUse]);
    if (in_use > 1) {
      return Status::Corruption(fmt::format("superblock: slot {} in_use is {}", i, in_use));
    }
    if (in_use == 0) {
      if (!AllZero(entry)) {
        return Status::Corruption(fmt::format("superblock: unused slot {} is not zero", i));
      }
      continue;
    }
    if (!AllZero(entry.subspan(1, 3))) {
      return Status::Corruption(fmt::format("superblock: slot {} reserved bytes are not zero", i));
    }
    SlotEntry& slot = s.slots[i];
    slot.in_use = true;
    slot.flags = GetU32(entry, sb::kSlotFlags);
    if ((slot.flags & ~kSlotFlagInitialSyncNone) != 0) {
      return Status::Corruption(
          fmt::format("superblock: slot {} has unknown flags 0x{:x}", i, slot.flags));
    }
    slot.created_sequence = GetU64(entry, sb::kSlotCreatedSequence);
    if (slot.created_sequence == 0 || slot.created_sequence > s.sequence) {
      return Status::Corruption(
          fmt::format("superblock: slot {} created_sequence {} is not in 1..{}", i,
                      slot.created_sequence, s.sequence));
    }
    st = DecodeName(entry, sb::kSlotSite, fmt::format("slot {} site", i), &slot.site);
    if (!st.ok()) return st;
    if (!sites.insert(slot.site).second) {
      return Status::Corruption(
          fmt::format("superblock: site {} has two slots (second is {})", slot.site, i));
    }
  }
  if (!AllZero(b.subspan(sb::kEnd))) {
    return Status::Corruption(
        fmt::format("superblock: reserved bytes {}..{} are not zero", sb::kEnd, kBlockBytes));
  }
  return s;
}

// ------------------------------------------------------------ intent records

std::vector<std::byte> EncodeIntentRecord(const IntentRecord& r, uint64_t salt,
                                          const Geometry& g) {
  size_t used = kIntentRecordHeaderBytes + 4 * r.extents.size();
  size_t bytes = (used + kBlockBytes - 1) / kBlockBytes * kBlockBytes;
  std::vector<std::byte> out(bytes, std::byte{0});
  std::span<std::byte> b(out);
  PutU32(b, ir::kMagic, kIntentRecordMagic);
  PutU32(b, ir::kVersion, kFormatVersion);
  PutU64(b, ir::kSequence, r.sequence);
  PutU64(b, ir::kSalt, salt);
  PutU32(b, ir::kRingIndex, r.ring_index);
  PutU32(b, ir::kCount, static_cast<uint32_t>(r.extents.size()));
  for (size_t i = 0; i < r.extents.size(); ++i) PutU32(b, ir::kExtents + 4 * i, r.extents[i]);
  FixIntentRecordChecksum(b);
  return out;
}

void FixIntentRecordChecksum(std::span<std::byte> b) {
  uint32_t count = GetU32(b, ir::kCount);
  size_t used = kIntentRecordHeaderBytes + 4ull * count;
  if (used > b.size()) used = b.size();
  PutU64(b, ir::kChecksum, Checksum(b.subspan(16, used - 16)));
}

bool IntentRecordIsWhole(std::span<const std::byte> b, const Geometry& g) {
  if (b.size() < kIntentRecordHeaderBytes) return false;
  if (GetU32(b, ir::kMagic) != kIntentRecordMagic) return false;
  if (GetU32(b, ir::kVersion) != kFormatVersion) return false;
  uint32_t count = GetU32(b, ir::kCount);
  if (count > g.max_intent_extents) return false;
  size_t used = kIntentRecordHeaderBytes + 4ull * count;
  if (used > b.size()) return false;
  return GetU64(b, ir::kChecksum) == Checksum(b.subspan(16, used - 16));
}

Result<IntentRecord> DecodeIntentRecord(std::span<const std::byte> b, uint64_t salt,
                                        uint32_t ring_index, const Geometry& g) {
  if (b.size() < kIntentRecordHeaderBytes) {
    return Status::Corruption("intent record: shorter than its header");
  }
  uint32_t magic = GetU32(b, ir::kMagic);
  if (magic != kIntentRecordMagic) {
    return Status::Corruption(fmt::format("intent record {}: bad magic 0x{:08x}", ring_index,
                                          magic));
  }
  uint32_t version = GetU32(b, ir::kVersion);
  if (version != kFormatVersion) {
    return Status::NotSupported(fmt::format(
        "intent record {}: format version {}, this blockrelay reads version {} only", ring_index,
        version, kFormatVersion));
  }
  uint32_t count = GetU32(b, ir::kCount);
  if (count > g.max_intent_extents) {
    return Status::Corruption(fmt::format("intent record {}: count {} exceeds {}", ring_index,
                                          count, g.max_intent_extents));
  }
  size_t used = kIntentRecordHeaderBytes + 4ull * count;
  if (used > b.size()) {
    return Status::Corruption(fmt::format("intent record {}: count {} does not fit", ring_index,
                                          count));
  }
  uint64_t stored = GetU64(b, ir::kChecksum);
  if (stored != Checksum(b.subspan(16, used - 16))) {
    return Status::Corruption(
        fmt::format("intent record {}: checksum mismatch: torn or corrupt", ring_index));
  }
  IntentRecord r;
  r.sequence = GetU64(b, ir::kSequence);
  if (r.sequence == 0) {
    return Status::Corruption(fmt::format("intent record {}: sequence is 0", ring_index));
  }
  if (GetU64(b, ir::kSalt) != salt) {
    return Status::Corruption(
        fmt::format("intent record {}: belongs to another volume (salt mismatch)", ring_index));
  }
  r.ring_index = GetU32(b, ir::kRingIndex);
  if (r.ring_index != ring_index) {
    return Status::Corruption(fmt::format("intent record {}: says it is record {}", ring_index,
                                          r.ring_index));
  }
  if (GetU64(b, ir::kReserved) != 0) {
    return Status::Corruption(fmt::format("intent record {}: reserved field is not zero",
                                          ring_index));
  }
  r.extents.reserve(count);
  for (uint32_t i = 0; i < count; ++i) {
    uint32_t e = GetU32(b, ir::kExtents + 4ull * i);
    if (e >= g.extent_count) {
      return Status::Corruption(fmt::format(
          "intent record {}: extent {} is beyond the volume's {} extents", ring_index, e,
          g.extent_count));
    }
    if (!r.extents.empty() && e <= r.extents.back()) {
      return Status::Corruption(
          fmt::format("intent record {}: extents are not strictly ascending", ring_index));
    }
    r.extents.push_back(e);
  }
  return r;
}

// -------------------------------------------------------------- bitmap pages

void EncodeBitmapPage(uint32_t slot, uint32_t page_index, uint64_t salt,
                      std::span<const uint64_t> words, std::span<std::byte> out) {
  std::fill(out.begin(), out.begin() + kBitmapPageHeaderBytes, std::byte{0});
  PutU32(out, bp::kMagic, kBitmapPageMagic);
  PutU32(out, bp::kSlot, slot);
  PutU32(out, bp::kPageIndex, page_index);
  PutU64(out, bp::kSalt, salt);
  for (size_t w = 0; w < kWordsPerPage; ++w) PutU64(out, bp::kBits + 8 * w, words[w]);
  FixBitmapPageChecksum(out);
}

void FixBitmapPageChecksum(std::span<std::byte> block) {
  PutU64(block, bp::kChecksum, Checksum(block.subspan(16, kBlockBytes - 16)));
}

Status DecodeBitmapPage(std::span<const std::byte> b, uint32_t slot, uint32_t page_index,
                        uint64_t salt, const Geometry& g, std::span<uint64_t> words) {
  if (b.size() != kBlockBytes) {
    return Status::Corruption(fmt::format("bitmap page {}: {} bytes", page_index, b.size()));
  }
  uint32_t magic = GetU32(b, bp::kMagic);
  if (magic != kBitmapPageMagic) {
    return Status::Corruption(
        fmt::format("bitmap page {} of slot {}: bad magic 0x{:08x}", page_index, slot, magic));
  }
  if (GetU64(b, bp::kChecksum) != Checksum(b.subspan(16))) {
    return Status::Corruption(fmt::format(
        "bitmap page {} of slot {}: checksum mismatch: torn or corrupt", page_index, slot));
  }
  if (GetU32(b, bp::kSlot) != slot || GetU32(b, bp::kPageIndex) != page_index) {
    return Status::Corruption(fmt::format(
        "bitmap page {} of slot {}: holds page {} of slot {} (misdirected write)", page_index,
        slot, GetU32(b, bp::kPageIndex), GetU32(b, bp::kSlot)));
  }
  if (GetU32(b, bp::kReserved) != 0) {
    return Status::Corruption(
        fmt::format("bitmap page {} of slot {}: reserved field is not zero", page_index, slot));
  }
  if (GetU64(b, bp::kSalt) != salt) {
    return Status::Corruption(fmt::format(
        "bitmap page {} of slot {}: belongs to another volume (salt mismatch)", page_index, slot));
  }
  for (size_t w = 0; w < kWordsPerPage; ++w) words[w] = GetU64(b, bp::kBits + 8 * w);
  // Bits past the last region must be clear.
  uint64_t first_region = uint64_t{page_index} * kBitsPerPage;
  if (first_region >= g.region_count) {
    return Status::Corruption(
        fmt::format("bitmap page {} is past the volume's last region", page_index));
  }
  uint64_t valid = std::min<uint64_t>(kBitsPerPage, g.region_count - first_region);
  for (uint64_t w = valid / 64; w < kWordsPerPage; ++w) {
    uint64_t allowed = 0;
    if (w == valid / 64 && valid % 64 != 0) allowed = (uint64_t{1} << (valid % 64)) - 1;
    if ((words[w] & ~allowed) != 0) {
      return Status::Corruption(fmt::format(
          "bitmap page {} of slot {}: bits set past the volume's last region", page_index, slot));
    }
  }
  return Status::OK();
}

}  // namespace blockrelay::storage::format
