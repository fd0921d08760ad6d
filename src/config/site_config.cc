// JSON -> SiteConfig. Each Read*/Parse* function checks one JSON value at a
// known JSON path and returns the first mistake as InvalidArgument with that
// path in front. nlohmann exceptions are caught at the public entry points so
// none crosses the module boundary.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <exception>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "blockrelay/config/site_config.h"
#include "config/internal.h"

namespace blockrelay::config {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

#define CONFIG_RETURN_IF_ERROR(expr) \
  do {                               \
    Status _st = (expr);             \
    if (!_st.ok()) return _st;       \
  } while (0)

constexpr uint64_t kMaxConfigFileBytes = 16ull << 20;
constexpr uint32_t kMinGroupIntervalMs = 1;
constexpr uint32_t kMaxGroupIntervalMs = 10'000;
constexpr uint32_t kMinKeepaliveMs = 1000;
constexpr uint32_t kMaxKeepaliveMs = 10 * 60'000;
constexpr uint32_t kMinSyncTimeoutMs = 1;
constexpr uint32_t kMaxSyncTimeoutMs = 60 * 60'000;
constexpr uint32_t kMinBitmapFlushIntervalMs = 100;
constexpr uint32_t kMaxBitmapFlushIntervalMs = 60 * 60'000;
constexpr size_t kMaxNameLength = 64;

constexpr std::string_view kTopKeys[] = {
    "site", "data_dir", "control_socket", "nbd", "replication", "groups"};
constexpr std::string_view kNbdKeys[] = {
    "unix_socket", "listen", "io_threads", "poll_us"};
constexpr std::string_view kReplicationKeys[] = {
    "listen"};
constexpr std::string_view kGroupKeys[] = {
    "name",         "role",                  "region_size", "on_sync_failure",
    "sync_timeout", "bitmap_flush_interval", "volumes",     "downstream",
    "upstream"};
constexpr std::string_view kVolumeKeys[] = {
    "name", "path", "size"};
constexpr std::string_view kDownstreamKeys[] = {
    "site",         "address",        "mode",    "max_queue",
    "queue",        "initial_sync",   "group_interval",
    "max_lag",      "resync_rate",    "keepalive"};
constexpr std::string_view kUpstreamKeys[] = {"site",
                                                                   "address"};

constexpr std::string_view kNameExpected =
    "expected a name of 1 to 64 characters from A-Z a-z 0-9 . _ -";

std::string Join(std::string_view path, std::string_view key) {
  if (path.empty()) return std::string(key);
  return fmt::format("{}.{}", path, key);
}

std::string Index(std::string_view path, size_t i) {
  return fmt::format("{}[{}]", path, i);
}

// How a JSON value looks in a message: strings quoted, numbers as written.
std::string Describe(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return v.get<bool>() ? "true" : "false";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
    case json::value_t::number_float:
      return "number " + v.dump();
    case json::value_t::string:
      return QuoteForMessage(v.get_ref<const std::string&>());
    case json::value_t::array:
      return "an array";
    case json::value_t::object:
      return "an object";
    default:
      return "an unsupported value";
  }
}

Status Error(std::string_view path, std::string_view what) {
  return Status::InvalidArgument(
      fmt::format("{}: {}", path.empty() ? "(top level)" : path, what));
}

Status Expected(std::string_view path, std::string_view expected,
                const json& got) {
  return Error(path, fmt::format("{}, got {}", expected, Describe(got)));
}

Status Missing(std::string_view path, std::string_view expected) {
  return Error(path, fmt::format("required key is missing; {}", expected));
}

// Wraps an "expected ..., got ..." message from the scalar parsers.
Status AtPath(std::string_view path, const Status& s) {
  return Error(path, s.message());
}

size_t EditDistance(std::string_view a, std::string_view b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t subst = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, subst});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// Refuses keys outside `allowed`; a near miss gets a "did you mean".
Status CheckKeys(const json& obj, std::string_view path,
                 std::span<const std::string_view> allowed) {
  for (const auto& item : obj.items()) {
    const std::string& key = item.key();
    if (std::find(allowed.begin(), allowed.end(), key) != allowed.end()) {
      continue;
    }
    std::string list;
    std::string_view closest;
    size_t closest_distance = 3;  // suggest only for small typos
    for (std::string_view a : allowed) {
      if (!list.empty()) list += ", ";
      list += a;
      const size_t d = EditDistance(key, a);
      if (d < closest_distance) {
        closest_distance = d;
        closest = a;
      }
    }
    std::string msg = fmt::format("unknown key; allowed keys here are {}", list);
    if (!closest.empty()) msg += fmt::format(" (did you mean \"{}\"?)", closest);
    return Error(Join(path, key), msg);
  }
  return Status::OK();
}

const json* Find(const json& obj, std::string_view key) {
  auto it = obj.find(key);
  return it == obj.end() ? nullptr : &*it;
}

Status ExpectObject(const json& v, std::string_view path,
                    std::string_view what) {
  if (!v.is_object()) return Expected(path, fmt::format("expected {}", what), v);
  return Status::OK();
}

