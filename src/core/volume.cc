#include "blockrelay/core/volume.h"

#include <sys/resource.h>

#include <utility>

#include <asio/post.hpp>
#include <fmt/format.h>

#include "blockrelay/core/io_executor.h"
#include "util/logging.h"

namespace blockrelay::core {
namespace {

using Clock = std::chrono::steady_clock;

int64_t Nanos(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch())
      .count();
}

// The calling thread's context switches so far: voluntary (it slept in
// the kernel) and involuntary (the scheduler gave its CPU to another
// thread). `ok` is false if getrusage failed.
struct ContextSwitches {
  bool ok = false;
  long voluntary = 0;
  long involuntary = 0;
};
ContextSwitches ThreadContextSwitches() {
  rusage usage{};
  if (getrusage(RUSAGE_THREAD, &usage) != 0) return {};
  return {true, usage.ru_nvcsw, usage.ru_nivcsw};
}

// A recent ThreadContextSwitches() of the thread that runs inline writes,
// refreshed at most every kSwitchSampleInterval: getrusage costs ~0.2 us,
// an inline 4 KiB write ~5 us.
constexpr auto kSwitchSampleInterval = std::chrono::microseconds(250);
struct SwitchSample {
  Clock::time_point taken{};
  ContextSwitches switches;
};
thread_local SwitchSample t_switch_sample;

}  // namespace

Volume::Volume(std::string group, std::string name,
               std::unique_ptr<storage::BlockStore> store,
               std::unique_ptr<storage::VolumeMetadata> metadata,
               bool read_only)
    : group_(std::move(group)),
      name_(std::move(name)),
      store_(std::move(store)),
      metadata_(std::move(metadata)),
      tracks_writes_(metadata_ && !metadata_->scoreboard().slots().empty()),
      size_bytes_(store_->size_bytes()),
      read_only_(read_only) {}

// The metadata goes first: its destructor may still call flush_backing,
// which uses the store.
Volume::~Volume() = default;

Status Volume::MarkDirty(uint64_t offset, uint64_t length,
                         storage::WriteSeq* wseq) {
  if (!tracks_writes_ || length == 0) return Status::OK();
  Status s = metadata_->scoreboard().MarkDirty(offset, length, wseq);
  if (!s.ok()) {
    ++errors_;
    return s.WithContext(fmt::format("volume {}: scoreboard", name_));
  }
  return s;
}

Status Volume::FlushScoreboard() {
  if (!metadata_) return Status::OK();
  return metadata_->scoreboard().FlushBitmaps();
}

Status Volume::Close() {
  if (!metadata_) return Status::OK();
  if (!read_only()) {
    Status s = Flush();
    if (!s.ok()) return s;
  }
  return metadata_->Close();
}

void Volume::Capture(CapturedOp op, uint64_t offset, uint64_t length,
                     std::span<const std::byte> data, storage::WriteSeq wseq,
                     bool fua, WriteContext* ctx) {
  if (!sink_) return;
  auto ticket = sink_->Captured(index_in_group_, op, offset, length, data,
                                wseq, fua);
  if (ctx) ctx->ticket = ticket;
}

Status Volume::CheckWritable(const WriteContext* ctx) const {
  if (read_only_.load() && !(ctx && ctx->from_upstream)) {
    return Status::PermissionDenied(
        fmt::format("volume {} is read-only (role secondary)", name_));
  }
  return StickyError();
}

Status Volume::StickyError() const {
  if (failed_.load(std::memory_order_acquire)) {
    std::lock_guard lock(failure_mu_);
    return *failure_;
  }
  return Status::OK();
}

Status Volume::RecordFailure(Status s, bool sticky) {
  ++errors_;
  if (sticky && !failed_.load()) {
    std::lock_guard lock(failure_mu_);
    if (!failure_) {
      failure_ = Status::IOError(
          fmt::format("volume {} stopped accepting writes after a failed "
                      "flush ({}); restart the site once the disk is healthy",
                      name_, s.ToString()),
          EIO);
      failed_.store(true, std::memory_order_release);
    }
  }
  return s;
}

