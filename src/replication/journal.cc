// GroupJournal: see journal.h for the file layout and the recovery rules.

#include "replication/journal.h"

#include <array>
#include <cassert>
#include <random>
#include <utility>
#include <variant>

#include <fmt/format.h>
#include "util/xxhash.h"

namespace blockrelay::replication {

namespace {

constexpr uint32_t kHeaderMagic = 0x484a5242;  // "BRJH" in little-endian bytes
constexpr uint16_t kVersion1 = 1;  // no epoch; records are bare frames
constexpr uint16_t kVersion2 = 2;
constexpr size_t kSlotBytes = 512;
// Slot fields.
constexpr size_t kMagicOffset = 0;
constexpr size_t kVersionOffset = 4;
constexpr size_t kReservedOffset = 6;
constexpr size_t kCounterOffset = 8;
constexpr size_t kAppliedOffset = 16;
constexpr size_t kV1ChecksumOffset = 24;  // of the 24 bytes before it
constexpr size_t kEpochOffset = 24;
constexpr size_t kV2ChecksumOffset = 32;  // of the 32 bytes before it
// A version 2 record: u64 epoch | u64 tag | the frame. The tag is XXH3-64
// of the frame's header (which holds the frame's checksum) seeded with the
// epoch: it ties the prefix to this frame, so a prefix that reached the disk
// over a whole frame left from an earlier epoch (the new frame's bytes
// lost) reads as torn, not as a record.
constexpr size_t kRecordPrefixBytes = 16;

uint64_t RecordTag(std::span<const std::byte> frame_header, uint64_t epoch) {
  return XXH3_64bits_withSeed(frame_header.data(), kFrameHeaderBytes, epoch);
}

static_assert(2 * kSlotBytes <= GroupJournal::kLogStart);

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

uint64_t SlotChecksum(std::span<const std::byte> slot, size_t covered) {
  return XXH3_64bits(slot.data(), covered);
}

// A new random epoch, never 0 (version 1) and never `previous`.
uint64_t NewEpoch(uint64_t previous) {
  static thread_local std::mt19937_64 rng = [] {
    std::random_device rd;
    std::seed_seq seq{rd(), rd(), rd(), rd()};
    return std::mt19937_64(seq);
  }();
  uint64_t e;
  do {
    e = rng();
  } while (e == 0 || e == previous);
  return e;
}

// epoch 0 writes a version 1 slot (a version 1 journal stays one until
// its next Reset).
std::array<std::byte, kSlotBytes> EncodeSlot(uint64_t counter, uint64_t applied_group_seq,
                                             uint64_t epoch) {
  std::array<std::byte, kSlotBytes> slot{};
  PutLe(slot, kMagicOffset, kHeaderMagic, 4);
  PutLe(slot, kVersionOffset, epoch == 0 ? kVersion1 : kVersion2, 2);
  PutLe(slot, kReservedOffset, 0, 2);
  PutLe(slot, kCounterOffset, counter, 8);
  PutLe(slot, kAppliedOffset, applied_group_seq, 8);
  if (epoch == 0) {
    PutLe(slot, kV1ChecksumOffset, SlotChecksum(slot, kV1ChecksumOffset), 8);
  } else {
    PutLe(slot, kEpochOffset, epoch, 8);
    PutLe(slot, kV2ChecksumOffset, SlotChecksum(slot, kV2ChecksumOffset), 8);
  }
  return slot;
}

struct Slot {
  uint64_t counter = 0;
  uint64_t applied_group_seq = 0;
  uint64_t epoch = 0;  // 0: version 1
};

// Corruption (torn, never written, damaged) with a short reason, or
// NotSupported for a sound slot of another format version.
Result<Slot> DecodeSlot(std::span<const std::byte> slot) {
  uint32_t magic = static_cast<uint32_t>(GetLe(slot, kMagicOffset, 4));
  if (magic != kHeaderMagic) {
    return Status::Corruption(fmt::format("bad magic {:#010x}", magic));
  }
  // Where the checksum is depends on the version, which only the checksum
  // vouches for: a slot is sound when either layout's checksum holds.
  const bool v1_sound =
      GetLe(slot, kV1ChecksumOffset, 8) == SlotChecksum(slot, kV1ChecksumOffset);
  const bool v2_sound =
      GetLe(slot, kV2ChecksumOffset, 8) == SlotChecksum(slot, kV2ChecksumOffset);
  const uint16_t version = static_cast<uint16_t>(GetLe(slot, kVersionOffset, 2));
  const bool sound = version == kVersion1 ? v1_sound
                     : version == kVersion2 ? v2_sound
                                            : v1_sound || v2_sound;
  if (!sound) {
    const size_t at = version == kVersion1 ? kV1ChecksumOffset : kV2ChecksumOffset;
    return Status::Corruption(fmt::format(
        "checksum mismatch (stored {:#018x}, computed {:#018x})", GetLe(slot, at, 8),
        SlotChecksum(slot, at)));
  }
  if (version != kVersion1 && version != kVersion2) {
    return Status::NotSupported(fmt::format(
        "format version {}; this blockrelay reads versions {} and {} (written by a newer "
        "release?)",
        version, kVersion1, kVersion2));
  }
  Slot out;
  out.counter = GetLe(slot, kCounterOffset, 8);
  out.applied_group_seq = GetLe(slot, kAppliedOffset, 8);
  if (version == kVersion2) {
    out.epoch = GetLe(slot, kEpochOffset, 8);
    if (out.epoch == 0) return Status::Corruption("version 2 with epoch 0");
  }
  if (out.counter == 0) return Status::Corruption("counter is 0");
  return out;
}

// Writes a new journal crash-safely: header slot 0 (counter 1, nothing
// applied) into path.tmp, synced, renamed over path, directory synced. A
// crash leaves no file at `path` (the next Open creates it again) or a whole
// one, never a file without a durable header.
Status CreateJournalFile(io::Env& env, const std::string& path) {
  const std::string tmp = path + ".tmp";
  Result<std::unique_ptr<io::RandomRWFile>> file =
      env.OpenFile(tmp, io::OpenMode::kCreateTruncate);
  if (!file.ok()) return file.status();
  std::array<std::byte, kSlotBytes> slot = EncodeSlot(1, 0, NewEpoch(0));
  Status s = (*file)->PWrite(0, slot);
  if (!s.ok()) return s;
  s = (*file)->Truncate(GroupJournal::kLogStart);  // slot 1 and the gap read as zeroes
  if (!s.ok()) return s;
  s = (*file)->Sync();
  if (!s.ok()) return s;
  file->reset();
  s = env.RenameFile(tmp, path);
  if (!s.ok()) return s;
  return env.SyncDir(io::DirName(path));
}

std::string ResyncAdvice(const std::string& path) {
  return fmt::format(
      "the groups it holds cannot be replayed, so the downstream volumes may be left between "
      "two groups and must be fully resynced: stop the site, remove {} and run a full resync of "
      "the group from the upstream",
      path);
}

}  // namespace

GroupJournal::GroupJournal(std::unique_ptr<io::RandomRWFile> file, uint32_t slot,
                           uint64_t counter, uint64_t applied_group_seq, uint64_t epoch,
                           uint64_t end)
    : file_(std::move(file)),
      slot_(slot),
      counter_(counter),
      applied_group_seq_(applied_group_seq),
      epoch_(epoch),
      end_(end) {}

namespace {

struct Header {
  uint32_t slot;  // the winner
  Slot winner;
};

// The valid slot with the higher counter of `file`'s header.
Result<Header> ReadHeader(io::RandomRWFile& file, const std::string& context,
                          const std::string& path) {
  std::array<std::byte, 2 * kSlotBytes> header{};  // a short file leaves zeroes
  Result<size_t> n = file.PRead(0, header);
  if (!n.ok()) return n.status().WithContext(context + ": read header");
  std::span<const std::byte> header_bytes(header);
  Result<Slot> slots[2] = {DecodeSlot(header_bytes.subspan(0, kSlotBytes)),
                           DecodeSlot(header_bytes.subspan(kSlotBytes, kSlotBytes))};
  for (uint32_t i = 0; i < 2; ++i) {
    if (!slots[i].ok() && slots[i].status().IsNotSupported()) {
      return slots[i].status().WithContext(fmt::format("{}: header slot {}", context, i));
    }
  }
  if (!slots[0].ok() && !slots[1].ok()) {
    return Status::Corruption(fmt::format(
        "{}: the journal header is unreadable (slot 0: {}; slot 1: {}); {}", context,
        slots[0].status().message(), slots[1].status().message(), ResyncAdvice(path)));
  }
  uint32_t slot;
  if (slots[0].ok() && slots[1].ok()) {
    slot = slots[1]->counter > slots[0]->counter ? 1 : 0;
  } else {
    // One slot torn: expected after a crash inside Reset(); the other one was
    // synced before that update started.
    slot = slots[0].ok() ? 0 : 1;
  }
  return Header{slot, slots[slot].value()};
}

}  // namespace

Result<std::unique_ptr<GroupJournal>> GroupJournal::Open(io::Env& env, const std::string& path,
                                                         Recovered* recovered) {
  assert(recovered != nullptr);
  *recovered = Recovered{};
  const std::string context = "journal " + path;

  if (!env.FileExists(path)) {
    Status s = CreateJournalFile(env, path);
    if (!s.ok()) return s.WithContext(context + ": create");
  }
  Result<std::unique_ptr<io::RandomRWFile>> opened = env.OpenFile(path, io::OpenMode::kReadWrite);
  if (!opened.ok()) return opened.status().WithContext(context);
  std::unique_ptr<io::RandomRWFile> file = std::move(opened).value();

  Result<Header> header = ReadHeader(*file, context, path);
  if (!header.ok()) return header.status();
  const Slot winner = header->winner;
  recovered->applied_group_seq = winner.applied_group_seq;

  // --- log: records from kLogStart ---
  Result<uint64_t> size = file->Size();
  if (!size.ok()) return size.status().WithContext(context);
  const uint64_t prefix = winner.epoch != 0 ? kRecordPrefixBytes : 0;
  uint64_t offset = kLogStart;
  bool torn = false;  // a record of this epoch that does not read back whole
  while (offset < *size) {
    // Every way a record can fail to read back whole ends the log here.
    const uint64_t left = *size - offset;
    std::array<std::byte, kRecordPrefixBytes> record{};
    if (prefix != 0) {
      Result<size_t> got = file->PRead(offset, record);
      if (!got.ok()) return got.status().WithContext(context);
      // Too short for a prefix, or another epoch's: not a record of this
      // epoch (a fragment of an older record is no torn tail).
      if (*got != record.size()) break;
      if (GetLe(record, 0, 8) != winner.epoch) break;  // from before the last Reset
    }
    torn = true;  // until the frame reads back whole
    if (left < prefix + kFrameHeaderBytes) break;
    Bytes frame(kFrameHeaderBytes);
    Result<size_t> got = file->PRead(offset + prefix, frame);
    if (!got.ok()) return got.status().WithContext(context);
    if (*got != kFrameHeaderBytes) break;
    if (prefix != 0 && GetLe(record, 8, 8) != RecordTag(frame, winner.epoch)) break;
    Result<FrameHeader> h = DecodeFrameHeader(frame);
    if (!h.ok()) break;
    // Checked before allocating: a torn header may announce any length.
    if (h->length > left - prefix - kFrameHeaderBytes) break;
    frame.resize(kFrameHeaderBytes + h->length);
    std::span<std::byte> payload = std::span<std::byte>(frame).subspan(kFrameHeaderBytes);
    got = file->PRead(offset + prefix + kFrameHeaderBytes, payload);
    if (!got.ok()) return got.status().WithContext(context);
    if (*got != payload.size()) break;
    std::span<const std::byte> bytes(frame);
    Result<Frame> decoded =
        DecodeFrame(*h, bytes.subspan(0, kFrameHeaderBytes), bytes.subspan(kFrameHeaderBytes));
    if (!decoded.ok()) break;
    if (!std::holds_alternative<WriteGroup>(*decoded)) {
      // Whole and checksummed, so not torn: something other than this
      // journal wrote it.
      return Status::Corruption(fmt::format(
          "{}: the frame at offset {} is a {} frame; the journal holds only WRITE_GROUP frames; {}",
          context, offset + prefix, FrameTypeName(h->type), ResyncAdvice(path)));
    }
    torn = false;
    recovered->frames.push_back(std::move(frame));
    offset += prefix + kFrameHeaderBytes + h->length;
  }
  // Version 1 has no epochs: whatever follows the log is a torn tail.
  if (offset < *size && (torn || prefix == 0)) recovered->torn_tail_bytes = *size - offset;
  auto journal = std::unique_ptr<GroupJournal>(new GroupJournal(
      std::move(file), header->slot, winner.counter, winner.applied_group_seq, winner.epoch,
      offset));
  if (offset < *size) {
    // Records of this epoch may lie past the end (written after the one
    // that tore, and never acknowledged as durable): the next record must
    // not be followed by one of them after a crash. With frames to replay
    // the file is cut after them, so that the next frame lands right after
    // the last good one; without, a new epoch disowns everything in the
    // log and the file is kept (its pages stay in the page cache).
    Status s;
    if (prefix == 0 || !recovered->frames.empty()) {
      s = journal->file_->Truncate(offset);
      if (s.ok()) s = journal->file_->Sync();
      if (!s.ok()) {
        return s.WithContext(fmt::format("{}: cut the log at offset {}", context, offset));
      }
    } else {
      s = journal->WriteHeader(winner.applied_group_seq, NewEpoch(winner.epoch));
      if (!s.ok()) return s;
    }
  }
  return journal;
}

Status GroupJournal::Recycle(io::Env& env, const std::string& path,
                             uint64_t applied_group_seq) {
  const std::string context = "journal " + path;
  Result<std::unique_ptr<io::RandomRWFile>> opened = env.OpenFile(path, io::OpenMode::kReadWrite);
  if (!opened.ok()) return opened.status().WithContext(context + ": recycle");
  Result<Header> header = ReadHeader(**opened, context, path);
  if (!header.ok()) return header.status();
  GroupJournal journal(std::move(opened).value(), header->slot, header->winner.counter,
                       header->winner.applied_group_seq, header->winner.epoch, kLogStart);
  return journal.Reset(applied_group_seq);
}

Status GroupJournal::Fail(const Status& s, const std::string& what) {
  error_ = s.WithContext(fmt::format("journal {}: {}", path(), what));
  return error_;
}

Status GroupJournal::Append(std::span<const std::byte> frame) {
  if (!error_.ok()) return error_;
  Result<FrameHeader> h = frame.size() >= kFrameHeaderBytes
                              ? DecodeFrameHeader(frame.subspan(0, kFrameHeaderBytes))
                              : Result<FrameHeader>(Status::InvalidArgument(fmt::format(
                                    "{} bytes is shorter than a frame header", frame.size())));
  if (!h.ok()) {
    return Status::InvalidArgument(
        fmt::format("journal {}: append: not a frame: {}", path(), h.status().message()));
  }
  if (h->type != FrameType::kWriteGroup || h->length != frame.size() - kFrameHeaderBytes) {
    return Status::InvalidArgument(fmt::format(
        "journal {}: append: expected one WRITE_GROUP frame of {} bytes, got a {} frame "
        "announcing a {}-byte payload",
        path(), frame.size(), FrameTypeName(h->type), h->length));
  }
  Status s;
  uint64_t size = frame.size();
  if (epoch_ != 0) {
    std::array<std::byte, kRecordPrefixBytes> record{};
    PutLe(record, 0, epoch_, 8);
    PutLe(record, 8, RecordTag(frame, epoch_), 8);
    s = file_->PWrite2(end_, record, frame);
    size += kRecordPrefixBytes;
  } else {
    s = file_->PWrite(end_, frame);
  }
  if (!s.ok()) return Fail(s, fmt::format("append at offset {}", end_));
  end_ += size;
  return Status::OK();
}

Status GroupJournal::Sync() {
  if (!error_.ok()) return error_;
  Status s = file_->Sync();
  if (!s.ok()) return Fail(s, "sync");
  return Status::OK();
}

Status GroupJournal::WriteHeader(uint64_t applied_group_seq, uint64_t epoch) {
  // The winning slot stays untouched until the other one is durable: a torn
  // write here leaves the previous state readable.
  const uint32_t slot = 1 - slot_;
  std::array<std::byte, kSlotBytes> bytes = EncodeSlot(counter_ + 1, applied_group_seq, epoch);
  Status s = file_->PWrite(slot * kSlotBytes, bytes);
  if (!s.ok()) return Fail(s, fmt::format("write header slot {}", slot));
  s = file_->Sync();
  if (!s.ok()) return Fail(s, fmt::format("sync header slot {}", slot));
  slot_ = slot;
  ++counter_;
  applied_group_seq_ = applied_group_seq;
  epoch_ = epoch;
  return Status::OK();
}

Status GroupJournal::Reset(uint64_t applied_group_seq) {
  if (!error_.ok()) return error_;
  // The new applied_group_seq is durable with the new epoch, which disowns
  // every record in the log at once. A crash before replays frames that are
  // already applied: harmless.
  const bool version1 = epoch_ == 0;
  Status s = WriteHeader(applied_group_seq, NewEpoch(epoch_));
  if (!s.ok()) return s;
  if (version1) {
    // Bare frames carry no epoch: cut them, durably, before new records
    // reuse the space.
    s = file_->Truncate(kLogStart);
    if (!s.ok()) return Fail(s, fmt::format("truncate to {}", kLogStart));
    s = file_->Sync();
    if (!s.ok()) return Fail(s, "sync after truncate");
  }
  end_ = kLogStart;
  return Status::OK();
}

}  // namespace blockrelay::replication
