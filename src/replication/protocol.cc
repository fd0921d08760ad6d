// Codec for replication frames: see protocol.h for the header and the
// conversation. This comment is the payload grammar; all integers are
// big-endian, `str` is u16 length + that many bytes (<= kMaxStringBytes).
//
//   header      := u32 magic "BRLY" | u16 version | u16 type | u32 length
//                  | u32 flags | u64 checksum                    (24 bytes)
//   checksum    := XXH3-64 over header bytes [0,16) then the payload
//
//   HELLO       := str site | str group | u64 region_size_bytes
//                  | u32 volume_count (<= kMaxVolumesPerGroup)
//                  | volume_count x (str name | u64 size_bytes)
//                  | str generation
//   HELLO_REPLY := u32 result (a HelloResult) | str site | str message
//                  | str generation | u64 applied_group_seq
//   WRITE_GROUP := u64 link_seq | u64 group_seq
//                  | u32 op_count (<= kMaxOpsPerGroup)
//                  | op_count x op
//   op          := u8 type (OpType) | u32 volume | u64 offset | u64 length
//                  | (type == WRITE ? `length` data bytes : nothing)
//                  offset + length must not overflow u64
//   GROUP_ACK   := u64 received_seq | u64 durable_seq (<= received_seq)
//   PING, PONG  := u64 nonce
//   ERROR       := u32 code | str message
//   DIRTY_RANGES := u32 volume_count (<= kMaxVolumesPerGroup)
//                  | volume_count x (u32 volume | u32 run_count
//                                    | run_count x (u64 first_region
//                                                   | u64 region_count))
//                  volumes strictly ascending; runs ascending, disjoint,
//                  region_count >= 1, at most kMaxDirtyRuns in all
//
// Header flags: WRITE_GROUP carries the group flags (only bits in
// kGroupFlagsKnown; a resync marker, BEGIN or END, has kGroupResync, no
// ops and group_seq 0); HELLO may carry kHelloLazyDurability; HELLO_REPLY may
// carry kReplyFullResync; every other type must send 0. The payload is exactly
// what the grammar describes: trailing bytes are an error.
//
// Decoders never read past the payload and check every count against the
// bytes left before reserving memory for it. Errors are Corruption with
// "<FRAME>[ <item> <n>]: <what>", e.g.
// "WRITE_GROUP op 3: data truncated (need 4096 bytes, 100 left)".

#include "replication/protocol.h"

// For XXH3_state_t on the stack; the struct matches the linked libxxhash
// because both come from the same Debian package.
#include "util/xxhash.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string_view>

#include <fmt/format.h>

// The big-endian helpers live with the NBD codec for now.
#include "nbd/protocol.h"

