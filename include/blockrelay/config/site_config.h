// SiteConfig: the site's JSON configuration file as plain structs.
//
// The format is DESIGN.md's "Site configuration". ParseSiteConfig() turns a
// JSON document into a SiteConfig and refuses every mistake with the JSON path
// of the field and what was expected ("groups[0].volumes[1].size: expected a
// size like \"1GiB\" or a whole number of bytes, got \"12XB\""). Every such
// error is Status::InvalidArgument; no exception leaves this module.
// CheckSiteEnvironment() then looks at the machine (backing files, data_dir)
// before anything is opened. Neither opens sockets or backing files for
// writing.
//
// Thread safety: plain values.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "blockrelay/status.h"

namespace blockrelay::config {

// "host:port" with an IPv4 address, "[v6]:port", or a host name.
struct Endpoint {
  std::string host;
  uint16_t port = 0;
  std::string ToString() const;  // as written in the config; v6 in brackets
  bool operator==(const Endpoint&) const = default;
};

enum class Role { kPrimary, kSecondary };
enum class LinkMode { kSync, kAsync };
enum class QueueKind { kMemory, kDisk };
enum class InitialSync { kFull, kNone, kChecksum };
enum class OnSyncFailure { kLogging, kBlock };

// nbd.poll_us when the config does not say (QEMU's IOThreads poll for up to
// 32 us by default; docs/design.md, "NBD data path", has why 200).
inline constexpr uint32_t kDefaultPollUs = 200;

struct NbdConfig {
  // Unix socket the local host's NBD clients connect to. Created at start-up
  // (a stale socket file is replaced), removed at exit.
  std::optional<std::filesystem::path> unix_socket;
  // TCP address to listen on, e.g. 127.0.0.1:10809.
  std::optional<Endpoint> listen;
  // Number of threads doing blocking I/O on backing stores (default 4).
  uint32_t io_threads = 4;  // 1..64
  // How long the network thread polls for its next event before it sleeps,
  // while events arrive that densely and no storage work is in flight
  // (core/event_loop.h); 0 never polls.
  uint32_t poll_us = kDefaultPollUs;  // 0..kMaxPollUs
  bool operator==(const NbdConfig&) const = default;
};

struct ReplicationConfig {
  // Where upstream sites connect to push writes to this site.
  // Required when a group is secondary: its upstream connects here.
  std::optional<Endpoint> listen;
  bool operator==(const ReplicationConfig&) const = default;
};

struct VolumeConfig {
  std::string name;  // export name; [A-Za-z0-9._-]{1,64}
  // Backing file or block device; relative paths are resolved against the
  // config file's directory at parse time.
  std::filesystem::path path;
  // Required for files (created sparse at this size when missing); optional
  // for block devices, which take their own size. Multiple of 512.
  std::optional<uint64_t> size_bytes;
  bool operator==(const VolumeConfig&) const = default;
};

struct DownstreamConfig {
  std::string site;
  Endpoint address;
  LinkMode mode = LinkMode::kAsync;
  uint64_t max_queue_bytes = 64ull << 20;  // "max_queue", at least 1MiB
  QueueKind queue = QueueKind::kMemory;    // "queue": "memory" | "disk"
  InitialSync initial_sync = InitialSync::kFull;
  uint32_t group_interval_ms = 10;  // "group_interval": "10ms", 1ms..10s
  // "max_lag": either a byte size ("256MiB") or a duration ("30s"); unset =
  // no bound. At most one of the two is set. A plain number is bytes; "30m"
  // is refused as ambiguous (write "30MiB" or "30min").
  std::optional<uint64_t> max_lag_bytes;
  std::optional<uint32_t> max_lag_ms;
  // "resync_rate": "100MiB/s" or bytes per second; unset = unlimited.
  std::optional<uint64_t> resync_rate_bytes_per_sec;
  uint32_t keepalive_ms = 10000;  // "keepalive": "10s", 1s..10min
  bool operator==(const DownstreamConfig&) const = default;
};

struct UpstreamConfig {
  std::string site;
  std::optional<Endpoint> address;
  bool operator==(const UpstreamConfig&) const = default;
};

struct GroupConfig {
  std::string name;
  Role role = Role::kPrimary;  // role a new group starts with
  uint64_t region_size_bytes = 64ull << 10;  // power of 2, 4KiB..16MiB
  OnSyncFailure on_sync_failure = OnSyncFailure::kLogging;
  // How long writes wait under on_sync_failure "block" before failing, ms.
  uint32_t sync_timeout_ms = 30000;  // "sync_timeout": "30s", 1ms..1h
  // How often the volumes' scoreboard bitmaps are written to their metadata
  // files (only pages changed since the last write). Persists clears, so a
  // crash resends at most about this long's worth of acknowledged regions;
  // a write that persists clears first flushes the backing store.
  uint32_t bitmap_flush_interval_ms = 5000;  // "bitmap_flush_interval": "5s", 100ms..1h
  std::vector<VolumeConfig> volumes;  // at least one
  std::vector<DownstreamConfig> downstream;
  std::optional<UpstreamConfig> upstream;  // required when role is secondary
  bool operator==(const GroupConfig&) const = default;
};

struct SiteConfig {
  std::string site;  // [A-Za-z0-9._-]{1,64}
  std::filesystem::path data_dir;        // metadata, journals; created if missing
  std::filesystem::path control_socket;  // Unix socket, mode 0660
  NbdConfig nbd;                         // at least one of unix_socket/listen
  ReplicationConfig replication;
  std::vector<GroupConfig> groups;  // at least one
  bool operator==(const SiteConfig&) const = default;
};

// Limits enforced by ParseSiteConfig().
inline constexpr uint64_t kMinRegionSizeBytes = 4ull << 10;
inline constexpr uint64_t kMaxRegionSizeBytes = 16ull << 20;
inline constexpr uint64_t kMinMaxQueueBytes = 1ull << 20;
inline constexpr uint32_t kMaxIoThreads = 64;
inline constexpr uint32_t kMaxPollUs = 1000;
// sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
inline constexpr size_t kMaxUnixSocketPathBytes = 107;

// Parses and validates a document. `base_dir` resolves relative paths (a
// relative base_dir is first made absolute against the working directory);
// every path in the result is absolute and lexically normal.
// Checks types, ranges, unknown keys and cross-field rules (duplicate
// group/volume names and volume paths, secondary without upstream or without
// replication.listen, a site that lists itself as downstream or upstream, a
// downstream listed twice or also the upstream). Returns the first mistake
// as InvalidArgument, message "<json path>: ...". Touches no file.
Result<SiteConfig> ParseSiteConfig(const nlohmann::json& doc,
                                   const std::filesystem::path& base_dir);

// Reads the file at `path`, then ParseSiteConfig() with the file's directory
// as base_dir. Every message starts with the file's path:
//   "<file>:<line>:<col>: JSON syntax error: ..."      (InvalidArgument)
//   "<file>: <json path>: key appears twice ..."       (InvalidArgument)
//   "<file>: <json path>: ..." from ParseSiteConfig()  (InvalidArgument)
//   "<file>: cannot read config file: <strerror>"      (code from errno,
//                                                       e.g. NotFound)
Result<SiteConfig> LoadSiteConfig(const std::filesystem::path& path);

// Checks the machine against the config without changing anything: data_dir
// exists and is writable or can be created; every backing path is a regular
// file or block device, or is missing and can be created (its directory is
// writable); an existing file's size equals "size"; a block device with a
// "size" has exactly that size; the socket paths are sockets or missing and
// their directories exist or can be created. A missing directory counts as
// "can be created" when its nearest existing ancestor is a writable
// directory; the daemon creates missing directories (data_dir, socket and
// backing-file directories) before use. Opens block devices read-only for
// BLKGETSIZE64, nothing else. Errors are InvalidArgument and start with the
// JSON path of the field, then the resolved path.
Status CheckSiteEnvironment(const SiteConfig& config);

// The canonical document for `config`: ParseSiteConfig(ToJson(c), any) == c.
// Sizes are written like "64KiB", durations like "30s", paths absolute.
nlohmann::json ToJson(const SiteConfig& config);

// "4096", "64KiB", "1GiB", "512B", "1M" (= 1MiB). Binary units only
// (B, K/KiB, M/MiB, G/GiB, T/TiB; case-insensitive), plain integers are
// bytes. Refuses negatives, fractions ("1.5GiB"), decimal units ("1MB"),
// overflow past 2^64-1, empty strings and any whitespace. Errors are
// InvalidArgument "expected a size like ..., got \"<text>\"[ (reason)]".
Result<uint64_t> ParseSize(std::string_view text);

// "10ms", "5s", "2m" or "2min", "1h" (case-insensitive); a plain integer is
// milliseconds. Refuses what ParseSize() refuses and more than 2^32-1 ms.
Result<uint32_t> ParseDurationMs(std::string_view text);

// "100MiB/s" or a size (bytes per second). Zero is refused: a rate of zero
// would never finish; leave the field out for "unlimited".
Result<uint64_t> ParseRate(std::string_view text);

// "127.0.0.1:7800", "[::1]:7800" or "host.example:7800"; port 1..65535.
// An IPv6 address must be in brackets. Endpoint::host has no brackets.
Result<Endpoint> ParseEndpoint(std::string_view text);

// The shortest exact spelling ParseSize() accepts: "64KiB", "1000".
std::string FormatSize(uint64_t bytes);
// The shortest exact spelling ParseDurationMs() accepts: "10ms", "30s",
// "10min", "1h" (minutes as "min", so max_lag never reads it as MiB).
std::string FormatDurationMs(uint32_t ms);

// The spelling used in the config file ("primary", "sync", ...).
const char* ToString(Role r);
const char* ToString(LinkMode m);
const char* ToString(QueueKind q);
const char* ToString(InitialSync s);
const char* ToString(OnSyncFailure f);

}  // namespace blockrelay::config