Status Volume::Read(uint64_t offset, std::span<std::byte> out) {
  Status s = store_->Read(offset, out);
  if (!s.ok()) return RecordFailure(std::move(s), false);
  ++reads_;
  bytes_read_ += out.size();
  return s;
}

Status Volume::Write(uint64_t offset, std::span<const std::byte> data,
                     bool fua, WriteContext* ctx) {
  if (Status s = CheckWritable(ctx); !s.ok()) return s;
  RangeGuard range(sink_ ? &ranges_ : nullptr, offset, data.size());
  storage::WriteSeq wseq = 0;
  if (Status s = MarkDirty(offset, data.size(), &wseq); !s.ok()) return s;
  Status s = WriteMarked(offset, data, fua);
  if (s.ok()) Capture(CapturedOp::kWrite, offset, data.size(), data, wseq, fua, ctx);
  return s;
}

Status Volume::ReadForResync(
    uint64_t offset, uint64_t length, std::vector<std::byte>& out,
    const std::function<void(storage::WriteSeq)>& with_data, bool* all_zero) {
  RangeGuard range(&ranges_, offset, length);
  // Every write that got a WriteSeq <= as_of and touches this range has
  // finished: writes take the range before MarkDirty numbers them.
  const storage::WriteSeq as_of =
      metadata_ ? metadata_->scoreboard().CurrentWriteSeq() : 0;
  if (all_zero) {
    *all_zero = false;
    // A finished write is in the page cache, which SEEK_DATA counts as
    // data, so a hole here is a hole for every write up to as_of.
    auto extents = store_->BlockStatus(offset, length);
    if (extents.ok()) {
      uint64_t covered = 0;
      bool zero = true;
      for (const auto& e : *extents) {
        zero = zero && e.zero;
        covered += e.length_bytes;
      }
      if (zero && covered >= length) {
        *all_zero = true;
        with_data(as_of);
        return Status::OK();
      }
    }
    // A failed block status is no reason to fail the resync: read instead.
  }
  out.resize(length);
  Status s = Read(offset, out);
  if (s.ok()) with_data(as_of);
  return s;
}

Status Volume::WriteMarked(uint64_t offset, std::span<const std::byte> data,
                           bool fua) {
  Status s = store_->Write(offset, data, fua);
  // A failed FUA write may have left earlier cached writes unsynced too.
  if (!s.ok()) return RecordFailure(std::move(s), fua && !s.IsNoSpace());
  ++writes_;
  bytes_written_ += data.size();
  return s;
}

std::optional<Status> Volume::TryWriteWithoutWaiting(
    uint64_t offset, std::span<const std::byte> data, WriteContext* ctx) {
  if (!store_->WritesAreBuffered()) return std::nullopt;
  if (Nanos(Clock::now()) < inline_paused_until_ns_.load(std::memory_order_relaxed)) {
    return std::nullopt;
  }
  if (Status s = CheckWritable(ctx); !s.ok()) return s;
  if (sink_ && !ranges_.TryLock(offset, data.size())) return std::nullopt;
  RangeGuard range(sink_ ? &ranges_ : nullptr, offset, data.size(),
                   RangeGuard::Adopt{});
  // Only the scoreboard's no-wait half may run here: a new intent extent
  // needs a metadata sync, which belongs on a pool thread.
  storage::WriteSeq wseq = 0;
  if (tracks_writes_ && data.size() > 0) {
    auto marked = metadata_->scoreboard().TryMarkDirty(offset, data.size(), &wseq);
    if (!marked) return std::nullopt;
    if (!marked->ok()) {
      ++errors_;
      return marked->WithContext(fmt::format("volume {}: scoreboard", name_));
    }
  }
  // Only the store write is timed: the steps above never wait on the disk.
  const Clock::time_point write_started = Clock::now();
  if (write_started - t_switch_sample.taken >= kSwitchSampleInterval) {
    t_switch_sample = {write_started, ThreadContextSwitches()};
  }
  Status s = WriteMarked(offset, data, /*fua=*/false);
  NoteInlineWriteTime(write_started, Clock::now());
  if (s.ok()) Capture(CapturedOp::kWrite, offset, data.size(), data, wseq, false, ctx);
  return s;
}

