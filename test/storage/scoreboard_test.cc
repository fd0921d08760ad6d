// Scoreboard: marking, clearing, the hot extent set, group commit, sticky
// failures and memory.

#include <atomic>
#include <chrono>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "blockrelay/storage/scoreboard.h"
#include "blockrelay/storage/volume_metadata.h"
#include "storage/metadata_format.h"
#include "testutil/volume_fixture.h"

namespace blockrelay::storage {
namespace {

using testutil::FaultOp;
using testutil::VolumeFixture;

constexpr uint64_t kKiB = 1ull << 10;
constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kTiB = 1ull << 40;

// A volume whose hot set is tiny: at most 8 intent extents of 1 MiB.
VolumeMetadataOptions TinyHotSetOptions(VolumeFixture& fx, uint64_t size_bytes) {
  VolumeMetadataOptions o = fx.Options(size_bytes, 64 * kKiB);
  o.intent_extent_bytes = 1 * kMiB;
  o.max_intent_extents = 8;
  return o;
}

TEST_CASE("Scoreboard: MarkDirty marks every touched region in every slot", "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(64 * kMiB, 64 * kKiB, {{"b", true}, {"c", true}}));
  Scoreboard& sb = meta->scoreboard();
  REQUIRE(sb.MarkDirty(65536 - 512, 65536 + 1024).ok());  // regions 0, 1, 2
  for (uint32_t slot : {0u, 1u}) {
    CHECK(sb.IsDirty(slot, 0));
    CHECK(sb.IsDirty(slot, 1));
    CHECK(sb.IsDirty(slot, 2));
    CHECK_FALSE(sb.IsDirty(slot, 3));
    CHECK(sb.StatsForSlot(slot).dirty_regions == 3);
    CHECK(sb.NextDirtyRegion(slot, 1) == 1u);
    CHECK(sb.NextDirtyRegion(slot, 3) == std::nullopt);
  }
}

TEST_CASE("Scoreboard: a range past the end of the volume is refused", "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(64 * kMiB));
  CHECK(meta->scoreboard().MarkDirty(64 * kMiB - 512, 1024).IsInvalidArgument());
  CHECK(meta->scoreboard().MarkDirty(64 * kMiB, 0).ok());
}

TEST_CASE("Scoreboard: writes into a hot extent or a dirty region cost no metadata sync",
          "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options());
  Scoreboard& sb = meta->scoreboard();
  REQUIRE(sb.MarkDirty(0, 4096).ok());  // makes extent 0 (4 MiB) hot
  uint64_t syncs = fx.env.sync_count();
  CHECK(sb.Stats().intent_extents_in_use == 1);
  REQUIRE(sb.MarkDirty(0, 4096).ok());            // already dirty
  REQUIRE(sb.MarkDirty(3 * kMiB, 65536).ok());    // same extent, new region
  CHECK(fx.env.sync_count() == syncs);
  REQUIRE(sb.MarkDirty(4 * kMiB, 4096).ok());     // new extent: one sync
  CHECK(fx.env.sync_count() == syncs + 1);
}

TEST_CASE("Scoreboard: a sequential writer's next extents are declared with the one it "
          "needs", "[scoreboard]") {
  // Goal: 1 MiB writes streaming through 16 fresh 4 MiB extents pay a few
  // metadata syncs, not one per extent.
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(64 * kMiB));
  Scoreboard& sb = meta->scoreboard();
  const uint64_t before = fx.env.sync_count();
  for (uint64_t off = 0; off < 64 * kMiB; off += kMiB) REQUIRE(sb.MarkDirty(off, kMiB).ok());
  const uint64_t syncs = fx.env.sync_count() - before;
  INFO("metadata syncs for 16 extents written in order: " << syncs);
  CHECK(syncs <= 4);
  CHECK(sb.Stats().intent_extents_in_use == 16);
  CHECK(sb.StatsForSlot(0).dirty_bytes == 64 * kMiB);
}

TEST_CASE("Scoreboard: a long sequential stream declares further ahead as it goes on",
          "[scoreboard]") {
  // 128 extents written in order: a fixed run of 7 ahead paid 18 syncs.
  // The runs: 7 at extent 2, then 14, 28, 56 and 112 (declared at extent
  // 111). After a crash, no more than that last run is dirty beyond what
  // was written.
  VolumeFixture fx;
  VolumeMetadataOptions o = fx.Options(4096 * kMiB);
  {
    auto meta = fx.OpenOk(o);
    Scoreboard& sb = meta->scoreboard();
    const uint64_t before = fx.env.sync_count();
    for (uint64_t off = 0; off < 512 * kMiB; off += kMiB) REQUIRE(sb.MarkDirty(off, kMiB).ok());
    const uint64_t syncs = fx.env.sync_count() - before;
    INFO("metadata syncs for 128 extents written in order: " << syncs);
    CHECK(syncs <= 8);
  }
  fx.env.DropUnsyncedWrites();
  auto meta = fx.OpenOk(o);
  const uint64_t dirty = meta->scoreboard().StatsForSlot(0).dirty_bytes;
  CHECK(dirty >= 512 * kMiB);
  CHECK(dirty <= (128 + 112) * 4 * kMiB);
}

TEST_CASE("Scoreboard: the run declared ahead of a stream never exceeds a quarter of the "
          "hot set", "[scoreboard]") {
  // Hot set of 64 extents of 1 MiB, a stream through 512 of them: every
  // record stays within the bound, and after a crash at most a quarter of
  // the hot set (16 extents) past the last write is dirty.
  VolumeFixture fx;
  VolumeMetadataOptions o = fx.Options(512 * kMiB);
  o.intent_extent_bytes = 1 * kMiB;
  o.max_intent_extents = 64;
  {
    auto meta = fx.OpenOk(o);
    Scoreboard& sb = meta->scoreboard();
    for (uint64_t off = 0; off < 300 * kMiB; off += 512 * kKiB) {
      REQUIRE(sb.MarkDirty(off, 512 * kKiB).ok());
      CHECK(sb.Stats().intent_extents_in_use <= 64);
    }
  }
  fx.env.DropUnsyncedWrites();
  auto meta = fx.OpenOk(o);
  const uint64_t dirty = meta->scoreboard().StatsForSlot(0).dirty_bytes;
  CHECK(dirty >= 300 * kMiB);
  CHECK(dirty <= (300 + 16) * kMiB);
}

// Streams 1 MiB writes through [0, end) as the NBD session does: the
// no-wait path first, MarkDirty when it declines, and CommitReadahead when
// it is due. Returns how many writes had to wait for a metadata commit.
uint64_t StreamWithReadahead(Scoreboard& sb, uint64_t end, uint64_t* dues) {
  uint64_t waited = 0;
  for (uint64_t off = 0; off < end; off += kMiB) {
    auto marked = sb.TryMarkDirty(off, kMiB);
    if (!marked) {
      ++waited;
      REQUIRE(sb.MarkDirty(off, kMiB).ok());
    } else {
      REQUIRE(marked->ok());
    }
    if (sb.ReadaheadDue()) {
      ++*dues;
      REQUIRE(sb.CommitReadahead().ok());
    }
  }
  return waited;
}

TEST_CASE("Scoreboard: a sequential writer whose readahead runs when due waits only until "
          "the stream is seen", "[scoreboard]") {
  // Extents 0, 1 and 2 are committed as the writer enters them (the third
  // commit spots the stream and declares ahead); from then on the run
  // after the current one is declared while the writer is half way
  // through the current one, and no write waits for a sync.
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(1024 * kMiB));
  Scoreboard& sb = meta->scoreboard();
  const uint64_t commits_before = sb.Stats().intent_commits;
  uint64_t dues = 0;
  const uint64_t waited = StreamWithReadahead(sb, 1024 * kMiB, &dues);
  CHECK(waited == 3);
  CHECK(dues > 0);
  CHECK(sb.Stats().readahead_commits == dues);
  CHECK(sb.Stats().intent_commits - commits_before == 3 + dues);
  CHECK(sb.StatsForSlot(0).dirty_bytes == 1024 * kMiB);
}