namespace blockrelay::replication {

using nbd::AppendBe16;
using nbd::AppendBe32;
using nbd::AppendBe64;
using nbd::LoadBe16;
using nbd::LoadBe32;
using nbd::LoadBe64;

namespace {

// Header field offsets.
constexpr size_t kMagicOffset = 0;
constexpr size_t kVersionOffset = 4;
constexpr size_t kTypeOffset = 6;
constexpr size_t kLengthOffset = 8;
constexpr size_t kFlagsOffset = 12;
constexpr size_t kChecksumOffset = 16;  // the checksum covers [0, 16)

// u8 type | u32 volume | u64 offset | u64 length.
constexpr size_t kOpHeaderBytes = 1 + 4 + 8 + 8;
// u64 link_seq | u64 group_seq | u32 op_count.
constexpr size_t kWriteGroupFixedBytes = 8 + 8 + 4;
// Smallest volume entry: an empty name and the u64 size.
constexpr size_t kMinVolumeBytes = 2 + 8;

bool IsKnownType(uint16_t type) {
  return type >= static_cast<uint16_t>(FrameType::kHello) &&
         type <= static_cast<uint16_t>(FrameType::kGeneration);
}

bool IsKnownOpType(uint8_t type) {
  return type >= static_cast<uint8_t>(OpType::kWrite) &&
         type <= static_cast<uint8_t>(OpType::kZero);
}

bool IsKnownHelloResult(uint32_t result) {
  return result <= static_cast<uint32_t>(HelloResult::kStaleUpstream);
}

uint64_t FrameChecksum(std::span<const std::byte> header_prefix,
                       std::span<const std::byte> payload) {
  XXH3_state_t state;
  XXH3_INITSTATE(&state);
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, header_prefix.data(), header_prefix.size());
  XXH3_64bits_update(&state, payload.data(), payload.size());
  return XXH3_64bits_digest(&state);
}

// --- Encoding ----------------------------------------------------------------

[[noreturn]] void ThrowInvalid(FrameType type, std::string_view what) {
  throw std::invalid_argument(fmt::format("{}: {}", FrameTypeName(type), what));
}

void AppendString(FrameType type, std::string_view field, std::string_view s,
                  Bytes& out) {
  if (s.size() > kMaxStringBytes) {
    ThrowInvalid(type, fmt::format("{} of {} bytes exceeds the {}-byte limit",
                                   field, s.size(), kMaxStringBytes));
  }
  AppendBe16(out, static_cast<uint16_t>(s.size()));
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  out.insert(out.end(), p, p + s.size());
}

// Appends one frame: a header, then whatever `append_payload` appends, then
// patches length and checksum into the header. If `append_payload` throws,
// `out` is left as it was.
template <typename AppendPayload>
void AppendFrame(FrameType type, uint32_t flags, Bytes& out,
                 AppendPayload&& append_payload) {
  const size_t start = out.size();
  try {
    out.resize(start + kFrameHeaderBytes);
    append_payload(out);
    const size_t payload_bytes = out.size() - start - kFrameHeaderBytes;
    if (payload_bytes > kMaxFramePayloadBytes) {
      ThrowInvalid(type, fmt::format("payload of {} bytes exceeds the {}-byte "
                                     "frame limit",
                                     payload_bytes, kMaxFramePayloadBytes));
    }
    Bytes header;
    header.reserve(kFrameHeaderBytes);
    AppendBe32(header, kFrameMagic);
    AppendBe16(header, kProtocolVersion);
    AppendBe16(header, static_cast<uint16_t>(type));
    AppendBe32(header, static_cast<uint32_t>(payload_bytes));
    AppendBe32(header, flags);
    std::span<const std::byte> payload(out.data() + start + kFrameHeaderBytes,
                                       payload_bytes);
    AppendBe64(header, FrameChecksum(header, payload));
    std::copy(header.begin(), header.end(), out.begin() + start);
  } catch (...) {
    out.resize(start);
    throw;
  }
}

// Payload bytes of a WriteGroup as EncodeWriteGroup() lays them out.
size_t WriteGroupPayloadBytes(const WriteGroup& group) {
  size_t bytes = kWriteGroupFixedBytes;
  for (const Op& op : group.ops) {
    bytes += kOpHeaderBytes;
    if (op.type == OpType::kWrite) bytes += op.length;
  }
  return bytes;
}

// --- Decoding ----------------------------------------------------------------

// A bounds-checked reader over one payload with a sticky error: after the
// first failure every read is a no-op and leaves its output untouched, so a
// caller may read several fields and check ok() once, before it uses a value.
class Reader {
 public:
  Reader(std::span<const std::byte> bytes, FrameType type)
      : bytes_(bytes), type_(type) {}

  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }
  size_t remaining() const { return bytes_.size() - pos_; }

  // Names the repeated item being read ("op", 3), for error messages.
  void SetItem(const char* kind, uint32_t index) {
    item_kind_ = kind;
    item_index_ = index;
  }
  void ClearItem() { item_kind_ = nullptr; }

  void U8(const char* field, uint8_t& v) {
    if (Need(field, 1)) v = std::to_integer<uint8_t>(bytes_[pos_++]);
  }
  void U32(const char* field, uint32_t& v) {
    if (!Need(field, 4)) return;
    v = LoadBe32(bytes_.data() + pos_);
    pos_ += 4;
  }
  void U64(const char* field, uint64_t& v) {
    if (!Need(field, 8)) return;
    v = LoadBe64(bytes_.data() + pos_);
    pos_ += 8;
  }
  void String(const char* field, std::string& s) {
    if (!Need(field, 2)) return;
    uint16_t length = LoadBe16(bytes_.data() + pos_);
    if (length > kMaxStringBytes) {
      Fail(fmt::format("{} too long ({} bytes, limit {})", field, length,
                       kMaxStringBytes));
      return;
    }
    pos_ += 2;
    if (!Need(field, length)) return;
    s.assign(reinterpret_cast<const char*>(bytes_.data() + pos_), length);
    pos_ += length;
  }
  // A view of the next `length` bytes; `length` may be any u64.
  void View(const char* field, uint64_t length,
            std::span<const std::byte>& out) {
    if (!Need(field, length)) return;
    out = bytes_.subspan(pos_, static_cast<size_t>(length));
    pos_ += static_cast<size_t>(length);
  }

  // Records an error "<FRAME>[ <item> <n>]: <what>" unless one is recorded.
  void Fail(std::string_view what) {
    if (!status_.ok()) return;
    if (item_kind_ != nullptr) {
      status_ = Status::Corruption(fmt::format(
          "{} {} {}: {}", FrameTypeName(type_), item_kind_, item_index_, what));
    } else {
      status_ =
          Status::Corruption(fmt::format("{}: {}", FrameTypeName(type_), what));
    }
  }

  // The payload must end exactly here.
  Status Finish() {
    ClearItem();
    if (ok() && remaining() != 0) {
      Fail(fmt::format("{} trailing bytes after the payload", remaining()));
    }
    return status_;
  }

 private:
  bool Need(const char* field, uint64_t n) {
    if (!status_.ok()) return false;
    if (n > remaining()) {
      Fail(fmt::format("{} truncated (need {} bytes, {} left)", field, n,
                       remaining()));
      return false;
    }
    return true;
  }

