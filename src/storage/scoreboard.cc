// Scoreboard: see include/blockrelay/storage/scoreboard.h for the contract
// and docs/metadata-format.md for the design.
//
// The invariant every path below keeps: a bit that is set in a SlotBitmap in
// memory is durable (on the disk bitmap, or through a hot intent extent in
// the durable intent log). That is what lets MarkDirty return at once when
// every bit of its range is already set. Bits are therefore set in memory
// only after they are durable:
//   - through a hot extent: TrySetViaHotExtent pins the extent (a sharded
//     counter) and sets bits only if the extent is hot; eviction makes the
//     extent cold, waits for the pins to drain, and only then snapshots the
//     extent's pages, so no bit set through the extent can miss the snapshot;
//   - directly: DirectMark writes the page images with the new bits, syncs,
//     and then sets the bits in memory;
//   - at start: recovery writes and syncs what it merged before the
//     Scoreboard is returned.
// Clears go the other way (1 -> 0 in memory first, on disk later), which is
// always safe for the crash invariant, as long as the local data behind
// the clear is durable before the clear is: see WritePagesLocked.

#include "blockrelay/storage/scoreboard.h"

#include <algorithm>
#include <optional>
#include <array>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <utility>

#include <fmt/format.h>

#include "storage/scoreboard_internal.h"
#include "storage/slot_bitmap.h"

namespace blockrelay::storage {

namespace {

constexpr size_t kPinShards = 64;
constexpr uint64_t kExtentChunk = 8192;  // extent words per lazily allocated chunk
constexpr uint64_t kHotBit = 1;          // extent word: bit 0 hot, bits 1.. last WriteSeq
constexpr uint64_t kMaxPagesPerWrite = 256;
// Extents declared ahead of a sequential writer (CommitExtentsLocked): 7,
// doubling per commit while the stream goes on (up to 448), and at most a
// quarter of the hot set (256 extents, 1 GiB, by default).
constexpr size_t kSequentialExtentsAhead = 7;
constexpr int kSequentialAheadDoublings = 6;
constexpr uint64_t kNoExtent = ~uint64_t{0};

struct alignas(64) PinCounter {
  std::atomic<int64_t> n{0};
};

struct PageRef {
  uint32_t pos;  // index into Impl::bitmaps
  uint64_t page;
  friend bool operator<(const PageRef& a, const PageRef& b) {
    return a.pos != b.pos ? a.pos < b.pos : a.page < b.page;
  }
  friend bool operator==(const PageRef&, const PageRef&) = default;
};

struct RegionRange {
  uint64_t first;
  uint64_t last;  // inclusive
};

// Sets, in a page snapshot, the bits of `range` that fall into `page`.
void OrRangeIntoPage(std::span<uint64_t> words, uint64_t page, const RegionRange& range) {
  uint64_t base = page * format::kBitsPerPage;
  uint64_t lo = std::max(range.first, base);
  uint64_t hi = std::min(range.last, base + format::kBitsPerPage - 1);
  for (uint64_t r = lo; r <= hi;) {
    uint64_t in_page = r - base;
    uint64_t bit = in_page % 64;
    uint64_t n = std::min<uint64_t>(64 - bit, hi - r + 1);
    uint64_t mask = n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1) << bit;
    words[in_page / 64] |= mask;
    r += n;
  }
}

}  // namespace

struct Scoreboard::Impl {
  explicit Impl(ScoreboardStart& start);
  ~Impl();

  void Announce(uint64_t offset, uint64_t length);
  // nullopt only when !may_block and metadata I/O would be needed.
  std::optional<Status> MarkDirty(uint64_t offset, uint64_t length, WriteSeq* seq_out,
                                  bool may_block);
  uint64_t MarkClean(uint32_t slot, uint64_t offset, uint64_t length, WriteSeq as_of);
  Status FlushBitmaps();
  Status CommitReadahead();
  Status Close();
  SlotStats StatsFor(size_t pos) const;
  uint64_t MemoryUsageBytes() const;

  // Extent table: one word per intent extent, allocated in chunks on first
  // touch. Bit 0: hot (listed in the durable intent log). Bits 1..63: the
  // largest WriteSeq of a MarkDirty that touched the extent (for MarkClean,
  // and as the LRU clock for eviction).
  std::atomic<uint64_t>& ExtentWord(uint64_t extent);
  WriteSeq ExtentSeq(uint64_t extent) const;
  void BumpExtentSeq(uint64_t extent, WriteSeq seq);

  bool AllSlotsSet(uint64_t first, uint64_t last) const;
  bool TrySetViaHotExtent(uint64_t extent, uint64_t first, uint64_t last);
  // `entered`: the extents among `extents` whose first byte the write
  // covers (a sequential writer enters each extent at its start).
  Status GroupCommit(std::vector<uint32_t> extents, std::vector<uint32_t> entered);
  Status DirectMark(uint64_t first, uint64_t last);

  // REQUIRES io_mu held for the *Locked methods.
  Status CommitExtentsLocked(const std::vector<uint32_t>& extents,
                             const std::vector<uint32_t>& entered);
  Status EvictLocked(const std::vector<uint32_t>& victims);
  Status WritePagesLocked(std::vector<PageRef> refs, const RegionRange* add);
  Status WriteIntentRecordLocked(std::vector<uint32_t> extents, bool sync);
  Status WriteSuperblockLocked(format::Superblock sb);
  Status SyncLocked();

