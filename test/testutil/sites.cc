#include "testutil/sites.h"

#include <signal.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <thread>

#include <catch2/catch.hpp>
#include <fmt/format.h>

namespace blockrelay::testutil {
namespace fs = std::filesystem;
using nlohmann::json;

json GroupSiteConfig(const fs::path& dir, const std::string& site,
                     const std::string& role,
                     const std::vector<VolumeSpec>& volumes,
                     const std::string& group,
                     const std::string& upstream_site) {
  json vols = json::array();
  for (const auto& v : volumes) {
    vols.push_back({{"name", v.name},
                    {"path", (dir / (v.name + ".img")).string()},
                    {"size", v.size_bytes}});
  }
  json g = {{"name", group}, {"role", role}, {"volumes", vols}};
  json config = {
      {"site", site},
      {"data_dir", (dir / "data").string()},
      {"control_socket", (dir / "control.sock").string()},
      {"nbd", {{"unix_socket", (dir / "nbd.sock").string()}}},
  };
  if (role == "secondary") {
    g["upstream"] = {{"site", upstream_site}};
    config["replication"] = {{"listen", "127.0.0.1:0"}};
  }
  config["groups"] = json::array({g});
  return config;
}

json& AddDownstream(json& config, const std::string& site, uint16_t port,
                    const std::string& mode) {
  json& group = config["groups"][0];
  if (!group.contains("downstream")) group["downstream"] = json::array();
  group["downstream"].push_back(
      {{"site", site},
       {"address", fmt::format("127.0.0.1:{}", port)},
       {"mode", mode}});
  return group["downstream"].back();
}

std::string ReadWholeFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string CompareFiles(const fs::path& x, const fs::path& y) {
  const std::string a = ReadWholeFile(x), b = ReadWholeFile(y);
  if (a == b) return "";
  if (a.size() != b.size()) {
    return fmt::format("{} has {} bytes, {} has {}", x.string(), a.size(),
                       y.string(), b.size());
  }
  size_t first = 0;
  while (first < a.size() && a[first] == b[first]) ++first;
  size_t last = a.size();
  while (last > first && a[last - 1] == b[last - 1]) --last;
  size_t differing = 0;
  for (size_t i = first; i < last; ++i) differing += a[i] != b[i];
  return fmt::format("{} and {} differ in {} byte(s) between offsets {} and "
                     "{}", x.string(), y.string(), differing, first, last);
}

uint64_t FileChecksum(const fs::path& path) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : ReadWholeFile(path)) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

std::optional<json> StatusOf(const TestDaemon& d) {
  auto reply = d.Control({{"command", "status"}});
  if (!reply.ok() || !reply->value("ok", false)) return std::nullopt;
  return *reply;
}

namespace {
const json* FindByKey(const json& array, const std::string& key,
                      const std::string& value) {
  if (!array.is_array()) return nullptr;
  for (const auto& e : array) {
    if (e.is_object() && e.value(key, "") == value) return &e;
  }
  return nullptr;
}

}  // namespace

std::optional<json> GroupStatus(const TestDaemon& d, const std::string& group) {
  auto status = StatusOf(d);
  if (!status || !status->contains("groups")) return std::nullopt;
  const json* g = FindByKey((*status)["groups"], "name", group);
  if (!g) return std::nullopt;
  return *g;
}

std::optional<json> LinkStatus(const TestDaemon& d, const std::string& group,
                               const std::string& site) {
  auto g = GroupStatus(d, group);
  if (!g || !g->contains("downstream")) return std::nullopt;
  const json* link = FindByKey((*g)["downstream"], "site", site);
  if (!link) return std::nullopt;
  return *link;
}

std::optional<json> UpstreamStatus(const TestDaemon& d,
                                   const std::string& group) {
  auto g = GroupStatus(d, group);
  if (!g || !g->contains("upstream")) return std::nullopt;
  return (*g)["upstream"];
}

std::optional<DirtyTotals> DirtyFor(const TestDaemon& d,
                                    const std::string& group,
                                    const std::string& site) {
  auto g = GroupStatus(d, group);
  if (!g || !g->contains("volumes")) return std::nullopt;
  DirtyTotals totals;
  bool found = false;
  for (const auto& v : (*g)["volumes"]) {
    if (!v.contains("links")) continue;
    const json* link = FindByKey(v["links"], "site", site);
    if (!link) continue;
    found = true;
    totals.regions += link->value("dirty_regions", uint64_t{0});
    totals.bytes += link->value("dirty_bytes", uint64_t{0});
  }
  if (!found) return std::nullopt;
  return totals;
}