TEST_CASE("Scoreboard: readahead is never due for random writes", "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(1024 * kMiB));
  Scoreboard& sb = meta->scoreboard();
  std::mt19937_64 rng(7);
  for (int i = 0; i < 2000; ++i) {
    REQUIRE(sb.MarkDirty((rng() % (1024 * kMiB / 4096)) * 4096, 4096).ok());
    CHECK_FALSE(sb.ReadaheadDue());
  }
  CHECK(sb.Stats().readahead_commits == 0);
}

TEST_CASE("Scoreboard: CommitReadahead without a stream, or after Close, writes nothing",
          "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(64 * kMiB));
  Scoreboard& sb = meta->scoreboard();
  uint64_t syncs = fx.env.sync_count();
  CHECK(sb.CommitReadahead().ok());  // nothing committed yet: no stream
  CHECK(fx.env.sync_count() == syncs);
  CHECK(sb.Stats().intent_extents_in_use == 0);
  REQUIRE(sb.MarkDirty(0, 4096).ok());
  REQUIRE(sb.Close().ok());
  syncs = fx.env.sync_count();
  CHECK(sb.CommitReadahead().ok());
  CHECK(fx.env.sync_count() == syncs);
}

TEST_CASE("Scoreboard: a readahead commit that fails is sticky", "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(1024 * kMiB));
  Scoreboard& sb = meta->scoreboard();
  uint64_t off = 0;
  for (; !sb.ReadaheadDue(); off += kMiB) {
    REQUIRE(off < 1024 * kMiB);
    REQUIRE(sb.MarkDirty(off, kMiB).ok());
  }
  fx.env.FailNth(FaultOp::kSync, 1, EIO);
  CHECK(sb.CommitReadahead().IsIOError());
  CHECK(sb.MarkDirty(off, kMiB).IsIOError());
  CHECK(sb.health().IsIOError());
}

