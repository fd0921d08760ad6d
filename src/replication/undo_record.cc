// UndoRecord: see undo_record.h for the file layout and the recovery rules.

#include "replication/undo_record.h"

#include <algorithm>
#include <array>
#include <cassert>
#include <optional>

#include <fmt/format.h>
#include "util/xxhash.h"

namespace blockrelay::replication {

namespace {

constexpr uint32_t kHeaderMagic = 0x48555242;  // "BRUH" in little-endian bytes
constexpr uint32_t kRecordMagic = 0x52555242;  // "BRUR"
constexpr uint16_t kVersion = 1;
constexpr size_t kHeaderChecksummed = 16;
constexpr size_t kRecordChecksummed = 24;

void PutLe(std::span<std::byte> buf, size_t offset, uint64_t value, size_t bytes) {
  for (size_t i = 0; i < bytes; ++i) buf[offset + i] = std::byte(value >> (8 * i));
}

uint64_t GetLe(std::span<const std::byte> buf, size_t offset, size_t bytes) {
  uint64_t v = 0;
  for (size_t i = 0; i < bytes; ++i) {
    v |= uint64_t{std::to_integer<uint8_t>(buf[offset + i])} << (8 * i);
  }
  return v;
}

uint64_t RecordChecksum(std::span<const std::byte> header,
                        std::span<const std::byte> data) {
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  XXH3_64bits_update(state, header.data(), kRecordChecksummed);
  XXH3_64bits_update(state, data.data(), data.size());
  const uint64_t h = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return h;
}

constexpr uint32_t kRecordZeros = 1;  // record flag: no data, all zeros

std::array<std::byte, UndoRecord::kRecordHeaderBytes> EncodeRecordHeader(
    uint32_t volume, uint64_t offset, std::span<const std::byte> data,
    uint64_t zero_length = 0) {
  std::array<std::byte, UndoRecord::kRecordHeaderBytes> h{};
  PutLe(h, 0, kRecordMagic, 4);
  PutLe(h, 4, volume, 4);
  PutLe(h, 8, offset, 8);
  PutLe(h, 16, zero_length ? zero_length : data.size(), 4);
  PutLe(h, 20, zero_length ? kRecordZeros : 0, 4);
  PutLe(h, 24, RecordChecksum(h, data), 8);
  return h;
}

// Bytes of data that follow a record header, or nullopt if its length and
// flags are impossible.
std::optional<uint64_t> RecordDataBytes(std::span<const std::byte> rh) {
  const uint64_t length = GetLe(rh, 16, 4);
  const uint64_t flags = GetLe(rh, 20, 4);
  if (flags == kRecordZeros) {
    if (length == 0 || length > UndoRecord::kMaxZeroRecordBytes) return std::nullopt;
    return 0;
  }
  if (flags != 0 || length > UndoRecord::kMaxRecordBytes) return std::nullopt;
  return length;
}

// Offset of the first intact record (magic, sane length, checksum) that
// starts in (from, size), or nullopt. Reads the rest of the file; only used
// when recovery meets a bad record.
Result<std::optional<uint64_t>> NextIntactRecord(io::RandomRWFile& file,
                                                 uint64_t from, uint64_t size) {
  constexpr size_t kChunk = 1 << 20;
  std::vector<std::byte> buf(kChunk + 3);
  std::array<std::byte, UndoRecord::kRecordHeaderBytes> rh{};
  std::vector<std::byte> data;
  for (uint64_t base = from + 1; base + UndoRecord::kRecordHeaderBytes <= size;
       base += kChunk) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), size - base));
    Result<size_t> got = file.PRead(base, std::span(buf.data(), n));
    if (!got.ok()) return got.status();
    for (size_t i = 0; i + 4 <= *got && i < kChunk; ++i) {
      if (GetLe(buf, i, 4) != kRecordMagic) continue;
      const uint64_t at = base + i;
      if (at + UndoRecord::kRecordHeaderBytes > size) continue;
      Result<size_t> h = file.PRead(at, rh);
      if (!h.ok()) return h.status();
      const std::optional<uint64_t> data_bytes = RecordDataBytes(rh);
      if (!data_bytes || at + UndoRecord::kRecordHeaderBytes + *data_bytes > size) {
        continue;
      }
      const uint64_t length = *data_bytes;
      data.resize(length);
      Result<size_t> d = file.PRead(at + UndoRecord::kRecordHeaderBytes, data);
      if (!d.ok()) return d.status();
      if (RecordChecksum(rh, data) == GetLe(rh, 24, 8)) return std::optional<uint64_t>(at);
    }
  }
  return std::optional<uint64_t>();
}

}  // namespace

