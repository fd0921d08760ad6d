#include "nbd/protocol.h"

#include <cstring>

#include <fmt/format.h>

namespace blockrelay::nbd {

uint16_t LoadBe16(const std::byte* p) {
  return static_cast<uint16_t>((std::to_integer<uint16_t>(p[0]) << 8) |
                               std::to_integer<uint16_t>(p[1]));
}

uint32_t LoadBe32(const std::byte* p) {
  return (std::to_integer<uint32_t>(p[0]) << 24) |
         (std::to_integer<uint32_t>(p[1]) << 16) |
         (std::to_integer<uint32_t>(p[2]) << 8) | std::to_integer<uint32_t>(p[3]);
}

uint64_t LoadBe64(const std::byte* p) {
  return (static_cast<uint64_t>(LoadBe32(p)) << 32) | LoadBe32(p + 4);
}

void AppendBe16(Bytes& out, uint16_t v) {
  out.push_back(static_cast<std::byte>(v >> 8));
  out.push_back(static_cast<std::byte>(v));
}

void AppendBe32(Bytes& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) {
    out.push_back(static_cast<std::byte>(v >> shift));
  }
}

void AppendBe64(Bytes& out, uint64_t v) {
  AppendBe32(out, static_cast<uint32_t>(v >> 32));
  AppendBe32(out, static_cast<uint32_t>(v));
}

void AppendBytes(Bytes& out, std::string_view s) {
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  out.insert(out.end(), p, p + s.size());
}

Bytes EncodeGreeting(uint16_t handshake_flags) {
  Bytes out;
  AppendBe64(out, kNbdMagic);
  AppendBe64(out, kIHaveOpt);
  AppendBe16(out, handshake_flags);
  return out;
}

Result<OptionHeader> DecodeOptionHeader(std::span<const std::byte> bytes) {
  if (bytes.size() < kOptionHeaderBytes) {
    return Status::Corruption(
        fmt::format("option header truncated: {} of {} bytes", bytes.size(),
                    kOptionHeaderBytes));
  }
  uint64_t magic = LoadBe64(bytes.data());
  if (magic != kIHaveOpt) {
    return Status::Corruption(
        fmt::format("option header has magic {:#x}, expected IHAVEOPT", magic));
  }
  OptionHeader h;
  h.option = LoadBe32(bytes.data() + 8);
  h.length = LoadBe32(bytes.data() + 12);
  return h;
}

