#include "replication/link.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>

#include <asio/co_spawn.hpp>
#include <asio/connect.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/use_awaitable.hpp>
#include <fmt/format.h>
#include "util/xxhash.h"

#include "blockrelay/io/env.h"
#include "replication/generations.h"
#include "replication/replication_group.h"
#include "util/logging.h"

namespace blockrelay::replication {

namespace {
constexpr auto kAsTuple = asio::experimental::as_tuple(asio::use_awaitable);
constexpr auto kMinBackoff = std::chrono::milliseconds(100);
constexpr auto kMaxBackoff = std::chrono::seconds(5);
constexpr auto kHandshakeTimeout = std::chrono::seconds(10);
// A link whose queue overflowed samples the writers' rate this often, and
// reconnects after kMaxCongestionHold even if they are still too fast
// (HoldWhileWritersOutrun).
constexpr auto kCongestionSample = std::chrono::milliseconds(250);
constexpr auto kMaxCongestionHold = std::chrono::seconds(30);
// Resync reads this much at a time (contiguous dirty regions) and keeps at
// most kResyncWindowEntries chunks and kResyncWindowBytes not yet durable
// downstream. The downstream acknowledges resync data as durable after
// flushing its volumes, every 32 MiB or 5 ms: the window must hold several
// of those, or the walker waits for every flush (16 chunks of a scattered
// 64 KiB region each let 1 MiB through per flush: 48 MB/s in the bench).
// Memory: only what the downstream has not received yet keeps its data
// (HandleAck strips the rest).
constexpr uint64_t kResyncChunkBytes = 1ull << 20;
constexpr uint64_t kResyncWindowEntries = 4096;
constexpr uint64_t kResyncWindowBytes = 128ull << 20;
// The walker reads up to this many chunks (and bytes) per pool hop.
constexpr size_t kResyncReadBatchChunks = 32;
constexpr uint64_t kResyncReadBatchBytes = 4ull << 20;

bool AllZero(std::span<const std::byte> data) {
  for (std::byte b : data) {
    if (b != std::byte{0}) return false;
  }
  return true;
}
}  // namespace

// Resync data and verify requests are bounded by their own windows and
// belong to one connection: they do not count against max_queue and are
// not kept in a disk queue.
static bool IsStreamedGroup(const SealedGroup& g) {
  return !(g.flags & kGroupResync) && !g.verify && !g.generation;
}
// Bytes a queued entry counts against max_queue.
static uint64_t QueuedBytes(const SealedGroup& g) {
  return IsStreamedGroup(g) ? g.footprint() : 0;
}

const char* LinkStateName(LinkState state) {
  switch (state) {
    case LinkState::kConnecting: return "connecting";
    case LinkState::kResyncing: return "resyncing";
    case LinkState::kReplicating: return "replicating";
    case LinkState::kLogging: return "logging";
    case LinkState::kQueuing: return "queuing";
    case LinkState::kSplitBrain: return "split_brain";
  }
  return "?";
}

// One TCP connection to the downstream and everything that lives as long.
struct Link::Connection {
  explicit Connection(asio::io_context& ctx, std::chrono::milliseconds keepalive)
      : stream(ctx), wake(ctx), watchdog(stream, keepalive) {}
  Stream stream;
  std::string peer;
  asio::steady_timer wake;  // the writer waits on it
  // Timers of the other coroutines that wait for acknowledgements (resync
  // walker, verify, compare): each its own, because expires_after() on a
  // shared timer cancels the other waiter, and two of them then wake each
  // other in a loop that spins the network thread.
  std::vector<asio::steady_timer*> sleepers;
  void WakeAll() {
    wake.cancel();
    for (auto* t : sleepers) t->cancel();
  }
  Watchdog watchdog;        // closes the stream when the peer goes quiet
  bool broken = false;
  std::deque<Entry> queue;  // sent or to send; popped when durable
  uint64_t queue_bytes = 0;
  uint64_t next_link_seq = 1;
  uint64_t acked_received = 0;  // link_seq
  uint64_t acked_durable = 0;   // link_seq
  size_t sent = 0;  // entries at the front of `queue` already sent
  uint64_t max_sent_link_seq = 0;
  uint64_t resync_unacked = 0;  // resync entries not yet durable
  uint64_t resync_unacked_bytes = 0;  // ... and the bytes they cover
  bool resync_done = false;
  uint64_t peer_applied_group_seq = 0;  // from HELLO_REPLY
  bool peer_wants_full_resync = false;  // from HELLO_REPLY (after a rollback)
  int coroutines = 0;  // reader, writer, resync still running
  asio::steady_timer* done_signal = nullptr;
  // When the writer last found the queue empty, and bytes_sent_ then: the
  // link has been backlogged since, so what it sent since is its rate.
  std::chrono::steady_clock::time_point backlog_since = std::chrono::steady_clock::now();
  uint64_t backlog_sent_bytes = 0;
};

Link::Link(ReplicationGroup& group, const config::DownstreamConfig& config)
    : group_(group), config_(config) {
  for (size_t v = 0; v < group_.volumes().size(); ++v) {
    int slot = -1;
    if (const auto* sb = group_.volumes()[v]->scoreboard()) {
      for (const auto& s : sb->slots()) {
        if (s.site == config_.site) slot = static_cast<int>(s.slot);
      }
    }
    slots_.push_back(slot);
  }
}

Link::~Link() = default;

int Link::SlotFor(size_t v) const { return slots_[v]; }

void Link::Start() {
  retry_timer_.emplace(group_.context());
  stopped_.emplace(group_.context());
  running_ = true;
  rate_sample_time_ = std::chrono::steady_clock::now();
  if (disk_mode()) {
    // A disk queue keeps every write from now on, connected or not.
    stream_start_seq_ = group_.StartStreaming(this);
    capturing_ = true;
    disk_wake_.emplace(group_.context());
    disk_loop_running_ = true;
    asio::co_spawn(group_.context(), DiskLoop(), asio::detached);
  }
  asio::co_spawn(group_.context(), Run(), asio::detached);
}

asio::awaitable<void> Link::Stop() {
  stopping_ = true;
  if (retry_timer_) retry_timer_->cancel();
  if (conn_) Break(*conn_, "site is shutting down");
  if (connecting_) {
    std::error_code ignored;
    connecting_->stream.close(ignored);
  }
  if (disk_wake_) disk_wake_->cancel();
  while (running_ || disk_loop_running_) {
    stopped_->expires_after(std::chrono::milliseconds(20));
    co_await stopped_->async_wait(kAsTuple);
  }
}

void Link::SetState(LinkState s) {
  if (s == state_) return;
  BR_LOG_INFO("replication", "group {} link to {}: {} -> {}", group_.name(),
              config_.site, LinkStateName(state_), LinkStateName(s));
  state_ = s;
  group_.CheckWaiters();
}

bool Link::AnyDirty() const {
  for (size_t v = 0; v < slots_.size(); ++v) {
    const auto* sb = group_.volumes()[v]->scoreboard();
    if (!sb || slots_[v] < 0) continue;
    if (sb->NextDirtyRegion(static_cast<uint32_t>(slots_[v]), 0)) return true;
  }
  return false;
}

void Link::GenerationChanged(const std::string& generations) {
  if (!conn_) return;  // a handshake under way compares epochs when it ends
  if (!streaming_ || disk_mode()) {
    Break(*conn_, "this site started a new generation; reconnecting");
    return;
  }
  // In sequence with the stream: the downstream adopts it without a
  // reconnect (and the resync one would cost).
  auto g = std::make_shared<SealedGroup>();
  g->generation = std::make_shared<const std::string>(generations);
  g->opened = std::chrono::steady_clock::now();
  {
    std::lock_guard lock(group_.mu_);
    DeliverLocked(std::move(g));
  }
  hello_epoch_ = group_.generation_epoch();
  Wake();
}

void Link::Pause() {
  if (paused_) return;
  paused_ = true;
  BR_LOG_INFO("replication", "group {} link to {}: paused by the operator",
              group_.name(), config_.site);
  if (conn_) Break(*conn_, "paused by the operator");
  if (connecting_) {
    std::error_code ignored;
    connecting_->stream.close(ignored);
  }
}

void Link::Resume() {
  if (!paused_) return;
  paused_ = false;
  BR_LOG_INFO("replication", "group {} link to {}: resumed by the operator",
              group_.name(), config_.site);
  if (retry_timer_) retry_timer_->cancel();
}

asio::awaitable<Status> Link::MarkAllDirty() {
  for (size_t v = 0; v < slots_.size(); ++v) {
    storage::Scoreboard* sb = group_.volumes()[v]->mutable_scoreboard();
    if (!sb || slots_[v] < 0) continue;
    const uint32_t slot = static_cast<uint32_t>(slots_[v]);
    Status s = co_await group_.io().Run([sb, slot] { return sb->MarkAllDirty(slot); });
    if (!s.ok()) co_return s;
  }
  // The disk queue no longer covers everything that is dirty.
  if (disk_mode()) disk_complete_ = false;
  co_return Status::OK();
}

asio::awaitable<Status> Link::ForceResync(bool full) {
  if (full) {
    // Until the next connection starts its resync, nothing may clear what
    // is being marked: the sweep and widened acknowledgements assume the
    // slot was in sync apart from its bits.
    Status s;
    {
      OperatorMarking marking(*this);
      s = co_await MarkAllDirty();
    }
    if (!s.ok()) co_return s;
    // A full resync sends every region: no digest compare first.
    if (compare_pending_) {
      compare_pending_ = false;
      s = co_await group_.io().Run([this] { return RemoveCompareRecord(); });
      if (!s.ok()) co_return s;
    }
  }
  BR_LOG_INFO("replication", "group {} link to {}: {} resync requested by the "
              "operator", group_.name(), config_.site, full ? "full" : "a");
  // The disk queue no longer covers everything that is dirty.
  if (disk_mode()) disk_complete_ = false;
  if (conn_) {
    Break(*conn_, "resync requested by the operator");
  } else if (retry_timer_ && !paused_) {
    hold_released_ = true;
    retry_timer_->cancel();
  }
  co_return Status::OK();
}

asio::awaitable<void> Link::Run() {
  auto backoff = kMinBackoff;
  while (!stopping_) {
    if (paused_) {
      SetState(disk_mode() && capturing_ ? LinkState::kQueuing : LinkState::kLogging);
      retry_timer_->expires_at(std::chrono::steady_clock::time_point::max());
      co_await retry_timer_->async_wait(kAsTuple);
      backoff = kMinBackoff;
      continue;
    }
    auto c = std::make_shared<Connection>(
        group_.context(), std::chrono::milliseconds(config_.keepalive_ms));
    connecting_ = c.get();
    Status s = co_await Connect(*c);
    connecting_ = nullptr;
    if (stopping_) break;
    if (paused_) continue;
    if (!s.ok()) {
      if (last_error_ != s.message()) {
        BR_LOG_WARN("replication", "group {} link to {} ({}): {}; logging "
                    "writes in the scoreboard, retrying", group_.name(),
                    config_.site, config_.address.ToString(), s.message());
      }
      last_error_ = s.message();
      SetState(split_brain_ ? LinkState::kSplitBrain
               : disk_mode() && capturing_ ? LinkState::kQueuing
                                           : LinkState::kLogging);
      retry_timer_->expires_after(backoff);
      co_await retry_timer_->async_wait(kAsTuple);
      backoff = std::min<std::chrono::milliseconds>(backoff * 2, kMaxBackoff);
      continue;
    }
    if (hello_epoch_ != group_.generation_epoch()) {
      // A new generation started during the handshake: the downstream
      // took the old one; connect again so it takes the new one.
      std::error_code ignored;
      c->stream.close(ignored);
      continue;
    }
    if (c->peer_wants_full_resync) {
      // The downstream was rolled back to before an unfinished resync: the
      // regions that resync sent are clean here but old there.
      BR_LOG_WARN("replication", "group {} link to {}: the downstream was rolled "
                  "back; marking every region dirty for a full resync",
                  group_.name(), config_.site);
      Status ms = co_await MarkAllDirty();
      if (!ms.ok()) {
        last_error_ = "cannot mark every region dirty for the full resync the "
                      "downstream asks for: " + ms.message();
        BR_LOG_ERROR("replication", "group {} link to {}: {}", group_.name(),
                     config_.site, last_error_);
        std::error_code ignored;
        c->stream.close(ignored);
        SetState(disk_mode() && capturing_ ? LinkState::kQueuing : LinkState::kLogging);
        retry_timer_->expires_after(kMaxBackoff);
        co_await retry_timer_->async_wait(kAsTuple);
        continue;
      }
    }
    backoff = kMinBackoff;
    last_error_.clear();
    ++connects_;
    overflowed_ = false;
    c->backlog_sent_bytes = bytes_sent_;
    co_await Serve(c);
    if (stopping_) break;
    group_.ArmGenerationBump();
    const bool queuing = disk_mode() && capturing_;
    BR_LOG_WARN("replication", "group {} link to {}: connection lost ({}); {}",
                group_.name(), config_.site, last_error_,
                queuing ? "keeping writes in order in the disk queue"
                        : "logging writes in the scoreboard");
    SetState(queuing ? LinkState::kQueuing : LinkState::kLogging);
    // The bitmap matters now that the link is down: persist it.
    for (const auto& v : group_.volumes()) {
      core::Volume* vol = v.get();
      Status fs = co_await group_.io().Run([vol] { return vol->FlushScoreboard(); });
      if (!fs.ok()) {
        BR_LOG_ERROR("replication", "volume {}: scoreboard flush after link "
                     "loss failed: {}", vol->name(), fs.ToString());
      }
    }
    // With max_lag the operator asked for a bounded lag, writers slowed
    // to keep it: reconnect at once, as always.
    if (overflowed_ && !paused_ && !stopping_ && !config_.max_lag_bytes &&
        !config_.max_lag_ms) {
      co_await HoldWhileWritersOutrun(overflow_drained_);
      continue;
    }
    retry_timer_->expires_after(kMinBackoff);
    co_await retry_timer_->async_wait(kAsTuple);
  }
  running_ = false;
}

void Link::NoteOverflow(const Connection& c) {
  overflowed_ = true;
  const double secs = std::chrono::duration<double>(
      std::chrono::steady_clock::now() - c.backlog_since).count();
  overflow_drained_ =
      secs > 0 ? static_cast<double>(bytes_sent_ - c.backlog_sent_bytes) / secs : 0;
}

uint64_t Link::GroupBytesWritten() const {
  uint64_t total = 0;
  for (const auto& v : group_.volumes()) total += v->counters().bytes_written;
  return total;
}

asio::awaitable<void> Link::HoldWhileWritersOutrun(double drained_bytes_per_sec) {
  // Reconnecting at once would start a resync that competes with the
  // writers for the same disks and CPUs, and its queue would overflow
  // again while they write faster than the link drains: the writers pay
  // for a resync that cannot finish. DRBD's resync controller makes the
  // same choice (c-min-rate: resync slows to a trickle while applications
  // write). Half the drained rate leaves the resync room to catch up.
  const auto now = std::chrono::steady_clock::now();
  hold_resume_below_ = drained_bytes_per_sec / 2;
  hold_deadline_ = now + kMaxCongestionHold;
  hold_writers_rate_ = 0;
  hold_released_ = false;
  congestion_hold_ = true;
  ++congestion_holds_;
  const auto max_hold_s =
      std::chrono::duration_cast<std::chrono::seconds>(kMaxCongestionHold).count();
  if (hold_resume_below_ > 0) {
    BR_LOG_INFO("replication", "group {} link to {}: the writers outran the "
                "link ({:.1f} MB/s drained); resyncing once they write less "
                "than {:.1f} MB/s, or in {} s", group_.name(), config_.site,
                drained_bytes_per_sec / 1e6, hold_resume_below_ / 1e6, max_hold_s);
  } else {
    // Overflowed before anything drained (a resync's first burst): no
    // rate to compare with.
    BR_LOG_INFO("replication", "group {} link to {}: the writers outran the "
                "link before it drained anything; resyncing once they stop "
                "writing, or in {} s", group_.name(), config_.site, max_hold_s);
  }
  uint64_t last_bytes = GroupBytesWritten();
  auto last_time = now;
  while (!stopping_ && !paused_ && !hold_released_) {
    retry_timer_->expires_after(kCongestionSample);
    co_await retry_timer_->async_wait(kAsTuple);
    const auto t = std::chrono::steady_clock::now();
    const uint64_t bytes = GroupBytesWritten();
    const double dt = std::chrono::duration<double>(t - last_time).count();
    if (dt <= 0) continue;
    hold_writers_rate_ = static_cast<double>(bytes - last_bytes) / dt;
    last_bytes = bytes;
    last_time = t;
    // Writers that stopped end the wait too: with nothing drained the
    // threshold is 0, which no rate is below.
    if (hold_writers_rate_ < hold_resume_below_ || hold_writers_rate_ == 0 ||
        t >= hold_deadline_) {
      break;
    }
  }
  congestion_hold_ = false;
}

asio::awaitable<Status> Link::Connect(Connection& c) {
  asio::ip::tcp::resolver resolver(group_.context());
  auto [rec, endpoints] = co_await resolver.async_resolve(
      config_.address.host, std::to_string(config_.address.port), kAsTuple);
  if (rec) {
    co_return Status::IOError(fmt::format("cannot resolve {}: {}",
                                          config_.address.host, rec.message()));
  }
  Watchdog handshake_deadline(c.stream, kHandshakeTimeout);
  handshake_deadline.Arm();
  auto [cec, ep] = co_await asio::async_connect(c.stream, endpoints, kAsTuple);
  if (cec) {
    co_return Status::IOError(fmt::format("cannot connect to {}: {}",
                                          config_.address.ToString(),
                                          handshake_deadline.fired() ? "timed out" : cec.message()));
  }
  c.stream.set_option(asio::ip::tcp::no_delay(true));
  c.peer = fmt::format("site {} at {}", config_.site, config_.address.ToString());

  Hello hello;
  hello.site = group_.local_site();
  hello.group = group_.name();
  hello.region_size_bytes = group_.config().region_size_bytes;
  hello.lazy_durability = LazyDurability();
  for (const auto& v : group_.volumes()) {
    hello.volumes.push_back({v->name(), v->size_bytes()});
  }
  hello_epoch_ = group_.generation_epoch();
  if (auto gens = GroupGenerations(group_.volumes())) {
    hello.generation = EncodeGenerations(*gens);
  }
  split_brain_ = false;
  Bytes out;
  EncodeHello(hello, out);
  if (Status s = co_await WriteFrameBytes(c.stream, out, c.peer); !s.ok()) co_return s;
  auto frame = co_await ReadFrame(c.stream, c.peer);
  if (!frame.ok()) {
    co_return handshake_deadline.fired()
        ? Status::IOError(fmt::format("{} did not answer HELLO within {} s",
                                      c.peer, kHandshakeTimeout.count()))
        : frame.status();
  }
  auto decoded = frame->Decode();
  if (!decoded.ok()) co_return decoded.status();
  if (auto* err = std::get_if<ErrorFrame>(&*decoded)) {
    co_return Status::IOError(fmt::format("{} refused: {}", c.peer, err->message));
  }
  auto* reply = std::get_if<HelloReply>(&*decoded);
  if (!reply) {
    co_return Status::Corruption(fmt::format(
        "{} answered HELLO with {}", c.peer, FrameTypeName(frame->header.type)));
  }
  if (reply->result != HelloResult::kAccepted) {
    split_brain_ = reply->result == HelloResult::kSplitBrain;
    co_return Status::IOError(fmt::format("{} refused the connection ({}): {}",
                                          c.peer, HelloResultName(reply->result),
                                          reply->message));
  }
  if (reply->site != config_.site) {
    co_return Status::InvalidArgument(fmt::format(
        "{} says it is site \"{}\", not \"{}\"; check the address in the "
        "config", c.peer, reply->site, config_.site));
  }
  peer_site_ = reply->site;
  c.peer_applied_group_seq = reply->applied_group_seq;
  c.peer_wants_full_resync = reply->full_resync;
  co_return co_await MergeDownstreamDirty(c);
}

asio::awaitable<Status> Link::MergeDownstreamDirty(Connection& c) {
  auto frame = co_await ReadFrame(c.stream, c.peer);
  if (!frame.ok()) co_return frame.status();
  auto decoded = frame->Decode();
  if (!decoded.ok()) co_return decoded.status();
  auto* dirty = std::get_if<DirtyRanges>(&*decoded);
  if (!dirty) {
    co_return Status::Corruption(fmt::format(
        "{} sent {} where DIRTY_RANGES was due", c.peer,
        FrameTypeName(frame->header.type)));
  }
  const auto& volumes = group_.volumes();
  uint64_t regions = 0, bytes = 0;
  for (const auto& v : dirty->volumes) {
    if (v.volume >= volumes.size()) {
      co_return Status::Corruption(fmt::format(
          "{}: DIRTY_RANGES names volume {} but the group has {}", c.peer,
          v.volume, volumes.size()));
    }
    storage::Scoreboard* sb = volumes[v.volume]->mutable_scoreboard();
    const int slot = slots_[v.volume];
    if (!sb) continue;
    for (const DirtyRun& run : v.runs) {
      if (run.first_region + run.region_count > sb->region_count()) {
        co_return Status::Corruption(fmt::format(
            "{}: DIRTY_RANGES run {}+{} passes the end of volume {} ({} "
            "regions)", c.peer, run.first_region, run.region_count,
            volumes[v.volume]->name(), sb->region_count()));
      }
    }
    if (slot < 0) continue;  // nothing tracked for this site: nothing to merge
    for (const DirtyRun& run : v.runs) {
      const uint32_t s = static_cast<uint32_t>(slot);
      const uint64_t first = run.first_region;
      const uint64_t last = run.first_region + run.region_count - 1;
      // Durable before anything is sent: the downstream forgets these
      // regions once it sees our first frame.
      Status st = co_await group_.io().Run(
          [sb, s, first, last] { return sb->MarkRegionsDirty(s, first, last); });
      if (!st.ok()) co_return st;
      regions += run.region_count;
      bytes += run.region_count * sb->region_size_bytes();
    }
  }
  merged_dirty_regions_ = regions;
  if (regions > 0) {
    BR_LOG_INFO("replication", "group {} link to {}: the downstream holds {} "
                "region(s) ({} bytes) of its own writes; they are resynced "
                "from here too", group_.name(), config_.site, regions, bytes);
  }
  // Tells the downstream its dirty set is safe here (it clears it on the
  // first frame it gets).
  Bytes out;
  EncodePing(Ping{0}, out);
  co_return co_await WriteFrameBytes(c.stream, out, c.peer);
}

asio::awaitable<void> Link::Serve(std::shared_ptr<Connection> c) {
  conn_ = c;
  asio::steady_timer done(group_.context());
  c->done_signal = &done;
  c->watchdog.Arm();
  bool resync;
  if (disk_mode()) {
    if (!capturing_) {
      // The queue overflowed earlier: what happened since is only in the
      // scoreboard.
      stream_start_seq_ = group_.StartStreaming(this);
      capturing_ = true;
      disk_complete_ = false;
    }
    // What the downstream already applied (acknowledged before a restart
    // or a lost connection) is not sent again.
    while (!kept_.empty() && kept_.front()->group_seq != 0 &&
           kept_.front()->group_seq <= c->peer_applied_group_seq) {
      Clean(*kept_.front(), false);
      kept_acked_seq_ = kept_.front()->group_seq;
      kept_bytes_ -= std::min(kept_bytes_, kept_.front()->footprint());
      kept_.pop_front();
    }
    resync = !disk_complete_ && AnyDirty();
    if (!resync) disk_complete_ = true;
    // The marker goes before the queued groups: without the resync those
    // lack what only the scoreboard holds.
    PushResyncMarker(*c, resync);
    for (const auto& g : kept_) {
      c->queue_bytes += QueuedBytes(*g);
      c->queue.push_back(Entry{g, c->next_link_seq++, false});
    }
  } else {
    stream_start_seq_ = group_.StartStreaming(this);
    resync = AnyDirty();
    PushResyncMarker(*c, resync);
  }
  // A due compare finds nothing to compare and drops its record.
  resync = resync || compare_pending_;
  // This connection's resync covers a finished full marking; one still
  // running is followed by a reconnect (ForceResync breaks it).
  if (operator_marking_ == 0) operator_resync_pending_ = false;
  streaming_ = true;
  acked_received_group_seq_ = acked_durable_group_seq_ = stream_start_seq_ - 1;
  if (is_sync()) group_.SyncAcknowledged();
  SetState(resync ? LinkState::kResyncing : LinkState::kReplicating);
  BR_LOG_INFO("replication", "group {} link to {}: connected to {}{}",
              group_.name(), config_.site, c->peer,
              resync ? "; resyncing the regions marked while it was away" : "");
  c->coroutines = resync ? 3 : 2;
  asio::co_spawn(group_.context(), ReadLoop(c), asio::detached);
  asio::co_spawn(group_.context(), WriteLoop(c), asio::detached);
  if (resync) asio::co_spawn(group_.context(), ResyncLoop(c), asio::detached);
  else c->resync_done = true;
  while (c->coroutines > 0) {
    done.expires_at(std::chrono::steady_clock::time_point::max());
    co_await done.async_wait(kAsTuple);
  }
  c->done_signal = nullptr;
  streaming_ = false;
  if (!disk_mode()) {
    group_.StopStreaming(this);
    std::lock_guard lock(group_.mu_);
    incoming_.clear();
    incoming_bytes_ = 0;
  }
  conn_.reset();
  resync_regions_left_ = resync_bytes_left_ = 0;
  // Whatever was queued stays dirty in the scoreboard: the next connection
  // resyncs it.
}

std::shared_ptr<const SealedGroup> Link::ResyncMarker(uint32_t marker) {
  auto g = std::make_shared<SealedGroup>();
  g->flags = kGroupResync | marker;
  g->opened = std::chrono::steady_clock::now();
  return g;
}

void Link::PushResyncMarker(Connection& c, bool resync) {
  // First frame of the connection. BEGIN: what follows is not write-ordered
  // until the END the resync pass sends. END: nothing is dirty, so every
  // write before this connection's first group is durable downstream and
  // the downstream is at a group boundary now.
  c.queue.push_back(Entry{ResyncMarker(resync ? kGroupResyncBegin : kGroupResyncEnd),
                          c.next_link_seq++, false});
}

void Link::Break(Connection& c, const std::string& why) {
  if (c.broken) return;
  c.broken = true;
  if (!stopping_ || last_error_.empty()) last_error_ = why;
  std::error_code ignored;
  c.stream.shutdown(asio::socket_base::shutdown_both, ignored);
  c.stream.close(ignored);
  c.WakeAll();
}

asio::awaitable<void> Link::Nap(Connection& c,
                                std::chrono::steady_clock::time_point until) {
  asio::steady_timer timer(group_.context(), until);
  c.sleepers.push_back(&timer);
  co_await timer.async_wait(kAsTuple);
  std::erase(c.sleepers, &timer);
}

void Link::Wake() {
  if (disk_mode()) {
    if (disk_wake_) disk_wake_->cancel();  // the disk loop feeds the connection
    return;
  }
  if (conn_) conn_->WakeAll();
}

void Link::DeliverLocked(std::shared_ptr<const SealedGroup> group) {
  incoming_bytes_ += group->footprint();
  incoming_.push_back(std::move(group));
}

void Link::TakeIncoming(Connection& c) {
  std::vector<std::shared_ptr<const SealedGroup>> taken;
  {
    std::lock_guard lock(group_.mu_);
    taken.swap(incoming_);
    incoming_bytes_ = 0;
  }
  for (auto& g : taken) {
    c.queue_bytes += QueuedBytes(*g);
    c.queue.push_back(Entry{std::move(g), c.next_link_seq++, false});
  }
}

asio::awaitable<void> Link::WriteLoop(std::shared_ptr<Connection> c) {
  const auto ping_every = std::chrono::milliseconds(config_.keepalive_ms / 3);
  auto last_send = std::chrono::steady_clock::now();
  uint64_t nonce = 0;
  size_t next = 0;  // index in c->queue of the first entry not sent
  Bytes out;
  std::vector<FramePiece> pieces;
  std::vector<std::shared_ptr<const SealedGroup>> sending;
  while (!c->broken) {
    if (c->queue.empty()) {
      c->backlog_since = std::chrono::steady_clock::now();
      c->backlog_sent_bytes = bytes_sent_;
    }
    if (!disk_mode()) TakeIncoming(*c);
    if (!disk_mode() && c->queue_bytes > config_.max_queue_bytes) {
      NoteOverflow(*c);
      Break(*c, fmt::format("{} bytes waiting for acknowledgement exceed "
                            "max_queue ({} bytes)", c->queue_bytes,
                            config_.max_queue_bytes));
      break;
    }
    // Entries before c->sent were sent; acknowledgements pop from the front.
    next = c->sent;
    out.clear();
    pieces.clear();
    sending.clear();
    uint64_t data_bytes = 0;
    size_t wire_bytes = 0;
    for (; next < c->queue.size() && wire_bytes < (4u << 20); ++next) {
      Entry& e = c->queue[next];
      const size_t before = out.size();
      if (e.group->verify) {
        VerifyRequest v = *e.group->verify;
        v.link_seq = e.link_seq;
        EncodeVerifyRequest(v, out);
        pieces.push_back(FramePiece{before, out.size() - before, {}});
        wire_bytes += out.size() - before;
      } else if (e.group->generation) {
        EncodeGenerationUpdate(GenerationUpdate{e.link_seq, *e.group->generation}, out);
        pieces.push_back(FramePiece{before, out.size() - before, {}});
        wire_bytes += out.size() - before;
      } else {
        // The frame points at the group's data instead of copying it; the
        // group stays referenced in `sending` until the write is done.
        EncodeWriteGroupGather(e.group->ToFrame(e.link_seq), out, pieces);
        wire_bytes += (out.size() - before) + e.group->data.size();
        sending.push_back(e.group);
      }
      e.sent = true;
      ++c->sent;
      c->max_sent_link_seq = e.link_seq;
      data_bytes += e.group->data.size();
      if (e.group->flags & kGroupResync) resync_bytes_sent_ += e.group->data.size();
      ++groups_sent_;
    }
    const auto now = std::chrono::steady_clock::now();
    if (pieces.empty() && now - last_send >= ping_every) {
      EncodePing(Ping{++nonce}, out);
      pieces.push_back(FramePiece{0, out.size(), {}});
      wire_bytes = out.size();
    }
    if (!pieces.empty()) {
      Status s = co_await WriteFramePieces(c->stream, out, pieces, c->peer);
      sending.clear();
      if (!s.ok()) {
        Break(*c, s.message());
        break;
      }
      bytes_sent_ += data_bytes;
      wire_bytes_sent_ += wire_bytes;
      last_send = std::chrono::steady_clock::now();
      continue;  // more may have arrived meanwhile
    }
    c->wake.expires_after(ping_every);
    co_await c->wake.async_wait(kAsTuple);
  }
  if (--c->coroutines == 0 && c->done_signal) c->done_signal->cancel();
}

asio::awaitable<void> Link::ReadLoop(std::shared_ptr<Connection> c) {
  FrameReader reader(c->stream, c->peer);
  while (!c->broken) {
    auto frame = co_await reader.Next();
    if (!frame.ok()) {
      Break(*c, c->watchdog.fired()
                    ? fmt::format("no word from {} for {} ms (keepalive)",
                                  c->peer, config_.keepalive_ms)
                    : frame.status().message());
      break;
    }
    c->watchdog.Arm();
    auto decoded = frame->Decode();
    if (!decoded.ok()) {
      Break(*c, decoded.status().message());
      break;
    }
    if (auto* ack = std::get_if<GroupAck>(&*decoded)) {
      if (ack->received_seq > c->max_sent_link_seq || ack->durable_seq < c->acked_durable ||
          ack->received_seq < c->acked_received) {
        Break(*c, fmt::format("{} acknowledged group {} (durable {}), but only "
                              "groups up to {} were sent and {} was already "
                              "acknowledged", c->peer, ack->received_seq,
                              ack->durable_seq, c->max_sent_link_seq,
                              c->acked_received));
        break;
      }
      HandleAck(*c, *ack);
    } else if (auto* vr = std::get_if<VerifyResult>(&*decoded)) {
      HandleVerifyResult(*vr);
    } else if (std::holds_alternative<Pong>(*decoded)) {
      // Alive; the watchdog was rearmed above.
    } else if (auto* err = std::get_if<ErrorFrame>(&*decoded)) {
      Break(*c, fmt::format("{} reported an error: {}", c->peer, err->message));
      break;
    } else {
      Break(*c, fmt::format("{} sent an unexpected {} frame", c->peer,
                            FrameTypeName(frame->header.type)));
      break;
    }
  }
  c->watchdog.Disarm();
  if (--c->coroutines == 0 && c->done_signal) c->done_signal->cancel();
}

void Link::HandleAck(Connection& c, const GroupAck& ack) {
  const uint64_t newly_received_from = c.acked_received + 1;
  c.acked_received = ack.received_seq;
  c.acked_durable = ack.durable_seq;
  // Entries carry consecutive link_seqs, so the newly received ones are
  // found by index, without walking what was received before.
  if (!c.queue.empty()) {
    const uint64_t first = c.queue.front().link_seq;
    for (uint64_t seq = std::max(newly_received_from, first);
         seq <= ack.received_seq && seq - first < c.queue.size(); ++seq) {
      Entry& e = c.queue[seq - first];
      if (e.group->group_seq > acked_received_group_seq_) {
        acked_received_group_seq_ = e.group->group_seq;
      }
      // The downstream holds the data now (in its journal): until the
      // group is durable there, keeping its ranges is enough, since a lost
      // connection resyncs from the scoreboard bits that stay set until
      // then. So max_queue bounds what the downstream has not received,
      // and a downstream whose disk is slower to sync than its network
      // does not make the link drop. A disk queue keeps whole groups.
      // Resync data likewise (it is never in a disk queue).
      const bool resync_data = (e.group->flags & kGroupResync) != 0;
      if (!e.group->verify && !e.group->data.empty() &&
          (resync_data || (!disk_mode() && IsStreamedGroup(*e.group)))) {
        c.queue_bytes -= std::min(c.queue_bytes, QueuedBytes(*e.group));
        e.group = e.group->Stripped();
        c.queue_bytes += QueuedBytes(*e.group);
      }
    }
  }
  const bool widen = state_ == LinkState::kReplicating && !operator_resync_pending_;
  while (!c.queue.empty() && c.queue.front().link_seq <= ack.durable_seq) {
    Entry& e = c.queue.front();
    Clean(*e.group, widen && !(e.group->flags & kGroupResync));
    if (e.group->flags & kGroupResync) {
      // The walk counts its regions and its END, not the BEGIN (an END
      // that opens a connection without a resync finds the count at 0).
      if (!(e.group->flags & kGroupResyncBegin)) {
        if (c.resync_unacked > 0) --c.resync_unacked;
        c.resync_unacked_bytes -= std::min(c.resync_unacked_bytes, e.group->bytes_written);
      }
    } else if (e.group->group_seq > acked_durable_group_seq_) {
      acked_durable_group_seq_ = e.group->group_seq;
    }
    c.queue_bytes -= std::min(c.queue_bytes, QueuedBytes(*e.group));
    if (!kept_.empty() && kept_.front() == e.group) {
      if (e.group->group_seq) kept_acked_seq_ = e.group->group_seq;
      kept_bytes_ -= std::min(kept_bytes_, e.group->footprint());
      kept_.pop_front();
      if (kept_.empty() && disk_wake_) disk_wake_->cancel();
    }
    c.queue.pop_front();
    if (c.sent > 0) --c.sent;
  }
  c.WakeAll();  // the resync walker may wait for its window
  if (is_sync()) group_.SyncAcknowledged();
  group_.CheckWaiters();
}

void Link::Clean(const SealedGroup& g, bool widen) {
  for (const auto& op : g.ops) {
    core::Volume& v = *group_.volumes()[op.volume];
    storage::Scoreboard* sb = v.mutable_scoreboard();
    const int slot = slots_[op.volume];
    if (!sb || slot < 0) continue;
    uint64_t begin = op.offset, end = op.offset + op.length;
    if (widen) {
      // Replicating: the rest of these regions was already in sync, so the
      // write's whole regions may be cleared (Scoreboard::MarkClean).
      const uint64_t rs = sb->region_size_bytes();
      begin = begin / rs * rs;
      end = std::min(v.size_bytes(), (end + rs - 1) / rs * rs);
    }
    sb->MarkClean(static_cast<uint32_t>(slot), begin, end - begin, op.wseq);
  }
}

asio::awaitable<void> Link::ResyncLoop(std::shared_ptr<Connection> c) {
  resync_started_ = std::chrono::steady_clock::now();
  uint64_t regions_sent = 0;
  uint64_t read_bytes = 0;
  // What is left: counted once at the start (again after a compare),
  // decremented as we go.
  auto count_left = [this] {
    resync_regions_left_ = resync_bytes_left_ = 0;
    for (size_t v = 0; v < slots_.size(); ++v) {
      const auto* sb = group_.volumes()[v]->scoreboard();
      if (!sb || slots_[v] < 0) continue;
      auto st = sb->StatsForSlot(static_cast<uint32_t>(slots_[v]));
      resync_regions_left_ += st.dirty_regions;
      resync_bytes_left_ += st.dirty_bytes;
    }
    resync_total_bytes_ = resync_bytes_left_;
  };
  count_left();
  if (compare_pending_) {
    // initial_sync "checksum": send only the regions whose digests differ.
    const bool complete = co_await CompareLoop(c);
    if (complete && compare_pending_) {
      compare_pending_ = false;
      Status s = co_await group_.io().Run([this] { return RemoveCompareRecord(); });
      if (!s.ok()) {
        // Harmless: the next start compares the regions still dirty again.
        BR_LOG_WARN("replication", "group {} link to {}: {}", group_.name(),
                    config_.site, s.ToString());
      }
    }
    count_left();
    resync_started_ = std::chrono::steady_clock::now();
  }
  // Chunks are read in batches, one pool hop per batch: a scattered dirty
  // set is thousands of single-region chunks.
  struct Chunk {
    uint64_t offset = 0, length = 0, regions = 0;
    std::shared_ptr<SealedGroup> data;
  };
  std::vector<Chunk> batch;
  uint64_t batch_bytes = 0;
  for (size_t v = 0; v < slots_.size() && !c->broken; ++v) {
    core::Volume* vol = group_.volumes()[v].get();
    const auto* sb = vol->scoreboard();
    if (!sb || slots_[v] < 0) continue;
    const uint32_t slot = static_cast<uint32_t>(slots_[v]);
    const uint64_t rs = sb->region_size_bytes();
    const uint64_t regions = sb->region_count();
    const uint32_t vindex = static_cast<uint32_t>(v);
    uint64_t r = 0;
    bool walked = false;
    while (!c->broken) {
      std::optional<uint64_t> first;
      if (!walked) {
        first = sb->NextDirtyRegion(slot, r);
        walked = !first;
      }
      const bool window_full = c->resync_unacked >= kResyncWindowEntries ||
                               c->resync_unacked_bytes >= kResyncWindowBytes;
      if (first && !window_full && batch.size() < kResyncReadBatchChunks &&
          batch_bytes < kResyncReadBatchBytes) {
        // Contiguous dirty regions, up to kResyncChunkBytes.
        uint64_t last = *first;
        while (last + 1 < regions &&
               (last + 2 - *first) * rs <= std::max(rs, kResyncChunkBytes) &&
               sb->IsDirty(slot, last + 1)) {
          ++last;
        }
        r = last + 1;
        Chunk chunk;
        chunk.offset = *first * rs;
        chunk.length = std::min(vol->size_bytes(), r * rs) - chunk.offset;
        chunk.regions = r - *first;
        chunk.data = std::make_shared<SealedGroup>();
        chunk.data->flags = kGroupResync;
        chunk.data->opened = std::chrono::steady_clock::now();
        // Counted before the read delivers it: its acknowledgement may
        // come before this coroutine resumes.
        ++c->resync_unacked;
        c->resync_unacked_bytes += chunk.length;
        batch_bytes += chunk.length;
        batch.push_back(std::move(chunk));
        continue;
      }
      if (first) r = *first;  // not taken yet: found again next time
      if (batch.empty()) {
        if (walked) break;
        // The window is full: wait for acknowledgements.
        co_await Nap(*c, std::chrono::steady_clock::now() + std::chrono::milliseconds(100));
        continue;
      }
      // Read the batch on a pool thread; each chunk holds its range while
      // it is read and queued behind every group sealed before.
      ReplicationGroup* grp = &group_;
      Link* self = this;
      std::vector<Chunk>* chunks = &batch;
      size_t done = 0;
      size_t* done_out = &done;
      Status s = co_await group_.io().Run([vol, grp, self, vindex, chunks, done_out] {
        for (Chunk& chunk : *chunks) {
          SealedGroup* raw = chunk.data.get();
          const std::shared_ptr<const SealedGroup> keep = chunk.data;
          bool unallocated = false;
          // Sized by the read (on this thread), and not at all for a hole.
          Status st = vol->ReadForResync(
              chunk.offset, chunk.length, raw->data,
              [&](storage::WriteSeq as_of) {
                CapturedOp op;
                op.volume = vindex;
                op.offset = chunk.offset;
                op.length = chunk.length;
                op.wseq = as_of;
                // Holes and zeroes go as one zero operation: no data on
                // the wire, and a sparse source is not even read.
                if (unallocated || AllZero(raw->data)) {
                  op.type = OpType::kZero;
                  raw->data.clear();
                } else {
                  op.type = OpType::kWrite;
                }
                raw->ops.push_back(op);
                raw->bytes_written = chunk.length;
                grp->DeliverResync(self, keep);
              },
              &unallocated);
          if (!st.ok()) return st;
          ++*done_out;
        }
        return Status::OK();
      });
      // The pool thread is done with the batch: drop this frame's
      // references (delivered chunks live on in the queue).
      for (size_t i = done; i < batch.size(); ++i) {
        --c->resync_unacked;
        c->resync_unacked_bytes -= std::min(c->resync_unacked_bytes, batch[i].length);
      }
      if (!s.ok()) {
        const Chunk& failed = batch[done];
        BR_LOG_ERROR("replication", "group {} link to {}: resync read of "
                     "volume {} at {}+{} failed: {}", group_.name(), config_.site,
                     vol->name(), failed.offset, failed.length, s.ToString());
        Break(*c, "resync read failed: " + s.message());
        batch.clear();
        break;
      }
      for (const Chunk& chunk : batch) {
        regions_sent += chunk.regions;
        read_bytes += chunk.length;
        resync_regions_left_ -= std::min(resync_regions_left_, chunk.regions);
        resync_bytes_left_ -= std::min(resync_bytes_left_, chunk.length);
      }
      batch.clear();
      batch_bytes = 0;
      // The disk loop feeds a disk-queue link's connection, the writer
      // takes straight from incoming_ otherwise.
      if (disk_mode()) Wake(); else c->WakeAll();
      // resync_rate: stay at or below it on average since the start.
      if (config_.resync_rate_bytes_per_sec) {
        const auto due = resync_started_ + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
            std::chrono::duration<double>(static_cast<double>(read_bytes) /
                                          *config_.resync_rate_bytes_per_sec));
        while (!c->broken && std::chrono::steady_clock::now() < due) {
          co_await Nap(*c, due);
        }
      }
    }
  }
  // Every dirty region is sent: END follows the group open now (a region
  // read may hold a write of it), so the downstream is at a group boundary
  // once it has applied everything before END.
  if (!c->broken) {
    ++c->resync_unacked;
    auto end = std::make_shared<SealedGroup>();
    end->flags = kGroupResync | kGroupResyncEnd;
    end->opened = std::chrono::steady_clock::now();
    std::shared_ptr<const SealedGroup> marker = end;
    ReplicationGroup* grp = &group_;
    Link* self = this;
    std::shared_ptr<const SealedGroup>* mp = &marker;  // lives in this frame
    co_await group_.io().Run([grp, self, mp] {
      grp->DeliverVerify(self, *mp);
      return Status::OK();
    });
    if (disk_mode()) Wake(); else c->WakeAll();
  }
  // The pass is complete once everything it sent is durable downstream.
  while (!c->broken && c->resync_unacked > 0) {
    co_await Nap(*c, std::chrono::steady_clock::now() + std::chrono::milliseconds(100));
  }
  if (!c->broken) {
    c->resync_done = true;
    // Every write since streaming started is in the queue, and every
    // region dirty before it has been sent.
    if (disk_mode() && capturing_) disk_complete_ = true;
    resync_regions_left_ = resync_bytes_left_ = 0;
    const double secs = std::chrono::duration<double>(
        std::chrono::steady_clock::now() - resync_started_).count();
    BR_LOG_INFO("replication", "group {} link to {}: resync finished, {} "
                "region(s) sent in {:.1f} s", group_.name(), config_.site,
                regions_sent, secs);
    SetState(LinkState::kReplicating);
  }
  if (--c->coroutines == 0 && c->done_signal) c->done_signal->cancel();
}