TEST_CASE("Scoreboard: after a crash, extents declared by readahead are dirty, and no more "
          "than the last run beyond what was written", "[scoreboard]") {
  // Readahead declared a run of 112 extents at extent 111 (its marker is
  // half way, at 167): 128 extents written leave at most 96 dirty beyond.
  VolumeFixture fx;
  VolumeMetadataOptions o = fx.Options(4096 * kMiB);
  {
    auto meta = fx.OpenOk(o);
    uint64_t dues = 0;
    StreamWithReadahead(meta->scoreboard(), 512 * kMiB, &dues);
    REQUIRE(dues > 0);
  }
  fx.env.DropUnsyncedWrites();
  auto meta = fx.OpenOk(o);
  const uint64_t dirty = meta->scoreboard().StatsForSlot(0).dirty_bytes;
  CHECK(dirty >= 512 * kMiB);
  CHECK(dirty <= (128 + 96) * 4 * kMiB);
}

TEST_CASE("Scoreboard: extents declared ahead never push the hot set past its bound",
          "[scoreboard]") {
  // A tiny hot set (8 extents of 1 MiB) and writers streaming through a
  // 64 MiB volume, one by one and two extents at a time: every record
  // stays within the bound (recovery would take a longer one for torn and
  // lose its extents), and after a crash every written region is dirty.
  VolumeFixture fx;
  VolumeMetadataOptions o = TinyHotSetOptions(fx, 64 * kMiB);
  {
    auto meta = fx.OpenOk(o);
    Scoreboard& sb = meta->scoreboard();
    for (uint64_t off = 0; off < 32 * kMiB; off += 512 * kKiB) {
      REQUIRE(sb.MarkDirty(off, 512 * kKiB).ok());
      CHECK(sb.Stats().intent_extents_in_use <= 8);
    }
    for (uint64_t off = 32 * kMiB; off < 64 * kMiB; off += 2 * kMiB) {
      REQUIRE(sb.MarkDirty(off, 2 * kMiB).ok());  // two extents per write
      CHECK(sb.Stats().intent_extents_in_use <= 8);
    }
    CHECK(sb.Stats().evicted_extents > 0);
  }
  fx.env.DropUnsyncedWrites();
  auto meta = fx.OpenOk(o);
  CHECK(meta->scoreboard().StatsForSlot(0).dirty_bytes == 64 * kMiB);
}

TEST_CASE("Scoreboard: a writer out of order declares no extent ahead", "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(64 * kMiB));
  Scoreboard& sb = meta->scoreboard();
  const uint64_t before = fx.env.sync_count();
  // Extent after extent, but each entered in its middle: not a stream.
  for (uint64_t extent : {1, 2, 3, 4, 9, 7}) {
    REQUIRE(sb.MarkDirty(extent * 4 * kMiB + 64 * kKiB, 4096).ok());
  }
  CHECK(fx.env.sync_count() - before == 6);
  CHECK(sb.Stats().intent_extents_in_use == 6);
}

TEST_CASE("Scoreboard: extents announced by writes on their way go with the next commit",
          "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(64 * kMiB));
  Scoreboard& sb = meta->scoreboard();
  sb.Announce(5 * 4 * kMiB + 100, 4096);
  sb.Announce(9 * 4 * kMiB, 4096);
  const uint64_t before = fx.env.sync_count();
  REQUIRE(sb.MarkDirty(1 * 4 * kMiB + 64 * kKiB, 4096).ok());  // one commit for all three
  CHECK(fx.env.sync_count() - before == 1);
  CHECK(sb.Stats().intent_extents_in_use == 3);
  REQUIRE(sb.MarkDirty(5 * 4 * kMiB + 100, 4096).ok());
  REQUIRE(sb.MarkDirty(9 * 4 * kMiB, 4096).ok());
  CHECK(fx.env.sync_count() - before == 1);
}