void Volume::NoteInlineWriteTime(Clock::time_point started,
                                 Clock::time_point ended) {
  const auto took = ended - started;
  if (took <= kInlineStallLimit) return;
  // A thread the kernel throttled slept (a voluntary context switch). One
  // that did not sleep since the sample before the write, but lost its CPU
  // to another thread (an involuntary switch), was only not run: the host
  // had more runnable threads than cores (on a 2-core machine, fio, this
  // site, the kernel's writeback and a downstream site on the same host
  // preempt each other every few hundred ms). Pausing then would send a
  // second of writes through the pool for nothing. Anything else (no
  // switch at all: the kernel worked for the thread, e.g. reclaiming
  // memory, or the hypervisor did not run the CPU) pauses as before.
  const ContextSwitches now = ThreadContextSwitches();
  const ContextSwitches& before = t_switch_sample.switches;
  const bool preempted = now.ok && before.ok && now.voluntary == before.voluntary &&
                         now.involuntary > before.involuntary;
  t_switch_sample = {ended, now};
  if (preempted) {
    ++inline_preempted_;
    return;
  }
  inline_paused_until_ns_.store(Nanos(ended + kInlinePauseAfterStall),
                                std::memory_order_relaxed);
  const uint64_t stalls = ++inline_stalls_;
  const int64_t logged = inline_stall_logged_ns_.load();
  if (logged != 0 &&
      Nanos(ended) - logged < std::chrono::nanoseconds(std::chrono::minutes(1)).count()) {
    return;
  }
  inline_stall_logged_ns_.store(Nanos(ended));
  BR_LOG_WARN("volume", "volume {}: a buffered write took {} ms on the network "
              "thread (the kernel throttles writers while too many pages are "
              "dirty, or the host did not run the thread); its writes go to "
              "the I/O threads for {} ms ({} such stalls so far)",
              name_,
              std::chrono::duration_cast<std::chrono::milliseconds>(took).count(),
              kInlinePauseAfterStall.count(), stalls);
}

void Volume::Announce(uint64_t offset, uint64_t length) {
  if (tracks_writes_) metadata_->scoreboard().Announce(offset, length);
}

bool Volume::IntentReadaheadDue() {
  return tracks_writes_ && metadata_->scoreboard().ReadaheadDue();
}

Status Volume::CommitIntentReadahead() {
  if (!tracks_writes_) return Status::OK();
  Status s = metadata_->scoreboard().CommitReadahead();
  if (!s.ok()) ++errors_;
  return s;
}

bool Volume::ReadIfCached(uint64_t offset, std::span<std::byte> out) {
  if (!store_->ReadIfCached(offset, out)) return false;
  ++reads_;
  bytes_read_ += out.size();
  return true;
}

Status Volume::Trim(uint64_t offset, uint64_t length, bool fua,
                    WriteContext* ctx) {
  if (Status s = CheckWritable(ctx); !s.ok()) return s;
  RangeGuard range(sink_ ? &ranges_ : nullptr, offset, length);
  storage::WriteSeq wseq = 0;
  if (Status s = MarkDirty(offset, length, &wseq); !s.ok()) return s;
  Status s = store_->Trim(offset, length, fua);
  if (!s.ok()) return RecordFailure(std::move(s), false);
  ++trims_;
  Capture(CapturedOp::kTrim, offset, length, {}, wseq, fua, ctx);
  return s;
}

