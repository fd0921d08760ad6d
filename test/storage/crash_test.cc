// The randomized crash test of DESIGN.md's Invariant 1: after any crash,
// every region where this site's disk differs from what a downstream site
// holds is dirty in that site's slot.
//
// Each iteration builds a small volume (random region size, intent extent
// size, hot-set bound, size not a multiple of the region) on a
// FaultInjectionBlockStore, with metadata on a FaultInjectionEnv, both on
// one PowerSwitch. It runs random writes, trims, write-zeroes, flushes,
// bitmap flushes and clean restarts through the real write path (MarkDirty,
// then the store), and random downstream acknowledgements (copy regions to
// the downstream image, then MarkClean). The power goes off after a random
// number of device operations, possibly inside a metadata commit; then the
// disks suffer a process crash (unsynced writes kept) or a power loss (all,
// a random subset, or random 512-byte sectors of the unsynced writes lost).
// The metadata is reopened and the invariant checked region by region.
// Sometimes metadata writes or syncs fail (sticky errors) on the way.
//
// Environment:
//   BLOCKRELAY_CRASH_SEED        first iteration's seed (default: random);
//                                iteration i uses seed + i
//   BLOCKRELAY_CRASH_ITERATIONS  default 30000 (about 30 s of CPU in a RelWithDebInfo
//                                build; more wall time on a loaded machine)
// A failure prints the iteration's seed; rerun it alone with
//   BLOCKRELAY_CRASH_SEED=<that seed> BLOCKRELAY_CRASH_ITERATIONS=1

#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include "blockrelay/io/mem_env.h"
#include "blockrelay/storage/volume_metadata.h"
#include "testutil/fault_injection_block_store.h"
#include "testutil/fault_injection_env.h"
#include "testutil/power_switch.h"

namespace blockrelay::storage {
namespace {

using testutil::FaultInjectionBlockStore;
using testutil::FaultInjectionEnv;
using testutil::FaultOp;
using testutil::PowerSwitch;
using PowerLossMode = FaultInjectionBlockStore::PowerLossMode;

constexpr uint64_t kDefaultIterations = 30000;

std::optional<uint64_t> EnvNumber(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::strtoull(v, nullptr, 0);
}

enum class CrashMode { kProcessCrash, kPowerLossAll, kPowerLossRandom, kPowerLossTear };

const char* ToString(CrashMode m) {
  switch (m) {
    case CrashMode::kProcessCrash: return "process crash";
    case CrashMode::kPowerLossAll: return "power loss (all unsynced writes lost)";
    case CrashMode::kPowerLossRandom: return "power loss (random unsynced writes lost)";
    case CrashMode::kPowerLossTear: return "power loss (torn 512-byte sectors)";
  }
  return "?";
}

// A downstream link and what that site holds.
struct Link {
  std::string site;
  bool initial_sync_none;
  std::vector<std::byte> image;
};

class CrashIteration {
 public:
  explicit CrashIteration(uint64_t seed) : seed_(seed), rng_(seed), env_(&mem_, &power_) {}

  // Runs the iteration; returns a description of the first violation, or
  // nothing.
  std::optional<std::string> Run() {
    ChooseGeometry();
    REQUIRE(mem_.CreateDirs("/data").ok());
    store_ = std::make_unique<FaultInjectionBlockStore>(size_, &power_);
    links_.push_back(Link{"b", true, std::vector<std::byte>(size_, std::byte{0})});
    links_.push_back(Link{"c", false, RandomImage()});
    if (Chance(8)) env_.FailNth(Chance(2) ? FaultOp::kSync : FaultOp::kWrite, Pick(1, 40), EIO);
    uint64_t cut = Chance(4) ? UINT64_MAX : Pick(0, 400);
    if (cut != UINT64_MAX) power_.CutAfter(static_cast<int64_t>(cut));
    Log(fmt::format("seed {} size {} region {} extent {} max_hot {} power cut after {} ops", seed_,
                    size_, region_, extent_, max_hot_,
                    cut == UINT64_MAX ? std::string("never") : std::to_string(cut)));

    Reopen();
    int steps = static_cast<int>(Pick(1, 120));
    for (int i = 0; i < steps && power_.on(); ++i) Step();

    CrashMode mode = static_cast<CrashMode>(Pick(0, 3));
    Log(fmt::format("crash: {} (power {})", ToString(mode), power_.on() ? "on" : "cut"));
    meta_.reset();  // the process dies: nothing more is written
    Crash(mode);
    power_.Restore();
    env_.ClearFaults();
    store_->ClearFaults();

    Result<std::unique_ptr<VolumeMetadata>> meta = VolumeMetadata::Open(Options());
    if (!meta.ok()) return "reopen after the crash failed: " + meta.status().ToString();
    return Check(**meta, mode);
  }