void Link::Sweep() {
  // Throughput sample.
  const auto now = std::chrono::steady_clock::now();
  const double dt = std::chrono::duration<double>(now - rate_sample_time_).count();
  if (dt >= 1.0) {
    throughput_ = (bytes_sent_ - rate_sample_bytes_) / dt;
    rate_sample_bytes_ = bytes_sent_;
    rate_sample_time_ = now;
  }
  if (state_ != LinkState::kReplicating || !conn_ || !conn_->queue.empty() ||
      operator_resync_pending_) {
    return;
  }
  {
    std::lock_guard lock(group_.mu_);
    if (!incoming_.empty()) return;
  }
  for (size_t v = 0; v < slots_.size(); ++v) {
    core::Volume* vol = group_.volumes()[v].get();
    storage::Scoreboard* sb = vol->mutable_scoreboard();
    if (!sb || slots_[v] < 0) continue;
    const uint32_t slot = static_cast<uint32_t>(slots_[v]);
    if (!sb->NextDirtyRegion(slot, 0)) continue;
    // No write in flight, none waiting in the open group, none unacked:
    // every write numbered up to now is durable downstream.
    vol->IfNoWriteInFlight([&](storage::WriteSeq current) {
      if (!group_.OpenGroupEmpty()) return;
      sb->MarkClean(slot, 0, vol->size_bytes(), current);
    });
  }
}

