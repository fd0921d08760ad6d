#include "replication/receiver.h"

#include <atomic>
#include <cstring>
#include <functional>
#include <map>
#include <thread>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/post.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/use_awaitable.hpp>
#include <fmt/format.h>
#include "util/xxhash.h"

#include "replication/frame_io.h"
#include "replication/group_role.h"
#include "replication/resync_diff.h"
#include "replication/replication_group.h"
#include "util/logging.h"

namespace blockrelay::replication {

namespace {
constexpr auto kAsTuple = asio::experimental::as_tuple(asio::use_awaitable);
constexpr auto kHandshakeTimeout = std::chrono::seconds(10);
// How often the ticker looks for work (resync data to flush, groups to
// sync and apply), and how many bytes may wait before they are synced and
// applied at once.
constexpr auto kSyncInterval = std::chrono::milliseconds(5);
constexpr uint64_t kSyncBatchBytes = 4ull << 20;
// The groups of a connection whose HELLO asks for lazy durability (an
// async link without max_lag, with a memory queue: nothing upstream waits
// for this site's durability, so a group closed by FLUSH/FUA is not synced
// at once either) are synced in large batches: when the
// oldest has waited kLazySyncDelay, when kLazySyncBatchBytes wait, or when
// no frame has come for kLazySyncQuiet (the upstream went idle: it counts
// the link caught up only at the durable acknowledgement). Every journal
// sync writes back the journal pages and flushes the disk cache, on a disk
// that on a small site the upstream's own flushes may share; each such
// flush there also pays for whatever this site wrote since the last one.
// Syncing every 50 ms or 4 MiB (session 11) still cost a primary flushing
// every 32 writes 10-20 % of its IOPS against syncing every second
// (docs/benchmarks.md, session 12). The price is only on this site: the
// waiting frames are held in memory (at most kLazySyncBatchBytes, within
// kMaxPendingBytes) and applied late, and the upstream's scoreboard bits
// clear up to a second later. Other links' groups keep the kSyncInterval
// tick.
constexpr auto kLazySyncDelay = std::chrono::seconds(1);
constexpr auto kLazySyncQuiet = std::chrono::milliseconds(50);
constexpr uint64_t kLazySyncBatchBytes = 64ull << 20;
// Resync data is applied in batches of this many frame bytes (one undo
// sync each), and made durable (volumes flushed, acknowledged as durable)
// every kResyncFlushBytes: a flush after allocating writes costs a file
// system commit, so fewer of them move a full sync faster. The upstream's
// resync window (link.cc) holds several flushes' worth.
constexpr uint64_t kResyncBatchBytes = 8ull << 20;
constexpr uint64_t kMaxResyncQueueBytes = 4 * kResyncBatchBytes;
constexpr uint64_t kResyncFlushBytes = 32ull << 20;
// The ranges one applied batch may cover (ApplyQueuedResync).
constexpr uint64_t kMaxResyncBatchSpanBytes = 32ull << 20;
// The journal is rotated past this size, and when the link has been idle
// for kIdleReset: the full one is retired once the volumes are flushed
// (RotateJournal, RetireJournal). The volume flush writes back every region
// written since the last one, so a larger journal means fewer, more
// coalesced flushes competing with the journal's own syncs for the disk;
// it also bounds what a restart replays.
constexpr uint64_t kJournalResetBytes = 256ull << 20;
constexpr auto kIdleReset = std::chrono::seconds(1);
// A resync's BEGIN saves the volumes' holes of at least this size in the
// undo record at once (SaveHolesAtBegin), at most this many records.
constexpr uint64_t kMinHoleSavedAtBegin = 64ull << 10;
constexpr size_t kMaxHoleRecordsAtBegin = 65536;
// ... and walks the volumes' extents with at most this many block status
// calls (each covers up to 1,024 extents): a fragmented file costs BEGIN a
// bounded time under the apply lock.
constexpr size_t kMaxBlockStatusCallsAtBegin = 256;
// Received frames waiting to be synced and applied are held in memory; past
// this many bytes the connection stops taking frames until they are
// applied (the upstream's queue, bounded by its max_queue, absorbs it).
constexpr uint64_t kMaxPendingBytes = 256ull << 20;
// How long a quiet upstream may stay connected (it pings every
// keepalive/3; its keepalive is at most 10 minutes).
constexpr auto kReceiveTimeout = std::chrono::minutes(10);

// An ERROR frame's message, cut to what the protocol carries.
ErrorFrame MakeError(const std::string& message) {
  return ErrorFrame{100, message.substr(0, kMaxStringBytes)};
}

// Removes `path` (missing is fine) and syncs its directory.
Status RemoveDurably(io::Env& env, const std::string& path) {
  if (env.FileExists(path)) {
    if (Status s = env.RemoveFile(path); !s.ok()) return s.WithContext("remove " + path);
  }
  return env.SyncDir(io::DirName(path));
}

std::string VolumeNames(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}
}  // namespace

// A resync frame received and not applied yet.
struct Receiver::QueuedResync {
  uint64_t conn_id;
  uint64_t link_seq;
  Bytes frame;
};

struct Receiver::GroupState {
  ReceiverTarget target;
  // Swapped by RotateJournal under both locks below.
  std::unique_ptr<GroupJournal> journal;
  std::string journal_path;          // data_dir/journal-<group>.log
  // A rotated-out journal: every group in it is applied, not necessarily
  // durable in the volumes yet; kept as the spare once they are
  // (RetireJournal). After a crash its frames are replayed before the
  // journal's.
  std::string retired_journal_path;  // data_dir/journal-<group>.log.old
  // A retired journal, once dropped, is kept here and recycled by the next
  // rotation (GroupJournal::Recycle): never replayed.
  std::string spare_journal_path;    // data_dir/journal-<group>.log.spare
  bool retire_running = false;       // GUARDED_BY(apply_mu)
  // Incremented by every rotation: a retire task only removes the retired
  // journal of its own rotation. GUARDED_BY(apply_mu)
  uint64_t retire_epoch = 0;
  std::atomic<uint64_t> retired_journal_bytes{0};  // for status
  std::atomic<int> retires_in_flight{0};
  core::IoExecutor* io = nullptr;
  // Two locks, so that appending (what a sync link's writer waits for)
  // never waits behind a journal sync or the apply:
  //   append_mu: journal appends and `pending`; held briefly, except
  //              while the journal is reset (rare);
  //   apply_mu:  syncing and applying, one batch at a time, in order.
  // Lock order: apply_mu, then append_mu (then resync_mu).
  std::mutex apply_mu;
  std::mutex append_mu;
  struct Pending {
    uint64_t conn_id;
    uint64_t link_seq;
    Bytes frame;
  };
  std::vector<Pending> pending;   // GUARDED_BY(append_mu)
  // When the first of `pending` was appended. GUARDED_BY(append_mu)
  std::chrono::steady_clock::time_point pending_since;
  // When the last of `pending` was appended. GUARDED_BY(append_mu)
  std::chrono::steady_clock::time_point last_append;
  uint64_t pending_bytes = 0;     // GUARDED_BY(append_mu)
  uint64_t applied_group_seq = 0; // GUARDED_BY(apply_mu)
  std::atomic<uint64_t> applied_group_seq_seen{0};  // for status and HELLO
  uint64_t pending_bytes_hint() {
    std::lock_guard lock(append_mu);
    return pending_bytes;
  }
  std::chrono::steady_clock::time_point last_apply;  // GUARDED_BY(apply_mu)
  // An append, sync or apply failed: refuse the upstream until the group
  // is reopened (ReopenFailedGroup) or the site restarts.
  std::atomic<bool> failed{false};
  Status failure;  // GUARDED_BY(append_mu)
  void Fail(const Status& s) {
    std::lock_guard lock(append_mu);
    if (failure.ok()) failure = s;
    failed = true;
  }
  Status failure_status() {
    std::lock_guard lock(append_mu);
    return failure;
  }

  // Resync consistency (docs/replication.md, "Consistent downstream during
  // resync").
  io::Env* env = nullptr;
  std::string undo_path;         // data_dir/undo-<group>.log
  std::string full_resync_path;  // data_dir/full-resync-<group>: after a rollback
  std::unique_ptr<UndoRecord> undo;  // GUARDED_BY(apply_mu); set: inconsistent
  std::atomic<bool> consistent{true};        // for status
  std::atomic<uint64_t> undo_bytes{0};       // for status
  std::atomic<bool> full_resync_needed{false};

  // The site whose writes need no tracking here (GroupRole's
  // reconciled_with while secondary); cleared whenever the journal is
  // emptied. GUARDED_BY(apply_mu)
  std::string forget_site;

  // Resync data written straight to the volumes (ApplyResyncData) and
  // not flushed yet: not durable, so not acknowledged as durable.
  // GUARDED_BY(apply_mu)
  uint64_t resync_unflushed_bytes = 0;
  uint64_t resync_first_unflushed_link_seq = 0;  // of resync_conn_id
  // The last resync frame queued: a resync that paused (its window is full,
  // or it ended) is flushed at the next tick. GUARDED_BY(resync_mu)
  std::chrono::steady_clock::time_point last_resync_frame;
  uint64_t resync_conn_id = 0;
  uint64_t resync_link_seq = 0;
  // Resync frames received but not applied yet, in arrival order: applied
  // in batches, so that one undo-record sync covers many of them.
  // The network thread queues resync frames without waiting for a batch
  // being applied (QueueResyncInline); lock order apply_mu, append_mu,
  // resync_mu.
  std::mutex resync_mu;
  std::vector<QueuedResync> resync_queue;  // GUARDED_BY(resync_mu)
  uint64_t resync_queue_bytes = 0;         // GUARDED_BY(resync_mu)
  std::atomic<bool> resync_drain_posted{false};
  std::atomic<int> resync_drains_in_flight{0};
  // A retire or a resync drain runs on the pool with this state.
  bool PoolTasksRunning() const {
    return retires_in_flight.load() > 0 || resync_drains_in_flight.load() > 0;
  }
  // Resync data made durable by a flush that no connection's call asked
  // for (a background drain): reported by the next SyncAndApply.
  uint64_t resync_flushed_conn_id = 0;       // GUARDED_BY(apply_mu)
  uint64_t resync_flushed_link_seq = 0;      // GUARDED_BY(apply_mu)
  // A drain's flush running without apply_mu (StartResyncDrain), so that
  // the next batches are applied while the disk writes this one: until it
  // ends, nothing from resync_flushing_first_link_seq of
  // resync_flushing_conn_id on is reported durable. GUARDED_BY(apply_mu)
  bool resync_flushing = false;
  uint64_t resync_flushing_conn_id = 0;
  uint64_t resync_flushing_first_link_seq = 0;
  uint64_t resync_flushing_link_seq = 0;
  bool undo_unsynced = false;              // GUARDED_BY(apply_mu)

  // Network thread.
  int serving = 0;  // accepted connections still running
  bool rolling_back = false;
  bool reopening = false;  // ReopenFailedGroup runs for this (failed) state
  // Coroutines that hold a pointer to this state across a suspension
  // (Serve, SyncTicker, Rollback, DropUpstream): a state replaced by
  // ReopenFailedGroup is freed only once none does.
  int holders = 0;
  bool replaced = false;  // moved to replaced_groups_ (network thread)
  std::weak_ptr<Conn> active;
  std::string state = "waiting";  // waiting, connected, refused, error
  std::string peer;
  // Of the last connection's HELLO: "lazy" (an async link without
  // max_lag, with a memory queue) or "prompt".
  std::string durability;
  std::string last_error;
  uint64_t groups_received = 0;
  // Frames appended through the pool instead of inline (append_mu held by
  // a pool thread: a sync taking its batch, a rotation; or kMaxPendingBytes
  // waiting to be applied): receiving stopped until the append was done.
  std::atomic<uint64_t> receive_waits{0};
  // Journal syncs for received groups (each a file system commit and a
  // disk cache flush): for status.
  std::atomic<uint64_t> journal_syncs{0};
  uint64_t bytes_received = 0;
  uint64_t replayed_groups = 0;
};

// Counts a coroutine's pointer to a GroupState in its `holders` (network
// thread); Reset() when the coroutine takes another state. The last hold
// of a replaced state frees it. Only in coroutines counted in
// active_coroutines_, so that Stop() waits for them and no hold outlives
// the receiver.
class Receiver::StateHold {
 public:
  explicit StateHold(Receiver* r, GroupState* g = nullptr) : r_(r) { Reset(g); }
  StateHold(const StateHold&) = delete;
  StateHold& operator=(const StateHold&) = delete;
  ~StateHold() { Reset(nullptr); }
  void Reset(GroupState* g) {
    GroupState* old = g_;
    g_ = g;
    if (g_) ++g_->holders;
    if (old && --old->holders == 0 && old->replaced) r_->PruneReplacedGroups();
  }

