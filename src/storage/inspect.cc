// Offline inspection of volume metadata: see include/blockrelay/storage/inspect.h.

#include "blockrelay/storage/inspect.h"

#include <algorithm>
#include <map>

#include <fmt/format.h>

#include "blockrelay/io/data_dir_lock.h"
#include "blockrelay/storage/volume_metadata.h"
#include "storage/metadata_format.h"
#include "storage/metadata_io.h"
#include "storage/slot_bitmap.h"

namespace blockrelay::storage {

namespace {

nlohmann::json GenerationJson(const Generation& g) {
  return {{"uuid", g.uuid.ToString()}, {"counter", g.counter}};
}

nlohmann::json BackingJson(const format::BackingIdentity& b) {
  nlohmann::json j = {{"kind", format::ToString(b.kind)}};
  if (b.kind == format::BackingKind::kNone) return j;
  j["path"] = b.path;
  if (b.kind == format::BackingKind::kFile) {
    j["device"] = format::FormatDeviceNumber(b.device);
    j["inode"] = b.inode;
  } else {
    j["rdev"] = format::FormatDeviceNumber(b.rdev);
  }
  return j;
}

// Reads one volume's file into `out` (state ok), or returns why not.
Status InspectOne(io::Env* env, const std::string& path, const config::GroupConfig& group,
                  nlohmann::json* out) {
  Result<std::unique_ptr<io::RandomRWFile>> file = env->OpenFile(path, io::OpenMode::kReadOnly);
  if (!file.ok()) return file.status();
  Result<SuperblockRead> read = ReadSuperblock(**file);
  if (!read.ok()) return read.status();
  const format::Superblock& sb = read->superblock;
  const format::Geometry& g = read->geometry;
  const uint64_t salt = sb.volume_uuid.Low64();
  Result<IntentLogRead> log = ReadIntentLog(**file, g, salt);
  if (!log.ok()) return log.status();
  std::vector<std::string> notices = read->notices;
  const std::vector<uint32_t> no_extents;
  const std::vector<uint32_t>& extents = log->latest ? log->latest->extents : no_extents;

  nlohmann::json& j = *out;
  j["state"] = "ok";
  j["format_version"] = format::kFormatVersion;
  j["volume_uuid"] = sb.volume_uuid.ToString();
  j["size_bytes"] = sb.size_bytes;
  j["region_size_bytes"] = sb.region_size_bytes;
  j["region_count"] = g.region_count;
  j["intent_extent_bytes"] = sb.intent_extent_bytes;
  j["max_intent_extents"] = sb.max_intent_extents;
  j["intent_extents_in_use"] = extents.size();
  j["clean_shutdown"] = sb.clean_shutdown;
  j["superblock_sequence"] = sb.sequence;
  j["backing"] = BackingJson(sb.backing);
  j["generation"] = GenerationJson(sb.generation);
  j["generation_history"] = nlohmann::json::array();
  for (const Generation& h : sb.generation_history) {
    j["generation_history"].push_back(GenerationJson(h));
  }
  if (!sb.clean_shutdown) {
    notices.push_back(fmt::format(
        "the last shutdown was not clean: the {} intent extent(s) in use count as dirty",
        extents.size()));
  }

  std::map<std::string, bool> configured;  // site -> initial_sync none
  for (const config::DownstreamConfig& d : group.downstream) {
    configured[d.site] = d.initial_sync == config::InitialSync::kNone;
  }
  j["slots"] = nlohmann::json::array();
  for (uint32_t i = 0; i < format::kMaxSlots; ++i) {
    const format::SlotEntry& slot = sb.slots[i];
    if (!slot.in_use) continue;
    // The same recovery a start performs, in memory only.
    SlotBitmap bitmap(g.region_count);
    uint64_t torn = 0;
    Status s = LoadSlotBitmap(**file, g, salt, i, slot.site, &bitmap, &notices, &torn);
    if (!s.ok()) return s;
    if (!sb.clean_shutdown) ApplyIntentExtents(extents, g, &bitmap);
    j["slots"].push_back({{"slot", i},
                          {"site", slot.site},
                          {"configured", configured.count(slot.site) != 0},
                          {"initial_sync_none", (slot.flags & format::kSlotFlagInitialSyncNone) != 0},
                          {"dirty_regions", bitmap.CountSet()},
                          {"dirty_bytes", DirtyBytes(bitmap, g)},
                          {"torn_pages", torn}});
    configured.erase(slot.site);
  }
  j["pending_sites"] = nlohmann::json::array();
  for (const auto& [site, none] : configured) {
    j["pending_sites"].push_back({{"site", site}, {"initial_sync_none", none}});
  }
  j["notices"] = notices;
  return Status::OK();
}

Status RefuseIfRunning(io::Env* env, const std::string& data_dir, const char* when) {
  Result<io::DataDirLockState> lock = io::ProbeDataDirLock(env, data_dir);
  if (!lock.ok()) return lock.status();
  if (!lock->locked) return Status::OK();
  return Status::Busy(fmt::format(
      "data_dir {} is in use by a running blockrelay process ({}){}: inspect reads metadata "
      "only while the daemon is stopped; use `blockrelay status` for a running site",
      data_dir, lock->holder_pid ? fmt::format("pid {}", *lock->holder_pid) : "pid unknown",
      when));
}

}  // namespace

Result<nlohmann::json> InspectVolumeMetadata(const config::SiteConfig& config, io::Env* env) {
  if (env == nullptr) env = io::Env::Default();
  const std::string data_dir = config.data_dir.string();
  Status s = RefuseIfRunning(env, data_dir, "");
  if (!s.ok()) return s;
  nlohmann::json report = {{"data_dir", data_dir}, {"volumes", nlohmann::json::array()}};
  for (const config::GroupConfig& group : config.groups) {
    for (const config::VolumeConfig& volume : group.volumes) {
      const std::string path = MetadataPath(data_dir, group.name, volume.name);
      nlohmann::json v = {{"group", group.name}, {"volume", volume.name}, {"metadata_path", path}};
      if (!env->FileExists(path)) {
        v["state"] = "missing";
      } else {
        Status one = InspectOne(env, path, group, &v);
        if (!one.ok()) {
          v = {{"group", group.name},
               {"volume", volume.name},
               {"metadata_path", path},
               {"state", "error"},
               {"error", one.ToString()}};
        }
      }
      report["volumes"].push_back(std::move(v));
    }
  }
  // A daemon that started while we read may have changed what we report.
  s = RefuseIfRunning(env, data_dir, " (it started while inspect was reading)");
  if (!s.ok()) return s;
  return report;
}

namespace {

// Columns padded to their widest cell; numeric columns right-aligned.
std::string RenderTable(const std::vector<std::vector<std::string>>& rows,
                        const std::vector<bool>& right_align, const std::string& indent) {
  std::vector<size_t> width(rows.front().size(), 0);
  for (const auto& row : rows) {
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line = indent;
    for (size_t c = 0; c < row.size(); ++c) {
      std::string pad(width[c] - row[c].size(), ' ');
      line += right_align[c] ? pad + row[c] : row[c] + pad;
      if (c + 1 < row.size()) line += "  ";
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line + "\n";
  }
  return out;
}

std::string BytesCell(uint64_t bytes) {
  if (bytes == 0) return "0";
  std::string human = format::FormatBytes(bytes);
  if (human.ends_with(" bytes")) return std::to_string(bytes);
  return fmt::format("{} ({})", bytes, human);
}

}  // namespace

std::string RenderInspectText(const nlohmann::json& report) {
  std::string out = fmt::format("data_dir {}\n", report.value("data_dir", ""));
  for (const nlohmann::json& v : report.value("volumes", nlohmann::json::array())) {
    out += fmt::format("\nvolume {}/{}  {}\n", v.value("group", ""), v.value("volume", ""),
                       v.value("metadata_path", ""));
    std::string state = v.value("state", "");
    if (state == "missing") {
      out += "  no metadata yet (the volume has not been started)\n";
      continue;
    }
    if (state != "ok") {
      out += fmt::format("  error: {}\n", v.value("error", "unknown"));
      continue;
    }
    std::vector<std::vector<std::string>> fields;
    fields.push_back({"uuid", v["volume_uuid"].get<std::string>()});
    fields.push_back({"size", fmt::format("{}, {} regions of {}",
                                          BytesCell(v["size_bytes"].get<uint64_t>()),
                                          v["region_count"].get<uint64_t>(),
                                          format::FormatBytes(v["region_size_bytes"].get<uint64_t>()))});
    fields.push_back({"intent extents",
                      fmt::format("{} in use of {}, {} each",
                                  v["intent_extents_in_use"].get<uint64_t>(),
                                  v["max_intent_extents"].get<uint64_t>(),
                                  format::FormatBytes(v["intent_extent_bytes"].get<uint64_t>()))});
    fields.push_back({"shutdown", v["clean_shutdown"].get<bool>() ? "clean" : "unclean"});
    std::string generation = fmt::format("{} #{}", v["generation"]["uuid"].get<std::string>(),
                                         v["generation"]["counter"].get<uint64_t>());
    for (const nlohmann::json& h : v["generation_history"]) {
      generation += fmt::format(", was {} #{}", h["uuid"].get<std::string>(),
                                h["counter"].get<uint64_t>());
    }
    fields.push_back({"generation", generation});
    const nlohmann::json& b = v["backing"];
    std::string backing = b["kind"].get<std::string>();
    if (b.contains("path")) {
      backing = b.contains("inode")
                    ? fmt::format("{} (file, inode {} on device {})", b["path"].get<std::string>(),
                                  b["inode"].get<uint64_t>(), b["device"].get<std::string>())
                    : fmt::format("{} (block device {})", b["path"].get<std::string>(),
                                  b["rdev"].get<std::string>());
    }
    fields.push_back({"backing", backing});
    out += RenderTable(fields, {false, false}, "  ");

    std::vector<std::vector<std::string>> slots = {
        {"SLOT", "SITE", "DIRTY REGIONS", "DIRTY BYTES", "NOTE"}};
    for (const nlohmann::json& s : v["slots"]) {
      std::string note;
      if (!s["configured"].get<bool>()) note = "not configured: freed at next start";
      if (s["torn_pages"].get<uint64_t>() > 0) {
        note += fmt::format("{}{} torn page(s) counted dirty", note.empty() ? "" : "; ",
                            s["torn_pages"].get<uint64_t>());
      }
      slots.push_back({std::to_string(s["slot"].get<uint64_t>()), s["site"].get<std::string>(),
                       std::to_string(s["dirty_regions"].get<uint64_t>()),
                       BytesCell(s["dirty_bytes"].get<uint64_t>()), note});
    }
    for (const nlohmann::json& p : v["pending_sites"]) {
      slots.push_back({"-", p["site"].get<std::string>(), "-", "-",
                       p["initial_sync_none"].get<bool>()
                           ? "new at next start, clean (initial_sync none)"
                           : "new at next start, all dirty (full sync)"});
    }
    out += "\n" + RenderTable(slots, {true, false, true, false, false}, "  ");
    for (const nlohmann::json& n : v["notices"]) {
      out += fmt::format("  note: {}\n", n.get<std::string>());
    }
  }
  return out;
}

}  // namespace blockrelay::storage