TEST_CASE("Scoreboard: a sequential writer whose queued writes announce its next extents "
          "still gets extents declared ahead", "[scoreboard]") {
  // 1 MiB writes at QD8 reach a storage thread two extents behind the
  // network thread, which announces them first: the announced extents
  // must not hide the stream.
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(1024 * kMiB));
  Scoreboard& sb = meta->scoreboard();
  const uint64_t before = fx.env.sync_count();
  constexpr uint64_t kQueued = 8;
  for (uint64_t off = 0; off < kQueued * kMiB; off += kMiB) sb.Announce(off, kMiB);
  for (uint64_t off = 0; off < 512 * kMiB; off += kMiB) {
    sb.Announce(off + kQueued * kMiB, kMiB);
    REQUIRE(sb.MarkDirty(off, kMiB).ok());
  }
  const uint64_t syncs = fx.env.sync_count() - before;
  INFO("metadata syncs for 128 extents written in order, announced 2 ahead: " << syncs);
  CHECK(syncs <= 8);
}

TEST_CASE("Scoreboard: announced extents only fill room left in the hot set",
          "[scoreboard]") {
  // Hot set of 8 extents of 1 MiB, 6 in use: of 5 announced extents, the
  // next commit takes along only as many as fit without an eviction.
  VolumeFixture fx;
  VolumeMetadataOptions o = TinyHotSetOptions(fx, 64 * kMiB);
  auto meta = fx.OpenOk(o);
  Scoreboard& sb = meta->scoreboard();
  for (uint64_t extent : {1, 3, 5, 7, 9, 11}) {  // entered mid-extent: no stream
    REQUIRE(sb.MarkDirty(extent * kMiB + 64 * kKiB, 4096).ok());
  }
  for (uint64_t extent : {20, 22, 24, 26, 28}) sb.Announce(extent * kMiB, 4096);
  REQUIRE(sb.MarkDirty(40 * kMiB + 64 * kKiB, 4096).ok());
  CHECK(sb.Stats().intent_extents_in_use == 8);
  CHECK(sb.Stats().evicted_extents == 0);
}

TEST_CASE("Scoreboard: after a crash, an extent announced and never written is dirty",
          "[scoreboard]") {
  // The price of an announcement whose write never came: a resync of it.
  VolumeFixture fx;
  VolumeMetadataOptions o = fx.Options(64 * kMiB);
  {
    auto meta = fx.OpenOk(o);
    Scoreboard& sb = meta->scoreboard();
    sb.Announce(7 * 4 * kMiB, 4096);
    REQUIRE(sb.MarkDirty(2 * 4 * kMiB + 64 * kKiB, 4096).ok());
  }
  fx.env.DropUnsyncedWrites();
  auto meta = fx.OpenOk(o);
  CHECK(meta->scoreboard().IsDirty(0, 7 * 4 * kMiB / (64 * kKiB)));
  CHECK(meta->scoreboard().IsDirty(0, (2 * 4 * kMiB + 64 * kKiB) / (64 * kKiB)));
}

TEST_CASE("Scoreboard: after a crash, extents declared ahead of a sequential writer are "
          "dirty", "[scoreboard]") {
  // The price of declaring ahead: a crash resyncs them too, written or not.
  VolumeFixture fx;
  VolumeMetadataOptions o = fx.Options(64 * kMiB);
  {
    auto meta = fx.OpenOk(o);
    Scoreboard& sb = meta->scoreboard();
    REQUIRE(sb.MarkDirty(0, 4096).ok());         // extent 0
    REQUIRE(sb.MarkDirty(4 * kMiB, 4096).ok());  // extent 1, entered at its start
    REQUIRE(sb.MarkDirty(8 * kMiB, 4096).ok());  // extent 2, and 3.. declared ahead
    REQUIRE(sb.Stats().intent_extents_in_use > 3);
  }
  fx.env.DropUnsyncedWrites();
  auto meta = fx.OpenOk(o);
  Scoreboard& sb = meta->scoreboard();
  CHECK(sb.IsDirty(0, 0));
  CHECK(sb.IsDirty(0, 4 * kMiB / (64 * kKiB)));
  CHECK(sb.IsDirty(0, 8 * kMiB / (64 * kKiB)));
  CHECK(sb.IsDirty(0, 12 * kMiB / (64 * kKiB)));  // extent 3: declared, never written
  CHECK(sb.StatsForSlot(0).dirty_bytes <= 10 * 4 * kMiB);
}

