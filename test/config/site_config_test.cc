#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <system_error>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "blockrelay/config/site_config.h"

namespace blockrelay::config {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Catch::Matchers::Contains;
using Catch::Matchers::EndsWith;
using Catch::Matchers::StartsWith;

const fs::path kBase = "/etc/blockrelay";

// The smallest document ParseSiteConfig() accepts.
json MinimalDoc() {
  return json::parse(R"({
    "site": "a",
    "data_dir": "/var/lib/blockrelay/a",
    "control_socket": "/run/blockrelay/a.sock",
    "nbd": {"unix_socket": "/run/blockrelay/a.nbd"},
    "groups": [{
      "name": "db",
      "volumes": [{"name": "data", "path": "/srv/data.img", "size": "1GiB"}]
    }]
  })");
}

// MinimalDoc() plus one downstream, for the downstream rules.
json DownstreamDoc() {
  json doc = MinimalDoc();
  doc["groups"][0]["downstream"] =
      json::array({{{"site", "b"}, {"address", "10.0.0.2:7800"}}});
  return doc;
}

// MinimalDoc() as a secondary of site "z".
json SecondaryDoc() {
  json doc = MinimalDoc();
  doc["replication"] = {{"listen", "0.0.0.0:7800"}};
  doc["groups"][0]["role"] = "secondary";
  doc["groups"][0]["upstream"] = {{"site", "z"}, {"address", "10.0.0.9:7800"}};
  return doc;
}

SiteConfig ParseOk(const json& doc, const fs::path& base = kBase) {
  Result<SiteConfig> r = ParseSiteConfig(doc, base);
  INFO((r.ok() ? std::string() : r.status().message()));
  REQUIRE(r.ok());
  return *r;
}

std::string ParseError(const json& doc) {
  Result<SiteConfig> r = ParseSiteConfig(doc, kBase);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().IsInvalidArgument());
  return r.status().message();
}

// A directory under temp_directory_path() removed with its contents at scope
// exit.
class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() /
            fmt::format("blockrelay-config-test-{}-{}", ::getpid(), counter++);
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

void WriteFile(const fs::path& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << content;
  REQUIRE(out.good());
}

void MakeFileOfSize(const fs::path& path, uint64_t size) {
  WriteFile(path, "");
  fs::resize_file(path, size);
}

// A config whose relative paths land in `dir`: data_dir dir/data (missing),
// sockets inside it, one 1MiB volume at dir/vol.img (missing).
json EnvDoc() {
  return json::parse(R"({
    "site": "a",
    "data_dir": "data",
    "control_socket": "data/control.sock",
    "nbd": {"unix_socket": "data/nbd.sock"},
    "groups": [{
      "name": "db",
      "volumes": [{"name": "vol", "path": "vol.img", "size": "1MiB"}]
    }]
  })");
}

std::string EnvError(const json& doc, const fs::path& dir) {
  SiteConfig config = ParseOk(doc, dir);
  Status s = CheckSiteEnvironment(config);
  REQUIRE_FALSE(s.ok());
  CHECK(s.IsInvalidArgument());
  return s.message();
}

// ---------------------------------------------------------------------------
// Valid documents

TEST_CASE("ParseSiteConfig: minimal document gets the documented defaults",
          "[config]") {
  SiteConfig c = ParseOk(MinimalDoc());
  CHECK(c.site == "a");
  CHECK(c.nbd.io_threads == 4);
  CHECK_FALSE(c.nbd.listen.has_value());
  CHECK_FALSE(c.replication.listen.has_value());
  REQUIRE(c.groups.size() == 1);
  const GroupConfig& g = c.groups[0];
  CHECK(g.role == Role::kPrimary);
  CHECK(g.region_size_bytes == 64 * 1024);
  CHECK(g.on_sync_failure == OnSyncFailure::kLogging);
  CHECK(g.sync_timeout_ms == 30000);
  CHECK(g.bitmap_flush_interval_ms == 5000);  // what the site did before the key existed
  CHECK(g.downstream.empty());
  CHECK_FALSE(g.upstream.has_value());
  REQUIRE(g.volumes.size() == 1);
  CHECK(g.volumes[0].size_bytes == (1ull << 30));
}

TEST_CASE("ParseSiteConfig: downstream defaults", "[config]") {
  SiteConfig c = ParseOk(DownstreamDoc());
  REQUIRE(c.groups[0].downstream.size() == 1);
  const DownstreamConfig& d = c.groups[0].downstream[0];
  CHECK(d.site == "b");
  CHECK(d.address == Endpoint{"10.0.0.2", 7800});
  CHECK(d.mode == LinkMode::kAsync);
  CHECK(d.max_queue_bytes == (64ull << 20));
  CHECK(d.queue == QueueKind::kMemory);
  CHECK(d.initial_sync == InitialSync::kFull);
  CHECK(d.group_interval_ms == 10);
  CHECK_FALSE(d.max_lag_bytes.has_value());
  CHECK_FALSE(d.max_lag_ms.has_value());
  CHECK_FALSE(d.resync_rate_bytes_per_sec.has_value());
  CHECK(d.keepalive_ms == 10000);
}

TEST_CASE("ParseSiteConfig: relative paths are resolved against base_dir",
          "[config]") {
  json doc = MinimalDoc();
  doc["data_dir"] = "../var/a";
  doc["control_socket"] = "run/./a.sock";
  doc["nbd"]["unix_socket"] = "a.nbd";
  doc["groups"][0]["volumes"][0]["path"] = "../../srv/data.img";
  SiteConfig c = ParseOk(doc, "/opt/br/etc");
  CHECK(c.data_dir == "/opt/br/var/a");
  CHECK(c.control_socket == "/opt/br/etc/run/a.sock");
  CHECK(c.nbd.unix_socket == fs::path("/opt/br/etc/a.nbd"));
  CHECK(c.groups[0].volumes[0].path == "/opt/srv/data.img");
}

TEST_CASE("ParseSiteConfig: absolute paths are kept", "[config]") {
  SiteConfig c = ParseOk(MinimalDoc(), "/somewhere/else");
  CHECK(c.data_dir == "/var/lib/blockrelay/a");
  CHECK(c.groups[0].volumes[0].path == "/srv/data.img");
}

TEST_CASE("ParseSiteConfig: a relative base_dir is made absolute",
          "[config]") {
  json doc = MinimalDoc();
  doc["data_dir"] = "d";
  SiteConfig c = ParseOk(doc, "rel");
  CHECK(c.data_dir.is_absolute());
  CHECK(c.data_dir == (fs::current_path() / "rel/d").lexically_normal());
}