UndoRecord::UndoRecord(std::unique_ptr<io::RandomRWFile> file,
                       uint64_t base_group_seq)
    : file_(std::move(file)), base_group_seq_(base_group_seq) {}

Result<std::unique_ptr<UndoRecord>> UndoRecord::Create(io::Env& env,
                                                       const std::string& path,
                                                       uint64_t base_group_seq) {
  const std::string context = "undo record " + path;
  const std::string tmp = path + ".tmp";
  {
    auto file = env.OpenFile(tmp, io::OpenMode::kCreateTruncate);
    if (!file.ok()) return file.status().WithContext(context + ": create");
    std::array<std::byte, kHeaderBytes> header{};
    PutLe(header, 0, kHeaderMagic, 4);
    PutLe(header, 4, kVersion, 2);
    PutLe(header, 6, 0, 2);
    PutLe(header, 8, base_group_seq, 8);
    PutLe(header, 16, XXH3_64bits(header.data(), kHeaderChecksummed), 8);
    Status s = (*file)->PWrite(0, header);
    if (s.ok()) s = (*file)->Sync();
    if (!s.ok()) return s.WithContext(context + ": create");
  }
  if (Status s = env.RenameFile(tmp, path); !s.ok()) return s.WithContext(context);
  if (Status s = env.SyncDir(io::DirName(path)); !s.ok()) return s.WithContext(context);
  auto file = env.OpenFile(path, io::OpenMode::kReadWrite);
  if (!file.ok()) return file.status().WithContext(context);
  return std::unique_ptr<UndoRecord>(
      new UndoRecord(std::move(file).value(), base_group_seq));
}

