// Receiver: the downstream end of replication, on `replication.listen`.
//
// For every secondary group of this site it accepts one upstream
// connection at a time from the group's configured upstream site, checks
// its HELLO (CheckHello), and then, for each WRITE_GROUP frame:
//   1. appends the frame to the group's journal (GroupJournal) and
//      acknowledges it as received (what a sync link waits for);
//   2. soon after (at a durable group, every kSyncInterval, or once
//      kSyncBatchBytes are waiting) syncs the journal, applies the waiting
//      groups to the volumes in order, and acknowledges them as durable
//      (what clears the upstream's scoreboard and answers FLUSH/FUA).
// Writes are applied through core::Volume like local ones, so a group with
// its own downstream links forwards them (chains), one upstream group never
// split across two of its own (ReplicationGroup::BeginApply).
// A group only reaches the volumes after its journal record is durable, so
// a crash of this site at any point leaves the volumes at a group boundary
// once Open() has replayed the journal.
// Resync is the exception: between a resync's BEGIN and END markers
// (protocol.h) the volumes are at no group boundary of the primary. Before
// any write in that window overwrites bytes for the first time, their old
// contents go to the group's UndoRecord (data_dir/undo-<group>.log),
// synced first; END drops the record. While the record exists the group is
// "inconsistent", and Rollback() writes the saved bytes back.
//
// Threads: connections are coroutines on the network thread; journal and
// volume I/O run on the IoExecutor under the group's mutex.
#pragma once

#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <asio/awaitable.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <nlohmann/json.hpp>

#include "blockrelay/config/site_config.h"
#include "blockrelay/core/io_executor.h"
#include "blockrelay/core/volume.h"
#include "blockrelay/io/env.h"
#include "replication/generations.h"
#include "replication/journal.h"
#include "replication/protocol.h"
#include "replication/undo_record.h"

namespace blockrelay::replication {

class ReplicationGroup;

class GroupRole;

// A group as the receiver sees it. Only a secondary group takes an
// upstream; promote/demote switch `secondary` (Receiver::SetRole).
struct ReceiverTarget {
  const config::GroupConfig* config = nullptr;
  std::vector<std::shared_ptr<core::Volume>> volumes;  // config order
  ReplicationGroup* onward = nullptr;  // this site's own links, if any
  bool secondary = true;
  // The group's persisted role state (fresh, discard_local,
  // reconciled_with); null in tests without generations.
  GroupRole* role = nullptr;
};

struct HelloCheck {
  HelloResult result = HelloResult::kAccepted;
  std::string message;
  size_t target = 0;  // index into the targets when accepted
};

// Decides whether `hello` may push into one of `targets` of site
// `local_site`: the group must be secondary here, the sender its configured
// upstream or (the new primary after a failover) one of its downstream
// sites, and volumes, sizes and region size must match. Generations are
// checked after this (DecideGenerations). Pure: the message names what
// differs on which site.
HelloCheck CheckHello(const Hello& hello, const std::string& local_site,
                      const std::vector<ReceiverTarget>& targets);

// Clears, in every volume, the scoreboard slot for `site` and persists it:
// this site holds nothing `site` lacks (a secondary whose every write came
// from `site` after their dirty sets were reconciled). Storage thread.
Status ForgetDirtyFor(const std::vector<std::shared_ptr<core::Volume>>& volumes,
                      const std::string& site);

// Marks, in every volume, every region of the slot for `site` dirty,
// durably (after a rollback at promote). Storage thread.
Status MarkAllDirtyFor(const std::vector<std::shared_ptr<core::Volume>>& volumes,
                       const std::string& site);

// The regions of the slot for `site` in every volume as DIRTY_RANGES; a
// volume with no slot for `site` is sent as wholly dirty (*full_volumes
// counts them), a volume with more runs than fit as one whole run.
DirtyRanges CollectDirtyRanges(const std::vector<std::shared_ptr<core::Volume>>& volumes,
                               const std::string& site, size_t* full_volumes);

// Checks a decoded WRITE_GROUP against the target before it is journaled:
// volume indexes and ranges. Corruption naming the op otherwise.
Status CheckWriteGroup(const WriteGroup& group, const ReceiverTarget& target);

class Receiver {
 public:
  // Opens each target's journal in `data_dir` and replays what it holds
  // (blocking; at start-up, before anything is served).
  static Result<std::unique_ptr<Receiver>> Open(
      asio::io_context& ctx, core::IoExecutor& io, std::string local_site,
      const std::string& data_dir, std::vector<ReceiverTarget> targets);
  ~Receiver();