bool Link::LagExceeded() const {
  if (!config_.max_lag_bytes && !config_.max_lag_ms) return false;
  if (!conn_) return false;
  uint64_t bytes = 0;
  std::chrono::steady_clock::time_point oldest = std::chrono::steady_clock::now();
  for (const auto& e : conn_->queue) bytes += e.group->bytes_written;
  if (!conn_->queue.empty()) oldest = conn_->queue.front().group->opened;
  {
    std::lock_guard lock(group_.mu_);
    for (const auto& g : incoming_) bytes += g->bytes_written;
    if (conn_->queue.empty() && !incoming_.empty()) oldest = incoming_.front()->opened;
  }
  if (config_.max_lag_bytes && bytes > *config_.max_lag_bytes) return true;
  if (config_.max_lag_ms &&
      std::chrono::steady_clock::now() - oldest >
          std::chrono::milliseconds(*config_.max_lag_ms)) {
    return true;
  }
  return false;
}

bool Link::CaughtUp() const {
  if (state_ != LinkState::kReplicating || !conn_) return false;
  if (!conn_->queue.empty()) return false;
  std::lock_guard lock(group_.mu_);
  return incoming_.empty();
}

nlohmann::json Link::Json() const {
  const auto now = std::chrono::steady_clock::now();
  uint64_t queue_bytes = 0, queue_groups = 0, lag_bytes = 0;
  double lag_seconds = 0;
  uint64_t acked_link_seq = 0;
  if (conn_) {
    queue_bytes = conn_->queue_bytes;
    queue_groups = conn_->queue.size();
    for (const auto& e : conn_->queue) lag_bytes += e.group->data_bytes();
    if (!conn_->queue.empty()) {
      lag_seconds = std::chrono::duration<double>(now - conn_->queue.front().group->opened).count();
    }
    acked_link_seq = conn_->acked_durable;
  }
  {
    std::lock_guard lock(group_.mu_);
    queue_bytes += incoming_bytes_;
    queue_groups += incoming_.size();
    for (const auto& g : incoming_) lag_bytes += g->data_bytes();
    if (!incoming_.empty() && lag_seconds == 0) {
      lag_seconds = std::chrono::duration<double>(now - incoming_.front()->opened).count();
    }
  }
  nlohmann::json j = {
      {"site", config_.site},
      {"address", config_.address.ToString()},
      {"mode", config::ToString(config_.mode)},
      {"state", LinkStateName(state_)},
      {"queue_bytes", queue_bytes},
      {"queue_groups", queue_groups},
      {"max_queue_bytes", config_.max_queue_bytes},
      {"lag_bytes", lag_bytes},
      {"lag_seconds", lag_seconds},
      {"last_acked_seq", acked_durable_group_seq_},
      {"last_acked_link_seq", acked_link_seq},
      {"bytes_sent", bytes_sent_},
      {"wire_bytes_sent", wire_bytes_sent_},
      {"groups_sent", groups_sent_},
      {"resync_bytes_sent", resync_bytes_sent_},
      {"throughput_bytes_per_sec", static_cast<uint64_t>(throughput_)},
      {"connects", connects_},
      {"congestion_holds", congestion_holds_},
      {"merged_dirty_regions", merged_dirty_regions_},
      {"paused", paused_},
      {"queue", disk_mode() ? "disk" : "memory"},
  };
  if (disk_mode()) {
    j["disk_queue_bytes"] = kept_bytes_;
    j["disk_queue_groups"] = kept_.size();
    j["disk_queue_complete"] = disk_complete_ && capturing_;
  }
  if (congestion_hold_) {
    j["congestion_hold"] = {
        {"writes_bytes_per_sec", static_cast<uint64_t>(hold_writers_rate_)},
        {"resumes_below_bytes_per_sec", static_cast<uint64_t>(hold_resume_below_)},
        {"seconds_left",
         std::max(0.0, std::chrono::duration<double>(hold_deadline_ - now).count())}};
  }
  if (state_ == LinkState::kResyncing) {
    const double secs = std::chrono::duration<double>(now - resync_started_).count();
    const uint64_t done = resync_total_bytes_ - std::min(resync_total_bytes_, resync_bytes_left_);
    const double rate = secs > 0 ? done / secs : 0;
    j["resync"] = {{"regions_left", resync_regions_left_},
                   {"bytes_left", resync_bytes_left_},
                   {"rate_bytes_per_sec", static_cast<uint64_t>(rate)},
                   {"eta_seconds", rate > 0 ? resync_bytes_left_ / rate : -1.0}};
  }
  if (compare_.ran || compare_pending_) {
    const auto end = compare_.running ? now : compare_.finished;
    j["checksum_compare"] = {
        {"pending", compare_pending_},
        {"running", compare_.running},
        {"regions_total", compare_.regions_total},
        {"regions_done", compare_.regions_done},
        {"matched_regions", compare_.matched_regions},
        {"matched_bytes", compare_.matched_bytes},
        {"differing_regions", compare_.differing_regions},
        {"differing_bytes", compare_.differing_bytes},
        {"elapsed_seconds",
         compare_.ran ? std::chrono::duration<double>(end - compare_.started).count() : 0.0},
    };
  }
  if (!last_error_.empty()) j["last_error"] = last_error_;
  return j;
}

}  // namespace blockrelay::replication

