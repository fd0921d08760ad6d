// InspectVolumeMetadata and its text rendering.

#include <unistd.h>

#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "blockrelay/io/data_dir_lock.h"
#include "blockrelay/storage/inspect.h"
#include "blockrelay/storage/volume_metadata.h"
#include "testutil/volume_fixture.h"

namespace blockrelay::storage {
namespace {

using testutil::VolumeFixture;

constexpr uint64_t kMiB = 1ull << 20;

config::SiteConfig SiteWith(std::vector<std::pair<std::string, config::InitialSync>> links) {
  config::SiteConfig site;
  site.site = "a";
  site.data_dir = VolumeFixture::kDataDir;
  config::GroupConfig group;
  group.name = "g";
  group.volumes.push_back(config::VolumeConfig{"v", VolumeFixture::kBacking, 64 * kMiB});
  group.volumes.push_back(config::VolumeConfig{"never", "/never.img", 64 * kMiB});
  for (auto& [name, sync] : links) {
    config::DownstreamConfig d;
    d.site = name;
    d.initial_sync = sync;
    group.downstream.push_back(d);
  }
  site.groups.push_back(group);
  return site;
}

// Volume g/v with slots b (clean) and c (all dirty), 3 regions written.
void PrepareVolume(VolumeFixture& fx, bool close) {
  auto meta = fx.OpenOk(fx.Options(64 * kMiB, 64 << 10, {{"b", true}, {"c", false}}));
  REQUIRE(meta->scoreboard().MarkDirty(0, 3 * 65536).ok());
  if (close) REQUIRE(meta->Close().ok());
}

TEST_CASE("Inspect: reports the superblock and each slot's dirty regions and bytes",
          "[metadata]") {
  VolumeFixture fx;
  PrepareVolume(fx, /*close=*/true);
  auto report = InspectVolumeMetadata(
      SiteWith({{"b", config::InitialSync::kNone}, {"c", config::InitialSync::kFull},
                {"d", config::InitialSync::kNone}}),
      &fx.env);
  REQUIRE(report.ok());
  const nlohmann::json& v = (*report)["volumes"][0];
  INFO(v.dump(2));
  CHECK(v["state"] == "ok");
  CHECK(v["metadata_path"] == "/data/g/v.meta");
  CHECK(v["format_version"] == 1);
  CHECK(v["size_bytes"] == 64 * kMiB);
  CHECK(v["region_size_bytes"] == 65536);
  CHECK(v["region_count"] == 1024);
  CHECK(v["clean_shutdown"] == true);
  CHECK(v["intent_extents_in_use"] == 0);  // Close leaves nothing to merge
  CHECK(v["backing"]["kind"] == "file");
  CHECK(v["backing"]["path"] == "/backing.img");
  CHECK(v["generation"]["counter"] == 1);
  REQUIRE(v["slots"].size() == 2);
  CHECK(v["slots"][0]["site"] == "b");
  CHECK(v["slots"][0]["dirty_regions"] == 3);
  CHECK(v["slots"][0]["dirty_bytes"] == 3 * 65536);
  CHECK(v["slots"][0]["initial_sync_none"] == true);
  CHECK(v["slots"][1]["site"] == "c");
  CHECK(v["slots"][1]["dirty_bytes"] == 64 * kMiB);
  CHECK(v["slots"][1]["configured"] == true);
  REQUIRE(v["pending_sites"].size() == 1);
  CHECK(v["pending_sites"][0]["site"] == "d");
  CHECK((*report)["volumes"][1]["state"] == "missing");
}

TEST_CASE("Inspect: after a crash the intent extents in use count as dirty", "[metadata]") {
  VolumeFixture fx;
  PrepareVolume(fx, /*close=*/false);
  fx.env.DropUnsyncedWrites();
  auto report = InspectVolumeMetadata(SiteWith({{"b", config::InitialSync::kNone}}), &fx.env);
  REQUIRE(report.ok());
  const nlohmann::json& v = (*report)["volumes"][0];
  CHECK(v["clean_shutdown"] == false);
  CHECK(v["intent_extents_in_use"] == 1);
  CHECK(v["slots"][0]["dirty_regions"] == 64);  // one 4 MiB extent
  CHECK(v["slots"][1]["configured"] == false);  // c is gone from the config
}

TEST_CASE("Inspect: changes nothing on disk", "[metadata]") {
  VolumeFixture fx;
  PrepareVolume(fx, /*close=*/false);
  std::vector<std::byte> before = fx.ReadRaw(0, 64 * 1024);
  REQUIRE(InspectVolumeMetadata(SiteWith({}), &fx.env).ok());
  CHECK(fx.ReadRaw(0, 64 * 1024) == before);
  CHECK(fx.env.unsynced_write_count() == 0);
}

TEST_CASE("Inspect: refused while a blockrelay process holds the data_dir lock", "[metadata]") {
  VolumeFixture fx;
  PrepareVolume(fx, /*close=*/true);
  auto lock = io::LockDataDir(&fx.env, VolumeFixture::kDataDir);
  REQUIRE(lock.ok());
  auto report = InspectVolumeMetadata(SiteWith({}), &fx.env);
  REQUIRE_FALSE(report.ok());
  CHECK(report.status().code() == Status::Code::kBusy);
  CHECK_THAT(report.status().message(),
             Catch::Contains("in use by a running blockrelay process (pid " +
                             std::to_string(::getpid()) + ")"));
}

TEST_CASE("Inspect: a corrupt metadata file is reported per volume", "[metadata]") {
  VolumeFixture fx;
  PrepareVolume(fx, /*close=*/true);
  fx.FlipByte(100);
  fx.FlipByte(4096 + 100);
  auto report = InspectVolumeMetadata(SiteWith({}), &fx.env);
  REQUIRE(report.ok());
  const nlohmann::json& v = (*report)["volumes"][0];
  CHECK(v["state"] == "error");
  CHECK_THAT(v["error"].get<std::string>(),
             Catch::Contains("both superblock copies are unreadable"));
}

TEST_CASE("Inspect: the text form is an aligned table per volume", "[metadata]") {
  VolumeFixture fx;
  PrepareVolume(fx, /*close=*/true);
  auto report = InspectVolumeMetadata(
      SiteWith({{"b", config::InitialSync::kNone}, {"c", config::InitialSync::kFull},
                {"newsite", config::InitialSync::kFull}}),
      &fx.env);
  REQUIRE(report.ok());
  std::string text = RenderInspectText(*report);
  INFO(text);
  CHECK_THAT(text, Catch::Contains("volume g/v  /data/g/v.meta"));
  CHECK_THAT(text, Catch::Contains("shutdown        clean"));
  CHECK_THAT(text, Catch::Contains("no metadata yet"));
  // Header and rows share column positions.
  auto line_with = [&](const std::string& needle) {
    size_t at = text.find(needle);
    REQUIRE(at != std::string::npos);
    size_t begin = text.rfind('\n', at) + 1;
    return text.substr(begin, text.find('\n', at) - begin);
  };
  std::string header = line_with("SLOT");
  std::string row_b = line_with("  0  b");
  std::string row_c = line_with("  1  c");
  std::string row_new = line_with("newsite");
  CHECK(header.find("DIRTY BYTES") == row_b.find("196608"));
  CHECK(header.find("DIRTY BYTES") == row_c.find("67108864 (64 MiB)"));
  CHECK_THAT(row_new, Catch::Contains("new at next start, all dirty (full sync)"));
  // Right-aligned counts end at the header's right edge.
  size_t regions_end = header.find("DIRTY REGIONS") + std::string("DIRTY REGIONS").size();
  CHECK(row_b.substr(regions_end - 1, 1) == "3");
  CHECK(row_c.substr(regions_end - 4, 4) == "1024");
}

}  // namespace
}  // namespace blockrelay::storage