// Goal: every key of the format is read into the right field.
TEST_CASE("ParseSiteConfig: full document fills every field", "[config]") {
  json doc = json::parse(R"({
    "site": "b",
    "data_dir": "/var/lib/br/b",
    "control_socket": "/run/br/b.sock",
    "nbd": {"unix_socket": "/run/br/b.nbd", "listen": "127.0.0.1:10809",
            "io_threads": 8},
    "replication": {"listen": "[::]:7800"},
    "groups": [
      {
        "name": "db", "role": "secondary", "region_size": "1MiB",
        "on_sync_failure": "block", "sync_timeout": "5s",
        "bitmap_flush_interval": "30s",
        "volumes": [{"name": "wal", "path": "/srv/wal.img", "size": 1048576},
                    {"name": "data", "path": "/dev/sdb"}],
        "upstream": {"site": "a", "address": "10.0.0.1:7800"},
        "downstream": [
          {"site": "c", "address": "c.example:7800", "mode": "sync",
           "max_queue": "256MiB", "queue": "disk", "initial_sync": "checksum",
           "group_interval": "5ms", "max_lag": "30s",
           "resync_rate": "100MiB/s", "keepalive": "2min"},
          {"site": "d", "address": "10.0.3.2:7800", "initial_sync": "none",
           "max_lag": "1GiB", "resync_rate": 1000000}
        ]
      },
      {"name": "logs", "volumes": [{"name": "logs", "path": "/srv/l.img",
                                    "size": "4GiB"}]}
    ]
  })");
  SiteConfig c = ParseOk(doc);
  CHECK(c.site == "b");
  CHECK(c.nbd.listen == Endpoint{"127.0.0.1", 10809});
  CHECK(c.nbd.io_threads == 8);
  CHECK(c.replication.listen == Endpoint{"::", 7800});
  REQUIRE(c.groups.size() == 2);
  const GroupConfig& g = c.groups[0];
  CHECK(g.role == Role::kSecondary);
  CHECK(g.region_size_bytes == (1u << 20));
  CHECK(g.on_sync_failure == OnSyncFailure::kBlock);
  CHECK(g.sync_timeout_ms == 5000);
  CHECK(g.bitmap_flush_interval_ms == 30000);
  REQUIRE(g.volumes.size() == 2);
  CHECK(g.volumes[0].size_bytes == 1048576u);
  CHECK_FALSE(g.volumes[1].size_bytes.has_value());
  REQUIRE(g.upstream.has_value());
  CHECK(g.upstream->site == "a");
  CHECK(g.upstream->address == Endpoint{"10.0.0.1", 7800});
  REQUIRE(g.downstream.size() == 2);
  const DownstreamConfig& c1 = g.downstream[0];
  CHECK(c1.address == Endpoint{"c.example", 7800});
  CHECK(c1.mode == LinkMode::kSync);
  CHECK(c1.max_queue_bytes == (256ull << 20));
  CHECK(c1.queue == QueueKind::kDisk);
  CHECK(c1.initial_sync == InitialSync::kChecksum);
  CHECK(c1.group_interval_ms == 5);
  CHECK(c1.max_lag_ms == 30000u);
  CHECK_FALSE(c1.max_lag_bytes.has_value());
  CHECK(c1.resync_rate_bytes_per_sec == (100ull << 20));
  CHECK(c1.keepalive_ms == 120000);
  const DownstreamConfig& d = g.downstream[1];
  CHECK(d.initial_sync == InitialSync::kNone);
  CHECK(d.max_lag_bytes == (1ull << 30));
  CHECK(d.resync_rate_bytes_per_sec == 1000000u);
  CHECK(c.groups[1].role == Role::kPrimary);
}

TEST_CASE("ParseSiteConfig: ToJson output parses back to the same config",
          "[config]") {
  json doc = DownstreamDoc();
  doc["replication"] = {{"listen", "[::1]:7800"}};
  doc["nbd"]["listen"] = "0.0.0.0:10809";
  doc["groups"][0]["downstream"][0]["max_lag"] = "10min";
  doc["groups"][0]["downstream"][0]["resync_rate"] = "1536/s";
  doc["groups"][0]["upstream"] = {{"site", "z"}};
  doc["groups"][0]["bitmap_flush_interval"] = "250ms";
  doc["groups"][0]["volumes"].push_back(
      {{"name", "raw"}, {"path", "relative/raw"}});
  doc["groups"].push_back(json::parse(R"({
    "name": "g2", "role": "secondary", "upstream": {"site": "z",
    "address": "[fe80::1]:1"}, "volumes": [{"name": "v2", "path": "v2",
    "size": 512}]})"));
  SiteConfig first = ParseOk(doc);
  json canonical = ToJson(first);
  SiteConfig second = ParseOk(canonical, "/a/different/base");
  CHECK(first == second);
  CHECK(ToJson(second) == canonical);
  CHECK(canonical["groups"][0]["downstream"][0]["max_lag"] == "10min");
  CHECK(canonical["groups"][0]["bitmap_flush_interval"] == "250ms");
  CHECK(canonical["groups"][1]["bitmap_flush_interval"] == "5s");
}

TEST_CASE("ParseSiteConfig: sizes may be JSON integers", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"][0]["size"] = 4096;
  doc["groups"][0]["region_size"] = 8192;
  SiteConfig c = ParseOk(doc);
  CHECK(c.groups[0].volumes[0].size_bytes == 4096u);
  CHECK(c.groups[0].region_size_bytes == 8192u);
}

TEST_CASE("ParseSiteConfig: primary with upstream but no address is fine",
          "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["upstream"] = {{"site", "b"}};
  SiteConfig c = ParseOk(doc);
  REQUIRE(c.groups[0].upstream.has_value());
  CHECK(c.groups[0].upstream->site == "b");
  CHECK_FALSE(c.groups[0].upstream->address.has_value());
}

TEST_CASE("ParseSiteConfig: secondary with upstream and listen is fine",
          "[config]") {
  SiteConfig c = ParseOk(SecondaryDoc());
  CHECK(c.groups[0].role == Role::kSecondary);
}

TEST_CASE("ParseSiteConfig: nbd with only listen is fine", "[config]") {
  json doc = MinimalDoc();
  doc["nbd"] = {{"listen", "127.0.0.1:10809"}};
  SiteConfig c = ParseOk(doc);
  CHECK_FALSE(c.nbd.unix_socket.has_value());
}

