// Multi-site helpers for replication integration tests: site configs with
// one consistency group, a primary/secondary pair of real daemons on
// loopback, and readers for the status fields replication tests look at.
//
// A SitePair starts the secondary (b) first, because the primary (a) must
// be given b's replication port ("127.0.0.1:0" in b's config becomes a free
// port at b's first Start(); restarts keep it). Every wait is bounded.
//
// The Require*/Check* steps at the end are for Catch2 test cases: each
// REQUIREs (CheckIdentical CHECKs) and puts what it waited for, the last
// status and the sites' logs into the failure message.
//
// Thread safety: like TestDaemon, one SitePair is used from one thread (the
// test's main thread, which must outlive the daemons).
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "blockrelay/status.h"
#include "testutil/daemon.h"
#include "testutil/nbd_client.h"

namespace blockrelay::testutil {

struct VolumeSpec {
  std::string name;
  uint64_t size_bytes = 16ull << 20;
};

// A site with one group `group` of `role` ("primary" or "secondary")
// holding `volumes` (backing files <dir>/<name>.img), NBD on <dir>/nbd.sock,
// control socket <dir>/control.sock, data_dir <dir>/data. A secondary also
// gets "upstream": {"site": upstream_site} and "replication": {"listen":
// "127.0.0.1:0"}. Edit the result to add region_size, downstream links...
nlohmann::json GroupSiteConfig(const std::filesystem::path& dir,
                               const std::string& site, const std::string& role,
                               const std::vector<VolumeSpec>& volumes,
                               const std::string& group = "g",
                               const std::string& upstream_site = "");

// Appends a downstream link to groups[0] of `config` and returns it (for
// extra keys such as "initial_sync" or "max_queue").
nlohmann::json& AddDownstream(nlohmann::json& config, const std::string& site,
                              uint16_t port, const std::string& mode = "async");

// Everything a file holds (empty if it cannot be read).
std::string ReadWholeFile(const std::filesystem::path& path);
// "" when equal; otherwise where the two files first differ.
std::string CompareFiles(const std::filesystem::path& x,
                         const std::filesystem::path& y);
// A 64-bit hash of the file's bytes (FNV-1a), for before/after checks.
uint64_t FileChecksum(const std::filesystem::path& path);

// Status readers: nullopt when the daemon does not answer or has no such
// entry.
std::optional<nlohmann::json> StatusOf(const TestDaemon& d);
// groups[name == group] of the status reply.
std::optional<nlohmann::json> GroupStatus(const TestDaemon& d,
                                          const std::string& group);
// groups[name == group].downstream[site == site] of the status reply.
std::optional<nlohmann::json> LinkStatus(const TestDaemon& d,
                                         const std::string& group,
                                         const std::string& site);
// groups[name == group].upstream of a secondary's status reply.
std::optional<nlohmann::json> UpstreamStatus(const TestDaemon& d,
                                             const std::string& group);
// Sum over the group's volumes of volumes[].links[site].dirty_regions and
// dirty_bytes.
struct DirtyTotals {
  uint64_t regions = 0;
  uint64_t bytes = 0;
};
std::optional<DirtyTotals> DirtyFor(const TestDaemon& d,
                                    const std::string& group,
                                    const std::string& site);

// Polls the control request {"command": "wait", "group", "link"} until it
// answers caught_up true or `timeout` passes. On failure *last (if given)
// holds the last reply, for the test's message.
bool WaitCaughtUp(const TestDaemon& d, const std::string& group,
                  const std::string& link, std::chrono::milliseconds timeout,
                  nlohmann::json* last = nullptr);

struct PairOptions {
  std::vector<VolumeSpec> volumes = {{"data", 16ull << 20}};
  std::string group = "g";
  std::string mode = "async";           // of a's link to b
  std::string initial_sync = "none";    // of a's link to b
  // More keys of a's link to b ("queue", "max_queue", "max_lag"...); they
  // win over the ones above.
  nlohmann::json link = nlohmann::json::object();
};

// Site a (primary, downstream b) and site b (secondary, upstream a), each
// in its own subdirectory of one TempDir.
class SitePair {
 public:
  explicit SitePair(const PairOptions& options = {});

  TestDaemon& a() { return a_; }
  TestDaemon& b() { return b_; }
  const TestDaemon& a() const { return a_; }
  const TestDaemon& b() const { return b_; }
  const PairOptions& options() const { return options_; }
  std::filesystem::path a_volume(const std::string& name) const;
  std::filesystem::path b_volume(const std::string& name) const;

  // Starts b (if not running), points a's link at b's replication port,
  // then starts a (if not running).
  Status Start();
  uint16_t b_port() const { return b_.port("/replication/listen"); }

  // CompareFiles() for every volume of the group; "" when all are equal.
  std::string CompareVolumes() const;

 private:
  PairOptions options_;
  TempDir root_;
  TestDaemon a_;
  TestDaemon b_;
};

// `blockrelay <args> --socket <d's control socket>`: the operator's CLI
// against one site.
ProcessResult RunCli(const TestDaemon& d, std::vector<std::string> args,
                     std::chrono::milliseconds timeout = std::chrono::seconds(20));

// ---- Catch2 steps (see the top of this file).

// pair.Start(): b, then a.
void RequireStarted(SitePair& pair);
// d.Start(): one site on its own, e.g. again after Stop() or a kill.
void RequireStarted(TestDaemon& d);
// SIGKILL to the daemon, reaped within 10 s: a crash of that site.
void RequireKilled(TestDaemon& d);

// WaitCaughtUp() of a's link to b in the pair's group.
void RequireCaughtUp(SitePair& pair,
                     std::chrono::milliseconds timeout = std::chrono::seconds(30));

// LinkStatus() of a's link to b in the pair's group; null when a does not
// answer or has no such link.
nlohmann::json PairLink(const SitePair& pair);
// Polls PairLink() until it is not null and `pred` holds; `what` names the
// awaited state in the failure message.
void RequireLink(const SitePair& pair, const std::string& what,
                 const std::function<bool(const nlohmann::json&)>& pred,
                 std::chrono::milliseconds timeout = std::chrono::seconds(15));

// CHECKs that every volume of the pair holds the same bytes on a and b.
void CheckIdentical(const SitePair& pair);

// A libnbd connection to export `export_name` of `d` over its Unix socket.
NbdHandle RequireConnect(const TestDaemon& d, const std::string& export_name);

}  // namespace blockrelay::testutil