Status Volume::WriteZeroes(uint64_t offset, uint64_t length, bool may_trim,
                           bool fast_only, bool fua, WriteContext* ctx) {
  if (Status s = CheckWritable(ctx); !s.ok()) return s;
  RangeGuard range(sink_ ? &ranges_ : nullptr, offset, length);
  storage::WriteSeq wseq = 0;
  if (Status s = MarkDirty(offset, length, &wseq); !s.ok()) return s;
  Status s = store_->WriteZeroes(offset, length, may_trim, fast_only, fua);
  if (!s.ok()) {
    if (s.IsNotSupported()) return s;  // FAST_ZERO refused: nothing written
    return RecordFailure(std::move(s), false);
  }
  ++writes_;
  bytes_written_ += length;
  Capture(CapturedOp::kZero, offset, length, {}, wseq, fua, ctx);
  return s;
}

Status Volume::Flush(WriteContext* ctx) {
  if (Status sticky = StickyError(); !sticky.ok()) return sticky;
  Status s = store_->Flush();
  if (!s.ok()) return RecordFailure(std::move(s), true);
  ++flushes_;
  if (sink_ && ctx) ctx->ticket = sink_->Flushed();
  return s;
}

void Volume::FlushShared(IoExecutor& io, FlushDone done) {
  if (Status sticky = StickyError(); !sticky.ok()) {
    done(std::move(sticky), 0);
    return;
  }
  {
    std::lock_guard lock(flush_mu_);
    flush_waiters_.push_back(std::move(done));
    // A store flush already running may have begun before this call's
    // writes returned: the call waits for the next one, which the running
    // RunSharedFlushes() starts.
    if (flush_running_) return;
    flush_running_ = true;
  }
  io.Post([this] { RunSharedFlushes(); });
}

void Volume::RunSharedFlushes() {
  std::vector<FlushDone> batch;
  {
    // Every call queued before the store flush starts may share it: its
    // writes returned before it was queued.
    std::lock_guard lock(flush_mu_);
    batch.swap(flush_waiters_);
  }
  while (!batch.empty()) {
    Status s = StickyError();
    ReplicationSink::Ticket ticket = 0;
    if (s.ok()) {
      s = store_->Flush();
      if (s.ok()) {
        flushes_ += batch.size();
        // Taken after the store flush: every write the batch covers was
        // handed to the sink before the flush began.
        if (sink_) ticket = sink_->Flushed();
      } else {
        s = RecordFailure(std::move(s), true);
        errors_ += batch.size() - 1;  // RecordFailure counted one
      }
    }
    std::vector<FlushDone> next;
    {
      std::lock_guard lock(flush_mu_);
      next.swap(flush_waiters_);
      // With nobody waiting, the next call starts a new RunSharedFlushes();
      // this one only answers its batch and no longer touches the volume,
      // whose last user may be among the callers.
      if (next.empty()) flush_running_ = false;
    }
    for (FlushDone& done : batch) done(s, ticket);
    batch = std::move(next);
  }
}

Status Volume::Cache(uint64_t offset, uint64_t length) {
  return store_->Cache(offset, length);
}

Result<std::vector<storage::Extent>> Volume::BlockStatus(uint64_t offset,
                                                         uint64_t length) {
  return store_->BlockStatus(offset, length);
}

VolumeCounters Volume::counters() const {
  VolumeCounters c;
  c.bytes_read = bytes_read_.load();
  c.bytes_written = bytes_written_.load();
  c.reads = reads_.load();
  c.writes = writes_.load();
  c.flushes = flushes_.load();
  c.trims = trims_.load();
  c.errors = errors_.load();
  c.inline_stalls = inline_stalls_.load();
  c.inline_preempted = inline_preempted_.load();
  return c;
}

std::optional<Status> Volume::sticky_error() const {
  if (!failed_.load()) return std::nullopt;
  std::lock_guard lock(failure_mu_);
  return failure_;
}

}  // namespace blockrelay::core
