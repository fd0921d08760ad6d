// GroupJournal: see journal.h for the file layout and the recovery rules.

#include "replication/journal.h"

#include <array>
#include <cassert>
#include <utility>
#include <variant>

#include <fmt/format.h>
#include "util/xxhash.h"

namespace blockrelay::replication {

namespace {

constexpr uint32_t kHeaderMagic = 0x484a5242;  // "BRJH" in little-endian bytes
constexpr uint16_t kHeaderVersion = 1;
constexpr size_t kSlotBytes = 512;
constexpr size_t kChecksummedBytes = 24;  // magic .. applied_group_seq
// Slot fields.
constexpr size_t kMagicOffset = 0;
constexpr size_t kVersionOffset = 4;
constexpr size_t kReservedOffset = 6;
constexpr size_t kCounterOffset = 8;
constexpr size_t kAppliedOffset = 16;
constexpr size_t kChecksumOffset = 24;

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

uint64_t SlotChecksum(std::span<const std::byte> slot) {
  return XXH3_64bits(slot.data(), kChecksummedBytes);
}

std::array<std::byte, kSlotBytes> EncodeSlot(uint64_t counter, uint64_t applied_group_seq) {
  std::array<std::byte, kSlotBytes> slot{};
  PutLe(slot, kMagicOffset, kHeaderMagic, 4);
  PutLe(slot, kVersionOffset, kHeaderVersion, 2);
  PutLe(slot, kReservedOffset, 0, 2);
  PutLe(slot, kCounterOffset, counter, 8);
  PutLe(slot, kAppliedOffset, applied_group_seq, 8);
  PutLe(slot, kChecksumOffset, SlotChecksum(slot), 8);
  return slot;
}

struct Slot {
  uint64_t counter = 0;
  uint64_t applied_group_seq = 0;
};

// Corruption (torn, never written, damaged) with a short reason, or
// NotSupported for a sound slot of another format version.
Result<Slot> DecodeSlot(std::span<const std::byte> slot) {
  uint32_t magic = static_cast<uint32_t>(GetLe(slot, kMagicOffset, 4));
  if (magic != kHeaderMagic) {
    return Status::Corruption(fmt::format("bad magic {:#010x}", magic));
  }
  uint64_t want = GetLe(slot, kChecksumOffset, 8);
  uint64_t got = SlotChecksum(slot);
  if (want != got) {
    return Status::Corruption(
        fmt::format("checksum mismatch (stored {:#018x}, computed {:#018x})", want, got));
  }
  // The checksum holds, so the version is what a writer meant.
  uint16_t version = static_cast<uint16_t>(GetLe(slot, kVersionOffset, 2));
  if (version != kHeaderVersion) {
    return Status::NotSupported(fmt::format(
        "format version {}; this blockrelay reads version {} (written by a newer release?)",
        version, kHeaderVersion));
  }
  Slot out;
  out.counter = GetLe(slot, kCounterOffset, 8);
  out.applied_group_seq = GetLe(slot, kAppliedOffset, 8);
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
  std::array<std::byte, kSlotBytes> slot = EncodeSlot(1, 0);
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
                           uint64_t counter, uint64_t applied_group_seq, uint64_t end)
    : file_(std::move(file)),
      slot_(slot),
      counter_(counter),
      applied_group_seq_(applied_group_seq),
      end_(end) {}

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

  // --- header: the valid slot with the higher counter ---
  std::array<std::byte, 2 * kSlotBytes> header{};  // a short file leaves zeroes
  Result<size_t> n = file->PRead(0, header);
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
  const Slot winner = slots[slot].value();
  recovered->applied_group_seq = winner.applied_group_seq;

  // --- log: whole WRITE_GROUP frames from kLogStart ---
  Result<uint64_t> size = file->Size();
  if (!size.ok()) return size.status().WithContext(context);
  uint64_t offset = kLogStart;
  while (offset < *size) {
    // Every way a frame can fail to read back whole ends the log here.
    const uint64_t left = *size - offset;
    if (left < kFrameHeaderBytes) break;
    Bytes frame(kFrameHeaderBytes);
    Result<size_t> got = file->PRead(offset, frame);
    if (!got.ok()) return got.status().WithContext(context);
    if (*got != kFrameHeaderBytes) break;
    Result<FrameHeader> h = DecodeFrameHeader(frame);
    if (!h.ok()) break;
    // Checked before allocating: a torn header may announce any length.
    if (h->length > left - kFrameHeaderBytes) break;
    frame.resize(kFrameHeaderBytes + h->length);
    std::span<std::byte> payload = std::span<std::byte>(frame).subspan(kFrameHeaderBytes);
    got = file->PRead(offset + kFrameHeaderBytes, payload);
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
          context, offset, FrameTypeName(h->type), ResyncAdvice(path)));
    }
    recovered->frames.push_back(std::move(frame));
    offset += kFrameHeaderBytes + h->length;
  }
  if (offset < *size) {
    // A torn tail: never acknowledged as durable. Cut it so that the next
    // frame lands right after the last good one and the next Open agrees.
    recovered->torn_tail_bytes = *size - offset;
    Status s = file->Truncate(offset);
    if (s.ok()) s = file->Sync();
    if (!s.ok()) {
      return s.WithContext(fmt::format("{}: cut the torn tail at offset {}", context, offset));
    }
  }
  return std::unique_ptr<GroupJournal>(
      new GroupJournal(std::move(file), slot, winner.counter, winner.applied_group_seq, offset));
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
  Status s = file_->PWrite(end_, frame);
  if (!s.ok()) return Fail(s, fmt::format("append at offset {}", end_));
  end_ += frame.size();
  return Status::OK();
}

Status GroupJournal::Sync() {
  if (!error_.ok()) return error_;
  Status s = file_->Sync();
  if (!s.ok()) return Fail(s, "sync");
  return Status::OK();
}

Status GroupJournal::WriteHeader(uint64_t applied_group_seq) {
  // The winning slot stays untouched until the other one is durable: a torn
  // write here leaves the previous state readable.
  const uint32_t slot = 1 - slot_;
  std::array<std::byte, kSlotBytes> bytes = EncodeSlot(counter_ + 1, applied_group_seq);
  Status s = file_->PWrite(slot * kSlotBytes, bytes);
  if (!s.ok()) return Fail(s, fmt::format("write header slot {}", slot));
  s = file_->Sync();
  if (!s.ok()) return Fail(s, fmt::format("sync header slot {}", slot));
  slot_ = slot;
  ++counter_;
  applied_group_seq_ = applied_group_seq;
  return Status::OK();
}

Status GroupJournal::Reset(uint64_t applied_group_seq) {
  if (!error_.ok()) return error_;
  // Order: the new applied_group_seq is durable before the frames go. A
  // crash in between replays frames that are already applied: harmless.
  Status s = WriteHeader(applied_group_seq);
  if (!s.ok()) return s;
  s = file_->Truncate(kLogStart);
  if (!s.ok()) return Fail(s, fmt::format("truncate to {}", kLogStart));
  // The cut is durable before new frames reuse the space, so no frame from
  // before this Reset can follow a later one after a crash.
  s = file_->Sync();
  if (!s.ok()) return Fail(s, "sync after truncate");
  end_ = kLogStart;
  return Status::OK();
}

}  // namespace blockrelay::replication
