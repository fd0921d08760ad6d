// What a downstream reports and forgets at every connect
// (src/replication/receiver.h): CollectDirtyRanges turns its scoreboard
// slot for the upstream into DIRTY_RANGES, ForgetDirtyFor clears that slot
// once the upstream holds it, and SetGroupGenerations puts one generation
// on every volume of a group.
#include <memory>
#include <vector>

#include <catch2/catch.hpp>

#include "blockrelay/core/volume.h"
#include "replication/generations.h"
#include "replication/receiver.h"
#include "testutil/fault_injection_block_store.h"
#include "testutil/volume_fixture.h"

namespace blockrelay::replication {
namespace {

constexpr uint64_t kRegion = 64 << 10;
constexpr uint64_t kSize = 4ull << 20;  // 64 regions

std::shared_ptr<core::Volume> MakeVolume(testutil::VolumeFixture& f,
                                         std::vector<storage::DownstreamSlotOptions> slots) {
  auto meta = f.OpenOk(f.Options(kSize, kRegion, std::move(slots)));
  return std::make_shared<core::Volume>(
      "g", "v", std::make_unique<testutil::FaultInjectionBlockStore>(kSize),
      std::move(meta), /*read_only=*/false);
}

TEST_CASE("CollectDirtyRanges: dirty regions of the peer's slot become ascending runs",
          "[reconcile]") {
  testutil::VolumeFixture f;
  auto v = MakeVolume(f, {{"a", true}, {"c", true}});
  std::vector<std::byte> data(kRegion);
  REQUIRE(v->Write(0, data, false).ok());              // region 0
  REQUIRE(v->Write(5 * kRegion, std::span(data).first(512), false).ok());  // 5
  REQUIRE(v->Write(6 * kRegion, data, false).ok());    // 6
  REQUIRE(v->Write(63 * kRegion, data, false).ok());   // 63
  size_t full = 9;
  DirtyRanges d = CollectDirtyRanges({v}, "a", &full);
  CHECK(full == 0);
  REQUIRE(d.volumes.size() == 1);
  CHECK(d.volumes[0].volume == 0);
  CHECK(d.volumes[0].runs == std::vector<DirtyRun>{{0, 1}, {5, 2}, {63, 1}});
}

TEST_CASE("CollectDirtyRanges: a clean slot sends nothing; a missing slot the whole volume",
          "[reconcile]") {
  testutil::VolumeFixture f;
  auto v = MakeVolume(f, {{"a", true}});
  size_t full = 0;
  CHECK(CollectDirtyRanges({v}, "a", &full).volumes.empty());
  CHECK(full == 0);
  DirtyRanges d = CollectDirtyRanges({v}, "nosuch", &full);
  CHECK(full == 1);
  REQUIRE(d.volumes.size() == 1);
  CHECK(d.volumes[0].runs == std::vector<DirtyRun>{{0, kSize / kRegion}});
}

TEST_CASE("ForgetDirtyFor: clears only the peer's slot", "[reconcile]") {
  testutil::VolumeFixture f;
  auto v = MakeVolume(f, {{"a", true}, {"c", true}});
  std::vector<std::byte> data(kRegion);
  REQUIRE(v->Write(2 * kRegion, data, false).ok());
  REQUIRE(ForgetDirtyFor({v}, "a").ok());
  size_t full = 0;
  CHECK(CollectDirtyRanges({v}, "a", &full).volumes.empty());
  DirtyRanges c = CollectDirtyRanges({v}, "c", &full);
  REQUIRE(c.volumes.size() == 1);
  CHECK(c.volumes[0].runs == std::vector<DirtyRun>{{2, 1}});
}

TEST_CASE("SetGroupGenerations: every volume carries the set, history cut to four",
          "[reconcile]") {
  testutil::VolumeFixture f;
  auto v = MakeVolume(f, {{"a", true}});
  GenerationSet set;
  set.current = {storage::Uuid::Random(), 7};
  for (uint64_t i = 6; i >= 1; --i) set.history.push_back({storage::Uuid::Random(), i});
  REQUIRE(SetGroupGenerations({v}, set).ok());
  auto got = GroupGenerations({v});
  REQUIRE(got.has_value());
  CHECK(got->current == set.current);
  REQUIRE(got->history.size() == 4);
  CHECK(got->history[0] == set.history[0]);
  CHECK(got->history[3] == set.history[3]);
}

}  // namespace
}  // namespace blockrelay::replication