Result<std::unique_ptr<UndoRecord>> UndoRecord::Open(io::Env& env,
                                                     const std::string& path,
                                                     Recovered* recovered) {
  assert(recovered != nullptr);
  *recovered = Recovered{};
  const std::string context = "undo record " + path;
  auto opened = env.OpenFile(path, io::OpenMode::kReadWrite);
  if (!opened.ok()) return opened.status().WithContext(context);
  std::unique_ptr<io::RandomRWFile> file = std::move(opened).value();
  Result<uint64_t> size = file->Size();
  if (!size.ok()) return size.status().WithContext(context);

  std::array<std::byte, kHeaderChecksummed + 8> header{};
  Result<size_t> n = file->PRead(0, header);
  if (!n.ok()) return n.status().WithContext(context + ": read header");
  if (*n != header.size() || *size < kHeaderBytes) {
    return Status::Corruption(fmt::format("{}: header truncated ({} bytes)", context, *size));
  }
  const uint32_t magic = static_cast<uint32_t>(GetLe(header, 0, 4));
  if (magic != kHeaderMagic) {
    return Status::Corruption(fmt::format("{}: bad header magic {:#010x}", context, magic));
  }
  if (GetLe(header, 16, 8) != XXH3_64bits(header.data(), kHeaderChecksummed)) {
    return Status::Corruption(fmt::format("{}: header checksum mismatch", context));
  }
  const uint16_t version = static_cast<uint16_t>(GetLe(header, 4, 2));
  if (version != kVersion) {
    return Status::NotSupported(fmt::format(
        "{}: format version {}; this blockrelay reads version {}", context,
        version, kVersion));
  }
  std::unique_ptr<UndoRecord> undo(new UndoRecord(std::move(file), GetLe(header, 8, 8)));
  io::RandomRWFile& f = *undo->file_;

  uint64_t offset = kHeaderBytes;
  std::vector<std::byte> data;
  while (offset < *size) {
    const uint64_t left = *size - offset;
    std::string bad;  // why the record at `offset` is not good
    uint64_t record_end = *size;
    std::array<std::byte, kRecordHeaderBytes> rh{};
    if (left < kRecordHeaderBytes) {
      bad = "short record header";
    } else {
      Result<size_t> got = f.PRead(offset, rh);
      if (!got.ok()) return got.status().WithContext(context);
      const uint32_t rmagic = static_cast<uint32_t>(GetLe(rh, 0, 4));
      const std::optional<uint64_t> data_bytes = RecordDataBytes(rh);
      const uint64_t length = data_bytes.value_or(0);
      if (rmagic != kRecordMagic) {
        bad = fmt::format("bad record magic {:#010x}", rmagic);
      } else if (!data_bytes) {
        bad = fmt::format("record length {} with flags {:#x} is impossible",
                          GetLe(rh, 16, 4), GetLe(rh, 20, 4));
      } else {
        record_end = offset + kRecordHeaderBytes + length;
        if (record_end > *size) {
          bad = "record data truncated";
        } else {
          data.resize(length);
          got = f.PRead(offset + kRecordHeaderBytes, data);
          if (!got.ok()) return got.status().WithContext(context);
          if (RecordChecksum(rh, data) != GetLe(rh, 24, 8)) {
            bad = "record checksum mismatch";
          }
        }
      }
    }
    if (bad.empty()) {
      const uint32_t volume = static_cast<uint32_t>(GetLe(rh, 4, 4));
      const uint64_t voff = GetLe(rh, 8, 8);
      const uint32_t length = static_cast<uint32_t>(GetLe(rh, 16, 4));
      const bool zeros = GetLe(rh, 20, 4) == kRecordZeros;
      undo->records_.push_back(RecordPos{offset, volume, voff, length, zeros});
      undo->MarkSaved(volume, voff, length);
      undo->saved_bytes_ += length;
      ++recovered->records;
      offset = record_end;
      continue;
    }
    // A torn tail is the last thing in the file: no intact record follows
    // it. One that does follow was synced, and so was this one before it.
    Result<std::optional<uint64_t>> next = NextIntactRecord(f, offset, *size);
    if (!next.ok()) return next.status().WithContext(context);
    if (next->has_value()) {
      return Status::Corruption(fmt::format(
          "{}: {} at offset {}, followed by an intact record at offset {}; the "
          "record cannot restore the volumes: resync the group fully from its "
          "upstream, then remove this file with the site stopped",
          context, bad, offset, **next));
    }
    recovered->torn_tail_bytes = left;
    if (Status s = f.Truncate(offset); !s.ok()) return s.WithContext(context);
    if (Status s = f.Sync(); !s.ok()) return s.WithContext(context);
    break;
  }
  undo->end_ = offset;
  return undo;
}

Status UndoRecord::Remove(io::Env& env, const std::string& path) {
  if (env.FileExists(path)) {
    if (Status s = env.RemoveFile(path); !s.ok()) {
      return s.WithContext("undo record " + path + ": remove");
    }
  }
  return env.SyncDir(io::DirName(path));
}

void UndoRecord::MarkSaved(uint32_t volume, uint64_t offset, uint64_t length) {
  if (length == 0) return;
  auto& ranges = saved_[volume];
  uint64_t begin = offset, end = offset + length;
  // Merge with every range that overlaps or touches [begin, end).
  auto it = ranges.upper_bound(begin);
  if (it != ranges.begin()) {
    auto prev = std::prev(it);
    if (prev->second >= begin) it = prev;
  }
  while (it != ranges.end() && it->first <= end) {
    begin = std::min(begin, it->first);
    end = std::max(end, it->second);
    it = ranges.erase(it);
  }
  ranges[begin] = end;
}

