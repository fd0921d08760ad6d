// ValidateRequest(): the spec's rules for one transmission request, as a pure
// function, so every bad request has a unit test and one error code.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "blockrelay/status.h"
#include "nbd/protocol.h"

namespace blockrelay::nbd {

// Largest READ or WRITE payload served. We advertise 32 MiB (the spec's
// default) but, like nbdkit, accept up to twice that from clients that do
// not ask.
inline constexpr uint32_t kMaxRequestPayloadBytes = 64u << 20;

// What validation needs to know about the connection.
struct TransmissionState {
  uint64_t size_bytes = 0;
  bool read_only = false;
  bool structured_replies = false;
  bool base_allocation = false;  // SET_META_CONTEXT selected it
};

struct Rejection {
  uint32_t error = kEINVAL;  // NBD error value
  std::string reason;        // for the log line and structured error text
};

// nullopt when the request may be carried out.
std::optional<Rejection> ValidateRequest(const Request& r,
                                         const TransmissionState& state);

// The NBD error value for a failed storage call (nbdkit's nbd_errno()).
uint32_t ToNbdError(const Status& s);

}  // namespace blockrelay::nbd
