// Volume: one replicated volume and the single write path every write takes.
//
// A write from a local NBD client and (later) a write applied from an
// upstream site both go through Volume, so a site in the middle of a chain
// forwards without special code. Every write, trim and zeroing first marks
// its regions dirty in the scoreboard (one slot per downstream link), and
// reaches the BlockStore only once those bits are durable (DESIGN.md,
// Invariant 1). The volume owns its BlockStore and metadata, counts traffic
// for status, and keeps a sticky error: once a flush of the backing
// store fails, the page cache may have dropped data we acknowledged, so every
// later write and flush fails with the same error until an operator restarts
// the site (LevelDB's background-error rule).
//
// Thread safety: the I/O methods block and are called from IoExecutor
// threads, several at once; FlushShared() does not block and may be called
// from any thread (the NBD session calls it on the network thread).
// Counters are atomic. Role changes come from the network thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "blockrelay/core/range_lock.h"
#include "blockrelay/core/replication_sink.h"
#include "blockrelay/status.h"
#include "blockrelay/storage/block_store.h"
#include "blockrelay/storage/volume_metadata.h"

namespace blockrelay::core {

class IoExecutor;

struct VolumeCounters {
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;  // write, and zeroed bytes
  uint64_t reads = 0;
  uint64_t writes = 0;
  uint64_t flushes = 0;
  uint64_t trims = 0;
  uint64_t errors = 0;
  // Inline writes that took longer than Volume::kInlineStallLimit: because
  // the kernel made the thread sleep (each pauses inline writes), or
  // because the host did not run it (no pause).
  uint64_t inline_stalls = 0;
  uint64_t inline_preempted = 0;
};

// Per-call options of the write path.
struct WriteContext {
  // Applied by the replication receiver: allowed on a read-only (secondary)
  // volume, which no local client may write.
  bool from_upstream = false;
  // Out: the replication ticket to wait on before replying (0: none).
  ReplicationSink::Ticket ticket = 0;
};

class Volume {
 public:
  // `metadata` may be null (no scoreboard: tests, or a volume without
  // metadata); otherwise every write is tracked in its scoreboard.
  Volume(std::string group, std::string name,
         std::unique_ptr<storage::BlockStore> store,
         std::unique_ptr<storage::VolumeMetadata> metadata, bool read_only);
  ~Volume();

  const std::string& name() const { return name_; }
  const std::string& group() const { return group_; }
  uint64_t size_bytes() const { return size_bytes_; }
  std::string backing() const { return store_->Describe(); }
  bool read_only() const { return read_only_.load(); }
  void set_read_only(bool ro) { read_only_.store(ro); }
  bool can_trim() const { return store_->CanTrim(); }
  bool can_fast_zero() const { return store_->CanFastZero(); }

  // REQUIRES (all I/O): the range lies within size_bytes(); the NBD session
  // validates requests before calling.
  Status Read(uint64_t offset, std::span<std::byte> out);
  Status Write(uint64_t offset, std::span<const std::byte> data, bool fua,
               WriteContext* ctx = nullptr);
  Status Trim(uint64_t offset, uint64_t length, bool fua,
              WriteContext* ctx = nullptr);
  Status WriteZeroes(uint64_t offset, uint64_t length, bool may_trim,
                     bool fast_only, bool fua, WriteContext* ctx = nullptr);
  // Blocking flush: every write that returned before this call is durable
  // when it returns OK; with a sink and `ctx`, ctx->ticket is the group the
  // flush closed. For the replication receiver, shutdown and Close(); NBD
  // FLUSH uses FlushShared(). A failure is sticky (see above).
  Status Flush(WriteContext* ctx = nullptr);

