// UndoRecord: what a downstream overwrote since a resync began, so that it
// can return to its last consistent state if the resync is cut off.
//
// Bitmap resync is not write-ordered (DESIGN.md, Invariant 3): from the
// resync's BEGIN marker until its END marker is applied, the downstream's
// volumes are at no group boundary of the primary. Before the receiver
// applies any write in that window it saves the bytes the write is about
// to overwrite, once per byte (later writes to bytes already saved save
// nothing), and syncs the record before the write reaches the volume (the
// journal's rule: the undo of a range is durable before the range changes).
// Writing every saved range back restores the volumes to the state they had
// at BEGIN, which was a group boundary.
//
// The file exists exactly while the group is inconsistent: created (with a
// durable header) at BEGIN, removed once END is applied and the volumes are
// flushed, or after a rollback. Its size is bounded by the bytes of the
// group's volumes plus 32 bytes per record (a record holds at most
// kMaxRecordBytes): each byte is saved at most once per resync.
//
// File layout (data_dir/undo-<group>.log; integers little-endian):
//   header, 4096 bytes:
//     u32 magic "BRUH" | u16 version (1) | u16 reserved (0)
//     | u64 base_group_seq | u64 xxh3-64 of the preceding 16 bytes
//     | zeros up to 4096
//   then records back to back:
//     u32 magic "BRUR" | u32 volume | u64 offset | u32 length
//     | u32 flags | u64 xxh3-64 of the preceding 24 bytes + data
//     | data (`length` bytes: the old contents of [offset, offset+length))
//   flags: 0, or 1 ("zeros": the range held only zero bytes; no data
//   follows, and length may be up to kMaxZeroRecordBytes). A fresh sparse
//   downstream's first resync saves nothing but such records, so an initial
//   sync does not write the volume's size into the record first.
// base_group_seq is the group the volumes were at when BEGIN was applied.
// The header is written whole into <path>.tmp, synced and renamed, so an
// existing file always has a durable header; a header that fails its
// checks is refused (Corruption; NotSupported for another version).
// Recovery: a record that is short, or fails its magic or checksum, with no
// intact record anywhere after it is a torn tail: it was never synced, so
// the write it protected was never applied; it is cut off. A bad record
// followed by an intact one is refused (Corruption naming the offset): the
// later record was synced, so this one was too and is damaged, and the
// record can no longer restore the volumes. (A power cut that tears one
// unsynced record and keeps a later unsynced one whole is refused too: the
// file does not say how far it was synced, and refusing loses nothing.)
//
// Thread safety: none; the receiver uses it under its group's apply mutex.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "blockrelay/io/env.h"
#include "blockrelay/status.h"

namespace blockrelay::replication {

class UndoRecord {
 public:
  static constexpr uint64_t kHeaderBytes = 4096;
  static constexpr uint64_t kRecordHeaderBytes = 32;
  // Larger saves are split into records of at most this size.
  static constexpr uint64_t kMaxRecordBytes = 1ull << 20;
  // A "zeros" record covers at most this much.
  static constexpr uint64_t kMaxZeroRecordBytes = 1ull << 30;

  struct Recovered {
    // Bytes after the last good record that were dropped as a torn tail.
    uint64_t torn_tail_bytes = 0;
    uint64_t records = 0;
  };

  // Creates a new, empty record at `path` (replacing any), durably: the
  // header goes to <path>.tmp, is synced, renamed, and the directory synced.
  static Result<std::unique_ptr<UndoRecord>> Create(io::Env& env,
                                                    const std::string& path,
                                                    uint64_t base_group_seq);

  // Opens an existing record and rebuilds the index of saved ranges from
  // it. A torn tail is cut off (the file truncated and synced) and counted.
  // Errors: Corruption (bad header, a bad record in the middle, a record
  // beyond kMaxRecordBytes), NotSupported (another version), IOError.
  // Messages start with "undo record <path>: ".
  static Result<std::unique_ptr<UndoRecord>> Open(io::Env& env,
                                                  const std::string& path,
                                                  Recovered* recovered);

  // Removes the file at `path` (missing is fine) and syncs the directory.
  static Status Remove(io::Env& env, const std::string& path);

  // The parts of [offset, offset+length) of `volume` not saved yet, in
  // ascending order, as (offset, length).
  std::vector<std::pair<uint64_t, uint64_t>> Unsaved(uint32_t volume,
                                                     uint64_t offset,
                                                     uint64_t length) const;

  // Appends the old contents of [offset, offset+old.size()) of `volume`
  // (split into records of at most kMaxRecordBytes) and marks the range
  // saved. Not durable until Sync(). REQUIRES: no part of the range is
  // saved yet (callers save what Unsaved() returns).
  // Errors of Append and Sync are sticky (the file no longer says what is
  // durable); a full data_dir gives NoSpace.
  Status Append(uint32_t volume, uint64_t offset,
                std::span<const std::byte> old);
  // As Append() for a range whose old contents were all zero bytes: stores
  // no data.
  Status AppendZeros(uint32_t volume, uint64_t offset, uint64_t length);
  Status Sync();

  // Calls fn(volume, offset, length, data) for every saved range, the
  // newest record first; `data` is empty for a range of zeros, else it has
  // `length` bytes. Stops at fn's first error and returns it. Reads the file.
  Status ForEachNewestFirst(
      const std::function<Status(uint32_t, uint64_t, uint64_t,
                                 std::span<const std::byte>)>& fn);

  uint64_t base_group_seq() const { return base_group_seq_; }
  // File size: header + records.
  uint64_t size_bytes() const { return end_; }
  // Bytes of volume data saved.
  uint64_t saved_bytes() const { return saved_bytes_; }
  const std::string& path() const { return file_->path(); }

 private:
  struct RecordPos {
    uint64_t file_offset;  // of the record header
    uint32_t volume;
    uint64_t offset;
    uint32_t length;
    bool zeros;
  };
  UndoRecord(std::unique_ptr<io::RandomRWFile> file, uint64_t base_group_seq);
  void MarkSaved(uint32_t volume, uint64_t offset, uint64_t length);
  Status Fail(const Status& s, const std::string& what);

  std::unique_ptr<io::RandomRWFile> file_;
  uint64_t base_group_seq_;
  uint64_t end_ = kHeaderBytes;
  uint64_t saved_bytes_ = 0;
  std::vector<RecordPos> records_;
  // Per volume: saved ranges, begin -> end, disjoint and not touching.
  std::map<uint32_t, std::map<uint64_t, uint64_t>> saved_;
  Status error_;  // sticky
};

}  // namespace blockrelay::replication
