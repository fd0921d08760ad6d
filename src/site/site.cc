#include "site/site.h"

#include <unistd.h>

#include <set>
#include <string>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/use_awaitable.hpp>
#include <fmt/format.h>

#include "replication/link.h"
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

  site->io_ = std::make_unique<core::IoExecutor>(site->config_.nbd.io_threads);
  std::vector<replication::ReceiverTarget> targets;
  for (size_t g = 0; g < site->config_.groups.size(); ++g) {
    const auto& group = site->config_.groups[g];
    bool read_only = group.role == config::Role::kSecondary;
    std::vector<std::shared_ptr<core::Volume>> group_volumes;
    std::set<std::string> new_slot_sites;  // slots this start created
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
      for (const auto& slot : (*metadata)->slots()) {
        if (slot.added) new_slot_sites.insert(slot.site);
      }
      for (const auto& notice : (*metadata)->open_notices()) {
        BR_LOG_INFO("site", "volume {}: {}", vc.name, notice);
      }
      auto volume = std::make_shared<core::Volume>(
          group.name, vc.name, std::move(store).value(),
          std::move(metadata).value(), read_only);
      site->catalog_.Add(volume);
      group_volumes.push_back(std::move(volume));
    }
    replication::ReplicationGroup* onward = nullptr;
    if (!group.downstream.empty()) {
      site->replication_.push_back(std::make_unique<replication::ReplicationGroup>(
          ctx, *site->io_, site->config_.site, group, group_volumes));
      onward = site->replication_.back().get();
      if (Status s = onward->OpenDiskQueues(site->config_.data_dir.string()); !s.ok()) {
        return s;
      }
      if (Status s = onward->OpenChecksumSyncs(site->config_.data_dir.string(),
                                               new_slot_sites);
          !s.ok()) {
        return s;
      }
    }
    if (group.role == config::Role::kSecondary) {
      targets.push_back({&group, group_volumes, onward});
    }
  }
  if (!targets.empty()) {
    auto receiver = replication::Receiver::Open(
        ctx, *site->io_, site->config_.site, site->config_.data_dir.string(),
        std::move(targets));
    if (!receiver.ok()) return receiver.status();
    site->receiver_ = std::move(receiver).value();
  }
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
  if (receiver_) {
    if (!config_.replication.listen) {
      return Status::InvalidArgument(
          "replication.listen: a site with a secondary group must listen for "
          "its upstream");
    }
    if (Status s = receiver_->Listen(*config_.replication.listen); !s.ok()) {
      return s;
    }
  }
  nbd_server_->Start();
  control_server_->Start();
  if (receiver_) receiver_->Start();
  for (auto& g : replication_) g->Start();
  sweep_timer_.emplace(ctx_);
  asio::co_spawn(ctx_, SweepLinksPeriodically(), asio::detached);
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
  if (sweep_timer_) sweep_timer_->cancel();
  // NBD first: replies still waiting for a sync downstream need the links.
  if (nbd_server_) co_await nbd_server_->Shutdown();
  if (receiver_) co_await receiver_->Stop();
  for (auto& g : replication_) co_await g->Stop();
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

asio::awaitable<void> Site::SweepLinksPeriodically() {
  while (!stopping_) {
    sweep_timer_->expires_after(std::chrono::seconds(1));
    auto [ec] = co_await sweep_timer_->async_wait(
        asio::experimental::as_tuple(asio::use_awaitable));
    if (ec || stopping_) co_return;
    for (auto& g : replication_) {
      for (auto& link : g->links()) link->Sweep();
    }
  }
}

replication::ReplicationGroup* Site::FindReplicationGroup(
    const std::string& name) const {
  for (const auto& g : replication_) {
    if (g->name() == name) return g.get();
  }
  return nullptr;
}

nlohmann::json Site::WaitReply(const nlohmann::json& request) {
  if (!request.contains("group") || !request["group"].is_string()) {
    return control::ErrorReply("wait: \"group\" (a string) is required");
  }
  const std::string group = request["group"].get<std::string>();
  std::optional<std::string> link;
  if (request.contains("link")) {
    if (!request["link"].is_string()) {
      return control::ErrorReply("wait: \"link\" must be a string");
    }
    link = request["link"].get<std::string>();
  }
  const config::GroupConfig* gc = nullptr;
  for (const auto& g : config_.groups) {
    if (g.name == group) gc = &g;
  }
  if (!gc) {
    return control::ErrorReply(fmt::format(
        "site {} has no group \"{}\"{}", config_.site, group,
        link ? fmt::format(" (with a downstream link to site \"{}\")", *link) : ""));
  }
  auto* rg = FindReplicationGroup(group);
  if (!rg) {
    if (link) {
      return control::ErrorReply(fmt::format(
          "group {} has no downstream link to site \"{}\"", group, *link));
    }
    return {{"caught_up", true}, {"links", nlohmann::json::array()}};
  }
  auto caught_up = rg->CaughtUp(link);
  if (!caught_up.ok()) return control::ErrorReply(caught_up.status().message());
  return {{"caught_up", *caught_up}, {"links", rg->LinksJson()}};
}

nlohmann::json Site::PauseReply(const nlohmann::json& request, bool pause) {
  const char* what = pause ? "pause" : "resume";
  if (!request.contains("group") || !request["group"].is_string() ||
      !request.contains("link") || !request["link"].is_string()) {
    return control::ErrorReply(fmt::format(
        "{}: \"group\" and \"link\" (strings) are required", what));
  }
  const std::string group = request["group"].get<std::string>();
  const std::string link = request["link"].get<std::string>();
  auto* rg = FindReplicationGroup(group);
  replication::Link* l = rg ? rg->FindLink(link) : nullptr;
  if (!l) {
    return control::ErrorReply(fmt::format(
        "site {} has no group \"{}\" with a downstream link to site \"{}\"",
        config_.site, group, link));
  }
  if (pause) l->Pause(); else l->Resume();
  return {{"group", group}, {"link", link}, {"paused", l->paused()},
          {"state", replication::LinkStateName(l->state())}};
}

