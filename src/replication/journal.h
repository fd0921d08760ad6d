// GroupJournal: the downstream site's log of received write groups.
//
// A downstream applies each group of writes atomically and in order
// (DESIGN.md, Invariant 3). It first appends the group's WRITE_GROUP frame,
// exactly as received (header + payload, checksum included), to this
// journal; once the journal is synced the group is applied to the volumes.
// After a crash of the downstream, Open() returns every group appended after
// the last Reset(), and the receiver applies them again before it accepts a
// connection: a write applied twice in order leaves the same bytes, so the
// volumes end at a group boundary whatever the crash interrupted.
//
// File layout (data_dir/journal-<group>.log; integers little-endian):
//   two 512-byte header slots at offsets 0 and 512, written alternately:
//     version 2: u32 magic "BRJH" | u16 version (2) | u16 reserved (0) |
//       u64 counter (>= 1) | u64 applied_group_seq | u64 epoch (!= 0) |
//       u64 xxh3-64 of the preceding 32 bytes | zeros up to 512
//     version 1 (still read): the same without the epoch, the checksum
//       over the first 24 bytes at offset 24
//   the valid slot with the higher counter wins; a torn slot is ignored; a
//   slot whose checksum holds but whose version is neither is refused
//   (NotSupported). Each update goes to the slot that did not win, so a torn
//   update leaves the winner intact.
//   then, from offset 4096, records back to back: version 2: u64 epoch |
//   u64 tag (XXH3-64 of the frame's 24-byte header, which holds the frame's
//   checksum, seeded with the epoch) | one WRITE_GROUP frame (see
//   protocol.h); version 1: the frame alone. The tag binds the prefix to its
//   frame: a prefix that reached the disk over an older whole frame (its
//   own frame lost in a crash) reads as torn.
//   The log ends at the first record whose epoch is not the winning slot's
//   (left from before the last Reset: the file is reused, not cut, so new
//   records land in pages the page cache already holds) or whose frame is
//   short or fails its checksum (a torn tail: it was never acknowledged as
//   durable, because durability is only acknowledged after Sync()). A
//   checksum cannot tell a torn tail from a damaged frame in the middle of
//   the log: either ends it.
// Epochs are random. Reset() starts a new one; so does Open() when the log
// ends before the end of the file and holds nothing (records of the
// current epoch might lie past a torn one); when it holds frames, Open()
// cuts the file after them instead. Either way no record of the current
// epoch follows the place where the next one goes, so a record left from
// before can never be read as a newer one.
// A new journal is written whole to <path>.tmp, synced and renamed over
// <path> (then the directory is synced), so an existing <path> always has a
// durable header slot.
//
// Thread safety: none; the receiver calls it from one pool thread at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "blockrelay/io/env.h"
#include "blockrelay/status.h"
#include "replication/protocol.h"

namespace blockrelay::replication {

class GroupJournal {
 public:
  struct Recovered {
    // applied_group_seq from the winning header slot (0 for a new journal).
    uint64_t applied_group_seq = 0;
    // Whole frames (header + payload) appended after the last Reset(), in
    // order, each already checked with DecodeFrameHeader/DecodeFrame.
    std::vector<Bytes> frames;
    // When the log ended in a torn record (one of this epoch, or in a
    // version 1 journal anything, that does not read back whole): the
    // bytes from there to the end of the file, never replayed. 0 when it
    // ended at the end of the file or at a record of another epoch.
    uint64_t torn_tail_bytes = 0;
  };

  // Opens `path`, creating it (with an empty log) when missing, and reads
  // what must be replayed. Refuses (Corruption, naming the file) when
  // neither header slot is valid in an existing file, or when a frame in
  // the log is not a WRITE_GROUP, and NotSupported for a header of another
  // format version. A torn tail is not an error: it is counted in
  // torn_tail_bytes and never replayed. When the log ends before the end
  // of the file, the file is cut after the frames returned (synced), or,
  // when there are none in a version 2 journal, a new epoch is written
  // instead (see the file layout above). REQUIRES: recovered != nullptr;
  // it is overwritten.
  static Result<std::unique_ptr<GroupJournal>> Open(io::Env& env,
                                                    const std::string& path,
                                                    Recovered* recovered);