TEST_CASE("ParseSiteConfig: a 64-character name is accepted", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"][0]["name"] = std::string(64, 'v');
  doc["site"] = "Site_1.a-b";
  ParseOk(doc);
}

TEST_CASE("ParseSiteConfig: region_size bounds 4KiB and 16MiB are accepted",
          "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["region_size"] = "4KiB";
  CHECK(ParseOk(doc).groups[0].region_size_bytes == 4096);
  doc["groups"][0]["region_size"] = "16MiB";
  CHECK(ParseOk(doc).groups[0].region_size_bytes == (16u << 20));
}

TEST_CASE("ParseSiteConfig: range bounds are inclusive", "[config]") {
  json doc = DownstreamDoc();
  json& d = doc["groups"][0]["downstream"][0];
  d["max_queue"] = "1MiB";
  d["group_interval"] = "1ms";
  d["keepalive"] = "1s";
  doc["nbd"]["io_threads"] = 1;
  doc["nbd"]["poll_us"] = 0;
  ParseOk(doc);
  d["group_interval"] = "10s";
  d["keepalive"] = "10min";
  doc["nbd"]["io_threads"] = 64;
  doc["nbd"]["poll_us"] = 1000;
  ParseOk(doc);
}

TEST_CASE("ParseSiteConfig: durations may be JSON integers in ms",
          "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0]["keepalive"] = 2000;
  doc["groups"][0]["sync_timeout"] = 1500;
  SiteConfig c = ParseOk(doc);
  CHECK(c.groups[0].downstream[0].keepalive_ms == 2000);
  CHECK(c.groups[0].sync_timeout_ms == 1500);
}

// ---------------------------------------------------------------------------
// Structure and types

TEST_CASE("ParseSiteConfig: document must be an object", "[config]") {
  CHECK(ParseError(json::array()) ==
        "(top level): expected a JSON object, got an array");
}

TEST_CASE("ParseSiteConfig: unknown top-level key names it and lists allowed",
          "[config]") {
  json doc = MinimalDoc();
  doc["colour"] = "blue";
  CHECK(ParseError(doc) ==
        "colour: unknown key; allowed keys here are site, data_dir, "
        "control_socket, nbd, replication, groups");
}

TEST_CASE("ParseSiteConfig: unknown key names its JSON path", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"][0]["bogus"] = 1;
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].volumes[0].bogus: unknown key") &&
                 Contains("name, path, size"));
}

TEST_CASE("ParseSiteConfig: unknown key suggests the nearest allowed key",
          "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"][0]["sise"] = "1GiB";
  CHECK_THAT(ParseError(doc), EndsWith("(did you mean \"size\"?)"));
}

TEST_CASE("ParseSiteConfig: unknown key in nbd", "[config]") {
  json doc = MinimalDoc();
  doc["nbd"]["port"] = 10809;
  CHECK_THAT(ParseError(doc),
             StartsWith("nbd.port: unknown key") &&
                 Contains("unix_socket, listen, io_threads, poll_us"));
}

TEST_CASE("ParseSiteConfig: unknown key in replication", "[config]") {
  json doc = MinimalDoc();
  doc["replication"] = {{"listen", "0.0.0.0:7800"}, {"tls", true}};
  CHECK_THAT(ParseError(doc), StartsWith("replication.tls: unknown key") &&
                                  Contains("are listen"));
}

TEST_CASE("ParseSiteConfig: unknown key in group", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volume"] = json::array();
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].volume: unknown key") &&
                 Contains("name, role, region_size, on_sync_failure, "
                          "sync_timeout, bitmap_flush_interval, volumes, "
                          "downstream, upstream"));
}

TEST_CASE("ParseSiteConfig: unknown key in downstream", "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0]["compression"] = "lz4";
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].downstream[0].compression: unknown key") &&
                 Contains("site, address, mode, max_queue, queue, "
                          "initial_sync, group_interval, max_lag, "
                          "resync_rate, keepalive"));
}

TEST_CASE("ParseSiteConfig: unknown key in upstream", "[config]") {
  json doc = SecondaryDoc();
  doc["groups"][0]["upstream"]["mode"] = "sync";
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].upstream.mode: unknown key") &&
                 Contains("site, address"));
}

TEST_CASE("ParseSiteConfig: wrong type for a string field", "[config]") {
  json doc = MinimalDoc();
  doc["site"] = 5;
  CHECK_THAT(ParseError(doc), StartsWith("site: expected a name") &&
                                  EndsWith("got number 5"));
}

TEST_CASE("ParseSiteConfig: wrong type for groups", "[config]") {
  json doc = MinimalDoc();
  doc["groups"] = {{"name", "db"}};
  CHECK(ParseError(doc) ==
        "groups: expected an array of group, got an object");
}

TEST_CASE("ParseSiteConfig: wrong type for nbd", "[config]") {
  json doc = MinimalDoc();
  doc["nbd"] = "/run/a.nbd";
  CHECK_THAT(ParseError(doc), StartsWith("nbd: expected an object") &&
                                  EndsWith("got \"/run/a.nbd\""));
}

TEST_CASE("ParseSiteConfig: wrong type for a size", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"][0]["size"] = true;
  CHECK(ParseError(doc) ==
        "groups[0].volumes[0].size: expected a size like \"1GiB\" or a whole "
        "number of bytes, got true");
}

TEST_CASE("ParseSiteConfig: wrong type for a path", "[config]") {
  json doc = MinimalDoc();
  doc["data_dir"] = json::array({"a"});
  CHECK_THAT(ParseError(doc), StartsWith("data_dir: expected a non-empty path"));
  doc["data_dir"] = "";
  CHECK_THAT(ParseError(doc), StartsWith("data_dir: expected a non-empty path") &&
                                  EndsWith("got \"\""));
}

TEST_CASE("ParseSiteConfig: null is a wrong type, not a missing key",
          "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"][0]["size"] = nullptr;
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].volumes[0].size: ") && EndsWith("got null"));
}

TEST_CASE("ParseSiteConfig: wrong type for a volume entry", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"][0] = "data";
  CHECK_THAT(ParseError(doc), StartsWith("groups[0].volumes[0]: expected a "
                                         "volume object"));
}

// ---------------------------------------------------------------------------
// Required fields

TEST_CASE("ParseSiteConfig: missing site", "[config]") {
  json doc = MinimalDoc();
  doc.erase("site");
  CHECK_THAT(ParseError(doc), StartsWith("site: required key is missing"));
}

