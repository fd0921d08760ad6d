#include "replication/replication_group.h"

#include <algorithm>
#include <thread>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/dispatch.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/post.hpp>
#include <asio/use_awaitable.hpp>
#include <fmt/format.h>

#include "blockrelay/core/reply_batch.h"
#include "replication/generations.h"
#include "replication/link.h"
#include "util/logging.h"

namespace blockrelay::replication {

namespace {
constexpr auto kAsTuple = asio::experimental::as_tuple(asio::use_awaitable);
constexpr auto kWaiterPoll = std::chrono::milliseconds(50);

OpType ToOpType(core::CapturedOp op) {
  switch (op) {
    case core::CapturedOp::kWrite: return OpType::kWrite;
    case core::CapturedOp::kTrim: return OpType::kTrim;
    case core::CapturedOp::kZero: return OpType::kZero;
  }
  return OpType::kWrite;
}
}  // namespace

ReplicationGroup::ReplicationGroup(
    asio::io_context& ctx, core::IoExecutor& io, std::string local_site,
    const config::GroupConfig& config,
    std::vector<std::shared_ptr<core::Volume>> volumes)
    : ctx_(ctx), io_(io), local_site_(std::move(local_site)), config_(config),
      volumes_(std::move(volumes)) {
  uint32_t interval_ms = 0;
  for (const auto& d : config_.downstream) {
    links_.push_back(std::make_unique<Link>(*this, d));
    if (d.mode == config::LinkMode::kSync) has_sync_links_ = true;
    else if (d.max_lag_bytes || d.max_lag_ms) has_max_lag_ = true;
    else interval_ms = interval_ms ? std::min(interval_ms, d.group_interval_ms)
                                   : d.group_interval_ms;
  }
  group_interval_ = std::chrono::milliseconds(interval_ms ? interval_ms : 10);
  // Group numbers keep growing across restarts (a downstream reports the
  // last one it applied, and a disk queue skips what it has): start from
  // the wall clock in microseconds, which no earlier run can have reached
  // unless it sealed more than a million groups a second.
  next_seq_ = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(
          std::chrono::system_clock::now().time_since_epoch()).count());
  open_.Open(next_seq_);
  for (size_t i = 0; i < volumes_.size(); ++i) {
    volumes_[i]->AttachReplication(this, static_cast<uint32_t>(i));
  }
}

ReplicationGroup::~ReplicationGroup() = default;

Status ReplicationGroup::OpenDiskQueues(const std::string& data_dir) {
  for (auto& link : links_) {
    if (link->config().queue != config::QueueKind::kDisk) continue;
    if (Status s = link->OpenDiskQueue(data_dir); !s.ok()) return s;
  }
  return Status::OK();
}

Status ReplicationGroup::OpenChecksumSyncs(const std::string& data_dir,
                                           const std::set<std::string>& new_slot_sites) {
  for (auto& link : links_) {
    const bool added = new_slot_sites.count(link->site()) != 0;
    if (Status s = link->OpenChecksumSync(data_dir, added); !s.ok()) {
      return s.WithContext(fmt::format("group {} link to {}", name(), link->site()));
    }
  }
  return Status::OK();
}

void ReplicationGroup::Start() {
  seal_timer_.emplace(ctx_);
  waiter_timer_.emplace(ctx_);
  asio::co_spawn(ctx_, SealLoop(), asio::detached);
  for (auto& link : links_) link->Start();
}

void ReplicationGroup::EnsureSeqAbove(uint64_t seq) {
  std::lock_guard lock(mu_);
  if (next_seq_ <= seq && open_.empty()) {
    next_seq_ = seq + 1;
    open_.Open(next_seq_);
  }
}