bool ValidName(std::string_view name) {
  if (name.empty() || name.size() > kMaxNameLength) return false;
  // "." and ".." would be path components if a name becomes a directory.
  if (name == "." || name == "..") return false;
  for (char c : name) {
    const bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                    (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

Status ReadName(const json& v, std::string_view path, std::string* out) {
  if (!v.is_string() || !ValidName(v.get_ref<const std::string&>())) {
    std::string expected(kNameExpected);
    if (v.is_string() && (v == "." || v == "..")) {
      expected += ", other than \".\" and \"..\"";
    }
    return Expected(path, expected, v);
  }
  *out = v.get<std::string>();
  return Status::OK();
}

Status ReadPath(const json& v, std::string_view path, const fs::path& base_dir,
                fs::path* out) {
  if (!v.is_string() || v.get_ref<const std::string&>().empty()) {
    return Expected(path, "expected a non-empty path string", v);
  }
  const std::string& s = v.get_ref<const std::string&>();
  if (s.find('\0') != std::string::npos) {
    return Error(path, "path contains a NUL character");
  }
  fs::path p(s);
  if (p.is_relative()) p = base_dir / p;
  *out = p.lexically_normal();
  return Status::OK();
}

Status ReadSocketPath(const json& v, std::string_view path,
                      const fs::path& base_dir, fs::path* out) {
  CONFIG_RETURN_IF_ERROR(ReadPath(v, path, base_dir, out));
  const size_t len = out->native().size();
  if (len > kMaxUnixSocketPathBytes) {
    return Error(path, fmt::format("{} is {} bytes long; Unix socket paths "
                                   "must be at most {} bytes, choose a "
                                   "shorter path",
                                   out->native(), len,
                                   kMaxUnixSocketPathBytes));
  }
  return Status::OK();
}

// A whole JSON number >= 0. Parsed text stores those as unsigned, but a
// document built in code (json(1500)) stores them as signed.
bool AsUnsigned(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(v.get<int64_t>());
    return true;
  }
  return false;
}

// A size string or a whole JSON number (bytes).
Status ReadSize(const json& v, std::string_view path, uint64_t* out) {
  if (AsUnsigned(v, out)) return Status::OK();
  if (!v.is_string()) {
    return Expected(
        path, "expected a size like \"1GiB\" or a whole number of bytes", v);
  }
  Result<uint64_t> r = ParseSize(v.get_ref<const std::string&>());
  if (!r.ok()) return AtPath(path, r.status());
  *out = *r;
  return Status::OK();
}

// A duration string or a JSON unsigned integer (milliseconds), in [min, max].
Status ReadDuration(const json& v, std::string_view path, uint32_t min_ms,
                    uint32_t max_ms, uint32_t* out) {
  const std::string range = fmt::format(
      "expected a duration from {} to {}", FormatDurationMs(min_ms),
      FormatDurationMs(max_ms));
  uint32_t ms = 0;
  if (uint64_t n = 0; AsUnsigned(v, &n)) {
    if (n > max_ms) return Expected(path, range, v);
    ms = static_cast<uint32_t>(n);
  } else if (v.is_string()) {
    Result<uint32_t> r = ParseDurationMs(v.get_ref<const std::string&>());
    if (!r.ok()) return AtPath(path, r.status());
    ms = *r;
  } else {
    return Expected(path,
                    "expected a duration like \"30s\" or a whole number of "
                    "milliseconds",
                    v);
  }
  if (ms < min_ms || ms > max_ms) return Expected(path, range, v);
  *out = ms;
  return Status::OK();
}

Status ReadEndpoint(const json& v, std::string_view path, Endpoint* out) {
  if (!v.is_string()) {
    return Expected(
        path, "expected \"host:port\" like \"127.0.0.1:7800\" or \"[::1]:7800\"",
        v);
  }
  Result<Endpoint> r = ParseEndpoint(v.get_ref<const std::string&>());
  if (!r.ok()) return AtPath(path, r.status());
  *out = std::move(*r);
  return Status::OK();
}

template <typename E>
Status ReadEnum(const json& v, std::string_view path,
                std::initializer_list<std::pair<const char*, E>> choices,
                E* out) {
  std::string expected = "expected ";
  size_t i = 0;
  for (const auto& [spelling, value] : choices) {
    if (v.is_string() && v.get_ref<const std::string&>() == spelling) {
      *out = value;
      return Status::OK();
    }
    if (i > 0) expected += (i + 1 == choices.size()) ? " or " : ", ";
    expected += fmt::format("\"{}\"", spelling);
    ++i;
  }
  return Expected(path, expected, v);
}

// Reads each element of a required non-empty or optional array.
template <typename T, typename Fn>
Status ReadArray(const json& v, std::string_view path, std::string_view what,
                 bool non_empty, std::vector<T>* out, Fn parse_element) {
  if (!v.is_array()) {
    return Expected(path, fmt::format("expected an array of {}", what), v);
  }
  if (non_empty && v.empty()) {
    return Error(path, fmt::format("expected at least one {}, got an empty "
                                   "array",
                                   what));
  }
  out->clear();
  for (size_t i = 0; i < v.size(); ++i) {
    T element;
    CONFIG_RETURN_IF_ERROR(parse_element(v[i], Index(path, i), &element));
    out->push_back(std::move(element));
  }
  return Status::OK();
}

class SiteParser {
 public:
  explicit SiteParser(fs::path base_dir) : base_dir_(std::move(base_dir)) {}

  Status Parse(const json& doc, SiteConfig* out) {
    CONFIG_RETURN_IF_ERROR(ExpectObject(doc, "", "a JSON object"));
    CONFIG_RETURN_IF_ERROR(CheckKeys(doc, "", kTopKeys));

    const json* v = Find(doc, "site");
    if (v == nullptr) {
      return Missing("site", "expected the name of this site, like \"a\"");
    }
    CONFIG_RETURN_IF_ERROR(ReadName(*v, "site", &out->site));

    v = Find(doc, "data_dir");
    if (v == nullptr) {
      return Missing("data_dir",
                     "expected the directory for metadata and journals");
    }
    CONFIG_RETURN_IF_ERROR(ReadPath(*v, "data_dir", base_dir_, &out->data_dir));

    v = Find(doc, "control_socket");
    if (v == nullptr) {
      return Missing("control_socket",
                     "expected the path of the control Unix socket");
    }
    CONFIG_RETURN_IF_ERROR(
        ReadSocketPath(*v, "control_socket", base_dir_, &out->control_socket));

    v = Find(doc, "nbd");
    if (v == nullptr) {
      return Missing("nbd",
                     "expected an object with \"unix_socket\" and/or "
                     "\"listen\"");
    }
    CONFIG_RETURN_IF_ERROR(ParseNbd(*v, "nbd", &out->nbd));
    if (out->nbd.unix_socket && *out->nbd.unix_socket == out->control_socket) {
      return Error("nbd.unix_socket",
                   fmt::format("{} is also control_socket; use two paths",
                               out->control_socket.native()));
    }

    if ((v = Find(doc, "replication")) != nullptr) {
      CONFIG_RETURN_IF_ERROR(
          ParseReplication(*v, "replication", &out->replication));
    }

    v = Find(doc, "groups");
    if (v == nullptr) {
      return Missing("groups", "expected an array of replication groups");
    }
    CONFIG_RETURN_IF_ERROR(ReadArray(
        *v, "groups", "group", /*non_empty=*/true, &out->groups,
        [this, out](const json& g, const std::string& path, GroupConfig* group) {
          return ParseGroup(g, path, out->site, group);
        }));
    return CheckSite(*out);
  }

 private:
  Status ParseNbd(const json& v, const std::string& path, NbdConfig* out) {
    CONFIG_RETURN_IF_ERROR(ExpectObject(
        v, path, "an object with \"unix_socket\" and/or \"listen\""));
    CONFIG_RETURN_IF_ERROR(CheckKeys(v, path, kNbdKeys));
    if (const json* s = Find(v, "unix_socket")) {
      fs::path p;
      CONFIG_RETURN_IF_ERROR(
          ReadSocketPath(*s, Join(path, "unix_socket"), base_dir_, &p));
      out->unix_socket = std::move(p);
    }
    if (const json* l = Find(v, "listen")) {
      Endpoint ep;
      CONFIG_RETURN_IF_ERROR(ReadEndpoint(*l, Join(path, "listen"), &ep));
      out->listen = std::move(ep);
    }
    if (!out->unix_socket && !out->listen) {
      return Error(path,
                   "expected at least one of \"unix_socket\" or \"listen\" so "
                   "NBD clients can connect");
    }
    if (const json* t = Find(v, "io_threads")) {
      uint64_t n = 0;
      if (!AsUnsigned(*t, &n) || n < 1 || n > kMaxIoThreads) {
        return Expected(Join(path, "io_threads"),
                        fmt::format("expected a whole number from 1 to {}",
                                    kMaxIoThreads),
                        *t);
      }
      out->io_threads = static_cast<uint32_t>(n);
    }
    if (const json* t = Find(v, "poll_us")) {
      uint64_t n = 0;
      if (!AsUnsigned(*t, &n) || n > kMaxPollUs) {
        return Expected(Join(path, "poll_us"),
                        fmt::format("expected a whole number of microseconds "
                                    "from 0 to {}", kMaxPollUs),
                        *t);
      }
      out->poll_us = static_cast<uint32_t>(n);
    }
    return Status::OK();
  }

  Status ParseReplication(const json& v, const std::string& path,
                          ReplicationConfig* out) {
    CONFIG_RETURN_IF_ERROR(
        ExpectObject(v, path, "an object like {\"listen\": \"0.0.0.0:7800\"}"));
    CONFIG_RETURN_IF_ERROR(CheckKeys(v, path, kReplicationKeys));
    if (const json* l = Find(v, "listen")) {
      Endpoint ep;
      CONFIG_RETURN_IF_ERROR(ReadEndpoint(*l, Join(path, "listen"), &ep));
      out->listen = std::move(ep);
    }
    return Status::OK();
  }

  Status ParseGroup(const json& v, const std::string& path,
                    const std::string& this_site, GroupConfig* out) {
    CONFIG_RETURN_IF_ERROR(ExpectObject(v, path, "a group object"));
    CONFIG_RETURN_IF_ERROR(CheckKeys(v, path, kGroupKeys));

    const json* f = Find(v, "name");
    if (f == nullptr) {
      return Missing(Join(path, "name"),
                     "expected the group's name, like \"db\"");
    }
    CONFIG_RETURN_IF_ERROR(ReadName(*f, Join(path, "name"), &out->name));

    if ((f = Find(v, "role")) != nullptr) {
      CONFIG_RETURN_IF_ERROR(ReadEnum<Role>(
          *f, Join(path, "role"),
          {{"primary", Role::kPrimary}, {"secondary", Role::kSecondary}},
          &out->role));
    }

    if ((f = Find(v, "region_size")) != nullptr) {
      const std::string p = Join(path, "region_size");
      CONFIG_RETURN_IF_ERROR(ReadSize(*f, p, &out->region_size_bytes));
      const uint64_t r = out->region_size_bytes;
      if (r < kMinRegionSizeBytes || r > kMaxRegionSizeBytes ||
          (r & (r - 1)) != 0) {
        return Expected(p,
                        fmt::format("expected a power of two from {} to {}",
                                    FormatSize(kMinRegionSizeBytes),
                                    FormatSize(kMaxRegionSizeBytes)),
                        *f);
      }
    }

    if ((f = Find(v, "on_sync_failure")) != nullptr) {
      CONFIG_RETURN_IF_ERROR(ReadEnum<OnSyncFailure>(
          *f, Join(path, "on_sync_failure"),
          {{"logging", OnSyncFailure::kLogging},
           {"block", OnSyncFailure::kBlock}},
          &out->on_sync_failure));
    }

    if ((f = Find(v, "sync_timeout")) != nullptr) {
      CONFIG_RETURN_IF_ERROR(ReadDuration(*f, Join(path, "sync_timeout"),
                                          kMinSyncTimeoutMs, kMaxSyncTimeoutMs,
                                          &out->sync_timeout_ms));
    }

    if ((f = Find(v, "bitmap_flush_interval")) != nullptr) {
      CONFIG_RETURN_IF_ERROR(ReadDuration(
          *f, Join(path, "bitmap_flush_interval"), kMinBitmapFlushIntervalMs,
          kMaxBitmapFlushIntervalMs, &out->bitmap_flush_interval_ms));
    }

    f = Find(v, "volumes");
    if (f == nullptr) {
      return Missing(Join(path, "volumes"),
                     "expected an array of volumes like [{\"name\": \"data\", "
                     "\"path\": \"data.img\", \"size\": \"1GiB\"}]");
    }
    CONFIG_RETURN_IF_ERROR(ReadArray(
        *f, Join(path, "volumes"), "volume", /*non_empty=*/true, &out->volumes,
        [this](const json& e, const std::string& p, VolumeConfig* vol) {
          return ParseVolume(e, p, vol);
        }));

    if ((f = Find(v, "upstream")) != nullptr) {
      UpstreamConfig up;
      CONFIG_RETURN_IF_ERROR(ParseUpstream(*f, Join(path, "upstream"), &up));
      if (up.site == this_site) {
        return Error(Join(path, "upstream.site"),
                     fmt::format("\"{}\" is this site; the upstream must be "
                                 "another site",
                                 up.site));
      }
      out->upstream = std::move(up);
    }
    if (out->role == Role::kSecondary && !out->upstream) {
      return Missing(Join(path, "upstream"),
                     "a \"secondary\" group needs {\"site\": ..., "
                     "\"address\": \"host:port\"} naming the site it "
                     "replicates from");
    }

    if ((f = Find(v, "downstream")) != nullptr) {
      const std::string ds_path = Join(path, "downstream");
      CONFIG_RETURN_IF_ERROR(ReadArray(
          *f, ds_path, "downstream site", /*non_empty=*/false,
          &out->downstream,
          [this](const json& e, const std::string& p, DownstreamConfig* ds) {
            return ParseDownstream(e, p, ds);
          }));
      for (size_t i = 0; i < out->downstream.size(); ++i) {
        const std::string site_path = Join(Index(ds_path, i), "site");
        const std::string& site = out->downstream[i].site;
        if (site == this_site) {
          return Error(site_path,
                       fmt::format("\"{}\" is this site; a site cannot "
                                   "replicate to itself",
                                   site));
        }
        if (out->upstream && out->upstream->site == site) {
          return Error(site_path,
                       fmt::format("\"{}\" is also this group's upstream "
                                   "({}); replication would loop",
                                   site, Join(path, "upstream.site")));
        }
        for (size_t j = 0; j < i; ++j) {
          if (out->downstream[j].site == site) {
            return Error(site_path,
                         fmt::format("\"{}\" is listed twice; it is already "
                                     "{}",
                                     site, Join(Index(ds_path, j), "site")));
          }
        }
      }
    }
    return Status::OK();
  }

  Status ParseVolume(const json& v, const std::string& path,
                     VolumeConfig* out) {
    CONFIG_RETURN_IF_ERROR(ExpectObject(
        v, path, "a volume object like {\"name\": ..., \"path\": ...}"));
    CONFIG_RETURN_IF_ERROR(CheckKeys(v, path, kVolumeKeys));
    const json* f = Find(v, "name");
    if (f == nullptr) {
      return Missing(Join(path, "name"),
                     "expected the volume's name (its NBD export name)");
    }
    CONFIG_RETURN_IF_ERROR(ReadName(*f, Join(path, "name"), &out->name));
    f = Find(v, "path");
    if (f == nullptr) {
      return Missing(Join(path, "path"),
                     "expected the path of a backing file or block device");
    }
    CONFIG_RETURN_IF_ERROR(ReadPath(*f, Join(path, "path"), base_dir_,
                                    &out->path));
    if ((f = Find(v, "size")) != nullptr) {
      const std::string p = Join(path, "size");
      uint64_t size = 0;
      CONFIG_RETURN_IF_ERROR(ReadSize(*f, p, &size));
      if (size == 0 || size % 512 != 0) {
        return Expected(p, "expected a non-zero multiple of 512 bytes", *f);
      }
      out->size_bytes = size;
    }
    return Status::OK();
  }

  Status ParseUpstream(const json& v, const std::string& path,
                       UpstreamConfig* out) {
    CONFIG_RETURN_IF_ERROR(ExpectObject(
        v, path, "an object like {\"site\": \"a\", \"address\": \"host:port\"}"));
    CONFIG_RETURN_IF_ERROR(CheckKeys(v, path, kUpstreamKeys));
    const json* f = Find(v, "site");
    if (f == nullptr) {
      return Missing(Join(path, "site"),
                     "expected the name of the site this group replicates "
                     "from");
    }
    CONFIG_RETURN_IF_ERROR(ReadName(*f, Join(path, "site"), &out->site));
    if ((f = Find(v, "address")) != nullptr) {
      Endpoint ep;
      CONFIG_RETURN_IF_ERROR(ReadEndpoint(*f, Join(path, "address"), &ep));
      out->address = std::move(ep);
    }
    return Status::OK();
  }

  Status ParseDownstream(const json& v, const std::string& path,
                         DownstreamConfig* out) {
    CONFIG_RETURN_IF_ERROR(ExpectObject(
        v, path, "an object like {\"site\": \"b\", \"address\": \"host:port\"}"));
    CONFIG_RETURN_IF_ERROR(CheckKeys(v, path, kDownstreamKeys));
    const json* f = Find(v, "site");
    if (f == nullptr) {
      return Missing(Join(path, "site"),
                     "expected the name of the site to replicate to");
    }
    CONFIG_RETURN_IF_ERROR(ReadName(*f, Join(path, "site"), &out->site));
    f = Find(v, "address");
    if (f == nullptr) {
      return Missing(Join(path, "address"),
                     "expected the downstream's replication.listen address, "
                     "like \"10.0.0.2:7800\"");
    }
    CONFIG_RETURN_IF_ERROR(
        ReadEndpoint(*f, Join(path, "address"), &out->address));

    if ((f = Find(v, "mode")) != nullptr) {
      CONFIG_RETURN_IF_ERROR(ReadEnum<LinkMode>(
          *f, Join(path, "mode"),
          {{"sync", LinkMode::kSync}, {"async", LinkMode::kAsync}},
          &out->mode));
    }
    if ((f = Find(v, "max_queue")) != nullptr) {
      const std::string p = Join(path, "max_queue");
      CONFIG_RETURN_IF_ERROR(ReadSize(*f, p, &out->max_queue_bytes));
      if (out->max_queue_bytes < kMinMaxQueueBytes) {
        return Expected(
            p, fmt::format("expected at least {}", FormatSize(kMinMaxQueueBytes)),
            *f);
      }
    }
    if ((f = Find(v, "queue")) != nullptr) {
      CONFIG_RETURN_IF_ERROR(ReadEnum<QueueKind>(
          *f, Join(path, "queue"),
          {{"memory", QueueKind::kMemory}, {"disk", QueueKind::kDisk}},
          &out->queue));
    }
    if ((f = Find(v, "initial_sync")) != nullptr) {
      CONFIG_RETURN_IF_ERROR(ReadEnum<InitialSync>(
          *f, Join(path, "initial_sync"),
          {{"full", InitialSync::kFull},
           {"none", InitialSync::kNone},
           {"checksum", InitialSync::kChecksum}},
          &out->initial_sync));
    }
    if ((f = Find(v, "group_interval")) != nullptr) {
      CONFIG_RETURN_IF_ERROR(ReadDuration(
          *f, Join(path, "group_interval"), kMinGroupIntervalMs,
          kMaxGroupIntervalMs, &out->group_interval_ms));
    }
    if ((f = Find(v, "max_lag")) != nullptr) {
      CONFIG_RETURN_IF_ERROR(ReadMaxLag(*f, Join(path, "max_lag"), out));
    }
    if ((f = Find(v, "resync_rate")) != nullptr) {
      const std::string p = Join(path, "resync_rate");
      if (uint64_t n = 0; AsUnsigned(*f, &n) && n > 0) {
        out->resync_rate_bytes_per_sec = n;
      } else if (f->is_string()) {
        Result<uint64_t> r = ParseRate(f->get_ref<const std::string&>());
        if (!r.ok()) return AtPath(p, r.status());
        out->resync_rate_bytes_per_sec = *r;
      } else {
        return Expected(p,
                        "expected a rate like \"100MiB/s\" or a whole number "
                        "of bytes per second above 0",
                        *f);
      }
    }
    if ((f = Find(v, "keepalive")) != nullptr) {
      CONFIG_RETURN_IF_ERROR(ReadDuration(*f, Join(path, "keepalive"),
                                          kMinKeepaliveMs, kMaxKeepaliveMs,
                                          &out->keepalive_ms));
    }
    return Status::OK();
  }

  // "max_lag" is a size or a duration. "m" would be minutes to
  // ParseDurationMs() and MiB to ParseSize(), so it is refused.
  Status ReadMaxLag(const json& v, const std::string& path,
                    DownstreamConfig* out) {
    constexpr std::string_view kExpected =
        "expected a size like \"256MiB\", a duration like \"30s\" or a whole "
        "number of bytes above 0";
    if (uint64_t n = 0; AsUnsigned(v, &n)) {
      if (n == 0) return Expected(path, kExpected, v);
      out->max_lag_bytes = n;
      return Status::OK();
    }
    if (!v.is_string()) return Expected(path, kExpected, v);
    const std::string& s = v.get_ref<const std::string&>();
    if (!s.empty() && (s.back() == 'm' || s.back() == 'M') &&
        s.size() >= 2 && std::isdigit(static_cast<unsigned char>(s[s.size() - 2]))) {
      return Error(path, fmt::format("{} is ambiguous; write \"{}MiB\" for "
                                     "bytes or \"{}min\" for minutes",
                                     QuoteForMessage(s),
                                     s.substr(0, s.size() - 1),
                                     s.substr(0, s.size() - 1)));
    }
    if (Result<uint64_t> size = ParseSize(s); size.ok()) {
      if (*size == 0) return Expected(path, kExpected, v);
      out->max_lag_bytes = *size;
      return Status::OK();
    }
    if (Result<uint32_t> ms = ParseDurationMs(s); ms.ok()) {
      if (*ms == 0) return Expected(path, kExpected, v);
      out->max_lag_ms = *ms;
      return Status::OK();
    }
    return Expected(path, kExpected, v);
  }

  // Rules that span groups: names are unique site-wide (volume names are NBD
  // export names), no two volumes share a backing path, and a site with a
  // secondary group listens for its upstream.
  Status CheckSite(const SiteConfig& c) {
    std::map<std::string, std::string> group_names;   // name -> json path
    std::map<std::string, std::string> volume_names;  // name -> json path
    std::map<fs::path, std::string> volume_paths;     // path -> json path
    for (size_t g = 0; g < c.groups.size(); ++g) {
      const GroupConfig& group = c.groups[g];
      const std::string gpath = Index("groups", g);
      auto [git, gnew] = group_names.emplace(group.name, Join(gpath, "name"));
      if (!gnew) {
        return Error(Join(gpath, "name"),
                     fmt::format("duplicate group name \"{}\" (also {})",
                                 group.name, git->second));
      }
      for (size_t i = 0; i < group.volumes.size(); ++i) {
        const VolumeConfig& vol = group.volumes[i];
        const std::string vpath = Index(Join(gpath, "volumes"), i);
        auto [nit, nnew] = volume_names.emplace(vol.name, Join(vpath, "name"));
        if (!nnew) {
          return Error(Join(vpath, "name"),
                       fmt::format("duplicate volume name \"{}\" (also {}); "
                                   "volume names are NBD export names and "
                                   "must be unique in a site",
                                   vol.name, nit->second));
        }
        auto [pit, pnew] = volume_paths.emplace(vol.path, Join(vpath, "path"));
        if (!pnew) {
          return Error(Join(vpath, "path"),
                       fmt::format("{} is already the backing path of {}; "
                                   "each volume needs its own file or device",
                                   vol.path.native(), pit->second));
        }
      }
      if (group.role == Role::kSecondary && !c.replication.listen) {
        return Missing("replication.listen",
                       fmt::format("group \"{}\" ({}) is secondary, so this "
                                   "site must listen for its upstream; "
                                   "expected \"host:port\"",
                                   group.name, gpath));
      }
    }
    return Status::OK();
  }

  fs::path base_dir_;
};

// Tracks the JSON path during parsing so a key repeated in one object (which
// nlohmann silently keeps the last of) can be refused by name.
class DuplicateKeyFinder {
 public:
  bool OnEvent(json::parse_event_t event, const json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        CountElement();
        frames_.emplace_back(event == json::parse_event_t::object_start);
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        if (!frames_.empty()) frames_.pop_back();
        break;
      case json::parse_event_t::key:
        if (!frames_.empty() && parsed.is_string()) {
          Frame& top = frames_.back();
          top.key = parsed.get<std::string>();
          if (!top.keys.insert(top.key).second && first_duplicate_.empty()) {
            first_duplicate_ = Join(CurrentPath(), top.key);
          }
        }
        break;
      case json::parse_event_t::value:
        CountElement();
        break;
    }
    return true;
  }

  // JSON path of the first repeated key, or "" if none.
  const std::string& first_duplicate() const { return first_duplicate_; }

 private:
  struct Frame {
    explicit Frame(bool object) : is_object(object) {}
    bool is_object;
    std::set<std::string> keys;
    std::string key;
    size_t elements = 0;  // arrays: elements seen so far
  };

  void CountElement() {
    if (!frames_.empty() && !frames_.back().is_object) {
      ++frames_.back().elements;
    }
  }

  // Path of the innermost open container.
  std::string CurrentPath() const {
    std::string path;
    for (size_t i = 0; i + 1 < frames_.size(); ++i) {
      const Frame& f = frames_[i];
      path = f.is_object ? Join(path, f.key) : Index(path, f.elements - 1);
    }
    return path;
  }

  std::vector<Frame> frames_;
  std::string first_duplicate_;
};

// nlohmann reports a byte offset; editors want line:column.
std::pair<size_t, size_t> LineAndColumn(const std::string& text,
                                        size_t byte_1based) {
  // `byte` is the 1-based index of the last character read; EOF is n+1.
  size_t index = byte_1based == 0 ? 0 : byte_1based - 1;
  index = std::min(index, text.size());
  size_t line = 1;
  size_t line_start = 0;
  for (size_t i = 0; i < index; ++i) {
    if (text[i] == '\n') {
      ++line;
      line_start = i + 1;
    }
  }
  return {line, index - line_start + 1};
}

// nlohmann's what() is "[json.exception.parse_error.101] parse error at line
// 1, column 2: syntax error while parsing ..."; keep what follows the
// location, which we print ourselves.
std::string ParseErrorDetail(const std::string& what) {
  const size_t bracket = what.find("] ");
  const size_t colon = what.find(": ", bracket == std::string::npos ? 0 : bracket);
  if (colon == std::string::npos) return what;
  return what.substr(colon + 2);
}

Status ReadWholeFile(const fs::path& path, std::string* out) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return PosixError(fmt::format("{}: cannot read config file", path.native()),
                      errno);
  }
  out->clear();
  char buf[65536];
  Status status;
  while (true) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      status = PosixError(
          fmt::format("{}: cannot read config file", path.native()), errno);
      break;
    }
    if (n == 0) break;
    out->append(buf, static_cast<size_t>(n));
    if (out->size() > kMaxConfigFileBytes) {
      status = Status::InvalidArgument(fmt::format(
          "{}: larger than {}; not a config file", path.native(),
          FormatSize(kMaxConfigFileBytes)));
      break;
    }
  }
  ::close(fd);
  return status;
}

}  // namespace

