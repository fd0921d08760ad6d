// A downstream that stays consistent during resync, with real daemons on
// loopback (site a primary, site b secondary, group "g", volumes "data"
// and "log"): b keeps an undo record while a resync runs, its status says
// whether it is consistent, `blockrelay rollback` returns it byte for byte
// to the state it had before the resync began, and a finished resync drops
// the record. Every scenario ends in a byte-for-byte compare of the sites.
// Waits are bounded polls; the tests signal only the daemons they started.
#include <libnbd.h>
#include <signal.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "testutil/daemon.h"
#include "testutil/nbd_client.h"
#include "testutil/sites.h"

namespace blockrelay {
namespace {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using nlohmann::json;
using testutil::NbdHandle;
using testutil::ProcessResult;
using testutil::SitePair;
using testutil::TestDaemon;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kRegion = 64 * kKiB;  // the default region_size
constexpr auto kTimeout = std::chrono::seconds(30);

// `resync_rate` (of a's link), unless empty.
testutil::PairOptions Options(const std::string& resync_rate) {
  testutil::PairOptions o;
  o.volumes = {{"data", 4 * kMiB}, {"log", 1 * kMiB}};
  if (!resync_rate.empty()) o.link["resync_rate"] = resync_rate;
  return o;
}

// Checksums of b's volumes, for "b is back where it was".
struct Digest {
  uint64_t data = 0, log = 0;
  bool operator==(const Digest&) const = default;
};

class UndoPair {
 public:
  // `resync_rate` (a's link) slows the resync so a test can cut it.
  explicit UndoPair(const std::string& resync_rate = "") : pair_(Options(resync_rate)) {
    testutil::RequireStarted(pair_);
  }

  TestDaemon& a() { return pair_.a(); }
  TestDaemon& b() { return pair_.b(); }
  SitePair& pair() { return pair_; }

  ProcessResult Cli(TestDaemon& d, std::vector<std::string> args) {
    return testutil::RunCli(d, std::move(args), std::chrono::seconds(60));
  }

  void Write(const std::string& volume, uint64_t offset, uint64_t bytes) {
    NbdHandle h = testutil::RequireConnect(a(), volume);
    for (uint64_t done = 0; done < bytes; done += kMiB) {
      const uint64_t n = std::min(kMiB, bytes - done);
      auto data = testutil::Pattern(n, ++seed_);
      REQUIRE(testutil::Pwrite(h.get(), data, offset + done) == 0);
    }
    REQUIRE(testutil::Flush(h.get()) == 0);
  }

  // Every other region of both volumes: the resync sends each on its own.
  void WriteScattered() {
    for (uint64_t off = 0; off < 4 * kMiB; off += 2 * kRegion) Write("data", off, kRegion);
    for (uint64_t off = kRegion; off < 1 * kMiB; off += 2 * kRegion) Write("log", off, kRegion);
  }

  void RequireCaughtUp() { testutil::RequireCaughtUp(pair_, kTimeout); }

  json Upstream() {
    auto u = testutil::UpstreamStatus(b(), "g");
    return u ? *u : json();
  }
  json Link() {
    auto l = testutil::LinkStatus(a(), "g", "b");
    return l ? *l : json();
  }

  void RequireUpstream(const std::string& what, const std::function<bool(const json&)>& pred) {
    json last;
    bool ok = testutil::WaitUntil(
        [&] {
          last = Upstream();
          return last.is_object() && pred(last);
        },
        kTimeout);
    INFO("waiting for: " << what << "; last upstream status of b: " << last.dump());
    INFO("site a log:\n" << a().ReadLog());
    INFO("site b log:\n" << b().ReadLog());
    REQUIRE(ok);
  }

  // The link is resyncing and b has saved at least `bytes` of old data.
  void RequireResyncUnderWay(uint64_t bytes) {
    RequireUpstream(fmt::format("consistent false, undo_bytes >= {}", bytes), [&](const json& u) {
      return !u.value("consistent", true) && u.value("undo_bytes", uint64_t{0}) >= bytes;
    });
    json link = Link();
    INFO("link: " << link.dump());
    REQUIRE(link.value("state", "") == "resyncing");
  }

  void Pause() {
    ProcessResult r = Cli(a(), {"pause", "g", "--link", "b"});
    INFO(r.out << r.err);
    REQUIRE(r.exit_code == 0);
    RequireUpstream("upstream gone", [](const json& u) {
      return u.value("state", "") != "connected";
    });
  }
  void Resume() {
    ProcessResult r = Cli(a(), {"resume", "g", "--link", "b"});
    INFO(r.out << r.err);
    REQUIRE(r.exit_code == 0);
  }

