// VolumeMetadata: open, check and recover a volume's metadata file.

#include "blockrelay/storage/volume_metadata.h"

#include <algorithm>
#include <set>

#include <fmt/format.h>

#include "storage/metadata_format.h"
#include "storage/metadata_io.h"
#include "storage/scoreboard_internal.h"

namespace blockrelay::storage {

namespace {

using format::BackingIdentity;
using format::BackingKind;

constexpr uint64_t kDefaultIntentExtentBytes = 4ull << 20;

Result<BackingIdentity> StatBacking(io::Env* env, const std::string& path,
                                    const std::string& label) {
  BackingIdentity id;
  if (path.empty()) return id;
  if (path.size() > format::kMaxBackingPathBytes) {
    return Status::InvalidArgument(fmt::format("volume {}: backing path is longer than {} bytes",
                                               label, format::kMaxBackingPathBytes));
  }
  Result<io::FileInfo> info = env->Stat(path);
  if (!info.ok()) {
    return info.status().WithContext(fmt::format(
        "volume {}: the backing store must exist before its metadata is opened", label));
  }
  id.path = path;
  switch (info->type) {
    case io::FileType::kRegular:
      id.kind = BackingKind::kFile;
      id.device = info->device;
      id.inode = info->inode;
      break;
    case io::FileType::kBlockDevice:
      id.kind = BackingKind::kBlockDevice;
      id.rdev = info->rdev;
      break;
    default:
      return Status::InvalidArgument(fmt::format(
          "volume {}: backing {} is neither a regular file nor a block device", label, path));
  }
  return id;
}

// Decides whether `current` is the backing the metadata was made for.
// Returns the identity to record.
Result<BackingIdentity> CheckBacking(const BackingIdentity& stored, const BackingIdentity& current,
                                     const VolumeMetadataOptions& o, const std::string& label,
                                     const std::string& meta_path,
                                     std::vector<std::string>* notices) {
  if (current.kind == BackingKind::kNone) return stored;  // nothing to check against
  if (stored.kind == BackingKind::kNone) return current;  // first time we know it
  bool same = stored.kind == current.kind &&
              (current.kind == BackingKind::kFile ? stored.inode == current.inode
                                                  : stored.rdev == current.rdev);
  if (!same) {
    if (!o.accept_backing_change) {
      return Status::InvalidArgument(fmt::format(
          "volume {}: backing {} is not the one this volume's metadata was made for: it was a {} "
          "(at {}), now it is a {}. The scoreboard describes the old contents, so trusting it "
          "could hide differences from downstream sites. If {} holds the same data (restored "
          "from a copy, moved, or the device was renumbered), start once with "
          "`blockrelay run --accept-backing-change {}` to keep the scoreboard; if it does "
          "not, remove {} so that "
          "every downstream link gets a full sync.",
          label, current.path, format::DescribeBacking(stored), stored.path, format::DescribeBacking(current), current.path,
          o.volume, meta_path));
    }
    notices->push_back(fmt::format(
        "backing identity changed from {} ({}) to {} ({}); accepted as the same data "
        "(accept_backing_change)",
        format::DescribeBacking(stored), stored.path, format::DescribeBacking(current), current.path));
    return current;
  }
  // Same file. File systems and device mappers can be renumbered across
  // reboots, so a new st_dev with the same inode is not a replacement.
  if (current.kind == BackingKind::kFile && stored.device != current.device) {
    notices->push_back(fmt::format("backing {} is now on device {} (was {}), same inode {}",
                                   current.path, format::FormatDeviceNumber(current.device),
                                   format::FormatDeviceNumber(stored.device), current.inode));
  }
  if (stored.path != current.path) {
    notices->push_back(
        fmt::format("backing moved from {} to {} (same file)", stored.path, current.path));
  }
  return current;
}

Status CheckOptions(const VolumeMetadataOptions& o, const std::string& label) {
  if (o.data_dir.empty()) {
    return Status::InvalidArgument(fmt::format("volume {}: data_dir is empty", label));
  }
  if (!format::IsValidName(o.group)) {
    return Status::InvalidArgument(
        fmt::format("group name \"{}\" must match [A-Za-z0-9._-]{{1,64}}", o.group));
  }
  if (!format::IsValidName(o.volume)) {
    return Status::InvalidArgument(
        fmt::format("volume name \"{}\" must match [A-Za-z0-9._-]{{1,64}}", o.volume));
  }
  if (o.downstream.size() > format::kMaxSlots) {
    return Status::InvalidArgument(fmt::format("volume {}: {} downstream links; at most {}", label,
                                               o.downstream.size(), format::kMaxSlots));
  }
  std::set<std::string> sites;
  for (const DownstreamSlotOptions& d : o.downstream) {
    if (!format::IsValidName(d.site)) {
      return Status::InvalidArgument(fmt::format(
          "volume {}: downstream site \"{}\" must match [A-Za-z0-9._-]{{1,64}}", label, d.site));
    }
    if (!sites.insert(d.site).second) {
      return Status::InvalidArgument(
          fmt::format("volume {}: downstream site {} is listed twice", label, d.site));
    }
  }
  return Status::OK();
}

// Writes a new metadata file crash-safely: all of it into path.tmp, synced,
// then renamed over path and the directory synced. A crash leaves either no
// file (the next start creates it again) or a whole one.
Status CreateMetadataFile(io::Env* env, const std::string& path, const format::Geometry& g,
                          const VolumeMetadataOptions& o, const BackingIdentity& backing) {
  const std::string tmp = path + ".tmp";
  if (env->FileExists(tmp)) {
    Status s = env->RemoveFile(tmp);  // left by a crash during a creation
    if (!s.ok()) return s;
  }
  Result<std::unique_ptr<io::RandomRWFile>> file = env->OpenFile(tmp, io::OpenMode::kCreateTruncate);
  if (!file.ok()) return file.status();
  Status s = (*file)->Truncate(g.file_bytes);  // sparse: unused slots cost nothing
  if (!s.ok()) return s;

  format::Superblock sb;
  sb.clean_shutdown = true;  // nothing to merge yet
  sb.volume_uuid = Uuid::Random();
  sb.size_bytes = g.size_bytes;
  sb.region_size_bytes = g.region_size_bytes;
  sb.intent_extent_bytes = g.intent_extent_bytes;
  sb.max_intent_extents = g.max_intent_extents;
  sb.generation = Generation{Uuid::Random(), 1};
  sb.group = o.group;
  sb.volume = o.volume;
  sb.backing = backing;
  // Both copies valid from the start, so "one copy unreadable" always means
  // a torn update.
  for (uint64_t seq : {1, 2}) {
    sb.sequence = seq;
    s = WriteSuperblockCopy(**file, g, sb);
    if (!s.ok()) return s;
  }
  format::IntentRecord empty;
  empty.sequence = 1;
  empty.ring_index = 0;
  s = (*file)->PWrite(g.IntentRecordOffset(0),
                      format::EncodeIntentRecord(empty, sb.volume_uuid.Low64(), g));
  if (!s.ok()) return s;
  s = (*file)->Sync();
  if (!s.ok()) return s;
  file->reset();
  s = env->RenameFile(tmp, path);
  if (!s.ok()) return s;
  s = env->SyncDir(io::DirName(path));
  if (!s.ok()) return s;
  return env->SyncDir(o.data_dir);
}

std::string StartOverAdvice(const std::string& meta_path) {
  return fmt::format(
      "To start over, remove {}: the volume then gets a new identity and every downstream link "
      "needs a full sync.",
      meta_path);
}

}  // namespace

std::string MetadataPath(const std::string& data_dir, const std::string& group,
                         const std::string& volume) {
  return data_dir + "/" + group + "/" + volume + ".meta";
}

Result<std::unique_ptr<VolumeMetadata>> VolumeMetadata::Open(const VolumeMetadataOptions& o) {
  io::Env* env = o.env != nullptr ? o.env : io::Env::Default();
  const std::string label = o.group + "/" + o.volume;
  Status s = CheckOptions(o, label);
  if (!s.ok()) return s;
  uint64_t extent_bytes = o.intent_extent_bytes != 0
                              ? o.intent_extent_bytes
                              : std::max(kDefaultIntentExtentBytes, o.region_size_bytes);
  Result<format::Geometry> wanted =
      format::MakeGeometry(o.size_bytes, o.region_size_bytes, extent_bytes, o.max_intent_extents);
  if (!wanted.ok()) return wanted.status().WithContext("volume " + label);

  const std::string path = MetadataPath(o.data_dir, o.group, o.volume);
  Result<BackingIdentity> backing = StatBacking(env, o.backing_path, label);
  if (!backing.ok()) return backing.status();
  auto meta = std::unique_ptr<VolumeMetadata>(new VolumeMetadata());
  meta->path_ = path;

  s = env->CreateDirs(io::DirName(path));
  if (!s.ok()) return s;
  if (!env->FileExists(path)) {
    s = CreateMetadataFile(env, path, *wanted, o, *backing);
    if (!s.ok()) return s.WithContext(fmt::format("creating {}", path));
    meta->notices_.push_back(fmt::format("created {}", path));
  }

  Result<std::unique_ptr<io::RandomRWFile>> file = env->OpenFile(path, io::OpenMode::kReadWrite);
  if (!file.ok()) return file.status();
  Result<SuperblockRead> read = ReadSuperblock(**file);
  if (!read.ok()) {
    if (read.status().IsNotSupported()) {
      return Status::NotSupported(fmt::format(
          "volume {}: {}. Use the blockrelay release that wrote it. {}", label,
          read.status().message(), StartOverAdvice(path)));
    }
    return Status::FromCode(read.status().code(),
                            fmt::format("volume {}: {}. The scoreboard cannot be trusted. {}",
                                        label, read.status().message(), StartOverAdvice(path)),
                            read.status().errno_value());
  }
  format::Superblock sb = read->superblock;
  const format::Geometry& g = read->geometry;
  meta->notices_.insert(meta->notices_.end(), read->notices.begin(), read->notices.end());

  if (sb.group != o.group || sb.volume != o.volume) {
    return Status::InvalidArgument(fmt::format(
        "{} holds the metadata of volume {}/{}, not {}: was it copied or renamed? Put it back "
        "where it belongs. {}",
        path, sb.group, sb.volume, label, StartOverAdvice(path)));
  }
  if (sb.size_bytes != o.size_bytes) {
    return Status::InvalidArgument(fmt::format(
        "volume {}: size is {} bytes ({}) in the configuration, but the metadata in {} was made "
        "for {} bytes ({}). Resizing a replicated volume is not supported: restore the size "
        "(and the backing store's size). {}",
        label, o.size_bytes, format::FormatBytes(o.size_bytes), path, sb.size_bytes,
        format::FormatBytes(sb.size_bytes), StartOverAdvice(path)));
  }
  if (sb.region_size_bytes != o.region_size_bytes) {
    return Status::InvalidArgument(fmt::format(
        "volume {}: region_size is {} in the configuration, but the metadata in {} uses {}. "
        "Restore region_size to {} in the group's configuration. {}",
        label, format::FormatBytes(o.region_size_bytes), path,
        format::FormatBytes(sb.region_size_bytes), format::FormatBytes(sb.region_size_bytes),
        StartOverAdvice(path)));
  }
  Result<BackingIdentity> identity =
      CheckBacking(sb.backing, *backing, o, label, path, &meta->notices_);
  if (!identity.ok()) return identity.status();
  sb.backing = *identity;

  Result<IntentLogRead> log = ReadIntentLog(**file, g, sb.volume_uuid.Low64());
  if (!log.ok()) {
    return Status::Corruption(fmt::format("volume {}: {}. The scoreboard cannot be trusted. {}",
                                          label, log.status().message(), StartOverAdvice(path)));
  }

  // Reconcile slots with the configured links. A slot freed now is not
  // reused in the same superblock update: were the update torn after a new
  // slot's pages overwrote the old slot's, the old site would come back with
  // the new site's bitmap.
  ScoreboardStart start;
  const uint64_t new_sequence = sb.sequence + 1;  // what StartScoreboard writes
  std::set<std::string> configured;
  for (const DownstreamSlotOptions& d : o.downstream) configured.insert(d.site);
  std::set<std::string> present;
  for (uint32_t i = 0; i < format::kMaxSlots; ++i) {
    format::SlotEntry& slot = sb.slots[i];
    if (!slot.in_use) continue;
    if (configured.count(slot.site) == 0) {
      meta->notices_.push_back(fmt::format(
          "slot {} freed: site {} is no longer a downstream link of this volume", i, slot.site));
      slot = format::SlotEntry{};
      continue;
    }
    present.insert(slot.site);
  }
  const std::array<format::SlotEntry, format::kMaxSlots>& on_disk = read->superblock.slots;
  for (const DownstreamSlotOptions& d : o.downstream) {
    if (present.count(d.site) != 0) continue;
    uint32_t index = 0;
    while (index < format::kMaxSlots && (sb.slots[index].in_use || on_disk[index].in_use)) ++index;
    if (index == format::kMaxSlots) {
      return Status::InvalidArgument(fmt::format(
          "volume {}: no free scoreboard slot for new downstream site {}: slots freed by this "
          "start can be reused from the next start on; start once without {}, then again with it",
          label, d.site, d.site));
    }
    format::SlotEntry& slot = sb.slots[index];
    slot.in_use = true;
    slot.site = d.site;
    slot.flags = d.initial_sync_none ? format::kSlotFlagInitialSyncNone : 0;
    slot.created_sequence = new_sequence;
  }
  for (uint32_t i = 0; i < format::kMaxSlots; ++i) {
    const format::SlotEntry& slot = sb.slots[i];
    if (!slot.in_use) continue;
    bool added = slot.created_sequence == new_sequence;
    bool none = (slot.flags & format::kSlotFlagInitialSyncNone) != 0;
    ScoreboardStart::Slot start_slot;
    start_slot.index = i;
    start_slot.site = slot.site;
    start_slot.init = !added ? ScoreboardStart::SlotInit::kLoad
                             : (none ? ScoreboardStart::SlotInit::kClean
                                     : ScoreboardStart::SlotInit::kAllDirty);
    start.slots.push_back(start_slot);
    meta->slots_.push_back(SlotInfo{i, slot.site, added, none});
  }

  meta->volume_uuid_ = sb.volume_uuid;
  meta->recovered_unclean_ = !sb.clean_shutdown;
  start.path = path;
  start.file = std::move(*file);
  start.geometry = g;
  start.was_clean_shutdown = sb.clean_shutdown;
  start.superblock = std::move(sb);
  start.intent_log = std::move(*log);
  start.flush_backing = o.flush_backing;
  Result<std::unique_ptr<Scoreboard>> scoreboard = StartScoreboard(std::move(start), &meta->notices_);
  if (!scoreboard.ok()) return scoreboard.status().WithContext("volume " + label);
  meta->scoreboard_ = std::move(*scoreboard);
  return meta;
}

VolumeMetadata::~VolumeMetadata() = default;

std::optional<uint32_t> VolumeMetadata::SlotForSite(std::string_view site) const {
  for (const SlotInfo& s : slots_) {
    if (s.site == site) return s.slot;
  }
  return std::nullopt;
}

Generation VolumeMetadata::generation() const {
  return CurrentSuperblock(*scoreboard_).generation;
}

std::vector<Generation> VolumeMetadata::generation_history() const {
  return CurrentSuperblock(*scoreboard_).generation_history;
}

Status VolumeMetadata::StartNewGeneration() {
  return UpdateSuperblock(*scoreboard_, [](format::Superblock& sb) {
    sb.generation_history.insert(sb.generation_history.begin(), sb.generation);
    if (sb.generation_history.size() > format::kMaxGenerationHistory) {
      sb.generation_history.resize(format::kMaxGenerationHistory);
    }
    sb.generation = Generation{Uuid::Random(), sb.generation.counter + 1};
  });
}

Status VolumeMetadata::SetGeneration(const Generation& current,
                                     std::vector<Generation> history) {
  if (history.size() > format::kMaxGenerationHistory) {
    history.resize(format::kMaxGenerationHistory);
  }
  return UpdateSuperblock(*scoreboard_, [&](format::Superblock& sb) {
    sb.generation = current;
    sb.generation_history = history;
  });
}

}  // namespace blockrelay::storage
