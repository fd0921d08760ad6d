// The receiver's pure checks (src/replication/receiver.h): CheckHello decides
// whether an upstream may push into a secondary group, and CheckWriteGroup
// refuses ops outside the group's volumes before anything is journaled.
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "blockrelay/config/site_config.h"
#include "blockrelay/core/volume.h"
#include "replication/protocol.h"
#include "replication/receiver.h"
#include "testutil/fault_injection_block_store.h"

namespace blockrelay::replication {
namespace {

using Catch::Matchers::Contains;

constexpr uint64_t kU64Max = std::numeric_limits<uint64_t>::max();
constexpr uint64_t kV0Bytes = 1 << 20;
constexpr uint64_t kV1Bytes = 2 << 20;
constexpr uint64_t kRegionBytes = 64 << 10;

std::shared_ptr<core::Volume> MakeVolume(const std::string& group,
                                         const std::string& name,
                                         uint64_t size_bytes) {
  return std::make_shared<core::Volume>(
      group, name, std::make_unique<testutil::FaultInjectionBlockStore>(size_bytes),
      /*metadata=*/nullptr, /*read_only=*/true);
}

// Site "berlin" with two secondary groups: "other" (one volume) and "db"
// (volumes v0 and v1), both taking writes from site "paris".
struct Fixture {
  Fixture() {
    other.name = "other";
    other.role = config::Role::kSecondary;
    other.upstream = config::UpstreamConfig{"paris", std::nullopt};
    db.name = "db";
    db.role = config::Role::kSecondary;
    db.region_size_bytes = kRegionBytes;
    db.upstream = config::UpstreamConfig{"paris", std::nullopt};

    ReceiverTarget t0;
    t0.config = &other;
    t0.volumes = {MakeVolume("other", "x", 4096)};
    ReceiverTarget t1;
    t1.config = &db;
    t1.volumes = {MakeVolume("db", "v0", kV0Bytes), MakeVolume("db", "v1", kV1Bytes)};
    targets = {t0, t1};

    hello.site = "paris";
    hello.group = "db";
    hello.region_size_bytes = kRegionBytes;
    hello.volumes = {{"v0", kV0Bytes}, {"v1", kV1Bytes}};
    hello.generation = "gen-1";
  }
  HelloCheck Check() const { return CheckHello(hello, "berlin", targets); }

