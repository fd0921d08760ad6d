// VolumeMetadata: a volume's persistent identity and scoreboard.
//
// One metadata file per volume, data_dir/<group>/<volume>.meta (format in
// src/storage/metadata_format.h and docs/metadata-format.md): a superblock
// (volume uuid, size, region size, backing file identity, generation
// identifiers, clean-shutdown flag, one slot per downstream link) and, per
// slot, a fine dirty bitmap, plus one intent-extent log for the volume.
//
// Open() creates the file on first start. On later starts it checks the
// file against the configuration and refuses a mismatch with a message that
// says what differs and what the operator can do: size changed, region size
// changed, backing file replaced by another file, torn or corrupt metadata,
// a newer format version. It then reconciles slots with the configured
// downstream links: a new link gets a slot with every region dirty (it needs
// a full sync), or every region clean with initial_sync "none"; a link no
// longer configured frees its slot. After an unclean shutdown each slot's
// dirty set is its on-disk bitmap ∪ every region of every extent in the
// intent log; torn bitmap pages count as all dirty. All of that is durable
// before Open returns.
//
// The caller must hold the data_dir lock (io::LockDataDir) while a
// VolumeMetadata is open: two processes writing one metadata file would
// corrupt it.
//
// Thread safety: the accessors may be called from any thread;
// StartNewGeneration and Close block on metadata I/O (storage threads).
// See scoreboard.h for the Scoreboard's rules.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "blockrelay/io/env.h"
#include "blockrelay/status.h"
#include "blockrelay/storage/generation.h"
#include "blockrelay/storage/scoreboard.h"
#include "blockrelay/storage/uuid.h"

namespace blockrelay::storage {

struct DownstreamSlotOptions {
  std::string site;  // [A-Za-z0-9._-]{1,64}, unique within the volume
  // The operator declares this site identical to this one right now (new
  // blank disks, or copied by other means): a new slot starts clean instead
  // of all dirty. Ignored for a site that already has a slot.
  bool initial_sync_none = false;
};

struct VolumeMetadataOptions {
  io::Env* env = nullptr;  // nullptr: io::Env::Default()
  std::string data_dir;
  std::string group;   // [A-Za-z0-9._-]{1,64}
  std::string volume;  // [A-Za-z0-9._-]{1,64}
  uint64_t size_bytes = 0;  // > 0, multiple of 512
  uint64_t region_size_bytes = 64ull << 10;  // power of 2, 4 KiB .. 16 MiB
  // The backing file or block device, for its identity (st_dev/st_ino of a
  // file, st_rdev of a block device). REQUIRES: it exists (open the
  // BlockStore first). Empty: no identity is recorded or checked (tests
  // with in-memory stores).
  std::string backing_path;
  std::vector<DownstreamSlotOptions> downstream;  // at most 16

  // Used when the metadata is created; an existing file keeps its own.
  // 0: max(4 MiB, region_size_bytes). Must be a multiple of region_size.
  uint64_t intent_extent_bytes = 0;
  uint32_t max_intent_extents = 1024;  // hot set bound, 1 .. 65536

  // The operator says the backing file or device at backing_path holds the
  // same data as the one the metadata was made for, although its identity
  // changed (restored from a copy, device renumbered): record the new
  // identity and keep the scoreboard.
  bool accept_backing_change = false;

  // Flushes the backing store (BlockStore::Flush). The scoreboard calls it
  // before persisting a cleared bit, from a storage thread, holding its
  // metadata lock: it must not call back into the scoreboard. May be empty
  // only if MarkClean is never used or every write is already durable.
  std::function<Status()> flush_backing;
};

// A slot in use, with what this open did to it.
struct SlotInfo {
  uint32_t slot = 0;
  std::string site;
  bool added = false;  // created by this Open
  bool initial_sync_none = false;  // created clean (now or earlier)
};

class VolumeMetadata {
 public:
  // See the header comment. Errors:
  //   InvalidArgument: bad options, or the file does not match them
  //     (size, region size, backing identity, names) -- the message says
  //     what differs and what to do;
  //   NotSupported: another format version;
  //   Corruption: both superblock copies unreadable, truncated file, an
  //     impossible intent record;
  //   IOError and friends from the Env.
  static Result<std::unique_ptr<VolumeMetadata>> Open(const VolumeMetadataOptions& options);

  // Without Close() this is a crash as far as the file is concerned (safe).
  ~VolumeMetadata();

  Scoreboard& scoreboard() { return *scoreboard_; }
  const Scoreboard& scoreboard() const { return *scoreboard_; }

  const std::string& path() const { return path_; }
  const Uuid& volume_uuid() const { return volume_uuid_; }
  uint64_t size_bytes() const { return scoreboard_->size_bytes(); }
  uint64_t region_size_bytes() const { return scoreboard_->region_size_bytes(); }
  const std::vector<SlotInfo>& slots() const { return slots_; }
  std::optional<uint32_t> SlotForSite(std::string_view site) const;

  // True if the previous shutdown was not clean (the intent log was merged).
  bool recovered_unclean_shutdown() const { return recovered_unclean_; }
  // What Open found or did, one line each, for the caller to log: slots
  // added or freed, a torn superblock copy, torn bitmap pages, the merged
  // intent log, an accepted change of backing identity.
  const std::vector<std::string>& open_notices() const { return notices_; }

  Generation generation() const;
  std::vector<Generation> generation_history() const;  // newest first
  // Moves the current generation into the history (keeping 4) and starts a
  // new one (random uuid, counter + 1), durably. For promote/demote.
  Status StartNewGeneration();
  // Replaces the current generation and the history (cut to the newest 4),
  // durably: a promote of a group (one new generation shared by all its
  // volumes), or a downstream adopting its upstream's generation.
  Status SetGeneration(const Generation& current, std::vector<Generation> history);

  // Scoreboard().Close(): flush and mark the shutdown clean.
  Status Close() { return scoreboard_->Close(); }

 private:
  VolumeMetadata() = default;

  std::string path_;
  Uuid volume_uuid_;
  std::vector<SlotInfo> slots_;
  bool recovered_unclean_ = false;
  std::vector<std::string> notices_;
  std::unique_ptr<Scoreboard> scoreboard_;
};

// data_dir/<group>/<volume>.meta
std::string MetadataPath(const std::string& data_dir, const std::string& group,
                         const std::string& volume);

}  // namespace blockrelay::storage
