// Site: the composition root of a running blockrelay process.
//
// Opens every volume of the config (creating sparse backing files), then
// binds the NBD and control listeners and serves until Shutdown(). Owns the
// io_context-side objects; the IoExecutor threads do the blocking I/O.
//
// Executor rule: Start(), Shutdown() and StatusJson() run on the io_context
// thread.
#pragma once

#include <chrono>
#include <optional>
#include <set>
#include <memory>
#include <vector>

#include <asio/awaitable.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <nlohmann/json.hpp>

#include "blockrelay/config/site_config.h"
#include "blockrelay/core/io_executor.h"
#include "blockrelay/core/volume.h"
#include "blockrelay/io/data_dir_lock.h"
#include "blockrelay/status.h"
#include "control/control_server.h"
#include "nbd/server.h"
#include "nbd/volume_catalog.h"
#include "replication/group_role.h"
#include "replication/receiver.h"
#include "replication/replication_group.h"

namespace blockrelay::site {

class Site {
 public:
  // Opens the volumes; binds nothing yet. Errors name the volume and path.
  // `accept_backing_change`: names of volumes whose backing file or device
  // may differ from the one their metadata was made for (the operator says
  // it holds the same data: restored from a copy, moved, renumbered);
  // `blockrelay run --accept-backing-change NAME`.
  static Result<std::unique_ptr<Site>> Open(
      config::SiteConfig config, asio::io_context& ctx,
      const std::set<std::string>& accept_backing_change = {});
  ~Site();

  // Binds the NBD and control listeners and starts accepting.
  Status Start();

  // Runs the io_context on the calling thread (the network thread) until it
  // is stopped, polling for events as nbd.poll_us says (core/event_loop.h).
  void Run();

  // Stops accepting, finishes NBD requests in flight, flushes every volume.
  // Returns the first flush error, if any.
  asio::awaitable<Status> Shutdown();

  nlohmann::json StatusJson() const;

 private:
  Site(config::SiteConfig config, asio::io_context& ctx);
  asio::awaitable<nlohmann::json> HandleControl(const nlohmann::json& request);
  // Persists the scoreboard bitmaps of group `g`'s volumes every
  // bitmap_flush_interval of its config (see GroupConfig), until Shutdown.
  asio::awaitable<void> FlushScoreboardsPeriodically(size_t g);
  // Clears scoreboard bits of caught-up links and samples throughput.
  asio::awaitable<void> SweepLinksPeriodically();
  replication::ReplicationGroup* FindReplicationGroup(const std::string& name) const;
  nlohmann::json WaitReply(const nlohmann::json& request);
  nlohmann::json PauseReply(const nlohmann::json& request, bool pause);
  asio::awaitable<nlohmann::json> ResyncReply(const nlohmann::json& request);
  nlohmann::json VerifyReply(const nlohmann::json& request, bool start);
  asio::awaitable<nlohmann::json> RollbackReply(const nlohmann::json& request);
  asio::awaitable<nlohmann::json> PromoteReply(const nlohmann::json& request);
  asio::awaitable<nlohmann::json> DemoteReply(const nlohmann::json& request);
  asio::awaitable<nlohmann::json> DiscardLocalReply(const nlohmann::json& request);

  // Index of group `name` in config_.groups, or -1.
  int GroupIndex(const std::string& name) const;
  config::Role RoleOf(size_t g) const { return roles_[g]->Get().role; }
  // The links group `g` runs in `role`: as primary its downstream list plus
  // its upstream (if the upstream has an address: the failover reversal);
  // as secondary its downstream list when it was configured secondary (a
  // chain), none when it was configured primary (demoted after a failover,
  // it is the end of the line).
  std::vector<config::DownstreamConfig> LinksFor(size_t g, config::Role role) const;
  // Creates group `g`'s ReplicationGroup for `role` (null when it has no
  // links) and attaches its volumes; disk queues opened. Blocks (start-up
  // or a storage thread).
  // `new_slot_sites`: the sites whose slots this start created (they may
  // need a checksum compare; replication_group.h, OpenChecksumSyncs).
  Result<replication::ReplicationGroup*> MakeReplicationGroup(
      size_t g, config::Role role, const std::set<std::string>& new_slot_sites = {});
  // Stops and retires group `name`'s ReplicationGroup, if any; its volumes
  // are detached. Network thread.
  asio::awaitable<void> RetireReplicationGroup(const std::string& name);
  config::SiteConfig config_;
  std::optional<io::DataDirLock> lock_;
  asio::io_context& ctx_;
  std::unique_ptr<core::IoExecutor> io_;
  nbd::VolumeCatalog catalog_;
  std::unique_ptr<nbd::Server> nbd_server_;
  std::unique_ptr<control::ControlServer> control_server_;
  std::chrono::steady_clock::time_point started_;
  bool stopping_ = false;
  bool started_once_ = false;  // Start() ran: later groups come from promote
  // One per group of config_.groups, for FlushScoreboardsPeriodically.
  std::vector<std::unique_ptr<asio::steady_timer>> flush_timers_;
  std::optional<asio::steady_timer> sweep_timer_;
  // One per group with links in its current role.
  std::vector<std::unique_ptr<replication::ReplicationGroup>> replication_;
  // Stopped by promote/demote; kept so a write that was in flight then
  // still finds its sink alive.
  std::vector<std::unique_ptr<replication::ReplicationGroup>> retired_;
  // Per group of config_.groups: persisted role, volumes.
  std::vector<std::unique_ptr<replication::GroupRole>> roles_;
  std::vector<std::vector<std::shared_ptr<core::Volume>>> group_volumes_;
  // Groups in the middle of a promote or demote.
  std::vector<std::string> changing_role_;
  std::unique_ptr<replication::Receiver> receiver_;
};

}  // namespace blockrelay::site