  std::string History() const {
    std::string out;
    for (const std::string& line : log_) out += line + "\n";
    out += "metadata injections:\n";
    std::vector<std::string> env_log = env_.InjectionLog();
    for (size_t i = env_log.size() > 40 ? env_log.size() - 40 : 0; i < env_log.size(); ++i) {
      out += "  " + env_log[i] + "\n";
    }
    out += "volume injections:\n";
    std::vector<std::string> store_log = store_->InjectionLog();
    for (size_t i = store_log.size() > 40 ? store_log.size() - 40 : 0; i < store_log.size(); ++i) {
      out += "  " + store_log[i] + "\n";
    }
    return out;
  }

 private:
  uint64_t Pick(uint64_t lo, uint64_t hi) { return lo + rng_() % (hi - lo + 1); }
  bool Chance(uint64_t one_in) { return rng_() % one_in == 0; }
  void Log(std::string line) { log_.push_back(std::move(line)); }

  void ChooseGeometry() {
    const uint64_t regions[] = {4096, 8192, 16384, 65536};
    region_ = regions[Pick(0, 3)];
    extent_ = region_ * (uint64_t{1} << Pick(0, 3));
    // Mostly a tiny hot set (evictions all the time); now and then one of
    // 8 or more, where a sequential writer gets extents declared ahead (at
    // most a quarter of the set) and readahead.
    max_hot_ = static_cast<uint32_t>(Chance(3) ? Pick(8, 16) : Pick(1, 6));
    // Then, half the time, most writes are a sequential writer's.
    streaming_ = max_hot_ >= 8 && Chance(2);
    // Mostly small volumes (the cost of an iteration is its images); now and
    // then a large one.
    uint64_t max_count = Chance(16) ? 40 : std::max<uint64_t>(2, (256 << 10) / region_);
    if (streaming_) max_count *= 4;  // room for runs declared ahead
    uint64_t count = Pick(1, max_count);
    uint64_t tail = Pick(0, region_ / 512 - 1) * 512;
    size_ = count * region_ - tail;
    touched_.assign(count, false);
  }

  std::vector<std::byte> RandomImage() {
    std::vector<std::byte> image(size_);
    for (size_t i = 0; i < image.size(); i += 8) {
      uint64_t v = rng_() | 0x0101010101010101ull;  // never a zero byte
      std::memcpy(&image[i], &v, 8);
    }
    return image;
  }

  VolumeMetadataOptions Options() {
    VolumeMetadataOptions o;
    o.env = &env_;
    o.data_dir = "/data";
    o.group = "g";
    o.volume = "v";
    o.size_bytes = size_;
    o.region_size_bytes = region_;
    o.intent_extent_bytes = extent_;
    o.max_intent_extents = max_hot_;
    for (const Link& l : links_) o.downstream.push_back({l.site, l.initial_sync_none});
    FaultInjectionBlockStore* store = store_.get();
    o.flush_backing = [store] { return store->Flush(); };
    return o;
  }

  void Reopen() {
    meta_.reset();
    // A new open starts a new WriteSeq numbering and new link sessions.
    in_flight_.clear();
    recent_.clear();
    Result<std::unique_ptr<VolumeMetadata>> meta = VolumeMetadata::Open(Options());
    if (!meta.ok() && power_.on()) {
      // An injected fault hit the open; the operator would retry.
      Log("open failed: " + meta.status().ToString() + "; retrying");
      env_.ClearFaults();
      meta = VolumeMetadata::Open(Options());
    }
    if (meta.ok()) {
      meta_ = std::move(*meta);
    } else {
      Log("open failed: " + meta.status().ToString());
    }
  }