// --- "queue": "disk" --------------------------------------------------------

namespace blockrelay::replication {

namespace {
constexpr auto kRecordAckedEvery = std::chrono::seconds(1);
const char kCompleteMarker[] = "complete\n";

// A WRITE_GROUP frame read back from the disk queue as a SealedGroup. The
// scoreboard WriteSeq of its writes belongs to the previous run: 0 here,
// which makes MarkClean conservative (Scoreboard::MarkClean).
Result<std::shared_ptr<const SealedGroup>> GroupFromFrame(const Bytes& frame) {
  std::span<const std::byte> bytes(frame);
  auto header = DecodeFrameHeader(bytes.first(kFrameHeaderBytes));
  if (!header.ok()) return header.status();
  auto decoded = DecodeFrame(*header, bytes.first(kFrameHeaderBytes),
                             bytes.subspan(kFrameHeaderBytes));
  if (!decoded.ok()) return decoded.status();
  const auto* wg = std::get_if<WriteGroup>(&*decoded);
  if (!wg) return Status::Corruption("not a WRITE_GROUP frame");
  auto g = std::make_shared<SealedGroup>();
  g->group_seq = wg->group_seq;
  g->flags = wg->flags;
  g->opened = std::chrono::steady_clock::now();
  for (const auto& op : wg->ops) {
    CapturedOp c{op.type, op.volume, op.offset, op.length, g->data.size(), 0};
    g->data.insert(g->data.end(), op.data.begin(), op.data.end());
    g->bytes_written += op.length;
    g->ops.push_back(c);
  }
  return std::shared_ptr<const SealedGroup>(std::move(g));
}
}  // namespace

Status Link::OpenDiskQueue(const std::string& data_dir) {
  const std::string path =
      fmt::format("{}/queue-{}-{}.log", data_dir, group_.name(), config_.site);
  disk_marker_ = path + ".clean";
  GroupJournal::Recovered recovered;
  auto journal = GroupJournal::Open(*io::Env::Default(), path, &recovered);
  if (!journal.ok()) {
    return journal.status().WithContext(
        fmt::format("group {} link to {}: disk queue", group_.name(), config_.site));
  }
  disk_ = std::move(journal).value();
  // The marker says the last run ended cleanly with a complete queue. It
  // goes before anything else happens: a crash of this run must not find
  // it.
  std::string marker;
  if (FILE* f = std::fopen(disk_marker_.c_str(), "r")) {
    char buf[32] = {};
    size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
    marker.assign(buf, n);
    std::fclose(f);
    std::remove(disk_marker_.c_str());
    if (Status s = io::Env::Default()->SyncDir(data_dir); !s.ok()) return s;
  }
  recorded_acked_seq_ = kept_acked_seq_ = recovered.applied_group_seq;
  if (marker == kCompleteMarker) {
    uint64_t max_seq = 0;
    for (const auto& frame : recovered.frames) {
      auto g = GroupFromFrame(frame);
      if (!g.ok()) return g.status().WithContext("disk queue " + path);
      max_seq = std::max(max_seq, (*g)->group_seq);
      if ((*g)->group_seq != 0 && (*g)->group_seq <= recovered.applied_group_seq) continue;
      kept_bytes_ += (*g)->footprint();
      kept_.push_back(std::move(g).value());
    }
    group_.EnsureSeqAbove(max_seq);
    disk_complete_ = true;
    BR_LOG_INFO("replication", "group {} link to {}: disk queue {} holds {} "
                "group(s), {} bytes, from before the restart; they go first, in "
                "order", group_.name(), config_.site, path, kept_.size(),
                kept_bytes_);
  } else {
    if (!recovered.frames.empty()) {
      BR_LOG_WARN("replication", "group {} link to {}: disk queue {} is not "
                  "known to be complete (the last run did not stop cleanly); "
                  "dropping its {} group(s): the scoreboard resyncs those regions",
                  group_.name(), config_.site, path, recovered.frames.size());
    }
    if (Status s = disk_->Reset(recovered.applied_group_seq); !s.ok()) return s;
    disk_complete_ = false;
  }
  return Status::OK();
}

void Link::Overflow(const std::string& why) {
  BR_LOG_WARN("replication", "group {} link to {}: {}; dropping the disk "
              "queue and logging writes in the scoreboard (the next connect "
              "resyncs)", group_.name(), config_.site, why);
  group_.StopStreaming(this);
  capturing_ = false;
  disk_complete_ = false;
  disk_reset_needed_ = true;
  kept_.clear();
  kept_bytes_ = 0;
  {
    std::lock_guard lock(group_.mu_);
    incoming_.clear();
    incoming_bytes_ = 0;
  }
  if (conn_) {
    Break(*conn_, why);
  } else {
    SetState(LinkState::kLogging);
  }
}

asio::awaitable<void> Link::DrainToDisk() {
  std::vector<std::shared_ptr<const SealedGroup>> taken;
  {
    std::lock_guard lock(group_.mu_);
    taken.swap(incoming_);
    incoming_bytes_ = 0;
  }
  if (!capturing_) co_return;  // overflowed: the scoreboard has it
  if (!taken.empty()) {
    std::vector<Bytes> frames;
    for (const auto& g : taken) {
      if (!IsStreamedGroup(*g)) continue;
      frames.emplace_back();
      EncodeWriteGroup(g->ToFrame(0), frames.back());
    }
    GroupJournal* journal = disk_.get();
    std::vector<Bytes>* fp = &frames;
    Status s = co_await group_.io().Run([journal, fp] {
      for (const auto& f : *fp) {
        if (Status st = journal->Append(f); !st.ok()) return st;
      }
      return Status::OK();
    });
    if (!s.ok()) {
      Overflow("the disk queue cannot be written: " + s.message());
      co_return;
    }
    for (auto& g : taken) {
      // Resync data and verify requests go only to the live connection.
      if (IsStreamedGroup(*g)) {
        kept_bytes_ += g->footprint();
        kept_.push_back(g);
      }
      if (conn_ && !conn_->broken) {
        conn_->queue_bytes += QueuedBytes(*g);
        conn_->queue.push_back(Entry{g, conn_->next_link_seq++, false});
      }
    }
    if (conn_) conn_->WakeAll();
    if (kept_bytes_ > config_.max_queue_bytes) {
      if (conn_) NoteOverflow(*conn_);
      Overflow(fmt::format("{} bytes waiting exceed max_queue ({} bytes)",
                           kept_bytes_, config_.max_queue_bytes));
      co_return;
    }
    if (disk_->log_bytes() > 2 * config_.max_queue_bytes) {
      if (conn_) NoteOverflow(*conn_);
      Overflow(fmt::format("the disk queue file holds {} bytes, more than twice "
                           "max_queue, without ever running empty",
                           disk_->log_bytes()));
      co_return;
    }
  }
}

asio::awaitable<void> Link::DiskLoop() {
  auto last_record = std::chrono::steady_clock::now();
  GroupJournal* journal = disk_.get();
  while (!stopping_) {
    co_await DrainToDisk();
    if (disk_reset_needed_ || (kept_.empty() && journal->log_bytes() > 0)) {
      const uint64_t acked = kept_acked_seq_;
      Status s = co_await group_.io().Run([journal, acked] { return journal->Reset(acked); });
      if (!s.ok()) {
        BR_LOG_ERROR("replication", "group {} link to {}: {}", group_.name(),
                     config_.site, s.ToString());
      }
      disk_reset_needed_ = false;
      recorded_acked_seq_ = acked;
    } else if (kept_acked_seq_ > recorded_acked_seq_ &&
               std::chrono::steady_clock::now() - last_record >= kRecordAckedEvery) {
      const uint64_t acked = kept_acked_seq_;
      Status s = co_await group_.io().Run([journal, acked] { return journal->RecordApplied(acked); });
      if (!s.ok()) {
        BR_LOG_ERROR("replication", "group {} link to {}: {}", group_.name(),
                     config_.site, s.ToString());
      }
      recorded_acked_seq_ = acked;
      last_record = std::chrono::steady_clock::now();
    }
    disk_wake_->expires_after(kRecordAckedEvery);
    co_await disk_wake_->async_wait(kAsTuple);
  }
  // Clean shutdown: the group sealed what it had; keep it all, and say the
  // queue is complete if it is, so the next run sends it in order.
  co_await DrainToDisk();
  const uint64_t acked = kept_acked_seq_;
  const bool complete = capturing_ && disk_complete_;
  const std::string marker = disk_marker_;
  const std::string* mp = &marker;
  Status s = co_await group_.io().Run([journal, acked, complete, mp] {
    Status st = journal->RecordApplied(acked);
    if (st.ok()) st = journal->Sync();
    if (st.ok() && complete) {
      FILE* f = std::fopen(mp->c_str(), "w");
      if (!f) return Status::IOError("cannot create " + *mp, errno);
      std::fputs(kCompleteMarker, f);
      std::fflush(f);
      ::fsync(fileno(f));
      std::fclose(f);
    }
    return st;
  });
  if (!s.ok()) {
    BR_LOG_ERROR("replication", "group {} link to {}: saving the disk queue at "
                 "shutdown failed: {}; the next start resyncs from the scoreboard",
                 group_.name(), config_.site, s.ToString());
  } else if (complete) {
    BR_LOG_INFO("replication", "group {} link to {}: disk queue saved with {} "
                "group(s) ({} bytes) for the next start", group_.name(),
                config_.site, kept_.size(), kept_bytes_);
  }
  disk_loop_running_ = false;
}

}  // namespace blockrelay::replication

