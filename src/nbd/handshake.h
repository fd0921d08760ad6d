// Negotiator: the fixed-newstyle option haggling of one NBD connection, as a
// pure state machine.
//
// The session reads an option header and its payload from the socket, hands
// them to HandleOption(), writes the returned bytes and then continues,
// enters transmission or closes, as the Outcome says. No I/O happens here, so
// every option can be unit-tested byte for byte.
//
// Thread safety: one Negotiator per connection, used from one coroutine.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "nbd/protocol.h"

namespace blockrelay::nbd {

// What the handshake needs to know about one export.
struct ExportInfo {
  std::string name;
  std::string description;
  uint64_t size_bytes = 0;
  bool read_only = false;
  bool can_trim = true;
  bool can_fast_zero = true;
};

// The set of exports a server offers; the server implements it over its
// volumes, tests over a vector.
class ExportCatalog {
 public:
  virtual ~ExportCatalog() = default;
  // The export called `name`; "" names the default export (the first one).
  virtual std::optional<ExportInfo> Find(const std::string& name) const = 0;
  virtual std::vector<ExportInfo> List() const = 0;
};

// Transmission flags for an export, given whether structured replies were
// negotiated (SEND_DF needs them).
uint16_t TransmissionFlags(const ExportInfo& e, bool structured_replies);

// Checks the client's u32 flags; returns whether NO_ZEROES was asked.
// An unknown flag is an error: the spec says the server MUST drop the
// connection.
Result<bool> CheckClientFlags(uint32_t client_flags);

class Negotiator {
 public:
  enum class Next {
    kContinue,            // read the next option
    kEnterTransmission,   // GO or EXPORT_NAME succeeded
    kClose,               // ABORT, or an error that ends the connection
  };
  struct Outcome {
    Bytes reply;         // bytes to send (may be empty for a hard close)
    Next next = Next::kContinue;
    std::string log;     // non-empty: worth a log line (client error)
  };

  Negotiator(const ExportCatalog& catalog, bool no_zeroes);

  // Handles one option whose payload was read in full.
  Outcome HandleOption(uint32_t option, std::span<const std::byte> payload);
  // For an option whose announced length exceeds kMaxOptionBytes: the session
  // skips the payload and sends this instead (EXPORT_NAME cannot be refused,
  // so it closes).
  Outcome HandleOversizedOption(uint32_t option, uint32_t length);

  // Valid once HandleOption returned kEnterTransmission.
  const ExportInfo& selected_export() const { return *selected_; }
  bool structured_replies() const { return structured_replies_; }
  // Whether base:allocation was selected by SET_META_CONTEXT for the export.
  bool base_allocation_selected() const;
  uint16_t transmission_flags() const {
    return TransmissionFlags(*selected_, structured_replies_);
  }

 private:
  Outcome HandleInfoOrGo(uint32_t option, std::span<const std::byte> payload);
  Outcome HandleMetaContext(uint32_t option, std::span<const std::byte> payload);
  Outcome Error(uint32_t option, uint32_t type, std::string message);
  Outcome UnknownExport(uint32_t option, const std::string& name);

  const ExportCatalog& catalog_;
  bool no_zeroes_;
  bool structured_replies_ = false;
  // SET_META_CONTEXT result: which export it was for and whether
  // base:allocation was selected.
  std::optional<std::string> meta_context_export_;
  bool base_allocation_ = false;
  std::optional<ExportInfo> selected_;
};

}  // namespace blockrelay::nbd