asio::awaitable<void> ReplicationGroup::Stop() {
  // What is captured goes to the links (a disk queue keeps it).
  SealNow();
  stopping_ = true;
  if (seal_timer_) seal_timer_->cancel();
  if (waiter_timer_) waiter_timer_->cancel();
  for (auto& link : links_) co_await link->Stop();
  // A new generation being started must be durable before a demote lets
  // a new primary compare generations with this site.
  asio::steady_timer bump_wait(ctx_);
  while (bumps_in_flight_.load() > 0) {
    bump_wait.expires_after(std::chrono::milliseconds(5));
    co_await bump_wait.async_wait(asio::experimental::as_tuple(asio::use_awaitable));
  }
  // Replies still waiting: their writes are local and dirty in the
  // scoreboard; the site is going away, so let them go with the policy's
  // answer for a link that is down.
  CheckWaiters();
  for (auto& w : waiters_) {
    w.done(Status::Aborted("site is shutting down before the sync "
                           "downstream acknowledged the write"));
  }
  waiters_.clear();
}

core::ReplicationSink::Ticket ReplicationGroup::Captured(
    uint32_t volume, core::CapturedOp op, uint64_t offset, uint64_t length,
    std::span<const std::byte> data, storage::WriteSeq wseq, bool fua) {
  if (bump_armed_.load(std::memory_order_relaxed) && bump_armed_.exchange(false) &&
      streaming_count_.load() < static_cast<int>(links_.size())) {
    ++bumps_in_flight_;
    asio::co_spawn(ctx_, BumpGeneration(), asio::detached);
  }
  Ticket ticket;
  bool wake = false;
  bool wake_links = false;
  {
    std::lock_guard lock(mu_);
    ticket = open_.seq();
    // With no link streaming nothing is kept: the scoreboard bits (set
    // before the write) bring these bytes over at the next resync.
    if (streaming_count_.load() == 0) return ticket;
    const bool first = open_.empty();
    open_.Add(ToOpType(op), volume, offset, length, data, wseq);
    if (fua) open_.MarkDurable();
    if (sync_streaming_.load() > 0 && applying_.load() == 0) {
      if (!SyncGroupInFlight() || open_.data_bytes() >= kMaxGroupDataBytes) {
        // A sync link's writer is waiting for exactly this: seal here and
        // spare the reply a hop through the sealer.
        SealLocked();
        wake_links = true;
      }
      // Otherwise SyncAcknowledged() seals it with whatever else arrives
      // before the downstream acknowledges the group in flight.
    } else {
      wake = first || fua || open_.data_bytes() >= kMaxGroupDataBytes;
    }
  }
  if (wake_links) WakeLinks();
  if (wake) WakeSealer();
  return ticket;
}

core::ReplicationSink::Ticket ReplicationGroup::Flushed() {
  Ticket ticket;
  {
    std::lock_guard lock(mu_);
    ticket = open_.seq();
    if (streaming_count_.load() == 0) return ticket;
    open_.MarkDurable();
  }
  WakeSealer();
  return ticket;
}

void ReplicationGroup::EndApply() {
  if (--applying_ == 0) WakeSealer();
}

void ReplicationGroup::WakeLinks() {
  if (links_woken_.exchange(true)) return;
  // On the network thread (a write carried out inline) the writers are
  // woken at once, so the frame leaves before the session reads on.
  asio::dispatch(ctx_, [this] {
    links_woken_.store(false);
    for (auto& link : links_) link->Wake();
  });
}

void ReplicationGroup::WakeSealer() {
  if (sealer_woken_.exchange(true)) return;
  asio::post(ctx_, [this] {
    sealer_woken_.store(false);
    if (seal_timer_) seal_timer_->cancel();
  });
}

asio::awaitable<void> ReplicationGroup::SealLoop() {
  while (!stopping_) {
    std::chrono::steady_clock::time_point deadline =
        std::chrono::steady_clock::time_point::max();
    {
      std::lock_guard lock(mu_);
      if (!open_.empty() || open_.durable()) {
        const bool now = open_.durable() ||
                         (sync_streaming_.load() > 0 && !SyncGroupInFlight()) ||
                         open_.data_bytes() >= kMaxGroupDataBytes ||
                         std::chrono::steady_clock::now() >=
                             open_.opened() + group_interval_;
        if (applying_.load() > 0) {
          // An upstream group is being applied: wait for EndApply().
        } else if (now) {
          SealLocked();
        } else {
          deadline = open_.opened() + group_interval_;
        }
      }
    }
    for (auto& link : links_) link->Wake();
    seal_timer_->expires_at(deadline);
    co_await seal_timer_->async_wait(kAsTuple);
  }
}