  void PagesOf(uint64_t first, uint64_t last, std::vector<PageRef>* refs) const;
  std::vector<PageRef> UnflushedPages() const;
  uint64_t ExtentFirstRegion(uint64_t e) const { return e * g.regions_per_extent; }
  uint64_t ExtentLastRegion(uint64_t e) const {
    return std::min((e + 1) * g.regions_per_extent, g.region_count) - 1;
  }
  // The regions [first, last] of a byte range, and their extents [e0, e1].
  // REQUIRES length > 0 and the range inside the volume.
  struct RegionSpan {
    uint64_t first, last, e0, e1;
  };
  RegionSpan SpanOf(uint64_t offset, uint64_t length) const {
    const uint64_t first = offset / g.region_size_bytes;
    const uint64_t last = (offset + length - 1) / g.region_size_bytes;
    return {first, last, first / g.regions_per_extent, last / g.regions_per_extent};
  }
  // The part of regions [first, last] that lies in extent e.
  std::pair<uint64_t, uint64_t> RegionsInExtent(uint64_t e, uint64_t first,
                                                uint64_t last) const {
    return {std::max(first, ExtentFirstRegion(e)), std::min(last, ExtentLastRegion(e))};
  }

  Status Fail(const Status& s);
  Status FailureStatus() const;

  // --- set at construction, then read-only ---
  const std::string path;
  const format::Geometry g;
  const uint64_t salt;
  std::unique_ptr<io::RandomRWFile> file;
  std::vector<ScoreboardSlot> slots;
  std::vector<std::unique_ptr<SlotBitmap>> bitmaps;  // parallel to slots
  std::array<int, format::kMaxSlots> slot_pos;       // slot index -> position, or -1
  const std::function<Status()> flush_backing;
  const size_t direct_threshold;

  // --- lock-free state ---
  const uint64_t chunk_count;
  std::unique_ptr<std::atomic<std::atomic<uint64_t>*>[]> extent_chunks;
  std::atomic<uint64_t> allocated_chunks{0};
  std::array<PinCounter, kPinShards> pins;
  std::atomic<WriteSeq> write_seq{0};
  std::atomic<bool> failed{false};
  std::atomic<bool> closed{false};
  std::atomic<uint64_t> hot_count{0};
  std::atomic<uint64_t> syncs{0};
  std::atomic<uint64_t> commits{0};
  std::atomic<uint64_t> evictions{0};
  std::atomic<uint64_t> direct_marks{0};
  std::atomic<uint64_t> readahead_commits{0};
  // The extent half way into the run last declared ahead of a sequential
  // writer (kNoExtent: none); the first write into it sets readahead_due.
  std::atomic<uint64_t> readahead_marker{kNoExtent};
  std::atomic<bool> readahead_due{false};

  mutable std::mutex failure_mu;
  Status failure;  // GUARDED_BY(failure_mu)

  // --- group commit (leveldb DBImpl::Write's writers_ queue) ---
  struct Writer {
    std::vector<uint32_t> extents;
    std::vector<uint32_t> entered;
    Status status;
    bool done = false;
    std::condition_variable cv;
  };
  std::mutex queue_mu;
  std::deque<Writer*> writers;  // GUARDED_BY(queue_mu)

  // Extents that writes on their way to MarkDirty will need (Announce);
  // the next commit takes along those that fit. At most max_intent_extents.
  std::mutex announced_mu;
  std::vector<uint32_t> announced;  // GUARDED_BY(announced_mu)

  // --- metadata I/O: every write and sync of the file ---
  mutable std::mutex io_mu;
  std::vector<uint32_t> hot;         // GUARDED_BY(io_mu)
  // The last extent of the run of hot extents that starts at the highest
  // one the last intent commit was asked for (or at the end of its run
  // ahead), and how many commits in a row a writer entered the extent
  // after it at its start: spotting a sequential writer
  // (CommitExtentsLocked).  GUARDED_BY(io_mu)
  std::optional<uint32_t> last_committed_extent;
  int sequential_streak = 0;
  uint64_t intent_seq = 0;           // GUARDED_BY(io_mu) last record written
  uint32_t next_ring = 0;            // GUARDED_BY(io_mu)
  format::Superblock superblock;     // GUARDED_BY(io_mu) as last written
  uint64_t flushed_clear_epoch = 0;  // GUARDED_BY(io_mu)

  // Serializes MarkClean's clear-check-restore against page snapshots, so a
  // snapshot never sees a bit that MarkClean is about to put back.
  std::mutex pages_mu;
  uint64_t clear_epoch = 0;  // GUARDED_BY(pages_mu) bumped by every clear
};

Scoreboard::Impl::Impl(ScoreboardStart& start)
    : path(start.path),
      g(start.geometry),
      salt(start.superblock.volume_uuid.Low64()),
      file(std::move(start.file)),
      flush_backing(std::move(start.flush_backing)),
      direct_threshold(std::max<size_t>(1, start.geometry.max_intent_extents / 4)),
      chunk_count((start.geometry.extent_count + kExtentChunk - 1) / kExtentChunk),
      extent_chunks(new std::atomic<std::atomic<uint64_t>*>[chunk_count]) {
  slot_pos.fill(-1);
  for (const ScoreboardStart::Slot& s : start.slots) {
    slot_pos[s.index] = static_cast<int>(slots.size());
    slots.push_back(ScoreboardSlot{s.index, s.site});
    bitmaps.push_back(std::make_unique<SlotBitmap>(g.region_count));
  }
  for (uint64_t i = 0; i < chunk_count; ++i) extent_chunks[i].store(nullptr);
  superblock = start.superblock;
  intent_seq = start.intent_log.max_sequence;
  next_ring = start.intent_log.next_ring_index;
}

Scoreboard::Impl::~Impl() {
  for (uint64_t i = 0; i < chunk_count; ++i) delete[] extent_chunks[i].load();
}

