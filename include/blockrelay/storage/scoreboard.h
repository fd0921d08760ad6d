// Scoreboard: which regions of a volume may differ from each downstream site.
//
// One per volume, with one bitmap ("slot") per downstream link; a bit per
// region of region_size bytes. Obtained from VolumeMetadata::Open(), which
// loads and recovers it from the volume's metadata file.
//
// The invariant (DESIGN.md, Invariant 1): when MarkDirty(range) returns OK,
// the bit of every region in the range is durable in every slot, either in
// the on-disk bitmap or because the region's intent extent is listed in the
// durable intent log. A crash therefore recovers a superset of the regions
// that may differ: on-disk bitmap ∪ every region of every logged extent.
//
// Two levels, as DRBD's activity log (docs/metadata-format.md):
//   - intent extents (default 4 MiB) are made durable before the first write
//     into them and then kept "hot", up to max_intent_extents per volume; a
//     write into a hot extent, or into regions whose bits are already set,
//     costs no system call and takes no lock (a few atomic operations);
//   - the fine bitmap is written lazily: by FlushBitmaps(), at Close(), and
//     for an extent's pages before that extent leaves the intent log.
// Concurrent writers that need new extents share one metadata sync: the
// first queued writer commits for everyone queued behind it (leveldb's
// DBImpl::Write writer queue). A range touching more than
// max_intent_extents/4 extents (a large trim) sets its bits in the bitmap
// pages directly, with one sync.
//
// Clearing is lazy and acknowledgement-driven: MarkClean() clears bits in
// memory; FlushBitmaps() persists the clears later. Before it persists a
// clear (or drops an extent from the intent log) it calls the
// `flush_backing` callback given to VolumeMetadata::Open, so that data this
// site sent downstream cannot vanish from this site's disk in a power loss
// after its bit is gone (the downstream would then hold bytes we lost).
//
// Write sequence numbers make clearing race-free: every MarkDirty gets a
// WriteSeq, and MarkClean(slot, range, as_of) does not clear a region whose
// intent extent saw a MarkDirty with a larger WriteSeq. See MarkClean.
//
// Failures are sticky: once a metadata write or sync fails, every later
// MarkDirty, FlushBitmaps and Close fails with an IOError (EIO) naming the
// first failure, until the volume is reopened (leveldb's background-error
// rule). The bits already set stay valid.
//
// Thread safety: every method may be called from any thread at any time,
// except Close(), which requires that no other call is in progress or
// follows. Blocking calls (MarkDirty's slow path, FlushBitmaps, Close) run
// on the storage threads (core::IoExecutor), never on the network thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "blockrelay/status.h"

namespace blockrelay::storage {

namespace format {
struct Superblock;
}

// Position in the scoreboard's write history: MarkDirty calls are numbered
// 1, 2, 3... in the order they start, within one open of the volume.
using WriteSeq = uint64_t;

// A slot in use: the link to one downstream site.
struct ScoreboardSlot {
  uint32_t slot = 0;  // index in the metadata file's slot table
  std::string site;
};

struct SlotStats {
  uint32_t slot = 0;
  std::string site;
  uint64_t dirty_regions = 0;
  // dirty_regions * region_size, except that a dirty last region of a volume
  // whose size is not a multiple of region_size counts only its real bytes.
  uint64_t dirty_bytes = 0;
};

struct ScoreboardStats {
  std::vector<SlotStats> slots;
  uint64_t intent_extents_in_use = 0;  // hot extents listed in the log
  uint32_t max_intent_extents = 0;
  uint64_t metadata_syncs = 0;  // fdatasyncs of the metadata file since open
  uint64_t intent_commits = 0;  // intent log records written since open
  uint64_t readahead_commits = 0;  // of which by CommitReadahead
  uint64_t evicted_extents = 0;
  uint64_t direct_marks = 0;  // MarkDirty calls that wrote bitmap pages
  uint64_t memory_bytes = 0;  // MemoryUsageBytes()
};

class Scoreboard {
 public:
  struct Impl;
  explicit Scoreboard(std::unique_ptr<Impl> impl);  // see VolumeMetadata::Open
  // Without Close(), the next open treats the shutdown as a crash (merges
  // the intent log), which is safe but resyncs a little more.
  ~Scoreboard();
  Scoreboard(const Scoreboard&) = delete;
  Scoreboard& operator=(const Scoreboard&) = delete;

  uint64_t size_bytes() const;
  uint64_t region_size_bytes() const;
  uint64_t region_count() const;
  uint64_t intent_extent_bytes() const;
  // The slots in use, by slot index.
  const std::vector<ScoreboardSlot>& slots() const;

  // Marks every region overlapping [offset, offset+length) dirty in every
  // slot in use. Call it before the write, trim or write-zeroes of that
  // range is issued to the BlockStore; issue the I/O only if it returns OK.
  // On return OK the bits are durable (see the header comment). `seq`, if
  // given, receives this call's WriteSeq (for MarkClean after the
  // downstream acknowledges this write).
  // Fails: InvalidArgument if the range passes the end of the volume;
  // IOError (sticky) when metadata cannot be written; Aborted after Close().
  Status MarkDirty(uint64_t offset, uint64_t length, WriteSeq* seq = nullptr);