  uint32_t SlotOf(const VolumeMetadata& meta, const Link& link) {
    std::optional<uint32_t> slot = meta.SlotForSite(link.site);
    REQUIRE(slot.has_value());
    return *slot;
  }

  void Step() {
    if (!meta_) {
      Reopen();
      return;
    }
    Scoreboard& sb = meta_->scoreboard();
    uint64_t op = Pick(0, 99);
    if (op < 40) {
      // A write, trim or write-zeroes, through the write path.
      uint64_t offset = Pick(0, size_ / 512 - 1) * 512;
      uint64_t length = std::min(size_ - offset, Pick(1, 3 * region_ / 512) * 512);
      if (streaming_ ? !Chance(4) : Chance(4)) {
        // A sequential writer, one intent extent per write: the scoreboard
        // declares extents ahead of it and runs its readahead below.
        if (stream_pos_ >= size_) stream_pos_ = 0;
        offset = stream_pos_;
        length = std::min(size_ - offset, extent_);
        stream_pos_ += extent_;
      }
      uint64_t kind = Pick(0, 9);
      bool fua = Chance(6);
      WriteSeq seq = 0;
      for (uint64_t r = offset / region_; r <= (offset + length - 1) / region_; ++r) {
        touched_[r] = true;
      }
      // A write queued for a storage thread announces its extents first
      // (Scoreboard::Announce); some announced writes never come.
      if (Chance(3)) sb.Announce(offset, length);
      if (Chance(10)) {
        uint64_t announced = Pick(0, size_ / 512 - 1) * 512;
        touched_[announced / region_] = true;  // its extent may be resynced
        Log(fmt::format("announce {}+512, never written", announced));
        sb.Announce(announced, 512);
      }
      Status s = sb.MarkDirty(offset, length, &seq);
      std::string what = kind < 7 ? "write" : kind < 9 ? "trim" : "write_zeroes";
      Log(fmt::format("{} {}+{}{} seq {}: MarkDirty {}", what, offset, length, fua ? " fua" : "",
                      seq, s.ok() ? "ok" : s.ToString()));
      if (!s.ok()) return;  // the volume fails the write; nothing reaches the disk
      if (kind < 7) {
        std::vector<std::byte> data(length);
        uint32_t pattern = static_cast<uint32_t>(++writes_) * 2654435761u;
        for (size_t i = 0; i < length; i += 4) std::memcpy(&data[i], &pattern, 4);
        REQUIRE(store_->Write(offset, data, fua).ok());
      } else if (kind < 9) {
        REQUIRE(store_->Trim(offset, length, fua).ok());
      } else {
        REQUIRE(store_->WriteZeroes(offset, length, true, false, fua).ok());
      }
      recent_.push_back({offset, length, seq});
      if (recent_.size() > 8) recent_.erase(recent_.begin());
      // The NBD session runs the readahead on a pool thread when it is
      // due: sometimes before the next write, sometimes later or never.
      if (sb.ReadaheadDue() && Chance(2)) {
        ++readahead_calls_;
        Status ra = sb.CommitReadahead();
        Log("CommitReadahead: " + (ra.ok() ? std::string("ok") : ra.ToString()));
      }
    } else if (op < 50) {
      Log(fmt::format("store flush: {}", store_->Flush().ok() ? "ok" : "failed"));
    } else if (op < 65) {
      Send(sb);
    } else if (op < 80) {
      Deliver(sb);
    } else if (op < 92) {
      Status s = sb.FlushBitmaps();
      Log("FlushBitmaps: " + (s.ok() ? std::string("ok") : s.ToString()));
    } else if (op < 97) {
      Status s = meta_->Close();
      Log("clean restart: Close " + (s.ok() ? std::string("ok") : s.ToString()));
      if (links_.size() == 2 && Chance(3)) {
        // A new link that needs a full sync. (One with initial_sync none
        // would need this site's bytes frozen at that moment to be a fair
        // declaration, which a random crash point cannot promise.)
        links_.push_back(Link{"d", false, RandomImage()});
        Log("link d added");
      }
      Reopen();
    } else {
      Log(fmt::format("store flush: {}", store_->Flush().ok() ? "ok" : "failed"));
    }
  }