std::atomic<uint64_t>& Scoreboard::Impl::ExtentWord(uint64_t extent) {
  std::atomic<std::atomic<uint64_t>*>& slot = extent_chunks[extent / kExtentChunk];
  std::atomic<uint64_t>* chunk = slot.load();
  if (chunk == nullptr) {
    auto* fresh = new std::atomic<uint64_t>[kExtentChunk];
    for (uint64_t i = 0; i < kExtentChunk; ++i) fresh[i].store(0);
    if (slot.compare_exchange_strong(chunk, fresh)) {
      chunk = fresh;
      allocated_chunks.fetch_add(1);
    } else {
      delete[] fresh;  // another thread won; `chunk` holds its pointer
    }
  }
  return chunk[extent % kExtentChunk];
}

WriteSeq Scoreboard::Impl::ExtentSeq(uint64_t extent) const {
  const std::atomic<uint64_t>* chunk = extent_chunks[extent / kExtentChunk].load();
  // No chunk: no MarkDirty touched the extent since open (MarkDirty
  // allocates before it looks at any bit).
  return chunk == nullptr ? 0 : chunk[extent % kExtentChunk].load() >> 1;
}

void Scoreboard::Impl::BumpExtentSeq(uint64_t extent, WriteSeq seq) {
  std::atomic<uint64_t>& word = ExtentWord(extent);
  uint64_t cur = word.load();
  // A max, not a store: a slower MarkDirty with an older seq must not hide
  // a newer one from MarkClean.
  while ((cur >> 1) < seq && !word.compare_exchange_weak(cur, (seq << 1) | (cur & kHotBit))) {
  }
}

Status Scoreboard::Impl::Fail(const Status& s) {
  {
    std::lock_guard<std::mutex> lock(failure_mu);
    if (!failed.load()) {
      failure = s;
      failed.store(true);
    }
  }
  return FailureStatus();
}

Status Scoreboard::Impl::FailureStatus() const {
  std::lock_guard<std::mutex> lock(failure_mu);
  return Status::IOError(fmt::format("scoreboard metadata {} failed earlier ({}); writes are "
                                     "refused until the volume is reopened",
                                     path, failure.ToString()),
                         EIO);
}

bool Scoreboard::Impl::AllSlotsSet(uint64_t first, uint64_t last) const {
  for (const auto& bm : bitmaps) {
    if (!bm->AllSet(first, last)) return false;
  }
  return true;
}

bool Scoreboard::Impl::TrySetViaHotExtent(uint64_t extent, uint64_t first, uint64_t last) {
  PinCounter& pin = pins[extent % kPinShards];
  // The pin must be visible before we look at the hot bit, and eviction
  // clears the hot bit before it looks at the pins (both seq_cst): so
  // either eviction waits for us, or we see the extent cold.
  pin.n.fetch_add(1);
  bool hot = (ExtentWord(extent).load() & kHotBit) != 0;
  if (hot) {
    for (auto& bm : bitmaps) bm->SetRange(first, last);
  }
  pin.n.fetch_sub(1);
  return hot;
}

std::optional<Status> Scoreboard::Impl::MarkDirty(uint64_t offset, uint64_t length,
                                                  WriteSeq* seq_out, bool may_block) {
  if (failed.load(std::memory_order_relaxed)) return FailureStatus();
  if (closed.load(std::memory_order_relaxed)) {
    return Status::Aborted(fmt::format("scoreboard {} is closed", path));
  }
  if (offset > g.size_bytes || length > g.size_bytes - offset) {
    return Status::InvalidArgument(fmt::format("scoreboard {}: range {}+{} passes the end ({})",
                                               path, offset, length, g.size_bytes));
  }
  WriteSeq seq = write_seq.fetch_add(1) + 1;
  if (seq_out != nullptr) *seq_out = seq;
  if (length == 0 || bitmaps.empty()) return Status::OK();
  const auto [first, last, e0, e1] = SpanOf(offset, length);
  // The seq goes in before the bits are read: MarkClean clears bits and then
  // reads the seq, so one of us sees the other (see MarkClean). A
  // non-blocking call that gives up has bumped seqs for nothing, which only
  // makes a clear more cautious.
  for (uint64_t e = e0; e <= e1; ++e) BumpExtentSeq(e, seq);

  // Fast path: set bits are durable bits.
  if (AllSlotsSet(first, last)) return Status::OK();

  std::vector<uint32_t> need;
  for (uint64_t e = e0; e <= e1; ++e) {
    const auto [a, b] = RegionsInExtent(e, first, last);
    if (!AllSlotsSet(a, b)) need.push_back(static_cast<uint32_t>(e));
  }
  if (need.size() > direct_threshold) {
    if (!may_block) return std::nullopt;
    return DirectMark(first, last);
  }
  while (true) {
    std::vector<uint32_t> pending;
    for (uint32_t e : need) {
      const auto [a, b] = RegionsInExtent(e, first, last);
      if (!TrySetViaHotExtent(e, a, b)) {
        pending.push_back(e);
        continue;
      }
      uint64_t marker = e;
      if (readahead_marker.load(std::memory_order_relaxed) == e &&
          readahead_marker.compare_exchange_strong(marker, kNoExtent)) {
        readahead_due.store(true);
      }
    }
    if (pending.empty()) return Status::OK();
    // Bits set above through hot extents are durable, so giving up here
    // leaves nothing to undo.
    if (!may_block) return std::nullopt;
    std::vector<uint32_t> entered;
    for (uint32_t e : pending) {
      const uint64_t start = ExtentFirstRegion(e) * g.region_size_bytes;
      if (start >= offset && start < offset + length) entered.push_back(e);
    }
    Status s = GroupCommit(pending, std::move(entered));
    if (!s.ok()) return s;
    // Normally all hot now; an extent evicted again by a later commit
    // before we got to it goes round once more.
    need.swap(pending);
  }
}