  // Called once per FlushShared() call with its outcome and, when OK and a
  // sink is attached, the ticket of the group the sync closed (0 otherwise).
  using FlushDone =
      std::function<void(Status status, ReplicationSink::Ticket ticket)>;
  // Group commit of FLUSH: makes durable every write that returned before
  // this call, without holding a thread while it waits. At most one store
  // flush of this volume runs at a time, on a pool thread of `io`. A call
  // joins the next store flush that starts after it (never one already
  // running: a write that returned after that one began would be missed);
  // the calls that arrive while a flush runs all share the one that starts
  // when it ends. After a successful store flush the batch shares one
  // sink->Flushed() ticket, taken after the flush, and the `flushes`
  // counter grows by the batch's size.
  // Failure: a failed store flush fails every call of its batch with the
  // store's error and makes it sticky; calls already waiting for the next
  // flush, and every later call, fail with the sticky error without another
  // store flush.
  // Threads: any thread. `done` runs exactly once: inline, before this
  // returns, when the volume already has a sticky error; otherwise on the
  // pool thread that ran the store flush, after it.
  // REQUIRES: `done` does not block (the next store flush waits for it);
  // the volume and `io` outlive every call still pending (an NBD session
  // holds its volume until its requests are answered, and the pool thread
  // does not touch the volume after it answered the last batch).
  void FlushShared(IoExecutor& io, FlushDone done);

  // Connects the volume to its group's replication: from now on every
  // write is ordered against overlapping ones and handed to `sink` with
  // index `index`. Call once, before the volume serves I/O.
  void AttachReplication(ReplicationSink* sink, uint32_t index) {
    sink_ = sink;
    index_in_group_ = index;
  }
  ReplicationSink* replication() const { return sink_; }

  // Resync: reads [offset, offset+length) into `out` (resized to `length`)
  // while no write to it is in flight and, still holding the range, calls
  // with_data(as_of): as_of is the scoreboard WriteSeq the data is current
  // to (for MarkClean once the downstream has it). Holding the range orders
  // the resync data before any later write to those bytes in the
  // replication stream.
  // With `all_zero`, the store's block status is asked first (under the
  // range): when the whole range is unallocated or reads as zeroes, nothing
  // is read, `out` is left as it was and *all_zero is true -- a sparse or
  // zeroed region costs a seek, not a read (nor a buffer to read into).
  Status ReadForResync(uint64_t offset, uint64_t length, std::vector<std::byte>& out,
                       const std::function<void(storage::WriteSeq)>& with_data,
                       bool* all_zero = nullptr);
  // Runs fn(current WriteSeq) if no write is in flight on this volume;
  // false otherwise. For clearing a caught-up link's leftover bits.
  template <typename Fn>
  bool IfNoWriteInFlight(Fn&& fn) {
    return ranges_.IfIdle([&] {
      fn(metadata_ ? metadata_->scoreboard().CurrentWriteSeq() : 0);
    });
  }

  // For the network thread, which must not wait on the disk: carries out a
  // write without FUA only when that cannot block (buffered store, volume
  // writable, scoreboard bits already durable). nullopt: nothing was done,
  // use Write() on a pool thread.
  // A buffered write can still block: when dirty pages pass the kernel's
  // limit, it throttles the writer (balance_dirty_pages, up to 200 ms a
  // time), and on the network thread that stalls every connection. So a
  // write that took longer than kInlineStallLimit sends this volume's
  // writes to the pool for kInlinePauseAfterStall, unless the thread did
  // not sleep during it and lost its CPU to another thread (it was
  // preempted: a busy host, not a throttled disk).
  static constexpr std::chrono::milliseconds kInlineStallLimit{2};
  static constexpr std::chrono::milliseconds kInlinePauseAfterStall{1000};
  std::optional<Status> TryWriteWithoutWaiting(uint64_t offset,
                                               std::span<const std::byte> data,
                                               WriteContext* ctx = nullptr);
  // A write, trim or write-zeroes of this range is queued for a pool
  // thread: its intent extents may go with the next metadata commit
  // (storage::Scoreboard::Announce). Never blocks.
  void Announce(uint64_t offset, uint64_t length);
  // True, once, when a writer streaming through the volume is half way into
  // the intent extents declared ahead of it: the caller then runs
  // CommitIntentReadahead() on a pool thread, so that the writer does not
  // wait for the next metadata sync (storage::Scoreboard::ReadaheadDue).
  // Never blocks.
  bool IntentReadaheadDue();
  Status CommitIntentReadahead();
  // Reads only from the page cache; false: nothing read, use Read().
  bool ReadIfCached(uint64_t offset, std::span<std::byte> out);
  Status Cache(uint64_t offset, uint64_t length);
  // Advisory: the store starts writing back cached writes (no waiting).
  void StartWriteback() { store_->StartWriteback(); }
  Result<std::vector<storage::Extent>> BlockStatus(uint64_t offset,
                                                   uint64_t length);

