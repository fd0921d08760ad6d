// Reading and writing a volume's metadata file: see metadata_io.h.

#include "storage/metadata_io.h"

#include <algorithm>

#include <fmt/format.h>

namespace blockrelay::storage {

using format::kBlockBytes;

Result<SuperblockRead> ReadSuperblock(io::RandomRWFile& file) {
  std::vector<std::byte> buf(2 * kBlockBytes, std::byte{0});
  Result<size_t> n = file.PRead(0, buf);  // a short file leaves zeroes
  if (!n.ok()) return n.status();
  std::span<const std::byte> bytes(buf);
  Result<format::Superblock> copies[2] = {format::DecodeSuperblock(bytes.subspan(0, kBlockBytes)),
                                          format::DecodeSuperblock(bytes.subspan(kBlockBytes))};
  for (auto& c : copies) {
    if (!c.ok() && c.status().IsNotSupported()) {
      return c.status().WithContext(file.path());
    }
  }
  if (!copies[0].ok() && !copies[1].ok()) {
    return Status::Corruption(
        fmt::format("{}: both superblock copies are unreadable (copy 0: {}; copy 1: {})",
                    file.path(), copies[0].status().message(), copies[1].status().message()));
  }
  SuperblockRead out;
  if (copies[0].ok() && copies[1].ok()) {
    if (copies[0]->volume_uuid != copies[1]->volume_uuid) {
      return Status::Corruption(fmt::format(
          "{}: the two superblock copies name different volumes ({} and {})", file.path(),
          copies[0]->volume_uuid.ToString(), copies[1]->volume_uuid.ToString()));
    }
    out.copy = copies[1]->sequence > copies[0]->sequence ? 1 : 0;
  } else {
    out.copy = copies[0].ok() ? 0 : 1;
    uint32_t bad = 1 - out.copy;
    // Expected after a crash during a superblock update: the other copy,
    // synced before, is the state that update started from.
    out.notices.push_back(fmt::format("superblock copy {} is unreadable ({}); using copy {}", bad,
                                      copies[bad].status().message(), out.copy));
  }
  out.superblock = std::move(copies[out.copy]).value();
  const format::Superblock& sb = out.superblock;
  Result<format::Geometry> g = format::MakeGeometry(sb.size_bytes, sb.region_size_bytes,
                                                    sb.intent_extent_bytes, sb.max_intent_extents);
  if (!g.ok()) return g.status();  // DecodeSuperblock checked the same values
  out.geometry = *g;
  Result<uint64_t> size = file.Size();
  if (!size.ok()) return size.status();
  if (*size < out.geometry.file_bytes) {
    return Status::Corruption(fmt::format("{}: file is {} bytes but its layout needs {}: truncated",
                                          file.path(), *size, out.geometry.file_bytes));
  }
  return out;
}

Result<IntentLogRead> ReadIntentLog(io::RandomRWFile& file, const format::Geometry& g,
                                    uint64_t salt) {
  IntentLogRead out;
  std::vector<std::byte> buf(g.intent_record_bytes);
  std::optional<uint32_t> latest_ring;
  for (uint32_t i = 0; i < format::kIntentLogRecords; ++i) {
    Status s = io::ReadFully(file, g.IntentRecordOffset(i), buf);
    if (!s.ok()) return s;
    if (!format::IntentRecordIsWhole(buf, g)) continue;  // torn or never written
    Result<format::IntentRecord> r = format::DecodeIntentRecord(buf, salt, i, g);
    if (!r.ok()) return r.status().WithContext(file.path());
    if (r->sequence > out.max_sequence) {
      out.max_sequence = r->sequence;
      latest_ring = i;
      out.latest = std::move(r).value();
    }
  }
  out.next_ring_index = latest_ring ? (*latest_ring + 1) % format::kIntentLogRecords : 0;
  return out;
}

Status LoadSlotBitmap(io::RandomRWFile& file, const format::Geometry& g, uint64_t salt,
                      uint32_t slot, const std::string& site, SlotBitmap* bitmap,
                      std::vector<std::string>* notices, uint64_t* torn_pages) {
  constexpr uint64_t kPagesPerRead = 256;  // 1 MiB reads
  std::vector<std::byte> buf;
  std::vector<uint64_t> words(format::kWordsPerPage);
  std::vector<uint64_t> torn;
  std::string first_error;
  for (uint64_t first = 0; first < g.pages_per_slot; first += kPagesPerRead) {
    uint64_t count = std::min(kPagesPerRead, g.pages_per_slot - first);
    buf.resize(count * kBlockBytes);
    Status s = io::ReadFully(file, g.PageOffset(slot, first), buf);
    if (!s.ok()) return s;
    for (uint64_t i = 0; i < count; ++i) {
      uint64_t page = first + i;
      std::span<const std::byte> block(buf.data() + i * kBlockBytes, kBlockBytes);
      Status d = format::DecodeBitmapPage(block, slot, static_cast<uint32_t>(page), salt, g, words);
      if (d.ok()) {
        bitmap->LoadPage(page, words);
      } else {
        // A torn or corrupt page cannot say which of its regions are clean:
        // all of them may differ. Rewrite it so the next start agrees.
        bitmap->LoadPageAllSet(page);
        bitmap->MarkUnflushed(page);
        if (torn.empty()) first_error = d.message();
        torn.push_back(page);
      }
    }
  }
  if (torn_pages != nullptr) *torn_pages = torn.size();
  if (!torn.empty()) {
    std::string list;
    for (size_t i = 0; i < torn.size() && i < 8; ++i) {
      list += fmt::format("{}{}", i == 0 ? "" : ", ", torn[i]);
    }
    if (torn.size() > 8) list += ", ...";
    notices->push_back(fmt::format(
        "slot {} (site {}): {} bitmap page(s) torn or corrupt (page {}; first: {}); every region "
        "of those pages is treated as dirty",
        slot, site, torn.size(), list, first_error));
  }
  return Status::OK();
}

void ApplyIntentExtents(const std::vector<uint32_t>& extents, const format::Geometry& g,
                        SlotBitmap* bitmap) {
  for (uint32_t e : extents) {
    uint64_t first = uint64_t{e} * g.regions_per_extent;
    uint64_t last = std::min(first + g.regions_per_extent, g.region_count) - 1;
    bitmap->SetRange(first, last);
  }
}

Status WriteSuperblockCopy(io::RandomRWFile& file, const format::Geometry& g,
                           const format::Superblock& sb) {
  std::vector<std::byte> bytes = format::EncodeSuperblock(sb);
  return file.PWrite(g.SuperblockOffset(static_cast<uint32_t>(sb.sequence % 2)), bytes);
}

uint64_t DirtyBytes(const SlotBitmap& bitmap, const format::Geometry& g) {
  uint64_t bytes = bitmap.CountSet() * g.region_size_bytes;
  uint64_t tail = g.size_bytes % g.region_size_bytes;
  if (tail != 0 && bitmap.LastSet()) bytes -= g.region_size_bytes - tail;
  return bytes;
}

}  // namespace blockrelay::storage