  Status Listen(const config::Endpoint& endpoint);
  void Start();
  asio::awaitable<void> Stop();

  // Upstream connection state of `group`, for status; null if not a target.
  // Includes "consistent" and "undo_bytes".
  nlohmann::json UpstreamJson(const std::string& group) const;

  // Whether `group`'s volumes are at a group boundary of the primary (no
  // resync under way or cut off); nullopt if `group` is not a target.
  std::optional<bool> Consistent(const std::string& group) const;

  struct RollbackOutcome {
    bool rolled_back = false;      // false: the group was consistent already
    uint64_t restored_bytes = 0;   // bytes written back from the undo record
    uint64_t applied_group_seq = 0;  // the group the volumes are at now
  };
  // Returns `group` to its last consistent state. A consistent group is
  // left alone (rolled_back false), also while its upstream is connected.
  // Otherwise: applies what its journal
  // holds (an END among it makes the group consistent, and nothing is rolled
  // back), then writes every range of the undo record back through
  // core::Volume (so this site's own downstream links carry the writes on),
  // flushes the volumes, empties the journal and drops the undo record.
  // From then on the group asks its upstream, at the next HELLO, for a full
  // resync (HelloReply::full_resync): the upstream's scoreboard counts the
  // rolled-back regions as in sync. Runs the I/O on the IoExecutor; call on
  // the network thread. Errors: NotFound (not a secondary group of this
  // site), Busy (the upstream is connected, or a rollback already runs), or
  // the I/O error that stopped it (the undo record stays, so a retry or a
  // restart can finish the rollback).
  asio::awaitable<Result<RollbackOutcome>> Rollback(const std::string& group);
  // For promote: Rollback() when the group is inconsistent, OK otherwise.
  asio::awaitable<Status> RollbackIfInconsistent(const std::string& group);
  // Promote/demote (network thread). The peer of the live upstream
  // connection of `group`, or nullopt.
  std::optional<std::string> UpstreamPeer(const std::string& group) const;
  // Makes `group` take an upstream (secondary) or refuse one (primary);
  // `onward` is its own links while secondary. Turning primary closes the
  // upstream connection; wait for it with DropUpstream().
  void SetRole(const std::string& group, bool secondary, ReplicationGroup* onward);
  // Closes the upstream connection of `group`, waits until nothing of it
  // runs, then applies everything journaled, so the volumes hold every
  // group received (promote).
  asio::awaitable<Status> DropUpstream(const std::string& group);

