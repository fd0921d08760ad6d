// Link: this site's replication to one downstream site of one group.
//
// States (docs/replication.md):
//   connecting   first attempt after start-up, nothing known yet
//   resyncing    connected; new writes stream, and the regions the
//                scoreboard marked while the link was down are being sent
//   replicating  connected, streaming, nothing left from before
//   logging      not connected (refused, unreachable, queue overflow, cut):
//                writes only mark the scoreboard; reconnects with back-off
//   queuing      "queue": "disk" only: not connected, but writes are kept
//                in order in the disk queue (up to max_queue), so the
//                downstream catches up write-ordered, without a resync
//   split_brain  the downstream refused our HELLO because both sides wrote
//                independently (generations); writes only mark the
//                scoreboard, and the link retries with back-off until an
//                operator chooses (`resync --discard-local`, or demote)
//
// One connection at a time; it has one reader coroutine (acknowledgements,
// pongs) and one writer coroutine (groups, resync data, pings), both on the
// network thread, plus the resync walker, whose reads run on pool threads.
// Queue entries stay until the downstream acknowledges them durably; then
// their scoreboard bits are cleared (Scoreboard::MarkClean with the write's
// WriteSeq, so a newer write to the same extent keeps its bit).
//
// Thread safety: network thread only, except incoming_, which the group
// fills under its mutex (ReplicationGroup::mu_) from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <asio/awaitable.hpp>
#include <asio/steady_timer.hpp>
#include <nlohmann/json.hpp>

#include "blockrelay/config/site_config.h"
#include "replication/frame_io.h"
#include "replication/journal.h"
#include "replication/write_group.h"

namespace blockrelay::replication {

class ReplicationGroup;

enum class LinkState {
  kConnecting, kResyncing, kReplicating, kLogging, kQueuing, kSplitBrain
};
const char* LinkStateName(LinkState state);

class Link {
 public:
  Link(ReplicationGroup& group, const config::DownstreamConfig& config);
  ~Link();

  // "queue": "disk": opens data_dir/queue-<group>-<site>.log and takes
  // back what a clean shutdown left in it (after a crash the queue may
  // lack writes that the scoreboard has, so it is dropped and the link
  // resyncs instead). Start-up, before Start(); blocks.
  Status OpenDiskQueue(const std::string& data_dir);

  // "initial_sync": "checksum" (docs/replication.md): when `new_slot` (this
  // start created the link's scoreboard slot, all dirty), records in
  // data_dir/compare-<group>-<site>.pending that the dirty regions are to be
  // compared by digest before any is sent; the record stays until a compare
  // pass has finished, so a restart in the middle compares the rest. For
  // other links, removes a stale record. Start-up, before Start(); blocks.
  Status OpenChecksumSync(const std::string& data_dir, bool new_slot);

  void Start();
  asio::awaitable<void> Stop();

  // Operator's pause: drops the connection and stays in logging mode
  // (writes only mark the scoreboard) until Resume(), which reconnects at
  // once and resyncs what changed. Not kept across a restart.
  void Pause();
  void Resume();
  // Operator's resync: reconnects and walks the scoreboard again; with
  // `full`, every region is marked dirty first (a full sync).
  asio::awaitable<Status> ForceResync(bool full);
  // Marks every region of this link's slots dirty, durably (full resync).
  asio::awaitable<Status> MarkAllDirty();

  // Online verify (docs/replication.md): compares every region's digest
  // with the downstream's, in sequence with the write stream, so regions
  // written meanwhile are not false mismatches. With `fix`, mismatching
  // regions are marked dirty and resynced. FailedPrecondition-like
  // InvalidArgument when the link is not connected or a verify runs.
  Status StartVerify(bool fix);
  nlohmann::json VerifyJson() const;
  bool paused() const { return paused_; }

  const std::string& site() const { return config_.site; }
  const config::DownstreamConfig& config() const { return config_; }
  bool is_sync() const { return config_.mode == config::LinkMode::kSync; }
  // Whether the downstream may sync its journal lazily, about once a
  // second (receiver.cc, kLazySyncDelay; the HELLO says so): only when
  // nothing here waits for its durable acknowledgements. A sync link's
  // FLUSH and FUA do; so do an async link's max_lag (measured up to them)
  // and a disk queue, which keeps each group whole in memory until then
  // (kept_, bounded by max_queue: a second of writes would overflow it).
  bool LazyDurability() const {
    return !is_sync() && !config_.max_lag_bytes && !config_.max_lag_ms &&
           config_.queue != config::QueueKind::kDisk;
  }
  LinkState state() const { return state_; }
  bool streaming() const { return streaming_; }
  uint64_t stream_start_seq() const { return stream_start_seq_; }
  // Highest group_seq the downstream holds (received) / holds durably.
  uint64_t acked_group_seq(bool durable) const {
    return durable ? acked_durable_group_seq_ : acked_received_group_seq_;
  }
  // Replicating, and every group sealed so far is durable downstream.
  bool CaughtUp() const;
  // Behind by more than max_lag (bytes not durably acknowledged, or the age
  // of the oldest of them). False without max_lag.
  bool LagExceeded() const;
  nlohmann::json Json() const;