TEST_CASE("Scoreboard: TryMarkDirty works without metadata I/O or declines", "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options());
  Scoreboard& sb = meta->scoreboard();
  uint64_t syncs = fx.env.sync_count();
  CHECK_FALSE(sb.TryMarkDirty(0, 4096).has_value());  // extent 0 is cold
  CHECK_FALSE(sb.IsDirty(0, 0));
  REQUIRE(sb.MarkDirty(0, 4096).ok());
  syncs = fx.env.sync_count();
  auto hot = sb.TryMarkDirty(65536, 4096);  // same extent, new region
  REQUIRE(hot.has_value());
  CHECK(hot->ok());
  CHECK(sb.IsDirty(0, 1));
  CHECK(fx.env.sync_count() == syncs);
  fx.env.FailNth(FaultOp::kSync, 1, EIO);
  CHECK(sb.MarkDirty(8 * kMiB, 1).IsIOError());
  auto failed = sb.TryMarkDirty(0, 1);
  REQUIRE(failed.has_value());
  CHECK(failed->IsIOError());
}

TEST_CASE("Scoreboard: with no downstream link nothing is tracked", "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(64 * kMiB, 64 * kKiB, {}));
  uint64_t syncs = fx.env.sync_count();
  REQUIRE(meta->scoreboard().MarkDirty(0, 64 * kMiB).ok());
  CHECK(fx.env.sync_count() == syncs);
  CHECK(meta->scoreboard().Stats().slots.empty());
}

TEST_CASE("Scoreboard: dirty_bytes counts only the real bytes of a short last region",
          "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(3 * 65536 + 1536));
  Scoreboard& sb = meta->scoreboard();
  CHECK(sb.region_count() == 4);
  REQUIRE(sb.MarkDirty(3 * 65536 + 1024, 512).ok());
  CHECK(sb.StatsForSlot(0).dirty_regions == 1);
  CHECK(sb.StatsForSlot(0).dirty_bytes == 1536);
  REQUIRE(sb.MarkDirty(0, 1).ok());
  CHECK(sb.StatsForSlot(0).dirty_bytes == 65536 + 1536);
}

TEST_CASE("Scoreboard: a volume of one region", "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(8192, 64 * kKiB, {{"b", false}}));
  Scoreboard& sb = meta->scoreboard();
  CHECK(sb.region_count() == 1);
  CHECK(sb.StatsForSlot(0).dirty_bytes == 8192);
  // The range reaches the end of the volume, so the short region is whole.
  CHECK(sb.MarkClean(0, 0, 8192, sb.CurrentWriteSeq()) == 1);
  CHECK(sb.StatsForSlot(0).dirty_regions == 0);
  REQUIRE(sb.MarkDirty(4096, 4096).ok());
  CHECK(sb.StatsForSlot(0).dirty_bytes == 8192);
}

TEST_CASE("Scoreboard: the smallest and the largest region sizes work", "[scoreboard]") {
  VolumeFixture fx;
  uint64_t region = GENERATE(4 * kKiB, 16 * kMiB);
  CAPTURE(region);
  auto meta = fx.OpenOk(fx.Options(100 * kMiB + 4096, region));
  Scoreboard& sb = meta->scoreboard();
  CHECK(sb.intent_extent_bytes() == std::max<uint64_t>(4 * kMiB, region));
  REQUIRE(sb.MarkDirty(50 * kMiB, 1).ok());
  REQUIRE(sb.MarkDirty(100 * kMiB, 4096).ok());  // the short last region
  CHECK(sb.StatsForSlot(0).dirty_regions == 2);
  CHECK(sb.StatsForSlot(0).dirty_bytes == region + (region == 4 * kKiB ? 4096 : 4 * kMiB + 4096));
  REQUIRE(meta->Close().ok());
  meta.reset();
  CHECK(fx.OpenOk(fx.Options(100 * kMiB + 4096, region))->scoreboard().StatsForSlot(0)
            .dirty_regions == 2);
}

TEST_CASE("Scoreboard: MarkClean clears whole regions only", "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(64 * kMiB, 64 * kKiB, {{"b", false}}));
  Scoreboard& sb = meta->scoreboard();
  WriteSeq now = sb.CurrentWriteSeq();
  CHECK(sb.MarkClean(0, 4096, 65536, now) == 0);           // no whole region
  CHECK(sb.MarkClean(0, 65536 - 1, 2 * 65536 + 1, now) == 2);  // regions 1 and 2
  CHECK(sb.IsDirty(0, 0));
  CHECK_FALSE(sb.IsDirty(0, 1));
  CHECK_FALSE(sb.IsDirty(0, 2));
  CHECK(sb.IsDirty(0, 3));
  CHECK(sb.MarkClean(7, 0, 65536, now) == 0);  // no such slot
}