TEST_CASE("ParseSiteConfig: missing data_dir", "[config]") {
  json doc = MinimalDoc();
  doc.erase("data_dir");
  CHECK_THAT(ParseError(doc), StartsWith("data_dir: required key is missing"));
}

TEST_CASE("ParseSiteConfig: missing control_socket", "[config]") {
  json doc = MinimalDoc();
  doc.erase("control_socket");
  CHECK_THAT(ParseError(doc),
             StartsWith("control_socket: required key is missing"));
}

TEST_CASE("ParseSiteConfig: missing nbd", "[config]") {
  json doc = MinimalDoc();
  doc.erase("nbd");
  CHECK_THAT(ParseError(doc), StartsWith("nbd: required key is missing"));
}

TEST_CASE("ParseSiteConfig: nbd needs unix_socket or listen", "[config]") {
  json doc = MinimalDoc();
  doc["nbd"] = {{"io_threads", 2}};
  CHECK_THAT(ParseError(doc),
             StartsWith("nbd: expected at least one of \"unix_socket\" or "
                        "\"listen\""));
}

TEST_CASE("ParseSiteConfig: missing groups", "[config]") {
  json doc = MinimalDoc();
  doc.erase("groups");
  CHECK_THAT(ParseError(doc), StartsWith("groups: required key is missing"));
}

TEST_CASE("ParseSiteConfig: empty groups", "[config]") {
  json doc = MinimalDoc();
  doc["groups"] = json::array();
  CHECK(ParseError(doc) ==
        "groups: expected at least one group, got an empty array");
}

TEST_CASE("ParseSiteConfig: group without name", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0].erase("name");
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].name: required key is missing"));
}

TEST_CASE("ParseSiteConfig: group without volumes", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0].erase("volumes");
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].volumes: required key is missing"));
}

TEST_CASE("ParseSiteConfig: group with empty volumes", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"] = json::array();
  CHECK(ParseError(doc) ==
        "groups[0].volumes: expected at least one volume, got an empty array");
}

TEST_CASE("ParseSiteConfig: volume without name", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"][0].erase("name");
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].volumes[0].name: required key is missing"));
}

TEST_CASE("ParseSiteConfig: volume without path", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"][0].erase("path");
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].volumes[0].path: required key is missing"));
}

TEST_CASE("ParseSiteConfig: upstream without site", "[config]") {
  json doc = SecondaryDoc();
  doc["groups"][0]["upstream"].erase("site");
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].upstream.site: required key is missing"));
}

TEST_CASE("ParseSiteConfig: downstream without address", "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0].erase("address");
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].downstream[0].address: required key is "
                        "missing"));
}

TEST_CASE("ParseSiteConfig: downstream without site", "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0].erase("site");
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].downstream[0].site: required key is "
                        "missing"));
}

// ---------------------------------------------------------------------------
// Names

TEST_CASE("ParseSiteConfig: site name with a space is refused", "[config]") {
  json doc = MinimalDoc();
  doc["site"] = "site a";
  CHECK(ParseError(doc) ==
        "site: expected a name of 1 to 64 characters from A-Z a-z 0-9 . _ -, "
        "got \"site a\"");
}

TEST_CASE("ParseSiteConfig: group name with a slash is refused", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["name"] = "db/1";
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].name: expected a name") &&
                 EndsWith("got \"db/1\""));
}

TEST_CASE("ParseSiteConfig: volume name of 65 characters is refused",
          "[config]") {
  json doc = MinimalDoc();
  const std::string name(65, 'v');
  doc["groups"][0]["volumes"][0]["name"] = name;
  CHECK_THAT(ParseError(doc), StartsWith("groups[0].volumes[0].name: ") &&
                                  Contains(name));
}

TEST_CASE("ParseSiteConfig: empty name is refused", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"][0]["name"] = "";
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].volumes[0].name: expected a name") &&
                 EndsWith("got \"\""));
}

TEST_CASE("ParseSiteConfig: names \".\" and \"..\" are refused", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["name"] = "..";
  CHECK_THAT(ParseError(doc), StartsWith("groups[0].name: ") &&
                                  Contains("other than \".\" and \"..\""));
}

TEST_CASE("ParseSiteConfig: duplicate group names", "[config]") {
  json doc = MinimalDoc();
  doc["groups"].push_back(
      {{"name", "db"},
       {"volumes", {{{"name", "other"}, {"path", "/srv/o.img"}}}}});
  CHECK(ParseError(doc) ==
        "groups[1].name: duplicate group name \"db\" (also groups[0].name)");
}

TEST_CASE("ParseSiteConfig: duplicate volume names across groups",
          "[config]") {
  json doc = MinimalDoc();
  doc["groups"].push_back(
      {{"name", "logs"},
       {"volumes", {{{"name", "data"}, {"path", "/srv/o.img"}}}}});
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[1].volumes[0].name: duplicate volume name "
                        "\"data\" (also groups[0].volumes[0].name)") &&
                 Contains("NBD export names"));
}

TEST_CASE("ParseSiteConfig: duplicate volume names in one group",
          "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"].push_back(
      {{"name", "data"}, {"path", "/srv/o.img"}});
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].volumes[1].name: duplicate volume name"));
}

TEST_CASE("ParseSiteConfig: two volumes on one backing path are refused",
          "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"].push_back(
      {{"name", "data2"}, {"path", "/srv/./data.img"}});
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].volumes[1].path: /srv/data.img is already "
                        "the backing path of groups[0].volumes[0].path"));
}

// ---------------------------------------------------------------------------
// Values and ranges

TEST_CASE("ParseSiteConfig: bad size string names path and value",
          "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"][0]["size"] = "12XB";
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].volumes[0].size: expected a size like "
                        "\"1GiB\" or a whole number of bytes, got \"12XB\""));
}

TEST_CASE("ParseSiteConfig: negative integer size is refused", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"][0]["size"] = -4096;
  CHECK_THAT(ParseError(doc), StartsWith("groups[0].volumes[0].size: ") &&
                                  EndsWith("got number -4096"));
}

TEST_CASE("ParseSiteConfig: fractional JSON number size is refused",
          "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"][0]["size"] = 1.5;
  CHECK_THAT(ParseError(doc), StartsWith("groups[0].volumes[0].size: ") &&
                                  EndsWith("got number 1.5"));
}

TEST_CASE("ParseSiteConfig: volume size not a multiple of 512", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"][0]["size"] = "1000";
  CHECK(ParseError(doc) ==
        "groups[0].volumes[0].size: expected a non-zero multiple of 512 "
        "bytes, got \"1000\"");
}