  std::span<const std::byte> bytes_;
  size_t pos_ = 0;
  FrameType type_;
  const char* item_kind_ = nullptr;
  uint32_t item_index_ = 0;
  Status status_;
};

Status DecodeHelloPayload(Reader& r, Hello& hello) {
  r.String("site", hello.site);
  r.String("group", hello.group);
  r.U64("region_size", hello.region_size_bytes);
  uint32_t count = 0;
  r.U32("volume count", count);
  if (!r.ok()) return r.status();
  if (count > kMaxVolumesPerGroup) {
    r.Fail(fmt::format("volume count {} exceeds the limit of {}", count,
                       kMaxVolumesPerGroup));
    return r.status();
  }
  if (count > r.remaining() / kMinVolumeBytes) {
    r.Fail(fmt::format("volume count {} needs at least {} bytes, {} left",
                       count, uint64_t{count} * kMinVolumeBytes,
                       r.remaining()));
    return r.status();
  }
  hello.volumes.resize(count);
  for (uint32_t i = 0; i < count && r.ok(); ++i) {
    r.SetItem("volume", i);
    r.String("name", hello.volumes[i].name);
    r.U64("size", hello.volumes[i].size_bytes);
  }
  r.ClearItem();
  r.String("generation", hello.generation);
  return r.Finish();
}

// "" when `group` is fine as far as the resync markers go; otherwise why
// it is not (a marker without kGroupResync, both markers, a marker with
// ops or a group_seq).
std::string ResyncMarkerProblem(const WriteGroup& group) {
  const uint32_t markers = group.flags & (kGroupResyncBegin | kGroupResyncEnd);
  if (!markers) return "";
  if (markers == (kGroupResyncBegin | kGroupResyncEnd)) {
    return "resync BEGIN and END flags both set";
  }
  const char* which = markers == kGroupResyncBegin ? "BEGIN" : "END";
  if (!(group.flags & kGroupResync)) {
    return fmt::format("resync {} marker without the resync flag", which);
  }
  if (!group.ops.empty() || group.group_seq != 0) {
    return fmt::format("resync {} marker carries {} op(s) and group_seq {}; it "
                       "must carry none", which, group.ops.size(), group.group_seq);
  }
  return "";
}

Status DecodeHelloReplyPayload(Reader& r, HelloReply& reply) {
  uint32_t result = 0;
  r.U32("result", result);
  if (r.ok() && !IsKnownHelloResult(result)) {
    r.Fail(fmt::format("unknown result {}", result));
  }
  reply.result = static_cast<HelloResult>(result);
  r.String("site", reply.site);
  r.String("message", reply.message);
  r.String("generation", reply.generation);
  r.U64("applied_group_seq", reply.applied_group_seq);
  return r.Finish();
}

Status DecodeWriteGroupPayload(Reader& r, WriteGroup& group) {
  r.U64("link_seq", group.link_seq);
  r.U64("group_seq", group.group_seq);
  uint32_t count = 0;
  r.U32("op count", count);
  if (!r.ok()) return r.status();
  if (count > kMaxOpsPerGroup) {
    r.Fail(fmt::format("op count {} exceeds the limit of {}", count,
                       kMaxOpsPerGroup));
    return r.status();
  }
  if (count > r.remaining() / kOpHeaderBytes) {
    r.Fail(fmt::format("op count {} needs at least {} bytes, {} left", count,
                       uint64_t{count} * kOpHeaderBytes, r.remaining()));
    return r.status();
  }
  group.ops.resize(count);
  for (uint32_t i = 0; i < count; ++i) {
    Op& op = group.ops[i];
    r.SetItem("op", i);
    uint8_t type = 0;
    r.U8("type", type);
    if (r.ok() && !IsKnownOpType(type)) {
      r.Fail(fmt::format("unknown type {}", type));
    }
    op.type = static_cast<OpType>(type);
    r.U32("volume", op.volume);
    r.U64("offset", op.offset);
    r.U64("length", op.length);
    if (!r.ok()) return r.status();
    if (op.length > std::numeric_limits<uint64_t>::max() - op.offset) {
      r.Fail(fmt::format("offset {} + length {} overflows u64", op.offset,
                         op.length));
      return r.status();
    }
    if (op.type == OpType::kWrite) {
      r.View("data", op.length, op.data);
      if (!r.ok()) return r.status();
    }
  }
  return r.Finish();
}

Status DecodeGroupAckPayload(Reader& r, GroupAck& ack) {
  r.U64("received_seq", ack.received_seq);
  r.U64("durable_seq", ack.durable_seq);
  if (r.ok() && ack.durable_seq > ack.received_seq) {
    r.Fail(fmt::format("durable_seq {} is beyond received_seq {}",
                       ack.durable_seq, ack.received_seq));
  }
  return r.Finish();
}

Status DecodeErrorPayload(Reader& r, ErrorFrame& error) {
  r.U32("code", error.code);
  r.String("message", error.message);
  return r.Finish();
}

