// Inspecting volume metadata offline: the storage half of
// `blockrelay inspect --config FILE [--json]`.
//
// InspectVolumeMetadata() reads, without writing and without taking the
// data_dir lock, the metadata file of every volume in the site's
// configuration and reports what a restart would find: superblock fields,
// per slot the dirty regions and dirty bytes (the on-disk bitmap, plus the
// intent extents after an unclean shutdown, plus torn pages as all dirty),
// and the intent extents in use. It refuses while a blockrelay process holds
// the data_dir lock, because a running daemon changes the file under it
// (`blockrelay status` is the tool for a running site).
//
// JSON shape (field names carry their unit):
//   { "data_dir": str,
//     "volumes": [ { "group": str, "volume": str, "metadata_path": str,
//       "state": "ok" | "missing" | "error", "error": str (state error),
//       -- the rest only with state ok --
//       "format_version": 1, "volume_uuid": str, "size_bytes": n,
//       "region_size_bytes": n, "region_count": n, "intent_extent_bytes": n,
//       "max_intent_extents": n, "intent_extents_in_use": n,
//       "clean_shutdown": bool, "superblock_sequence": n,
//       "backing": { "kind": "none" | "file" | "block device", "path": str,
//                    "device": "maj:min", "inode": n | "rdev": "maj:min" },
//       "generation": { "uuid": str, "counter": n },
//       "generation_history": [ { "uuid": str, "counter": n } ],
//       "slots": [ { "slot": n, "site": str, "configured": bool,
//                    "initial_sync_none": bool, "dirty_regions": n,
//                    "dirty_bytes": n, "torn_pages": n } ],
//       "pending_sites": [ { "site": str, "initial_sync_none": bool } ],
//       "notices": [ str ] } ] }
// "configured": false marks a slot the next start frees; "pending_sites"
// are configured links the next start gives a new slot.
//
// Thread safety: free functions; blocking file I/O.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "blockrelay/config/site_config.h"
#include "blockrelay/io/env.h"
#include "blockrelay/status.h"

namespace blockrelay::storage {

// Fails with Status::Busy when the daemon holds data_dir's lock (before or
// after the read). A volume whose metadata is missing or unreadable gets
// state "missing" or "error" in the report, not a failure of the call.
// `env` nullptr: io::Env::Default().
Result<nlohmann::json> InspectVolumeMetadata(const config::SiteConfig& config,
                                             io::Env* env = nullptr);

// The report as aligned text for a terminal, one block per volume with a
// slot table.
std::string RenderInspectText(const nlohmann::json& report);

}  // namespace blockrelay::storage