Result<SiteConfig> ParseSiteConfig(const nlohmann::json& doc,
                                   const std::filesystem::path& base_dir) {
  try {
    std::error_code ec;
    fs::path base = base_dir;
    if (base.is_relative()) {
      base = fs::absolute(base_dir, ec);
      if (ec) {
        return Status::InvalidArgument(
            fmt::format("cannot make base directory {} absolute: {}",
                        base_dir.native(), ec.message()));
      }
    }
    SiteParser parser(base.lexically_normal());
    SiteConfig config;
    Status s = parser.Parse(doc, &config);
    if (!s.ok()) return s;
    return config;
  } catch (const std::exception& e) {
    // Every access is type-checked first; this is the backstop that keeps
    // the promise that nothing throws out of the module.
    return Status::InvalidArgument(
        fmt::format("(top level): unexpected error reading config: {}",
                    e.what()));
  }
}

Result<SiteConfig> LoadSiteConfig(const std::filesystem::path& path) {
  try {
    std::error_code ec;
    fs::path abs = fs::absolute(path, ec);
    if (ec) abs = path;
    std::string text;
    Status s = ReadWholeFile(abs, &text);
    if (!s.ok()) return s;

    DuplicateKeyFinder duplicates;
    json doc;
    try {
      doc = json::parse(
          text,
          [&duplicates](int /*depth*/, json::parse_event_t event,
                        json& parsed) {
            return duplicates.OnEvent(event, parsed);
          },
          /*allow_exceptions=*/true, /*ignore_comments=*/false);
    } catch (const json::parse_error& e) {
      const auto [line, column] = LineAndColumn(text, e.byte);
      return Status::InvalidArgument(
          fmt::format("{}:{}:{}: JSON syntax error: {}", abs.native(), line,
                      column, ParseErrorDetail(e.what())));
    }
    if (!duplicates.first_duplicate().empty()) {
      return Status::InvalidArgument(
          fmt::format("{}: {}: key appears twice in the same object; keep "
                      "one",
                      abs.native(), duplicates.first_duplicate()));
    }
    Result<SiteConfig> config = ParseSiteConfig(doc, abs.parent_path());
    if (!config.ok()) return config.status().WithContext(abs.native());
    return config;
  } catch (const std::exception& e) {
    return Status::InvalidArgument(fmt::format(
        "{}: unexpected error reading config: {}", path.native(), e.what()));
  }
}