Bytes EncodeOptionReply(uint32_t option, uint32_t reply_type,
                        std::span<const std::byte> payload) {
  Bytes out;
  out.reserve(20 + payload.size());
  AppendBe64(out, kOptReplyMagic);
  AppendBe32(out, option);
  AppendBe32(out, reply_type);
  AppendBe32(out, static_cast<uint32_t>(payload.size()));
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

Bytes EncodeOptionError(uint32_t option, uint32_t error_type,
                        std::string_view message) {
  Bytes payload;
  AppendBytes(payload, message.substr(0, kMaxStringBytes));
  return EncodeOptionReply(option, error_type, payload);
}

namespace {

// A bounds-checked reader over an option payload.
class Cursor {
 public:
  explicit Cursor(std::span<const std::byte> bytes) : bytes_(bytes) {}
  size_t remaining() const { return bytes_.size() - pos_; }
  bool Read16(uint16_t& v) {
    if (remaining() < 2) return false;
    v = LoadBe16(bytes_.data() + pos_);
    pos_ += 2;
    return true;
  }
  bool Read32(uint32_t& v) {
    if (remaining() < 4) return false;
    v = LoadBe32(bytes_.data() + pos_);
    pos_ += 4;
    return true;
  }
  bool ReadString(uint32_t length, std::string& s) {
    if (remaining() < length) return false;
    s.assign(reinterpret_cast<const char*>(bytes_.data() + pos_), length);
    pos_ += length;
    return true;
  }

 private:
  std::span<const std::byte> bytes_;
  size_t pos_ = 0;
};

}  // namespace

Result<InfoRequest> DecodeInfoRequest(std::span<const std::byte> payload) {
  Cursor c(payload);
  uint32_t name_length = 0;
  if (!c.Read32(name_length)) {
    return Status::InvalidArgument("INFO/GO payload shorter than 6 bytes");
  }
  if (name_length > kMaxStringBytes) {
    return Status::InvalidArgument(
        fmt::format("export name of {} bytes exceeds {}", name_length,
                    kMaxStringBytes));
  }
  InfoRequest r;
  if (!c.ReadString(name_length, r.export_name)) {
    return Status::InvalidArgument(fmt::format(
        "export name length {} runs past the option's data", name_length));
  }
  uint16_t count = 0;
  if (!c.Read16(count)) {
    return Status::InvalidArgument("INFO/GO payload lacks the request count");
  }
  if (c.remaining() != static_cast<size_t>(count) * 2) {
    return Status::InvalidArgument(
        fmt::format("INFO/GO announces {} info requests but carries {} bytes",
                    count, c.remaining()));
  }
  r.info_types.resize(count);
  for (auto& t : r.info_types) c.Read16(t);
  return r;
}

Result<MetaContextRequest> DecodeMetaContextRequest(
    std::span<const std::byte> payload) {
  Cursor c(payload);
  uint32_t name_length = 0;
  if (!c.Read32(name_length)) {
    return Status::InvalidArgument("meta context payload shorter than 8 bytes");
  }
  if (name_length > kMaxStringBytes) {
    return Status::InvalidArgument(fmt::format(
        "export name of {} bytes exceeds {}", name_length, kMaxStringBytes));
  }
  MetaContextRequest r;
  if (!c.ReadString(name_length, r.export_name)) {
    return Status::InvalidArgument(fmt::format(
        "export name length {} runs past the option's data", name_length));
  }
  uint32_t count = 0;
  if (!c.Read32(count)) {
    return Status::InvalidArgument("meta context payload lacks the query count");
  }
  // Each query needs at least its 4-byte length; checking here keeps a lying
  // count from reserving memory.
  if (count > c.remaining() / 4) {
    return Status::InvalidArgument(fmt::format(
        "meta context announces {} queries but carries {} bytes", count,
        c.remaining()));
  }
  r.queries.reserve(count);
  for (uint32_t i = 0; i < count; ++i) {
    uint32_t query_length = 0;
    std::string query;
    if (!c.Read32(query_length) || query_length > kMaxStringBytes ||
        !c.ReadString(query_length, query)) {
      return Status::InvalidArgument(
          fmt::format("meta context query {} is truncated or too long", i));
    }
    r.queries.push_back(std::move(query));
  }
  if (c.remaining() != 0) {
    return Status::InvalidArgument(fmt::format(
        "meta context payload has {} trailing bytes", c.remaining()));
  }
  return r;
}

Bytes EncodeInfoExport(uint64_t size_bytes, uint16_t transmission_flags) {
  Bytes out;
  AppendBe16(out, kInfoExport);
  AppendBe64(out, size_bytes);
  AppendBe16(out, transmission_flags);
  return out;
}

Bytes EncodeInfoName(std::string_view name) {
  Bytes out;
  AppendBe16(out, kInfoName);
  AppendBytes(out, name);
  return out;
}

Bytes EncodeInfoDescription(std::string_view description) {
  Bytes out;
  AppendBe16(out, kInfoDescription);
  AppendBytes(out, description);
  return out;
}

Bytes EncodeInfoBlockSize(uint32_t min_bytes, uint32_t preferred_bytes,
                          uint32_t max_bytes) {
  Bytes out;
  AppendBe16(out, kInfoBlockSize);
  AppendBe32(out, min_bytes);
  AppendBe32(out, preferred_bytes);
  AppendBe32(out, max_bytes);
  return out;
}

Bytes EncodeRepServer(std::string_view name, std::string_view description) {
  Bytes out;
  AppendBe32(out, static_cast<uint32_t>(name.size()));
  AppendBytes(out, name);
  AppendBytes(out, description);
  return out;
}

Bytes EncodeRepMetaContext(uint32_t context_id, std::string_view name) {
  Bytes out;
  AppendBe32(out, context_id);
  AppendBytes(out, name);
  return out;
}

Bytes EncodeExportNameReply(uint64_t size_bytes, uint16_t transmission_flags,
                            bool no_zeroes) {
  Bytes out;
  AppendBe64(out, size_bytes);
  AppendBe16(out, transmission_flags);
  if (!no_zeroes) out.resize(out.size() + 124);
  return out;
}

Result<Request> DecodeRequest(std::span<const std::byte> header) {
  if (header.size() < kRequestHeaderBytes) {
    return Status::Corruption(fmt::format(
        "request header truncated: {} of {} bytes", header.size(),
        kRequestHeaderBytes));
  }
  uint32_t magic = LoadBe32(header.data());
  if (magic != kRequestMagic) {
    return Status::Corruption(
        fmt::format("request has magic {:#010x}, expected {:#010x}", magic,
                    kRequestMagic));
  }
  Request r;
  r.flags = LoadBe16(header.data() + 4);
  r.type = LoadBe16(header.data() + 6);
  r.cookie = LoadBe64(header.data() + 8);
  r.offset = LoadBe64(header.data() + 16);
  r.length = LoadBe32(header.data() + 24);
  return r;
}

Bytes EncodeRequest(const Request& r) {
  Bytes out;
  AppendBe32(out, kRequestMagic);
  AppendBe16(out, r.flags);
  AppendBe16(out, r.type);
  AppendBe64(out, r.cookie);
  AppendBe64(out, r.offset);
  AppendBe32(out, r.length);
  return out;
}

void AppendSimpleReply(Bytes& out, uint32_t error, uint64_t cookie) {
  AppendBe32(out, kSimpleReplyMagic);
  AppendBe32(out, error);
  AppendBe64(out, cookie);
}

void AppendStructuredHeader(Bytes& out, uint16_t flags, uint16_t type,
                            uint64_t cookie, uint32_t length) {
  AppendBe32(out, kStructuredReplyMagic);
  AppendBe16(out, flags);
  AppendBe16(out, type);
  AppendBe64(out, cookie);
  AppendBe32(out, length);
}

void AppendStructuredError(Bytes& out, uint64_t cookie, uint32_t error,
                           std::string_view message) {
  message = message.substr(0, kMaxStringBytes);
  AppendStructuredHeader(out, kReplyFlagDone, kReplyTypeError, cookie,
                         static_cast<uint32_t>(6 + message.size()));
  AppendBe32(out, error);
  AppendBe16(out, static_cast<uint16_t>(message.size()));
  AppendBytes(out, message);
}

void AppendStructuredDone(Bytes& out, uint64_t cookie) {
  AppendStructuredHeader(out, kReplyFlagDone, kReplyTypeNone, cookie, 0);
}

void AppendBlockStatusChunk(Bytes& out, uint64_t cookie, uint32_t context_id,
                            std::span<const StatusExtent> extents) {
  AppendStructuredHeader(out, kReplyFlagDone, kReplyTypeBlockStatus, cookie,
                         static_cast<uint32_t>(4 + 8 * extents.size()));
  AppendBe32(out, context_id);
  for (const auto& e : extents) {
    AppendBe32(out, e.length_bytes);
    AppendBe32(out, e.flags);
  }
}

std::string_view CommandName(uint16_t type) {
  switch (static_cast<Command>(type)) {
    case Command::kRead: return "READ";
    case Command::kWrite: return "WRITE";
    case Command::kDisc: return "DISC";
    case Command::kFlush: return "FLUSH";
    case Command::kTrim: return "TRIM";
    case Command::kCache: return "CACHE";
    case Command::kWriteZeroes: return "WRITE_ZEROES";
    case Command::kBlockStatus: return "BLOCK_STATUS";
  }
  return "UNKNOWN";
}

std::string_view OptionName(uint32_t option) {
  switch (option) {
    case kOptExportName: return "EXPORT_NAME";
    case kOptAbort: return "ABORT";
    case kOptList: return "LIST";
    case kOptStartTls: return "STARTTLS";
    case kOptInfo: return "INFO";
    case kOptGo: return "GO";
    case kOptStructuredReply: return "STRUCTURED_REPLY";
    case kOptListMetaContext: return "LIST_META_CONTEXT";
    case kOptSetMetaContext: return "SET_META_CONTEXT";
    default: return "UNKNOWN";
  }
}

}  // namespace blockrelay::nbd