  // Persists the scoreboard's bitmaps (periodically, and when a link goes
  // down). OK without metadata.
  Status FlushScoreboard();
  // Clean shutdown of the metadata: flush the store, then mark the
  // scoreboard cleanly closed. REQUIRES: no other I/O in progress or after.
  Status Close();

  // The scoreboard, or nullptr without metadata.
  const storage::Scoreboard* scoreboard() const {
    return metadata_ ? &metadata_->scoreboard() : nullptr;
  }
  const storage::VolumeMetadata* metadata() const { return metadata_.get(); }
  // For promote and generation adoption (SetGeneration).
  storage::VolumeMetadata* mutable_metadata() { return metadata_.get(); }
  // For the replication links, which clear bits as downstreams acknowledge.
  storage::Scoreboard* mutable_scoreboard() {
    return metadata_ ? &metadata_->scoreboard() : nullptr;
  }

  VolumeCounters counters() const;
  // The sticky error, if a flush failed.
  std::optional<Status> sticky_error() const;

  // NBD connections currently attached, for status.
  void AddClient() { ++nbd_clients_; }
  void RemoveClient() { --nbd_clients_; }
  int nbd_clients() const { return nbd_clients_.load(); }

 private:
  Status CheckWritable(const WriteContext* ctx) const;
  // Scoreboard bits for [offset, offset+length) durable in every slot.
  Status MarkDirty(uint64_t offset, uint64_t length, storage::WriteSeq* wseq);
  // Hands a completed write to the sink, if any.
  void Capture(CapturedOp op, uint64_t offset, uint64_t length,
               std::span<const std::byte> data, storage::WriteSeq wseq,
               bool fua, WriteContext* ctx);
  // The store write, once the scoreboard bits are durable.
  Status WriteMarked(uint64_t offset, std::span<const std::byte> data, bool fua);
  Status RecordFailure(Status s, bool sticky);
  // The sticky error, or OK.
  Status StickyError() const;
  // Pool thread: runs store flushes for FlushShared() until no call waits.
  void RunSharedFlushes();
  // Pauses inline writes if the one from `started` to `ended` stalled.
  void NoteInlineWriteTime(std::chrono::steady_clock::time_point started,
                           std::chrono::steady_clock::time_point ended);

  const std::string group_;
  const std::string name_;
  const std::unique_ptr<storage::BlockStore> store_;
  const std::unique_ptr<storage::VolumeMetadata> metadata_;
  // Whether any downstream slot exists: without one there is nothing to mark.
  const bool tracks_writes_;
  const uint64_t size_bytes_;
  std::atomic<bool> read_only_;
  std::atomic<int> nbd_clients_{0};
  ReplicationSink* sink_ = nullptr;
  uint32_t index_in_group_ = 0;
  // Engaged only with a sink: see RangeLock.
  RangeLock ranges_;

  std::atomic<uint64_t> bytes_read_{0}, bytes_written_{0}, reads_{0},
      writes_{0}, flushes_{0}, trims_{0}, errors_{0};

  // steady_clock nanoseconds until which TryWriteWithoutWaiting declines,
  // and when a stall was last logged (at most once a minute).
  std::atomic<int64_t> inline_paused_until_ns_{0};
  std::atomic<int64_t> inline_stall_logged_ns_{0};  // 0: never
  std::atomic<uint64_t> inline_stalls_{0};
  std::atomic<uint64_t> inline_preempted_{0};

  std::atomic<bool> failed_{false};
  mutable std::mutex failure_mu_;
  std::optional<Status> failure_;  // GUARDED_BY(failure_mu_)

  // FlushShared(): calls waiting for the next store flush, and whether a
  // RunSharedFlushes() is queued or running (at most one is).
  std::mutex flush_mu_;
  std::vector<FlushDone> flush_waiters_;  // GUARDED_BY(flush_mu_)
  bool flush_running_ = false;            // GUARDED_BY(flush_mu_)
};

}  // namespace blockrelay::core
