// NBD wire format: constants, structs and a pure big-endian codec.
//
// Nothing here does I/O: decoders take bytes and return a struct or an error,
// encoders append bytes to a buffer. The handshake and session code use these
// on bytes read from sockets; tests feed them truncated and corrupt input.
// Numbers and layouts follow doc/proto.md of NetworkBlockDevice/nbd
// (see also nbdkit common/protocol/nbd-protocol.h). All fields big-endian.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "blockrelay/status.h"

namespace blockrelay::nbd {

using Bytes = std::vector<std::byte>;

// --- Handshake -------------------------------------------------------------
inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943;  // "NBDMAGIC"
inline constexpr uint64_t kIHaveOpt = 0x49484156454F5054;  // "IHAVEOPT"
inline constexpr uint64_t kOptReplyMagic = 0x3e889045565a9;

// Server handshake flags (u16).
inline constexpr uint16_t kFlagFixedNewstyle = 1 << 0;
inline constexpr uint16_t kFlagNoZeroes = 1 << 1;
// Client flags (u32).
inline constexpr uint32_t kClientFlagFixedNewstyle = 1 << 0;
inline constexpr uint32_t kClientFlagNoZeroes = 1 << 1;

// Options.
inline constexpr uint32_t kOptExportName = 1;
inline constexpr uint32_t kOptAbort = 2;
inline constexpr uint32_t kOptList = 3;
inline constexpr uint32_t kOptStartTls = 5;
inline constexpr uint32_t kOptInfo = 6;
inline constexpr uint32_t kOptGo = 7;
inline constexpr uint32_t kOptStructuredReply = 8;
inline constexpr uint32_t kOptListMetaContext = 9;
inline constexpr uint32_t kOptSetMetaContext = 10;

// Option reply types.
inline constexpr uint32_t kRepAck = 1;
inline constexpr uint32_t kRepServer = 2;
inline constexpr uint32_t kRepInfo = 3;
inline constexpr uint32_t kRepMetaContext = 4;
inline constexpr uint32_t kRepErrBit = 1u << 31;
inline constexpr uint32_t kRepErrUnsup = kRepErrBit | 1;
inline constexpr uint32_t kRepErrPolicy = kRepErrBit | 2;
inline constexpr uint32_t kRepErrInvalid = kRepErrBit | 3;
inline constexpr uint32_t kRepErrPlatform = kRepErrBit | 4;
inline constexpr uint32_t kRepErrTlsReqd = kRepErrBit | 5;
inline constexpr uint32_t kRepErrUnknown = kRepErrBit | 6;
inline constexpr uint32_t kRepErrShutdown = kRepErrBit | 7;
inline constexpr uint32_t kRepErrBlockSizeReqd = kRepErrBit | 8;
inline constexpr uint32_t kRepErrTooBig = kRepErrBit | 9;

// NBD_INFO_* types.
inline constexpr uint16_t kInfoExport = 0;
inline constexpr uint16_t kInfoName = 1;
inline constexpr uint16_t kInfoDescription = 2;
inline constexpr uint16_t kInfoBlockSize = 3;

// Transmission flags (u16).
inline constexpr uint16_t kTxHasFlags = 1 << 0;
inline constexpr uint16_t kTxReadOnly = 1 << 1;
inline constexpr uint16_t kTxSendFlush = 1 << 2;
inline constexpr uint16_t kTxSendFua = 1 << 3;
inline constexpr uint16_t kTxRotational = 1 << 4;
inline constexpr uint16_t kTxSendTrim = 1 << 5;
inline constexpr uint16_t kTxSendWriteZeroes = 1 << 6;
inline constexpr uint16_t kTxSendDf = 1 << 7;
inline constexpr uint16_t kTxCanMultiConn = 1 << 8;
inline constexpr uint16_t kTxSendCache = 1 << 10;
inline constexpr uint16_t kTxSendFastZero = 1 << 11;

// Strings in the handshake: the spec caps them at 4096 bytes.
inline constexpr uint32_t kMaxStringBytes = 4096;
// Largest option payload we read; larger ones are refused (ERR_TOO_BIG) and
// skipped so a hostile client cannot make us allocate without bound.
inline constexpr uint32_t kMaxOptionBytes = 64 * 1024;

// --- Transmission ------------------------------------------------------------
inline constexpr uint32_t kRequestMagic = 0x25609513;
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698;
inline constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;
inline constexpr size_t kRequestHeaderBytes = 28;
inline constexpr size_t kSimpleReplyBytes = 16;
inline constexpr size_t kStructuredHeaderBytes = 20;

enum class Command : uint16_t {
  kRead = 0,
  kWrite = 1,
  kDisc = 2,
  kFlush = 3,
  kTrim = 4,
  kCache = 5,
  kWriteZeroes = 6,
  kBlockStatus = 7,
};

// Command flags (u16).
inline constexpr uint16_t kCmdFlagFua = 1 << 0;
inline constexpr uint16_t kCmdFlagNoHole = 1 << 1;
inline constexpr uint16_t kCmdFlagDf = 1 << 2;
inline constexpr uint16_t kCmdFlagReqOne = 1 << 3;
inline constexpr uint16_t kCmdFlagFastZero = 1 << 4;

// Structured reply chunk types and flags.
inline constexpr uint16_t kReplyFlagDone = 1 << 0;
inline constexpr uint16_t kReplyTypeNone = 0;
inline constexpr uint16_t kReplyTypeOffsetData = 1;
inline constexpr uint16_t kReplyTypeOffsetHole = 2;
inline constexpr uint16_t kReplyTypeBlockStatus = 5;
inline constexpr uint16_t kReplyTypeError = 0x8001;
inline constexpr uint16_t kReplyTypeErrorOffset = 0x8002;

// Error values on the wire.
inline constexpr uint32_t kEPERM = 1;
inline constexpr uint32_t kEIO = 5;
inline constexpr uint32_t kENOMEM = 12;
inline constexpr uint32_t kEINVAL = 22;
inline constexpr uint32_t kENOSPC = 28;
inline constexpr uint32_t kEOVERFLOW = 75;
inline constexpr uint32_t kENOTSUP = 95;
inline constexpr uint32_t kESHUTDOWN = 108;

// base:allocation flags.
inline constexpr uint32_t kStateHole = 1 << 0;
inline constexpr uint32_t kStateZero = 1 << 1;
inline constexpr std::string_view kBaseAllocation = "base:allocation";
// The context id we hand out for base:allocation.
inline constexpr uint32_t kBaseAllocationId = 1;

// Size constraints we advertise with NBD_INFO_BLOCK_SIZE.
inline constexpr uint32_t kMinBlockBytes = 1;
inline constexpr uint32_t kPreferredBlockBytes = 4096;
inline constexpr uint32_t kMaxPayloadBytes = 32 * 1024 * 1024;

// --- Byte order helpers ---------------------------------------------------
uint16_t LoadBe16(const std::byte* p);
uint32_t LoadBe32(const std::byte* p);
uint64_t LoadBe64(const std::byte* p);
void AppendBe16(Bytes& out, uint16_t v);
void AppendBe32(Bytes& out, uint32_t v);
void AppendBe64(Bytes& out, uint64_t v);
void AppendBytes(Bytes& out, std::string_view s);

// --- Handshake messages ---------------------------------------------------
// Server greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags.
Bytes EncodeGreeting(uint16_t handshake_flags);

// One option header from the client: IHAVEOPT, u32 option, u32 length.
struct OptionHeader {
  uint32_t option = 0;
  uint32_t length = 0;
};
inline constexpr size_t kOptionHeaderBytes = 16;
Result<OptionHeader> DecodeOptionHeader(std::span<const std::byte> bytes);

// Option reply: magic, u32 option, u32 reply type, u32 length, payload.
Bytes EncodeOptionReply(uint32_t option, uint32_t reply_type,
                        std::span<const std::byte> payload = {});
Bytes EncodeOptionError(uint32_t option, uint32_t error_type,
                        std::string_view message);

// Payload of NBD_OPT_INFO / NBD_OPT_GO: u32 namelen, name, u16 n, n x u16.
struct InfoRequest {
  std::string export_name;
  std::vector<uint16_t> info_types;
};
Result<InfoRequest> DecodeInfoRequest(std::span<const std::byte> payload);

// Payload of LIST/SET_META_CONTEXT: u32 namelen, name, u32 n, {u32 len, query}.
struct MetaContextRequest {
  std::string export_name;
  std::vector<std::string> queries;
};
Result<MetaContextRequest> DecodeMetaContextRequest(
    std::span<const std::byte> payload);

// NBD_REP_INFO payloads.
Bytes EncodeInfoExport(uint64_t size_bytes, uint16_t transmission_flags);
Bytes EncodeInfoName(std::string_view name);
Bytes EncodeInfoDescription(std::string_view description);
Bytes EncodeInfoBlockSize(uint32_t min_bytes, uint32_t preferred_bytes,
                          uint32_t max_bytes);
// NBD_REP_SERVER payload: u32 namelen, name, description.
Bytes EncodeRepServer(std::string_view name, std::string_view description);
// NBD_REP_META_CONTEXT payload: u32 id, name.
Bytes EncodeRepMetaContext(uint32_t context_id, std::string_view name);
// Reply to NBD_OPT_EXPORT_NAME: u64 size, u16 flags, 124 zeroes unless
// the client set NO_ZEROES.
Bytes EncodeExportNameReply(uint64_t size_bytes, uint16_t transmission_flags,
                            bool no_zeroes);

// --- Transmission messages ------------------------------------------------
struct Request {
  uint16_t flags = 0;
  uint16_t type = 0;  // raw, may be an unknown command
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};
// Fails (Corruption) on bad magic: the stream cannot be resynchronised and
// the caller must drop the connection.
Result<Request> DecodeRequest(std::span<const std::byte> header);
Bytes EncodeRequest(const Request& r);  // for tests and tools

// Simple reply header: magic, u32 error, u64 cookie.
void AppendSimpleReply(Bytes& out, uint32_t error, uint64_t cookie);
// Structured chunk header: magic, u16 flags, u16 type, u64 cookie, u32 length.
void AppendStructuredHeader(Bytes& out, uint16_t flags, uint16_t type,
                            uint64_t cookie, uint32_t length);
// A complete NBD_REPLY_TYPE_ERROR chunk with DONE.
void AppendStructuredError(Bytes& out, uint64_t cookie, uint32_t error,
                           std::string_view message);
// A complete NBD_REPLY_TYPE_NONE chunk with DONE.
void AppendStructuredDone(Bytes& out, uint64_t cookie);
// NBD_REPLY_TYPE_BLOCK_STATUS chunk with DONE: context id then
// {u32 length, u32 flags} per extent.
struct StatusExtent {
  uint32_t length_bytes;
  uint32_t flags;
};
void AppendBlockStatusChunk(Bytes& out, uint64_t cookie, uint32_t context_id,
                            std::span<const StatusExtent> extents);

std::string_view CommandName(uint16_t type);
std::string_view OptionName(uint32_t option);

}  // namespace blockrelay::nbd