TEST_CASE("ParseSiteConfig: volume size zero", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"][0]["size"] = 0;
  CHECK(ParseError(doc) ==
        "groups[0].volumes[0].size: expected a non-zero multiple of 512 "
        "bytes, got number 0");
}

TEST_CASE("ParseSiteConfig: region_size not a power of two", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["region_size"] = "48KiB";
  CHECK(ParseError(doc) ==
        "groups[0].region_size: expected a power of two from 4KiB to 16MiB, "
        "got \"48KiB\"");
}

TEST_CASE("ParseSiteConfig: region_size below 4KiB or above 16MiB",
          "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["region_size"] = "2KiB";
  CHECK_THAT(ParseError(doc), StartsWith("groups[0].region_size: ") &&
                                  EndsWith("got \"2KiB\""));
  doc["groups"][0]["region_size"] = "32MiB";
  CHECK_THAT(ParseError(doc), StartsWith("groups[0].region_size: ") &&
                                  EndsWith("got \"32MiB\""));
}

TEST_CASE("ParseSiteConfig: role must be primary or secondary", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["role"] = "master";
  CHECK(ParseError(doc) ==
        "groups[0].role: expected \"primary\" or \"secondary\", got "
        "\"master\"");
}

TEST_CASE("ParseSiteConfig: secondary group without upstream", "[config]") {
  json doc = SecondaryDoc();
  doc["groups"][0].erase("upstream");
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].upstream: required key is missing") &&
                 Contains("\"secondary\""));
}

TEST_CASE("ParseSiteConfig: secondary group needs replication.listen",
          "[config]") {
  json doc = SecondaryDoc();
  doc.erase("replication");
  CHECK_THAT(ParseError(doc),
             StartsWith("replication.listen: required key is missing") &&
                 Contains("group \"db\" (groups[0]) is secondary"));
}

TEST_CASE("ParseSiteConfig: upstream that is this site", "[config]") {
  json doc = SecondaryDoc();
  doc["groups"][0]["upstream"]["site"] = "a";
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].upstream.site: \"a\" is this site"));
}

TEST_CASE("ParseSiteConfig: downstream that is this site", "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0]["site"] = "a";
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].downstream[0].site: \"a\" is this site"));
}

TEST_CASE("ParseSiteConfig: downstream listed twice in a group", "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"].push_back(
      {{"site", "b"}, {"address", "10.0.0.3:7800"}});
  CHECK(ParseError(doc) ==
        "groups[0].downstream[1].site: \"b\" is listed twice; it is already "
        "groups[0].downstream[0].site");
}

TEST_CASE("ParseSiteConfig: downstream that is also the upstream",
          "[config]") {
  json doc = SecondaryDoc();
  doc["groups"][0]["downstream"] =
      json::array({{{"site", "z"}, {"address", "10.0.0.9:7800"}}});
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].downstream[0].site: \"z\" is also this "
                        "group's upstream"));
}

TEST_CASE("ParseSiteConfig: bad downstream address", "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0]["address"] = "10.0.0.2";
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].downstream[0].address: expected "
                        "\"host:port\"") &&
                 Contains("got \"10.0.0.2\""));
}

TEST_CASE("ParseSiteConfig: bad nbd.listen port", "[config]") {
  json doc = MinimalDoc();
  doc["nbd"]["listen"] = "127.0.0.1:0";
  CHECK_THAT(ParseError(doc), StartsWith("nbd.listen: ") &&
                                  Contains("\"127.0.0.1:0\""));
}

TEST_CASE("ParseSiteConfig: mode must be sync or async", "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0]["mode"] = "semi";
  CHECK(ParseError(doc) ==
        "groups[0].downstream[0].mode: expected \"sync\" or \"async\", got "
        "\"semi\"");
}

TEST_CASE("ParseSiteConfig: queue must be memory or disk", "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0]["queue"] = "ram";
  CHECK(ParseError(doc) ==
        "groups[0].downstream[0].queue: expected \"memory\" or \"disk\", got "
        "\"ram\"");
}

TEST_CASE("ParseSiteConfig: initial_sync must be full, none or checksum",
          "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0]["initial_sync"] = "partial";
  CHECK(ParseError(doc) ==
        "groups[0].downstream[0].initial_sync: expected \"full\", \"none\" or "
        "\"checksum\", got \"partial\"");
}

TEST_CASE("ParseSiteConfig: on_sync_failure must be logging or block",
          "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["on_sync_failure"] = "panic";
  CHECK(ParseError(doc) ==
        "groups[0].on_sync_failure: expected \"logging\" or \"block\", got "
        "\"panic\"");
}

TEST_CASE("ParseSiteConfig: enum values are case-sensitive", "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["role"] = "Primary";
  CHECK_THAT(ParseError(doc), StartsWith("groups[0].role: ") &&
                                  EndsWith("got \"Primary\""));
}

TEST_CASE("ParseSiteConfig: max_queue below 1MiB", "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0]["max_queue"] = "512KiB";
  CHECK(ParseError(doc) ==
        "groups[0].downstream[0].max_queue: expected at least 1MiB, got "
        "\"512KiB\"");
}

TEST_CASE("ParseSiteConfig: nbd.io_threads outside 1..64", "[config]") {
  json doc = MinimalDoc();
  for (json bad : {json(0), json(65), json(-1), json(2.5), json("4")}) {
    CAPTURE(bad.dump());
    doc["nbd"]["io_threads"] = bad;
    CHECK_THAT(ParseError(doc),
               StartsWith("nbd.io_threads: expected a whole number from 1 to "
                          "64, got ") &&
                   Contains(bad.is_string() ? "\"4\"" : bad.dump()));
  }
}

TEST_CASE("ParseSiteConfig: nbd.poll_us outside 0..1000", "[config]") {
  json doc = MinimalDoc();
  for (json bad : {json(1001), json(-1), json(2.5), json("50us")}) {
    CAPTURE(bad.dump());
    doc["nbd"]["poll_us"] = bad;
    CHECK_THAT(ParseError(doc),
               StartsWith("nbd.poll_us: expected a whole number of "
                          "microseconds from 0 to 1000, got ") &&
                   Contains(bad.is_string() ? "\"50us\"" : bad.dump()));
  }
}

TEST_CASE("ParseSiteConfig: nbd.poll_us defaults to 200", "[config]") {
  CHECK(ParseOk(MinimalDoc()).nbd.poll_us == 200);
}