// --- online verify ------------------------------------------------------------

namespace blockrelay::replication {

namespace {
constexpr size_t kVerifyWindow = 8;       // requests in flight
constexpr uint64_t kVerifyChunkBytes = 1ull << 20;
}  // namespace

Status Link::StartVerify(bool fix) {
  if (verify_.running) {
    return Status::Busy(fmt::format("a verify of link {} is already running",
                                    config_.site));
  }
  if (!conn_ || !streaming_ || state_ == LinkState::kConnecting) {
    return Status::InvalidArgument(fmt::format(
        "link {} is not connected (state {}); verify compares with the "
        "downstream and needs the link up", config_.site, LinkStateName(state_)));
  }
  verify_ = Verify{};
  verify_.running = true;
  verify_.fix = fix;
  verify_.started = std::chrono::steady_clock::now();
  for (const auto& v : group_.volumes()) {
    const uint64_t rs = group_.config().region_size_bytes;
    verify_.regions_total += (v->size_bytes() + rs - 1) / rs;
  }
  BR_LOG_INFO("replication", "group {} link to {}: verify started{}",
              group_.name(), config_.site, fix ? " (--fix)" : "");
  asio::co_spawn(group_.context(), VerifyLoop(conn_), asio::detached);
  return Status::OK();
}

void Link::HandleVerifyResult(const VerifyResult& result) {
  if (compare_.pending.count(result.request_id)) {
    HandleCompareResult(result);
    return;
  }
  auto it = verify_.pending.find(result.request_id);
  if (it == verify_.pending.end()) return;  // a verify from a lost connection
  const auto p = it->second;
  verify_.pending.erase(it);
  verify_.regions_done += p.count;
  const uint64_t rs = group_.config().region_size_bytes;
  const uint64_t size = group_.volumes()[p.volume]->size_bytes();
  for (uint32_t i : result.mismatched) {
    if (i >= p.count) continue;  // a lying peer: ignore what we did not ask
    const uint64_t region = p.first_region + i;
    ++verify_.mismatched_regions;
    verify_.mismatched_bytes += std::min(rs, size - region * rs);
    verify_.mismatches.emplace_back(p.volume, region);
  }
  if (conn_) conn_->WakeAll();
}

asio::awaitable<void> Link::VerifyLoop(std::shared_ptr<Connection> c) {
  const uint64_t rs = group_.config().region_size_bytes;
  const uint32_t per_request = static_cast<uint32_t>(
      std::clamp<uint64_t>(kVerifyChunkBytes / rs, 1, kMaxVerifyRegions));
  for (size_t v = 0; v < group_.volumes().size() && !c->broken; ++v) {
    core::Volume* vol = group_.volumes()[v].get();
    const uint64_t regions = (vol->size_bytes() + rs - 1) / rs;
    for (uint64_t first = 0; first < regions && !c->broken; first += per_request) {
      while (!c->broken && verify_.pending.size() >= kVerifyWindow) {
        co_await Nap(*c, std::chrono::steady_clock::now() + std::chrono::milliseconds(100));
      }
      if (c->broken) break;
      const uint32_t count = static_cast<uint32_t>(std::min<uint64_t>(per_request, regions - first));
      const uint64_t offset = first * rs;
      const uint64_t length = std::min(vol->size_bytes(), (first + count) * rs) - offset;
      const uint64_t id = next_request_id_++;
      verify_.pending[id] = {static_cast<uint32_t>(v), first, count};
      auto request = std::make_shared<VerifyRequest>();
      request->request_id = id;
      request->volume = static_cast<uint32_t>(v);
      request->offset = offset;
      request->region_size = rs;
      Bytes buffer;
      Bytes* bp = &buffer;
      VerifyRequest* rp = request.get();
      std::shared_ptr<VerifyRequest>* keep = &request;
      ReplicationGroup* grp = &group_;
      Link* self = this;
      // Read and queue under the range: writes to these bytes after the
      // read follow the request in the stream, so both sides digest the
      // same point of the history.
      Status s = co_await group_.io().Run([vol, bp, rp, keep, grp, self, offset, length, rs] {
        return vol->ReadForResync(offset, length, *bp, [&](storage::WriteSeq) {
          for (uint64_t pos = 0; pos < length; pos += rs) {
            const uint64_t n = std::min(rs, length - pos);
            rp->digests.push_back(XXH3_64bits(bp->data() + pos, n));
          }
          auto entry = std::make_shared<SealedGroup>();
          entry->verify = *keep;
          entry->opened = std::chrono::steady_clock::now();
          grp->DeliverVerify(self, entry);
        });
      });
      if (!s.ok()) {
        verify_.pending.erase(id);
        verify_.error = "reading the local volume failed: " + s.message();
        break;
      }
      if (disk_mode()) Wake(); else c->WakeAll();
    }
  }
  while (!c->broken && !verify_.pending.empty() && verify_.error.empty()) {
    co_await Nap(*c, std::chrono::steady_clock::now() + std::chrono::milliseconds(100));
  }
  if (c->broken && verify_.error.empty()) {
    verify_.error = "the connection to the downstream was lost during the verify";
  }
  if (verify_.error.empty() && verify_.fix && !verify_.mismatches.empty()) {
    // While the marks are made (a bitmap sync each, on the pool) the link
    // still replicates: without this, the sweep cleared a mismatch marked
    // dirty before ForceResync broke the connection, and the next one
    // found nothing to resync (seen once in CI's verify_test).
    {
      OperatorMarking marking(*this);
      for (const auto& [v, region] : verify_.mismatches) {
        storage::Scoreboard* sb = group_.volumes()[v]->mutable_scoreboard();
        if (!sb || slots_[v] < 0) continue;
        const uint32_t slot = static_cast<uint32_t>(slots_[v]);
        const uint64_t r = region;
        Status s =
            co_await group_.io().Run([sb, slot, r] { return sb->MarkRegionsDirty(slot, r, r); });
        if (!s.ok()) {
          verify_.error = "marking mismatching regions dirty failed: " + s.message();
          break;
        }
        ++verify_.fixed_regions;
      }
    }
    if (verify_.error.empty()) {
      Status s = co_await ForceResync(false);
      if (!s.ok()) verify_.error = s.message();
    }
  }
  verify_.running = false;
  verify_.done = true;
  verify_.pending.clear();
  verify_.finished = std::chrono::steady_clock::now();
  BR_LOG_INFO("replication", "group {} link to {}: verify {}: {} of {} regions "
              "compared, {} mismatching ({} bytes){}", group_.name(), config_.site,
              verify_.error.empty() ? "finished" : "failed (" + verify_.error + ")",
              verify_.regions_done, verify_.regions_total, verify_.mismatched_regions,
              verify_.mismatched_bytes,
              verify_.fixed_regions ? fmt::format(", {} marked for resync", verify_.fixed_regions) : "");
}

nlohmann::json Link::VerifyJson() const {
  nlohmann::json mismatches = nlohmann::json::array();
  const uint64_t rs = group_.config().region_size_bytes;
  for (size_t i = 0; i < verify_.mismatches.size() && i < 1000; ++i) {
    const auto& [v, region] = verify_.mismatches[i];
    mismatches.push_back({{"volume", group_.volumes()[v]->name()},
                          {"region", region},
                          {"offset", region * rs}});
  }
  const auto end = verify_.running ? std::chrono::steady_clock::now() : verify_.finished;
  nlohmann::json j = {
      {"running", verify_.running},
      {"done", verify_.done},
      {"fix", verify_.fix},
      {"regions_total", verify_.regions_total},
      {"regions_done", verify_.regions_done},
      {"mismatched_regions", verify_.mismatched_regions},
      {"mismatched_bytes", verify_.mismatched_bytes},
      {"fixed_regions", verify_.fixed_regions},
      {"mismatches", std::move(mismatches)},
      {"elapsed_seconds",
       verify_.started.time_since_epoch().count() == 0
           ? 0.0 : std::chrono::duration<double>(end - verify_.started).count()},
  };
  if (!verify_.error.empty()) j["error"] = verify_.error;
  return j;
}

}  // namespace blockrelay::replication