  Digest DigestB() {
    return Digest{testutil::FileChecksum(pair_.b_volume("data")),
                  testutil::FileChecksum(pair_.b_volume("log"))};
  }
  fs::path UndoFile() { return b().dir() / "data" / "undo-g.log"; }

  // Every volume's status entry on b says `consistent`.
  void CheckVolumesSay(bool consistent) {
    auto status = testutil::StatusOf(b());
    REQUIRE(status);
    for (const auto& v : (*status)["groups"][0]["volumes"]) {
      INFO(v.dump());
      CHECK(v.value("consistent", !consistent) == consistent);
    }
  }

  void RequireIdentical() {
    INFO("site a log:\n" << a().ReadLog());
    INFO("site b log:\n" << b().ReadLog());
    CHECK(pair_.CompareVolumes() == "");
  }

 private:
  SitePair pair_;
  uint64_t seed_ = 500;
};

// Common start: a and b identical with data everywhere, then writes on a
// while the link is paused. Returns b's digest before the resync.
Digest Prepare(UndoPair& p) {
  p.Write("data", 0, 4 * kMiB);
  p.Write("log", 0, 1 * kMiB);
  p.RequireCaughtUp();
  p.RequireIdentical();
  p.RequireUpstream("consistent", [](const json& u) { return u.value("consistent", false); });
  const Digest before = p.DigestB();
  p.Pause();
  p.WriteScattered();
  return before;
}

TEST_CASE("Resync undo: a resync cut off half way is rolled back to the "
          "state before it, byte for byte",
          "[replication][undo]") {
  UndoPair p("512KiB/s");
  const Digest before = Prepare(p);
  p.Resume();
  p.RequireResyncUnderWay(512 * kKiB);
  // A streamed write while the resync runs (into regions the resync does
  // not send) must be undone too.
  p.Write("data", kRegion, kRegion);
  p.Write("log", 0, kRegion);
  p.RequireResyncUnderWay(1 * kMiB);

  // While the upstream is connected, rollback is refused.
  ProcessResult busy = p.Cli(p.b(), {"rollback", "g"});
  CHECK(busy.exit_code == 1);
  CHECK_THAT(busy.err, Contains("connected"));

  p.Pause();  // cuts the resync off
  {
    json u = p.Upstream();
    INFO(u.dump());
    CHECK_FALSE(u.value("consistent", true));
    CHECK(u.value("undo_bytes", uint64_t{0}) > 0);
  }
  p.CheckVolumesSay(false);
  ProcessResult text = p.Cli(p.b(), {"status"});
  CHECK_THAT(text.out, Contains("INCONSISTENT"));
  REQUIRE(fs::exists(p.UndoFile()));
  REQUIRE_FALSE(p.DigestB() == before);  // the resync did change b

  ProcessResult r = p.Cli(p.b(), {"rollback", "g", "--json"});
  INFO("rollback: " << r.out << r.err);
  INFO("site b log:\n" << p.b().ReadLog());
  REQUIRE(r.exit_code == 0);
  json reply = json::parse(r.out);
  CHECK(reply.value("rolled_back", false));
  CHECK(reply.value("restored_bytes", uint64_t{0}) >= 1 * kMiB);

  CHECK(p.DigestB() == before);
  CHECK_FALSE(fs::exists(p.UndoFile()));
  {
    json u = p.Upstream();
    INFO(u.dump());
    CHECK(u.value("consistent", false));
    CHECK(u.value("undo_bytes", uint64_t{1}) == 0);
    CHECK(u.value("full_resync_requested", false));
  }
  p.CheckVolumesSay(true);

  // A second rollback finds nothing to do.
  ProcessResult again = p.Cli(p.b(), {"rollback", "g"});
  CHECK(again.exit_code == 0);
  CHECK_THAT(again.out, Contains("already consistent"));

  // b asks a for a full resync: a and b end identical.
  p.Resume();
  p.RequireCaughtUp();
  p.RequireUpstream("consistent after the full resync", [](const json& u) {
    return u.value("consistent", false) && !u.contains("full_resync_requested");
  });
  p.RequireIdentical();
}

// Issue 5: "resync cut off half way, then promote -> downstream rolls back
// to consistent state". The failure cuts the resync off (here: a's link is
// paused, as if a had gone away); promoting b must not hand out a volume
// that mixes old and resynced regions.
TEST_CASE("Resync undo: promoting b after its resync was cut off half way "
          "first rolls it back to the state before the resync",
          "[replication][undo]") {
  UndoPair p("512KiB/s");
  const Digest before = Prepare(p);
  p.Resume();
  p.RequireResyncUnderWay(512 * kKiB);
  p.Pause();  // cuts the resync off
  REQUIRE_FALSE(p.DigestB() == before);

  ProcessResult r = p.Cli(p.b(), {"promote", "g", "--json"});
  INFO("promote: " << r.out << r.err);
  INFO("site b log:\n" << p.b().ReadLog());
  REQUIRE(r.exit_code == 0);
  json reply = json::parse(r.out);
  CHECK(reply.value("role", "") == "primary");
  CHECK(reply.value("rolled_back", false));
  CHECK(reply.value("restored_bytes", uint64_t{0}) >= 512 * kKiB);

  // b holds exactly what a and b both held before the resync began.
  CHECK(p.DigestB() == before);
  CHECK_FALSE(fs::exists(p.UndoFile()));
  p.CheckVolumesSay(true);

  // And b is a writable primary now.
  testutil::NbdOptions options;
  options.export_name = "log";
  std::string error;
  NbdHandle h = testutil::ConnectUnix(*p.b().nbd_unix_socket(), options, &error);
  INFO("libnbd: " << error);
  REQUIRE(h != nullptr);
  auto data = testutil::Pattern(4 * kKiB, 4242);
  CHECK(testutil::Pwrite(h.get(), data, 0) == 0);
}

TEST_CASE("Resync undo: a resync that finishes drops the undo record and b "
          "is consistent",
          "[replication][undo]") {
  UndoPair p;
  Prepare(p);
  p.Resume();
  p.RequireCaughtUp();
  p.RequireUpstream("consistent, no undo", [](const json& u) {
    return u.value("consistent", false) && u.value("undo_bytes", uint64_t{1}) == 0;
  });
  CHECK_FALSE(fs::exists(p.UndoFile()));
  p.CheckVolumesSay(true);
  ProcessResult text = p.Cli(p.b(), {"status"});
  CHECK_THAT(text.out, Contains("consistent"));
  CHECK_THAT(text.out, !Contains("INCONSISTENT"));
  ProcessResult r = p.Cli(p.b(), {"rollback", "g"});
  CHECK(r.exit_code == 0);
  CHECK_THAT(r.out, Contains("already consistent"));
  p.RequireIdentical();
}

TEST_CASE("Resync undo: after kill -9 of b during the resync, b restarts "
          "inconsistent and rollback restores it",
          "[replication][undo]") {
  UndoPair p("512KiB/s");
  const Digest before = Prepare(p);
  p.Resume();
  p.RequireResyncUnderWay(1 * kMiB);
  testutil::RequireKilled(p.b());
  // Keep a from reconnecting (and finishing the resync) meanwhile.
  ProcessResult paused = p.Cli(p.a(), {"pause", "g", "--link", "b"});
  REQUIRE(paused.exit_code == 0);

  testutil::RequireStarted(p.b());
  {
    json u = p.Upstream();
    INFO(u.dump());
    CHECK_FALSE(u.value("consistent", true));
    CHECK(u.value("undo_bytes", uint64_t{0}) > 0);
  }
  p.CheckVolumesSay(false);
  CHECK_THAT(p.b().ReadLog(), Contains("rollback g"));

  ProcessResult r = p.Cli(p.b(), {"rollback", "g"});
  INFO("rollback: " << r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK_THAT(r.out, Contains("rolled back"));
  CHECK(p.DigestB() == before);
  CHECK_FALSE(fs::exists(p.UndoFile()));

  // A restart keeps the request for a full resync, which repairs b.
  REQUIRE(p.b().Stop().has_value());
  testutil::RequireStarted(p.b());
  CHECK(p.Upstream().value("full_resync_requested", false));
  CHECK(p.DigestB() == before);
  p.Resume();
  p.RequireCaughtUp();
  p.RequireIdentical();
}

TEST_CASE("Resync undo: a restarted b whose resync then completes is "
          "consistent without a rollback",
          "[replication][undo]") {
  UndoPair p("1MiB/s");
  Prepare(p);
  p.Resume();
  p.RequireResyncUnderWay(256 * kKiB);
  testutil::RequireKilled(p.b());
  Status s = p.b().Start();
  REQUIRE(s.ok());
  // a reconnects by itself and resyncs what is still dirty.
  p.RequireCaughtUp();
  p.RequireUpstream("consistent", [](const json& u) { return u.value("consistent", false); });
  CHECK_FALSE(fs::exists(p.UndoFile()));
  p.RequireIdentical();
}

// Goal: the rollback's writes go through b's Volume write path, so b's own
// downstream (a chain a -> b -> c) ends identical to the rolled-back b.
TEST_CASE("Resync undo: a rollback in the middle of a chain reaches the next "
          "site",
          "[replication][undo]") {
  testutil::TempDir root("blockrelay-undo-chain");
  const std::vector<testutil::VolumeSpec> vols = {{"data", 2 * kMiB}};
  for (const char* s : {"a", "b", "c"}) fs::create_directories(root.path() / s);
  TestDaemon c(root.path() / "c",
               testutil::GroupSiteConfig(root.path() / "c", "c", "secondary", vols, "g", "b"));
  REQUIRE(c.Start().ok());
  json b_config = testutil::GroupSiteConfig(root.path() / "b", "b", "secondary", vols, "g", "a");
  testutil::AddDownstream(b_config, "c", c.port("/replication/listen"))["initial_sync"] = "none";
  TestDaemon b(root.path() / "b", b_config);
  REQUIRE(b.Start().ok());
  json a_config = testutil::GroupSiteConfig(root.path() / "a", "a", "primary", vols, "g");
  json& link = testutil::AddDownstream(a_config, "b", b.port("/replication/listen"));
  link["initial_sync"] = "none";
  link["resync_rate"] = "256KiB/s";
  TestDaemon a(root.path() / "a", a_config);
  REQUIRE(a.Start().ok());
  auto cli = [](TestDaemon& d, std::vector<std::string> args) {
    return testutil::RunCli(d, std::move(args), std::chrono::seconds(60));
  };
  auto write = [&](uint64_t offset, uint64_t bytes, uint64_t seed) {
    NbdHandle h = testutil::RequireConnect(a, "data");
    REQUIRE(testutil::Pwrite(h.get(), testutil::Pattern(bytes, seed), offset) == 0);
    REQUIRE(testutil::Flush(h.get()) == 0);
  };
  const fs::path a_vol = root.path() / "a" / "data.img";
  const fs::path b_vol = root.path() / "b" / "data.img";
  const fs::path c_vol = root.path() / "c" / "data.img";
  auto logs = [&] {
    return "a:\n" + a.ReadLog() + "\nb:\n" + b.ReadLog() + "\nc:\n" + c.ReadLog();
  };

  write(0, 2 * kMiB, 1);
  REQUIRE(testutil::WaitCaughtUp(a, "g", "b", kTimeout));
  REQUIRE(testutil::WaitCaughtUp(b, "g", "c", kTimeout));
  const uint64_t before = testutil::FileChecksum(b_vol);
  REQUIRE(cli(a, {"pause", "g", "--link", "b"}).exit_code == 0);
  for (uint64_t off = 0; off < 2 * kMiB; off += 2 * kRegion) write(off, kRegion, 100 + off);
  REQUIRE(cli(a, {"resume", "g", "--link", "b"}).exit_code == 0);
  json last;
  bool under_way = testutil::WaitUntil(
      [&] {
        auto u = testutil::UpstreamStatus(b, "g");
        if (u) last = *u;
        return u && !u->value("consistent", true) &&
               u->value("undo_bytes", uint64_t{0}) >= 256 * kKiB;
      },
      kTimeout);
  INFO("b's upstream: " << last.dump());
  INFO(logs());
  REQUIRE(under_way);
  REQUIRE(cli(a, {"pause", "g", "--link", "b"}).exit_code == 0);
  REQUIRE(testutil::WaitUntil(
      [&] {
        auto u = testutil::UpstreamStatus(b, "g");
        return u && u->value("state", "") != "connected";
      },
      kTimeout));
  ProcessResult r = cli(b, {"rollback", "g"});
  INFO("rollback: " << r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(testutil::FileChecksum(b_vol) == before);
  // c gets the restored bytes from b's link.
  REQUIRE(testutil::WaitCaughtUp(b, "g", "c", kTimeout));
  CHECK(testutil::CompareFiles(b_vol, c_vol) == "");
  // And the full resync from a makes all three identical.
  REQUIRE(cli(a, {"resume", "g", "--link", "b"}).exit_code == 0);
  REQUIRE(testutil::WaitCaughtUp(a, "g", "b", kTimeout));
  REQUIRE(testutil::WaitCaughtUp(b, "g", "c", kTimeout));
  CHECK(testutil::CompareFiles(a_vol, b_vol) == "");
  CHECK(testutil::CompareFiles(b_vol, c_vol) == "");
}

TEST_CASE("Resync undo: rollback names an unknown group and needs a group",
          "[replication][undo]") {
  UndoPair p;
  ProcessResult unknown = p.Cli(p.b(), {"rollback", "nope"});
  CHECK(unknown.exit_code == 1);
  CHECK_THAT(unknown.err, Contains("no secondary group \"nope\""));
  // On the primary, the group is not a secondary one.
  ProcessResult primary = p.Cli(p.a(), {"rollback", "g"});
  CHECK(primary.exit_code == 1);
  CHECK_THAT(primary.err, Contains("no secondary group \"g\""));
  ProcessResult usage = testutil::RunBlockrelay({"rollback"});
  CHECK(usage.exit_code == 2);
  auto reply = p.b().Control({{"command", "rollback"}});
  REQUIRE(reply.ok());
  CHECK_THAT(reply->value("error", ""), Contains("\"group\""));
}

}  // namespace
}  // namespace blockrelay
