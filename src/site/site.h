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
#include "replication/receiver.h"
#include "replication/replication_group.h"

namespace blockrelay::site {

class Site {
 public:
  // Opens the volumes; binds nothing yet. Errors name the volume and path.
  static Result<std::unique_ptr<Site>> Open(config::SiteConfig config,
                                            asio::io_context& ctx);
  ~Site();

  // Binds the NBD and control listeners and starts accepting.
  Status Start();

  // Stops accepting, finishes NBD requests in flight, flushes every volume.
  // Returns the first flush error, if any.
  asio::awaitable<Status> Shutdown();

  nlohmann::json StatusJson() const;

 private:
  Site(config::SiteConfig config, asio::io_context& ctx);
  asio::awaitable<nlohmann::json> HandleControl(const nlohmann::json& request);
  // Persists scoreboard bitmaps every kScoreboardFlushInterval so a crash
  // recovers few intent extents.
  asio::awaitable<void> FlushScoreboardsPeriodically();
  // Clears scoreboard bits of caught-up links and samples throughput.
  asio::awaitable<void> SweepLinksPeriodically();
  replication::ReplicationGroup* FindReplicationGroup(const std::string& name) const;
  nlohmann::json WaitReply(const nlohmann::json& request);
  nlohmann::json PauseReply(const nlohmann::json& request, bool pause);
  asio::awaitable<nlohmann::json> ResyncReply(const nlohmann::json& request);
  nlohmann::json VerifyReply(const nlohmann::json& request, bool start);
  asio::awaitable<nlohmann::json> RollbackReply(const nlohmann::json& request);

  config::SiteConfig config_;
  std::optional<io::DataDirLock> lock_;
  asio::io_context& ctx_;
  std::unique_ptr<core::IoExecutor> io_;
  nbd::VolumeCatalog catalog_;
  std::unique_ptr<nbd::Server> nbd_server_;
  std::unique_ptr<control::ControlServer> control_server_;
  std::chrono::steady_clock::time_point started_;
  bool stopping_ = false;
  std::optional<asio::steady_timer> flush_timer_;
  std::optional<asio::steady_timer> sweep_timer_;
  // One per group with downstream links, in config order.
  std::vector<std::unique_ptr<replication::ReplicationGroup>> replication_;
  std::unique_ptr<replication::Receiver> receiver_;
};

}  // namespace blockrelay::site