// Decodes a payload of type T with `decode`, wrapping the result as a Frame.
Status DecodeDirtyRangesPayload(Reader& r, DirtyRanges& d) {
  uint32_t volume_count = 0;
  r.U32("volume_count", volume_count);
  if (r.ok() && volume_count > kMaxVolumesPerGroup) {
    return Status::Corruption(fmt::format(
        "DIRTY_RANGES: {} volumes exceed the limit of {}", volume_count,
        kMaxVolumesPerGroup));
  }
  uint64_t total_runs = 0;
  for (uint32_t i = 0; i < volume_count && r.ok(); ++i) {
    VolumeDirtyRuns v;
    uint32_t run_count = 0;
    r.U32("volume", v.volume);
    r.U32("run_count", run_count);
    if (!r.ok()) break;
    if (!d.volumes.empty() && v.volume <= d.volumes.back().volume) {
      return Status::Corruption(fmt::format(
          "DIRTY_RANGES volume {}: volume {} follows volume {} (must ascend)",
          i, v.volume, d.volumes.back().volume));
    }
    total_runs += run_count;
    if (total_runs > kMaxDirtyRuns) {
      return Status::Corruption(fmt::format(
          "DIRTY_RANGES: more than {} runs", kMaxDirtyRuns));
    }
    // Each run needs 16 bytes: a lying count cannot make us reserve more
    // than the payload holds.
    if (uint64_t{run_count} * 16 > r.remaining()) {
      return Status::Corruption(fmt::format(
          "DIRTY_RANGES volume {}: {} runs announced but only {} bytes left",
          v.volume, run_count, r.remaining()));
    }
    v.runs.reserve(run_count);
    for (uint32_t j = 0; j < run_count && r.ok(); ++j) {
      DirtyRun run;
      r.U64("first_region", run.first_region);
      r.U64("region_count", run.region_count);
      if (!r.ok()) break;
      if (run.region_count == 0) {
        return Status::Corruption(fmt::format(
            "DIRTY_RANGES volume {} run {}: region_count is 0", v.volume, j));
      }
      if (run.first_region + run.region_count < run.first_region) {
        return Status::Corruption(fmt::format(
            "DIRTY_RANGES volume {} run {}: {}+{} overflows", v.volume, j,
            run.first_region, run.region_count));
      }
      if (!v.runs.empty() && run.first_region < v.runs.back().first_region +
                                                    v.runs.back().region_count) {
        return Status::Corruption(fmt::format(
            "DIRTY_RANGES volume {} run {}: starts at region {}, inside or "
            "before the previous run", v.volume, j, run.first_region));
      }
      v.runs.push_back(run);
    }
    d.volumes.push_back(std::move(v));
  }
  return r.Finish();
}

template <typename T, typename DecodeFn>
Result<Frame> DecodeAs(Reader& r, DecodeFn decode) {
  T value;
  Status s = decode(r, value);
  if (!s.ok()) return s;
  return Frame(std::move(value));
}

}  // namespace

Result<FrameHeader> DecodeFrameHeader(std::span<const std::byte> header) {
  if (header.size() != kFrameHeaderBytes) {
    return Status::Corruption(
        fmt::format("frame header is {} bytes, expected {}", header.size(),
                    kFrameHeaderBytes));
  }
  const std::byte* p = header.data();
  uint32_t magic = LoadBe32(p + kMagicOffset);
  if (magic != kFrameMagic) {
    return Status::Corruption(fmt::format(
        "frame header has magic {:#010x}, expected {:#010x} (\"BRLY\")", magic,
        kFrameMagic));
  }
  FrameHeader h;
  h.version = LoadBe16(p + kVersionOffset);
  if (h.version != kProtocolVersion) {
    return Status::NotSupported(fmt::format(
        "peer speaks replication protocol version {}; this site speaks "
        "version {}",
        h.version, kProtocolVersion));
  }
  uint16_t type = LoadBe16(p + kTypeOffset);
  if (!IsKnownType(type)) {
    return Status::Corruption(
        fmt::format("frame header has unknown frame type {}", type));
  }
  h.type = static_cast<FrameType>(type);
  h.length = LoadBe32(p + kLengthOffset);
  if (h.length > kMaxFramePayloadBytes) {
    return Status::Corruption(fmt::format(
        "{} frame announces a payload of {} bytes, over the {}-byte limit",
        FrameTypeName(h.type), h.length, kMaxFramePayloadBytes));
  }
  h.flags = LoadBe32(p + kFlagsOffset);
  h.checksum = LoadBe64(p + kChecksumOffset);
  return h;
}

