// Site-to-site replication protocol: frames and a pure big-endian codec.
//
// Nothing here does I/O. Encoders append whole frames to a buffer; decoders
// take the bytes of one frame and return a struct or an error naming what was
// wrong. Links and the receiver read a fixed header, then the payload it
// announces, and hand both to DecodeFrame().
//
// Frame = 24-byte header + payload, all integers big-endian:
//   u32 magic "BRLY" | u16 version | u16 type | u32 payload length
//   | u32 flags (per type) | u64 checksum
// The checksum is XXH3-64 over the first 16 header bytes followed by the
// payload, so a flipped bit anywhere (type, length, flags or data) is caught.
// Strings are u16 length + UTF-8 bytes (at most kMaxStringBytes).
//
// Conversation (docs/replication.md): the upstream connects and sends HELLO;
// the downstream answers HELLO_REPLY (accept, or refuse with a reason and
// close). Then the upstream sends WRITE_GROUP frames, numbered 1, 2, 3... per
// connection (link_seq), and the downstream answers GROUP_ACK with how far it
// has received and how far that is durable. PING/PONG keep an idle link
// alive. Either side may send ERROR before it closes on a protocol error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "blockrelay/status.h"

namespace blockrelay::replication {

using Bytes = std::vector<std::byte>;

inline constexpr uint32_t kFrameMagic = 0x42524C59;  // "BRLY"
inline constexpr uint16_t kProtocolVersion = 1;
inline constexpr size_t kFrameHeaderBytes = 24;
inline constexpr size_t kMaxStringBytes = 1024;
inline constexpr uint32_t kMaxVolumesPerGroup = 256;
// Write data per frame is bounded so a lying peer cannot make us allocate
// without limit; a larger write is split across ops and groups by the sender.
inline constexpr uint32_t kMaxFramePayloadBytes = (64u << 20) + (1u << 20);
inline constexpr uint32_t kMaxOpsPerGroup = 1u << 20;

enum class FrameType : uint16_t {
  kHello = 1,
  kHelloReply = 2,
  kWriteGroup = 3,
  kGroupAck = 4,
  kPing = 5,
  kPong = 6,
  kError = 7,
  kVerify = 8,
  kVerifyResult = 9,
  kDirtyRanges = 10,
  kGeneration = 11,
};

struct VolumeInfo {
  std::string name;
  uint64_t size_bytes = 0;
  bool operator==(const VolumeInfo&) const = default;
};

// Upstream -> downstream, first frame of a connection.
struct Hello {
  std::string site;   // the sending (upstream) site
  std::string group;  // consistency group name
  uint64_t region_size_bytes = 0;
  std::vector<VolumeInfo> volumes;  // in config order; ops refer to the index
  std::string generation;  // upstream's current generation id (issue 5)
  // Header flag kHelloLazyDurability: an async link without max_lag and
  // with a memory queue, so nothing upstream waits for the downstream's
  // durability; it may sync its journal lazily.
  bool lazy_durability = false;
  bool operator==(const Hello&) const = default;
};

// HELLO header flags.
inline constexpr uint32_t kHelloLazyDurability = 1u << 0;
inline constexpr uint32_t kHelloFlagsKnown = kHelloLazyDurability;

enum class HelloResult : uint32_t {
  kAccepted = 0,
  kWrongSite = 1,      // not the configured upstream of that group
  kUnknownGroup = 2,
  kMismatch = 3,       // volumes, sizes or region size differ
  kNotSecondary = 4,   // the group here is primary
  kBusy = 5,           // another upstream connection is active
  kSplitBrain = 6,     // both sides wrote independently (generations)
  kStaleUpstream = 7,  // the upstream's generation is older than ours
};

// Downstream -> upstream.
struct HelloReply {
  HelloResult result = HelloResult::kAccepted;
  std::string site;     // the answering (downstream) site
  std::string message;  // why refused; empty when accepted
  std::string generation;
  // Highest group_seq the downstream has applied durably (0 if none).
  uint64_t applied_group_seq = 0;
  // Header flag kReplyFullResync: the downstream was rolled back to the
  // state before an unfinished resync (undo record), so regions the
  // upstream's scoreboard counts as in sync may differ: the upstream must
  // mark every region dirty before it streams.
  bool full_resync = false;
  bool operator==(const HelloReply&) const = default;
};

// HELLO_REPLY header flags.
inline constexpr uint32_t kReplyFullResync = 1u << 0;
inline constexpr uint32_t kReplyFlagsKnown = kReplyFullResync;

enum class OpType : uint8_t { kWrite = 1, kTrim = 2, kZero = 3 };

// One operation of a group. For kWrite, `data` has exactly `length` bytes
// (a view into the frame buffer after decoding; a view into the sender's
// buffers when encoding). For kTrim and kZero `data` is empty.
struct Op {
  OpType type = OpType::kWrite;
  uint32_t volume = 0;  // index into Hello::volumes
  uint64_t offset = 0;
  uint64_t length = 0;
  std::span<const std::byte> data;
};

// Group flags.
inline constexpr uint32_t kGroupDurable = 1u << 0;  // closed by FLUSH/FUA: ack durable promptly
inline constexpr uint32_t kGroupResync = 1u << 1;   // bitmap resync data, not write-ordered
// Resync markers (docs/replication.md, "Consistent downstream during
// resync"): WRITE_GROUPs without ops, group_seq 0, always with kGroupResync
// and never both at once.
//   BEGIN: sent first on a connection that will resync. From here on the
//     downstream is not at a group boundary of the primary (the writes
//     that follow lack the ones only the scoreboard holds) until an END.
//   END: once the downstream has applied every frame before this one, its
//     volumes are at a group boundary of the primary again. Sent after the
//     resync pass has sent every dirty region (behind the group that was
//     open then), and first on a connection that needs no resync.
// A downstream that predates them refuses them as unknown flags (the link
// shows that error); nothing else changed on the wire.
inline constexpr uint32_t kGroupResyncBegin = 1u << 2;
inline constexpr uint32_t kGroupResyncEnd = 1u << 3;
inline constexpr uint32_t kGroupFlagsKnown =
    kGroupDurable | kGroupResync | kGroupResyncBegin | kGroupResyncEnd;

struct WriteGroup {
  uint64_t link_seq = 0;   // 1, 2, 3... per connection, no gaps
  uint64_t group_seq = 0;  // consistency group sequence (0 for resync data)
  uint32_t flags = 0;
  std::vector<Op> ops;
};

// Downstream -> upstream: every group with link_seq <= received_seq is
// written to the downstream's journal; <= durable_seq is also synced.
struct GroupAck {
  uint64_t received_seq = 0;
  uint64_t durable_seq = 0;
  bool operator==(const GroupAck&) const = default;
};

struct Ping {
  uint64_t nonce = 0;
  bool operator==(const Ping&) const = default;
};
struct Pong {
  uint64_t nonce = 0;
  bool operator==(const Pong&) const = default;
};

struct ErrorFrame {
  uint32_t code = 0;  // a HelloResult value or 100+ for protocol errors
  std::string message;
  bool operator==(const ErrorFrame&) const = default;
};

// Upstream -> downstream, in sequence with the write groups (it takes a
// link_seq), so the downstream answers after applying every earlier group:
// the digests compare the same point of the write history. Regions are
// [offset + i*region_size, +region_size), the last one cut at the end of the
// volume. Digest = XXH3-64 of the region's bytes.
inline constexpr uint32_t kMaxVerifyRegions = 4096;
struct VerifyRequest {
  uint64_t link_seq = 0;
  uint64_t request_id = 0;
  uint32_t volume = 0;
  uint64_t offset = 0;
  uint64_t region_size = 0;
  std::vector<uint64_t> digests;
  bool operator==(const VerifyRequest&) const = default;
};

// Downstream -> upstream: the indexes of the regions whose digest differs.
struct VerifyResult {
  uint64_t request_id = 0;
  std::vector<uint32_t> mismatched;
  bool operator==(const VerifyResult&) const = default;
};

// Downstream -> upstream, right after an accepted HELLO_REPLY: the regions
// the downstream may hold that the upstream lacks (the downstream's
// scoreboard slot for the upstream site, e.g. an old primary's writes that
// never reached the new primary). The upstream marks them dirty in its slot
// for the downstream, durably, before it sends anything, so the resync
// covers the union of both sides' dirty sets. Runs are in region units of
// the group's region_size, ascending and disjoint per volume; volumes
// ascending. A volume without runs is clean.
inline constexpr uint32_t kMaxDirtyRuns = 1u << 20;  // per frame, all volumes
struct DirtyRun {
  uint64_t first_region = 0;
  uint64_t region_count = 0;  // >= 1
  bool operator==(const DirtyRun&) const = default;
};
struct VolumeDirtyRuns {
  uint32_t volume = 0;  // index into Hello::volumes
  std::vector<DirtyRun> runs;
  bool operator==(const VolumeDirtyRuns&) const = default;
};
struct DirtyRanges {
  std::vector<VolumeDirtyRuns> volumes;
  bool operator==(const DirtyRanges&) const = default;
};

// Upstream -> downstream, in sequence with the write groups (it takes a
// link_seq): the upstream started a new generation (generations.h) while
// this downstream stayed connected, e.g. because another downstream link
// went down. The downstream applies every earlier group, adopts the
// generations (same text as HELLO's `generation`), and acknowledges the
// frame as durable. Without it a connected downstream would have to
// reconnect (and resync) to learn the new generation at HELLO.
struct GenerationUpdate {
  uint64_t link_seq = 0;
  std::string generation;
  bool operator==(const GenerationUpdate&) const = default;
};

struct FrameHeader {
  uint16_t version = 0;
  FrameType type = FrameType::kPing;
  uint32_t length = 0;  // payload bytes
  uint32_t flags = 0;
  uint64_t checksum = 0;
};

using Frame = std::variant<Hello, HelloReply, WriteGroup, GroupAck, Ping,
                           Pong, ErrorFrame, VerifyRequest, VerifyResult,
                           DirtyRanges, GenerationUpdate>;

// Checks magic, version (a peer with another version gets a message naming
// both versions), a known type and length <= kMaxFramePayloadBytes.
// Errors: Corruption (bad magic, unknown type, oversized), NotSupported
// (version).
Result<FrameHeader> DecodeFrameHeader(std::span<const std::byte> header);

// Verifies the checksum and decodes the payload of a frame whose header
// DecodeFrameHeader() accepted. `payload` must stay alive while a decoded
// WriteGroup's op data is used (ops point into it). Errors (Corruption) name
// the frame type and the field: checksum mismatch, truncated payload,
// trailing bytes, string too long, unknown op type or group flags, a write
// whose data is missing, more than kMaxOpsPerGroup ops or
// kMaxVolumesPerGroup volumes, offset + length overflowing, flags on a frame
// type other than WRITE_GROUP, an unknown HELLO_REPLY result, GROUP_ACK
// durable_seq > received_seq, DIRTY_RANGES with more than kMaxDirtyRuns
// runs, an empty run, runs or volumes out of order or overlapping, a run
// whose end overflows. Also Corruption: `header_bytes` not
// kFrameHeaderBytes long, or `payload` not header.length long.
Result<Frame> DecodeFrame(const FrameHeader& header,
                          std::span<const std::byte> header_bytes,
                          std::span<const std::byte> payload);

// As DecodeFrame() without the checksum pass, for the bytes of a frame that
// DecodeFrame() already accepted in this process (a received frame kept in
// memory until it is applied, a journal frame GroupJournal::Open() read
// back): a second pass over every byte on the receive path is a memory-bound
// cost per replicated byte that finds nothing new.
Result<Frame> DecodeCheckedFrame(const FrameHeader& header,
                                 std::span<const std::byte> header_bytes,
                                 std::span<const std::byte> payload);

// Encoders append header + payload. Programmer errors (a string longer than
// kMaxStringBytes, a write op whose data size differs from length, and
// anything else the peer's decoder would refuse: a trim/zero op with data,
// unknown op types, group flags or result, too many ops or volumes, offset +
// length overflowing, durable_seq > received_seq, a payload over
// kMaxFramePayloadBytes) throw std::invalid_argument and leave `out` as it
// was.
void EncodeHello(const Hello& hello, Bytes& out);
void EncodeHelloReply(const HelloReply& reply, Bytes& out);
void EncodeWriteGroup(const WriteGroup& group, Bytes& out);
void EncodeGroupAck(const GroupAck& ack, Bytes& out);
void EncodePing(const Ping& ping, Bytes& out);
void EncodePong(const Pong& pong, Bytes& out);
void EncodeError(const ErrorFrame& error, Bytes& out);
void EncodeVerifyRequest(const VerifyRequest& request, Bytes& out);
void EncodeVerifyResult(const VerifyResult& result, Bytes& out);
void EncodeDirtyRanges(const DirtyRanges& ranges, Bytes& out);
void EncodeGenerationUpdate(const GenerationUpdate& update, Bytes& out);

// One piece of a frame encoded for a gathering write: either `size` bytes at
// `offset` of the encoder's `out` buffer (an offset, because `out` may move
// while more frames are appended) or a view of caller-owned write data.
struct FramePiece {
  size_t offset = 0;
  size_t size = 0;
  std::span<const std::byte> data;  // empty: the piece lies in `out`
};

// As EncodeWriteGroup(), but the write data is not copied: `out` receives the
// header and the op records, and `pieces` (appended to, in wire order) says
// how those interleave with the ops' data. Sending every piece in order
// sends exactly EncodeWriteGroup()'s bytes. The data must stay alive and
// unchanged until it is sent. Same programmer errors as EncodeWriteGroup().
void EncodeWriteGroupGather(const WriteGroup& group, Bytes& out,
                            std::vector<FramePiece>& pieces);

// Encoded size of a WriteGroup frame, header included, without encoding it.
size_t WriteGroupFrameBytes(const WriteGroup& group);

// Frame sequence rule for the receiver: the next WriteGroup must carry
// link_seq == last + 1. Corruption naming both numbers otherwise.
Status CheckNextLinkSeq(uint64_t last_link_seq, uint64_t got);

const char* FrameTypeName(FrameType type);
const char* HelloResultName(HelloResult result);

}  // namespace blockrelay::replication