 private:
  struct GroupState;
  struct Conn;
  struct QueuedResync;
  class StateHold;
  class Running;
  // Frees the replaced group states nothing holds any more.
  void PruneReplacedGroups();
  Receiver(asio::io_context& ctx, core::IoExecutor& io, std::string local_site);
  // Opens the group's journal in `data_dir`, replays what it holds into the
  // volumes and returns the group's state (blocking; at start-up, and on a
  // pool thread when a failed group is reopened).
  static Result<std::unique_ptr<GroupState>> OpenGroup(const ReceiverTarget& t,
                                                       const std::string& data_dir,
                                                       core::IoExecutor& io);
  // A group whose journal, undo record or volumes failed refuses its
  // upstream. When the failure was a full disk, at the upstream's next
  // HELLO, once nothing of the failed state runs, this opens the group
  // again as at start-up (replaying its journal): if that works the new
  // state replaces the failed one; if not, the group stays failed with the
  // new error. Other errors wait for a restart. Network thread; `index`
  // into groups_. Returns the group to serve, or null.
  asio::awaitable<GroupState*> ReopenFailedGroup(size_t index);
  asio::awaitable<void> Accept();
  asio::awaitable<void> Serve(asio::ip::tcp::socket socket);
  asio::awaitable<void> SyncTicker(std::shared_ptr<Conn> c);
  asio::awaitable<void> AckWriter(std::shared_ptr<Conn> c);
  // REQUIRES: g.apply_mu held, or start-up.
  static Status ApplyFrame(GroupState& g, const Bytes& frame);
  // Appends a received frame to the journal (takes append_mu).
  static Status AppendFrame(GroupState& g, uint64_t conn_id, uint64_t link_seq,
                            Bytes& frame);
  // Syncs the journal and applies what was appended, in order (takes
  // apply_mu); rotates the journal when it is large or idle. Sets
  // *durable_link_seq to the last frame of connection `conn_id` that is
  // applied and durable. kAlways also flushes the resync data applied so
  // far (a barrier: every earlier frame durable); kWhenDue only once
  // kResyncFlushBytes of it wait or the resync paused, so that a full sync
  // is not flushed every tick.
  // kAll syncs and applies every group appended; kWhenDue (the ticker of a
  // connection with lazy durability) leaves them waiting until the oldest is
  // kLazySyncDelay old, kLazySyncBatchBytes of them wait, or none came
  // for kLazySyncQuiet.
  enum class ResyncFlush { kAlways, kWhenDue };
  enum class PendingGroups { kAll, kWhenDue };
  static Status SyncAndApply(GroupState& g, uint64_t conn_id,
                             uint64_t* durable_link_seq,
                             ResyncFlush resync_flush = ResyncFlush::kAlways,
                             PendingGroups pending_groups = PendingGroups::kAll);
  // The journal holds only applied groups: moves it aside (retired) and
  // opens an empty one, so appends go on while the volumes are flushed.
  // REQUIRES: g.apply_mu and g.append_mu held, nothing pending, no retire
  // running.
  static Status RotateJournal(GroupState& g);
  // Posts RetireJournal to the pool; a failure makes the group failed.
  static void StartRetire(GroupState& g);
  // Flushes the volumes, then removes the retired journal (takes apply_mu
  // for that). Pool thread.
  static Status RetireJournal(GroupState& g, uint64_t epoch);
  // Removes the retired journal, if any. REQUIRES: g.apply_mu held and
  // every group in it durable in the volumes.
  static Status DropRetiredJournal(GroupState& g);
  // Resync markers and the undo record. REQUIRES: g.apply_mu held, or
  // start-up.
  static Status BeginResync(GroupState& g);
  static Status EndResync(GroupState& g);
  // Saves every hole of the group's volumes (of at least
  // kMinHoleSavedAtBegin; at most kMaxHoleRecordsAtBegin records) in the
  // new undo record as "zeros" records, with one sync. A hole holds its
  // BEGIN contents until a write of the epoch saves it, so this is what a
  // batch would save later; done at once, the batches that fill holes (all
  // of an initial sync to a fresh sparse downstream) have nothing to save
  // and skip their undo sync. REQUIRES: g.apply_mu held, g.undo just made.
  static Status SaveHolesAtBegin(GroupState& g);
  // A BEGIN or END marker as it arrives: applies everything received
  // before it, flushes the volumes, opens or closes the resync epoch, and
  // empties the journal (markers are never journaled: a replay must not
  // see frames from before the epoch it recovers). Pool thread.
  static Status ApplyMarker(GroupState& g, uint64_t conn_id, bool begin,
                            uint64_t* durable_link_seq);
  // Resync data (kGroupResync) as it arrives: applies what was received
  // before it, then queues it to be written straight to the volumes, not
  // through the journal, in batches of up to kSyncBatchBytes (or at the
  // next SyncAndApply) so that one undo-record sync covers many frames. Resync is not write-ordered, so a crash may keep any part of
  // it: the upstream keeps the regions dirty until they are acknowledged
  // durable, which waits for a flush of the volumes (every kSyncBatchBytes
  // here, and at every SyncAndApply), and the undo record still saves what
  // it overwrites. A replay never sees journaled frames from before the
  // resync's BEGIN (ApplyMarker empties the journal), so replaying the
  // journal after such a write only re-applies streamed writes that came
  // after the resync started, in order. Pool thread.
  static Status ApplyResyncData(GroupState& g, uint64_t conn_id, uint64_t link_seq,
                                Bytes&& frame, uint64_t* durable_link_seq);
  // Network thread: queues a resync frame for the next batch unless
  // something journaled must be applied first or kMaxResyncQueueBytes
  // wait; a full batch is applied by a drain posted to the pool
  // (StartResyncDrain), so receiving goes on meanwhile. false: nothing
  // done, use ApplyResyncData on the pool.
  static bool QueueResyncInline(GroupState& g, uint64_t conn_id,
                                uint64_t link_seq, Bytes& frame);
  // Posts one DrainResyncQueue (and the flush, when due) to the pool.
  static void StartResyncDrain(GroupState& g);
  // Flushes the volumes if resync data is waiting for it, and reports it
  // durable. REQUIRES: g.apply_mu held.
  static Status FlushResyncData(GroupState& g, uint64_t conn_id,
                                uint64_t* durable_link_seq);
  // Saves, durably, the bytes `group` would overwrite that the undo record
  // does not hold yet.
  // With `sync` false the appends are not synced yet (the caller syncs the
  // record before it applies anything they protect).
  static Status SaveUndo(GroupState& g, const WriteGroup& group, bool sync = true);
  // Applies the queued resync frames in order: saves what they overwrite,
  // syncs the undo record once, then writes them. REQUIRES: g.apply_mu held.
  static Status DrainResyncQueue(GroupState& g);
  // The same for frames already taken from the queue (SyncAndApply takes
  // the queue together with the pending journal groups).
  static Status ApplyQueuedResync(GroupState& g, std::vector<QueuedResync> queue);
  // Applies resync frames that do not overlap each other: reads what the
  // volumes hold, saves in the undo record (one sync) and writes only the
  // granules that differ (resync_diff.h). REQUIRES: g.apply_mu held.
  static Status ApplyResyncBatch(GroupState& g, std::span<const WriteGroup> groups);
  // ApplyFrame() after decoding; `undo_saved`: SaveUndo already ran.
  static Status ApplyDecoded(GroupState& g, const WriteGroup& group, bool undo_saved);
  // The I/O of Rollback(), on a pool thread (takes apply_mu).
  static Status RollbackGroup(GroupState& g, RollbackOutcome* out);
  // The accepted upstream's first frame shows it holds our dirty set:
  // adopt its generations, forget our dirty set for it (storage thread).
  static Status Reconcile(GroupState& g, const std::string& peer_site,
                          const std::optional<GenerationSet>& adopt);
  // A GENERATION frame from the connected upstream: applies what came
  // before it, then adopts `next` if it follows this site's current
  // generation (InvalidArgument otherwise). Storage thread.
  static Status AdoptGeneration(GroupState& g, uint64_t conn_id,
                                const std::string& peer_site,
                                const GenerationSet& next,
                                uint64_t* durable_link_seq);
  GroupState* FindGroup(const std::string& group) const;
  // Applies what is waiting, then digests the requested regions.
  static Status VerifyRegions(GroupState& g, uint64_t conn_id,
                              const VerifyRequest& request, VerifyResult* result,
                              uint64_t* durable_link_seq);

  asio::io_context& ctx_;
  core::IoExecutor& io_;
  const std::string local_site_;
  std::string data_dir_;
  std::vector<std::unique_ptr<GroupState>> groups_;
  // Failed group states replaced by ReopenFailedGroup, their files closed:
  // kept while a coroutine or pool task may still hold a pointer.
  std::vector<std::unique_ptr<GroupState>> replaced_groups_;
  std::vector<ReceiverTarget> targets_;
  std::optional<asio::ip::tcp::acceptor> acceptor_;
  std::vector<std::weak_ptr<Conn>> conns_;
  bool stopping_ = false;
  int active_coroutines_ = 0;
  uint64_t next_conn_id_ = 1;
};

}  // namespace blockrelay::replication
