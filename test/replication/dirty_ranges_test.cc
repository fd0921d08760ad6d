// DIRTY_RANGES (src/replication/protocol.h): the downstream's dirty regions
// for its upstream, run-length coded. Round trips, and every malformed
// payload refused with a message naming what is wrong.
#include <cstdint>
#include <limits>

#include <catch2/catch.hpp>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "nbd/protocol.h"
#include "replication/protocol.h"

namespace blockrelay::replication {
namespace {

using Catch::Matchers::Contains;


struct P {
  Bytes b;
  P& U32(uint32_t v) { nbd::AppendBe32(b, v); return *this; }
  P& U64(uint64_t v) { nbd::AppendBe64(b, v); return *this; }
};

// A DIRTY_RANGES frame with a valid header and checksum around `payload`.
Bytes MakeFrame(const Bytes& payload) {
  Bytes h;
  nbd::AppendBe32(h, kFrameMagic);
  nbd::AppendBe16(h, kProtocolVersion);
  nbd::AppendBe16(h, static_cast<uint16_t>(FrameType::kDirtyRanges));
  nbd::AppendBe32(h, static_cast<uint32_t>(payload.size()));
  nbd::AppendBe32(h, 0);
  Bytes covered = h;
  covered.insert(covered.end(), payload.begin(), payload.end());
  nbd::AppendBe64(h, XXH3_64bits(covered.data(), covered.size()));
  h.insert(h.end(), payload.begin(), payload.end());
  return h;
}

Result<Frame> Decode(const Bytes& frame) {
  std::span<const std::byte> all(frame);
  auto header = DecodeFrameHeader(all.first(kFrameHeaderBytes));
  if (!header.ok()) return header.status();
  return DecodeFrame(*header, all.first(kFrameHeaderBytes),
                     all.subspan(kFrameHeaderBytes));
}

Status DecodeError(const Bytes& payload) {
  auto r = Decode(MakeFrame(payload));
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().IsCorruption());
  return r.status();
}

TEST_CASE("DirtyRanges: encode and decode round-trip", "[replication][protocol]") {
  DirtyRanges d;
  d.volumes = {{0, {{0, 1}, {5, 3}, {100, 1ull << 40}}}, {3, {{7, 1}}}};
  Bytes out;
  EncodeDirtyRanges(d, out);
  auto r = Decode(out);
  REQUIRE(r.ok());
  REQUIRE(std::holds_alternative<DirtyRanges>(*r));
  CHECK(std::get<DirtyRanges>(*r) == d);
}

TEST_CASE("DirtyRanges: an empty set round-trips", "[replication][protocol]") {
  Bytes out;
  EncodeDirtyRanges(DirtyRanges{}, out);
  auto r = Decode(out);
  REQUIRE(r.ok());
  CHECK(std::get<DirtyRanges>(*r).volumes.empty());
}

TEST_CASE("DirtyRanges: a truncated payload is refused at every cut",
          "[replication][protocol]") {
  DirtyRanges d;
  d.volumes = {{0, {{0, 1}, {5, 3}}}, {1, {{2, 2}}}};
  Bytes out;
  EncodeDirtyRanges(d, out);
  Bytes payload(out.begin() + kFrameHeaderBytes, out.end());
  for (size_t cut = 0; cut < payload.size(); ++cut) {
    INFO("cut at " << cut);
    Status s = DecodeError(Bytes(payload.begin(), payload.begin() + cut));
    CHECK_THAT(s.message(), Contains("DIRTY_RANGES"));
  }
}

TEST_CASE("DirtyRanges: trailing bytes are refused", "[replication][protocol]") {
  Status s = DecodeError(P{}.U32(0).U32(7).b);
  CHECK_THAT(s.message(), Contains("DIRTY_RANGES"));
}

TEST_CASE("DirtyRanges: a flipped bit fails the checksum", "[replication][protocol]") {
  DirtyRanges d;
  d.volumes = {{0, {{4, 2}}}};
  Bytes out;
  EncodeDirtyRanges(d, out);
  out.back() ^= std::byte{1};
  auto r = Decode(out);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().message(), Contains("checksum mismatch"));
}

TEST_CASE("DirtyRanges: an empty run is refused", "[replication][protocol]") {
  Status s = DecodeError(P{}.U32(1).U32(0).U32(1).U64(3).U64(0).b);
  CHECK_THAT(s.message(), Contains("region_count is 0"));
}

TEST_CASE("DirtyRanges: overlapping or descending runs are refused",
          "[replication][protocol]") {
  SECTION("overlap") {
    Status s = DecodeError(P{}.U32(1).U32(0).U32(2).U64(0).U64(4).U64(3).U64(1).b);
    CHECK_THAT(s.message(), Contains("inside or before the previous run"));
  }
  SECTION("descending") {
    Status s = DecodeError(P{}.U32(1).U32(0).U32(2).U64(10).U64(1).U64(2).U64(1).b);
    CHECK_THAT(s.message(), Contains("inside or before the previous run"));
  }
}

TEST_CASE("DirtyRanges: a run whose end overflows is refused", "[replication][protocol]") {
  Status s = DecodeError(
      P{}.U32(1).U32(0).U32(1).U64(std::numeric_limits<uint64_t>::max()).U64(2).b);
  CHECK_THAT(s.message(), Contains("overflows"));
}

TEST_CASE("DirtyRanges: volumes out of order are refused", "[replication][protocol]") {
  Status s = DecodeError(P{}.U32(2).U32(1).U32(0).U32(1).U32(0).b);
  CHECK_THAT(s.message(), Contains("must ascend"));
}

TEST_CASE("DirtyRanges: counts larger than the payload or the limits are refused "
          "before allocating", "[replication][protocol]") {
  SECTION("run count beyond the payload") {
    Status s = DecodeError(P{}.U32(1).U32(0).U32(1000).U64(0).U64(1).b);
    CHECK_THAT(s.message(), Contains("1000 runs announced"));
  }
  SECTION("run count beyond kMaxDirtyRuns") {
    Status s = DecodeError(P{}.U32(1).U32(0).U32(kMaxDirtyRuns + 1).b);
    CHECK_THAT(s.message(), Contains("more than"));
  }
  SECTION("volume count beyond kMaxVolumesPerGroup") {
    Status s = DecodeError(P{}.U32(kMaxVolumesPerGroup + 1).b);
    CHECK_THAT(s.message(), Contains("volumes exceed"));
  }
}

TEST_CASE("DirtyRanges: the encoder refuses what the decoder would",
          "[replication][protocol]") {
  Bytes out;
  DirtyRanges empty_run;
  empty_run.volumes = {{0, {{1, 0}}}};
  CHECK_THROWS_AS(EncodeDirtyRanges(empty_run, out), std::invalid_argument);
  DirtyRanges overlap;
  overlap.volumes = {{0, {{0, 5}, {4, 1}}}};
  CHECK_THROWS_AS(EncodeDirtyRanges(overlap, out), std::invalid_argument);
  DirtyRanges order;
  order.volumes = {{2, {}}, {1, {}}};
  CHECK_THROWS_AS(EncodeDirtyRanges(order, out), std::invalid_argument);
  CHECK(out.empty());
}

}  // namespace
}  // namespace blockrelay::replication
