// "initial_sync": "checksum" with real daemons on loopback (site a primary,
// site b secondary): a downstream whose volume already holds most of the
// primary's bytes (a copy, or a restored backup) gets only the regions
// whose digests differ; writes during the compare are not lost; the
// compare survives a restart of the primary in the middle. Checks end with
// the backing files compared byte for byte.
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "testutil/daemon.h"
#include "testutil/nbd_client.h"
#include "testutil/sites.h"

namespace blockrelay {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testutil::NbdHandle;
using testutil::Pattern;
using testutil::RequireCaughtUp;
using testutil::RequireStarted;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kRegionBytes = 64 * kKiB;  // the default region_size

void WriteFile(const fs::path& path, uint64_t offset, const std::vector<std::byte>& data) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  if (!f.good()) f.open(path, std::ios::out | std::ios::binary);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  f.flush();
  REQUIRE(f.good());
}

// Site a (primary, link to b with `initial_sync`) and site b (secondary)
// over copies of one volume "data" of `volume_bytes`, made before either
// site ever ran: the same pattern over the whole volume, then the regions
// `a_regions` changed on a and `b_regions` on b.
class CopiesPair : public testutil::SitePair {
 public:
  CopiesPair(const std::string& initial_sync, uint64_t volume_bytes,
             const std::vector<uint64_t>& a_regions,
             const std::vector<uint64_t>& b_regions)
      : SitePair(Options(initial_sync, volume_bytes)) {
    fs::create_directories(a_volume("data").parent_path());
    fs::create_directories(b_volume("data").parent_path());
    WriteFile(a_volume("data"), 0, Pattern(volume_bytes, 11));
    fs::copy_file(a_volume("data"), b_volume("data"),
                  fs::copy_options::overwrite_existing);
    uint64_t seed = 100;
    for (uint64_t r : a_regions) WriteFile(a_volume("data"), r * kRegionBytes, Pattern(kRegionBytes, ++seed));
    for (uint64_t r : b_regions) WriteFile(b_volume("data"), r * kRegionBytes, Pattern(kRegionBytes, ++seed));
    REQUIRE(CompareVolumes() != "");
  }

  // a's status of its link to b; a must answer.
  json Link() const {
    json link = testutil::PairLink(*this);
    REQUIRE_FALSE(link.is_null());
    return link;
  }

 private:
  static testutil::PairOptions Options(const std::string& initial_sync,
                                       uint64_t volume_bytes) {
    testutil::PairOptions o;
    o.initial_sync = initial_sync;
    o.volumes = {{"data", volume_bytes}};
    return o;
  }
};

TEST_CASE("Checksum initial sync: a downstream copied from the primary gets "
          "only the regions that differ",
          "[replication]") {
  CopiesPair pair("checksum", 16 * kMiB, /*a_regions=*/{0, 77, 255}, /*b_regions=*/{130});

  RequireStarted(pair);
  RequireCaughtUp(pair);
  CHECK(pair.CompareVolumes() == "");
  json link = pair.Link();
  INFO(link.dump());
  CHECK(link.value("resync_bytes_sent", uint64_t{0}) == 4 * kRegionBytes);
  const json& compare = link["checksum_compare"];
  CHECK(compare.value("running", true) == false);
  CHECK(compare.value("pending", true) == false);
  CHECK(compare.value("regions_total", uint64_t{0}) == 256);
  CHECK(compare.value("regions_done", uint64_t{0}) == 256);
  CHECK(compare.value("differing_regions", uint64_t{0}) == 4);
  CHECK(compare.value("matched_regions", uint64_t{0}) == 252);
  CHECK(compare.value("matched_bytes", uint64_t{0}) == 252 * kRegionBytes);
}

