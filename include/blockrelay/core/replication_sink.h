// ReplicationSink: where a volume hands its completed writes for
// replication (DESIGN.md, Invariant 3).
//
// Volume calls the sink after a write, trim or zeroing has reached the local
// store and while it still holds the write's byte range (core/range_lock.h),
// so the order of writes to the same bytes is the same in the stream as on
// the disk. The sink (replication::ReplicationGroup) copies what it needs
// and returns a ticket: the sequence number of the write group the write
// went into. An NBD reply that must wait for sync downstreams waits for that
// ticket with WhenAcknowledged().
//
// Thread safety: every method may be called from any thread. Captured() and
// Flushed() never block on the network or the disk.
#pragma once

#include <cstdint>
#include <functional>
#include <span>

#include "blockrelay/status.h"
#include "blockrelay/storage/scoreboard.h"

namespace blockrelay::core {

enum class CapturedOp : uint8_t { kWrite = 1, kTrim = 2, kZero = 3 };

class ReplicationSink {
 public:
  // 0: nothing to wait for.
  using Ticket = uint64_t;

  virtual ~ReplicationSink() = default;

  // A write (data.size() == length), trim or zeroing of [offset,
  // offset+length) on the volume with index `volume` in its group is on the
  // local store. `wseq` is the scoreboard's WriteSeq of its MarkDirty (for
  // clearing the bits once the downstreams acknowledge it). `fua` closes the
  // group as a durability barrier.
  virtual Ticket Captured(uint32_t volume, CapturedOp op, uint64_t offset,
                          uint64_t length, std::span<const std::byte> data,
                          storage::WriteSeq wseq, bool fua) = 0;

  // A FLUSH completed locally: close the open group as a durability barrier.
  virtual Ticket Flushed() = 0;

  // True when replies must go through WhenAcknowledged(): some link of the
  // group is sync, or an async link has a max_lag that may slow writers.
  virtual bool RepliesWait() const = 0;

  // Calls done(status) once every sync link holds the ticket's group (or
  // has it durably, if `durable`), or once the group's on_sync_failure
  // policy says the reply may go without it, and once no async link is
  // behind by more than its max_lag. OK when there is nothing to
  // wait for; IOError (EIO) when the "block" policy timed out. `done` may run
  // inline or on the network thread.
  virtual void WhenAcknowledged(Ticket ticket, bool durable,
                                std::function<void(Status)> done) = 0;
};

}  // namespace blockrelay::core