std::vector<std::pair<uint64_t, uint64_t>> UndoRecord::Unsaved(
    uint32_t volume, uint64_t offset, uint64_t length) const {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  if (length == 0) return out;
  const uint64_t end = offset + length;
  auto vit = saved_.find(volume);
  if (vit == saved_.end()) {
    out.emplace_back(offset, length);
    return out;
  }
  const auto& ranges = vit->second;
  uint64_t pos = offset;
  auto it = ranges.upper_bound(offset);
  if (it != ranges.begin()) --it;
  for (; it != ranges.end() && it->first < end; ++it) {
    if (it->second <= pos) continue;
    if (it->first > pos) out.emplace_back(pos, it->first - pos);
    pos = std::max(pos, it->second);
    if (pos >= end) break;
  }
  if (pos < end) out.emplace_back(pos, end - pos);
  return out;
}

Status UndoRecord::Fail(const Status& s, const std::string& what) {
  Status e = s.WithContext(fmt::format("undo record {}: {}", path(), what));
  if (error_.ok()) error_ = e;
  return e;
}

Status UndoRecord::Append(uint32_t volume, uint64_t offset,
                          std::span<const std::byte> old) {
  if (!error_.ok()) return error_;
  while (!old.empty()) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(old.size(), kMaxRecordBytes));
    std::span<const std::byte> piece = old.first(n);
    auto h = EncodeRecordHeader(volume, offset, piece);
    Status s = file_->PWrite(end_, h);
    if (s.ok()) s = file_->PWrite(end_ + kRecordHeaderBytes, piece);
    if (!s.ok()) return Fail(s, "append");
    records_.push_back(RecordPos{end_, volume, offset, static_cast<uint32_t>(n), false});
    MarkSaved(volume, offset, n);
    saved_bytes_ += n;
    end_ += kRecordHeaderBytes + n;
    offset += n;
    old = old.subspan(n);
  }
  return Status::OK();
}

Status UndoRecord::AppendZeros(uint32_t volume, uint64_t offset, uint64_t length) {
  if (!error_.ok()) return error_;
  while (length > 0) {
    const uint64_t n = std::min(length, kMaxZeroRecordBytes);
    auto h = EncodeRecordHeader(volume, offset, {}, n);
    if (Status s = file_->PWrite(end_, h); !s.ok()) return Fail(s, "append");
    records_.push_back(RecordPos{end_, volume, offset, static_cast<uint32_t>(n), true});
    MarkSaved(volume, offset, n);
    saved_bytes_ += n;
    end_ += kRecordHeaderBytes;
    offset += n;
    length -= n;
  }
  return Status::OK();
}

Status UndoRecord::Sync() {
  if (!error_.ok()) return error_;
  if (Status s = file_->Sync(); !s.ok()) return Fail(s, "sync");
  return Status::OK();
}

Status UndoRecord::ForEachNewestFirst(
    const std::function<Status(uint32_t, uint64_t, uint64_t,
                               std::span<const std::byte>)>& fn) {
  std::vector<std::byte> data;
  std::array<std::byte, kRecordHeaderBytes> rh{};
  for (auto it = records_.rbegin(); it != records_.rend(); ++it) {
    data.resize(it->zeros ? 0 : it->length);
    Result<size_t> got = file_->PRead(it->file_offset, rh);
    if (got.ok() && *got == rh.size()) {
      got = file_->PRead(it->file_offset + kRecordHeaderBytes, data);
    }
    if (!got.ok()) return got.status().WithContext("undo record " + path());
    // Checked again: restoring damaged bytes would be worse than stopping.
    if (*got != data.size() || RecordChecksum(rh, data) != GetLe(rh, 24, 8) ||
        GetLe(rh, 16, 4) != it->length) {
      return Status::Corruption(fmt::format(
          "undo record {}: record at offset {} no longer reads back intact",
          path(), it->file_offset));
    }
    if (Status s = fn(it->volume, it->offset, it->length, data); !s.ok()) return s;
  }
  return Status::OK();
}

}  // namespace blockrelay::replication