  config::GroupConfig other;
  config::GroupConfig db;
  std::vector<ReceiverTarget> targets;
  Hello hello;
};

// --- CheckHello -------------------------------------------------------------

TEST_CASE("CheckHello: the configured upstream with matching volumes is accepted",
          "[replication]") {
  Fixture f;
  HelloCheck c = f.Check();
  CHECK(c.result == HelloResult::kAccepted);
  CHECK(c.message.empty());
  CHECK(c.target == 1);
}

TEST_CASE("CheckHello: an unknown group is refused naming the group and this site",
          "[replication]") {
  Fixture f;
  f.hello.group = "nosuch";
  HelloCheck c = f.Check();
  CHECK(c.result == HelloResult::kUnknownGroup);
  CHECK_THAT(c.message, Contains("\"nosuch\"") && Contains("berlin"));
}

TEST_CASE("CheckHello: a site other than the configured upstream is refused naming both",
          "[replication]") {
  Fixture f;
  f.hello.site = "tokyo";
  HelloCheck c = f.Check();
  CHECK(c.result == HelloResult::kWrongSite);
  CHECK_THAT(c.message, Contains("site paris") && Contains("site tokyo") &&
                            Contains("db") && Contains("berlin"));
}

TEST_CASE("CheckHello: a group with no upstream configured takes writes from no site",
          "[replication]") {
  Fixture f;
  f.db.upstream.reset();
  HelloCheck c = f.Check();
  CHECK(c.result == HelloResult::kWrongSite);
  CHECK_THAT(c.message, Contains("not from site paris") && Contains("db"));
}

TEST_CASE("CheckHello: a different region size is a mismatch naming both sizes",
          "[replication]") {
  Fixture f;
  f.hello.region_size_bytes = 128 << 10;
  HelloCheck c = f.Check();
  CHECK(c.result == HelloResult::kMismatch);
  CHECK_THAT(c.message, Contains("region_size") && Contains("65536") &&
                            Contains("131072") && Contains("berlin") &&
                            Contains("paris"));
}

TEST_CASE("CheckHello: a different volume count is a mismatch listing both sides' volumes",
          "[replication]") {
  Fixture f;
  SECTION("fewer upstream") {
    f.hello.volumes = {{"v0", kV0Bytes}};
    HelloCheck c = f.Check();
    CHECK(c.result == HelloResult::kMismatch);
    CHECK_THAT(c.message, Contains("2 volume(s) on site berlin (v0, v1)") &&
                              Contains("1 on site paris (v0)"));
  }
  SECTION("more upstream") {
    f.hello.volumes.push_back({"v2", 4096});
    HelloCheck c = f.Check();
    CHECK(c.result == HelloResult::kMismatch);
    CHECK_THAT(c.message, Contains("(v0, v1)") && Contains("(v0, v1, v2)"));
  }
}

TEST_CASE("CheckHello: a different volume name at an index is a mismatch naming both",
          "[replication]") {
  Fixture f;
  SECTION("renamed") { f.hello.volumes[1].name = "vX"; }
  SECTION("same names in another order") {
    f.hello.volumes = {{"v1", kV1Bytes}, {"v0", kV0Bytes}};
  }
  HelloCheck c = f.Check();
  CHECK(c.result == HelloResult::kMismatch);
  CHECK_THAT(c.message, Contains("berlin") && Contains("paris"));
  if (f.hello.volumes[1].name == "vX") {
    CHECK_THAT(c.message, Contains("volume 1") && Contains("\"v1\"") &&
                              Contains("\"vX\""));
  } else {
    CHECK_THAT(c.message, Contains("volume 0") && Contains("\"v0\"") &&
                              Contains("\"v1\""));
  }
}

TEST_CASE("CheckHello: a different volume size is a mismatch naming both sizes and sites",
          "[replication]") {
  Fixture f;
  f.hello.volumes[1].size_bytes = 3 << 20;
  HelloCheck c = f.Check();
  CHECK(c.result == HelloResult::kMismatch);
  CHECK_THAT(c.message, Contains("v1") && Contains("2097152 bytes on site berlin") &&
                            Contains("3145728 bytes on site paris"));
}

// --- CheckWriteGroup ----------------------------------------------------------

Op Write(uint32_t volume, uint64_t offset, const Bytes& data) {
  Op op;
  op.type = OpType::kWrite;
  op.volume = volume;
  op.offset = offset;
  op.length = data.size();
  op.data = data;
  return op;
}

Op Trim(uint32_t volume, uint64_t offset, uint64_t length) {
  Op op;
  op.type = OpType::kTrim;
  op.volume = volume;
  op.offset = offset;
  op.length = length;
  return op;
}

TEST_CASE("CheckWriteGroup: ops inside the volumes are accepted, up to the last byte",
          "[replication]") {
  Fixture f;
  const Bytes data(512, std::byte{1});
  WriteGroup g;
  g.link_seq = 5;
  g.ops = {Write(0, 0, data), Write(0, kV0Bytes - 512, data),
           Trim(1, 0, kV1Bytes), Trim(1, kV1Bytes, 0)};
  Status s = CheckWriteGroup(g, f.targets[1]);
  INFO(s.ToString());
  CHECK(s.ok());
  CHECK(CheckWriteGroup(WriteGroup{}, f.targets[1]).ok());
}

TEST_CASE("CheckWriteGroup: a volume index past the group's volumes is Corruption",
          "[replication]") {
  Fixture f;
  WriteGroup g;
  g.link_seq = 5;
  g.ops = {Trim(0, 0, 4096), Trim(2, 0, 4096)};
  Status s = CheckWriteGroup(g, f.targets[1]);
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Contains("WRITE_GROUP 5 op 1") &&
                              Contains("volume index 2") && Contains("2 volume(s)"));
}

TEST_CASE("CheckWriteGroup: an op past the end of its volume is Corruption",
          "[replication]") {
  Fixture f;
  const Bytes data(512, std::byte{1});
  WriteGroup g;
  g.link_seq = 9;
  SECTION("crossing the end") { g.ops = {Write(0, kV0Bytes - 256, data)}; }
  SECTION("starting past the end") { g.ops = {Trim(0, kV0Bytes + 1, 0)}; }
  SECTION("each volume has its own size: v0 past its end though v1 is larger") {
    g.ops = {Trim(1, kV1Bytes - 4096, 4096), Trim(0, kV0Bytes, 4096)};
  }
  Status s = CheckWriteGroup(g, f.targets[1]);
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Contains("WRITE_GROUP 9") && Contains("volume v0") &&
                              Contains("1048576 bytes"));
}

TEST_CASE("CheckWriteGroup: an op whose offset + length overflows is Corruption",
          "[replication]") {
  Fixture f;
  WriteGroup g;
  g.link_seq = 1;
  SECTION("huge length") { g.ops = {Trim(0, 4096, kU64Max - 100)}; }
  SECTION("huge offset") { g.ops = {Trim(0, kU64Max, 2)}; }
  SECTION("both near the top") { g.ops = {Trim(0, kU64Max / 2 + 1, kU64Max / 2 + 1)}; }
  Status s = CheckWriteGroup(g, f.targets[1]);
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Contains("beyond the end of volume v0"));
}

}  // namespace
}  // namespace blockrelay::replication