bool WaitCaughtUp(const TestDaemon& d, const std::string& group,
                  const std::string& link, std::chrono::milliseconds timeout,
                  json* last) {
  json request = {{"command", "wait"}, {"group", group}};
  if (!link.empty()) request["link"] = link;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto reply = d.Control(request);
    if (reply.ok()) {
      if (last) *last = *reply;
      if (reply->value("caught_up", false)) return true;
    } else if (last) {
      *last = {{"control_error", reply.status().ToString()}};
    }
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

SitePair::SitePair(const PairOptions& options)
    : options_(options),
      root_("blockrelay-rep"),
      a_(root_.path() / "a",
         GroupSiteConfig(root_.path() / "a", "a", "primary", options.volumes,
                         options.group)),
      b_(root_.path() / "b",
         GroupSiteConfig(root_.path() / "b", "b", "secondary", options.volumes,
                         options.group, "a")) {
  fs::create_directories(root_.path() / "a");
  fs::create_directories(root_.path() / "b");
  json& link = AddDownstream(a_.config(), "b", 0, options_.mode);
  link["initial_sync"] = options_.initial_sync;
  link.update(options_.link);
}

fs::path SitePair::a_volume(const std::string& name) const {
  return a_.dir() / (name + ".img");
}

fs::path SitePair::b_volume(const std::string& name) const {
  return b_.dir() / (name + ".img");
}

Status SitePair::Start() {
  if (!b_.running()) {
    if (Status s = b_.Start(); !s.ok()) return s.WithContext("site b");
  }
  a_.config()["groups"][0]["downstream"][0]["address"] =
      fmt::format("127.0.0.1:{}", b_port());
  if (!a_.running()) {
    if (Status s = a_.Start(); !s.ok()) return s.WithContext("site a");
  }
  return Status::OK();
}

std::string SitePair::CompareVolumes() const {
  std::string out;
  for (const auto& v : options_.volumes) {
    std::string diff = CompareFiles(a_volume(v.name), b_volume(v.name));
    if (!diff.empty()) out += (out.empty() ? "" : "; ") + diff;
  }
  return out;
}

ProcessResult RunCli(const TestDaemon& d, std::vector<std::string> args,
                     std::chrono::milliseconds timeout) {
  args.push_back("--socket");
  args.push_back(d.control_socket().string());
  return RunBlockrelay(args, timeout);
}

void RequireStarted(SitePair& pair) {
  Status s = pair.Start();
  INFO(s.ToString());
  REQUIRE(s.ok());
}

void RequireStarted(TestDaemon& d) {
  Status s = d.Start();
  INFO(s.ToString());
  REQUIRE(s.ok());
}

void RequireKilled(TestDaemon& d) {
  REQUIRE(d.Signal(SIGKILL));
  REQUIRE(d.WaitForExit(std::chrono::seconds(10)).has_value());
}

void RequireCaughtUp(SitePair& pair, std::chrono::milliseconds timeout) {
  json last;
  bool caught_up =
      WaitCaughtUp(pair.a(), pair.options().group, "b", timeout, &last);
  INFO("last wait reply: " << last.dump());
  INFO("site a log:\n" << pair.a().ReadLog());
  INFO("site b log:\n" << pair.b().ReadLog());
  REQUIRE(caught_up);
}

json PairLink(const SitePair& pair) {
  auto link = LinkStatus(pair.a(), pair.options().group, "b");
  return link ? *link : json();
}

void RequireLink(const SitePair& pair, const std::string& what,
                 const std::function<bool(const json&)>& pred,
                 std::chrono::milliseconds timeout) {
  json last;
  bool ok = WaitUntil(
      [&] {
        last = PairLink(pair);
        return !last.is_null() && pred(last);
      },
      timeout);
  INFO("waiting for: " << what);
  INFO("last link status: " << last.dump());
  INFO("site a log:\n" << pair.a().ReadLog());
  REQUIRE(ok);
}

void CheckIdentical(const SitePair& pair) {
  for (const auto& v : pair.options().volumes) {
    INFO("volume " << v.name);
    CHECK(CompareFiles(pair.a_volume(v.name), pair.b_volume(v.name)) == "");
  }
}

NbdHandle RequireConnect(const TestDaemon& d, const std::string& export_name) {
  NbdOptions options;
  options.export_name = export_name;
  std::string error;
  NbdHandle h = ConnectUnix(*d.nbd_unix_socket(), options, &error);
  INFO("libnbd connecting to export " << export_name << ": " << error);
  REQUIRE(h != nullptr);
  return h;
}

}  // namespace blockrelay::testutil