void Scoreboard::Impl::Announce(uint64_t offset, uint64_t length) {
  if (length == 0 || bitmaps.empty() || failed.load(std::memory_order_relaxed)) return;
  if (offset > g.size_bytes || length > g.size_bytes - offset) return;
  const auto [first, last, e0, e1] = SpanOf(offset, length);
  if (e1 - e0 >= 2) return;
  for (uint64_t e = e0; e <= e1; ++e) {
    if (ExtentWord(e).load() & kHotBit) continue;
    const auto [a, b] = RegionsInExtent(e, first, last);
    if (AllSlotsSet(a, b)) continue;
    std::lock_guard<std::mutex> lock(announced_mu);
    // Consecutive writes into one extent announce it once.
    if (!announced.empty() && announced.back() == e) continue;
    if (announced.size() < g.max_intent_extents) announced.push_back(static_cast<uint32_t>(e));
  }
}

Status Scoreboard::Impl::GroupCommit(std::vector<uint32_t> extents,
                                     std::vector<uint32_t> entered) {
  Writer w;
  w.extents = std::move(extents);
  w.entered = std::move(entered);
  std::unique_lock<std::mutex> lock(queue_mu);
  writers.push_back(&w);
  while (!w.done && &w != writers.front()) w.cv.wait(lock);
  if (w.done) return w.status;

  // Leader: commit for every writer queued behind us, as long as the union
  // fits the hot set.
  std::vector<uint32_t> all, all_entered;
  std::vector<Writer*> batch;
  for (Writer* x : writers) {
    if (!batch.empty() && all.size() + x->extents.size() > g.max_intent_extents) break;
    batch.push_back(x);
    all.insert(all.end(), x->extents.begin(), x->extents.end());
    all_entered.insert(all_entered.end(), x->entered.begin(), x->entered.end());
  }
  std::sort(all.begin(), all.end());
  all.erase(std::unique(all.begin(), all.end()), all.end());
  lock.unlock();
  Status s;
  {
    std::lock_guard<std::mutex> io_lock(io_mu);
    s = CommitExtentsLocked(all, all_entered);
  }
  lock.lock();
  for (Writer* x : batch) {
    writers.pop_front();
    if (x != &w) {
      x->status = s;
      x->done = true;
      x->cv.notify_one();
    }
  }
  if (!writers.empty()) writers.front()->cv.notify_one();
  return s;
}

Status Scoreboard::Impl::CommitExtentsLocked(const std::vector<uint32_t>& extents,
                                             const std::vector<uint32_t>& entered) {
  if (failed.load()) return FailureStatus();
  std::vector<uint32_t> need;
  for (uint32_t e : extents) {
    if ((ExtentWord(e).load() & kHotBit) == 0) need.push_back(e);
  }
  if (need.empty()) return Status::OK();  // an earlier leader did it
  const size_t cap = g.max_intent_extents;
  // A writer streaming through the volume enters the extent after the last
  // one committed at its start, and will ask for the next ones soon: after
  // two such commits in a row, declare them in this record, so that one
  // metadata sync covers several extents (sequential 1 MiB writes paid a
  // sync per 4 MiB extent, ~0.6 ms each). Random writes almost never
  // qualify (a 4 KiB write starts an extent once in 1,024, and it must be
  // the right extent twice running). What it costs: after a crash, the
  // extents declared ahead and never written are resynced too (they are
  // merged dirty like any hot extent).
  // The record never lists more than `cap` extents (recovery takes a
  // longer one for torn), so the extents ahead only fill what is left.
  // The run ahead doubles while the stream goes on (7, 14, 28, 56, 112,
  // 224, then a quarter of the hot set), as the kernel's readahead window
  // does: 4 GiB of sequential 1 MiB writes paid 128 syncs with a fixed 7,
  // and 24 with runs of at most 56, 12 now. Even when the writer does not
  // wait for them (CommitReadahead), each sync flushes the disk's cache
  // under the stream's writeback: 24 of them cost the benchmark's
  // sequential row 5-9 %. A crash resyncs at most a run and a half that
  // was never written (1.5 GiB with the default hot set), less than
  // DRBD's activity log covers (al-extents 1237: 4.8 GiB).
  std::optional<uint64_t> stream_end;
  const uint64_t next = last_committed_extent ? uint64_t{*last_committed_extent} + 1 : 0;
  const bool continues = last_committed_extent &&
                         std::find(entered.begin(), entered.end(), next) != entered.end();
  sequential_streak = continues ? sequential_streak + 1 : 0;
  const size_t room = cap > need.size() ? cap - need.size() : 0;
  const size_t wanted =
      sequential_streak >= 2
          ? kSequentialExtentsAhead
                << std::min(sequential_streak - 2, kSequentialAheadDoublings)
          : 0;
  const size_t ahead = std::min({wanted, cap / 4, room});
  if (ahead > 0) {
    uint64_t e = next + 1;
    for (; e <= next + ahead && e < g.extent_count; ++e) {
      const auto ext = static_cast<uint32_t>(e);
      if ((ExtentWord(ext).load() & kHotBit) == 0) need.push_back(ext);
    }
    stream_end = e - 1;
  }
  // Armed again below once this record is durable.
  readahead_marker.store(kNoExtent);
  const uint32_t highest_asked = *std::max_element(need.begin(), need.end());
  // Writes on their way to MarkDirty announced the extents they will need
  // (Announce): take along those that fit without an eviction. Only one
  // writer per storage thread can be waiting here, so without this a QD32
  // random writer entering fresh extents paid a sync per 2-3 of them.
  std::vector<uint32_t> announced_now;
  {
    std::lock_guard<std::mutex> lock(announced_mu);
    announced_now.swap(announced);
  }
  std::sort(announced_now.begin(), announced_now.end());
  announced_now.erase(std::unique(announced_now.begin(), announced_now.end()),
                      announced_now.end());
  size_t fit = cap > hot.size() + need.size() ? cap - hot.size() - need.size() : 0;
  for (uint32_t e : announced_now) {
    if (fit == 0) break;
    if ((ExtentWord(e).load() & kHotBit) != 0) continue;
    need.push_back(e);
    --fit;
  }
  // The record lists extents strictly ascending; another writer of the
  // batch may already have asked for one declared ahead or announced.
  std::sort(need.begin(), need.end());
  need.erase(std::unique(need.begin(), need.end()), need.end());
  if (hot.size() + need.size() > cap) {
    // Evict an eighth of the set beyond what is needed, so that a stream of
    // new extents pays the eviction's extra sync once per cap/8 commits.
    size_t evict = std::min(hot.size(), hot.size() + need.size() - cap + cap / 8);
    std::vector<std::pair<WriteSeq, uint32_t>> by_age;
    by_age.reserve(hot.size());
    for (uint32_t e : hot) by_age.emplace_back(ExtentSeq(e), e);
    std::nth_element(by_age.begin(), by_age.begin() + static_cast<ptrdiff_t>(evict) - 1,
                     by_age.end());
    std::vector<uint32_t> victims;
    for (size_t i = 0; i < evict; ++i) victims.push_back(by_age[i].second);
    Status s = EvictLocked(victims);
    if (!s.ok()) return s;
  }
  std::vector<uint32_t> record = hot;
  record.insert(record.end(), need.begin(), need.end());
  Status s = WriteIntentRecordLocked(std::move(record), /*sync=*/true);
  if (!s.ok()) return s;
  // Only now, with the record durable, may writers use these extents.
  for (uint32_t e : need) {
    ExtentWord(e).fetch_or(kHotBit);
    hot.push_back(e);
  }
  // Where the stream will ask next: past the extents ahead, and past any
  // hot ones after them (extents its own queued writes announced), so that
  // announcements do not hide a sequential writer.
  uint64_t last = stream_end.value_or(highest_asked);
  for (size_t i = 0; i < cap && last + 1 < g.extent_count &&
                     (ExtentWord(last + 1).load() & kHotBit) != 0;
       ++i) {
    ++last;
  }
  last_committed_extent = static_cast<uint32_t>(last);
  hot_count.store(hot.size());
  if (stream_end && ahead >= 2 && *stream_end + 1 < g.extent_count) {
    // Half way into the run ahead, the next run is declared in the
    // background (CommitReadahead), so the writer does not reach an
    // extent that is not hot yet and wait for the sync.
    readahead_marker.store(*stream_end - ahead / 2);
  }
  return Status::OK();
}