TEST_CASE("Scoreboard: MarkClean keeps a region written after the caller's snapshot",
          "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options());
  Scoreboard& sb = meta->scoreboard();
  REQUIRE(sb.MarkDirty(0, 65536).ok());
  WriteSeq snapshot = sb.CurrentWriteSeq();  // resync reads region 0 now...
  REQUIRE(sb.MarkDirty(0, 4096).ok());       // ...a write lands meanwhile
  CHECK(sb.MarkClean(0, 0, 65536, snapshot) == 0);
  CHECK(sb.IsDirty(0, 0));
  CHECK(sb.MarkClean(0, 0, 65536, sb.CurrentWriteSeq()) == 1);
  CHECK_FALSE(sb.IsDirty(0, 0));
}

TEST_CASE("Scoreboard: MarkClean with the acknowledged write's own WriteSeq clears it",
          "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options());
  Scoreboard& sb = meta->scoreboard();
  WriteSeq first = 0, second = 0;
  REQUIRE(sb.MarkDirty(0, 65536, &first).ok());
  REQUIRE(sb.MarkDirty(65536, 65536, &second).ok());
  CHECK(second > first);
  // The first write's ack comes after the second write started in the same
  // extent: the scoreboard cannot tell the regions apart, so it keeps it.
  CHECK(sb.MarkClean(0, 0, 65536, first) == 0);
  CHECK(sb.MarkClean(0, 0, 2 * 65536, second) == 2);
}

TEST_CASE("Scoreboard: cleared bits persist after FlushBitmaps, flushing the backing first",
          "[scoreboard]") {
  VolumeFixture fx;
  int backing_flushes = 0;
  VolumeMetadataOptions o = fx.Options(64 * kMiB, 64 * kKiB, {{"b", false}});
  o.flush_backing = [&] {
    ++backing_flushes;
    return Status::OK();
  };
  {
    auto meta = fx.OpenOk(o);
    Scoreboard& sb = meta->scoreboard();
    REQUIRE(sb.FlushBitmaps().ok());
    CHECK(backing_flushes == 0);  // nothing cleared yet
    CHECK(sb.MarkClean(0, 0, 32 * kMiB, sb.CurrentWriteSeq()) == 512);
    REQUIRE(sb.FlushBitmaps().ok());
    CHECK(backing_flushes == 1);
    REQUIRE(sb.FlushBitmaps().ok());
    CHECK(backing_flushes == 1);  // no new clear
  }
  fx.env.DropUnsyncedWrites();  // crash after the flush
  CHECK(fx.OpenOk(o)->scoreboard().StatsForSlot(0).dirty_regions == 512);
}

TEST_CASE("Scoreboard: a failing backing flush blocks persisting clears and is sticky",
          "[scoreboard]") {
  VolumeFixture fx;
  VolumeMetadataOptions o = fx.Options(64 * kMiB, 64 * kKiB, {{"b", false}});
  o.flush_backing = [] { return Status::IOError("fdatasync backing: injected", EIO); };
  auto meta = fx.OpenOk(o);
  Scoreboard& sb = meta->scoreboard();
  CHECK(sb.MarkClean(0, 0, 65536, sb.CurrentWriteSeq()) == 1);
  Status s = sb.FlushBitmaps();
  CHECK(s.IsIOError());
  CHECK_THAT(s.message(), Catch::Contains("flushing the backing store"));
  CHECK(sb.MarkDirty(0, 1).IsIOError());
}

TEST_CASE("Scoreboard: the hot set stays bounded and evicted extents' bits survive a crash",
          "[scoreboard]") {
  VolumeFixture fx;
  VolumeMetadataOptions o = TinyHotSetOptions(fx, 256 * kMiB);
  std::set<uint64_t> written;
  {
    auto meta = fx.OpenOk(o);
    Scoreboard& sb = meta->scoreboard();
    std::mt19937_64 rng(5);
    for (int i = 0; i < 200; ++i) {
      uint64_t region = rng() % sb.region_count();
      REQUIRE(sb.MarkDirty(region * 65536, 4096).ok());
      written.insert(region);
      CHECK(sb.Stats().intent_extents_in_use <= 8);
    }
    CHECK(sb.Stats().evicted_extents > 0);
  }
  fx.env.DropUnsyncedWrites();
  auto meta = fx.OpenOk(o);
  for (uint64_t r : written) CHECK(meta->scoreboard().IsDirty(0, r));
  // Bounded recovery: written regions plus at most 8 extents of 16 regions.
  CHECK(meta->scoreboard().StatsForSlot(0).dirty_regions <= written.size() + 8 * 16);
}