void ReplicationGroup::SealLocked() {
  if (open_.empty() && !open_.durable()) return;
  if (sync_streaming_.load() > 0) sync_sealed_seq_.store(open_.seq());
  auto sealed = open_.Seal();
  open_.Open(++next_seq_);
  for (Link* link : streaming_) link->DeliverLocked(sealed);
}

void ReplicationGroup::SealNow() {
  std::lock_guard lock(mu_);
  if (applying_.load() == 0) SealLocked();
}

bool ReplicationGroup::OpenGroupEmpty() {
  std::lock_guard lock(mu_);
  return open_.empty() && !open_.durable();
}

void ReplicationGroup::DeliverVerify(Link* link,
                                     std::shared_ptr<const SealedGroup> request) {
  // The request must follow every write captured so far, also those still
  // in the open group: seal it first. Not while an upstream group is being
  // applied (that would split it across two of our groups); wait for it.
  for (;;) {
    {
      std::lock_guard lock(mu_);
      if (applying_.load() == 0) {
        SealLocked();
        link->DeliverLocked(std::move(request));
        return;
      }
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

void ReplicationGroup::DeliverResync(Link* link,
                                     std::shared_ptr<const SealedGroup> data) {
  std::lock_guard lock(mu_);
  link->DeliverLocked(std::move(data));
}

uint64_t ReplicationGroup::StartStreaming(Link* link) {
  std::lock_guard lock(mu_);
  // Groups sealed from now on go to `link`. What is in the open group now
  // goes only to the links already streaming; `link` gets those bytes from
  // its resync, because their scoreboard bits are set.
  if (!open_.empty() || open_.durable()) {
    SealLocked();
  } else {
    open_.Open(++next_seq_);
  }
  streaming_.push_back(link);
  ++streaming_count_;
  if (link->is_sync()) ++sync_streaming_;
  return next_seq_;
}

void ReplicationGroup::StopStreaming(Link* link) {
  std::lock_guard lock(mu_);
  auto it = std::find(streaming_.begin(), streaming_.end(), link);
  if (it == streaming_.end()) return;
  streaming_.erase(it);
  --streaming_count_;
  if (link->is_sync()) --sync_streaming_;
  if (link->is_sync()) asio::post(ctx_, [this] { SyncAcknowledged(); });
}

void ReplicationGroup::UpdateSyncAcked() {
  uint64_t acked = UINT64_MAX;
  for (const auto& l : links_) {
    if (l->is_sync() && l->streaming()) {
      acked = std::min(acked, l->acked_group_seq(/*durable=*/false));
    }
  }
  sync_acked_seq_.store(acked);
}

void ReplicationGroup::SyncAcknowledged() {
  UpdateSyncAcked();
  bool sealed = false;
  {
    std::lock_guard lock(mu_);
    if (applying_.load() == 0 && !SyncGroupInFlight() &&
        (!open_.empty() || open_.durable())) {
      SealLocked();
      sealed = true;
    }
  }
  if (sealed) {
    for (auto& link : links_) link->Wake();
  }
}

void ReplicationGroup::WhenAcknowledged(Ticket ticket, bool durable,
                                        std::function<void(Status)> done) {
  asio::dispatch(ctx_, [this, ticket, durable, done = std::move(done)]() mutable {
    Waiter w{ticket, durable, std::move(done),
             std::chrono::steady_clock::now() +
                 std::chrono::milliseconds(config_.sync_timeout_ms)};
    if (auto outcome = WaiterOutcome(w)) {
      w.done(*outcome);
      return;
    }
    waiters_.push_back(std::move(w));
    // Only "block" waiters have a deadline to watch; the others are
    // answered by acknowledgements and link state changes alone. One poll
    // loop at most: two would cancel each other's timer wait in turn.
    if (config_.on_sync_failure == config::OnSyncFailure::kBlock &&
        !waiter_loop_running_ && waiter_timer_) {
      waiter_loop_running_ = true;
      asio::co_spawn(
          ctx_,
          [this]() -> asio::awaitable<void> {
            while (!waiters_.empty() && !stopping_) {
              waiter_timer_->expires_after(kWaiterPoll);
              co_await waiter_timer_->async_wait(kAsTuple);
              CheckWaiters();
            }
            waiter_loop_running_ = false;
          },
          asio::detached);
    }
  });
}

std::optional<Status> ReplicationGroup::WaiterOutcome(const Waiter& w) const {
  const bool block = config_.on_sync_failure == config::OnSyncFailure::kBlock;
  for (const auto& link : links_) {
    if (!link->is_sync()) {
      // max_lag: a streaming async link too far behind slows the writers
      // (their replies wait) until its downstream catches up.
      if (link->streaming() && link->LagExceeded()) return std::nullopt;
      continue;
    }
    const bool streamed = link->streaming() && w.ticket >= link->stream_start_seq();
    if (streamed) {
      if (link->acked_group_seq(w.durable) >= w.ticket) continue;
      return std::nullopt;
    }
    // The link did not carry this write: it was down (logging) when the
    // write was made, or is down now.
    if (!block) continue;  // on_sync_failure "logging": go on without it
    if (link->state() == LinkState::kReplicating) {
      continue;  // a finished resync brought it over (durably)
    }
    if (std::chrono::steady_clock::now() >= w.deadline) {
      return Status::IOError(
          fmt::format("group {}: sync downstream {} did not acknowledge the "
                      "write within sync_timeout ({} ms); on_sync_failure is "
                      "\"block\"", config_.name, link->site(),
                      config_.sync_timeout_ms),
          EIO);
    }
    return std::nullopt;
  }
  return Status::OK();
}

void ReplicationGroup::CheckWaiters() {
  if (waiters_.empty()) return;
  std::vector<Waiter> still;
  std::vector<std::pair<std::function<void(Status)>, Status>> ready;
  for (auto& w : waiters_) {
    if (auto outcome = WaiterOutcome(w)) {
      ready.emplace_back(std::move(w.done), std::move(*outcome));
    } else {
      still.push_back(std::move(w));
    }
  }
  waiters_ = std::move(still);
  // One acknowledgement often releases many writes of one connection:
  // their replies leave in one send.
  core::ReplyBatch batch;
  for (auto& [done, status] : ready) done(std::move(status));
}

Link* ReplicationGroup::FindLink(const std::string& site) const {
  for (const auto& l : links_) {
    if (l->site() == site) return l.get();
  }
  return nullptr;
}

nlohmann::json ReplicationGroup::LinksJson() const {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& l : links_) out.push_back(l->Json());
  return out;
}

Result<bool> ReplicationGroup::CaughtUp(const std::optional<std::string>& site) {
  bool all = true;
  bool found = !site;
  for (const auto& l : links_) {
    if (site && l->site() != *site) continue;
    found = true;
    if (!l->CaughtUp()) all = false;
  }
  if (!found) {
    return Status::NotFound(fmt::format(
        "group {} has no downstream link to site \"{}\"", config_.name, *site));
  }
  if (all && !OpenGroupEmpty()) all = false;
  return all;
}

asio::awaitable<void> ReplicationGroup::BumpGeneration() {
  const auto* volumes = &volumes_;
  std::string name, encoded;
  std::string* name_out = &name;
  std::string* encoded_out = &encoded;
  Status s = co_await io_.Run([volumes, name_out, encoded_out] {
    auto old = GroupGenerations(*volumes);
    if (!old) return Status::OK();
    GenerationSet next;
    next.current = storage::Generation{storage::Uuid::Random(), old->current.counter + 1};
    next.history = old->history;
    next.history.insert(next.history.begin(), old->current);
    *name_out = GenerationName(next.current);
    *encoded_out = EncodeGenerations(next);
    return SetGroupGenerations(*volumes, next);
  });
  if (!s.ok()) {
    BR_LOG_ERROR("replication", "group {}: cannot start a new generation: {}",
                 config_.name, s.ToString());
  } else if (!name.empty()) {
    BR_LOG_INFO("replication", "group {}: written while a downstream link is "
                "down: new generation {}", config_.name, name);
    ++generation_epoch_;
    for (auto& link : links_) link->GenerationChanged(encoded);
  }
  --bumps_in_flight_;
}

}  // namespace blockrelay::replication