Status Scoreboard::Impl::CommitReadahead() {
  if (failed.load()) return FailureStatus();
  std::lock_guard<std::mutex> io_lock(io_mu);
  if (closed.load() || !last_committed_extent) return Status::OK();
  const uint64_t next = uint64_t{*last_committed_extent} + 1;
  if (next >= g.extent_count) return Status::OK();
  // As if the writer had entered `next` already: that continues the
  // stream, so the record covers `next` and the run after it.
  const auto e = static_cast<uint32_t>(next);
  const uint64_t before = commits.load();
  Status s = CommitExtentsLocked({e}, {e});
  if (commits.load() != before) readahead_commits.fetch_add(1);
  return s;
}

Status Scoreboard::Impl::EvictLocked(const std::vector<uint32_t>& victims) {
  std::array<bool, kPinShards> shards{};
  for (uint32_t v : victims) {
    ExtentWord(v).fetch_and(~kHotBit);
    shards[v % kPinShards] = true;
  }
  // Writers that saw an extent hot finish setting its bits within a few
  // atomic operations; wait for them so the snapshot below has their bits.
  for (size_t i = 0; i < kPinShards; ++i) {
    if (!shards[i]) continue;
    while (pins[i].n.load() != 0) std::this_thread::yield();
  }
  std::vector<PageRef> refs;
  for (uint32_t v : victims) PagesOf(ExtentFirstRegion(v), ExtentLastRegion(v), &refs);
  // The victims' bits must be on disk before the record that drops them.
  Status s = WritePagesLocked(std::move(refs), nullptr);
  if (!s.ok()) return s;
  std::vector<uint32_t> sorted = victims;
  std::sort(sorted.begin(), sorted.end());
  std::erase_if(hot, [&](uint32_t e) { return std::binary_search(sorted.begin(), sorted.end(), e); });
  hot_count.store(hot.size());
  evictions.fetch_add(victims.size());
  return Status::OK();
}

Status Scoreboard::Impl::DirectMark(uint64_t first, uint64_t last) {
  std::lock_guard<std::mutex> io_lock(io_mu);
  if (failed.load()) return FailureStatus();
  std::vector<PageRef> refs;
  PagesOf(first, last, &refs);
  RegionRange range{first, last};
  Status s = WritePagesLocked(std::move(refs), &range);
  if (!s.ok()) return s;
  // Durable now; only now may other writers see these bits set.
  for (auto& bm : bitmaps) bm->SetRange(first, last);
  direct_marks.fetch_add(1);
  return Status::OK();
}

void Scoreboard::Impl::PagesOf(uint64_t first, uint64_t last, std::vector<PageRef>* refs) const {
  for (uint32_t pos = 0; pos < bitmaps.size(); ++pos) {
    for (uint64_t p = first / format::kBitsPerPage; p <= last / format::kBitsPerPage; ++p) {
      refs->push_back(PageRef{pos, p});
    }
  }
}