asio::awaitable<nlohmann::json> Site::ResyncReply(const nlohmann::json& request) {
  if (!request.contains("group") || !request["group"].is_string() ||
      !request.contains("link") || !request["link"].is_string()) {
    co_return control::ErrorReply(
        "resync: \"group\" and \"link\" (strings) are required");
  }
  if (request.contains("full") && !request["full"].is_boolean()) {
    co_return control::ErrorReply("resync: \"full\" must be true or false");
  }
  const std::string group = request["group"].get<std::string>();
  const std::string link = request["link"].get<std::string>();
  const bool full = request.value("full", false);
  auto* rg = FindReplicationGroup(group);
  replication::Link* l = rg ? rg->FindLink(link) : nullptr;
  if (!l) {
    co_return control::ErrorReply(fmt::format(
        "site {} has no group \"{}\" with a downstream link to site \"{}\"",
        config_.site, group, link));
  }
  Status s = co_await l->ForceResync(full);
  if (!s.ok()) co_return control::ErrorReply(s.message());
  co_return nlohmann::json{{"group", group}, {"link", link}, {"full", full},
                           {"state", replication::LinkStateName(l->state())}};
}

nlohmann::json Site::VerifyReply(const nlohmann::json& request, bool start) {
  const char* what = start ? "verify" : "verify_status";
  if (!request.contains("group") || !request["group"].is_string() ||
      !request.contains("link") || !request["link"].is_string()) {
    return control::ErrorReply(fmt::format(
        "{}: \"group\" and \"link\" (strings) are required", what));
  }
  if (request.contains("fix") && !request["fix"].is_boolean()) {
    return control::ErrorReply("verify: \"fix\" must be true or false");
  }
  const std::string group = request["group"].get<std::string>();
  const std::string link = request["link"].get<std::string>();
  auto* rg = FindReplicationGroup(group);
  replication::Link* l = rg ? rg->FindLink(link) : nullptr;
  if (!l) {
    return control::ErrorReply(fmt::format(
        "site {} has no group \"{}\" with a downstream link to site \"{}\"",
        config_.site, group, link));
  }
  if (start) {
    if (Status s = l->StartVerify(request.value("fix", false)); !s.ok()) {
      return control::ErrorReply(s.message());
    }
  }
  nlohmann::json j = l->VerifyJson();
  j["group"] = group;
  j["link"] = link;
  return j;
}

asio::awaitable<nlohmann::json> Site::RollbackReply(const nlohmann::json& request) {
  if (!request.contains("group") || !request["group"].is_string()) {
    co_return control::ErrorReply("rollback: \"group\" (a string) is required");
  }
  const std::string group = request["group"].get<std::string>();
  if (!receiver_ || !receiver_->Consistent(group)) {
    co_return control::ErrorReply(fmt::format(
        "site {} has no secondary group \"{}\"; rollback applies to a group "
        "that takes writes from an upstream", config_.site, group));
  }
  auto outcome = co_await receiver_->Rollback(group);
  if (!outcome.ok()) co_return control::ErrorReply(outcome.status().message());
  co_return nlohmann::json{{"group", group},
                           {"rolled_back", outcome->rolled_back},
                           {"restored_bytes", outcome->restored_bytes},
                           {"applied_group_seq", outcome->applied_group_seq},
                           {"consistent", true}};
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
      // A secondary's volumes are consistent together: one resync epoch
      // per group.
      if (receiver_) {
        if (auto consistent = receiver_->Consistent(group.name)) {
          vol["consistent"] = *consistent;
        }
      }
      json vol_links = json::array();
      auto* rg = FindReplicationGroup(group.name);
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
               {"state", rg && rg->FindLink(slot.site)
                             ? replication::LinkStateName(rg->FindLink(slot.site)->state())
                             : "logging"},
               {"dirty_regions", st.dirty_regions},
               {"dirty_bytes", st.dirty_bytes}});
        }
        vol["intent_extents_in_use"] = sb->Stats().intent_extents_in_use;
      }
      vol["links"] = std::move(vol_links);
      volumes.push_back(std::move(vol));
    }
    json links = json::array();
    auto* rg = FindReplicationGroup(group.name);
    if (rg) links = rg->LinksJson();
    json entry = {{"name", group.name},
                  {"role", config::ToString(group.role)},
                  {"region_size_bytes", group.region_size_bytes},
                  {"volumes", std::move(volumes)},
                  {"downstream", std::move(links)}};
    if (receiver_) {
      json up = receiver_->UpstreamJson(group.name);
      if (!up.is_null()) entry["upstream"] = std::move(up);
    }
    groups.push_back(std::move(entry));
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
  if (command == "wait") {
    co_return WaitReply(request);
  }
  if (command == "pause" || command == "resume") {
    co_return PauseReply(request, command == "pause");
  }
  if (command == "resync") {
    co_return co_await ResyncReply(request);
  }
  if (command == "verify" || command == "verify_status") {
    co_return VerifyReply(request, command == "verify");
  }
  if (command == "rollback") {
    co_return co_await RollbackReply(request);
  }
  if (command == "version") {
    co_return nlohmann::json{{"version", BLOCKRELAY_VERSION}};
  }
  co_return control::ErrorReply(fmt::format(
      "unknown command \"{}\"; known: status, wait, pause, resume, resync, verify, verify_status, rollback, version", command));
}

}  // namespace blockrelay::site