  // A link sends regions to its downstream site: either a resync of a
  // random run of regions (as of now), or the streaming of a recent write
  // (as of that write). The bytes are read now (page cache included: that
  // is what a sender reads); the site acknowledges them in a later step,
  // with writes possibly in between.
  void Send(Scoreboard& sb) {
    size_t link = Pick(0, links_.size() - 1);
    Transfer t;
    t.link = link;
    uint64_t first, count;
    if (!recent_.empty() && Chance(2)) {
      const Recent& w = recent_[Pick(0, recent_.size() - 1)];
      first = w.offset / region_;
      count = (w.offset + w.length - 1) / region_ - first + 1;
      t.as_of = w.seq;
    } else {
      uint64_t regions = (size_ + region_ - 1) / region_;
      first = Pick(0, regions - 1);
      count = Pick(1, std::min<uint64_t>(4, regions - first));
      t.as_of = sb.CurrentWriteSeq();
    }
    t.offset = first * region_;
    t.data.resize(std::min(count * region_, size_ - t.offset));
    REQUIRE(store_->Read(t.offset, t.data).ok());
    Log(fmt::format("send to {}: {}+{} as of seq {}", links_[link].site, t.offset, t.data.size(),
                    t.as_of));
    in_flight_.push_back(std::move(t));
  }

  // The downstream site has written a link's oldest transfer (a link is
  // one ordered stream): its image changes, and the link clears what the
  // transfer covered.
  void Deliver(Scoreboard& sb) {
    if (in_flight_.empty()) return;
    size_t link_index = in_flight_[Pick(0, in_flight_.size() - 1)].link;
    size_t i = 0;
    while (in_flight_[i].link != link_index) ++i;
    Transfer t = std::move(in_flight_[i]);
    in_flight_.erase(in_flight_.begin() + static_cast<ptrdiff_t>(i));
    Link& link = links_[t.link];
    std::memcpy(link.image.data() + t.offset, t.data.data(), t.data.size());
    std::optional<uint32_t> slot = meta_->SlotForSite(link.site);
    uint64_t cleared = slot ? sb.MarkClean(*slot, t.offset, t.data.size(), t.as_of) : 0;
    Log(fmt::format("ack from {}: {}+{} as of seq {}: {} regions cleared", link.site, t.offset,
                    t.data.size(), t.as_of, cleared));
  }

  void Crash(CrashMode mode) {
    switch (mode) {
      case CrashMode::kProcessCrash:
        env_.ApplyUnsyncedWrites();
        store_->ProcessCrash();
        break;
      case CrashMode::kPowerLossAll:
        env_.DropUnsyncedWrites();
        store_->PowerLoss(PowerLossMode::kDropAll, rng_);
        break;
      case CrashMode::kPowerLossRandom:
        env_.DropRandomUnsyncedWrites(rng_);
        store_->PowerLoss(PowerLossMode::kDropRandom, rng_);
        break;
      case CrashMode::kPowerLossTear:
        env_.TearUnsyncedWrites(512, rng_);
        store_->PowerLoss(PowerLossMode::kTear, rng_);
        break;
    }
  }