// The contrast: "none" is the operator's word that both sides are the same.
// A fresh downstream has no scoreboard slot for its upstream, and must not
// turn that into a request for a full resync at its first connect.
TEST_CASE("Checksum initial sync: with initial_sync none nothing is "
          "resynced, not even regions that do differ",
          "[replication]") {
  CopiesPair pair("none", 16 * kMiB, /*a_regions=*/{3}, /*b_regions=*/{});

  RequireStarted(pair);
  RequireCaughtUp(pair);
  json link = pair.Link();
  INFO(link.dump());
  INFO("site b log:\n" << pair.b().ReadLog());
  CHECK(link.value("resync_bytes_sent", uint64_t{1}) == 0);
  CHECK(pair.CompareVolumes() != "");  // region 3 was declared equal
}

TEST_CASE("Checksum initial sync: with initial_sync full the same copy is "
          "sent whole",
          "[replication]") {
  // The control for the test above: what the compare saves.
  CopiesPair pair("full", 16 * kMiB, /*a_regions=*/{0, 77, 255}, /*b_regions=*/{130});

  RequireStarted(pair);
  RequireCaughtUp(pair);
  CHECK(pair.CompareVolumes() == "");
  json link = pair.Link();
  INFO(link.dump());
  CHECK(link.value("resync_bytes_sent", uint64_t{0}) == 16 * kMiB);
  CHECK_FALSE(link.contains("checksum_compare"));
}

TEST_CASE("Checksum initial sync: writes during the compare reach the "
          "downstream",
          "[replication]") {
  // Goal: a region that matched when it was read but is written before its
  // answer comes back keeps its bit (MarkClean at the read's WriteSeq: the
  // bit stays when its 4 MiB intent extent saw a newer write), and
  // streamed writes are applied after the digests were taken. The writes
  // all go to the first intent extent, so only it loses the compare's
  // savings.
  CopiesPair pair("checksum", 64 * kMiB, /*a_regions=*/{5}, /*b_regions=*/{900});

  RequireStarted(pair);
  {
    NbdHandle h = testutil::RequireConnect(pair.a(), "data");
    // Over the first 4 MiB (one intent extent), while the compare runs
    // from the start of the volume.
    for (uint64_t k = 0; k < 200; ++k) {
      const uint64_t offset = (k * 37 % 64) * kRegionBytes + (k % 16) * 4 * kKiB;
      REQUIRE(testutil::Pwrite(h.get(), Pattern(4 * kKiB, 500 + k), offset) == 0);
    }
    REQUIRE(testutil::Flush(h.get()) == 0);
  }
  RequireCaughtUp(pair);
  CHECK(pair.CompareVolumes() == "");
  json link = pair.Link();
  INFO(link.dump());
  CHECK(link["checksum_compare"].value("regions_done", uint64_t{0}) > 0);
  // At most the first extent and the region that differs on b went as
  // resync data (the rest of the volume matched).
  CHECK(link.value("resync_bytes_sent", uint64_t{0}) <= 4 * kMiB + kRegionBytes);
}

TEST_CASE("Checksum initial sync: a restart of the primary before the "
          "compare ran still compares instead of sending everything",
          "[replication]") {
  CopiesPair pair("checksum", 16 * kMiB, /*a_regions=*/{3}, /*b_regions=*/{});
  // a starts with its new slot (all dirty) while b is not up (port 1 on
  // loopback refuses), so nothing is compared; then a stops.
  pair.a().config()["groups"][0]["downstream"][0]["address"] = "127.0.0.1:1";
  RequireStarted(pair.a());
  json link = pair.Link();
  CHECK(link["checksum_compare"].value("pending", false) == true);
  REQUIRE(pair.a().Stop() == 0);

  RequireStarted(pair);
  RequireCaughtUp(pair);
  CHECK(pair.CompareVolumes() == "");
  link = pair.Link();
  INFO(link.dump());
  CHECK(link["checksum_compare"].value("differing_regions", uint64_t{0}) == 1);
  CHECK(link.value("resync_bytes_sent", uint64_t{0}) == kRegionBytes);
}

}  // namespace
}  // namespace blockrelay
