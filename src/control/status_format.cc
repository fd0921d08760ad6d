#include "control/status_format.h"

#include <algorithm>

#include <fmt/format.h>

namespace blockrelay::control {

std::string FormatBytes(uint64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double value = static_cast<double>(bytes);
  size_t unit = 0;
  // 1023.95 and up would print as "1024.0": show the next unit instead.
  while (value >= 1023.95 && unit + 1 < std::size(kUnits)) {
    value /= 1024;
    ++unit;
  }
  if (unit == 0) return fmt::format("{} B", bytes);
  return fmt::format("{:.1f} {}", value, kUnits[unit]);
}

std::string FormatTable(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    if (widths.size() < row.size()) widths.resize(row.size(), 0);
    for (size_t i = 0; i < row.size(); ++i) {
      widths[i] = std::max(widths[i], row[i].size());
    }
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line += std::string(widths[i] - row[i].size() + 2, ' ');
    }
    out += line + "\n";
  }
  return out;
}

namespace {

std::string Str(const nlohmann::json& j, const char* key,
                const std::string& fallback = "-") {
  if (!j.contains(key)) return fallback;
  const auto& v = j[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "yes" : "no";
  if (v.is_null()) return fallback;
  return v.dump();
}

uint64_t U64(const nlohmann::json& j, const char* key) {
  if (!j.contains(key) || !j[key].is_number_unsigned()) {
    return j.contains(key) && j[key].is_number_integer()
               ? static_cast<uint64_t>(std::max<int64_t>(0, j[key].get<int64_t>()))
               : 0;
  }
  return j[key].get<uint64_t>();
}

}  // namespace

std::string FormatStatus(const nlohmann::json& status) {
  uint64_t up = U64(status, "uptime_seconds");
  std::string out = fmt::format(
      "site {}  version {}  pid {}  up {}h{:02}m{:02}s  nbd connections {}\n",
      Str(status, "site"), Str(status, "version"), Str(status, "pid"), up / 3600,
      (up / 60) % 60, up % 60, Str(status, "nbd_connections", "0"));
  if (!status.contains("groups") || !status["groups"].is_array()) return out;

  std::vector<std::vector<std::string>> volumes = {
      {"GROUP", "ROLE", "VOLUME", "SIZE", "CLIENTS", "READ", "WRITTEN",
       "STATE", "BACKING"}};
  std::vector<std::vector<std::string>> links = {
      {"GROUP", "VOLUME", "LINK", "MODE", "STATE", "DIRTY REGIONS",
       "DIRTY BYTES"}};
  // Entries of an unexpected type (a newer or broken daemon) are skipped:
  // nlohmann's value() throws on them, which would abort the CLI.
  for (const auto& g : status["groups"]) {
    if (!g.is_object()) continue;
    for (const auto& v : g.value("volumes", nlohmann::json::array())) {
      if (!v.is_object()) continue;
      const bool read_only =
          v.contains("read_only") && v["read_only"].is_boolean() &&
          v["read_only"].get<bool>();
      std::string state = v.contains("error") ? "FAILED: " + Str(v, "error")
                          : read_only ? "read-only"
                                      : "read-write";
      if (v.contains("consistent") && v["consistent"].is_boolean()) {
        state += v["consistent"].get<bool>() ? ", consistent" : ", INCONSISTENT";
      }
      volumes.push_back({Str(g, "name"), Str(g, "role"), Str(v, "name"),
                         FormatBytes(U64(v, "size_bytes")),
                         Str(v, "nbd_clients", "0"),
                         FormatBytes(U64(v, "bytes_read")),
                         FormatBytes(U64(v, "bytes_written")), state,
                         Str(v, "backing")});
      for (const auto& l : v.value("links", nlohmann::json::array())) {
        if (!l.is_object()) continue;
        links.push_back({Str(g, "name"), Str(v, "name"), Str(l, "site"),
                         Str(l, "mode"), Str(l, "state"),
                         Str(l, "dirty_regions", "0"),
                         FormatBytes(U64(l, "dirty_bytes"))});
      }
    }
  }
  // Replication per group: each downstream link, and the upstream of a
  // secondary group.
  std::vector<std::vector<std::string>> downstream = {
      {"GROUP", "DOWNSTREAM", "MODE", "STATE", "QUEUED", "LAG", "ACKED SEQ",
       "SENT", "RATE", "NOTE"}};
  std::vector<std::vector<std::string>> upstream = {
      {"GROUP", "UPSTREAM", "STATE", "PEER", "RECEIVED", "APPLIED SEQ",
       "CONSISTENT", "UNDO", "NOTE"}};
  for (const auto& g : status["groups"]) {
    if (!g.is_object()) continue;
    for (const auto& l : g.value("downstream", nlohmann::json::array())) {
      if (!l.is_object()) continue;
      std::string note;
      const nlohmann::json* compare =
          l.contains("checksum_compare") && l["checksum_compare"].is_object()
              ? &l["checksum_compare"] : nullptr;
      if (compare && compare->value("running", false)) {
        note = fmt::format("comparing digests: {} of {} regions, {} differ",
                           U64(*compare, "regions_done"),
                           U64(*compare, "regions_total"),
                           U64(*compare, "differing_regions"));
      } else if (l.contains("resync") && l["resync"].is_object()) {
        const auto& r = l["resync"];
        note = fmt::format("resync: {} left", FormatBytes(U64(r, "bytes_left")));
        if (r.contains("eta_seconds") && r["eta_seconds"].is_number() &&
            r["eta_seconds"].get<double>() >= 0) {
          note += fmt::format(", eta {:.0f}s", r["eta_seconds"].get<double>());
        }
      } else if (l.contains("paused") && l["paused"].is_boolean() && l["paused"].get<bool>()) {
        note = "paused";
      } else if (l.contains("last_error") && Str(l, "state") != "replicating") {
        note = Str(l, "last_error");
      }
      const double lag = l.contains("lag_seconds") && l["lag_seconds"].is_number()
                             ? l["lag_seconds"].get<double>() : 0.0;
      downstream.push_back(
          {Str(g, "name"), Str(l, "site"), Str(l, "mode"), Str(l, "state"),
           FormatBytes(U64(l, "queue_bytes") + U64(l, "disk_queue_bytes")),
           fmt::format("{} / {:.1f}s", FormatBytes(U64(l, "lag_bytes")), lag),
           Str(l, "last_acked_seq", "0"), FormatBytes(U64(l, "bytes_sent")),
           FormatBytes(U64(l, "throughput_bytes_per_sec")) + "/s", note});
    }
    if (g.contains("upstream") && g["upstream"].is_object()) {
      const auto& u = g["upstream"];
      std::string note = u.contains("error") ? "FAILED: " + Str(u, "error")
                         : u.contains("last_error") ? Str(u, "last_error") : "";
      if (note.empty() && u.contains("full_resync_requested")) {
        note = "rolled back; full resync requested from the upstream";
      }
      upstream.push_back({Str(g, "name"), Str(u, "site"), Str(u, "state"),
                          Str(u, "peer"), FormatBytes(U64(u, "bytes_received")),
                          Str(u, "applied_group_seq", "0"),
                          Str(u, "consistent"), FormatBytes(U64(u, "undo_bytes")),
                          note});
    }
  }
  out += "\n" + FormatTable(volumes);
  if (links.size() > 1) out += "\n" + FormatTable(links);
  if (downstream.size() > 1) out += "\n" + FormatTable(downstream);
  if (upstream.size() > 1) out += "\n" + FormatTable(upstream);
  return out;
}

}  // namespace blockrelay::control