  std::optional<std::string> Check(VolumeMetadata& meta, CrashMode mode) {
    const std::vector<std::byte> disk = store_->DurableImage();
    const Scoreboard& sb = meta.scoreboard();
    for (const Link& link : links_) {
      std::optional<uint32_t> slot = meta.SlotForSite(link.site);
      if (!slot) return "no slot for site " + link.site + " after reopen";
      for (uint64_t r = 0; r < sb.region_count(); ++r) {
        uint64_t offset = r * region_;
        uint64_t length = std::min(region_, size_ - offset);
        bool differs = std::memcmp(disk.data() + offset, link.image.data() + offset, length) != 0;
        if (differs && !sb.IsDirty(*slot, r)) {
          return fmt::format("site {} region {} differs from this site's disk but is clean",
                             link.site, r);
        }
      }
    }
    // Invariant 2, roughly: site b started identical, so a dirty region of
    // b lies in an intent extent some write touched or announced, or in
    // one declared ahead of a sequential writer, which lies at most a hot
    // set's worth of extents after one a write touched (torn bitmap pages
    // are legitimately all dirty, so not after tearing).
    if (mode != CrashMode::kPowerLossTear) {
      uint32_t slot = *meta.SlotForSite("b");
      uint64_t per_extent = extent_ / region_;
      for (uint64_t r = 0; r < sb.region_count(); ++r) {
        if (!sb.IsDirty(slot, r)) continue;
        uint64_t e = r / per_extent;
        uint64_t from = e >= max_hot_ ? (e - max_hot_) * per_extent : 0;
        bool any = false;
        for (uint64_t t = from; t < std::min((e + 1) * per_extent, sb.region_count()); ++t) {
          any |= touched_[t];
        }
        if (!any) {
          return fmt::format("site b region {} is dirty but no write touched its extent or "
                             "the {} before it", r, max_hot_);
        }
      }
    }
    return std::nullopt;
  }

  struct Transfer {
    size_t link;
    uint64_t offset;
    std::vector<std::byte> data;
    WriteSeq as_of;
  };

  struct Recent {
    uint64_t offset;
    uint64_t length;
    WriteSeq seq;
  };

  const uint64_t seed_;
  std::mt19937_64 rng_;
  io::MemEnv mem_;
  PowerSwitch power_;
  FaultInjectionEnv env_;
  std::unique_ptr<FaultInjectionBlockStore> store_;
  std::unique_ptr<VolumeMetadata> meta_;
  std::vector<Link> links_;
  std::vector<Recent> recent_;
  std::vector<Transfer> in_flight_;
  std::vector<std::string> log_;
  std::vector<bool> touched_;  // regions any MarkDirty covered or Announce named
  uint64_t region_ = 0, extent_ = 0, size_ = 0;
  uint32_t max_hot_ = 0;
  uint64_t writes_ = 0;
  uint64_t stream_pos_ = 0;  // where the sequential writer writes next
  bool streaming_ = false;   // 3 of 4 writes are the sequential writer's

 public:
  uint64_t readahead_calls_ = 0;
};

TEST_CASE("Crash: after any crash every region that differs downstream is dirty", "[crash]") {
  const uint64_t seed = EnvNumber("BLOCKRELAY_CRASH_SEED").value_or(std::random_device{}() |
                                                                   uint64_t{std::random_device{}()}
                                                                       << 32);
  const uint64_t iterations = EnvNumber("BLOCKRELAY_CRASH_ITERATIONS").value_or(kDefaultIterations);
  INFO("BLOCKRELAY_CRASH_SEED=" << seed << " BLOCKRELAY_CRASH_ITERATIONS=" << iterations);
  uint64_t readahead_calls = 0;
  for (uint64_t i = 0; i < iterations; ++i) {
    CrashIteration iteration(seed + i);
    std::optional<std::string> failure = iteration.Run();
    readahead_calls += iteration.readahead_calls_;
    if (failure) {
      INFO("iteration " << i << " failed; rerun it alone with BLOCKRELAY_CRASH_SEED=" << seed + i
                        << " BLOCKRELAY_CRASH_ITERATIONS=1\n"
                        << iteration.History());
      FAIL(*failure);
    }
  }
  // The intent readahead path was taken, not only the plain write path
  // (about 1,700 readahead commits in the default 30,000 iterations).
  if (iterations >= 1000) CHECK(readahead_calls > 0);
  SUCCEED(iterations << " iterations from seed " << seed << ", " << readahead_calls
                     << " readahead commits");
}

}  // namespace
}  // namespace blockrelay::storage