  // Called by the group under its mutex: a sealed group for this link, or
  // resync data read while its range was held.
  void DeliverLocked(std::shared_ptr<const SealedGroup> group);
  // Network thread: something was delivered.
  void Wake();
  // Network thread: the group started a new generation, `generations` as
  // HELLO carries them (generations.h). A streaming downstream gets a
  // GENERATION frame in sequence; any other connection reconnects so that
  // its downstream takes it at HELLO.
  void GenerationChanged(const std::string& generations);
  // Network thread, periodically: clears bits left set by streamed writes
  // once nothing is outstanding.
  void Sweep();

 private:
  // The BEGIN or END marker (protocol.h) that opens every connection:
  // BEGIN when it will resync, END when nothing is dirty.
  static std::shared_ptr<const SealedGroup> ResyncMarker(uint32_t marker);
  struct Entry {
    std::shared_ptr<const SealedGroup> group;
    uint64_t link_seq = 0;
    bool sent = false;
  };
  struct Connection;

  asio::awaitable<void> Run();
  // After the queue overflowed: stays in logging mode while the group's
  // writers go on faster than half of `drained_bytes_per_sec` (what the
  // link sent while its queue was backlogged), for at most kMaxCongestionHold, so that
  // a link that cannot keep up does not reconnect and resync only to
  // overflow again (docs/replication.md, "Congestion").
  asio::awaitable<void> HoldWhileWritersOutrun(double drained_bytes_per_sec);
  // The queue passed max_queue on `c`: remember what the link drained
  // while backlogged, for HoldWhileWritersOutrun().
  void NoteOverflow(const Connection& c);
  // Bytes written to the group's volumes since start (local and applied).
  uint64_t GroupBytesWritten() const;
  asio::awaitable<Status> Connect(Connection& c);
  // After an accepted HELLO_REPLY: reads the downstream's DIRTY_RANGES and
  // marks them dirty in this link's slots, durably, before anything is sent.
  asio::awaitable<Status> MergeDownstreamDirty(Connection& c);
  asio::awaitable<void> Serve(std::shared_ptr<Connection> c);
  asio::awaitable<void> ReadLoop(std::shared_ptr<Connection> c);
  asio::awaitable<void> WriteLoop(std::shared_ptr<Connection> c);
  asio::awaitable<void> ResyncLoop(std::shared_ptr<Connection> c);
  void HandleAck(Connection& c, const GroupAck& ack);
  // Waits until `until`, or until the connection wakes its sleepers (an
  // acknowledgement, a verify answer, a break). Network thread.
  asio::awaitable<void> Nap(Connection& c, std::chrono::steady_clock::time_point until);
  asio::awaitable<void> VerifyLoop(std::shared_ptr<Connection> c);
  void HandleVerifyResult(const VerifyResult& result);
  // initial_sync "checksum": digests of the dirty regions go to the
  // downstream in sequence with the stream (VERIFY frames); regions whose
  // digests match are cleared. True when every dirty region was compared.
  asio::awaitable<bool> CompareLoop(std::shared_ptr<Connection> c);
  void HandleCompareResult(const VerifyResult& result);
  Status RemoveCompareRecord();
  void Clean(const SealedGroup& group, bool widen);
  void Break(Connection& c, const std::string& why);
  void PushResyncMarker(Connection& c, bool resync);
  void SetState(LinkState s);
  void TakeIncoming(Connection& c);
  // Scoreboard slot of this link in volume `v`, or -1.
  int SlotFor(size_t v) const;
  bool AnyDirty() const;
  // Disk queue: moves delivered groups into the file and kept_, feeds the
  // connection, drops acknowledged groups from the file.
  asio::awaitable<void> DiskLoop();
  asio::awaitable<void> DrainToDisk();
  // The disk queue cannot hold what is waiting: drop it and fall back to
  // the scoreboard (logging mode, resync at the next connect).
  void Overflow(const std::string& why);
  bool disk_mode() const { return disk_ != nullptr; }

  ReplicationGroup& group_;
  const config::DownstreamConfig config_;
  std::vector<int> slots_;  // per volume of the group

