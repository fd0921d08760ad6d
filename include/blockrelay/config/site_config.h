// SiteConfig: the site's JSON configuration file as plain structs.
//
// The format is DESIGN.md's "Site configuration". ParseSiteConfig() turns a
// JSON document into a SiteConfig and refuses every mistake with the JSON path
// of the field and what was expected ("groups[0].volumes[1].size: expected a
// size like \"1GiB\" or a byte count, got \"12XB\""). CheckSiteEnvironment()
// then looks at the machine (backing files, data_dir) before anything is
// opened. Neither opens sockets or backing files for writing.
//
// Thread safety: plain values.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "blockrelay/status.h"

namespace blockrelay::config {

// "host:port" with an IPv4 address, "[v6]:port", or a host name.
struct Endpoint {
  std::string host;
  uint16_t port = 0;
  std::string ToString() const;  // as written in the config
};

enum class Role { kPrimary, kSecondary };
enum class LinkMode { kSync, kAsync };
enum class QueueKind { kMemory, kDisk };
enum class InitialSync { kFull, kNone, kChecksum };
enum class OnSyncFailure { kLogging, kBlock };

struct NbdConfig {
  // Unix socket the local host's NBD clients connect to. Created at start-up
  // (a stale socket file is replaced), removed at exit.
  std::optional<std::filesystem::path> unix_socket;
  // TCP address to listen on, e.g. 127.0.0.1:10809.
  std::optional<Endpoint> listen;
  // Number of threads doing blocking I/O on backing stores (default 4).
  uint32_t io_threads = 4;
};

struct ReplicationConfig {
  // Where upstream sites connect to push writes to this site.
  std::optional<Endpoint> listen;
};

struct VolumeConfig {
  std::string name;  // export name; [A-Za-z0-9._-]{1,64}
  // Backing file or block device; relative paths are resolved against the
  // config file's directory at parse time.
  std::filesystem::path path;
  // Required for files (created sparse at this size when missing); optional
  // for block devices, which take their own size. Multiple of 512.
  std::optional<uint64_t> size_bytes;
};

struct DownstreamConfig {
  std::string site;
  Endpoint address;
  LinkMode mode = LinkMode::kAsync;
  uint64_t max_queue_bytes = 64ull << 20;  // "max_queue"
  QueueKind queue = QueueKind::kMemory;    // "queue": "memory" | "disk"
  InitialSync initial_sync = InitialSync::kFull;
  uint32_t group_interval_ms = 10;  // "group_interval": "10ms"
  // "max_lag": either a byte size ("256MiB") or a duration ("30s"); unset =
  // no bound.
  std::optional<uint64_t> max_lag_bytes;
  std::optional<uint32_t> max_lag_ms;
  std::optional<uint64_t> resync_rate_bytes_per_sec;  // "resync_rate"
  uint32_t keepalive_ms = 10000;                       // "keepalive": "10s"
};

struct UpstreamConfig {
  std::string site;
  std::optional<Endpoint> address;
};

struct GroupConfig {
  std::string name;
  Role role = Role::kPrimary;  // role a new group starts with
  uint64_t region_size_bytes = 64ull << 10;  // power of 2, 4KiB..16MiB
  OnSyncFailure on_sync_failure = OnSyncFailure::kLogging;
  // How long writes wait under on_sync_failure "block" before failing, ms.
  uint32_t sync_timeout_ms = 30000;  // "sync_timeout": "30s"
  std::vector<VolumeConfig> volumes;  // at least one
  std::vector<DownstreamConfig> downstream;
  std::optional<UpstreamConfig> upstream;  // required when role is secondary
};

struct SiteConfig {
  std::string site;  // [A-Za-z0-9._-]{1,64}
  std::filesystem::path data_dir;        // metadata, journals; created if missing
  std::filesystem::path control_socket;  // Unix socket, mode 0660
  NbdConfig nbd;                         // at least one of unix_socket/listen
  ReplicationConfig replication;
  std::vector<GroupConfig> groups;  // at least one
};

// Parses and validates a document. `base_dir` resolves relative paths.
// Checks syntax, types, ranges, unknown keys and cross-field rules
// (duplicate names, secondary without upstream, a site that lists itself as
// downstream). Touches no file.
Result<SiteConfig> ParseSiteConfig(const nlohmann::json& doc,
                                   const std::filesystem::path& base_dir);

// Reads the file at `path` (JSON syntax errors name line and column), then
// ParseSiteConfig() with the file's directory as base_dir.
Result<SiteConfig> LoadSiteConfig(const std::filesystem::path& path);

// Checks the machine against the config without changing anything: data_dir
// exists and is writable or can be created; every backing path is a regular
// file or block device, or is missing and can be created (its directory is
// writable); an existing file's size equals "size"; a block device with a
// "size" has exactly that size; the socket directories exist.
Status CheckSiteEnvironment(const SiteConfig& config);

// "4096", "64KiB", "1GiB", "1.5GiB"? (no: integers only), "512B", "1M" (MiB).
// Binary units only (K/KiB/M/MiB/G/GiB/T/TiB, case-insensitive suffix), plain
// integers are bytes. Refuses negatives, fractions, overflow, empty strings.
Result<uint64_t> ParseSize(std::string_view text);

// "10ms", "5s", "2m", "1h", plain integer = milliseconds.
Result<uint32_t> ParseDurationMs(std::string_view text);

// "100MiB/s" or a size (bytes per second).
Result<uint64_t> ParseRate(std::string_view text);

Result<Endpoint> ParseEndpoint(std::string_view text);

const char* ToString(Role r);
const char* ToString(LinkMode m);

}  // namespace blockrelay::config