namespace {
Result<Frame> DecodeFrameImpl(const FrameHeader& header,
                              std::span<const std::byte> header_bytes,
                              std::span<const std::byte> payload,
                              bool check_checksum) {
  const char* name = FrameTypeName(header.type);
  if (!IsKnownType(static_cast<uint16_t>(header.type))) {
    return Status::Corruption(fmt::format("unknown frame type {}",
                                          static_cast<uint16_t>(header.type)));
  }
  if (header_bytes.size() != kFrameHeaderBytes) {
    return Status::Corruption(
        fmt::format("{}: frame header is {} bytes, expected {}", name,
                    header_bytes.size(), kFrameHeaderBytes));
  }
  if (payload.size() != header.length) {
    return Status::Corruption(
        fmt::format("{}: payload is {} bytes, the header announces {}", name,
                    payload.size(), header.length));
  }
  uint64_t checksum = check_checksum
                          ? FrameChecksum(header_bytes.first(kChecksumOffset), payload)
                          : header.checksum;
  if (checksum != header.checksum) {
    return Status::Corruption(fmt::format(
        "{}: checksum mismatch (header says {:#018x}, computed {:#018x})", name,
        header.checksum, checksum));
  }
  if (header.type == FrameType::kWriteGroup) {
    if ((header.flags & ~kGroupFlagsKnown) != 0) {
      return Status::Corruption(fmt::format("{}: unknown flags {:#x}", name,
                                            header.flags & ~kGroupFlagsKnown));
    }
  } else if (header.type == FrameType::kHello) {
    if ((header.flags & ~kHelloFlagsKnown) != 0) {
      return Status::Corruption(fmt::format("{}: unknown flags {:#x}", name,
                                            header.flags & ~kHelloFlagsKnown));
    }
  } else if (header.type == FrameType::kHelloReply) {
    if ((header.flags & ~kReplyFlagsKnown) != 0) {
      return Status::Corruption(fmt::format("{}: unknown flags {:#x}", name,
                                            header.flags & ~kReplyFlagsKnown));
    }
  } else if (header.flags != 0) {
    return Status::Corruption(
        fmt::format("{}: flags {:#x} set, but {} defines no flags", name,
                    header.flags, name));
  }

  Reader r(payload, header.type);
  switch (header.type) {
    case FrameType::kHello:
      return DecodeAs<Hello>(r, [&](Reader& reader, Hello& hello) {
        hello.lazy_durability = header.flags & kHelloLazyDurability;
        return DecodeHelloPayload(reader, hello);
      });
    case FrameType::kHelloReply:
      return DecodeAs<HelloReply>(r, [&](Reader& reader, HelloReply& reply) {
        reply.full_resync = header.flags & kReplyFullResync;
        return DecodeHelloReplyPayload(reader, reply);
      });
    case FrameType::kWriteGroup:
      return DecodeAs<WriteGroup>(r, [&](Reader& reader, WriteGroup& group) {
        group.flags = header.flags;
        Status s = DecodeWriteGroupPayload(reader, group);
        if (s.ok()) {
          std::string why = ResyncMarkerProblem(group);
          if (!why.empty()) return Status::Corruption(name + std::string(": ") + why);
        }
        return s;
      });
    case FrameType::kGroupAck:
      return DecodeAs<GroupAck>(r, DecodeGroupAckPayload);
    case FrameType::kPing:
      return DecodeAs<Ping>(r, [](Reader& reader, Ping& ping) {
        reader.U64("nonce", ping.nonce);
        return reader.Finish();
      });
    case FrameType::kPong:
      return DecodeAs<Pong>(r, [](Reader& reader, Pong& pong) {
        reader.U64("nonce", pong.nonce);
        return reader.Finish();
      });
    case FrameType::kError:
      return DecodeAs<ErrorFrame>(r, DecodeErrorPayload);
    case FrameType::kVerify:
      return DecodeAs<VerifyRequest>(r, [](Reader& reader, VerifyRequest& v) {
        uint32_t count = 0;
        reader.U64("link_seq", v.link_seq);
        reader.U64("request_id", v.request_id);
        reader.U32("volume", v.volume);
        reader.U64("offset", v.offset);
        reader.U64("region_size", v.region_size);
        reader.U32("region count", count);
        if (reader.ok() && count > kMaxVerifyRegions) {
          return Status::Corruption(fmt::format(
              "VERIFY: {} regions exceed the limit of {}", count, kMaxVerifyRegions));
        }
        if (reader.ok() && (v.region_size == 0 ||
                            v.offset + uint64_t{count} * v.region_size < v.offset)) {
          return Status::Corruption("VERIFY: region_size 0 or range overflows");
        }
        for (uint32_t i = 0; i < count && reader.ok(); ++i) {
          uint64_t d = 0;
          reader.U64("digest", d);
          v.digests.push_back(d);
        }
        return reader.Finish();
      });
    case FrameType::kVerifyResult:
      return DecodeAs<VerifyResult>(r, [](Reader& reader, VerifyResult& v) {
        uint32_t count = 0;
        reader.U64("request_id", v.request_id);
        reader.U32("mismatch count", count);
        if (reader.ok() && count > kMaxVerifyRegions) {
          return Status::Corruption(fmt::format(
              "VERIFY_RESULT: {} regions exceed the limit of {}", count,
              kMaxVerifyRegions));
        }
        for (uint32_t i = 0; i < count && reader.ok(); ++i) {
          uint32_t index = 0;
          reader.U32("region index", index);
          v.mismatched.push_back(index);
        }
        return reader.Finish();
      });
    case FrameType::kDirtyRanges:
      return DecodeAs<DirtyRanges>(r, DecodeDirtyRangesPayload);
    case FrameType::kGeneration:
      return DecodeAs<GenerationUpdate>(r, [](Reader& reader, GenerationUpdate& g) {
        reader.U64("link_seq", g.link_seq);
        reader.String("generation", g.generation);
        return reader.Finish();
      });
  }
  return Status::Corruption(
      fmt::format("unknown frame type {}", static_cast<uint16_t>(header.type)));
}
}  // namespace

