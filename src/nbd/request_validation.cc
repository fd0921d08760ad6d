#include "nbd/request_validation.h"

#include <fmt/format.h>

namespace blockrelay::nbd {
namespace {

// Flags each command accepts. FUA is accepted everywhere: the spec says it is
// valid on any command once negotiated, and it costs nothing on reads.
uint16_t AllowedFlags(Command c, bool structured) {
  uint16_t allowed = kCmdFlagFua;
  switch (c) {
    case Command::kRead:
      if (structured) allowed |= kCmdFlagDf;
      break;
    case Command::kWriteZeroes:
      allowed |= kCmdFlagNoHole | kCmdFlagFastZero;
      break;
    case Command::kBlockStatus:
      allowed |= kCmdFlagReqOne;
      break;
    default:
      break;
  }
  return allowed;
}

bool IsKnownCommand(uint16_t type) {
  return type <= static_cast<uint16_t>(Command::kBlockStatus);
}

}  // namespace

std::optional<Rejection> ValidateRequest(const Request& r,
                                         const TransmissionState& state) {
  if (!IsKnownCommand(r.type)) {
    return Rejection{kEINVAL, fmt::format("unknown command {}", r.type)};
  }
  auto command = static_cast<Command>(r.type);
  auto name = CommandName(r.type);
  uint16_t bad_flags = r.flags & ~AllowedFlags(command, state.structured_replies);
  if (bad_flags) {
    return Rejection{kEINVAL, fmt::format("flags {:#x} are not valid on {}",
                                          bad_flags, name)};
  }
  if (command == Command::kDisc) return std::nullopt;
  if (command == Command::kFlush) return std::nullopt;  // offset/length ignored

  bool writes = command == Command::kWrite || command == Command::kTrim ||
                command == Command::kWriteZeroes;
  if (writes && state.read_only) {
    return Rejection{kEPERM, fmt::format("{} on a read-only export", name)};
  }
  if (command == Command::kBlockStatus) {
    if (!state.structured_replies || !state.base_allocation) {
      return Rejection{kEINVAL,
                       "BLOCK_STATUS without a negotiated meta context"};
    }
    if (r.length == 0) {
      return Rejection{kEINVAL, "BLOCK_STATUS of length 0"};
    }
  }
  if ((command == Command::kRead || command == Command::kWrite) &&
      r.length > kMaxRequestPayloadBytes) {
    return Rejection{command == Command::kRead ? kEOVERFLOW : kEINVAL,
                     fmt::format("{} of {} bytes exceeds the limit of {}", name,
                                 r.length, kMaxRequestPayloadBytes)};
  }
  uint64_t end = r.offset + r.length;
  if (end < r.offset) {
    return Rejection{kEINVAL, fmt::format("{} at {}+{} wraps past 2^64", name,
                                          r.offset, r.length)};
  }
  if (end > state.size_bytes || r.offset > state.size_bytes) {
    // Writes past the end are "no space", everything else "invalid".
    bool grows = command == Command::kWrite || command == Command::kWriteZeroes;
    return Rejection{grows ? kENOSPC : kEINVAL,
                     fmt::format("{} at {}+{} is past the end of the {}-byte "
                                 "export",
                                 name, r.offset, r.length, state.size_bytes)};
  }
  return std::nullopt;
}

uint32_t ToNbdError(const Status& s) {
  switch (s.code()) {
    case Status::Code::kOk:
      return 0;
    case Status::Code::kNoSpace:
      return kENOSPC;
    case Status::Code::kPermissionDenied:
      return kEPERM;
    case Status::Code::kInvalidArgument:
      return kEINVAL;
    case Status::Code::kNotSupported:
      return kENOTSUP;
    case Status::Code::kAborted:
      return kESHUTDOWN;
    default:
      return kEIO;
  }
}

}  // namespace blockrelay::nbd
