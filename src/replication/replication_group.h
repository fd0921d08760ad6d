// ReplicationGroup: one consistency group's outgoing replication.
//
// The group is the ReplicationSink of each of its volumes. Completed local
// writes (and writes applied from an upstream site, so chains need no
// special code) are collected in one open WriteGroupBuilder, in one
// sequence space across all volumes of the group; the builder is sealed at
// FLUSH/FUA, when a sync link is waiting and has no group of ours in flight
// (writes arriving while one is in flight share the next group: group
// commit, one frame, journal append and acknowledgement for all of them),
// after the smallest
// group_interval of the async links, or at kMaxGroupDataBytes. Sealed groups
// go to every link that is streaming, in sequence order. Each Link (one
// per downstream site) sends them, resyncs from the scoreboard after an
// outage, and clears scoreboard bits as its downstream acknowledges.
//
// Threads: Captured(), Flushed() and WhenAcknowledged() come from any thread
// and only touch the builder under mu_ or post to the network thread.
// Sealing, the links and the waiters live on the network thread.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <asio/awaitable.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <nlohmann/json.hpp>

#include "blockrelay/config/site_config.h"
#include "blockrelay/core/io_executor.h"
#include "blockrelay/core/replication_sink.h"
#include "blockrelay/core/volume.h"
#include "replication/write_group.h"

namespace blockrelay::replication {

class Link;

inline constexpr uint64_t kMaxGroupDataBytes = 8ull << 20;

class ReplicationGroup final : public core::ReplicationSink {
 public:
  ReplicationGroup(asio::io_context& ctx, core::IoExecutor& io,
                   std::string local_site, const config::GroupConfig& config,
                   std::vector<std::shared_ptr<core::Volume>> volumes);
  ~ReplicationGroup() override;

  // Opens the disk queues of links with "queue": "disk" (start-up; blocks).
  Status OpenDiskQueues(const std::string& data_dir);
  // Sets up "initial_sync": "checksum" for every link (Link::OpenChecksumSync);
  // `new_slot_sites` are the downstream sites whose scoreboard slot this
  // start created in some volume of the group (start-up; blocks).
  Status OpenChecksumSyncs(const std::string& data_dir,
                           const std::set<std::string>& new_slot_sites);
  // Starts the links (network thread).
  void Start();
  // Stops the links and fails nothing: writes not yet acknowledged stay
  // dirty in the scoreboard (network thread).
  asio::awaitable<void> Stop();

  // core::ReplicationSink
  Ticket Captured(uint32_t volume, core::CapturedOp op, uint64_t offset,
                  uint64_t length, std::span<const std::byte> data,
                  storage::WriteSeq wseq, bool fua) override;
  Ticket Flushed() override;
  bool RepliesWait() const override { return has_sync_links_ || has_max_lag_; }
  void WhenAcknowledged(Ticket ticket, bool durable,
                        std::function<void(Status)> done) override;

  // Primary groups only. Once armed, the next captured write that finds a
  // link not streaming starts a new generation for the group
  // (generations.h): writes a downstream may not get then carry a
  // generation it can tell apart, so a new primary elsewhere sees a split
  // brain instead of taking this site as merely behind. Armed at start-up
  // and whenever a link loses its connection; not after a promote (that
  // started a generation already). Links that are connected when the new
  // generation is durable reconnect, so their downstreams take it.
  void ArmGenerationBump() { bump_armed_ = bumps_enabled_.load(); }
  void EnableGenerationBumps(bool armed) {
    bumps_enabled_ = true;
    bump_armed_ = armed;
  }
  // Changes whenever this site starts a new generation (network thread).
  uint64_t generation_epoch() const { return generation_epoch_; }

  // The receiver applies one upstream group between these two calls, so
  // it is never split across two of this site's groups (chains keep write
  // order). Any thread.
  void BeginApply() { ++applying_; }
  void EndApply();