Result<Frame> DecodeFrame(const FrameHeader& header,
                          std::span<const std::byte> header_bytes,
                          std::span<const std::byte> payload) {
  return DecodeFrameImpl(header, header_bytes, payload, /*check_checksum=*/true);
}

Result<Frame> DecodeCheckedFrame(const FrameHeader& header,
                                 std::span<const std::byte> header_bytes,
                                 std::span<const std::byte> payload) {
  return DecodeFrameImpl(header, header_bytes, payload, /*check_checksum=*/false);
}

void EncodeHello(const Hello& hello, Bytes& out) {
  constexpr FrameType kType = FrameType::kHello;
  if (hello.volumes.size() > kMaxVolumesPerGroup) {
    ThrowInvalid(kType, fmt::format("{} volumes exceed the limit of {}",
                                    hello.volumes.size(), kMaxVolumesPerGroup));
  }
  AppendFrame(kType, hello.lazy_durability ? kHelloLazyDurability : 0, out, [&](Bytes& out) {
    AppendString(kType, "site", hello.site, out);
    AppendString(kType, "group", hello.group, out);
    AppendBe64(out, hello.region_size_bytes);
    AppendBe32(out, static_cast<uint32_t>(hello.volumes.size()));
    for (const VolumeInfo& v : hello.volumes) {
      AppendString(kType, "volume name", v.name, out);
      AppendBe64(out, v.size_bytes);
    }
    AppendString(kType, "generation", hello.generation, out);
  });
}

void EncodeHelloReply(const HelloReply& reply, Bytes& out) {
  constexpr FrameType kType = FrameType::kHelloReply;
  uint32_t result = static_cast<uint32_t>(reply.result);
  if (!IsKnownHelloResult(result)) {
    ThrowInvalid(kType, fmt::format("unknown result {}", result));
  }
  AppendFrame(kType, reply.full_resync ? kReplyFullResync : 0, out, [&](Bytes& out) {
    AppendBe32(out, result);
    AppendString(kType, "site", reply.site, out);
    AppendString(kType, "message", reply.message, out);
    AppendString(kType, "generation", reply.generation, out);
    AppendBe64(out, reply.applied_group_seq);
  });
}

// Refuses (throws) what the peer's decoder would refuse; returns the
// payload size.
size_t CheckWriteGroupForEncoding(const WriteGroup& group) {
  constexpr FrameType kType = FrameType::kWriteGroup;
  // Check everything the peer's decoder would refuse before allocating.
  if ((group.flags & ~kGroupFlagsKnown) != 0) {
    ThrowInvalid(kType, fmt::format("unknown flags {:#x}",
                                    group.flags & ~kGroupFlagsKnown));
  }
  if (std::string why = ResyncMarkerProblem(group); !why.empty()) {
    ThrowInvalid(kType, why);
  }
  if (group.ops.size() > kMaxOpsPerGroup) {
    ThrowInvalid(kType, fmt::format("{} ops exceed the limit of {}",
                                    group.ops.size(), kMaxOpsPerGroup));
  }
  for (size_t i = 0; i < group.ops.size(); ++i) {
    const Op& op = group.ops[i];
    if (!IsKnownOpType(static_cast<uint8_t>(op.type))) {
      ThrowInvalid(kType, fmt::format("op {}: unknown type {}", i,
                                      static_cast<uint8_t>(op.type)));
    }
    if (op.length > std::numeric_limits<uint64_t>::max() - op.offset) {
      ThrowInvalid(kType, fmt::format("op {}: offset {} + length {} overflows "
                                      "u64",
                                      i, op.offset, op.length));
    }
    const uint64_t want = op.type == OpType::kWrite ? op.length : 0;
    if (op.data.size() != want) {
      ThrowInvalid(
          kType,
          fmt::format("op {}: {} bytes of data for a {} op "
                      "that needs {}",
                      i, op.data.size(),
                      op.type == OpType::kWrite ? "write" : "trim/zero", want));
    }
  }
  const size_t payload_bytes = WriteGroupPayloadBytes(group);
  if (payload_bytes > kMaxFramePayloadBytes) {
    ThrowInvalid(kType, fmt::format("payload of {} bytes exceeds the {}-byte "
                                    "frame limit; split the writes",
                                    payload_bytes, kMaxFramePayloadBytes));
  }
  return payload_bytes;
}

