// Reading and writing a volume's metadata file, shared by VolumeMetadata,
// Scoreboard and InspectVolumeMetadata (which only reads).
//
// Thread safety: functions over a file the caller owns; no shared state.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "blockrelay/io/env.h"
#include "blockrelay/status.h"
#include "storage/metadata_format.h"
#include "storage/slot_bitmap.h"

namespace blockrelay::storage {

struct SuperblockRead {
  format::Superblock superblock;  // the valid copy with the highest sequence
  format::Geometry geometry;
  uint32_t copy = 0;
  std::vector<std::string> notices;  // e.g. the other copy was torn
};

// Reads both superblock copies and picks one. Fails with NotSupported when a
// copy has another format version, Corruption when neither copy is valid or
// the file is shorter than its layout.
Result<SuperblockRead> ReadSuperblock(io::RandomRWFile& file);

struct IntentLogRead {
  std::optional<format::IntentRecord> latest;  // valid, highest sequence
  uint64_t max_sequence = 0;
  uint32_t next_ring_index = 0;  // where the next record goes
};

// Reads the ring. Torn records (bad checksum, no magic) are skipped; a
// record that passes its checksum but holds an impossible field is
// Corruption.
Result<IntentLogRead> ReadIntentLog(io::RandomRWFile& file, const format::Geometry& geometry,
                                    uint64_t salt);

// Loads slot `slot`'s pages into `bitmap`. A torn or misplaced page is
// loaded as all dirty and marked unflushed (so a writer rewrites it); one
// line per slot summarizing such pages goes to *notices. `torn_pages`
// (optional) receives their count.
Status LoadSlotBitmap(io::RandomRWFile& file, const format::Geometry& geometry, uint64_t salt,
                      uint32_t slot, const std::string& site, SlotBitmap* bitmap,
                      std::vector<std::string>* notices, uint64_t* torn_pages = nullptr);

// Sets in `bitmap` every region of the given intent extents.
void ApplyIntentExtents(const std::vector<uint32_t>& extents, const format::Geometry& geometry,
                        SlotBitmap* bitmap);

// Writes `sb` to the superblock copy its sequence selects (sequence % 2),
// so that a torn write leaves the other copy whole. Does not sync.
Status WriteSuperblockCopy(io::RandomRWFile& file, const format::Geometry& geometry,
                           const format::Superblock& sb);

// dirty_bytes of a bitmap (see SlotStats).
uint64_t DirtyBytes(const SlotBitmap& bitmap, const format::Geometry& geometry);

}  // namespace blockrelay::storage