std::vector<PageRef> Scoreboard::Impl::UnflushedPages() const {
  std::vector<PageRef> refs;
  for (uint32_t pos = 0; pos < bitmaps.size(); ++pos) {
    for (uint64_t p = 0; p < bitmaps[pos]->page_count(); ++p) {
      if (bitmaps[pos]->IsUnflushed(p)) refs.push_back(PageRef{pos, p});
    }
  }
  return refs;
}

Status Scoreboard::Impl::WritePagesLocked(std::vector<PageRef> refs, const RegionRange* add) {
  std::sort(refs.begin(), refs.end());
  refs.erase(std::unique(refs.begin(), refs.end()), refs.end());
  std::vector<PageRef> taken;
  std::vector<uint64_t> words;
  uint64_t epoch = 0;
  {
    std::lock_guard<std::mutex> lock(pages_mu);
    for (const PageRef& ref : refs) {
      // Taking the flag before the snapshot: a bit set after it marks the
      // page again, so the next flush writes it.
      bool changed = bitmaps[ref.pos]->TakeUnflushed(ref.page);
      if (!changed && add == nullptr) continue;
      taken.push_back(ref);
      words.resize(taken.size() * format::kWordsPerPage);
      std::span<uint64_t> page_words(words.data() + (taken.size() - 1) * format::kWordsPerPage,
                                     format::kWordsPerPage);
      bitmaps[ref.pos]->SnapshotPage(ref.page, page_words);
      if (add != nullptr) OrRangeIntoPage(page_words, ref.page, *add);
    }
    epoch = clear_epoch;
  }
  if (taken.empty()) return Status::OK();

  // The snapshot may persist clears. A cleared region was acknowledged by a
  // downstream site with this site's bytes as they were in the page cache;
  // had a power loss then dropped those bytes here, the downstream would
  // hold data this site lost, with no bit left to say so. So the backing
  // store is flushed first whenever a clear happened since the last flush
  // (MarkClean's contract: the writes behind a clear had completed before
  // it, and it happened before this snapshot).
  if (epoch != flushed_clear_epoch) {
    if (flush_backing) {
      Status s = flush_backing();
      if (!s.ok()) {
        return Fail(s.WithContext("flushing the backing store before persisting cleared bits"));
      }
    }
    flushed_clear_epoch = epoch;
  }

  std::vector<std::byte> buf;
  size_t i = 0;
  while (i < taken.size()) {
    size_t run = 1;
    while (i + run < taken.size() && run < kMaxPagesPerWrite &&
           taken[i + run].pos == taken[i].pos && taken[i + run].page == taken[i].page + run) {
      ++run;
    }
    buf.resize(run * format::kBlockBytes);
    for (size_t k = 0; k < run; ++k) {
      const PageRef& ref = taken[i + k];
      format::EncodeBitmapPage(
          slots[ref.pos].slot, static_cast<uint32_t>(ref.page), salt,
          std::span<const uint64_t>(words.data() + (i + k) * format::kWordsPerPage,
                                    format::kWordsPerPage),
          std::span<std::byte>(buf.data() + k * format::kBlockBytes, format::kBlockBytes));
    }
    Status s = file->PWrite(g.PageOffset(slots[taken[i].pos].slot, taken[i].page), buf);
    if (!s.ok()) return Fail(s);
    i += run;
  }
  return SyncLocked();
}

Status Scoreboard::Impl::WriteIntentRecordLocked(std::vector<uint32_t> extents, bool sync) {
  std::sort(extents.begin(), extents.end());
  format::IntentRecord record;
  record.sequence = intent_seq + 1;
  record.ring_index = next_ring;
  record.extents = std::move(extents);
  std::vector<std::byte> bytes = format::EncodeIntentRecord(record, salt, g);
  Status s = file->PWrite(g.IntentRecordOffset(next_ring), bytes);
  if (!s.ok()) return Fail(s);
  if (sync) {
    s = SyncLocked();
    if (!s.ok()) return s;
  }
  intent_seq = record.sequence;
  next_ring = (next_ring + 1) % format::kIntentLogRecords;
  commits.fetch_add(1);
  return Status::OK();
}

Status Scoreboard::Impl::WriteSuperblockLocked(format::Superblock sb) {
  sb.sequence = superblock.sequence + 1;
  Status s = WriteSuperblockCopy(*file, g, sb);
  if (!s.ok()) return Fail(s);
  s = SyncLocked();
  if (!s.ok()) return s;
  superblock = std::move(sb);
  return Status::OK();
}

Status Scoreboard::Impl::SyncLocked() {
  syncs.fetch_add(1);
  Status s = file->Sync();
  if (!s.ok()) return Fail(s);
  return Status::OK();
}

uint64_t Scoreboard::Impl::MarkClean(uint32_t slot, uint64_t offset, uint64_t length,
                                     WriteSeq as_of) {
  if (slot >= format::kMaxSlots || slot_pos[slot] < 0 || length == 0) return 0;
  if (offset >= g.size_bytes) return 0;
  SlotBitmap& bm = *bitmaps[static_cast<size_t>(slot_pos[slot])];
  uint64_t end = std::min(g.size_bytes, offset + std::min(length, g.size_bytes));
  // Whole regions only: a region partly outside the range may still differ.
  uint64_t c0 = (offset + g.region_size_bytes - 1) / g.region_size_bytes;
  uint64_t c_end = end == g.size_bytes ? g.region_count : end / g.region_size_bytes;
  if (c0 >= c_end) return 0;
  uint64_t total = 0;
  std::vector<uint64_t> old;
  std::lock_guard<std::mutex> lock(pages_mu);
  for (uint64_t e = c0 / g.regions_per_extent; e <= (c_end - 1) / g.regions_per_extent; ++e) {
    uint64_t a = std::max(c0, ExtentFirstRegion(e));
    uint64_t b = std::min(c_end - 1, ExtentLastRegion(e));
    old.clear();
    uint64_t n = bm.ClearRange(a, b, &old);
    if (n == 0) continue;
    // Clear first, then read the extent's seq. A MarkDirty bumps the seq
    // before it reads the bits. So a MarkDirty newer than as_of either saw
    // our clear (and will set the bit again) or we see its seq here and put
    // the bits back. pages_mu keeps snapshots from seeing the gap.
    if (ExtentSeq(e) > as_of) {
      bm.RestoreRange(a, b, old);
      continue;
    }
    total += n;
  }
  if (total != 0) ++clear_epoch;
  return total;
}

