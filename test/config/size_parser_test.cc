#include <cstdint>
#include <limits>
#include <string>

#include <catch2/catch.hpp>

#include "blockrelay/config/site_config.h"

namespace blockrelay::config {
namespace {

using Catch::Matchers::Contains;
using Catch::Matchers::StartsWith;

template <typename T>
std::string ErrorOf(const Result<T>& r) {
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().IsInvalidArgument());
  return r.status().message();
}

// ---- ParseSize ----

TEST_CASE("ParseSize: zero is zero bytes", "[size]") {
  Result<uint64_t> r = ParseSize("0");
  REQUIRE(r.ok());
  CHECK(*r == 0);
}

TEST_CASE("ParseSize: plain integer is bytes", "[size]") {
  Result<uint64_t> r = ParseSize("4096");
  REQUIRE(r.ok());
  CHECK(*r == 4096);
}

TEST_CASE("ParseSize: B suffix is bytes", "[size]") {
  Result<uint64_t> r = ParseSize("512B");
  REQUIRE(r.ok());
  CHECK(*r == 512);
}

TEST_CASE("ParseSize: KiB is 1024", "[size]") {
  Result<uint64_t> r = ParseSize("64KiB");
  REQUIRE(r.ok());
  CHECK(*r == 64 * 1024);
}

TEST_CASE("ParseSize: short units are binary and case-insensitive", "[size]") {
  CHECK(*ParseSize("1k") == 1024);
  CHECK(*ParseSize("1K") == 1024);
  CHECK(*ParseSize("1M") == (1u << 20));
  CHECK(*ParseSize("1m") == (1u << 20));
  CHECK(*ParseSize("2g") == (2ull << 30));
  CHECK(*ParseSize("1gib") == (1ull << 30));
  CHECK(*ParseSize("1T") == (1ull << 40));
}

TEST_CASE("ParseSize: 16TiB", "[size]") {
  Result<uint64_t> r = ParseSize("16TiB");
  REQUIRE(r.ok());
  CHECK(*r == (16ull << 40));
}

TEST_CASE("ParseSize: largest uint64 byte count is accepted", "[size]") {
  Result<uint64_t> r = ParseSize("18446744073709551615");
  REQUIRE(r.ok());
  CHECK(*r == std::numeric_limits<uint64_t>::max());
}

TEST_CASE("ParseSize: overflow with a unit is refused", "[size]") {
  std::string msg = ErrorOf(ParseSize("99999999999TiB"));
  CHECK_THAT(msg, Contains("\"99999999999TiB\"") && Contains("too large"));
}

TEST_CASE("ParseSize: overflow of the digits is refused", "[size]") {
  std::string msg = ErrorOf(ParseSize("18446744073709551616"));
  CHECK_THAT(msg, Contains("too large"));
}

TEST_CASE("ParseSize: negative is refused", "[size]") {
  std::string msg = ErrorOf(ParseSize("-1"));
  CHECK_THAT(msg, Contains("\"-1\"") && Contains("negative"));
}

TEST_CASE("ParseSize: fraction is refused", "[size]") {
  std::string msg = ErrorOf(ParseSize("1.5GiB"));
  CHECK_THAT(msg, Contains("\"1.5GiB\"") && Contains("fractions"));
}

TEST_CASE("ParseSize: empty string is refused", "[size]") {
  std::string msg = ErrorOf(ParseSize(""));
  CHECK_THAT(msg, Contains("got \"\""));
}

TEST_CASE("ParseSize: unknown unit says what was expected", "[size]") {
  CHECK(ErrorOf(ParseSize("12XB")) ==
        "expected a size like \"1GiB\" or a whole number of bytes, got "
        "\"12XB\" (units are B, KiB, MiB, GiB, TiB)");
}

TEST_CASE("ParseSize: decimal units are refused as ambiguous", "[size]") {
  std::string msg = ErrorOf(ParseSize("1MB"));
  CHECK_THAT(msg, Contains("\"1MB\"") && Contains("MiB"));
}

TEST_CASE("ParseSize: whitespace anywhere is refused", "[size]") {
  for (const char* text : {" 64KiB", "64KiB ", "64 KiB", "\t1", "1\n"}) {
    CAPTURE(text);
    CHECK_THAT(ErrorOf(ParseSize(text)), Contains("no spaces"));
  }
}

TEST_CASE("ParseSize: unit without a number is refused", "[size]") {
  CHECK_THAT(ErrorOf(ParseSize("KiB")), Contains("\"KiB\""));
  CHECK_THAT(ErrorOf(ParseSize("+5")), Contains("\"+5\""));
}

// ---- ParseDurationMs ----

TEST_CASE("ParseDurationMs: plain integer is milliseconds", "[size]") {
  CHECK(*ParseDurationMs("250") == 250);
  CHECK(*ParseDurationMs("0") == 0);
}

TEST_CASE("ParseDurationMs: units ms, s, m, min, h", "[size]") {
  CHECK(*ParseDurationMs("10ms") == 10);
  CHECK(*ParseDurationMs("5s") == 5000);
  CHECK(*ParseDurationMs("2m") == 120000);
  CHECK(*ParseDurationMs("2min") == 120000);
  CHECK(*ParseDurationMs("1h") == 3600000);
  CHECK(*ParseDurationMs("3S") == 3000);
}

TEST_CASE("ParseDurationMs: more than 2^32-1 ms is refused", "[size]") {
  CHECK(*ParseDurationMs("4294967295") == 4294967295u);
  CHECK_THAT(ErrorOf(ParseDurationMs("4294967296")), Contains("49 days"));
  CHECK_THAT(ErrorOf(ParseDurationMs("1200h")), Contains("\"1200h\""));
}

TEST_CASE("ParseDurationMs: unknown unit is refused", "[size]") {
  std::string msg = ErrorOf(ParseDurationMs("5d"));
  CHECK_THAT(msg, StartsWith("expected a duration") && Contains("\"5d\"") &&
                      Contains("units are ms, s, min, h"));
}

TEST_CASE("ParseDurationMs: negative, fraction, empty, spaces are refused",
          "[size]") {
  CHECK_THAT(ErrorOf(ParseDurationMs("-5s")), Contains("negative"));
  CHECK_THAT(ErrorOf(ParseDurationMs("1.5s")), Contains("fractions"));
  CHECK_THAT(ErrorOf(ParseDurationMs("")), Contains("empty"));
  CHECK_THAT(ErrorOf(ParseDurationMs("5 s")), Contains("no spaces"));
}

// ---- ParseRate ----

TEST_CASE("ParseRate: size per second", "[size]") {
  CHECK(*ParseRate("100MiB/s") == 100ull << 20);
  CHECK(*ParseRate("1g/S") == 1ull << 30);
}

TEST_CASE("ParseRate: a bare size is bytes per second", "[size]") {
  CHECK(*ParseRate("4096") == 4096);
  CHECK(*ParseRate("10MiB") == 10ull << 20);
}

TEST_CASE("ParseRate: zero is refused", "[size]") {
  std::string msg = ErrorOf(ParseRate("0/s"));
  CHECK_THAT(msg, Contains("\"0/s\"") && Contains("more than 0"));
}

TEST_CASE("ParseRate: other time units are refused", "[size]") {
  std::string msg = ErrorOf(ParseRate("100MiB/h"));
  CHECK_THAT(msg, StartsWith("expected a rate") && Contains("\"100MiB/h\"") &&
                      Contains("per second"));
}

TEST_CASE("ParseRate: bad size is refused", "[size]") {
  CHECK_THAT(ErrorOf(ParseRate("fast")), Contains("\"fast\""));
}

// ---- ParseEndpoint ----

TEST_CASE("ParseEndpoint: IPv4 address and port", "[size]") {
  Result<Endpoint> r = ParseEndpoint("127.0.0.1:7800");
  REQUIRE(r.ok());
  CHECK(r->host == "127.0.0.1");
  CHECK(r->port == 7800);
  CHECK(r->ToString() == "127.0.0.1:7800");
}

TEST_CASE("ParseEndpoint: bracketed IPv6 keeps brackets out of host",
          "[size]") {
  Result<Endpoint> r = ParseEndpoint("[::1]:7800");
  REQUIRE(r.ok());
  CHECK(r->host == "::1");
  CHECK(r->port == 7800);
  CHECK(r->ToString() == "[::1]:7800");
}

TEST_CASE("ParseEndpoint: host name", "[size]") {
  Result<Endpoint> r = ParseEndpoint("replica-b.example.com:65535");
  REQUIRE(r.ok());
  CHECK(r->host == "replica-b.example.com");
  CHECK(r->port == 65535);
}

TEST_CASE("ParseEndpoint: port 0 is refused", "[size]") {
  std::string msg = ErrorOf(ParseEndpoint("host:0"));
  CHECK_THAT(msg, Contains("\"host:0\"") && Contains("port 0"));
}

TEST_CASE("ParseEndpoint: missing port is refused", "[size]") {
  CHECK_THAT(ErrorOf(ParseEndpoint("host")),
             Contains("got \"host\" (missing \":port\")"));
  CHECK_THAT(ErrorOf(ParseEndpoint("host:")), Contains("missing port"));
  CHECK_THAT(ErrorOf(ParseEndpoint("[::1]")), Contains("missing"));
}

TEST_CASE("ParseEndpoint: port above 65535 is refused", "[size]") {
  CHECK_THAT(ErrorOf(ParseEndpoint("host:65536")),
             Contains("\"host:65536\"") && Contains("1..65535"));
  CHECK_THAT(ErrorOf(ParseEndpoint("host:99999999999999999999")),
             Contains("1..65535"));
}

TEST_CASE("ParseEndpoint: non-numeric port is refused", "[size]") {
  CHECK_THAT(ErrorOf(ParseEndpoint("host:http")), Contains("\"host:http\""));
  CHECK_THAT(ErrorOf(ParseEndpoint("host:+80")), Contains("\"host:+80\""));
}

TEST_CASE("ParseEndpoint: unbracketed IPv6 is refused with a hint", "[size]") {
  CHECK_THAT(ErrorOf(ParseEndpoint("::1:7800")), Contains("brackets"));
}

TEST_CASE("ParseEndpoint: bad brackets contents are refused", "[size]") {
  CHECK_THAT(ErrorOf(ParseEndpoint("[host]:80")), Contains("IPv6"));
  CHECK_THAT(ErrorOf(ParseEndpoint("[::1:80")), Contains("missing \"]\""));
}

TEST_CASE("ParseEndpoint: empty host and invalid IPv4 are refused", "[size]") {
  CHECK_THAT(ErrorOf(ParseEndpoint(":7800")), Contains("empty host"));
  CHECK_THAT(ErrorOf(ParseEndpoint("999.1.1.1:7800")), Contains("IPv4"));
  CHECK_THAT(ErrorOf(ParseEndpoint("a b:7800")), Contains("no spaces"));
  CHECK_THAT(ErrorOf(ParseEndpoint("h/st:7800")), Contains("host names"));
  CHECK_THAT(ErrorOf(ParseEndpoint("")), Contains("empty"));
}

// ---- Formatting ----

TEST_CASE("FormatSize: largest exact binary unit", "[size]") {
  CHECK(FormatSize(0) == "0");
  CHECK(FormatSize(1000) == "1000");
  CHECK(FormatSize(1024) == "1KiB");
  CHECK(FormatSize(1536) == "1536");
  CHECK(FormatSize(64ull << 20) == "64MiB");
  CHECK(FormatSize(3ull << 30) == "3GiB");
  CHECK(FormatSize(16ull << 40) == "16TiB");
}

TEST_CASE("FormatSize: output parses back to the same value", "[size]") {
  for (uint64_t v : {uint64_t{0}, uint64_t{1}, uint64_t{4096},
                     uint64_t{1536}, uint64_t{1} << 63,
                     std::numeric_limits<uint64_t>::max()}) {
    CAPTURE(v);
    CHECK(*ParseSize(FormatSize(v)) == v);
  }
}

TEST_CASE("FormatDurationMs: largest exact unit, minutes as min", "[size]") {
  CHECK(FormatDurationMs(0) == "0ms");
  CHECK(FormatDurationMs(10) == "10ms");
  CHECK(FormatDurationMs(1500) == "1500ms");
  CHECK(FormatDurationMs(30000) == "30s");
  CHECK(FormatDurationMs(600000) == "10min");
  CHECK(FormatDurationMs(7200000) == "2h");
  for (uint32_t v : {0u, 7u, 1500u, 600000u, 4294967295u}) {
    CHECK(*ParseDurationMs(FormatDurationMs(v)) == v);
  }
}

TEST_CASE("ToString: enum spellings match the config file", "[config]") {
  CHECK(std::string(ToString(Role::kPrimary)) == "primary");
  CHECK(std::string(ToString(Role::kSecondary)) == "secondary");
  CHECK(std::string(ToString(LinkMode::kSync)) == "sync");
  CHECK(std::string(ToString(LinkMode::kAsync)) == "async");
  CHECK(std::string(ToString(QueueKind::kDisk)) == "disk");
  CHECK(std::string(ToString(InitialSync::kChecksum)) == "checksum");
  CHECK(std::string(ToString(OnSyncFailure::kBlock)) == "block");
}

}  // namespace
}  // namespace blockrelay::config