TEST_CASE("ParseSiteConfig: group_interval outside 1ms..10s", "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0]["group_interval"] = "0ms";
  CHECK(ParseError(doc) ==
        "groups[0].downstream[0].group_interval: expected a duration from "
        "1ms to 10s, got \"0ms\"");
  doc["groups"][0]["downstream"][0]["group_interval"] = "11s";
  CHECK_THAT(ParseError(doc), EndsWith("got \"11s\""));
  doc["groups"][0]["downstream"][0]["group_interval"] = 10001;
  CHECK_THAT(ParseError(doc), EndsWith("got number 10001"));
}

TEST_CASE("ParseSiteConfig: keepalive outside 1s..10min", "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0]["keepalive"] = "500ms";
  CHECK(ParseError(doc) ==
        "groups[0].downstream[0].keepalive: expected a duration from 1s to "
        "10min, got \"500ms\"");
  doc["groups"][0]["downstream"][0]["keepalive"] = "11min";
  CHECK_THAT(ParseError(doc), EndsWith("got \"11min\""));
}

TEST_CASE("ParseSiteConfig: bitmap_flush_interval outside 100ms..1h is refused",
          "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["bitmap_flush_interval"] = "50ms";
  CHECK(ParseError(doc) ==
        "groups[0].bitmap_flush_interval: expected a duration from 100ms to "
        "1h, got \"50ms\"");
  doc["groups"][0]["bitmap_flush_interval"] = 0;
  CHECK(ParseError(doc) ==
        "groups[0].bitmap_flush_interval: expected a duration from 100ms to "
        "1h, got number 0");
  doc["groups"][0]["bitmap_flush_interval"] = "61min";
  CHECK_THAT(ParseError(doc), EndsWith("got \"61min\""));
  doc["groups"][0]["bitmap_flush_interval"] = "often";
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].bitmap_flush_interval: expected a duration") &&
                 Contains("got \"often\""));
}

TEST_CASE("ParseSiteConfig: bitmap_flush_interval takes a duration or milliseconds",
          "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["bitmap_flush_interval"] = "100ms";
  CHECK(ParseOk(doc).groups[0].bitmap_flush_interval_ms == 100);
  doc["groups"][0]["bitmap_flush_interval"] = "1h";
  CHECK(ParseOk(doc).groups[0].bitmap_flush_interval_ms == 3'600'000);
  doc["groups"][0]["bitmap_flush_interval"] = 2500;
  CHECK(ParseOk(doc).groups[0].bitmap_flush_interval_ms == 2500);
}

TEST_CASE("ParseSiteConfig: bad duration string names path and value",
          "[config]") {
  json doc = MinimalDoc();
  doc["groups"][0]["sync_timeout"] = "soon";
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].sync_timeout: expected a duration") &&
                 Contains("got \"soon\""));
  doc["groups"][0]["sync_timeout"] = "2h";
  CHECK_THAT(ParseError(doc), StartsWith("groups[0].sync_timeout: expected a "
                                         "duration from 1ms to 1h"));
}

TEST_CASE("ParseSiteConfig: max_lag size sets max_lag_bytes", "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0]["max_lag"] = "256MiB";
  const DownstreamConfig d = ParseOk(doc).groups[0].downstream[0];
  CHECK(d.max_lag_bytes == (256ull << 20));
  CHECK_FALSE(d.max_lag_ms.has_value());
}

TEST_CASE("ParseSiteConfig: max_lag duration sets max_lag_ms", "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0]["max_lag"] = "30s";
  const DownstreamConfig d = ParseOk(doc).groups[0].downstream[0];
  CHECK(d.max_lag_ms == 30000u);
  CHECK_FALSE(d.max_lag_bytes.has_value());
}

TEST_CASE("ParseSiteConfig: max_lag plain integer is bytes", "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0]["max_lag"] = 1048576;
  CHECK(ParseOk(doc).groups[0].downstream[0].max_lag_bytes == 1048576u);
  doc["groups"][0]["downstream"][0]["max_lag"] = "4096";
  CHECK(ParseOk(doc).groups[0].downstream[0].max_lag_bytes == 4096u);
}

TEST_CASE("ParseSiteConfig: max_lag \"30m\" is ambiguous", "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0]["max_lag"] = "30m";
  CHECK(ParseError(doc) ==
        "groups[0].downstream[0].max_lag: \"30m\" is ambiguous; write "
        "\"30MiB\" for bytes or \"30min\" for minutes");
}

TEST_CASE("ParseSiteConfig: max_lag neither size nor duration", "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0]["max_lag"] = "lots";
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].downstream[0].max_lag: expected a size "
                        "like \"256MiB\", a duration like \"30s\"") &&
                 EndsWith("got \"lots\""));
  doc["groups"][0]["downstream"][0]["max_lag"] = "0s";
  CHECK_THAT(ParseError(doc), EndsWith("got \"0s\""));
}

TEST_CASE("ParseSiteConfig: bad resync_rate names path and value",
          "[config]") {
  json doc = DownstreamDoc();
  doc["groups"][0]["downstream"][0]["resync_rate"] = "100MiB/h";
  CHECK_THAT(ParseError(doc),
             StartsWith("groups[0].downstream[0].resync_rate: expected a "
                        "rate") &&
                 Contains("\"100MiB/h\""));
  doc["groups"][0]["downstream"][0]["resync_rate"] = 0;
  CHECK_THAT(ParseError(doc), EndsWith("got number 0"));
}

TEST_CASE("ParseSiteConfig: too long Unix socket path", "[config]") {
  json doc = MinimalDoc();
  doc["control_socket"] = "/" + std::string(120, 's');
  CHECK_THAT(ParseError(doc), StartsWith("control_socket: /sss") &&
                                  Contains("is 121 bytes long") &&
                                  Contains("at most 107"));
}

TEST_CASE("ParseSiteConfig: nbd.unix_socket equal to control_socket",
          "[config]") {
  json doc = MinimalDoc();
  doc["nbd"]["unix_socket"] = doc["control_socket"];
  CHECK_THAT(ParseError(doc),
             StartsWith("nbd.unix_socket: /run/blockrelay/a.sock is also "
                        "control_socket"));
}

TEST_CASE("ParseSiteConfig: invalid UTF-8 in a value does not throw",
          "[config]") {
  json doc = MinimalDoc();
  doc["site"] = std::string("bad\xff\xfe");
  CHECK_THAT(ParseError(doc), StartsWith("site: expected a name"));
}

