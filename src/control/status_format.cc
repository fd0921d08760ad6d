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
  out += "\n" + FormatTable(volumes);
  if (links.size() > 1) out += "\n" + FormatTable(links);
  return out;
}

}  // namespace blockrelay::control
