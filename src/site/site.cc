#include "site/site.h"

#include <unistd.h>

#include <set>
#include <string>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/use_awaitable.hpp>
#include <fmt/format.h>

#include "blockrelay/core/event_loop.h"
#include "replication/generations.h"
#include "replication/link.h"
#include "util/logging.h"

namespace blockrelay::site {

Site::Site(config::SiteConfig config, asio::io_context& ctx)
    : config_(std::move(config)), ctx_(ctx),
      started_(std::chrono::steady_clock::now()) {}

Site::~Site() = default;

Result<std::unique_ptr<Site>> Site::Open(
    config::SiteConfig config, asio::io_context& ctx,
    const std::set<std::string>& accept_backing_change) {
  for (const std::string& name : accept_backing_change) {
    bool known = false;
    for (const auto& g : config.groups) {
      for (const auto& v : g.volumes) known = known || v.name == name;
    }
    if (!known) {
      return Status::InvalidArgument(fmt::format(
          "--accept-backing-change {}: the config has no volume of that name", name));
    }
  }
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
  bool any_secondary = false;
  bool may_become_secondary = false;
  for (size_t g = 0; g < site->config_.groups.size(); ++g) {
    const auto& group = site->config_.groups[g];
    // The persisted role wins over the config's once it exists.
    auto role = replication::GroupRole::Open(site->config_.data_dir.string(),
                                             group.name, group.role);
    if (!role.ok()) return role.status().WithContext(fmt::format("groups[{}]", g));
    const config::Role current = (*role)->Get().role;
    if (current != group.role) {
      BR_LOG_INFO("site", "group {}: {} (after a promote or demote; {} in the "
                  "config)", group.name, config::ToString(current),
                  config::ToString(group.role));
    }
    site->roles_.push_back(std::move(role).value());
    bool read_only = current == config::Role::kSecondary;
    any_secondary |= read_only;
    may_become_secondary |= !group.downstream.empty() || group.upstream.has_value();
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
      mo.accept_backing_change = accept_backing_change.count(vc.name) > 0;
      for (const auto& d : group.downstream) {
        mo.downstream.push_back(
            {d.site, d.initial_sync == config::InitialSync::kNone});
      }
      // A slot for the upstream too, so that after a promote this site
      // knows what the old primary misses. Created clean: whatever this
      // site holds came from there; a site that never synced is caught by
      // the generations instead (docs/replication.md).
      if (group.upstream && group.upstream->address) {
        mo.downstream.push_back({group.upstream->site, /*initial_sync_none=*/true});
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
    site->group_volumes_.push_back(group_volumes);
    auto onward = site->MakeReplicationGroup(g, current, new_slot_sites);
    if (!onward.ok()) return onward.status();
    targets.push_back({&group, group_volumes, current == config::Role::kSecondary
                                                  ? *onward : nullptr,
                       current == config::Role::kSecondary,
                       site->roles_.back().get()});
  }
  // A primary that may be demoted needs its receiver too (if it listens).
  if (any_secondary || (site->config_.replication.listen && may_become_secondary)) {
    auto receiver = replication::Receiver::Open(
        ctx, *site->io_, site->config_.site, site->config_.data_dir.string(),
        std::move(targets));
    if (!receiver.ok()) return receiver.status();
    site->receiver_ = std::move(receiver).value();
  }
  return site;
}

int Site::GroupIndex(const std::string& name) const {
  for (size_t g = 0; g < config_.groups.size(); ++g) {
    if (config_.groups[g].name == name) return static_cast<int>(g);
  }
  return -1;
}

std::vector<config::DownstreamConfig> Site::LinksFor(size_t g,
                                                     config::Role role) const {
  const auto& group = config_.groups[g];
  if (role == config::Role::kSecondary) {
    if (group.role == config::Role::kSecondary) return group.downstream;
    return {};
  }
  std::vector<config::DownstreamConfig> links = group.downstream;
  if (group.upstream && group.upstream->address) {
    // The reversed direction after a failover: asynchronous, so the new
    // primary never waits on the site that just failed.
    config::DownstreamConfig d;
    d.site = group.upstream->site;
    d.address = *group.upstream->address;
    d.mode = config::LinkMode::kAsync;
    links.push_back(d);
  }
  return links;
}

Result<replication::ReplicationGroup*> Site::MakeReplicationGroup(
    size_t g, config::Role role, const std::set<std::string>& new_slot_sites) {
  auto links = LinksFor(g, role);
  const auto& volumes = group_volumes_[g];
  if (links.empty()) {
    for (const auto& v : volumes) v->AttachReplication(nullptr, 0);
    return static_cast<replication::ReplicationGroup*>(nullptr);
  }
  config::GroupConfig effective = config_.groups[g];
  effective.downstream = std::move(links);
  auto rg = std::make_unique<replication::ReplicationGroup>(
      ctx_, *io_, config_.site, effective, volumes);
  // A promote started a generation already; a start-up did not.
  if (role == config::Role::kPrimary) rg->EnableGenerationBumps(/*armed=*/!started_once_);
  if (Status s = rg->OpenDiskQueues(config_.data_dir.string()); !s.ok()) return s;
  if (Status s = rg->OpenChecksumSyncs(config_.data_dir.string(), new_slot_sites);
      !s.ok()) {
    return s;
  }
  replication_.push_back(std::move(rg));
  return replication_.back().get();
}

asio::awaitable<void> Site::RetireReplicationGroup(const std::string& name) {
  for (auto it = replication_.begin(); it != replication_.end(); ++it) {
    if ((*it)->name() != name) continue;
    std::unique_ptr<replication::ReplicationGroup> rg = std::move(*it);
    replication_.erase(it);
    co_await rg->Stop();
    for (const auto& v : rg->volumes()) v->AttachReplication(nullptr, 0);
    retired_.push_back(std::move(rg));
    co_return;
  }
}

void Site::Run() {
  core::RunEventLoop(ctx_, *io_, std::chrono::microseconds(config_.nbd.poll_us));
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
    bool any_secondary = false;
    for (size_t g = 0; g < config_.groups.size(); ++g) {
      any_secondary |= RoleOf(g) == config::Role::kSecondary;
    }
    if (any_secondary && !config_.replication.listen) {
      return Status::InvalidArgument(
          "replication.listen: a site with a secondary group must listen for "
          "its upstream");
    }
    if (config_.replication.listen) {
      if (Status s = receiver_->Listen(*config_.replication.listen); !s.ok()) {
        return s;
      }
    }
  }
  started_once_ = true;
  nbd_server_->Start();
  control_server_->Start();
  if (receiver_) receiver_->Start();
  for (auto& g : replication_) g->Start();
  sweep_timer_.emplace(ctx_);
  asio::co_spawn(ctx_, SweepLinksPeriodically(), asio::detached);
  for (size_t g = 0; g < config_.groups.size(); ++g) {
    flush_timers_.push_back(std::make_unique<asio::steady_timer>(ctx_));
    asio::co_spawn(ctx_, FlushScoreboardsPeriodically(g), asio::detached);
  }
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
  for (auto& timer : flush_timers_) timer->cancel();
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

asio::awaitable<void> Site::FlushScoreboardsPeriodically(size_t g) {
  const auto interval =
      std::chrono::milliseconds(config_.groups[g].bitmap_flush_interval_ms);
  asio::steady_timer& timer = *flush_timers_[g];
  while (!stopping_) {
    timer.expires_after(interval);
    auto [ec] = co_await timer.async_wait(
        asio::experimental::as_tuple(asio::use_awaitable));
    if (ec || stopping_) co_return;
    for (const auto& volume : group_volumes_[g]) {
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
  if (request.contains("discard_local") && !request["discard_local"].is_boolean()) {
    co_return control::ErrorReply("resync: \"discard_local\" must be true or false");
  }
  if (request.value("discard_local", false)) {
    if (request.value("full", false)) {
      co_return control::ErrorReply(
          "resync: \"full\" and \"discard_local\" exclude each other (full is "
          "for this site's downstream links, discard_local for its upstream)");
    }
    co_return co_await DiscardLocalReply(request);
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

asio::awaitable<nlohmann::json> Site::PromoteReply(const nlohmann::json& request) {
  if (!request.contains("group") || !request["group"].is_string()) {
    co_return control::ErrorReply("promote: \"group\" (a string) is required");
  }
  if (request.contains("force") && !request["force"].is_boolean()) {
    co_return control::ErrorReply("promote: \"force\" must be true or false");
  }
  const std::string group = request["group"].get<std::string>();
  const bool force = request.value("force", false);
  const int gi = GroupIndex(group);
  if (gi < 0) {
    co_return control::ErrorReply(fmt::format("site {} has no group \"{}\"",
                                              config_.site, group));
  }
  const size_t g = static_cast<size_t>(gi);
  if (std::find(changing_role_.begin(), changing_role_.end(), group) !=
      changing_role_.end()) {
    co_return control::ErrorReply(fmt::format(
        "group {} is changing its role already; try again", group));
  }
  if (RoleOf(g) == config::Role::kPrimary) {
    co_return control::ErrorReply(fmt::format(
        "group {} is primary on site {} already", group, config_.site));
  }
  if (receiver_) {
    if (auto peer = receiver_->UpstreamPeer(group); peer && !force) {
      co_return control::ErrorReply(fmt::format(
          "group {}: upstream {} is connected and primary; promoting now would "
          "make two primaries. Demote it first (planned switchover), or use "
          "--force to drop it", group, *peer));
    }
  }
  changing_role_.push_back(group);
  struct Done {
    std::vector<std::string>& v;
    std::string name;
    ~Done() { v.erase(std::find(v.begin(), v.end(), name)); }
  } done{changing_role_, group};

  // No upstream may write from here on; what it sent is applied first.
  if (receiver_) {
    receiver_->SetRole(group, /*secondary=*/false, nullptr);
    Status s = co_await receiver_->DropUpstream(group);
    if (!s.ok()) {
      receiver_->SetRole(group, true, FindReplicationGroup(group));
      co_return control::ErrorReply(fmt::format(
          "promote {}: applying what the upstream sent failed: {}", group,
          s.message()));
    }
  }
  // A resync cut off by the failure left the volumes at no state the old
  // primary ever had: return to the last consistent one before they become
  // writable (docs/replication.md, "Consistent downstream during resync").
  replication::Receiver::RollbackOutcome rollback;
  if (receiver_) {
    auto rb = co_await receiver_->Rollback(group);
    if (!rb.ok() && rb.status().code() != Status::Code::kNotFound) {
      receiver_->SetRole(group, true, FindReplicationGroup(group));
      co_return control::ErrorReply(fmt::format(
          "promote {}: rolling back the unfinished resync failed, the group "
          "stays secondary: {}", group, rb.status().message()));
    }
    if (rb.ok()) rollback = *rb;
  }
  co_await RetireReplicationGroup(group);

  const auto& volumes = group_volumes_[g];
  replication::GroupRole* role = roles_[g].get();
  std::string new_generation;
  std::string* gen_out = &new_generation;
  const auto* vp = &volumes;
  const bool rolled_back = rollback.rolled_back;
  std::string old_upstream = role->Get().reconciled_with;
  if (old_upstream.empty() && config_.groups[g].upstream) {
    old_upstream = config_.groups[g].upstream->site;
  }
  const std::string* up = &old_upstream;
  Status s = co_await io_->Run([vp, role, gen_out, rolled_back, up] {
    const std::string& old_upstream = *up;
    const auto& volumes = *vp;
    // Writes from the old upstream need no tracking for it (it has them);
    // from now on this slot tracks what the old primary misses.
    const auto st = role->Get();
    if (!st.reconciled_with.empty()) {
      if (Status fs = replication::ForgetDirtyFor(volumes, st.reconciled_with); !fs.ok()) {
        return fs;
      }
    }
    // The rollback put back bytes the old primary had already overwritten
    // (the cut-off resync brought them) and the slots do not say which
    // regions those are on its side: it gets a full resync when it returns.
    if (rolled_back && !old_upstream.empty()) {
      if (Status ms = replication::MarkAllDirtyFor(volumes, old_upstream); !ms.ok()) {
        return ms;
      }
    }
    auto old = replication::GroupGenerations(volumes);
    if (old) {
      replication::GenerationSet next;
      next.current = storage::Generation{storage::Uuid::Random(), old->current.counter + 1};
      next.history = old->history;
      next.history.insert(next.history.begin(), old->current);
      if (Status gs = replication::SetGroupGenerations(volumes, next); !gs.ok()) return gs;
      *gen_out = replication::GenerationName(next.current);
    }
    return role->Update([](replication::GroupRoleState& r) {
      r.role = config::Role::kPrimary;
      r.fresh = false;
      r.discard_local.clear();
      r.reconciled_with.clear();
    });
  });
  if (!s.ok()) {
    // Still secondary on disk: take an upstream again.
    auto back = MakeReplicationGroup(g, config::Role::kSecondary);
    if (back.ok() && *back) (*back)->Start();
    if (receiver_) receiver_->SetRole(group, true, back.ok() ? *back : nullptr);
    co_return control::ErrorReply(fmt::format("promote {} failed: {}", group,
                                              s.message()));
  }
  // On the network thread: replication_ is only touched here. Opening a
  // disk queue blocks briefly.
  replication::ReplicationGroup* rg = nullptr;
  Status ms;
  if (auto made = MakeReplicationGroup(g, config::Role::kPrimary); made.ok()) {
    rg = *made;
  } else {
    ms = made.status();
  }
  if (!ms.ok()) {
    BR_LOG_ERROR("site", "group {}: promoted, but its links cannot start: {}",
                 group, ms.ToString());
  }
  if (rg) rg->Start();
  for (const auto& v : volumes) v->set_read_only(false);
  BR_LOG_INFO("site", "group {}: promoted to primary{}, generation {}; "
              "{} downstream link(s)", group, force ? " (forced)" : "",
              new_generation, rg ? rg->links().size() : 0);
  nlohmann::json links = rg ? rg->LinksJson() : nlohmann::json::array();
  nlohmann::json reply = {{"group", group}, {"role", "primary"},
                          {"generation", new_generation}, {"links", links},
                          {"rolled_back", rollback.rolled_back},
                          {"restored_bytes", rollback.restored_bytes}};
  if (!ms.ok()) reply["links_error"] = ms.message();
  co_return reply;
}

asio::awaitable<nlohmann::json> Site::DemoteReply(const nlohmann::json& request) {
  if (!request.contains("group") || !request["group"].is_string()) {
    co_return control::ErrorReply("demote: \"group\" (a string) is required");
  }
  const std::string group = request["group"].get<std::string>();
  const int gi = GroupIndex(group);
  if (gi < 0) {
    co_return control::ErrorReply(fmt::format("site {} has no group \"{}\"",
                                              config_.site, group));
  }
  const size_t g = static_cast<size_t>(gi);
  if (std::find(changing_role_.begin(), changing_role_.end(), group) !=
      changing_role_.end()) {
    co_return control::ErrorReply(fmt::format(
        "group {} is changing its role already; try again", group));
  }
  if (RoleOf(g) == config::Role::kSecondary) {
    co_return control::ErrorReply(fmt::format(
        "group {} is secondary on site {} already", group, config_.site));
  }
  if (!receiver_ || !config_.replication.listen) {
    co_return control::ErrorReply(fmt::format(
        "group {}: site {} has no replication.listen, so as a secondary no "
        "upstream could reach it; add \"replication\": {{\"listen\": ...}} to "
        "its config and restart first", group, config_.site));
  }
  changing_role_.push_back(group);
  struct Done {
    std::vector<std::string>& v;
    std::string name;
    ~Done() { v.erase(std::find(v.begin(), v.end(), name)); }
  } done{changing_role_, group};

  // New NBD writes fail from here on (read-only export); writes already
  // past that check finish, and their replies are answered when the links
  // stop (their data is local and dirty in the scoreboard).
  const auto& volumes = group_volumes_[g];
  for (const auto& v : volumes) v->set_read_only(true);
  co_await RetireReplicationGroup(group);
  replication::GroupRole* role = roles_[g].get();
  const auto* vp = &volumes;
  Status s = co_await io_->Run([vp, role] {
    for (const auto& v : *vp) {
      if (Status fs = v->Flush(); !fs.ok()) return fs;
      if (Status fs = v->FlushScoreboard(); !fs.ok()) return fs;
    }
    return role->Update([](replication::GroupRoleState& r) {
      r.role = config::Role::kSecondary;
      r.reconciled_with.clear();
    });
  });
  if (!s.ok()) {
    for (const auto& v : volumes) v->set_read_only(false);
    auto back = MakeReplicationGroup(g, config::Role::kPrimary);
    if (back.ok() && *back) (*back)->Start();
    co_return control::ErrorReply(fmt::format("demote {} failed: {}", group,
                                              s.message()));
  }
  // On the network thread: replication_ is only touched here. Opening a
  // disk queue blocks briefly.
  replication::ReplicationGroup* rg = nullptr;
  Status ms;
  if (auto made = MakeReplicationGroup(g, config::Role::kSecondary); made.ok()) {
    rg = *made;
  } else {
    ms = made.status();
  }
  if (rg) rg->Start();
  receiver_->SetRole(group, /*secondary=*/true, rg);
  BR_LOG_INFO("site", "group {}: demoted to secondary; read-only, waiting for "
              "an upstream", group);
  nlohmann::json reply = {{"group", group}, {"role", "secondary"}};
  if (!ms.ok()) reply["links_error"] = ms.message();
  co_return reply;
}

asio::awaitable<nlohmann::json> Site::DiscardLocalReply(const nlohmann::json& request) {
  const std::string group = request["group"].get<std::string>();
  const std::string link = request["link"].get<std::string>();
  const int gi = GroupIndex(group);
  if (gi < 0) {
    co_return control::ErrorReply(fmt::format("site {} has no group \"{}\"",
                                              config_.site, group));
  }
  const size_t g = static_cast<size_t>(gi);
  const auto& gc = config_.groups[g];
  bool known = gc.upstream && gc.upstream->site == link;
  for (const auto& d : gc.downstream) known |= d.site == link;
  if (!known) {
    co_return control::ErrorReply(fmt::format(
        "group {} on site {} neither has site \"{}\" as upstream nor lists it "
        "downstream, so it cannot take writes from it", group, config_.site, link));
  }
  if (RoleOf(g) != config::Role::kSecondary) {
    co_return control::ErrorReply(fmt::format(
        "group {} is primary on site {}: --discard-local drops this site's "
        "writes in favour of site {}'s, which needs this site secondary; run "
        "`blockrelay demote {}` first", group, config_.site, link, group));
  }
  replication::GroupRole* role = roles_[g].get();
  const std::string* lp = &link;
  Status s = co_await io_->Run([role, lp] {
    return role->Update([lp](replication::GroupRoleState& r) { r.discard_local = *lp; });
  });
  if (!s.ok()) co_return control::ErrorReply(s.message());
  BR_LOG_WARN("site", "group {}: the next connection from site {} may overwrite "
              "this site's own writes (resync --discard-local)", group, link);
  co_return nlohmann::json{{"group", group}, {"link", link},
                           {"discard_local", true}};
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
          {"role", config::ToString(RoleOf(static_cast<size_t>(GroupIndex(group.name))))},
          {"read_only", v->read_only()},
          {"backing", v->backing()},
          {"nbd_clients", v->nbd_clients()},
          {"bytes_read", c.bytes_read},
          {"bytes_written", c.bytes_written},
          {"reads", c.reads},
          {"writes", c.writes},
          {"flushes", c.flushes},
          {"errors", c.errors},
          {"inline_stalls", c.inline_stalls},
          {"inline_preempted", c.inline_preempted},
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
          // The slot for the upstream (docs/replication.md, "Scoreboard
          // slots for the upstream") has no link while this site is its
          // secondary: it tracks what that site would miss after a promote.
          // After a promote a link to the old upstream runs, and speaks
          // for the slot.
          const bool for_upstream =
              !dc && group.upstream && group.upstream->site == slot.site;
          auto* link = rg ? rg->FindLink(slot.site) : nullptr;
          vol_links.push_back(
              {{"site", slot.site},
               {"mode", dc     ? config::ToString(dc->mode)
                        : link ? (link->is_sync() ? "sync" : "async")
                        : for_upstream ? "upstream" : "unknown"},
               {"state", link ? replication::LinkStateName(link->state())
                         : for_upstream ? "tracking" : "logging"},
               {"dirty_regions", st.dirty_regions},
               {"dirty_bytes", st.dirty_bytes}});
        }
        // What DRBD's /proc/drbd shows as al: and bm:: how often writes
        // had to wait for the metadata file.
        const storage::ScoreboardStats stats = sb->Stats();
        vol["intent_extents_in_use"] = stats.intent_extents_in_use;
        vol["metadata"] = {{"syncs", stats.metadata_syncs},
                           {"intent_commits", stats.intent_commits},
                           {"readahead_commits", stats.readahead_commits},
                           {"evicted_extents", stats.evicted_extents},
                           {"direct_marks", stats.direct_marks}};
      }
      vol["links"] = std::move(vol_links);
      volumes.push_back(std::move(vol));
    }
    json links = json::array();
    auto* rg = FindReplicationGroup(group.name);
    if (rg) links = rg->LinksJson();
    const size_t gi = static_cast<size_t>(GroupIndex(group.name));
    const auto role_state = roles_[gi]->Get();
    json entry = {{"name", group.name},
                  {"role", config::ToString(role_state.role)},
                  {"configured_role", config::ToString(group.role)},
                  {"region_size_bytes", group.region_size_bytes},
                  {"volumes", std::move(volumes)},
                  {"downstream", std::move(links)}};
    if (auto gens = replication::GroupGenerations(group_volumes_[gi])) {
      entry["generation"] = replication::GenerationName(gens->current);
      json history = json::array();
      for (const auto& h : gens->history) history.push_back(replication::GenerationName(h));
      entry["generation_history"] = std::move(history);
    }
    if (!role_state.discard_local.empty()) {
      entry["discard_local"] = role_state.discard_local;
    }
    if (receiver_ && role_state.role == config::Role::kSecondary) {
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
  if (command == "promote") {
    co_return co_await PromoteReply(request);
  }
  if (command == "demote") {
    co_return co_await DemoteReply(request);
  }
  if (command == "version") {
    co_return nlohmann::json{{"version", BLOCKRELAY_VERSION}};
  }
  co_return control::ErrorReply(fmt::format(
      "unknown command \"{}\"; known: status, wait, pause, resume, resync, verify, verify_status, rollback, promote, demote, version", command));
}

}  // namespace blockrelay::site