 private:
  Receiver* r_;
  GroupState* g_ = nullptr;
};

// Counts a coroutine in active_coroutines_ for its whole life.
class Receiver::Running {
 public:
  explicit Running(int& n) : n_(n) { ++n_; }
  Running(const Running&) = delete;
  Running& operator=(const Running&) = delete;
  ~Running() { --n_; }

 private:
  int& n_;
};

void Receiver::PruneReplacedGroups() {
  std::erase_if(replaced_groups_, [](const std::unique_ptr<GroupState>& r) {
    return r->holders == 0 && !r->reopening && !r->rolling_back && !r->PoolTasksRunning();
  });
}

struct Receiver::Conn {
  explicit Conn(asio::ip::tcp::socket s)
      : stream(std::move(s)), wake(stream.get_executor()),
        ticker(stream.get_executor()), watchdog(stream, kReceiveTimeout) {}
  Stream stream;
  asio::steady_timer wake;
  asio::steady_timer ticker;
  Watchdog watchdog;
  uint64_t id = 0;
  std::string peer;
  GroupState* group = nullptr;
  bool closed = false;
  // The receive loop asks the ticker for a sync and apply at once (without
  // waiting for the tick): a durable group (barrier: resync data flushed
  // too) or many bytes waiting. Network thread.
  bool sync_now = false;
  bool sync_barrier = false;
  uint64_t last_link_seq = 0;
  uint64_t received = 0;
  uint64_t durable = 0;
  uint64_t acked_received = 0, acked_durable = 0;
  std::vector<uint64_t> pongs;
  std::vector<VerifyResult> verify_results;
  std::string error;  // sent as ERROR before closing
  std::string upstream_site;
  // The HELLO said nothing upstream waits for this site's durability (an
  // async link without max_lag, with a memory queue): its groups are
  // synced in batches (kLazySyncDelay).
  bool lazy_durability = false;
  // Set at accept; taken on the first frame (Reconcile).
  bool reconciled = false;
  std::optional<GenerationSet> adopt;
  void Close() {
    if (closed) return;
    closed = true;
    std::error_code ignored;
    stream.shutdown(asio::socket_base::shutdown_both, ignored);
    stream.close(ignored);
    wake.cancel();
    ticker.cancel();
  }
};

HelloCheck CheckHello(const Hello& hello, const std::string& local_site,
                      const std::vector<ReceiverTarget>& targets) {
  HelloCheck out;
  const ReceiverTarget* target = nullptr;
  for (size_t i = 0; i < targets.size(); ++i) {
    if (targets[i].config->name == hello.group) {
      target = &targets[i];
      out.target = i;
    }
  }
  auto refuse = [&](HelloResult r, std::string msg) {
    out.result = r;
    out.message = std::move(msg);
    return out;
  };
  if (!target) {
    return refuse(HelloResult::kUnknownGroup,
                  fmt::format("site {} has no secondary group \"{}\"",
                              local_site, hello.group));
  }
  const auto& cfg = *target->config;
  if (!target->secondary) {
    return refuse(HelloResult::kNotSecondary,
                  fmt::format("group {} is primary on site {}: it takes no "
                              "writes from site {} (demote it first)",
                              cfg.name, local_site, hello.site));
  }
  // After a failover the new primary may be any site this one replicated
  // to; its generations decide whether it may write here.
  bool allowed = cfg.upstream && cfg.upstream->site == hello.site;
  std::string downstream_sites;
  for (const auto& d : cfg.downstream) {
    if (d.site == hello.site) allowed = true;
    downstream_sites += (downstream_sites.empty() ? "" : ", ") + d.site;
  }
  if (!allowed) {
    return refuse(HelloResult::kWrongSite,
                  fmt::format("group {} on site {} takes writes only from its "
                              "configured upstream{}{}, not from site {}",
                              cfg.name, local_site,
                              cfg.upstream ? " (site " + cfg.upstream->site + ")" : "",
                              downstream_sites.empty()
                                  ? ""
                                  : " or, after a failover, from its downstream "
                                    "sites (" + downstream_sites + ")",
                              hello.site));
  }
  if (hello.region_size_bytes != cfg.region_size_bytes) {
    return refuse(HelloResult::kMismatch,
                  fmt::format("group {}: region_size is {} bytes on site {} but "
                              "{} on site {}", cfg.name, cfg.region_size_bytes,
                              local_site, hello.region_size_bytes, hello.site));
  }
  std::vector<std::string> ours, theirs;
  for (const auto& v : target->volumes) ours.push_back(v->name());
  for (const auto& v : hello.volumes) theirs.push_back(v.name);
  if (ours.size() != theirs.size()) {
    return refuse(HelloResult::kMismatch,
                  fmt::format("group {} has {} volume(s) on site {} ({}) but {} "
                              "on site {} ({})", cfg.name, ours.size(), local_site,
                              VolumeNames(ours), theirs.size(), hello.site,
                              VolumeNames(theirs)));
  }
  for (size_t i = 0; i < ours.size(); ++i) {
    if (ours[i] != theirs[i]) {
      return refuse(HelloResult::kMismatch,
                    fmt::format("group {}: volume {} is \"{}\" on site {} but "
                                "\"{}\" on site {}", cfg.name, i, ours[i],
                                local_site, theirs[i], hello.site));
    }
    const uint64_t size = target->volumes[i]->size_bytes();
    if (size != hello.volumes[i].size_bytes) {
      return refuse(HelloResult::kMismatch,
                    fmt::format("group {}: volume {} is {} bytes on site {} but "
                                "{} bytes on site {}", cfg.name, ours[i], size,
                                local_site, hello.volumes[i].size_bytes,
                                hello.site));
    }
  }
  return out;
}

Status CheckWriteGroup(const WriteGroup& group, const ReceiverTarget& target) {
  for (size_t i = 0; i < group.ops.size(); ++i) {
    const Op& op = group.ops[i];
    if (op.volume >= target.volumes.size()) {
      return Status::Corruption(fmt::format(
          "WRITE_GROUP {} op {}: volume index {} but the group has {} volume(s)",
          group.link_seq, i, op.volume, target.volumes.size()));
    }
    const uint64_t size = target.volumes[op.volume]->size_bytes();
    if (op.offset > size || op.length > size - op.offset) {
      return Status::Corruption(fmt::format(
          "WRITE_GROUP {} op {}: {}+{} lies beyond the end of volume {} ({} "
          "bytes)", group.link_seq, i, op.offset, op.length,
          target.volumes[op.volume]->name(), size));
    }
  }
  return Status::OK();
}

Receiver::Receiver(asio::io_context& ctx, core::IoExecutor& io,
                   std::string local_site)
    : ctx_(ctx), io_(io), local_site_(std::move(local_site)) {}

Receiver::~Receiver() {
  // A retire posted to the pool uses its GroupState (Stop() waits for it;
  // this covers a receiver destroyed without Stop()).
  for (auto* states : {&groups_, &replaced_groups_}) {
    for (auto& g : *states) {
      while (g->PoolTasksRunning()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
  }
}

Status Receiver::ApplyFrame(GroupState& g, const Bytes& frame) {
  std::span<const std::byte> bytes(frame);
  auto header = DecodeFrameHeader(bytes.first(kFrameHeaderBytes));
  if (!header.ok()) return header.status();
  // Checked when it arrived, or by GroupJournal::Open() when replayed.
  auto decoded = DecodeCheckedFrame(*header, bytes.first(kFrameHeaderBytes),
                                    bytes.subspan(kFrameHeaderBytes));
  if (!decoded.ok()) return decoded.status();
  auto* group = std::get_if<WriteGroup>(&*decoded);
  if (!group) return Status::Corruption("journal holds a frame that is not a WRITE_GROUP");
  return ApplyDecoded(g, *group, /*undo_saved=*/false);
}

Status Receiver::ApplyDecoded(GroupState& g, const WriteGroup& decoded_group,
                              bool undo_saved) {
  const WriteGroup* group = &decoded_group;
  if (Status s = CheckWriteGroup(*group, g.target); !s.ok()) return s;
  if (group->flags & kGroupResyncBegin) return BeginResync(g);
  if (group->flags & kGroupResyncEnd) return EndResync(g);
  // Between BEGIN and END: the old bytes are durable in the undo record
  // before the write that overwrites them is applied.
  if (g.undo && !undo_saved) {
    if (Status s = SaveUndo(g, *group); !s.ok()) {
      return s.WithContext(fmt::format("saving what group {} overwrites", group->group_seq));
    }
  }
  if (g.target.onward) g.target.onward->BeginApply();
  Status result;
  for (const Op& op : group->ops) {
    core::Volume& v = *g.target.volumes[op.volume];
    core::WriteContext ctx;
    ctx.from_upstream = true;
    Status s;
    switch (op.type) {
      case OpType::kWrite:
        s = v.Write(op.offset, op.data, /*fua=*/false, &ctx);
        break;
      case OpType::kTrim:
        s = op.length ? v.Trim(op.offset, op.length, false, &ctx) : Status::OK();
        break;
      case OpType::kZero:
        s = op.length ? v.WriteZeroes(op.offset, op.length, /*may_trim=*/true,
                                      /*fast_only=*/false, false, &ctx)
                      : Status::OK();
        break;
    }
    if (!s.ok()) {
      result = s.WithContext(fmt::format("applying group {} to volume {} at {}+{}",
                                         group->group_seq, v.name(), op.offset,
                                         op.length));
      break;
    }
  }
  if (g.target.onward) g.target.onward->EndApply();
  if (result.ok() && group->group_seq > g.applied_group_seq) {
    g.applied_group_seq = group->group_seq;
    g.applied_group_seq_seen = group->group_seq;
  }
  return result;
}

Status Receiver::BeginResync(GroupState& g) {
  // A resync that starts while an earlier one is unfinished continues its
  // epoch: the state to return to is still the one saved then.
  if (g.undo) return Status::OK();
  auto undo = UndoRecord::Create(*g.env, g.undo_path, g.applied_group_seq);
  if (!undo.ok()) return undo.status();
  g.undo = std::move(undo).value();
  g.consistent = false;
  if (Status s = SaveHolesAtBegin(g); !s.ok()) return s;
  g.undo_bytes = g.undo->size_bytes();
  BR_LOG_INFO("replication", "group {}: resync begins; inconsistent until it "
              "ends (what it overwrites is kept in {})", g.target.config->name,
              g.undo_path);
  return Status::OK();
}

namespace {
// Whether the store reports all of [offset, offset+length) as reading
// zeroes (false when it cannot tell).
bool ReadsAsZeroes(core::Volume& v, uint64_t offset, uint64_t length) {
  auto extents = v.BlockStatus(offset, length);
  if (!extents.ok()) return false;
  uint64_t covered = 0;
  for (const auto& e : *extents) {
    if (!e.zero) return false;
    covered += e.length_bytes;
  }
  return covered >= length;
}
}  // namespace

Status Receiver::SaveHolesAtBegin(GroupState& g) {
  size_t records = 0;
  size_t calls = 0;
  for (uint32_t vi = 0; vi < g.target.volumes.size(); ++vi) {
    core::Volume& v = *g.target.volumes[vi];
    uint64_t pos = 0;
    while (pos < v.size_bytes() && records < kMaxHoleRecordsAtBegin &&
           calls++ < kMaxBlockStatusCallsAtBegin) {
      auto extents = v.BlockStatus(pos, v.size_bytes() - pos);
      // Not fatal: the batches save what they overwrite, holes included.
      if (!extents.ok() || extents->empty()) break;
      bool progressed = false;
      for (const auto& e : *extents) {
        if (e.length_bytes == 0) break;
        if (e.zero && e.length_bytes >= kMinHoleSavedAtBegin &&
            records < kMaxHoleRecordsAtBegin) {
          for (auto [offset, length] : g.undo->Unsaved(vi, pos, e.length_bytes)) {
            if (Status s = g.undo->AppendZeros(vi, offset, length); !s.ok()) {
              return s.WithContext("saving the volumes' holes in the undo record");
            }
            ++records;
          }
        }
        pos += e.length_bytes;
        progressed = true;
      }
      if (!progressed) break;
    }
  }
  if (records == 0) return Status::OK();
  return g.undo->Sync();
}

Status Receiver::EndResync(GroupState& g) {
  // Every frame before END is applied: the volumes are at a group boundary.
  // They must be durable before the record that could undo them goes.
  if (g.undo) {
    for (const auto& v : g.target.volumes) {
      if (Status s = v->Flush(); !s.ok()) return s;
    }
    const uint64_t saved = g.undo->saved_bytes();
    g.undo.reset();
    if (Status s = UndoRecord::Remove(*g.env, g.undo_path); !s.ok()) return s;
    g.consistent = true;
    g.undo_bytes = 0;
    BR_LOG_INFO("replication", "group {}: resync complete, consistent again "
                "(undo record of {} bytes dropped)", g.target.config->name, saved);
  }
  // A full resync asked for after a rollback has ended too.
  if (g.full_resync_needed) {
    if (Status s = RemoveDurably(*g.env, g.full_resync_path); !s.ok()) return s;
    g.full_resync_needed = false;
  }
  return Status::OK();
}

Status Receiver::SaveUndo(GroupState& g, const WriteGroup& group, bool sync) {
  bool appended = false;
  std::vector<std::byte> old;
  for (const Op& op : group.ops) {
    core::Volume& v = *g.target.volumes[op.volume];
    for (auto [offset, length] : g.undo->Unsaved(op.volume, op.offset, op.length)) {
      while (length > 0) {
        const uint64_t n = std::min(length, UndoRecord::kMaxRecordBytes);
        old.resize(n);
        if (Status s = v.Read(offset, old); !s.ok()) return s;
        // Holes and zeroed ranges (all of a fresh sparse volume) cost a
        // record header, not their size.
        const bool zeros = old[0] == std::byte{0} &&
                           std::memcmp(old.data(), old.data() + 1, n - 1) == 0;
        Status s = zeros ? g.undo->AppendZeros(op.volume, offset, n)
                         : g.undo->Append(op.volume, offset, old);
        if (!s.ok()) return s;
        appended = true;
        offset += n;
        length -= n;
      }
    }
  }
  if (!appended) return Status::OK();
  g.undo_bytes = g.undo->size_bytes();
  if (!sync) {
    g.undo_unsynced = true;
    return Status::OK();
  }
  g.undo_unsynced = false;
  return g.undo->Sync();
}

Status Receiver::DrainResyncQueue(GroupState& g) {
  std::vector<QueuedResync> queue;
  {
    std::lock_guard lock(g.resync_mu);
    queue.swap(g.resync_queue);
    g.resync_queue_bytes = 0;
  }
  return ApplyQueuedResync(g, std::move(queue));
}

Status Receiver::ApplyQueuedResync(GroupState& g,
                                   std::vector<QueuedResync> queue) {
  if (queue.empty()) return Status::OK();
  std::vector<WriteGroup> groups;
  groups.reserve(queue.size());
  for (const auto& q : queue) {
    std::span<const std::byte> bytes(q.frame);
    auto header = DecodeFrameHeader(bytes.first(kFrameHeaderBytes));
    if (!header.ok()) return header.status();
    // Checked when it arrived.
    auto decoded = DecodeCheckedFrame(*header, bytes.first(kFrameHeaderBytes),
                                      bytes.subspan(kFrameHeaderBytes));
    if (!decoded.ok()) return decoded.status();
    auto* group = std::get_if<WriteGroup>(&*decoded);
    if (!group) return Status::Corruption("queued resync frame is not a WRITE_GROUP");
    if (Status s = CheckWriteGroup(*group, g.target); !s.ok()) return s;
    groups.push_back(std::move(*group));
  }
  // Frames are diffed against the volume before any of a batch is
  // written, so a frame that overlaps an earlier one of the batch starts a
  // new batch (it must be compared with what the earlier one wrote).
  std::map<std::pair<uint32_t, uint64_t>, uint64_t> taken;  // (volume, offset) -> end
  auto overlaps = [&](const Op& op) {
    auto it = taken.upper_bound({op.volume, op.offset});
    if (it != taken.begin()) {
      auto prev = std::prev(it);
      if (prev->first.first == op.volume && prev->second > op.offset) return true;
    }
    return it != taken.end() && it->first.first == op.volume &&
           it->first.second < op.offset + op.length;
  };
  // A batch also ends past kMaxResyncBatchSpanBytes of ranges: what it
  // overwrites is read into memory at once, and a zero operation of a few
  // bytes on the wire may cover a MiB that holds data here.
  size_t begin = 0;
  uint64_t span = 0;
  for (size_t i = 0; i <= groups.size(); ++i) {
    bool cut = i == groups.size();
    uint64_t group_span = 0;
    if (!cut) {
      for (const Op& op : groups[i].ops) {
        cut = cut || overlaps(op);
        group_span += op.length;
      }
      cut = cut || span + group_span > kMaxResyncBatchSpanBytes;
    }
    if (cut && i > begin) {
      if (Status s = ApplyResyncBatch(g, std::span(groups).subspan(begin, i - begin));
          !s.ok()) {
        return s;
      }
      taken.clear();
      begin = i;
      span = 0;
    }
    if (i < groups.size()) {
      for (const Op& op : groups[i].ops) {
        if (op.length) taken[{op.volume, op.offset}] = op.offset + op.length;
      }
      span += group_span;
    }
  }
  for (const auto& q : queue) {
    if (g.resync_unflushed_bytes == 0 || g.resync_conn_id != q.conn_id) {
      g.resync_first_unflushed_link_seq = q.link_seq;
    }
    g.resync_unflushed_bytes += q.frame.size();
    g.resync_conn_id = q.conn_id;
    g.resync_link_seq = q.link_seq;
  }
  g.last_apply = std::chrono::steady_clock::now();
  return Status::OK();
}

Status Receiver::ApplyResyncBatch(GroupState& g, std::span<const WriteGroup> groups) {
  // 1. What each op would change: the granules that differ from what the
  //    volume holds (a hole reads as zeroes without a read).
  struct Plan {
    const Op* op;
    std::span<const std::byte> current;  // empty: the range is a hole / zeroes
    std::vector<ByteRun> runs;           // relative to op->offset
  };
  std::vector<uint64_t> batch_end(g.target.volumes.size(), 0);
  for (const WriteGroup& group : groups) {
    for (const Op& op : group.ops) {
      if (op.length == 0) continue;
      batch_end[op.volume] = std::max(batch_end[op.volume], op.offset + op.length);
    }
  }
  // Block status once for many ops, not twice lseek per op: ops come in
  // ascending order, and one call answers up to the batch's last byte
  // (unless the store caps its extents). Nothing writes the volumes while
  // the batch is planned.
  struct KnownExtents {
    uint64_t begin = 0, end = 0;
    std::vector<storage::Extent> extents;
  };
  std::vector<KnownExtents> known(g.target.volumes.size());
  auto reads_as_zeroes = [&](const Op& op) {
    KnownExtents& k = known[op.volume];
    const uint64_t op_end = op.offset + op.length;
    if (op.offset < k.begin || op_end > k.end) {
      auto extents = g.target.volumes[op.volume]->BlockStatus(
          op.offset, batch_end[op.volume] - op.offset);
      if (!extents.ok()) return false;  // no reason to fail: read instead
      k.begin = k.end = op.offset;
      for (const auto& e : *extents) k.end += e.length_bytes;
      k.extents = std::move(extents).value();
      if (op_end > k.end) return false;
    }
    uint64_t pos = k.begin;
    for (const auto& e : k.extents) {
      const uint64_t e_end = pos + e.length_bytes;
      if (e_end > op.offset && !e.zero) return false;
      if (e_end >= op_end) return true;
      pos = e_end;
    }
    return false;
  };
  std::vector<const Op*> ops;
  std::vector<bool> zeroes;
  uint64_t to_read = 0;
  for (const WriteGroup& group : groups) {
    for (const Op& op : group.ops) {
      if (op.length == 0) continue;
      ops.push_back(&op);
      zeroes.push_back(reads_as_zeroes(op));
      if (!zeroes.back()) to_read += op.length;
    }
  }
  // One buffer for what the batch reads, left uninitialized: it is read
  // into, and a zero-filled 64 KiB per op showed in the profile.
  auto reads = std::make_unique_for_overwrite<std::byte[]>(to_read);
  uint64_t used = 0;
  std::vector<Plan> plans;
  plans.reserve(ops.size());
  for (size_t i = 0; i < ops.size(); ++i) {
    const Op& op = *ops[i];
    Plan plan{&op, {}, {}};
    if (!zeroes[i]) {
      std::span<std::byte> into(reads.get() + used, op.length);
      used += op.length;
      if (Status s = g.target.volumes[op.volume]->Read(op.offset, into); !s.ok()) {
        return s.WithContext("reading what resync data overwrites");
      }
      plan.current = into;
    }
    // A trim leaves zeroes (or anything): saved like a zeroing.
    plan.runs = op.type == OpType::kWrite ? DifferingRuns(plan.current, op.data)
                                          : NonZeroRuns(plan.current);
    plans.push_back(std::move(plan));
  }
  // 2. Between BEGIN and END: the old bytes of what changes are durable in
  //    the undo record (one sync for the batch) before any of it is written.
  if (g.undo) {
    bool appended = false;
    for (const Plan& p : plans) {
      const Op& op = *p.op;
      for (const ByteRun& run : p.runs) {
        for (auto [offset, length] :
             g.undo->Unsaved(op.volume, op.offset + run.offset, run.length)) {
          while (length > 0) {
            const uint64_t n = std::min(length, UndoRecord::kMaxRecordBytes);
            std::span<const std::byte> old;
            if (!p.current.empty()) {
              old = std::span<const std::byte>(p.current).subspan(offset - op.offset, n);
            }
            Status s = old.empty() || IsAllZero(old)
                           ? g.undo->AppendZeros(op.volume, offset, n)
                           : g.undo->Append(op.volume, offset, old);
            if (!s.ok()) return s.WithContext("saving what resync data overwrites");
            appended = true;
            offset += n;
            length -= n;
          }
        }
      }
    }
    if (appended || g.undo_unsynced) {
      g.undo_bytes = g.undo->size_bytes();
      g.undo_unsynced = false;
      if (Status s = g.undo->Sync(); !s.ok()) return s;
    }
  }
  // 3. Write what differs, through Volume like any applied group (this
  //    site's own downstream links get it too).
  if (g.target.onward) g.target.onward->BeginApply();
  Status result;
  for (const Plan& p : plans) {
    const Op& op = *p.op;
    core::Volume& v = *g.target.volumes[op.volume];
    for (const ByteRun& run : p.runs) {
      core::WriteContext ctx;
      ctx.from_upstream = true;
      const uint64_t offset = op.offset + run.offset;
      Status s;
      switch (op.type) {
        case OpType::kWrite:
          s = v.Write(offset, op.data.subspan(run.offset, run.length), false, &ctx);
          break;
        case OpType::kTrim:
          s = v.Trim(offset, run.length, false, &ctx);
          break;
        case OpType::kZero:
          s = v.WriteZeroes(offset, run.length, /*may_trim=*/true,
                            /*fast_only=*/false, false, &ctx);
          break;
      }
      if (!s.ok()) {
        result = s.WithContext(fmt::format("applying resync data to volume {} at {}+{}",
                                           v.name(), offset, run.length));
        break;
      }
    }
    if (!result.ok()) break;
  }
  if (g.target.onward) g.target.onward->EndApply();
  return result;
}

Status Receiver::RollbackGroup(GroupState& g, RollbackOutcome* out) {
  // What is journaled goes first: if it holds the END, the resync finished
  // and there is nothing to roll back.
  if (!g.failed) {
    uint64_t ignored = 0;
    if (Status s = SyncAndApply(g, 0, &ignored); !s.ok()) return s;
  }
  std::lock_guard apply_lock(g.apply_mu);
  out->applied_group_seq = g.applied_group_seq;
  if (!g.undo) return Status::OK();
  const std::string& name = g.target.config->name;
  const uint64_t base = g.undo->base_group_seq();
  // Through Volume::Write like applied groups, as one group for this
  // site's own downstream links.
  if (g.target.onward) g.target.onward->BeginApply();
  Status s = g.undo->ForEachNewestFirst(
      [&](uint32_t volume, uint64_t offset, uint64_t length,
          std::span<const std::byte> data) {
        if (volume >= g.target.volumes.size()) {
          return Status::Corruption(fmt::format(
              "undo record {}: volume index {} but the group has {} volume(s)",
              g.undo_path, volume, g.target.volumes.size()));
        }
        core::WriteContext ctx;
        ctx.from_upstream = true;
        core::Volume& v = *g.target.volumes[volume];
        if (data.empty() && ReadsAsZeroes(v, offset, length)) {
          // A hole BEGIN saved that the epoch never wrote: nothing to
          // restore, and no zeroing for this site's own downstreams.
          return Status::OK();
        }
        Status ws = data.empty()
                        ? v.WriteZeroes(offset, length, /*may_trim=*/true,
                                        /*fast_only=*/false, /*fua=*/false, &ctx)
                        : v.Write(offset, data, false, &ctx);
        out->restored_bytes += length;
        return ws;
      });
  if (g.target.onward) g.target.onward->EndApply();
  if (!s.ok()) return s.WithContext("rolling back group " + name);
  // Durability order: volumes restored, then the journal emptied (a replay
  // would redo the resync's writes), then the request for a full resync
  // recorded, and only then the undo record dropped. A crash before the
  // last step leaves the record, and the next rollback writes the same
  // bytes again.
  for (const auto& v : g.target.volumes) {
    if (Status fs = v->Flush(); !fs.ok()) return fs.WithContext("rolling back group " + name);
  }
  {
    std::lock_guard lock(g.append_mu);
    g.pending.clear();
    g.pending_bytes = 0;
    if (Status js = DropRetiredJournal(g); !js.ok()) return js;
    if (Status js = g.journal->Reset(base); !js.ok()) return js;
  }
  g.applied_group_seq = base;
  g.applied_group_seq_seen = base;
  {
    auto marker = g.env->OpenFile(g.full_resync_path, io::OpenMode::kCreateTruncate);
    if (!marker.ok()) return marker.status().WithContext("rolling back group " + name);
    if (Status ms = (*marker)->Sync(); !ms.ok()) return ms;
  }
  if (Status ds = g.env->SyncDir(io::DirName(g.full_resync_path)); !ds.ok()) return ds;
  g.full_resync_needed = true;
  g.undo.reset();
  if (Status rs = UndoRecord::Remove(*g.env, g.undo_path); !rs.ok()) return rs;
  g.consistent = true;
  g.undo_bytes = 0;
  out->rolled_back = true;
  out->applied_group_seq = base;
  BR_LOG_INFO("replication", "group {}: rolled back to group {} ({} bytes "
              "restored); the upstream will be asked for a full resync",
              name, base, out->restored_bytes);
  return Status::OK();
}

asio::awaitable<Result<Receiver::RollbackOutcome>> Receiver::Rollback(
    const std::string& group) {
  GroupState* g = nullptr;
  for (auto& gs : groups_) {
    if (gs->target.config->name == group) g = gs.get();
  }
  if (!g) {
    co_return Status::NotFound(fmt::format(
        "site {} has no secondary group \"{}\"", local_site_, group));
  }
  if (g->consistent && !g->rolling_back) {
    // Nothing to undo, connected or not.
    RollbackOutcome none;
    none.applied_group_seq = g->applied_group_seq_seen.load();
    co_return none;
  }
  if (auto c = g->active.lock(); c && !c->closed) {
    co_return Status::Busy(fmt::format(
        "group {}: the upstream (site {}, {}) is connected; roll back only "
        "while it is away (pause the link on the upstream, or stop it)",
        group, g->target.config->upstream ? g->target.config->upstream->site : "?",
        c->peer));
  }
  if (g->rolling_back) {
    co_return Status::Busy(fmt::format("group {}: a rollback is already running", group));
  }
  if (g->reopening) {
    co_return Status::Busy(fmt::format("group {}: being reopened after a failure; "
                                       "try again", group));
  }
  Running running(active_coroutines_);
  StateHold hold(this, g);
  g->rolling_back = true;
  RollbackOutcome outcome;
  RollbackOutcome* op = &outcome;
  Status s = co_await io_.Run([g, op] { return RollbackGroup(*g, op); });
  g->rolling_back = false;
  if (!s.ok()) {
    BR_LOG_ERROR("replication", "group {}: rollback failed: {}", group, s.ToString());
    co_return s;
  }
  co_return outcome;
}

asio::awaitable<Status> Receiver::RollbackIfInconsistent(const std::string& group) {
  auto r = co_await Rollback(group);
  co_return r.ok() ? Status::OK() : r.status();
}

std::optional<bool> Receiver::Consistent(const std::string& group) const {
  for (const auto& g : groups_) {
    if (g->target.config->name == group) return g->consistent.load();
  }
  return std::nullopt;
}

Status Receiver::AppendFrame(GroupState& g, uint64_t conn_id,
                             uint64_t link_seq, Bytes& frame) {
  std::lock_guard lock(g.append_mu);
  if (!g.failure.ok()) return g.failure;
  if (Status s = g.journal->Append(frame); !s.ok()) {
    g.failure = s;
    g.failed = true;
    return s;
  }
  const auto now = std::chrono::steady_clock::now();
  if (g.pending.empty()) g.pending_since = now;
  g.last_append = now;
  g.pending_bytes += frame.size();
  g.pending.push_back({conn_id, link_seq, std::move(frame)});
  return Status::OK();
}

Status Receiver::SyncAndApply(GroupState& g, uint64_t conn_id,
                              uint64_t* durable_link_seq, ResyncFlush resync_flush,
                              PendingGroups pending_groups) {
  std::lock_guard apply_lock(g.apply_mu);
  if (g.failed) return g.failure_status();
  // Both queues at one instant: a resync frame is queued only while nothing
  // is pending (QueueResyncInline), so every one taken here arrived before
  // every pending group taken with it and is applied first. Taken one
  // after the other, a resync frame queued in between would be applied
  // after (over) a streamed group to the same bytes that followed it.
  std::vector<QueuedResync> resync;
  std::vector<GroupState::Pending> batch;
  {
    std::lock_guard lock(g.append_mu);
    std::lock_guard resync_lock(g.resync_mu);
    resync.swap(g.resync_queue);
    g.resync_queue_bytes = 0;
    // Every queued resync frame arrived before every pending group, so
    // leaving the groups for a later call keeps the order.
    const auto now = std::chrono::steady_clock::now();
    if (pending_groups == PendingGroups::kAll || g.pending_bytes >= kLazySyncBatchBytes ||
        now - g.pending_since >= kLazySyncDelay || now - g.last_append >= kLazySyncQuiet) {
      batch.swap(g.pending);
      g.pending_bytes = 0;
    }
  }
  if (Status s = ApplyQueuedResync(g, std::move(resync)); !s.ok()) {
    g.Fail(s);
    return s;
  }
  if (!batch.empty()) {
    // Everything in `batch` was appended before this sync starts.
    if (Status s = g.journal->Sync(); !s.ok()) {
      g.Fail(s);
      return s;
    }
    ++g.journal_syncs;
    for (const auto& p : batch) {
      if (Status s = ApplyFrame(g, p.frame); !s.ok()) {
        // The group stays in the journal: reopening the failed group
        // (ReopenFailedGroup) or a restart applies it again once the volume
        // accepts writes.
        g.Fail(s);
        return s;
      }
      if (p.conn_id == conn_id) *durable_link_seq = p.link_seq;
    }
    g.last_apply = std::chrono::steady_clock::now();
  }
  const auto now = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point last_resync_frame;
  {
    std::lock_guard lock(g.resync_mu);
    last_resync_frame = g.last_resync_frame;
  }
  // Resync data a background drain flushed is durable: report it (it
  // precedes every frame still unflushed or pending).
  if (g.resync_flushed_conn_id == conn_id && g.resync_flushed_link_seq > *durable_link_seq) {
    *durable_link_seq = g.resync_flushed_link_seq;
  }
  const bool resync_flush_due =
      resync_flush == ResyncFlush::kAlways ||
      g.resync_unflushed_bytes >= kResyncFlushBytes ||
      now - last_resync_frame >= kSyncInterval;
  if (resync_flush_due) {
    if (Status s = FlushResyncData(g, conn_id, durable_link_seq); !s.ok()) return s;
  } else {
    // Acknowledgements are cumulative: nothing at or after resync data
    // that is not flushed yet may be reported durable. What a background
    // flush is writing came first.
    uint64_t first_not_durable = UINT64_MAX;
    if (g.resync_flushing && g.resync_flushing_conn_id == conn_id) {
      first_not_durable = g.resync_flushing_first_link_seq;
    } else if (g.resync_unflushed_bytes > 0 && g.resync_conn_id == conn_id) {
      first_not_durable = g.resync_first_unflushed_link_seq;
    }
    if (*durable_link_seq >= first_not_durable) *durable_link_seq = first_not_durable - 1;
  }
  const bool idle = now - g.last_apply >= kIdleReset;
  bool retire = false;
  {
    std::unique_lock lock(g.append_mu);
    const uint64_t log_bytes = g.journal->log_bytes();
    if (g.pending.empty() && !g.retire_running &&
        (log_bytes > kJournalResetBytes || (idle && log_bytes > 0))) {
      // Everything journaled is applied; once the volumes are durable the
      // journal is not needed any more. Flushing them can take long (the
      // page cache writes back every region written since the last
      // flush), so the journal is moved aside and new frames go to a fresh
      // one meanwhile: appends wait only for the rotation itself.
      if (Status s = RotateJournal(g); !s.ok()) {
        lock.unlock();
        g.Fail(s);
        return s;
      }
      retire = true;
    }
  }
  if (retire) StartRetire(g);
  return Status::OK();
}

Status Receiver::RotateJournal(GroupState& g) {
  const uint64_t bytes = g.journal->log_bytes();
  // The journal retired last time is reused: new frames then go to pages
  // the page cache holds already, not to fresh ones (docs/replication.md,
  // "Journal reuse"). Recycled (a new epoch, durable) while it is still the
  // spare: under the journal's name, its old frames must never replay.
  bool recycled = false;
  if (g.env->FileExists(g.spare_journal_path)) {
    Status rs = GroupJournal::Recycle(*g.env, g.spare_journal_path, g.applied_group_seq);
    if (rs.ok()) {
      recycled = true;
    } else {
      BR_LOG_WARN("replication", "group {}: cannot reuse {} ({}); starting a new journal",
                  g.target.config->name, g.spare_journal_path, rs.ToString());
      g.env->RemoveFile(g.spare_journal_path).IgnoreError();
    }
  }
  if (Status s = g.env->RenameFile(g.journal_path, g.retired_journal_path); !s.ok()) {
    return s.WithContext(fmt::format("rotating journal {}", g.journal_path));
  }
  // A crash from here on finds the retired journal (and maybe no journal):
  // Open() replays the retired one first.
  if (recycled) {
    // The retired name is durable before the spare takes the journal's:
    // the other order could lose the retired journal's groups (applied,
    // not flushed yet) to the rename over it.
    Status s = g.env->SyncDir(io::DirName(g.journal_path));
    if (s.ok()) s = g.env->RenameFile(g.spare_journal_path, g.journal_path);
    if (!s.ok()) {
      g.env->RenameFile(g.retired_journal_path, g.journal_path).IgnoreError();
      return s.WithContext(fmt::format("rotating journal {}", g.journal_path));
    }
  }
  GroupJournal::Recovered fresh;
  auto next = GroupJournal::Open(*g.env, g.journal_path, &fresh);
  Status s = next.status();
  // A recycled journal already records applied_group_seq.
  if (s.ok() && !recycled) s = (*next)->RecordApplied(g.applied_group_seq);
  if (s.ok() && !fresh.frames.empty()) {
    s = Status::Corruption(fmt::format("the new journal {} holds {} frame(s)", g.journal_path,
                                       fresh.frames.size()));
  }
  if (!s.ok()) {
    // Keep the file and the open journal in agreement.
    g.env->RenameFile(g.retired_journal_path, g.journal_path).IgnoreError();
    return s.WithContext(fmt::format("rotating journal {}", g.journal_path));
  }
  g.journal = std::move(next).value();
  g.retired_journal_bytes = bytes;
  g.retire_running = true;
  ++g.retire_epoch;
  return Status::OK();
}

void Receiver::StartRetire(GroupState& g) {
  ++g.retires_in_flight;
  GroupState* gp = &g;
  const uint64_t epoch = g.retire_epoch;
  g.io->Post([gp, epoch] {
    if (Status s = RetireJournal(*gp, epoch); !s.ok()) {
      BR_LOG_ERROR("replication", "group {}: {}", gp->target.config->name, s.ToString());
      gp->Fail(s);
    }
    --gp->retires_in_flight;
  });
}

Status Receiver::RetireJournal(GroupState& g, uint64_t epoch) {
  // Every group of the retired journal was applied before it was rotated,
  // so this flush makes all of them durable. Applying goes on meanwhile.
  for (const auto& v : g.target.volumes) {
    if (Status s = v->Flush(); !s.ok()) return s;
  }
  std::lock_guard apply_lock(g.apply_mu);
  if (g.failed) return Status::OK();
  // A marker or a rollback removed this journal meanwhile, and a later
  // rotation may have retired another one that this flush does not cover.
  if (g.retire_epoch != epoch || !g.retire_running) return Status::OK();
  if (Status s = DropRetiredJournal(g); !s.ok()) return s;
  // Every write applied so far came from the reconciled upstream, which
  // has it: its slot here need not keep them.
  if (!g.forget_site.empty()) {
    if (Status s = ForgetDirtyFor(g.target.volumes, g.forget_site); !s.ok()) return s;
  }
  return Status::OK();
}

Status Receiver::DropRetiredJournal(GroupState& g) {
  if (g.env->FileExists(g.retired_journal_path)) {
    // Kept as the spare for the next rotation; durable, so that a crash
    // does not bring it back as a retired journal to replay.
    Status s = g.env->RenameFile(g.retired_journal_path, g.spare_journal_path);
    if (s.ok()) s = g.env->SyncDir(io::DirName(g.retired_journal_path));
    if (!s.ok()) return s.WithContext("retiring the journal");
  }
  g.retire_running = false;
  g.retired_journal_bytes = 0;
  return Status::OK();
}

bool Receiver::QueueResyncInline(GroupState& g, uint64_t conn_id,
                                 uint64_t link_seq, Bytes& frame) {
  if (g.failed) return false;
  bool drain = false;
  {
    // Queued under append_mu while nothing is pending: SyncAndApply takes
    // both queues together and relies on every queued frame preceding
    // every pending one.
    std::unique_lock append_lock(g.append_mu, std::try_to_lock);
    if (!append_lock.owns_lock() || !g.pending.empty()) return false;
    std::lock_guard lock(g.resync_mu);
    // Past a few batches waiting, the caller applies on the pool before
    // reading on (back-pressure).
    if (g.resync_queue_bytes + frame.size() > kMaxResyncQueueBytes) return false;
    g.resync_queue_bytes += frame.size();
    g.resync_queue.push_back({conn_id, link_seq, std::move(frame)});
    g.last_resync_frame = std::chrono::steady_clock::now();
    drain = g.resync_queue_bytes >= kResyncBatchBytes;
  }
  if (drain) StartResyncDrain(g);
  return true;
}

void Receiver::StartResyncDrain(GroupState& g) {
  if (g.resync_drain_posted.exchange(true)) return;
  ++g.resync_drains_in_flight;
  GroupState* gp = &g;
  g.io->Post([gp] {
    gp->resync_drain_posted = false;
    Status s;
    bool flush = false;
    {
      std::lock_guard apply_lock(gp->apply_mu);
      s = gp->failed ? Status::OK() : DrainResyncQueue(*gp);
      // Failed under the lock: a SyncAndApply that ran between would
      // acknowledge later frames past resync data this drain lost.
      if (!s.ok()) gp->Fail(s);
      if (s.ok() && !gp->failed && !gp->resync_flushing &&
          gp->resync_unflushed_bytes >= kResyncFlushBytes) {
        // Flushed below without apply_mu: the next drain applies the next
        // batches meanwhile, so the disk always has the next writes queued
        // behind this flush (held under apply_mu, it had only what
        // StartWriteback had started, and receiving stalled behind it).
        gp->resync_flushing = true;
        gp->resync_flushing_conn_id = gp->resync_conn_id;
        gp->resync_flushing_first_link_seq = gp->resync_first_unflushed_link_seq;
        gp->resync_flushing_link_seq = gp->resync_link_seq;
        gp->resync_unflushed_bytes = 0;
        flush = true;
      }
    }
    // Let the disk start on what the drain wrote: the flush that makes it
    // durable then has less left to wait for, and the writeback overlaps
    // with receiving the next batches. Not under apply_mu: with scattered
    // data, queueing the writeback of the whole file takes milliseconds.
    if (s.ok()) {
      for (const auto& v : gp->target.volumes) v->StartWriteback();
    }
    if (flush) {
      for (const auto& v : gp->target.volumes) {
        s = v->Flush();
        if (!s.ok()) break;
      }
      std::lock_guard apply_lock(gp->apply_mu);
      // Failed before the cap on durable acknowledgements goes: the data
      // this flush was to make durable may not be.
      if (!s.ok()) gp->Fail(s);
      gp->resync_flushing = false;
      // Connection ids grow: a later connection's report is never replaced.
      if (s.ok() && (gp->resync_flushing_conn_id > gp->resync_flushed_conn_id ||
                     (gp->resync_flushing_conn_id == gp->resync_flushed_conn_id &&
                      gp->resync_flushing_link_seq > gp->resync_flushed_link_seq))) {
        gp->resync_flushed_conn_id = gp->resync_flushing_conn_id;
        gp->resync_flushed_link_seq = gp->resync_flushing_link_seq;
      }
    }
    if (!s.ok()) {
      BR_LOG_ERROR("replication", "group {}: {}", gp->target.config->name, s.ToString());
    }
    --gp->resync_drains_in_flight;
  });
}

Status Receiver::ApplyResyncData(GroupState& g, uint64_t conn_id, uint64_t link_seq,
                                 Bytes&& frame, uint64_t* durable_link_seq) {
  // What came before it through the journal is applied first: the upstream
  // read these regions at exactly this point of the stream.
  bool journal_pending;
  {
    std::lock_guard lock(g.append_mu);
    journal_pending = !g.pending.empty();
  }
  if (journal_pending) {
    if (Status s = SyncAndApply(g, conn_id, durable_link_seq, ResyncFlush::kWhenDue);
        !s.ok()) {
      return s;
    }
  }
  std::lock_guard apply_lock(g.apply_mu);
  if (g.failed) return g.failure_status();
  uint64_t queued;
  {
    std::lock_guard lock(g.resync_mu);
    g.resync_queue_bytes += frame.size();
    g.resync_queue.push_back({conn_id, link_seq, std::move(frame)});
    g.last_resync_frame = std::chrono::steady_clock::now();
    queued = g.resync_queue_bytes;
  }
  if (queued >= kResyncBatchBytes) {
    if (Status s = DrainResyncQueue(g); !s.ok()) {
      g.Fail(s);
      return s;
    }
  }
  if (g.resync_unflushed_bytes >= kResyncFlushBytes) {
    return FlushResyncData(g, conn_id, durable_link_seq);
  }
  return Status::OK();
}

Status Receiver::FlushResyncData(GroupState& g, uint64_t conn_id,
                                 uint64_t* durable_link_seq) {
  // A background flush may still be writing what came before: this flush
  // covers it too (its writes were done before this one began).
  if (g.resync_unflushed_bytes == 0 && !g.resync_flushing) return Status::OK();
  for (const auto& v : g.target.volumes) {
    if (Status s = v->Flush(); !s.ok()) {
      g.Fail(s);
      return s;
    }
  }
  g.resync_unflushed_bytes = 0;
  g.resync_flushed_conn_id = g.resync_conn_id;
  g.resync_flushed_link_seq = g.resync_link_seq;
  if (g.resync_conn_id == conn_id && g.resync_link_seq > *durable_link_seq) {
    *durable_link_seq = g.resync_link_seq;
  }
  return Status::OK();
}

Status Receiver::ApplyMarker(GroupState& g, uint64_t conn_id, bool begin,
                             uint64_t* durable_link_seq) {
  if (Status s = SyncAndApply(g, conn_id, durable_link_seq); !s.ok()) return s;
  std::lock_guard apply_lock(g.apply_mu);
  // The state BEGIN keeps (and END declares consistent) must be durable.
  for (const auto& v : g.target.volumes) {
    if (Status s = v->Flush(); !s.ok()) {
      g.Fail(s);
      return s;
    }
  }
  if (Status s = begin ? BeginResync(g) : EndResync(g); !s.ok()) {
    g.Fail(s);
    return s;
  }
  // Everything journaled is applied and durable: empty the journal, so a
  // replay after a crash never runs frames from before this marker again.
  // Replayed, they would go into (or, past an old END, drop) the undo
  // record of the resync under way and make a rollback restore the wrong
  // bytes.
  {
    std::unique_lock lock(g.append_mu);
    // A retired journal holds only applied groups, durable since the flush
    // above; it too must not be replayed into the new epoch.
    Status s = DropRetiredJournal(g);
    if (s.ok() && g.pending.empty() && g.journal->log_bytes() > 0) {
      s = g.journal->Reset(g.applied_group_seq);
    }
    if (!s.ok()) {
      lock.unlock();
      g.Fail(s);
      return s;
    }
    if (!g.pending.empty()) return Status::OK();
  }
  // Resync data never went through the journal, so this may be the first
  // point since it was written where everything applied is durable.
  if (!g.forget_site.empty()) {
    if (Status s = ForgetDirtyFor(g.target.volumes, g.forget_site); !s.ok()) {
      g.Fail(s);
      return s;
    }
  }
  return Status::OK();
}

Status Receiver::AdoptGeneration(GroupState& g, uint64_t conn_id,
                                 const std::string& peer_site,
                                 const GenerationSet& next,
                                 uint64_t* durable_link_seq) {
  if (Status s = SyncAndApply(g, conn_id, durable_link_seq); !s.ok()) return s;
  std::lock_guard apply_lock(g.apply_mu);
  auto local = GroupGenerations(g.target.volumes);
  if (!local) return Status::OK();  // no generations here (tests)
  if (local->current == next.current) return Status::OK();
  // Only a successor of what this site holds: the upstream's new
  // generation must list ours as the one before. Anything else is not for
  // a connected follower to adopt; the HELLO of a new connection decides.
  const bool successor = std::find(next.history.begin(), next.history.end(),
                                   local->current) != next.history.end();
  if (!successor) {
    return Status::InvalidArgument(fmt::format(
        "site {}'s generation {} does not follow this site's {}", peer_site,
        GenerationName(next.current), GenerationName(local->current)));
  }
  return SetGroupGenerations(g.target.volumes, next);
}

Status Receiver::Reconcile(GroupState& g, const std::string& peer_site,
                           const std::optional<GenerationSet>& adopt) {
  std::lock_guard apply_lock(g.apply_mu);
  // Generation first: a crash before the slot is cleared only sends the
  // same regions again at the next connect.
  if (adopt) {
    if (Status s = SetGroupGenerations(g.target.volumes, *adopt); !s.ok()) return s;
  }
  if (Status s = ForgetDirtyFor(g.target.volumes, peer_site); !s.ok()) return s;
  if (g.target.role) {
    Status s = g.target.role->Update([&](GroupRoleState& st) {
      st.fresh = false;
      st.discard_local.clear();
      st.reconciled_with = peer_site;
    });
    if (!s.ok()) return s;
  }
  g.forget_site = peer_site;
  return Status::OK();
}

namespace {
// Calls fn(scoreboard, slot) for the slot of `site` in every volume that
// has one; stops at the first error.
Status ForEachSlotFor(const std::vector<std::shared_ptr<core::Volume>>& volumes,
                      const std::string& site,
                      const std::function<Status(storage::Scoreboard&, uint32_t)>& fn) {
  for (const auto& v : volumes) {
    storage::Scoreboard* sb = v->mutable_scoreboard();
    if (!sb || !v->metadata()) continue;
    auto slot = v->metadata()->SlotForSite(site);
    if (!slot) continue;
    if (Status s = fn(*sb, *slot); !s.ok()) return s;
  }
  return Status::OK();
}
}  // namespace

Status ForgetDirtyFor(const std::vector<std::shared_ptr<core::Volume>>& volumes,
                      const std::string& site) {
  return ForEachSlotFor(volumes, site, [](storage::Scoreboard& sb, uint32_t slot) {
    sb.MarkClean(slot, 0, sb.size_bytes(), sb.CurrentWriteSeq());
    return sb.FlushBitmaps();
  });
}

Status MarkAllDirtyFor(const std::vector<std::shared_ptr<core::Volume>>& volumes,
                       const std::string& site) {
  return ForEachSlotFor(volumes, site, [](storage::Scoreboard& sb, uint32_t slot) {
    return sb.MarkAllDirty(slot);
  });
}

DirtyRanges CollectDirtyRanges(const std::vector<std::shared_ptr<core::Volume>>& volumes,
                               const std::string& site, size_t* full_volumes) {
  DirtyRanges out;
  *full_volumes = 0;
  const size_t per_volume =
      volumes.empty() ? 0 : kMaxDirtyRuns / std::max<size_t>(1, volumes.size());
  for (size_t i = 0; i < volumes.size(); ++i) {
    const auto& v = volumes[i];
    const storage::Scoreboard* sb = v->scoreboard();
    if (!sb) continue;
    VolumeDirtyRuns runs;
    runs.volume = static_cast<uint32_t>(i);
    const DirtyRun whole{0, sb->region_count()};
    auto slot = v->metadata() ? v->metadata()->SlotForSite(site) : std::nullopt;
    if (!slot) {
      ++*full_volumes;
      runs.runs.push_back(whole);
    } else {
      uint64_t r = 0;
      while (auto first = sb->NextDirtyRegion(*slot, r)) {
        uint64_t end = *first + 1;
        while (end < sb->region_count() && sb->IsDirty(*slot, end)) ++end;
        runs.runs.push_back({*first, end - *first});
        if (runs.runs.size() > per_volume) {
          // Too scattered to send: all of it is cheaper to describe.
          runs.runs = {whole};
          break;
        }
        r = end;
      }
    }
    if (!runs.runs.empty()) out.volumes.push_back(std::move(runs));
  }
  return out;
}

Status Receiver::VerifyRegions(GroupState& g, uint64_t conn_id,
                               const VerifyRequest& request, VerifyResult* result,
                               uint64_t* durable_link_seq) {
  // Apply everything received before the request first: the upstream read
  // its regions at exactly that point of the stream.
  if (Status s = SyncAndApply(g, conn_id, durable_link_seq); !s.ok()) return s;
  std::lock_guard apply_lock(g.apply_mu);
  core::Volume& v = *g.target.volumes[request.volume];
  const uint64_t size = v.size_bytes();
  std::vector<std::byte> buffer;
  for (size_t i = 0; i < request.digests.size(); ++i) {
    const uint64_t offset = request.offset + i * request.region_size;
    if (offset >= size) {
      result->mismatched.push_back(static_cast<uint32_t>(i));
      continue;
    }
    const uint64_t n = std::min(request.region_size, size - offset);
    buffer.resize(n);
    if (Status s = v.Read(offset, buffer); !s.ok()) return s;
    if (XXH3_64bits(buffer.data(), n) != request.digests[i]) {
      result->mismatched.push_back(static_cast<uint32_t>(i));
    }
  }
  return Status::OK();
}

Result<std::unique_ptr<Receiver::GroupState>> Receiver::OpenGroup(
    const ReceiverTarget& t, const std::string& data_dir, core::IoExecutor& io) {
  auto g = std::make_unique<GroupState>();
  g->target = t;
  const std::string path = data_dir + "/journal-" + t.config->name + ".log";
  g->env = io::Env::Default();
  g->io = &io;
  g->journal_path = path;
  g->retired_journal_path = path + ".old";
  g->spare_journal_path = path + ".spare";
  // A journal retired before a crash (RotateJournal) holds older groups
  // than the journal: its frames are replayed first.
  GroupJournal::Recovered recovered;
  uint64_t retired_torn_bytes = 0;
  const bool had_retired = g->env->FileExists(g->retired_journal_path);
  if (had_retired) {
    auto retired = GroupJournal::Open(*g->env, g->retired_journal_path, &recovered);
    if (!retired.ok()) {
      return retired.status().WithContext(fmt::format("group {}", t.config->name));
    }
    retired_torn_bytes = recovered.torn_tail_bytes;
  }
  GroupJournal::Recovered current;
  auto journal = GroupJournal::Open(*g->env, path, &current);
  if (!journal.ok()) {
    return journal.status().WithContext(fmt::format("group {}", t.config->name));
  }
  g->journal = std::move(journal).value();
  recovered.applied_group_seq =
      std::max(recovered.applied_group_seq, current.applied_group_seq);
  recovered.torn_tail_bytes = current.torn_tail_bytes + retired_torn_bytes;
  for (auto& f : current.frames) recovered.frames.push_back(std::move(f));
  g->undo_path = data_dir + "/undo-" + t.config->name + ".log";
  g->full_resync_path = data_dir + "/full-resync-" + t.config->name;
  g->full_resync_needed = g->env->FileExists(g->full_resync_path);
  if (g->env->FileExists(g->undo_path)) {
    // A resync was under way when this site stopped: still inconsistent.
    UndoRecord::Recovered undo_recovered;
    auto undo = UndoRecord::Open(*g->env, g->undo_path, &undo_recovered);
    if (!undo.ok()) {
      return undo.status().WithContext(fmt::format("group {}", t.config->name));
    }
    g->undo = std::move(undo).value();
    g->consistent = false;
    g->undo_bytes = g->undo->size_bytes();
    BR_LOG_WARN("replication", "group {}: a resync did not finish; the "
                "volumes are inconsistent until it does, or until `blockrelay "
                "rollback {}` returns them to group {} (undo record {}, {} "
                "bytes{})", t.config->name, t.config->name,
                g->undo->base_group_seq(), g->undo_path, g->undo->size_bytes(),
                undo_recovered.torn_tail_bytes
                    ? fmt::format(", {} torn bytes cut off", undo_recovered.torn_tail_bytes)
                    : "");
  }
  g->applied_group_seq = recovered.applied_group_seq;
  g->applied_group_seq_seen = recovered.applied_group_seq;
  if (recovered.torn_tail_bytes > 0) {
    BR_LOG_WARN("replication", "group {}: journal {} ended in a torn record "
                "({} bytes dropped; it was never acknowledged as durable)",
                t.config->name, path, recovered.torn_tail_bytes);
  }
  // Replay: apply again, in order, every group journaled since the last
  // reset. Applying a group twice leaves the same bytes.
  for (const auto& frame : recovered.frames) {
    if (Status s = ApplyFrame(*g, frame); !s.ok()) {
      return s.WithContext(fmt::format("group {}: replaying journal {}",
                                       t.config->name, path));
    }
  }
  if (!recovered.frames.empty() || had_retired) {
    for (const auto& v : t.volumes) {
      if (Status s = v->Flush(); !s.ok()) return s;
    }
    // The retired journal goes first: left behind a reset journal, its
    // older groups would be replayed over newer ones after a crash.
    if (Status s = DropRetiredJournal(*g); !s.ok()) return s;
    if (Status s = g->journal->Reset(g->applied_group_seq); !s.ok()) return s;
  }
  if (!recovered.frames.empty()) {
    BR_LOG_INFO("replication", "group {}: replayed {} write group(s) from "
                "journal {}{}; volumes now at group {}", t.config->name,
                recovered.frames.size(), had_retired ? g->retired_journal_path + " and " : "",
                path, g->applied_group_seq);
  }
  g->replayed_groups = recovered.frames.size();
  if (t.role && t.secondary) g->forget_site = t.role->Get().reconciled_with;
  if (!t.secondary) g->state = "primary";
  g->last_apply = std::chrono::steady_clock::now();
  return g;
}

asio::awaitable<Receiver::GroupState*> Receiver::ReopenFailedGroup(size_t index) {
  GroupState* old = groups_[index].get();
  // Only once nothing of the failed state runs: its connection, a retire,
  // a resync drain or a rollback would still use its files (its ticker's
  // last sync and apply: below).
  if (stopping_ || old->reopening || old->rolling_back || old->serving > 0 ||
      old->PoolTasksRunning()) {
    co_return nullptr;
  }
  // Only a full disk, which the operator fixes by making room. After an
  // I/O error (EIO) the page cache may hold what never reached the disk
  // while a later fsync reports success: reading the files back would
  // trust it. That waits for the operator and a restart, as DRBD's
  // detached disk waits for `attach`.
  if (!old->failure_status().IsNoSpace()) co_return nullptr;
  const std::string name = old->target.config->name;
  BR_LOG_INFO("replication", "group {}: opening it again (journal, undo record, "
              "replay) after: {}", name, old->failure_status().ToString());
  old->reopening = true;
  std::unique_ptr<GroupState> fresh;
  std::unique_ptr<GroupState>* fp = &fresh;
  const ReceiverTarget target = old->target;
  const ReceiverTarget* tp = &target;
  const std::string* dp = &data_dir_;
  core::IoExecutor* iop = &io_;
  Status s = co_await io_.Run([old, fp, tp, dp, iop] {
    // A sync and apply of the failed connection's ticker may still run:
    // it holds apply_mu. Every later one finds the state failed and does
    // nothing.
    { std::lock_guard wait_for_running(old->apply_mu); }
    auto g = OpenGroup(*tp, *dp, *iop);
    if (!g.ok()) return g.status();
    *fp = std::move(g).value();
    return Status::OK();
  });
  old->reopening = false;
  if (!s.ok()) {
    BR_LOG_ERROR("replication", "group {}: still cannot apply writes: {}", name,
                 s.ToString());
    std::lock_guard lock(old->append_mu);
    old->failure = s;
    co_return nullptr;
  }
  // What changed while it was opened (network thread, as SetRole).
  fresh->target = old->target;
  if (!fresh->target.secondary) {
    fresh->forget_site.clear();
    fresh->state = "primary";
  }
  fresh->groups_received = old->groups_received;
  fresh->bytes_received = old->bytes_received;
  fresh->journal_syncs = old->journal_syncs.load();
  fresh->receive_waits = old->receive_waits.load();
  old->replaced = true;
  replaced_groups_.push_back(std::move(groups_[index]));
  groups_[index] = std::move(fresh);
  BR_LOG_INFO("replication", "group {}: opened again; taking writes from the "
              "upstream", name);
  // The replaced state's files and buffers go now (every path that could
  // still reach them finds it failed first); the state itself once no
  // coroutine or pool task holds it.
  GroupState* gone = replaced_groups_.back().get();
  co_await io_.Run([gone] {
    std::lock_guard apply_lock(gone->apply_mu);
    std::lock_guard append_lock(gone->append_mu);
    std::lock_guard resync_lock(gone->resync_mu);
    gone->journal.reset();
    gone->undo.reset();
    std::vector<GroupState::Pending>().swap(gone->pending);
    std::vector<QueuedResync>().swap(gone->resync_queue);
    return Status::OK();
  });
  PruneReplacedGroups();
  co_return groups_[index].get();
}

Result<std::unique_ptr<Receiver>> Receiver::Open(
    asio::io_context& ctx, core::IoExecutor& io, std::string local_site,
    const std::string& data_dir, std::vector<ReceiverTarget> targets) {
  std::unique_ptr<Receiver> r(new Receiver(ctx, io, std::move(local_site)));
  r->data_dir_ = data_dir;
  for (auto& t : targets) {
    auto g = OpenGroup(t, data_dir, io);
    if (!g.ok()) return g.status();
    r->groups_.push_back(std::move(g).value());
  }
  r->targets_ = std::move(targets);
  return r;
}

Status Receiver::Listen(const config::Endpoint& endpoint) {
  std::error_code ec;
  asio::ip::tcp::resolver resolver(ctx_);
  auto results = resolver.resolve(endpoint.host, std::to_string(endpoint.port),
                                  asio::ip::tcp::resolver::passive, ec);
  if (ec || results.empty()) {
    return Status::InvalidArgument(fmt::format(
        "replication.listen: cannot resolve {}: {}", endpoint.ToString(),
        ec ? ec.message() : "no address"));
  }
  auto ep = results.begin()->endpoint();
  acceptor_.emplace(ctx_);
  acceptor_->open(ep.protocol(), ec);
  if (!ec) acceptor_->set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor_->bind(ep, ec);
  if (!ec) acceptor_->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return Status::IOError(fmt::format("replication.listen: cannot listen on "
                                       "{}: {}", endpoint.ToString(), ec.message()),
                           ec.value());
  }
  return Status::OK();
}

void Receiver::Start() {
  if (acceptor_) asio::co_spawn(ctx_, Accept(), asio::detached);
}

asio::awaitable<void> Receiver::Stop() {
  stopping_ = true;
  if (acceptor_) {
    std::error_code ignored;
    acceptor_->close(ignored);
  }
  for (auto& w : conns_) {
    if (auto c = w.lock()) c->Close();
  }
  asio::steady_timer t(ctx_);
  while (active_coroutines_ > 0) {
    t.expires_after(std::chrono::milliseconds(10));
    co_await t.async_wait(kAsTuple);
  }
  // Apply what is journaled so the volumes are current at shutdown.
  for (auto& g : groups_) {
    GroupState* gs = g.get();
    Status s = co_await io_.Run([gs] {
      uint64_t ignored = 0;
      return SyncAndApply(*gs, 0, &ignored);
    });
    if (!s.ok()) {
      BR_LOG_ERROR("replication", "group {}: applying journaled groups at "
                   "shutdown failed: {}", gs->target.config->name, s.ToString());
    }
  }
  // A journal being retired, or resync data being applied, on a pool
  // thread (of a replaced state too).
  for (auto* states : {&groups_, &replaced_groups_}) {
    for (auto& g : *states) {
      while (g->PoolTasksRunning()) {
        t.expires_after(std::chrono::milliseconds(5));
        co_await t.async_wait(kAsTuple);
      }
    }
  }
}

asio::awaitable<void> Receiver::Accept() {
  Running running(active_coroutines_);
  while (!stopping_) {
    auto [ec, socket] = co_await acceptor_->async_accept(kAsTuple);
    if (ec) {
      if (stopping_) break;
      BR_LOG_WARN("replication", "accept failed: {}", ec.message());
      continue;
    }
    asio::co_spawn(ctx_, Serve(std::move(socket)), asio::detached);
  }
}

asio::awaitable<void> Receiver::Serve(asio::ip::tcp::socket socket) {
  Running running(active_coroutines_);
  auto c = std::make_shared<Conn>(std::move(socket));
  c->id = next_conn_id_++;
  c->peer = PeerName(c->stream);
  conns_.push_back(c);
  std::error_code ignored;
  c->stream.set_option(asio::ip::tcp::no_delay(true), ignored);
  Watchdog handshake(c->stream, kHandshakeTimeout);
  handshake.Arm();
  auto frame = co_await ReadFrame(c->stream, c->peer);
  handshake.Disarm();
  std::optional<Hello> hello;
  if (frame.ok()) {
    auto decoded = frame->Decode();
    if (decoded.ok() && std::holds_alternative<Hello>(*decoded)) {
      hello = std::get<Hello>(*decoded);
    } else {
      BR_LOG_WARN("replication", "connection from {}: expected HELLO, got {}",
                  c->peer, decoded.ok() ? FrameTypeName(frame->header.type)
                                        : decoded.status().message());
    }
  } else {
    BR_LOG_WARN("replication", "connection from {}: {}", c->peer,
                handshake.fired() ? "no HELLO within 10 s" : frame.status().message());
    if (frame.status().IsNotSupported() || frame.status().IsCorruption()) {
      Bytes out;
      EncodeError(MakeError(frame.status().message()), out);
      co_await WriteFrameBytes(c->stream, out, c->peer);
    }
  }
  if (!hello) {
    c->Close();
    co_return;
  }
  HelloCheck check = CheckHello(*hello, local_site_, targets_);
  HelloReply reply;
  reply.site = local_site_;
  reply.result = check.result;
  reply.message = check.message.substr(0, kMaxStringBytes);
  GroupState* g = nullptr;
  StateHold hold(this);
  if (check.result == HelloResult::kAccepted) {
    g = groups_[check.target].get();
    hold.Reset(g);
    if (g->failed) {
      if (GroupState* reopened = co_await ReopenFailedGroup(check.target)) {
        g = reopened;
        hold.Reset(g);
      }
    }
    if (g->failed) {
      reply.result = HelloResult::kBusy;
      reply.message = fmt::format("site {} cannot apply writes to group {}: {}",
                                  local_site_, hello->group,
                                  g->failure_status().message())
                          .substr(0, kMaxStringBytes);
    }
    if (g->rolling_back) {
      reply.result = HelloResult::kBusy;
      reply.message = fmt::format("site {} is rolling group {} back; try again",
                                  local_site_, hello->group);
    }
    reply.applied_group_seq = g->applied_group_seq_seen.load();
    reply.full_resync = g->full_resync_needed.load();
  }
  // Generations decide what this upstream may do here (generations.h).
  std::optional<GenerationSet> adopt;
  // This group took writes only from this upstream since they last
  // reconciled: whatever its slot for the upstream holds (intent extents
  // merged after a crash, writes applied since) came from there.
  bool follower = false;
  bool holds_nothing_own = false;
  if (reply.result == HelloResult::kAccepted) {
    if (auto local = GroupGenerations(g->target.volumes)) {
      reply.generation = EncodeGenerations(*local);
      auto up = ParseGenerations(hello->generation);
      if (!up.ok()) {
        reply.result = HelloResult::kMismatch;
        reply.message = fmt::format("group {}: site {} sent no usable "
                                    "generation: {}", hello->group, hello->site,
                                    up.status().message());
      } else {
        GroupRoleState st = g->target.role ? g->target.role->Get() : GroupRoleState{};
        follower = !st.reconciled_with.empty() && st.reconciled_with == hello->site;
        // Created secondary and never written on its own: it holds nothing
        // the upstream lacks, slot or not (initial_sync "none" must stay
        // none, not turn into a full resync for want of a slot here).
        holds_nothing_own = follower || st.fresh;
        GenerationDecision d = DecideGenerations(
            hello->group, {hello->site, *up}, {local_site_, *local}, st.fresh,
            follower,
            !st.discard_local.empty() && st.discard_local == hello->site);
        if (!d.accepted) {
          reply.result = d.verdict == GenerationVerdict::kSplitBrain
                             ? HelloResult::kSplitBrain
                             : HelloResult::kStaleUpstream;
          reply.message = d.message.substr(0, kMaxStringBytes);
        } else {
          if (!d.message.empty()) BR_LOG_WARN("replication", "{}", d.message);
          if (d.verdict != GenerationVerdict::kSame) adopt = *up;
        }
      }
    }
  }
  Bytes out;
  EncodeHelloReply(reply, out);
  Status ws = co_await WriteFrameBytes(c->stream, out, c->peer);
  if (reply.result != HelloResult::kAccepted) {
    BR_LOG_ERROR("replication", "refused site {} ({}) for group {}: {}",
                 hello->site, c->peer, hello->group, reply.message);
    for (auto& gs : groups_) {
      if (gs->target.config->name == hello->group) {
        gs->state = reply.result == HelloResult::kSplitBrain ? "split_brain" : "refused";
        gs->last_error = reply.message;
        gs->peer = c->peer;
      }
    }
    c->Close();
    co_return;
  }
  if (!ws.ok()) {
    c->Close();
    co_return;
  }
  // Our dirty set for this upstream (what we hold that it may lack), so
  // it resyncs the union of both sides' dirty regions; empty for a
  // follower or a fresh secondary, which hold nothing of their own.
  {
    DirtyRanges ranges;
    size_t full = 0;
    DirtyRanges* rp = &ranges;
    size_t* fp = &full;
    const std::string site = hello->site;
    const std::string* sp = &site;
    GroupState* gp = g;
    if (!holds_nothing_own) {
      co_await io_.Run([gp, rp, fp, sp] {
        *rp = CollectDirtyRanges(gp->target.volumes, *sp, fp);
        return Status::OK();
      });
    }
    if (full > 0) {
      BR_LOG_WARN("replication", "group {}: no scoreboard slot for site {} in "
                  "{} volume(s) here: asking for a full resync of them",
                  g->target.config->name, hello->site, full);
    }
    Bytes dirty;
    EncodeDirtyRanges(ranges, dirty);
    if (Status s = co_await WriteFrameBytes(c->stream, dirty, c->peer); !s.ok()) {
      c->Close();
      co_return;
    }
  }
  if (!g->target.secondary || stopping_ || g->failed ||
      g != groups_[check.target].get()) {
    // Promoted during the handshake, or the group failed (or was opened
    // again by another connection) meanwhile: this upstream may write
    // nothing here; it reconnects.
    c->Close();
    co_return;
  }
  c->upstream_site = hello->site;
  c->lazy_durability = hello->lazy_durability;
  c->adopt = adopt;
  ++g->serving;  // no suspension since the check above
  // One upstream connection per group: a newer one replaces an older one
  // (whose peer may have gone without a FIN).
  if (auto old = g->active.lock()) {
    BR_LOG_INFO("replication", "group {}: new connection from {} replaces the "
                "one from {}", g->target.config->name, c->peer, old->peer);
    old->Close();
  }
  g->active = c;
  g->state = "connected";
  g->peer = c->peer;
  g->durability = hello->lazy_durability ? "lazy" : "prompt";
  g->last_error.clear();
  c->group = g;
  BR_LOG_INFO("replication", "group {}: upstream site {} connected from {}",
              g->target.config->name, hello->site, c->peer);
  asio::co_spawn(ctx_, AckWriter(c), asio::detached);
  asio::co_spawn(ctx_, SyncTicker(c), asio::detached);
  c->watchdog.Arm();

  FrameReader reader(c->stream, c->peer);
  while (!c->closed) {
    auto f = co_await reader.Next();
    if (!f.ok()) {
      if (!c->closed && !f.status().IsIOError()) c->error = f.status().message();
      if (!c->closed) g->last_error = f.status().message();
      break;
    }
    c->watchdog.Arm();
    auto decoded = f->Decode();
    if (!decoded.ok()) {
      c->error = decoded.status().message();
      break;
    }
    if (!c->reconciled) {
      // The upstream sends its first frame only once our dirty set is
      // durable in its scoreboard.
      c->reconciled = true;
      GroupState* gp = g;
      const std::string site = c->upstream_site;
      const std::optional<GenerationSet> adopt_set = c->adopt;
      const std::string* sp = &site;
      const std::optional<GenerationSet>* ap = &adopt_set;
      Status rs = co_await io_.Run(
          [gp, sp, ap] { return Reconcile(*gp, *sp, *ap); });
      if (!rs.ok()) {
        c->error = fmt::format("site {} cannot reconcile group {} with site "
                               "{}: {}", local_site_, g->target.config->name,
                               site, rs.message());
        g->last_error = c->error;
        break;
      }
      if (adopt_set) {
        BR_LOG_INFO("replication", "group {}: now at site {}'s generation {}",
                    g->target.config->name, site,
                    GenerationName(adopt_set->current));
      }
    }
    if (auto* ping = std::get_if<Ping>(&*decoded)) {
      c->pongs.push_back(ping->nonce);
      c->wake.cancel();
      continue;
    }
    if (auto* vr = std::get_if<VerifyRequest>(&*decoded)) {
      Status s = CheckNextLinkSeq(c->last_link_seq, vr->link_seq);
      if (s.ok() && (vr->volume >= g->target.volumes.size() ||
                     vr->offset >= g->target.volumes[vr->volume]->size_bytes())) {
        s = Status::Corruption(fmt::format("VERIFY {}: volume {} offset {} is "
                                           "outside the group", vr->link_seq,
                                           vr->volume, vr->offset));
      }
      if (!s.ok()) {
        c->error = s.message();
        break;
      }
      c->last_link_seq = vr->link_seq;
      const uint64_t conn_id = c->id;
      VerifyRequest* request = &*vr;
      VerifyResult result;
      result.request_id = vr->request_id;
      VerifyResult* rp = &result;
      uint64_t durable_seq = 0;
      uint64_t* durable_out = &durable_seq;
      s = co_await io_.Run([g, request, rp, conn_id, durable_out] {
        return VerifyRegions(*g, conn_id, *request, rp, durable_out);
      });
      if (!s.ok()) {
        c->error = fmt::format("site {} cannot verify group {}: {}", local_site_,
                               g->target.config->name, s.message());
        g->last_error = c->error;
        break;
      }
      // Every frame before this one is applied and durable now.
      c->received = vr->link_seq;
      c->durable = vr->link_seq;
      c->verify_results.push_back(std::move(result));
      c->wake.cancel();
      continue;
    }
    if (auto* gu = std::get_if<GenerationUpdate>(&*decoded)) {
      Status s = CheckNextLinkSeq(c->last_link_seq, gu->link_seq);
      auto next = s.ok() ? ParseGenerations(gu->generation) : Result<GenerationSet>(s);
      if (!next.ok()) {
        c->error = next.status().message();
        break;
      }
      c->last_link_seq = gu->link_seq;
      const uint64_t conn_id = c->id;
      const GenerationSet* np = &*next;
      const std::string* up = &c->upstream_site;
      uint64_t durable_seq = 0;
      uint64_t* durable_out = &durable_seq;
      s = co_await io_.Run([g, conn_id, np, up, durable_out] {
        return AdoptGeneration(*g, conn_id, *up, *np, durable_out);
      });
      if (!s.ok()) {
        c->error = fmt::format("site {} cannot take group {}'s new generation: {}",
                               local_site_, g->target.config->name, s.message());
        g->last_error = c->error;
        break;
      }
      BR_LOG_INFO("replication", "group {}: now at site {}'s generation {}",
                  g->target.config->name, c->upstream_site,
                  GenerationName(next->current));
      // Every frame before this one is applied and durable now.
      c->received = gu->link_seq;
      c->durable = gu->link_seq;
      c->wake.cancel();
      continue;
    }
    auto* wg = std::get_if<WriteGroup>(&*decoded);
    if (!wg) {
      c->error = fmt::format("unexpected {} frame after HELLO",
                             FrameTypeName(f->header.type));
      break;
    }
    Status s = CheckNextLinkSeq(c->last_link_seq, wg->link_seq);
    if (s.ok()) s = CheckWriteGroup(*wg, g->target);
    if (!s.ok()) {
      c->error = s.message();
      break;
    }
    c->last_link_seq = wg->link_seq;
    ++g->groups_received;
    for (const auto& op : wg->ops) g->bytes_received += op.data.size();
    // A group closed by FLUSH/FUA is synced at once, unless the HELLO said
    // nobody waits for this site's durability (kLazySyncDelay).
    const bool durable = (wg->flags & kGroupDurable) && !c->lazy_durability;
    const uint64_t link_seq = wg->link_seq;
    const uint64_t conn_id = c->id;
    if (wg->flags & (kGroupResyncBegin | kGroupResyncEnd)) {
      // Resync markers are applied here, not journaled (ApplyMarker).
      const bool begin = wg->flags & kGroupResyncBegin;
      uint64_t marker_durable = 0;
      uint64_t* marker_out = &marker_durable;
      s = co_await io_.Run([g, conn_id, begin, marker_out] {
        return ApplyMarker(*g, conn_id, begin, marker_out);
      });
      if (!s.ok()) {
        BR_LOG_ERROR("replication", "group {}: {}", g->target.config->name, s.ToString());
        c->error = fmt::format("site {} cannot take writes for group {}: {}",
                               local_site_, g->target.config->name, s.message());
        g->last_error = c->error;
        break;
      }
      // Every frame up to this one is applied and durable now.
      c->received = link_seq;
      c->durable = link_seq;
      c->wake.cancel();
      continue;
    }
    Bytes* frame_bytes = &f->bytes;
    uint64_t durable_seq = 0;
    uint64_t* durable_out = &durable_seq;
    if (wg->flags & kGroupResync) {
      // Resync data skips the journal (ApplyResyncData). Usually it only
      // joins the queue of the next batch: done here when nothing else
      // holds the group and nothing journaled must be applied before it,
      // which spares a pool hop per frame (thousands in a scattered
      // resync).
      if (QueueResyncInline(*g, conn_id, link_seq, *frame_bytes)) {
        c->received = link_seq;
        c->wake.cancel();
        continue;
      }
      s = co_await io_.Run([g, frame_bytes, link_seq, conn_id, durable_out] {
        return ApplyResyncData(*g, conn_id, link_seq, std::move(*frame_bytes),
                               durable_out);
      });
      if (!s.ok()) {
        BR_LOG_ERROR("replication", "group {}: {}", g->target.config->name, s.ToString());
        c->error = fmt::format("site {} cannot take writes for group {}: {}",
                               local_site_, g->target.config->name, s.message());
        g->last_error = c->error;
        break;
      }
      c->received = link_seq;
      if (durable_seq > c->durable) c->durable = durable_seq;
      c->wake.cancel();
      continue;
    }
    // An append goes straight to the page cache from here, unless the
    // journal is being rotated or kMaxPendingBytes wait to be applied.
    // Syncing and applying happen on the pool in parallel (SyncTicker),
    // never in this loop: a sync and an apply per frame here held up the
    // reading of the next one (a fast async primary's queue overflowed, and
    // a writer flushing every few writes made every group a sync here). A
    // durable group asks the ticker for an immediate sync, which also
    // covers the durable groups that arrive meanwhile. Past
    // kMaxPendingBytes the pool applies what waits before this connection
    // reads on (back-pressure).
    bool appended = false;
    if (g->append_mu.try_lock()) {
      const bool room = g->pending_bytes < kMaxPendingBytes;
      g->append_mu.unlock();
      if (room) {
        s = AppendFrame(*g, conn_id, link_seq, *frame_bytes);
        appended = true;
      }
    }
    if (!appended) {
      ++g->receive_waits;
      s = co_await io_.Run([g, frame_bytes, durable, link_seq, conn_id, durable_out] {
        Status st = AppendFrame(*g, conn_id, link_seq, *frame_bytes);
        if (st.ok() && (durable || g->pending_bytes_hint() >= kMaxPendingBytes)) {
          // A durable group is a barrier: everything before it, resync
          // data included, must be durable when it is acknowledged.
          st = SyncAndApply(*g, conn_id, durable_out,
                            durable ? ResyncFlush::kAlways : ResyncFlush::kWhenDue);
        }
        return st;
      });
    } else if (s.ok() &&
               (durable || g->pending_bytes_hint() >= (c->lazy_durability ? kLazySyncBatchBytes
                                                                           : kSyncBatchBytes))) {
      c->sync_now = true;
      if (durable) c->sync_barrier = true;
      c->ticker.cancel();
    }
    if (!s.ok()) {
      BR_LOG_ERROR("replication", "group {}: {}", g->target.config->name, s.ToString());
      c->error = fmt::format("site {} cannot take writes for group {}: {}",
                             local_site_, g->target.config->name, s.message());
      g->last_error = c->error;
      break;
    }
    c->received = link_seq;
    if (durable_seq > c->durable) c->durable = durable_seq;
    c->wake.cancel();
  }
  if (!c->error.empty() && !c->closed) {
    BR_LOG_ERROR("replication", "group {}: closing connection from {}: {}",
                 g->target.config->name, c->peer, c->error);
    Bytes err;
    EncodeError(MakeError(c->error), err);
    co_await WriteFrameBytes(c->stream, err, c->peer);
  }
  c->watchdog.Disarm();
  c->Close();
  if ((g->active.lock() == c || g->active.expired()) && g->target.secondary) {
    g->state = "waiting";
  }
  --g->serving;
  BR_LOG_INFO("replication", "group {}: upstream connection from {} closed",
              g->target.config->name, c->peer);
}

asio::awaitable<void> Receiver::SyncTicker(std::shared_ptr<Conn> c) {
  Running running(active_coroutines_);
  GroupState* g = c->group;
  StateHold hold(this, g);
  while (!c->closed) {
    if (!c->sync_now) {
      c->ticker.expires_after(kSyncInterval);
      co_await c->ticker.async_wait(kAsTuple);
      if (c->closed) break;
    }
    // Durable groups that arrive while this runs share the next one (a
    // group commit of the journal syncs); the receive loop goes on.
    const ResyncFlush mode = c->sync_barrier ? ResyncFlush::kAlways : ResyncFlush::kWhenDue;
    // Other links' groups keep the tick: their writers wait on this site
    // (a sync link's replies, an async link's max_lag), and larger batches
    // make the bursts of applying longer.
    const PendingGroups groups = c->lazy_durability && !c->sync_barrier
                                     ? PendingGroups::kWhenDue
                                     : PendingGroups::kAll;
    c->sync_now = c->sync_barrier = false;
    uint64_t durable_seq = 0;
    uint64_t* durable_out = &durable_seq;
    const uint64_t conn_id = c->id;
    Status s = co_await io_.Run([g, conn_id, durable_out, mode, groups] {
      return SyncAndApply(*g, conn_id, durable_out, mode, groups);
    });
    if (!s.ok()) {
      BR_LOG_ERROR("replication", "group {}: {}", g->target.config->name, s.ToString());
      c->error = s.message();
      g->last_error = s.message();
      c->Close();
      break;
    }
    if (durable_seq > c->durable) {
      c->durable = durable_seq;
      c->wake.cancel();
    }
  }
}

asio::awaitable<void> Receiver::AckWriter(std::shared_ptr<Conn> c) {
  Running running(active_coroutines_);
  Bytes out;
  while (!c->closed) {
    out.clear();
    for (uint64_t nonce : c->pongs) EncodePong(Pong{nonce}, out);
    c->pongs.clear();
    for (const auto& v : c->verify_results) EncodeVerifyResult(v, out);
    c->verify_results.clear();
    // durable never passes received: the journal is synced up to what was
    // appended, and appended is acknowledged first.
    const uint64_t durable = std::min(c->durable, c->received);
    if (c->received != c->acked_received || durable != c->acked_durable) {
      EncodeGroupAck(GroupAck{c->received, durable}, out);
      c->acked_received = c->received;
      c->acked_durable = durable;
    }
    if (!out.empty()) {
      Status s = co_await WriteFrameBytes(c->stream, out, c->peer);
      if (!s.ok()) {
        c->Close();
        break;
      }
      continue;
    }
    c->wake.expires_at(std::chrono::steady_clock::time_point::max());
    co_await c->wake.async_wait(kAsTuple);
  }
}

nlohmann::json Receiver::UpstreamJson(const std::string& group) const {
  for (const auto& g : groups_) {
    if (g->target.config->name != group) continue;
    nlohmann::json j = {
        {"site", g->target.config->upstream ? g->target.config->upstream->site : ""},
        {"state", g->state},
        {"peer", g->peer},
        {"groups_received", g->groups_received},
        {"bytes_received", g->bytes_received},
        {"replayed_groups", g->replayed_groups},
        {"receive_waits", g->receive_waits.load()},
        {"journal_syncs", g->journal_syncs.load()},
    };
    if (!g->durability.empty()) j["durability"] = g->durability;
    j["applied_group_seq"] = g->applied_group_seq_seen.load();
    j["consistent"] = g->consistent.load();
    j["undo_bytes"] = g->undo_bytes.load();
    if (g->full_resync_needed) j["full_resync_requested"] = true;
    if (g->rolling_back) j["rolling_back"] = true;
    {
      std::lock_guard lock(g->append_mu);
      j["journal_bytes"] = g->journal->log_bytes() + g->retired_journal_bytes.load();
      // Received and journaled, waiting for the next sync and apply: how far
      // applying lags behind receiving.
      j["unapplied_bytes"] = g->pending_bytes;
      if (!g->failure.ok()) j["error"] = g->failure.message();
    }
    if (!g->last_error.empty()) j["last_error"] = g->last_error;
    return j;
  }
  return nullptr;
}

Receiver::GroupState* Receiver::FindGroup(const std::string& group) const {
  for (const auto& g : groups_) {
    if (g->target.config->name == group) return g.get();
  }
  return nullptr;
}

std::optional<std::string> Receiver::UpstreamPeer(const std::string& group) const {
  GroupState* g = FindGroup(group);
  if (!g) return std::nullopt;
  auto c = g->active.lock();
  if (!c || c->closed) return std::nullopt;
  return fmt::format("site {} ({})", c->upstream_site, c->peer);
}

void Receiver::SetRole(const std::string& group, bool secondary,
                       ReplicationGroup* onward) {
  GroupState* g = FindGroup(group);
  if (!g) return;
  for (auto& t : targets_) {
    if (t.config->name == group) {
      t.secondary = secondary;
      t.onward = onward;
    }
  }
  {
    std::lock_guard lock(g->apply_mu);
    g->target.secondary = secondary;
    g->target.onward = onward;
    if (!secondary) g->forget_site.clear();
  }
  if (!secondary) {
    if (auto c = g->active.lock()) {
      c->error = fmt::format("group {} was promoted on site {}", group, local_site_);
      c->Close();
    }
    g->state = "primary";
  } else {
    g->state = "waiting";
  }
}

asio::awaitable<Status> Receiver::DropUpstream(const std::string& group) {
  GroupState* g = FindGroup(group);
  if (!g) co_return Status::OK();
  Running running(active_coroutines_);
  StateHold hold(this, g);
  if (auto c = g->active.lock()) c->Close();
  asio::steady_timer t(ctx_);
  while (g->serving > 0) {
    t.expires_after(std::chrono::milliseconds(10));
    co_await t.async_wait(kAsTuple);
  }
  co_return co_await io_.Run([g] {
    uint64_t ignored = 0;
    return SyncAndApply(*g, 0, &ignored);
  });
}

}  // namespace blockrelay::replication