void EncodeWriteGroup(const WriteGroup& group, Bytes& out) {
  constexpr FrameType kType = FrameType::kWriteGroup;
  const size_t payload_bytes = CheckWriteGroupForEncoding(group);
  out.reserve(out.size() + kFrameHeaderBytes + payload_bytes);
  AppendFrame(kType, group.flags, out, [&](Bytes& out) {
    AppendBe64(out, group.link_seq);
    AppendBe64(out, group.group_seq);
    AppendBe32(out, static_cast<uint32_t>(group.ops.size()));
    for (const Op& op : group.ops) {
      out.push_back(static_cast<std::byte>(op.type));
      AppendBe32(out, op.volume);
      AppendBe64(out, op.offset);
      AppendBe64(out, op.length);
      out.insert(out.end(), op.data.begin(), op.data.end());
    }
  });
}

void EncodeWriteGroupGather(const WriteGroup& group, Bytes& out,
                            std::vector<FramePiece>& pieces) {
  constexpr FrameType kType = FrameType::kWriteGroup;
  const size_t payload_bytes = CheckWriteGroupForEncoding(group);
  const size_t start = out.size();
  const size_t first_piece = pieces.size();
  size_t run_start = start;  // start of the piece of `out` being built
  auto end_run = [&] {
    if (out.size() > run_start) {
      pieces.push_back(FramePiece{run_start, out.size() - run_start, {}});
    }
    run_start = out.size();
  };
  Bytes header;
  header.reserve(kFrameHeaderBytes);
  AppendBe32(header, kFrameMagic);
  AppendBe16(header, kProtocolVersion);
  AppendBe16(header, static_cast<uint16_t>(kType));
  AppendBe32(header, static_cast<uint32_t>(payload_bytes));
  AppendBe32(header, group.flags);
  out.insert(out.end(), header.begin(), header.end());
  AppendBe64(out, 0);  // checksum, patched below
  AppendBe64(out, group.link_seq);
  AppendBe64(out, group.group_seq);
  AppendBe32(out, static_cast<uint32_t>(group.ops.size()));
  for (const Op& op : group.ops) {
    out.push_back(static_cast<std::byte>(op.type));
    AppendBe32(out, op.volume);
    AppendBe64(out, op.offset);
    AppendBe64(out, op.length);
    if (!op.data.empty()) {
      end_run();
      pieces.push_back(FramePiece{0, op.data.size(), op.data});
    }
  }
  end_run();
  // The checksum covers the header before it and the payload, which is
  // scattered over `out` and the data views.
  XXH3_state_t state;
  XXH3_INITSTATE(&state);
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, out.data() + start, kChecksumOffset);
  bool first = true;
  for (size_t i = first_piece; i < pieces.size(); ++i) {
    const FramePiece& p = pieces[i];
    if (p.data.empty()) {
      const size_t skip = first ? kFrameHeaderBytes : 0;
      XXH3_64bits_update(&state, out.data() + p.offset + skip, p.size - skip);
    } else {
      XXH3_64bits_update(&state, p.data.data(), p.data.size());
    }
    first = false;
  }
  std::byte* sum = out.data() + start + kChecksumOffset;
  const uint64_t digest = XXH3_64bits_digest(&state);
  for (int i = 0; i < 8; ++i) {
    sum[i] = static_cast<std::byte>(digest >> (56 - 8 * i));
  }
}

void EncodeGroupAck(const GroupAck& ack, Bytes& out) {
  if (ack.durable_seq > ack.received_seq) {
    ThrowInvalid(FrameType::kGroupAck,
                 fmt::format("durable_seq {} is beyond received_seq {}",
                             ack.durable_seq, ack.received_seq));
  }
  AppendFrame(FrameType::kGroupAck, 0, out, [&](Bytes& out) {
    AppendBe64(out, ack.received_seq);
    AppendBe64(out, ack.durable_seq);
  });
}

void EncodePing(const Ping& ping, Bytes& out) {
  AppendFrame(FrameType::kPing, 0, out,
              [&](Bytes& out) { AppendBe64(out, ping.nonce); });
}

void EncodePong(const Pong& pong, Bytes& out) {
  AppendFrame(FrameType::kPong, 0, out,
              [&](Bytes& out) { AppendBe64(out, pong.nonce); });
}

void EncodeVerifyRequest(const VerifyRequest& v, Bytes& out) {
  if (v.digests.size() > kMaxVerifyRegions || v.region_size == 0) {
    ThrowInvalid(FrameType::kVerify, "bad region count or region_size");
  }
  AppendFrame(FrameType::kVerify, 0, out, [&](Bytes& out) {
    AppendBe64(out, v.link_seq);
    AppendBe64(out, v.request_id);
    AppendBe32(out, v.volume);
    AppendBe64(out, v.offset);
    AppendBe64(out, v.region_size);
    AppendBe32(out, static_cast<uint32_t>(v.digests.size()));
    for (uint64_t d : v.digests) AppendBe64(out, d);
  });
}