Status Scoreboard::Impl::FlushBitmaps() {
  if (failed.load()) return FailureStatus();
  std::lock_guard<std::mutex> io_lock(io_mu);
  return WritePagesLocked(UnflushedPages(), nullptr);
}

Status Scoreboard::Impl::Close() {
  std::lock_guard<std::mutex> io_lock(io_mu);
  bool again = closed.exchange(true);
  if (failed.load()) return FailureStatus();
  if (again) return Status::OK();
  Status s = WritePagesLocked(UnflushedPages(), nullptr);
  if (!s.ok()) return s;
  // Every set bit is on disk now, so the intent log adds nothing: empty it
  // (for inspect's sake) and say so in the superblock, one sync for both.
  s = WriteIntentRecordLocked({}, /*sync=*/false);
  if (!s.ok()) return s;
  hot.clear();
  hot_count.store(0);
  format::Superblock sb = superblock;
  sb.clean_shutdown = true;
  return WriteSuperblockLocked(std::move(sb));
}

SlotStats Scoreboard::Impl::StatsFor(size_t pos) const {
  SlotStats stats;
  stats.slot = slots[pos].slot;
  stats.site = slots[pos].site;
  stats.dirty_regions = bitmaps[pos]->CountSet();
  stats.dirty_bytes = DirtyBytes(*bitmaps[pos], g);
  return stats;
}

uint64_t Scoreboard::Impl::MemoryUsageBytes() const {
  uint64_t total = chunk_count * sizeof(std::atomic<uint64_t>*) +
                   allocated_chunks.load() * kExtentChunk * sizeof(std::atomic<uint64_t>);
  for (const auto& bm : bitmaps) total += bm->MemoryUsageBytes();
  return total;
}

// ------------------------------------------------------------------ start

Result<std::unique_ptr<Scoreboard>> StartScoreboard(ScoreboardStart start,
                                                    std::vector<std::string>* notices) {
  auto impl = std::make_unique<Scoreboard::Impl>(start);
  const format::Geometry& g = impl->g;
  std::vector<size_t> loaded;
  for (size_t pos = 0; pos < start.slots.size(); ++pos) {
    const ScoreboardStart::Slot& slot = start.slots[pos];
    SlotBitmap& bm = *impl->bitmaps[pos];
    switch (slot.init) {
      case ScoreboardStart::SlotInit::kLoad: {
        Status s = LoadSlotBitmap(*impl->file, g, impl->salt, slot.index, slot.site, &bm, notices);
        if (!s.ok()) return s;
        loaded.push_back(pos);
        break;
      }
      case ScoreboardStart::SlotInit::kAllDirty:
        bm.LoadAllSet();
        for (uint64_t p = 0; p < bm.page_count(); ++p) bm.MarkUnflushed(p);
        notices->push_back(fmt::format(
            "slot {} added for site {}: every region is dirty (the site needs a full sync)",
            slot.index, slot.site));
        break;
      case ScoreboardStart::SlotInit::kClean:
        for (uint64_t p = 0; p < bm.page_count(); ++p) bm.MarkUnflushed(p);
        notices->push_back(fmt::format(
            "slot {} added for site {} with initial_sync none: every region is clean", slot.index,
            slot.site));
        break;
    }
  }
  if (!start.was_clean_shutdown && !loaded.empty()) {
    const std::optional<format::IntentRecord>& latest = start.intent_log.latest;
    if (latest) {
      for (size_t pos : loaded) ApplyIntentExtents(latest->extents, g, impl->bitmaps[pos].get());
      notices->push_back(fmt::format(
          "unclean shutdown: {} intent extent(s) of {} merged into the dirty set of {} slot(s)",
          latest->extents.size(), format::FormatBytes(g.intent_extent_bytes), loaded.size()));
    } else {
      // Cannot happen with files we wrote (creation writes a record), so the
      // log was damaged: nothing tells which regions were being written.
      for (size_t pos : loaded) {
        SlotBitmap& bm = *impl->bitmaps[pos];
        bm.LoadAllSet();
        for (uint64_t p = 0; p < bm.page_count(); ++p) bm.MarkUnflushed(p);
      }
      notices->push_back(
          "unclean shutdown and no readable intent record: every region of every slot is "
          "treated as dirty");
    }
  }
  {
    std::lock_guard<std::mutex> io_lock(impl->io_mu);
    // What we read may not be durable: a superblock copy (or a page) whose
    // sync failed before this open can still sit in the page cache. Make it
    // durable before the write below overwrites the other superblock copy,
    // or a power loss could tear both (found by the randomized crash test:
    // an injected sync failure, a reopen, then a power cut).
    Status s = impl->SyncLocked();
    if (!s.ok()) return s;
    // Merged and new bits durable first; only then may the empty record
    // below replace the log they came from.
    s = impl->WritePagesLocked(impl->UnflushedPages(), nullptr);
    if (!s.ok()) return s;
    s = impl->WriteIntentRecordLocked({}, /*sync=*/false);
    if (!s.ok()) return s;
    format::Superblock sb = start.superblock;
    sb.clean_shutdown = false;  // from now on a crash must merge the log
    s = impl->WriteSuperblockLocked(std::move(sb));  // syncs record and superblock
    if (!s.ok()) return s;
  }
  return std::make_unique<Scoreboard>(std::move(impl));
}

