#include "nbd/handshake.h"

#include <fmt/format.h>

namespace blockrelay::nbd {

uint16_t TransmissionFlags(const ExportInfo& e, bool structured_replies) {
  uint16_t flags = kTxHasFlags | kTxSendFlush | kTxSendFua | kTxSendCache |
                   kTxCanMultiConn;
  if (e.read_only) {
    flags |= kTxReadOnly;
  } else {
    flags |= kTxSendWriteZeroes;
    if (e.can_trim) flags |= kTxSendTrim;
    if (e.can_fast_zero) flags |= kTxSendFastZero;
  }
  if (structured_replies) flags |= kTxSendDf;
  return flags;
}

Result<bool> CheckClientFlags(uint32_t client_flags) {
  constexpr uint32_t kKnown = kClientFlagFixedNewstyle | kClientFlagNoZeroes;
  if (client_flags & ~kKnown) {
    return Status::InvalidArgument(
        fmt::format("client sent unknown handshake flags {:#x}",
                    client_flags & ~kKnown));
  }
  if (!(client_flags & kClientFlagFixedNewstyle)) {
    // We only speak fixed newstyle; a client without it cannot understand
    // option error replies.
    return Status::InvalidArgument(
        "client did not set FIXED_NEWSTYLE; only fixed newstyle is served");
  }
  return (client_flags & kClientFlagNoZeroes) != 0;
}

namespace {

// Appends one option reply (magic, option, type, payload) to `out`.
void AppendOptionReply(Bytes& out, uint32_t option, uint32_t reply_type,
                       std::span<const std::byte> payload = {}) {
  auto reply = EncodeOptionReply(option, reply_type, payload);
  out.insert(out.end(), reply.begin(), reply.end());
}

}  // namespace

Negotiator::Negotiator(const ExportCatalog& catalog, bool no_zeroes)
    : catalog_(catalog), no_zeroes_(no_zeroes) {}

bool Negotiator::base_allocation_selected() const {
  // The selection counts only for the export it was made for.
  return base_allocation_ && selected_ &&
         meta_context_export_ == selected_->name;
}

Negotiator::Outcome Negotiator::Error(uint32_t option, uint32_t type,
                                      std::string message) {
  Outcome out;
  out.reply = EncodeOptionError(option, type, message);
  out.log = fmt::format("option {} refused: {}", OptionName(option), message);
  return out;
}

Negotiator::Outcome Negotiator::UnknownExport(uint32_t option,
                                              const std::string& name) {
  return Error(option, kRepErrUnknown,
               fmt::format("no export named \"{}\"", name));
}

Negotiator::Outcome Negotiator::HandleOversizedOption(uint32_t option,
                                                      uint32_t length) {
  if (option == kOptExportName) {
    Outcome out;
    out.next = Next::kClose;
    out.log = fmt::format("EXPORT_NAME of {} bytes is too long; closing", length);
    return out;
  }
  return Error(option, kRepErrTooBig,
               fmt::format("option data of {} bytes exceeds the limit of {}",
                           length, kMaxOptionBytes));
}

Negotiator::Outcome Negotiator::HandleOption(uint32_t option,
                                             std::span<const std::byte> payload) {
  switch (option) {
    case kOptExportName: {
      std::string name(reinterpret_cast<const char*>(payload.data()),
                       payload.size());
      auto found = catalog_.Find(name);
      Outcome out;
      if (!found) {
        // EXPORT_NAME has no error reply: the spec says to disconnect.
        out.next = Next::kClose;
        out.log = fmt::format("EXPORT_NAME for unknown export \"{}\"; closing",
                              name);
        return out;
      }
      selected_ = *found;
      // Structured replies stay as negotiated; EXPORT_NAME carries flags.
      out.reply = EncodeExportNameReply(found->size_bytes,
                                        transmission_flags(), no_zeroes_);
      out.next = Next::kEnterTransmission;
      return out;
    }
    case kOptAbort: {
      Outcome out;
      out.reply = EncodeOptionReply(option, kRepAck);
      out.next = Next::kClose;
      return out;
    }
    case kOptList: {
      if (!payload.empty()) {
        return Error(option, kRepErrInvalid, "LIST takes no data");
      }
      Outcome out;
      for (const auto& e : catalog_.List()) {
        AppendOptionReply(out.reply, option, kRepServer,
                          EncodeRepServer(e.name, e.description));
      }
      AppendOptionReply(out.reply, option, kRepAck);
      return out;
    }
    case kOptStartTls:
      return Error(option, kRepErrPolicy, "TLS is not configured on this server");
    case kOptInfo:
    case kOptGo:
      return HandleInfoOrGo(option, payload);
    case kOptStructuredReply: {
      if (!payload.empty()) {
        return Error(option, kRepErrInvalid, "STRUCTURED_REPLY takes no data");
      }
      if (structured_replies_) {
        return Error(option, kRepErrInvalid,
                     "structured replies were already negotiated");
      }
      structured_replies_ = true;
      Outcome out;
      out.reply = EncodeOptionReply(option, kRepAck);
      return out;
    }
    case kOptListMetaContext:
    case kOptSetMetaContext:
      return HandleMetaContext(option, payload);
    default:
      return Error(option, kRepErrUnsup,
                   fmt::format("option {} is not supported", option));
  }
}

Negotiator::Outcome Negotiator::HandleInfoOrGo(
    uint32_t option, std::span<const std::byte> payload) {
  auto request = DecodeInfoRequest(payload);
  if (!request.ok()) {
    return Error(option, kRepErrInvalid, request.status().message());
  }
  auto found = catalog_.Find(request->export_name);
  if (!found) return UnknownExport(option, request->export_name);
  Outcome out;
  auto append_info = [&](const Bytes& info) {
    AppendOptionReply(out.reply, option, kRepInfo, info);
  };
  bool sent_name = false, sent_description = false, sent_block_size = false;
  for (uint16_t type : request->info_types) {
    if (type == kInfoName && !sent_name) {
      append_info(EncodeInfoName(found->name));
      sent_name = true;
    } else if (type == kInfoDescription && !sent_description) {
      append_info(EncodeInfoDescription(found->description));
      sent_description = true;
    } else if (type == kInfoBlockSize && !sent_block_size) {
      sent_block_size = true;
    }
    // Unknown info types are ignored, as the spec requires.
  }
  // Block size constraints are sent even when not asked for: they are the
  // defaults the spec assumes anyway, and qemu and nbdkit do the same.
  append_info(EncodeInfoBlockSize(kMinBlockBytes, kPreferredBlockBytes,
                                  kMaxPayloadBytes));
  append_info(EncodeInfoExport(found->size_bytes,
                               TransmissionFlags(*found, structured_replies_)));
  AppendOptionReply(out.reply, option, kRepAck);
  if (option == kOptGo) {
    selected_ = *found;
    out.next = Next::kEnterTransmission;
  }
  return out;
}

Negotiator::Outcome Negotiator::HandleMetaContext(
    uint32_t option, std::span<const std::byte> payload) {
  bool is_set = option == kOptSetMetaContext;
  if (is_set) {
    // SET replaces the selection even when it fails.
    meta_context_export_.reset();
    base_allocation_ = false;
  }
  if (is_set && !structured_replies_) {
    return Error(option, kRepErrInvalid,
                 "SET_META_CONTEXT needs structured replies first");
  }
  auto request = DecodeMetaContextRequest(payload);
  if (!request.ok()) {
    return Error(option, kRepErrInvalid, request.status().message());
  }
  auto found = catalog_.Find(request->export_name);
  if (!found) return UnknownExport(option, request->export_name);
  bool match = false;
  if (request->queries.empty()) {
    // LIST with no queries means "all contexts"; SET with none selects none.
    match = !is_set;
  }
  for (const auto& q : request->queries) {
    if (q == kBaseAllocation || (!is_set && q == "base:")) match = true;
  }
  Outcome out;
  if (match) {
    AppendOptionReply(out.reply, option, kRepMetaContext,
                      EncodeRepMetaContext(is_set ? kBaseAllocationId : 0,
                                           kBaseAllocation));
  }
  if (is_set) {
    meta_context_export_ = found->name;
    base_allocation_ = match;
  }
  AppendOptionReply(out.reply, option, kRepAck);
  return out;
}

}  // namespace blockrelay::nbd
