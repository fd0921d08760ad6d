#include "site/site.h"

#include <unistd.h>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/use_awaitable.hpp>
#include <fmt/format.h>

#include "util/logging.h"

namespace blockrelay::site {

Site::Site(config::SiteConfig config, asio::io_context& ctx)
    : config_(std::move(config)), ctx_(ctx),
      started_(std::chrono::steady_clock::now()) {}

Site::~Site() = default;

Result<std::unique_ptr<Site>> Site::Open(config::SiteConfig config,
                                         asio::io_context& ctx) {
  std::unique_ptr<Site> site(new Site(std::move(config), ctx));
  // CheckSiteEnvironment() accepted missing directories whose parent is
  // writable; create them now.
  std::vector<std::pair<std::string, std::filesystem::path>> dirs = {
      {"data_dir", site->config_.data_dir},
      {"control_socket", site->config_.control_socket.parent_path()}};
  if (site->config_.nbd.unix_socket) {
    dirs.push_back({"nbd.unix_socket", site->config_.nbd.unix_socket->parent_path()});
  }
  for (const auto& group : site->config_.groups) {
    for (const auto& vc : group.volumes) {
      dirs.push_back({"volume " + vc.name, vc.path.parent_path()});
    }
  }
  for (const auto& [what, dir] : dirs) {
    std::error_code ec;
    if (dir.empty()) continue;
    std::filesystem::create_directories(dir, ec);
    if (ec) {
      return Status::IOError(fmt::format("{}: cannot create directory {}: {}",
                                         what, dir.string(), ec.message()));
    }
  }
  // One process per data_dir: two would corrupt each other's metadata.
  auto lock = io::LockDataDir(io::Env::Default(), site->config_.data_dir.string());
  if (!lock.ok()) return lock.status().WithContext("data_dir");
  site->lock_.emplace(std::move(lock).value());

  for (size_t g = 0; g < site->config_.groups.size(); ++g) {
    const auto& group = site->config_.groups[g];
    bool read_only = group.role == config::Role::kSecondary;
    for (size_t v = 0; v < group.volumes.size(); ++v) {
      const auto& vc = group.volumes[v];
      storage::FileBlockStoreOptions options;
      options.path = vc.path;
      options.size_bytes = vc.size_bytes;
      auto store = storage::OpenFileBlockStore(options);
      if (!store.ok()) {
        return store.status().WithContext(
            fmt::format("groups[{}].volumes[{}] ({})", g, v, vc.name));
      }
      storage::BlockStore* raw_store = store->get();
      storage::VolumeMetadataOptions mo;
      mo.data_dir = site->config_.data_dir.string();
      mo.group = group.name;
      mo.volume = vc.name;
      mo.size_bytes = raw_store->size_bytes();
      mo.region_size_bytes = group.region_size_bytes;
      mo.backing_path = vc.path.string();
      for (const auto& d : group.downstream) {
        mo.downstream.push_back(
            {d.site, d.initial_sync == config::InitialSync::kNone});
      }
      mo.flush_backing = [raw_store] { return raw_store->Flush(); };
      auto metadata = storage::VolumeMetadata::Open(mo);
      if (!metadata.ok()) {
        return metadata.status().WithContext(
            fmt::format("groups[{}].volumes[{}] ({}) metadata", g, v, vc.name));
      }
      for (const auto& notice : (*metadata)->open_notices()) {
        BR_LOG_INFO("site", "volume {}: {}", vc.name, notice);
      }
      site->catalog_.Add(std::make_shared<core::Volume>(
          group.name, vc.name, std::move(store).value(),
          std::move(metadata).value(), read_only));
    }
  }
  site->io_ = std::make_unique<core::IoExecutor>(site->config_.nbd.io_threads);
  return site;
}

Status Site::Start() {
  nbd_server_ = std::make_unique<nbd::Server>(ctx_, catalog_, *io_);
  if (Status s = nbd_server_->Listen(config_.nbd); !s.ok()) return s;
  control_server_ = std::make_unique<control::ControlServer>(
      ctx_, [this](const nlohmann::json& r) { return HandleControl(r); });
  if (Status s = control_server_->Listen(config_.control_socket); !s.ok()) {
    return s;
  }
  nbd_server_->Start();
  control_server_->Start();
  flush_timer_.emplace(ctx_);
  asio::co_spawn(ctx_, FlushScoreboardsPeriodically(), asio::detached);
  std::string where;
  if (config_.nbd.unix_socket) where += config_.nbd.unix_socket->string();
  if (auto tcp = nbd_server_->tcp_endpoint()) {
    where += (where.empty() ? "" : " and ") + *tcp;
  }
  BR_LOG_INFO("site", "site {} serving {} volume(s) over NBD on {}; control "
              "socket {}", config_.site, catalog_.volumes().size(), where,
              config_.control_socket.string());
  return Status::OK();
}

asio::awaitable<Status> Site::Shutdown() {
  stopping_ = true;
  if (flush_timer_) flush_timer_->cancel();
  if (control_server_) control_server_->Stop();
  if (nbd_server_) co_await nbd_server_->Shutdown();
  // No request is in flight now: flush every volume, then close its
  // metadata cleanly so the next start need not merge the intent log.
  Status first_error;
  for (const auto& volume : catalog_.volumes()) {
    core::Volume* v = volume.get();
    Status s = co_await io_->Run([v] { return v->Close(); });
    if (!s.ok()) {
      BR_LOG_ERROR("site", "closing volume {} at shutdown failed: {}",
                   volume->name(), s.ToString());
      if (first_error.ok()) first_error = s;
    }
  }
  co_return first_error;
}

asio::awaitable<void> Site::FlushScoreboardsPeriodically() {
  constexpr auto kScoreboardFlushInterval = std::chrono::seconds(5);
  while (!stopping_) {
    flush_timer_->expires_after(kScoreboardFlushInterval);
    auto [ec] = co_await flush_timer_->async_wait(
        asio::experimental::as_tuple(asio::use_awaitable));
    if (ec || stopping_) co_return;
    for (const auto& volume : catalog_.volumes()) {
      core::Volume* v = volume.get();
      Status s = co_await io_->Run([v] { return v->FlushScoreboard(); });
      if (!s.ok()) {
        BR_LOG_ERROR("site", "volume {}: scoreboard flush failed: {}",
                     volume->name(), s.ToString());
      }
    }
  }
}

nlohmann::json Site::StatusJson() const {
  using nlohmann::json;
  json groups = json::array();
  for (const auto& group : config_.groups) {
    json volumes = json::array();
    for (const auto& vc : group.volumes) {
      auto v = catalog_.FindVolume(vc.name);
      if (!v) continue;
      auto c = v->counters();
      json vol = {
          {"name", v->name()},
          {"size_bytes", v->size_bytes()},
          {"role", config::ToString(group.role)},
          {"read_only", v->read_only()},
          {"backing", v->backing()},
          {"nbd_clients", v->nbd_clients()},
          {"bytes_read", c.bytes_read},
          {"bytes_written", c.bytes_written},
          {"reads", c.reads},
          {"writes", c.writes},
          {"flushes", c.flushes},
          {"errors", c.errors},
      };
      if (auto err = v->sticky_error()) vol["error"] = err->message();
      // Replication is not running yet: every link is in logging mode, its
      // scoreboard slot collecting the regions the downstream lacks.
      json vol_links = json::array();
      if (const auto* sb = v->scoreboard()) {
        if (Status h = sb->health(); !h.ok()) vol["error"] = h.message();
        for (const auto& slot : sb->slots()) {
          auto st = sb->StatsForSlot(slot.slot);
          const config::DownstreamConfig* dc = nullptr;
          for (const auto& d : group.downstream) {
            if (d.site == slot.site) dc = &d;
          }
          vol_links.push_back(
              {{"site", slot.site},
               {"mode", dc ? config::ToString(dc->mode) : "unknown"},
               {"state", "logging"},
               {"dirty_regions", st.dirty_regions},
               {"dirty_bytes", st.dirty_bytes}});
        }
        vol["intent_extents_in_use"] = sb->Stats().intent_extents_in_use;
      }
      vol["links"] = std::move(vol_links);
      volumes.push_back(std::move(vol));
    }
    json links = json::array();
    for (const auto& d : group.downstream) {
      links.push_back({{"site", d.site},
                       {"address", d.address.ToString()},
                       {"mode", config::ToString(d.mode)}});
    }
    groups.push_back({{"name", group.name},
                      {"role", config::ToString(group.role)},
                      {"region_size_bytes", group.region_size_bytes},
                      {"volumes", std::move(volumes)},
                      {"downstream", std::move(links)}});
  }
  auto uptime = std::chrono::duration_cast<std::chrono::seconds>(
                    std::chrono::steady_clock::now() - started_).count();
  return {{"site", config_.site},
          {"version", BLOCKRELAY_VERSION},
          {"pid", ::getpid()},
          {"uptime_seconds", uptime},
          {"nbd_connections", nbd_server_ ? nbd_server_->session_count() : 0},
          {"groups", std::move(groups)}};
}

asio::awaitable<nlohmann::json> Site::HandleControl(
    const nlohmann::json& request) {
  const std::string command = request["command"].get<std::string>();
  if (command == "status") {
    co_return StatusJson();
  }
  if (command == "version") {
    co_return nlohmann::json{{"version", BLOCKRELAY_VERSION}};
  }
  co_return control::ErrorReply(fmt::format(
      "unknown command \"{}\"; known: status, version", command));
}

}  // namespace blockrelay::site