  // Makes the journal at `path` (not in use, every frame in it applied and
  // flushed) empty for reuse without cutting the file: records
  // applied_group_seq and a new epoch in its header, synced. The receiver
  // recycles a retired journal this way before renaming it into place, so
  // that new frames go to pages the page cache already holds (fresh pages
  // cost the kernel an allocation and zeroing each). Corruption when its
  // header is unreadable (the caller then creates a new journal instead).
  static Status Recycle(io::Env& env, const std::string& path,
                        uint64_t applied_group_seq);

  // Errors of Append, Sync and Reset are sticky: after the first one (an
  // I/O error from the file), every later call returns it, because after a
  // failed write or fsync the file no longer says what was durable. The
  // journal must be reopened once the operator has fixed the cause. Messages
  // start with "journal <path>: ".

  // Appends one encoded WRITE_GROUP frame (buffered; not durable until
  // Sync()). REQUIRES: `frame` is one whole frame as EncodeWriteGroup wrote
  // it or DecodeFrame accepted it; a frame whose header does not announce a
  // WRITE_GROUP of exactly that size is refused (InvalidArgument, not
  // sticky, nothing written).
  Status Append(std::span<const std::byte> frame);
  // Makes everything appended so far durable.
  Status Sync();
  // Everything appended so far has been applied and the volumes flushed:
  // records applied_group_seq and a new epoch in the other header slot and
  // syncs; the log is then empty (its records belong to the old epoch) and
  // new records overwrite it from the start. A crash inside Reset leaves
  // either the old slot and the frames, or the new slot without them;
  // replaying frames that are already applied is harmless (same bytes,
  // same order). A journal opened at version 1 is also cut back to its
  // header here, once.
  Status Reset(uint64_t applied_group_seq);

  // Records applied_group_seq durably without dropping the log: after a
  // restart, frames with group_seq <= it are known to be done (the
  // upstream's disk queue uses this to drop acknowledged groups lazily).
  Status RecordApplied(uint64_t applied_group_seq) {
    if (!error_.ok()) return error_;
    return WriteHeader(applied_group_seq);
  }

  // Log bytes appended since the last Reset() (epoch prefixes included).
  uint64_t log_bytes() const { return end_ - kLogStart; }
  uint64_t applied_group_seq() const { return applied_group_seq_; }
  const std::string& path() const { return file_->path(); }

  static constexpr uint64_t kLogStart = 4096;

 private:
  GroupJournal(std::unique_ptr<io::RandomRWFile> file, uint32_t slot,
               uint64_t counter, uint64_t applied_group_seq, uint64_t epoch,
               uint64_t end);
  // Writes the slot that did not win with counter_ + 1, applied_group_seq
  // and `epoch` (version 2) and syncs it; on success that slot becomes the
  // winner.
  Status WriteHeader(uint64_t applied_group_seq, uint64_t epoch);
  Status WriteHeader(uint64_t applied_group_seq) {
    return WriteHeader(applied_group_seq, epoch_);
  }
  // Records the first I/O error (sticky) and returns it with context.
  Status Fail(const Status& s, const std::string& what);

  std::unique_ptr<io::RandomRWFile> file_;
  uint32_t slot_;     // 0 or 1: the newest valid header slot
  uint64_t counter_;  // of that slot
  uint64_t applied_group_seq_;
  uint64_t epoch_;    // of the winning slot; 0: a version 1 journal
  uint64_t end_;      // file offset where the next record goes
  Status error_;      // sticky: the first failed write, sync or truncate
};

}  // namespace blockrelay::replication