  LinkState state_ = LinkState::kConnecting;
  bool stopping_ = false;
  bool paused_ = false;
  // The connection broke because its queue passed max_queue.
  bool overflowed_ = false;
  double overflow_drained_ = 0;  // bytes per second (NoteOverflow)
  // HoldWhileWritersOutrun() is waiting; an operator's resync releases it.
  bool congestion_hold_ = false;
  bool hold_released_ = false;
  uint64_t congestion_holds_ = 0;
  double hold_resume_below_ = 0;  // bytes per second
  double hold_writers_rate_ = 0;  // the last sample
  std::chrono::steady_clock::time_point hold_deadline_;
  // An operator marked (or is marking) regions dirty, every one for
  // ForceResync(full) or verify --fix's mismatches, and the connection that
  // resyncs them has not started yet: nothing may clear them meanwhile (the
  // sweep and widened acknowledgements assume the slot is in sync apart
  // from bits set by writes, and would clear a region with no newer write).
  bool operator_resync_pending_ = false;
  int operator_marking_ = 0;
  // Held (across co_await) while an operator's marks are made: sets
  // operator_resync_pending_ and counts in operator_marking_ until it goes.
  class OperatorMarking {
   public:
    explicit OperatorMarking(Link& link) : link_(link) {
      link_.operator_resync_pending_ = true;
      ++link_.operator_marking_;
    }
    ~OperatorMarking() { --link_.operator_marking_; }
    OperatorMarking(const OperatorMarking&) = delete;
    OperatorMarking& operator=(const OperatorMarking&) = delete;

   private:
    Link& link_;
  };
  bool streaming_ = false;
  uint64_t stream_start_seq_ = 0;
  uint64_t acked_received_group_seq_ = 0;
  uint64_t acked_durable_group_seq_ = 0;
  std::shared_ptr<Connection> conn_;
  Connection* connecting_ = nullptr;
  std::optional<asio::steady_timer> retry_timer_;
  bool running_ = false;
  std::optional<asio::steady_timer> stopped_;

  // "queue": "disk" (network thread).
  std::unique_ptr<GroupJournal> disk_;
  std::string disk_marker_;  // exists only after a clean shutdown
  bool capturing_ = false;     // the group hands us sealed groups
  bool disk_complete_ = false; // kept_ has every write the downstream lacks
  bool disk_reset_needed_ = false;
  std::deque<std::shared_ptr<const SealedGroup>> kept_;  // not yet durable downstream
  uint64_t kept_bytes_ = 0;
  uint64_t kept_acked_seq_ = 0;      // last group durably acknowledged
  uint64_t recorded_acked_seq_ = 0;  // ... as written in the file's header
  std::optional<asio::steady_timer> disk_wake_;
  bool disk_loop_running_ = false;

  struct Verify {
    bool running = false;
    bool done = false;
    bool fix = false;
    std::string error;
    uint64_t regions_total = 0, regions_done = 0;
    uint64_t mismatched_regions = 0, mismatched_bytes = 0, fixed_regions = 0;
    std::vector<std::pair<uint32_t, uint64_t>> mismatches;  // volume, region
    struct Pending {
      uint32_t volume;
      uint64_t first_region;
      uint32_t count;
    };
    std::map<uint64_t, Pending> pending;  // by request id
    uint64_t next_id = 1;
    std::chrono::steady_clock::time_point started, finished;
  };
  Verify verify_;
  uint64_t next_request_id_ = 1;  // VERIFY requests, verify and compare

  // initial_sync "checksum" (network thread).
  bool compare_pending_ = false;  // the next resync compares first
  std::string compare_record_;    // its file, while it exists
  std::string data_dir_;
  struct Compare {
    bool ran = false;  // status shows it from the first pass on
    bool running = false;
    uint64_t regions_total = 0, regions_done = 0;
    uint64_t matched_regions = 0, matched_bytes = 0;
    uint64_t differing_regions = 0, differing_bytes = 0;
    struct Pending {
      uint32_t volume;
      uint64_t first_region;
      uint32_t count;
      storage::WriteSeq as_of;  // the read's point in the write history
    };
    std::map<uint64_t, Pending> pending;  // by request id
    std::chrono::steady_clock::time_point started, finished;
  };
  Compare compare_;

  // GUARDED_BY(group_.mu_)
  std::vector<std::shared_ptr<const SealedGroup>> incoming_;
  uint64_t incoming_bytes_ = 0;

  // Status.
  std::string last_error_;
  bool split_brain_ = false;  // the last HELLO was refused as a split brain
  uint64_t hello_epoch_ = 0;  // group generation epoch sent in the last HELLO
  uint64_t merged_dirty_regions_ = 0;  // reported by the downstream, last connect
  std::string peer_site_;
  uint64_t bytes_sent_ = 0;        // write data sent, resync included
  uint64_t wire_bytes_sent_ = 0;   // frame bytes
  uint64_t groups_sent_ = 0;
  uint64_t resync_bytes_sent_ = 0;
  uint64_t resync_regions_left_ = 0;
  uint64_t resync_bytes_left_ = 0;
  uint64_t resync_total_bytes_ = 0;
  std::chrono::steady_clock::time_point resync_started_;
  uint64_t connects_ = 0;
  // For the throughput figure: bytes_sent_ sampled about once a second.
  std::chrono::steady_clock::time_point rate_sample_time_;
  uint64_t rate_sample_bytes_ = 0;
  double throughput_ = 0;
};

}  // namespace blockrelay::replication