format::Superblock CurrentSuperblock(const Scoreboard& scoreboard) {
  std::lock_guard<std::mutex> lock(scoreboard.impl_->io_mu);
  return scoreboard.impl_->superblock;
}

Status UpdateSuperblock(Scoreboard& scoreboard,
                        const std::function<void(format::Superblock&)>& change) {
  Scoreboard::Impl& impl = *scoreboard.impl_;
  std::lock_guard<std::mutex> lock(impl.io_mu);
  if (impl.failed.load()) return impl.FailureStatus();
  format::Superblock sb = impl.superblock;
  change(sb);
  return impl.WriteSuperblockLocked(std::move(sb));
}

// ------------------------------------------------------------- public API

Scoreboard::Scoreboard(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Scoreboard::~Scoreboard() = default;

uint64_t Scoreboard::size_bytes() const { return impl_->g.size_bytes; }
uint64_t Scoreboard::region_size_bytes() const { return impl_->g.region_size_bytes; }
uint64_t Scoreboard::region_count() const { return impl_->g.region_count; }
uint64_t Scoreboard::intent_extent_bytes() const { return impl_->g.intent_extent_bytes; }
const std::vector<ScoreboardSlot>& Scoreboard::slots() const { return impl_->slots; }

Status Scoreboard::MarkDirty(uint64_t offset, uint64_t length, WriteSeq* seq) {
  return *impl_->MarkDirty(offset, length, seq, /*may_block=*/true);
}

std::optional<Status> Scoreboard::TryMarkDirty(uint64_t offset, uint64_t length, WriteSeq* seq) {
  return impl_->MarkDirty(offset, length, seq, /*may_block=*/false);
}

void Scoreboard::Announce(uint64_t offset, uint64_t length) { impl_->Announce(offset, length); }

WriteSeq Scoreboard::CurrentWriteSeq() const { return impl_->write_seq.load(); }

uint64_t Scoreboard::MarkClean(uint32_t slot, uint64_t offset, uint64_t length, WriteSeq as_of) {
  return impl_->MarkClean(slot, offset, length, as_of);
}

Status Scoreboard::MarkAllDirty(uint32_t slot) {
  return MarkRegionsDirty(slot, 0, impl_->g.region_count - 1);
}

Status Scoreboard::MarkRegionsDirty(uint32_t slot, uint64_t first, uint64_t last) {
  if (slot >= format::kMaxSlots || impl_->slot_pos[slot] < 0) {
    return Status::InvalidArgument(fmt::format("scoreboard has no slot {}", slot));
  }
  if (first > last || last >= impl_->g.region_count) {
    return Status::InvalidArgument(fmt::format(
        "regions {}..{} outside the volume's {} regions", first, last,
        impl_->g.region_count));
  }
  SlotBitmap& bm = *impl_->bitmaps[static_cast<size_t>(impl_->slot_pos[slot])];
  {
    std::lock_guard<std::mutex> lock(impl_->pages_mu);
    bm.SetRange(first, last);
    // Every page is marked: cheap, and FlushBitmaps writes only those.
    for (uint64_t p = 0; p < bm.page_count(); ++p) bm.MarkUnflushed(p);
  }
  return impl_->FlushBitmaps();
}

bool Scoreboard::IsDirty(uint32_t slot, uint64_t region) const {
  if (slot >= format::kMaxSlots || impl_->slot_pos[slot] < 0) return false;
  if (region >= impl_->g.region_count) return false;
  return impl_->bitmaps[static_cast<size_t>(impl_->slot_pos[slot])]->Test(region);
}

std::optional<uint64_t> Scoreboard::NextDirtyRegion(uint32_t slot, uint64_t from_region) const {
  if (slot >= format::kMaxSlots || impl_->slot_pos[slot] < 0) return std::nullopt;
  return impl_->bitmaps[static_cast<size_t>(impl_->slot_pos[slot])]->NextSet(from_region);
}

bool Scoreboard::ReadaheadDue() {
  return impl_->readahead_due.load(std::memory_order_relaxed) &&
         impl_->readahead_due.exchange(false);
}

Status Scoreboard::CommitReadahead() { return impl_->CommitReadahead(); }

Status Scoreboard::FlushBitmaps() { return impl_->FlushBitmaps(); }
Status Scoreboard::Close() { return impl_->Close(); }

Status Scoreboard::health() const {
  return impl_->failed.load() ? impl_->FailureStatus() : Status::OK();
}

ScoreboardStats Scoreboard::Stats() const {
  ScoreboardStats stats;
  for (size_t pos = 0; pos < impl_->slots.size(); ++pos) stats.slots.push_back(impl_->StatsFor(pos));
  stats.intent_extents_in_use = impl_->hot_count.load();
  stats.max_intent_extents = impl_->g.max_intent_extents;
  stats.metadata_syncs = impl_->syncs.load();
  stats.intent_commits = impl_->commits.load();
  stats.readahead_commits = impl_->readahead_commits.load();
  stats.evicted_extents = impl_->evictions.load();
  stats.direct_marks = impl_->direct_marks.load();
  stats.memory_bytes = impl_->MemoryUsageBytes();
  return stats;
}

SlotStats Scoreboard::StatsForSlot(uint32_t slot) const {
  if (slot >= format::kMaxSlots || impl_->slot_pos[slot] < 0) return SlotStats{slot, "", 0, 0};
  return impl_->StatsFor(static_cast<size_t>(impl_->slot_pos[slot]));
}

uint64_t Scoreboard::MemoryUsageBytes() const { return impl_->MemoryUsageBytes(); }

}  // namespace blockrelay::storage