void EncodeVerifyResult(const VerifyResult& v, Bytes& out) {
  if (v.mismatched.size() > kMaxVerifyRegions) {
    ThrowInvalid(FrameType::kVerifyResult, "too many regions");
  }
  AppendFrame(FrameType::kVerifyResult, 0, out, [&](Bytes& out) {
    AppendBe64(out, v.request_id);
    AppendBe32(out, static_cast<uint32_t>(v.mismatched.size()));
    for (uint32_t i : v.mismatched) AppendBe32(out, i);
  });
}

void EncodeDirtyRanges(const DirtyRanges& d, Bytes& out) {
  constexpr FrameType kType = FrameType::kDirtyRanges;
  if (d.volumes.size() > kMaxVolumesPerGroup) {
    ThrowInvalid(kType, "too many volumes");
  }
  uint64_t total = 0;
  for (size_t i = 0; i < d.volumes.size(); ++i) {
    const auto& v = d.volumes[i];
    if (i > 0 && v.volume <= d.volumes[i - 1].volume) {
      ThrowInvalid(kType, "volumes must ascend");
    }
    total += v.runs.size();
    for (size_t j = 0; j < v.runs.size(); ++j) {
      const DirtyRun& run = v.runs[j];
      if (run.region_count == 0 ||
          run.first_region + run.region_count < run.first_region) {
        ThrowInvalid(kType, "empty or overflowing run");
      }
      if (j > 0 && run.first_region < v.runs[j - 1].first_region +
                                          v.runs[j - 1].region_count) {
        ThrowInvalid(kType, "runs must ascend and be disjoint");
      }
    }
  }
  if (total > kMaxDirtyRuns) ThrowInvalid(kType, "too many runs");
  AppendFrame(kType, 0, out, [&](Bytes& out) {
    AppendBe32(out, static_cast<uint32_t>(d.volumes.size()));
    for (const auto& v : d.volumes) {
      AppendBe32(out, v.volume);
      AppendBe32(out, static_cast<uint32_t>(v.runs.size()));
      for (const DirtyRun& run : v.runs) {
        AppendBe64(out, run.first_region);
        AppendBe64(out, run.region_count);
      }
    }
  });
}

void EncodeGenerationUpdate(const GenerationUpdate& update, Bytes& out) {
  constexpr FrameType kType = FrameType::kGeneration;
  AppendFrame(kType, 0, out, [&](Bytes& out) {
    AppendBe64(out, update.link_seq);
    AppendString(kType, "generation", update.generation, out);
  });
}

void EncodeError(const ErrorFrame& error, Bytes& out) {
  constexpr FrameType kType = FrameType::kError;
  AppendFrame(kType, 0, out, [&](Bytes& out) {
    AppendBe32(out, error.code);
    AppendString(kType, "message", error.message, out);
  });
}

size_t WriteGroupFrameBytes(const WriteGroup& group) {
  return kFrameHeaderBytes + WriteGroupPayloadBytes(group);
}

Status CheckNextLinkSeq(uint64_t last_link_seq, uint64_t got) {
  if (last_link_seq == std::numeric_limits<uint64_t>::max()) {
    return Status::Corruption(fmt::format(
        "WRITE_GROUP link_seq {} after {}: the sequence is exhausted", got,
        last_link_seq));
  }
  const uint64_t want = last_link_seq + 1;
  if (got == want) return Status::OK();
  const char* why = got == last_link_seq  ? "repeats the last group"
                    : got < last_link_seq ? "goes backwards"
                                          : "skips groups";
  return Status::Corruption(
      fmt::format("WRITE_GROUP link_seq {} after {} {}: expected {}", got,
                  last_link_seq, why, want));
}

const char* FrameTypeName(FrameType type) {
  switch (type) {
    case FrameType::kHello:
      return "HELLO";
    case FrameType::kHelloReply:
      return "HELLO_REPLY";
    case FrameType::kWriteGroup:
      return "WRITE_GROUP";
    case FrameType::kGroupAck:
      return "GROUP_ACK";
    case FrameType::kPing:
      return "PING";
    case FrameType::kPong:
      return "PONG";
    case FrameType::kError:
      return "ERROR";
    case FrameType::kVerify:
      return "VERIFY";
    case FrameType::kVerifyResult:
      return "VERIFY_RESULT";
    case FrameType::kDirtyRanges:
      return "DIRTY_RANGES";
    case FrameType::kGeneration:
      return "GENERATION";
  }
  return "UNKNOWN";
}

const char* HelloResultName(HelloResult result) {
  switch (result) {
    case HelloResult::kAccepted:
      return "ACCEPTED";
    case HelloResult::kWrongSite:
      return "WRONG_SITE";
    case HelloResult::kUnknownGroup:
      return "UNKNOWN_GROUP";
    case HelloResult::kMismatch:
      return "MISMATCH";
    case HelloResult::kNotSecondary:
      return "NOT_SECONDARY";
    case HelloResult::kBusy:
      return "BUSY";
    case HelloResult::kSplitBrain:
      return "SPLIT_BRAIN";
    case HelloResult::kStaleUpstream:
      return "STALE_UPSTREAM";
  }
  return "UNKNOWN";
}

}  // namespace blockrelay::replication