nlohmann::json ToJson(const SiteConfig& c) {
  json doc = json::object();
  doc["site"] = c.site;
  doc["data_dir"] = c.data_dir.native();
  doc["control_socket"] = c.control_socket.native();
  json nbd = json::object();
  if (c.nbd.unix_socket) nbd["unix_socket"] = c.nbd.unix_socket->native();
  if (c.nbd.listen) nbd["listen"] = c.nbd.listen->ToString();
  nbd["io_threads"] = c.nbd.io_threads;
  nbd["poll_us"] = c.nbd.poll_us;
  doc["nbd"] = std::move(nbd);
  json replication = json::object();
  if (c.replication.listen) {
    replication["listen"] = c.replication.listen->ToString();
  }
  doc["replication"] = std::move(replication);
  json groups = json::array();
  for (const GroupConfig& g : c.groups) {
    json group = json::object();
    group["name"] = g.name;
    group["role"] = ToString(g.role);
    group["region_size"] = FormatSize(g.region_size_bytes);
    group["on_sync_failure"] = ToString(g.on_sync_failure);
    group["sync_timeout"] = FormatDurationMs(g.sync_timeout_ms);
    group["bitmap_flush_interval"] = FormatDurationMs(g.bitmap_flush_interval_ms);
    json volumes = json::array();
    for (const VolumeConfig& v : g.volumes) {
      json vol = {{"name", v.name}, {"path", v.path.native()}};
      if (v.size_bytes) vol["size"] = FormatSize(*v.size_bytes);
      volumes.push_back(std::move(vol));
    }
    group["volumes"] = std::move(volumes);
    json downstream = json::array();
    for (const DownstreamConfig& d : g.downstream) {
      json ds = {{"site", d.site},
                 {"address", d.address.ToString()},
                 {"mode", ToString(d.mode)},
                 {"max_queue", FormatSize(d.max_queue_bytes)},
                 {"queue", ToString(d.queue)},
                 {"initial_sync", ToString(d.initial_sync)},
                 {"group_interval", FormatDurationMs(d.group_interval_ms)},
                 {"keepalive", FormatDurationMs(d.keepalive_ms)}};
      if (d.max_lag_bytes) ds["max_lag"] = FormatSize(*d.max_lag_bytes);
      if (d.max_lag_ms) ds["max_lag"] = FormatDurationMs(*d.max_lag_ms);
      if (d.resync_rate_bytes_per_sec) {
        ds["resync_rate"] = FormatSize(*d.resync_rate_bytes_per_sec) + "/s";
      }
      downstream.push_back(std::move(ds));
    }
    group["downstream"] = std::move(downstream);
    if (g.upstream) {
      json up = {{"site", g.upstream->site}};
      if (g.upstream->address) up["address"] = g.upstream->address->ToString();
      group["upstream"] = std::move(up);
    }
    groups.push_back(std::move(group));
  }
  doc["groups"] = std::move(groups);
  return doc;
}

const char* ToString(Role r) {
  switch (r) {
    case Role::kPrimary:
      return "primary";
    case Role::kSecondary:
      return "secondary";
  }
  return "unknown";
}

const char* ToString(LinkMode m) {
  switch (m) {
    case LinkMode::kSync:
      return "sync";
    case LinkMode::kAsync:
      return "async";
  }
  return "unknown";
}

const char* ToString(QueueKind q) {
  switch (q) {
    case QueueKind::kMemory:
      return "memory";
    case QueueKind::kDisk:
      return "disk";
  }
  return "unknown";
}

const char* ToString(InitialSync s) {
  switch (s) {
    case InitialSync::kFull:
      return "full";
    case InitialSync::kNone:
      return "none";
    case InitialSync::kChecksum:
      return "checksum";
  }
  return "unknown";
}

const char* ToString(OnSyncFailure f) {
  switch (f) {
    case OnSyncFailure::kLogging:
      return "logging";
    case OnSyncFailure::kBlock:
      return "block";
  }
  return "unknown";
}

}  // namespace blockrelay::config