  // For links (network thread).
  const std::string& name() const { return config_.name; }
  const std::string& local_site() const { return local_site_; }
  const config::GroupConfig& config() const { return config_; }
  asio::io_context& context() { return ctx_; }
  core::IoExecutor& io() { return io_; }
  const std::vector<std::shared_ptr<core::Volume>>& volumes() const { return volumes_; }
  // Starts or stops handing sealed groups to `link`. Returns the sequence
  // number of the first group the link will get.
  uint64_t StartStreaming(Link* link);
  void StopStreaming(Link* link);
  // Seals the open group now if it holds anything (or is a barrier).
  void SealNow();
  // Start-up, before any write: later groups get numbers above `seq`.
  void EnsureSeqAbove(uint64_t seq);
  // Resync data for `link`, from a pool thread while the volume range is
  // held: queued for the link behind every group sealed before it.
  void DeliverResync(Link* link, std::shared_ptr<const SealedGroup> data);
  // A verify request for `link`, from a pool thread while the volume range
  // is held: seals the open group first, so the request follows every
  // write captured before the read. The resync END marker goes this way
  // too, for the same reason.
  void DeliverVerify(Link* link, std::shared_ptr<const SealedGroup> request);
  // True when nothing captured is waiting in the open group.
  bool OpenGroupEmpty();
  // A link's acknowledged position or state changed: re-check the waiters.
  void CheckWaiters();
  // A sync link's downstream acknowledged receipt, or a sync link stopped
  // streaming: seals what gathered in the open group meanwhile (network
  // thread).
  void SyncAcknowledged();

  Link* FindLink(const std::string& site) const;
  const std::vector<std::unique_ptr<Link>>& links() const { return links_; }

  nlohmann::json LinksJson() const;
  // Every link (or just `site`) replicating with nothing outstanding.
  // NotFound if `site` is not a downstream of this group.
  Result<bool> CaughtUp(const std::optional<std::string>& site);

 private:
  friend class Link;  // fills and drains Link::incoming_ under mu_
  struct Waiter {
    Ticket ticket;
    bool durable;
    std::function<void(Status)> done;
    std::chrono::steady_clock::time_point deadline;
  };
  asio::awaitable<void> SealLoop();
  void SealLocked();  // REQUIRES: mu_ held
  // A group sealed while a sync link streamed is not yet acknowledged as
  // received by every streaming sync link: new writes gather in the open
  // group until it is (group commit across the sync link).
  bool SyncGroupInFlight() const {
    return sync_sealed_seq_.load() > sync_acked_seq_.load();
  }
  // Recomputes sync_acked_seq_ from the streaming sync links (network thread).
  void UpdateSyncAcked();
  void WakeSealer();
  // Posts one wake-up of every link's writer (any thread).
  void WakeLinks();
  // nullopt: keep waiting.
  std::optional<Status> WaiterOutcome(const Waiter& w) const;

  asio::io_context& ctx_;
  core::IoExecutor& io_;
  const std::string local_site_;
  const config::GroupConfig config_;
  const std::vector<std::shared_ptr<core::Volume>> volumes_;
  std::vector<std::unique_ptr<Link>> links_;
  bool has_sync_links_ = false;
  bool has_max_lag_ = false;  // an async link with max_lag
  std::chrono::milliseconds group_interval_{10};

  std::mutex mu_;
  WriteGroupBuilder open_;          // GUARDED_BY(mu_)
  uint64_t next_seq_ = 1;           // GUARDED_BY(mu_)
  std::vector<Link*> streaming_;    // GUARDED_BY(mu_)
  std::atomic<int> streaming_count_{0};
  std::atomic<int> sync_streaming_{0};
  std::atomic<int> applying_{0};
  std::atomic<uint64_t> sync_sealed_seq_{0};  // last group sealed for a sync link
  std::atomic<uint64_t> sync_acked_seq_{0};   // min received ack over sync links
  std::atomic<bool> seal_requested_{false};
  std::atomic<bool> sealer_woken_{false};
  std::atomic<bool> links_woken_{false};

  // Network thread only.
  std::vector<Waiter> waiters_;
  bool waiter_loop_running_ = false;
  std::optional<asio::steady_timer> seal_timer_;
  std::optional<asio::steady_timer> waiter_timer_;
  bool stopping_ = false;
  std::atomic<bool> bumps_enabled_{false};
  std::atomic<bool> bump_armed_{false};
  uint64_t generation_epoch_ = 0;  // network thread
  std::atomic<int> bumps_in_flight_{0};  // BumpGeneration started, not done
  asio::awaitable<void> BumpGeneration();
};

}  // namespace blockrelay::replication