// ---------------------------------------------------------------------------
// LoadSiteConfig

TEST_CASE("LoadSiteConfig: missing file names the path", "[config]") {
  TempDir dir;
  const fs::path path = dir.path() / "nope.json";
  Result<SiteConfig> r = LoadSiteConfig(path);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == Status::Code::kNotFound);
  CHECK_THAT(r.status().message(),
             StartsWith(path.native() + ": cannot read config file") &&
                 Contains("No such file"));
}

TEST_CASE("LoadSiteConfig: a directory is not a config file", "[config]") {
  TempDir dir;
  Result<SiteConfig> r = LoadSiteConfig(dir.path());
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().message(),
             StartsWith(dir.path().native()) && Contains("Is a directory"));
}

TEST_CASE("LoadSiteConfig: syntax error reports line and column",
          "[config]") {
  TempDir dir;
  const fs::path path = dir.path() / "site.json";
  WriteFile(path, "{\n  \"site\": \"a\",\n  \"data_dir\": \"x\",,\n}\n");
  Result<SiteConfig> r = LoadSiteConfig(path);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().IsInvalidArgument());
  CHECK_THAT(r.status().message(),
             StartsWith(path.native() + ":3:19: JSON syntax error: ") &&
                 !Contains("json.exception"));
}

TEST_CASE("LoadSiteConfig: truncated document reports the end position",
          "[config]") {
  TempDir dir;
  const fs::path path = dir.path() / "site.json";
  WriteFile(path, "{\n  \"site\": \"a\",\n");
  Result<SiteConfig> r = LoadSiteConfig(path);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().message(),
             StartsWith(path.native() + ":3:1: JSON syntax error"));
}

TEST_CASE("LoadSiteConfig: empty file is a syntax error at 1:1", "[config]") {
  TempDir dir;
  const fs::path path = dir.path() / "site.json";
  WriteFile(path, "");
  Result<SiteConfig> r = LoadSiteConfig(path);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().message(),
             StartsWith(path.native() + ":1:1: JSON syntax error"));
}

TEST_CASE("LoadSiteConfig: a key repeated in one object is refused",
          "[config]") {
  TempDir dir;
  const fs::path path = dir.path() / "site.json";
  json doc = MinimalDoc();
  std::string text = doc.dump(2);
  // Repeat "size" inside groups[0].volumes[0].
  const std::string needle = "\"size\": \"1GiB\"";
  text.replace(text.find(needle), needle.size(),
               needle + ", \"size\": \"2GiB\"");
  WriteFile(path, text);
  Result<SiteConfig> r = LoadSiteConfig(path);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().message() ==
        path.native() +
            ": groups[0].volumes[0].size: key appears twice in the same "
            "object; keep one");
}

TEST_CASE("LoadSiteConfig: relative paths resolve against the file's dir",
          "[config]") {
  TempDir dir;
  fs::create_directories(dir.path() / "etc");
  const fs::path path = dir.path() / "etc" / "site.json";
  json doc = MinimalDoc();
  doc["data_dir"] = "../var/a";
  doc["groups"][0]["volumes"][0]["path"] = "data.img";
  WriteFile(path, doc.dump());
  Result<SiteConfig> r = LoadSiteConfig(path);
  REQUIRE(r.ok());
  CHECK(r->data_dir == dir.path() / "var" / "a");
  CHECK(r->groups[0].volumes[0].path == dir.path() / "etc" / "data.img");
}

TEST_CASE("LoadSiteConfig: parse errors are prefixed with the file path",
          "[config]") {
  TempDir dir;
  const fs::path path = dir.path() / "site.json";
  json doc = MinimalDoc();
  doc["groups"][0]["volumes"][0]["size"] = "12XB";
  WriteFile(path, doc.dump());
  Result<SiteConfig> r = LoadSiteConfig(path);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().IsInvalidArgument());
  CHECK_THAT(r.status().message(),
             StartsWith(path.native() + ": groups[0].volumes[0].size: ") &&
                 Contains("\"12XB\""));
}

// Goal: the shipped example configs stay valid as the format evolves.
TEST_CASE("LoadSiteConfig: every example under config/ loads", "[config]") {
  const fs::path root = fs::path(BLOCKRELAY_SOURCE_DIR) / "config";
  int loaded = 0;
  for (const auto& entry : fs::recursive_directory_iterator(root)) {
    if (!entry.is_regular_file() || entry.path().extension() != ".json") {
      continue;
    }
    Result<SiteConfig> r = LoadSiteConfig(entry.path());
    INFO(entry.path().native() << ": "
                               << (r.ok() ? "" : r.status().message()));
    CHECK(r.ok());
    ++loaded;
  }
  CHECK(loaded >= 4);
}

// Goal: the three chain sites describe the same chain a -> b (sync) -> c
// (async), each downstream address being that site's replication.listen.
TEST_CASE("LoadSiteConfig: chain example sites agree with each other",
          "[config]") {
  const fs::path dir = fs::path(BLOCKRELAY_SOURCE_DIR) / "config" / "chain";
  std::map<std::string, SiteConfig> sites;
  for (const char* name : {"a", "b", "c"}) {
    Result<SiteConfig> r =
        LoadSiteConfig(dir / fmt::format("site-{}.json", name));
    INFO((r.ok() ? std::string() : r.status().message()));
    REQUIRE(r.ok());
    CHECK(r->site == name);
    sites.emplace(name, *r);
  }
  const SiteConfig& a = sites.at("a");
  const SiteConfig& b = sites.at("b");
  const SiteConfig& c = sites.at("c");
  CHECK(a.groups[0].role == Role::kPrimary);
  REQUIRE(a.groups[0].downstream.size() == 1);
  CHECK(a.groups[0].downstream[0].site == "b");
  CHECK(a.groups[0].downstream[0].mode == LinkMode::kSync);
  CHECK(a.groups[0].downstream[0].address == b.replication.listen);
  CHECK(b.groups[0].role == Role::kSecondary);
  CHECK(b.groups[0].upstream->site == "a");
  CHECK(b.groups[0].upstream->address == a.replication.listen);
  REQUIRE(b.groups[0].downstream.size() == 1);
  CHECK(b.groups[0].downstream[0].site == "c");
  CHECK(b.groups[0].downstream[0].mode == LinkMode::kAsync);
  CHECK(b.groups[0].downstream[0].address == c.replication.listen);
  CHECK(c.groups[0].upstream->site == "b");
  CHECK(c.groups[0].upstream->address == b.replication.listen);
  CHECK(c.groups[0].downstream.empty());
  for (const SiteConfig* s : {&a, &b, &c}) {
    CHECK(s->groups[0].name == "db");
    REQUIRE(s->groups[0].volumes.size() == 2);
    CHECK(s->groups[0].volumes[0].size_bytes == (64ull << 20));
    CHECK(s->groups[0].volumes[1].size_bytes == (256ull << 20));
  }
}

