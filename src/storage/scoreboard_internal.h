// What VolumeMetadata::Open hands the Scoreboard it starts, and the
// superblock access VolumeMetadata needs afterwards. Private to storage/.
//
// Thread safety: StartScoreboard runs before the Scoreboard is shared;
// CurrentSuperblock/UpdateSuperblock take the scoreboard's metadata I/O lock.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "blockrelay/io/env.h"
#include "blockrelay/storage/scoreboard.h"
#include "storage/metadata_format.h"
#include "storage/metadata_io.h"

namespace blockrelay::storage {

struct ScoreboardStart {
  std::string path;
  std::unique_ptr<io::RandomRWFile> file;  // open read-write
  format::Geometry geometry;
  // The superblock to write once recovery is durable: slots already updated
  // (added slots in use, removed ones free), backing identity refreshed.
  // StartScoreboard sets its sequence and clears clean_shutdown.
  format::Superblock superblock;
  bool was_clean_shutdown = false;
  IntentLogRead intent_log;

  enum class SlotInit { kLoad, kAllDirty, kClean };
  struct Slot {
    uint32_t index = 0;
    std::string site;
    SlotInit init = SlotInit::kLoad;
  };
  std::vector<Slot> slots;  // every slot in use after this open, by index

  std::function<Status()> flush_backing;  // may be empty
};

// Builds the in-memory scoreboard (bitmaps of kept slots from disk, torn
// pages as all dirty, the intent log merged after an unclean shutdown, new
// slots all dirty or clean), makes all of it durable, then writes an empty
// intent record and the new superblock and syncs. Appends what it found to
// *notices.
Result<std::unique_ptr<Scoreboard>> StartScoreboard(ScoreboardStart start,
                                                    std::vector<std::string>* notices);

// The superblock as last written.
format::Superblock CurrentSuperblock(const Scoreboard& scoreboard);
// Applies `change` to a copy of the superblock and writes it durably.
// Fails (sticky) like every metadata write.
Status UpdateSuperblock(Scoreboard& scoreboard,
                        const std::function<void(format::Superblock&)>& change);

}  // namespace blockrelay::storage