TEST_CASE("Scoreboard: a range over many extents marks bitmap pages directly",
          "[scoreboard]") {
  VolumeFixture fx;
  VolumeMetadataOptions o = fx.Options(1024 * kMiB, 64 * kKiB);
  o.max_intent_extents = 16;
  {
    auto meta = fx.OpenOk(o);
    Scoreboard& sb = meta->scoreboard();
    REQUIRE(sb.MarkDirty(100 * kMiB, 512 * kMiB).ok());  // a 512 MiB trim: 128 extents
    CHECK(sb.Stats().direct_marks == 1);
    CHECK(sb.Stats().intent_extents_in_use == 0);
    CHECK(sb.StatsForSlot(0).dirty_bytes == 512 * kMiB);
  }
  fx.env.DropUnsyncedWrites();
  CHECK(fx.OpenOk(o)->scoreboard().StatsForSlot(0).dirty_bytes == 512 * kMiB);
}

TEST_CASE("Scoreboard: a failed metadata sync is sticky", "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options());
  Scoreboard& sb = meta->scoreboard();
  REQUIRE(sb.MarkDirty(0, 1).ok());  // extent 0 hot
  fx.env.FailNth(FaultOp::kSync, 1, EIO);
  Status s = sb.MarkDirty(8 * kMiB, 1);  // needs a new extent: sync fails
  CHECK(s.IsIOError());
  CHECK(s.errno_value() == EIO);
  CHECK_THAT(s.message(), Catch::Contains("writes are refused until the volume is reopened"));
  // Even the fast paths fail now, and so do flush and close.
  CHECK(sb.MarkDirty(0, 1).IsIOError());
  CHECK(sb.MarkDirty(65536, 1).IsIOError());
  CHECK(sb.FlushBitmaps().IsIOError());
  CHECK(sb.health().IsIOError());
  CHECK(meta->Close().IsIOError());
  meta.reset();
  // Reopening clears it (the operator acted).
  auto again = fx.OpenOk(fx.Options());
  CHECK(again->scoreboard().MarkDirty(8 * kMiB, 1).ok());
}

TEST_CASE("Scoreboard: a failed metadata write is sticky", "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options());
  fx.env.FailNth(FaultOp::kWrite, 1, ENOSPC);
  CHECK(meta->scoreboard().MarkDirty(0, 1).IsIOError());
  CHECK(meta->scoreboard().MarkDirty(0, 1).IsIOError());
}

TEST_CASE("Scoreboard: MarkDirty after Close is refused", "[scoreboard]") {
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options());
  REQUIRE(meta->Close().ok());
  CHECK(meta->scoreboard().MarkDirty(0, 1).code() == Status::Code::kAborted);
  CHECK(meta->Close().ok());
}

// An Env whose Sync takes a while, so that concurrent writers pile up
// behind the one doing it.
class SlowSyncEnv final : public io::EnvWrapper {
 public:
  explicit SlowSyncEnv(io::Env* target) : EnvWrapper(target) {}
  Result<std::unique_ptr<io::RandomRWFile>> OpenFile(const std::string& path,
                                                     io::OpenMode mode) override {
    auto f = target()->OpenFile(path, mode);
    if (!f.ok()) return f;
    return std::unique_ptr<io::RandomRWFile>(new SlowFile(std::move(*f), &syncs));
  }
  std::atomic<uint64_t> syncs{0};

 private:
  class SlowFile final : public io::RandomRWFile {
   public:
    SlowFile(std::unique_ptr<io::RandomRWFile> f, std::atomic<uint64_t>* syncs)
        : f_(std::move(f)), syncs_(syncs) {}
    Result<size_t> PRead(uint64_t o, std::span<std::byte> out) override { return f_->PRead(o, out); }
    Status PWrite(uint64_t o, std::span<const std::byte> d) override { return f_->PWrite(o, d); }
    Status Sync() override {
      syncs_->fetch_add(1);
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      return f_->Sync();
    }
    Result<uint64_t> Size() override { return f_->Size(); }
    Status Truncate(uint64_t s) override { return f_->Truncate(s); }
    const std::string& path() const override { return f_->path(); }

   private:
    std::unique_ptr<io::RandomRWFile> f_;
    std::atomic<uint64_t>* syncs_;
  };
};