// ---------------------------------------------------------------------------
// CheckSiteEnvironment

TEST_CASE("CheckSiteEnvironment: fresh tree with missing dirs and files is OK",
          "[config]") {
  TempDir dir;
  json doc = EnvDoc();
  doc["groups"][0]["volumes"][0]["path"] = "data/vols/vol.img";
  SiteConfig config = ParseOk(doc, dir.path());
  Status s = CheckSiteEnvironment(config);
  INFO(s.message());
  CHECK(s.ok());
}

TEST_CASE("CheckSiteEnvironment: changes nothing on disk", "[config]") {
  TempDir dir;
  SiteConfig config = ParseOk(EnvDoc(), dir.path());
  CHECK(CheckSiteEnvironment(config).ok());
  CHECK(fs::is_empty(dir.path()));
}

TEST_CASE("CheckSiteEnvironment: existing file of the configured size is OK",
          "[config]") {
  TempDir dir;
  fs::create_directories(dir.path() / "data");
  MakeFileOfSize(dir.path() / "vol.img", 1 << 20);
  SiteConfig config = ParseOk(EnvDoc(), dir.path());
  Status s = CheckSiteEnvironment(config);
  INFO(s.message());
  CHECK(s.ok());
}

TEST_CASE("CheckSiteEnvironment: file of the wrong size names both sizes",
          "[config]") {
  TempDir dir;
  const fs::path vol = dir.path() / "vol.img";
  MakeFileOfSize(vol, 2 << 20);
  CHECK(EnvError(EnvDoc(), dir.path()) ==
        "groups[0].volumes[0].path: " + vol.native() +
            " is 2097152 bytes (2MiB) but groups[0].volumes[0].size is "
            "1048576 bytes (1MiB); fix \"size\" or resize the file");
}

TEST_CASE("CheckSiteEnvironment: existing file without size is refused",
          "[config]") {
  TempDir dir;
  const fs::path vol = dir.path() / "vol.img";
  MakeFileOfSize(vol, 4096);
  json doc = EnvDoc();
  doc["groups"][0]["volumes"][0].erase("size");
  CHECK_THAT(EnvError(doc, dir.path()),
             StartsWith("groups[0].volumes[0].path: " + vol.native() +
                        " is a regular file") &&
                 Contains("\"size\" is required for files"));
}

TEST_CASE("CheckSiteEnvironment: missing file without size is refused",
          "[config]") {
  TempDir dir;
  json doc = EnvDoc();
  doc["groups"][0]["volumes"][0].erase("size");
  CHECK_THAT(EnvError(doc, dir.path()),
             StartsWith("groups[0].volumes[0].path: " +
                        (dir.path() / "vol.img").native() +
                        " does not exist") &&
                 Contains("\"size\" is required"));
}

TEST_CASE("CheckSiteEnvironment: a directory where a file is expected",
          "[config]") {
  TempDir dir;
  fs::create_directories(dir.path() / "vol.img");
  CHECK(EnvError(EnvDoc(), dir.path()) ==
        "groups[0].volumes[0].path: " + (dir.path() / "vol.img").native() +
            " is a directory, expected a regular file or a block device");
}

TEST_CASE("CheckSiteEnvironment: volume whose parent is a regular file",
          "[config]") {
  TempDir dir;
  WriteFile(dir.path() / "plain", "x");
  json doc = EnvDoc();
  doc["groups"][0]["volumes"][0]["path"] = "plain/sub/vol.img";
  CHECK_THAT(EnvError(doc, dir.path()),
             StartsWith("groups[0].volumes[0].path: cannot create " +
                        (dir.path() / "plain/sub/vol.img").native()) &&
                 Contains((dir.path() / "plain").native() +
                          " is a regular file, not a directory"));
}

// Tests run as root, for whom every directory is writable; a data_dir below
// a regular file can never be created.
TEST_CASE("CheckSiteEnvironment: data_dir that cannot be created", "[config]") {
  TempDir dir;
  WriteFile(dir.path() / "plain", "x");
  json doc = EnvDoc();
  doc["data_dir"] = "plain/data";
  CHECK_THAT(EnvError(doc, dir.path()),
             StartsWith("data_dir: cannot create " +
                        (dir.path() / "plain/data").native()) &&
                 Contains((dir.path() / "plain").native() +
                          " is a regular file, not a directory"));
}

TEST_CASE("CheckSiteEnvironment: data_dir that is a regular file",
          "[config]") {
  TempDir dir;
  WriteFile(dir.path() / "data", "x");
  CHECK(EnvError(EnvDoc(), dir.path()) ==
        "data_dir: " + (dir.path() / "data").native() +
            " is a regular file, expected a directory");
}

TEST_CASE("CheckSiteEnvironment: socket path taken by a regular file",
          "[config]") {
  TempDir dir;
  fs::create_directories(dir.path() / "data");
  WriteFile(dir.path() / "data" / "control.sock", "");
  CHECK_THAT(EnvError(EnvDoc(), dir.path()),
             StartsWith("control_socket: " +
                        (dir.path() / "data/control.sock").native() +
                        " exists and is a regular file, not a socket"));
}

TEST_CASE("CheckSiteEnvironment: nbd socket directory cannot be created",
          "[config]") {
  TempDir dir;
  WriteFile(dir.path() / "plain", "x");
  json doc = EnvDoc();
  doc["nbd"]["unix_socket"] = "plain/nbd.sock";
  CHECK(EnvError(doc, dir.path()) ==
        "nbd.unix_socket: cannot create " +
            (dir.path() / "plain/nbd.sock").native() + ": " +
            (dir.path() / "plain").native() +
            " is a regular file, expected a directory");
}

TEST_CASE("CheckSiteEnvironment: a character device is not a backing store",
          "[config]") {
  json doc = EnvDoc();
  doc["groups"][0]["volumes"][0]["path"] = "/dev/null";
  TempDir dir;
  CHECK(EnvError(doc, dir.path()) ==
        "groups[0].volumes[0].path: /dev/null is a character device, expected "
        "a regular file or a block device");
}

}  // namespace
}  // namespace blockrelay::config