// --- initial_sync "checksum" ----------------------------------------------------

namespace blockrelay::replication {

Status Link::OpenChecksumSync(const std::string& data_dir, bool new_slot) {
  data_dir_ = data_dir;
  const std::string path = fmt::format("{}/compare-{}-{}.pending", data_dir,
                                       group_.name(), config_.site);
  const bool exists = ::access(path.c_str(), F_OK) == 0;
  if (config_.initial_sync != config::InitialSync::kChecksum) {
    // Left by an earlier configuration: this link sends what is dirty.
    compare_record_ = exists ? path : std::string();
    return RemoveCompareRecord();
  }
  compare_record_ = path;
  if (new_slot && !exists) {
    // Written after the slot (all dirty) is durable: a crash in between
    // costs a full sync, never a missed region.
    FILE* f = std::fopen(path.c_str(), "w");
    if (!f) return Status::IOError("cannot create " + path, errno);
    std::fputs("compare dirty regions by digest before sending them\n", f);
    const bool ok = std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
    const int err = errno;
    std::fclose(f);
    if (!ok) return Status::IOError("cannot write " + path, err);
    if (Status s = io::Env::Default()->SyncDir(data_dir); !s.ok()) return s;
  }
  compare_pending_ = new_slot || exists;
  if (compare_pending_) {
    BR_LOG_INFO("replication", "group {} link to {}: initial_sync checksum: the "
                "dirty regions are compared by digest with the downstream before "
                "any is sent", group_.name(), config_.site);
  }
  return Status::OK();
}

Status Link::RemoveCompareRecord() {
  if (compare_record_.empty()) return Status::OK();
  if (std::remove(compare_record_.c_str()) != 0 && errno != ENOENT) {
    return Status::IOError("cannot remove " + compare_record_, errno);
  }
  compare_record_.clear();
  return io::Env::Default()->SyncDir(data_dir_);
}

void Link::HandleCompareResult(const VerifyResult& result) {
  auto it = compare_.pending.find(result.request_id);
  const auto p = it->second;
  compare_.pending.erase(it);
  compare_.regions_done += p.count;
  std::vector<bool> differs(p.count, false);
  for (uint32_t i : result.mismatched) {
    if (i < p.count) differs[i] = true;  // a lying peer: ignore the rest
  }
  core::Volume& vol = *group_.volumes()[p.volume];
  storage::Scoreboard* sb = vol.mutable_scoreboard();
  const uint64_t rs = group_.config().region_size_bytes;
  for (uint32_t i = 0; i < p.count; ++i) {
    const uint64_t offset = (p.first_region + i) * rs;
    const uint64_t length = std::min(rs, vol.size_bytes() - offset);
    if (differs[i]) {
      ++compare_.differing_regions;
      compare_.differing_bytes += length;
      continue;
    }
    ++compare_.matched_regions;
    compare_.matched_bytes += length;
    // Both sides hold these bytes as of the read (the downstream applied
    // every group before the request); a write after the read keeps its
    // bit (its extent's WriteSeq is newer) and is streamed anyway.
    if (sb && slots_[p.volume] >= 0) {
      sb->MarkClean(static_cast<uint32_t>(slots_[p.volume]), offset, length, p.as_of);
    }
  }
  if (conn_) conn_->WakeAll();
}

asio::awaitable<bool> Link::CompareLoop(std::shared_ptr<Connection> c) {
  compare_ = Compare{};
  compare_.ran = compare_.running = true;
  compare_.started = std::chrono::steady_clock::now();
  for (size_t v = 0; v < slots_.size(); ++v) {
    const auto* sb = group_.volumes()[v]->scoreboard();
    if (!sb || slots_[v] < 0) continue;
    compare_.regions_total += sb->StatsForSlot(static_cast<uint32_t>(slots_[v])).dirty_regions;
  }
  BR_LOG_INFO("replication", "group {} link to {}: comparing {} dirty region(s) "
              "by digest before sending (initial_sync checksum)", group_.name(),
              config_.site, compare_.regions_total);
  const uint64_t rs = group_.config().region_size_bytes;
  const uint64_t per_request =
      std::clamp<uint64_t>(kVerifyChunkBytes / rs, 1, kMaxVerifyRegions);
  bool failed = false;
  for (size_t v = 0; v < slots_.size() && !c->broken && !failed; ++v) {
    core::Volume* vol = group_.volumes()[v].get();
    const auto* sb = vol->scoreboard();
    if (!sb || slots_[v] < 0) continue;
    const uint32_t slot = static_cast<uint32_t>(slots_[v]);
    const uint64_t regions = sb->region_count();
    uint64_t r = 0;
    while (!c->broken) {
      auto first = sb->NextDirtyRegion(slot, r);
      if (!first) break;
      uint64_t last = *first;
      while (last + 1 < regions && last + 1 - *first < per_request &&
             sb->IsDirty(slot, last + 1)) {
        ++last;
      }
      r = last + 1;
      while (!c->broken && compare_.pending.size() >= kVerifyWindow) {
        co_await Nap(*c, std::chrono::steady_clock::now() + std::chrono::milliseconds(100));
      }
      if (c->broken) break;
      const uint64_t offset = *first * rs;
      const uint64_t length = std::min(vol->size_bytes(), r * rs) - offset;
      const uint64_t id = next_request_id_++;
      // Registered before the read: the answer may arrive before this
      // coroutine resumes. as_of is filled on the pool thread before the
      // request is handed over (under the group's mutex).
      Compare::Pending& pending = compare_.pending[id];
      pending = {static_cast<uint32_t>(v), *first, static_cast<uint32_t>(r - *first), 0};
      storage::WriteSeq* as_of_out = &pending.as_of;
      auto request = std::make_shared<VerifyRequest>();
      request->request_id = id;
      request->volume = static_cast<uint32_t>(v);
      request->offset = offset;
      request->region_size = rs;
      Bytes buffer;
      Bytes* bp = &buffer;
      VerifyRequest* rp = request.get();
      std::shared_ptr<VerifyRequest>* keep = &request;
      ReplicationGroup* grp = &group_;
      Link* self = this;
      Status s = co_await group_.io().Run(
          [vol, bp, rp, keep, grp, self, offset, length, rs, as_of_out] {
            return vol->ReadForResync(offset, length, *bp, [&](storage::WriteSeq as_of) {
              *as_of_out = as_of;
              for (uint64_t pos = 0; pos < length; pos += rs) {
                rp->digests.push_back(XXH3_64bits(bp->data() + pos, std::min(rs, length - pos)));
              }
              auto entry = std::make_shared<SealedGroup>();
              entry->verify = *keep;
              entry->opened = std::chrono::steady_clock::now();
              grp->DeliverVerify(self, entry);
            });
          });
      if (!s.ok()) {
        compare_.pending.erase(id);
        BR_LOG_ERROR("replication", "group {} link to {}: compare read of volume "
                     "{} at {}+{} failed: {}", group_.name(), config_.site,
                     vol->name(), offset, length, s.ToString());
        Break(*c, "compare read failed: " + s.message());
        failed = true;
        break;
      }
      if (disk_mode()) Wake(); else c->WakeAll();
    }
  }
  while (!c->broken && !compare_.pending.empty()) {
    co_await Nap(*c, std::chrono::steady_clock::now() + std::chrono::milliseconds(100));
  }
  compare_.running = false;
  compare_.pending.clear();
  compare_.finished = std::chrono::steady_clock::now();
  const bool complete = !c->broken && !failed;
  BR_LOG_INFO("replication", "group {} link to {}: digest compare {}: {} of {} "
              "region(s) compared, {} match ({} bytes not sent), {} differ ({} "
              "bytes to send)", group_.name(), config_.site,
              complete ? "finished" : "cut off (continues at the next connect)",
              compare_.regions_done, compare_.regions_total, compare_.matched_regions,
              compare_.matched_bytes, compare_.differing_regions,
              compare_.differing_bytes);
  co_return complete;
}

}  // namespace blockrelay::replication