TEST_CASE("Scoreboard: concurrent writers needing new extents share syncs (group commit)",
          "[scoreboard]") {
  // Goal: 16 threads each dirtying 16 fresh extents need far fewer than 256
  // metadata syncs, because a leader commits for everyone queued.
  VolumeFixture fx;
  SlowSyncEnv slow(&fx.mem);
  VolumeMetadataOptions o = fx.Options(1024 * kMiB);
  o.env = &slow;
  auto meta = fx.OpenOk(o);
  Scoreboard& sb = meta->scoreboard();
  uint64_t before = slow.syncs.load();
  constexpr int kThreads = 16;
  constexpr int kPerThread = 16;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        uint64_t extent = static_cast<uint64_t>(t * kPerThread + i);
        if (!sb.MarkDirty(extent * 4 * kMiB, 4096).ok()) failures.fetch_add(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  uint64_t syncs = slow.syncs.load() - before;
  INFO("metadata syncs for " << kThreads * kPerThread << " new extents: " << syncs);
  CHECK(failures.load() == 0);
  CHECK(syncs < kThreads * kPerThread / 2);
  CHECK(sb.Stats().intent_extents_in_use == kThreads * kPerThread);
}

TEST_CASE("Scoreboard: many threads marking and clearing lose no bit across a crash",
          "[scoreboard]") {
  // Goal: every MarkDirty that returned OK survives a power loss, whatever
  // eviction, clearing and flushing ran beside it.
  VolumeFixture fx;
  VolumeMetadataOptions o = fx.Options(512 * kMiB);
  o.intent_extent_bytes = 1 * kMiB;
  o.max_intent_extents = 16;
  constexpr int kThreads = 8;
  std::vector<std::vector<uint64_t>> marked(kThreads);
  {
    auto meta = fx.OpenOk(o);
    Scoreboard& sb = meta->scoreboard();
    std::atomic<bool> stop{false};
    std::atomic<int> flush_failures{0};  // Catch2 assertions are not thread-safe
    std::thread cleaner([&] {
      // Clears only regions of the last 64 MiB, which the writers never touch
      // after their first pass: exercises clear/flush beside marking.
      std::mt19937_64 rng(99);
      while (!stop.load()) {
        uint64_t r = 7168 + rng() % 1024;
        sb.MarkClean(0, r * 65536, 65536, sb.CurrentWriteSeq());
        if (rng() % 16 == 0 && !sb.FlushBitmaps().ok()) flush_failures.fetch_add(1);
      }
    });
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(static_cast<uint64_t>(t));
        for (int i = 0; i < 400; ++i) {
          uint64_t region = rng() % 7168;
          uint64_t len = 4096 * (1 + rng() % 32);
          if (sb.MarkDirty(region * 65536, len).ok()) marked[static_cast<size_t>(t)].push_back(region);
        }
      });
    }
    for (auto& t : threads) t.join();
    stop.store(true);
    cleaner.join();
    CHECK(flush_failures.load() == 0);
  }
  fx.env.DropUnsyncedWrites();
  auto meta = fx.OpenOk(o);
  size_t missing = 0;
  for (const auto& list : marked) {
    for (uint64_t r : list) missing += !meta->scoreboard().IsDirty(0, r);
  }
  CHECK(missing == 0);
}

TEST_CASE("Scoreboard: a 16 TiB volume's bitmaps are held in little memory", "[scoreboard]") {
  // Goal: a new all-dirty slot and a clean slot of a 16 TiB volume cost flag
  // bits, not bitmaps; dirtying a few regions costs a few OS pages.
  VolumeFixture fx;
  auto meta = fx.OpenOk(fx.Options(16 * kTiB, 64 * kKiB, {{"full", false}, {"none", true}}));
  Scoreboard& sb = meta->scoreboard();
  CHECK(sb.StatsForSlot(0).dirty_bytes == 16 * kTiB);
  CHECK(sb.StatsForSlot(1).dirty_regions == 0);
  uint64_t idle = sb.MemoryUsageBytes();
  INFO("idle: " << idle << " bytes");
  CHECK(idle < 16 * kKiB);  // 2 slots' flags (3 KiB each) + the extent chunk table (4 KiB)
  for (uint64_t i = 0; i < 100; ++i) REQUIRE(sb.MarkDirty(i * 160 * (1ull << 30), 4096).ok());
  uint64_t used = sb.MemoryUsageBytes();
  INFO("after 100 scattered writes: " << used << " bytes");
  CHECK(used < idle + 100 * (4096 + 64 * kKiB) + 64 * kKiB);
  CHECK(sb.StatsForSlot(1).dirty_regions == 100);
  CHECK(fx.mem.MemoryUsageBytes() < 80 * kMiB);  // the file: 2 × 32 MiB of bitmap pages
}

}  // namespace
}  // namespace blockrelay::storage