  // MarkDirty for a thread that must not wait on the disk (the network
  // thread): does the whole job when no metadata I/O is needed (every bit
  // already set, or all its intent extents hot) and returns its Status.
  // Returns nullopt when a metadata write would be needed; the caller then
  // calls MarkDirty on a storage thread. Never blocks on I/O or a lock (the
  // first write into a slot maps its bitmap array: one mmap, no disk I/O).
  std::optional<Status> TryMarkDirty(uint64_t offset, uint64_t length, WriteSeq* seq = nullptr);

  // A MarkDirty of [offset, offset+length) will follow soon (a write queued
  // for a storage thread): the next intent commit makes its extents hot too
  // if they fit the hot set without an eviction, so that one metadata sync
  // serves every write in flight, not only the writers already waiting in
  // MarkDirty (one per storage thread). A range of more than two extents
  // is ignored. Only a hint: nothing is made durable here, and an extent
  // announced but never written is merely resynced after a crash. Never
  // blocks on I/O; takes a short lock only for an extent that is not hot.
  void Announce(uint64_t offset, uint64_t length);

  // Intent readahead, for a writer streaming through the volume: once it
  // has written half way into the intent extents declared ahead of it (see
  // CommitExtentsLocked), ReadaheadDue() returns true, once; the caller then
  // runs CommitReadahead() on a storage thread, which declares the next run
  // of extents while the writer still writes into the current one, so that
  // it never waits for that metadata sync (the kernel's asynchronous
  // readahead, PG_readahead, does the same for readers). ReadaheadDue never
  // blocks; CommitReadahead blocks like MarkDirty's slow path, does nothing
  // after Close() or when no stream is running, and fails (sticky) like it.
  bool ReadaheadDue();
  Status CommitReadahead();

  // The WriteSeq of the latest MarkDirty that has started.
  WriteSeq CurrentWriteSeq() const;

  // Clears, in `slot`, every region that lies entirely inside [offset,
  // offset+length) (the volume's last region counts as entirely inside when
  // the range reaches the end of the volume), unless the region's intent
  // extent saw a MarkDirty with a WriteSeq > as_of: such a region keeps its
  // bit. Returns the number of bits cleared. The clear is in memory; it
  // becomes durable at the next FlushBitmaps/Close/extent eviction.
  // The caller asserts, for `as_of`:
  //   every write to those regions whose MarkDirty got a WriteSeq <= as_of
  //   has completed on this site's BlockStore, and the downstream site
  //   holds those regions' bytes as they were after those writes.
  // Resync: take as_of = CurrentWriteSeq() once no write with a smaller
  // WriteSeq is still in flight, then read and send the regions, then call
  // MarkClean when the downstream acknowledges. Streaming: pass the WriteSeq
  // of the acknowledged write, with the range widened to whole regions only
  // when the link knows the rest of those regions is in sync.
  // An unknown slot clears nothing. Never fails.
  uint64_t MarkClean(uint32_t slot, uint64_t offset, uint64_t length, WriteSeq as_of);

  // Marks every region of `slot` dirty and makes that durable (an
  // operator's full resync). Other slots are untouched. An unknown slot is
  // InvalidArgument; IOError (sticky) when the bitmap cannot be written.
  Status MarkAllDirty(uint32_t slot);
  // The same for regions [first, last] only (verify --fix).
  Status MarkRegionsDirty(uint32_t slot, uint64_t first, uint64_t last);

  bool IsDirty(uint32_t slot, uint64_t region) const;
  // The first dirty region >= from_region of `slot`, for resync.
  std::optional<uint64_t> NextDirtyRegion(uint32_t slot, uint64_t from_region) const;

  // Writes every bitmap page changed since it was last written and syncs.
  // Call when a link goes down (its bitmap then matters) and periodically.
  Status FlushBitmaps();

  // Clean shutdown: flushes the bitmaps and marks the metadata cleanly shut
  // down, so the next open need not merge the intent log. Later MarkDirty
  // calls fail with Aborted. REQUIRES: no concurrent or later calls except
  // destruction and the read-only accessors.
  Status Close();

  // OK, or the sticky error.
  Status health() const;

  ScoreboardStats Stats() const;
  SlotStats StatsForSlot(uint32_t slot) const;
  // Bytes of memory held for bitmaps (SlotBitmap::MemoryUsageBytes) and the
  // extent table.
  uint64_t MemoryUsageBytes() const;

 private:
  // Superblock access for VolumeMetadata (storage/scoreboard_internal.h).
  friend format::Superblock CurrentSuperblock(const Scoreboard& scoreboard);
  friend Status UpdateSuperblock(Scoreboard& scoreboard,
                                 const std::function<void(format::Superblock&)>& change);
  std::unique_ptr<Impl> impl_;
};

}  // namespace blockrelay::storage
