// Scalar parsers for the site configuration: sizes, durations, rates and
// endpoints, plus their canonical spellings. Pure functions on strings.
#include <arpa/inet.h>

#include <cctype>
#include <charconv>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "blockrelay/config/site_config.h"
#include "config/internal.h"

namespace blockrelay::config {

std::string QuoteForMessage(std::string_view text) {
  // Long values are cut so one bad field cannot flood the log.
  constexpr size_t kMaxShown = 80;
  std::string shown(text.substr(0, kMaxShown));
  // The replace handler keeps invalid UTF-8 from throwing out of dump().
  std::string quoted = nlohmann::json(shown).dump(
      -1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (text.size() > kMaxShown) quoted += "...";
  return quoted;
}

namespace {

constexpr std::string_view kSizeExpected =
    "expected a size like \"1GiB\" or a whole number of bytes";
constexpr std::string_view kDurationExpected =
    "expected a duration like \"10ms\", \"30s\", \"5min\", \"1h\" or a whole "
    "number of milliseconds";
constexpr std::string_view kRateExpected =
    "expected a rate like \"100MiB/s\" or a whole number of bytes per second";
constexpr std::string_view kEndpointExpected =
    "expected \"host:port\" like \"127.0.0.1:7800\" or \"[::1]:7800\"";

Status Refuse(std::string_view expected, std::string_view text,
              std::string_view reason) {
  std::string msg =
      fmt::format("{}, got {}", expected, QuoteForMessage(text));
  if (!reason.empty()) msg += fmt::format(" ({})", reason);
  return Status::InvalidArgument(std::move(msg));
}

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  return out;
}

bool HasSpace(std::string_view s) {
  for (char c : s) {
    if (std::isspace(static_cast<unsigned char>(c))) return true;
  }
  return false;
}

// Splits "<digits><unit>" and parses the digits. On failure sets `reason`
// (possibly empty) and returns false.
bool SplitNumber(std::string_view text, uint64_t* number,
                 std::string_view* unit, std::string* reason) {
  if (text.empty()) {
    *reason = "empty";
    return false;
  }
  if (HasSpace(text)) {
    *reason = "no spaces allowed";
    return false;
  }
  if (text.front() == '-') {
    *reason = "must not be negative";
    return false;
  }
  size_t digits = 0;
  while (digits < text.size() &&
         std::isdigit(static_cast<unsigned char>(text[digits]))) {
    ++digits;
  }
  if (digits == 0) {
    *reason = "";
    return false;
  }
  auto [end, ec] = std::from_chars(text.data(), text.data() + digits, *number);
  if (ec == std::errc::result_out_of_range) {
    *reason = "too large";
    return false;
  }
  if (ec != std::errc() || end != text.data() + digits) {
    *reason = "";
    return false;
  }
  *unit = text.substr(digits);
  if (!unit->empty() && (unit->front() == '.' || unit->front() == ',')) {
    *reason = "fractions are not allowed; use a smaller unit";
    return false;
  }
  return true;
}

// Shift for a binary size unit, or -1.
int SizeUnitShift(std::string_view unit) {
  const std::string u = Lower(unit);
  if (u.empty() || u == "b") return 0;
  if (u == "k" || u == "kib") return 10;
  if (u == "m" || u == "mib") return 20;
  if (u == "g" || u == "gib") return 30;
  if (u == "t" || u == "tib") return 40;
  return -1;
}

bool IsDecimalUnit(std::string_view unit) {
  const std::string u = Lower(unit);
  return u == "kb" || u == "mb" || u == "gb" || u == "tb";
}

// ParseSize() without the message wrapping, so ParseRate() can reuse it.
bool ParseSizeImpl(std::string_view text, uint64_t* bytes,
                   std::string* reason) {
  uint64_t number = 0;
  std::string_view unit;
  if (!SplitNumber(text, &number, &unit, reason)) return false;
  const int shift = SizeUnitShift(unit);
  if (shift < 0) {
    *reason = IsDecimalUnit(unit)
                  ? "decimal units are ambiguous; write KiB, MiB, GiB or TiB"
                  : "units are B, KiB, MiB, GiB, TiB";
    return false;
  }
  if (number > (std::numeric_limits<uint64_t>::max() >> shift)) {
    *reason = "too large";
    return false;
  }
  *bytes = number << shift;
  return true;
}

}  // namespace

Result<uint64_t> ParseSize(std::string_view text) {
  uint64_t bytes = 0;
  std::string reason;
  if (!ParseSizeImpl(text, &bytes, &reason)) {
    return Refuse(kSizeExpected, text, reason);
  }
  return bytes;
}

Result<uint32_t> ParseDurationMs(std::string_view text) {
  uint64_t number = 0;
  std::string_view unit;
  std::string reason;
  if (!SplitNumber(text, &number, &unit, &reason)) {
    return Refuse(kDurationExpected, text, reason);
  }
  const std::string u = Lower(unit);
  uint64_t scale = 0;
  if (u.empty() || u == "ms") {
    scale = 1;
  } else if (u == "s") {
    scale = 1000;
  } else if (u == "m" || u == "min") {
    scale = 60 * 1000;
  } else if (u == "h") {
    scale = 60 * 60 * 1000;
  } else {
    return Refuse(kDurationExpected, text, "units are ms, s, min, h");
  }
  constexpr uint64_t kMax = std::numeric_limits<uint32_t>::max();
  if (number > kMax / scale) {
    return Refuse(kDurationExpected, text, "longer than 49 days");
  }
  return static_cast<uint32_t>(number * scale);
}

Result<uint64_t> ParseRate(std::string_view text) {
  std::string_view size_text = text;
  if (size_text.size() >= 2 && Lower(size_text.substr(size_text.size() - 2)) ==
                                   "/s") {
    size_text.remove_suffix(2);
  }
  uint64_t bytes = 0;
  std::string reason;
  if (!ParseSizeImpl(size_text, &bytes, &reason)) {
    if (size_text.find('/') != std::string_view::npos) {
      reason = "only per second (\"/s\") is supported";
    }
    return Refuse(kRateExpected, text, reason);
  }
  if (bytes == 0) {
    return Refuse(kRateExpected, text,
                  "must be more than 0; leave the key out for no limit");
  }
  return bytes;
}

Result<Endpoint> ParseEndpoint(std::string_view text) {
  if (text.empty()) return Refuse(kEndpointExpected, text, "empty");
  if (HasSpace(text)) return Refuse(kEndpointExpected, text, "no spaces allowed");
  Endpoint ep;
  std::string_view port_text;
  if (text.front() == '[') {
    const size_t close = text.find(']');
    if (close == std::string_view::npos) {
      return Refuse(kEndpointExpected, text, "missing \"]\"");
    }
    ep.host = std::string(text.substr(1, close - 1));
    in6_addr addr6;
    if (inet_pton(AF_INET6, ep.host.c_str(), &addr6) != 1) {
      return Refuse(kEndpointExpected, text,
                    "brackets must hold an IPv6 address");
    }
    std::string_view rest = text.substr(close + 1);
    if (rest.empty() || rest.front() != ':') {
      return Refuse(kEndpointExpected, text, "missing \":port\"");
    }
    port_text = rest.substr(1);
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string_view::npos) {
      return Refuse(kEndpointExpected, text, "missing \":port\"");
    }
    ep.host = std::string(text.substr(0, colon));
    port_text = text.substr(colon + 1);
    if (ep.host.find(':') != std::string::npos) {
      return Refuse(kEndpointExpected, text,
                    "put an IPv6 address in brackets, like \"[::1]:7800\"");
    }
    if (ep.host.empty()) return Refuse(kEndpointExpected, text, "empty host");
    // RFC 1123 host names; '_' is tolerated because it appears in practice.
    if (ep.host.size() > 253) {
      return Refuse(kEndpointExpected, text, "host name too long");
    }
    bool dotted_numeric = true;
    for (char c : ep.host) {
      const bool ok = std::isalnum(static_cast<unsigned char>(c)) ||
                      c == '.' || c == '-' || c == '_';
      if (!ok) {
        return Refuse(kEndpointExpected, text,
                      "host names use only letters, digits, '.', '-', '_'");
      }
      if (!std::isdigit(static_cast<unsigned char>(c)) && c != '.') {
        dotted_numeric = false;
      }
    }
    in_addr addr4;
    if (dotted_numeric && inet_pton(AF_INET, ep.host.c_str(), &addr4) != 1) {
      return Refuse(kEndpointExpected, text, "not a valid IPv4 address");
    }
  }
  if (port_text.empty()) {
    return Refuse(kEndpointExpected, text, "missing port number");
  }
  uint32_t port = 0;
  auto [end, ec] = std::from_chars(port_text.data(),
                                   port_text.data() + port_text.size(), port);
  if (ec == std::errc::result_out_of_range ||
      (ec == std::errc() && port > 65535)) {
    return Refuse(kEndpointExpected, text, "port must be 1..65535");
  }
  if (ec != std::errc() || end != port_text.data() + port_text.size() ||
      port_text.front() == '+' || port_text.front() == '-') {
    return Refuse(kEndpointExpected, text, "port must be a number 1..65535");
  }
  if (port == 0) {
    return Refuse(kEndpointExpected, text,
                  "port 0 is not allowed; pick a fixed port");
  }
  ep.port = static_cast<uint16_t>(port);
  return ep;
}

std::string Endpoint::ToString() const {
  if (host.find(':') != std::string::npos) {
    return fmt::format("[{}]:{}", host, port);
  }
  return fmt::format("{}:{}", host, port);
}

std::string FormatSize(uint64_t bytes) {
  static constexpr struct {
    int shift;
    const char* unit;
  } kUnits[] = {{40, "TiB"}, {30, "GiB"}, {20, "MiB"}, {10, "KiB"}};
  if (bytes != 0) {
    for (const auto& u : kUnits) {
      const uint64_t mask = (uint64_t{1} << u.shift) - 1;
      if ((bytes & mask) == 0) {
        return fmt::format("{}{}", bytes >> u.shift, u.unit);
      }
    }
  }
  return std::to_string(bytes);
}

std::string FormatDurationMs(uint32_t ms) {
  if (ms != 0) {
    if (ms % 3'600'000 == 0) return fmt::format("{}h", ms / 3'600'000);
    if (ms % 60'000 == 0) return fmt::format("{}min", ms / 60'000);
    if (ms % 1000 == 0) return fmt::format("{}s", ms / 1000);
  }
  return fmt::format("{}ms", ms);
}

}  // namespace blockrelay::config
