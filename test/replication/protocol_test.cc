// Frames of the site-to-site replication protocol (src/replication/protocol.h):
// round trips, byte layouts written out by hand, and every way a peer's bytes
// can be wrong. Corrupt frames are built here with a freshly computed
// checksum (MakeFrame/Reframe), so each test reaches the check it names
// instead of stopping at the checksum.
#include "replication/protocol.h"

#include <xxhash.h>

#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

namespace blockrelay::replication {
namespace {

using Catch::Matchers::Contains;
using Catch::Matchers::Equals;
using Catch::Matchers::StartsWith;

constexpr uint64_t kU64Max = std::numeric_limits<uint64_t>::max();

// --- Byte builders (independent of the code under test) ----------------------

Bytes B(std::initializer_list<int> values) {
  Bytes out;
  for (int v : values) out.push_back(static_cast<std::byte>(v));
  return out;
}

Bytes Concat(std::initializer_list<Bytes> parts) {
  Bytes out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

Bytes Raw(std::string_view s) {
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  return Bytes(p, p + s.size());
}

Bytes U16(uint16_t v) { return B({v >> 8, v & 0xff}); }
Bytes U32(uint32_t v) {
  return B({int(v >> 24), int(v >> 16) & 0xff, int(v >> 8) & 0xff,
            int(v & 0xff)});
}
Bytes U64(uint64_t v) {
  return Concat({U32(static_cast<uint32_t>(v >> 32)),
                 U32(static_cast<uint32_t>(v))});
}
// A protocol string: u16 length, bytes.
Bytes S(std::string_view s) {
  return Concat({U16(static_cast<uint16_t>(s.size())), Raw(s)});
}

Bytes Prefix(const Bytes& b, size_t n) {
  return Bytes(b.begin(), b.begin() + n);
}

uint64_t ReadU64(const Bytes& b, size_t at) {
  uint64_t v = 0;
  for (size_t i = 0; i < 8; ++i) {
    v = (v << 8) | std::to_integer<uint64_t>(b[at + i]);
  }
  return v;
}

// --- Frame builders ----------------------------------------------------------

struct HeaderFields {
  uint32_t magic = kFrameMagic;
  uint16_t version = kProtocolVersion;
  uint16_t type = 0;
  uint32_t flags = 0;
};

// A frame around `payload` with a correct length and checksum: XXH3-64 over
// header bytes [0,16) and the payload, computed in one shot over a copy.
Bytes MakeFrame(const HeaderFields& h, const Bytes& payload) {
  Bytes prefix = Concat({U32(h.magic), U16(h.version), U16(h.type),
                         U32(static_cast<uint32_t>(payload.size())),
                         U32(h.flags)});
  Bytes covered = Concat({prefix, payload});
  uint64_t checksum = XXH3_64bits(covered.data(), covered.size());
  return Concat({prefix, U64(checksum), payload});
}

Bytes MakeFrame(FrameType type, const Bytes& payload, uint32_t flags = 0) {
  return MakeFrame({.type = static_cast<uint16_t>(type), .flags = flags},
                   payload);
}

Bytes HeaderOf(const Bytes& frame) { return Prefix(frame, kFrameHeaderBytes); }
Bytes PayloadOf(const Bytes& frame) {
  return Bytes(frame.begin() + kFrameHeaderBytes, frame.end());
}

// `frame` with its payload replaced and length and checksum fixed up; magic,
// version, type and flags are kept.
Bytes Reframe(const Bytes& frame, const Bytes& payload) {
  HeaderFields h;
  h.magic = static_cast<uint32_t>(ReadU64(frame, 0) >> 32);
  h.version = static_cast<uint16_t>(ReadU64(frame, 0) >> 16);
  h.type = static_cast<uint16_t>(ReadU64(frame, 0));
  h.flags = static_cast<uint32_t>(ReadU64(frame, 8));
  return MakeFrame(h, payload);
}

// What a receiver does: decode the header, then the frame.
Result<Frame> Decode(const Bytes& frame) {
  if (frame.size() < kFrameHeaderBytes) {
    return Status::InvalidArgument("test bug: frame shorter than a header");
  }
  std::span<const std::byte> header_bytes(frame.data(), kFrameHeaderBytes);
  auto header = DecodeFrameHeader(header_bytes);
  if (!header.ok()) return header.status();
  std::span<const std::byte> payload(frame.data() + kFrameHeaderBytes,
                                     frame.size() - kFrameHeaderBytes);
  return DecodeFrame(*header, header_bytes, payload);
}

template <typename T>
T DecodeAs(const Bytes& frame) {
  auto r = Decode(frame);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  REQUIRE(std::holds_alternative<T>(*r));
  return std::get<T>(std::move(r).value());
}

Status DecodeError(const Bytes& frame) {
  auto r = Decode(frame);
  REQUIRE_FALSE(r.ok());
  return r.status();
}

template <typename T, typename Encoder>
Bytes Encode(Encoder encode, const T& value) {
  Bytes out;
  encode(value, out);
  return out;
}

const Bytes kData8 = Raw("abcdefgh");
const Bytes kData3 = Raw("xyz");

Hello SampleHello() {
  return Hello{.site = "east",
               .group = "db",
               .region_size_bytes = 1 << 20,
               .volumes = {{"data", 1ull << 40}, {"log", 4096}},
               .generation = "gen-7"};
}

WriteGroup SampleGroup() {
  WriteGroup g;
  g.link_seq = 7;
  g.group_seq = 1234;
  g.flags = kGroupDurable;
  g.ops = {{OpType::kWrite, 0, 4096, kData8.size(), kData8},
           {OpType::kTrim, 1, 0, 1 << 20, {}},
           {OpType::kZero, 0, 8192, 512, {}},
           {OpType::kWrite, 1, 0, kData3.size(), kData3}};
  return g;
}

// One valid frame of every type.
std::vector<Bytes> SampleFrames() {
  std::vector<Bytes> frames(8);
  EncodeHello(SampleHello(), frames[0]);
  EncodeHelloReply({HelloResult::kMismatch, "west", "sizes differ", "gen-3", 9},
                   frames[1]);
  EncodeWriteGroup(SampleGroup(), frames[2]);
  EncodeGroupAck({.received_seq = 5, .durable_seq = 4}, frames[3]);
  EncodePing({.nonce = 0x1122334455667788}, frames[4]);
  EncodePong({.nonce = 42}, frames[5]);
  EncodeError({.code = 101, .message = "bad link_seq"}, frames[6]);
  EncodeGenerationUpdate({.link_seq = 12, .generation = "gen-8,gen-7"}, frames[7]);
  return frames;
}

std::string TypeNameOf(const Bytes& frame) {
  return FrameTypeName(static_cast<FrameType>(ReadU64(frame, 0) & 0xffff));
}

// --- Round trips -------------------------------------------------------------

TEST_CASE("ReplicationProtocol: HELLO round trips", "[replication][protocol]") {
  Hello hello = SampleHello();
  CHECK(DecodeAs<Hello>(Encode(EncodeHello, hello)) == hello);
}

TEST_CASE("ReplicationProtocol: HELLO with empty strings and no volumes round "
          "trips",
          "[replication][protocol]") {
  Hello hello;
  CHECK(DecodeAs<Hello>(Encode(EncodeHello, hello)) == hello);
}

TEST_CASE("ReplicationProtocol: HELLO with the most volumes and longest "
          "strings round trips",
          "[replication][protocol]") {
  Hello hello;
  hello.site = std::string(kMaxStringBytes, 's');
  hello.group = std::string(kMaxStringBytes, 'g');
  hello.generation = std::string(kMaxStringBytes, 'n');
  hello.region_size_bytes = kU64Max;
  for (uint32_t i = 0; i < kMaxVolumesPerGroup; ++i) {
    hello.volumes.push_back({std::string(kMaxStringBytes, 'a' + i % 26),
                             kU64Max - i});
  }
  CHECK(DecodeAs<Hello>(Encode(EncodeHello, hello)) == hello);
}

TEST_CASE("ReplicationProtocol: HELLO_REPLY round trips every result",
          "[replication][protocol]") {
  for (uint32_t v = 0; v <= static_cast<uint32_t>(HelloResult::kSplitBrain);
       ++v) {
    HelloReply reply{static_cast<HelloResult>(v), "west", "why", "gen-2",
                     kU64Max};
    INFO(HelloResultName(reply.result));
    CHECK(DecodeAs<HelloReply>(Encode(EncodeHelloReply, reply)) == reply);
  }
  HelloReply empty;
  CHECK(DecodeAs<HelloReply>(Encode(EncodeHelloReply, empty)) == empty);
}

TEST_CASE("ReplicationProtocol: HELLO_REPLY carries full_resync as header "
          "flag 1",
          "[replication][protocol]") {
  HelloReply reply{HelloResult::kAccepted, "b", "", "", 7, /*full_resync=*/true};
  Bytes frame = Encode(EncodeHelloReply, reply);
  CHECK(static_cast<uint32_t>(ReadU64(frame, 8)) == kReplyFullResync);
  CHECK(DecodeAs<HelloReply>(frame) == reply);
  reply.full_resync = false;
  CHECK(static_cast<uint32_t>(ReadU64(Encode(EncodeHelloReply, reply), 8)) == 0);
}

TEST_CASE("ReplicationProtocol: HELLO carries lazy_durability as header "
          "flag 1",
          "[replication][protocol]") {
  Hello hello{"a", "g", 65536, {{"data", 1 << 20}}, "gen-1", /*lazy_durability=*/true};
  Bytes frame = Encode(EncodeHello, hello);
  CHECK(static_cast<uint32_t>(ReadU64(frame, 8)) == kHelloLazyDurability);
  CHECK(DecodeAs<Hello>(frame) == hello);
  hello.lazy_durability = false;
  frame = Encode(EncodeHello, hello);
  CHECK(static_cast<uint32_t>(ReadU64(frame, 8)) == 0);
  CHECK(DecodeAs<Hello>(frame) == hello);
}

// --- Resync markers ----------------------------------------------------------

WriteGroup Marker(uint32_t flags) {
  return WriteGroup{.link_seq = 3, .group_seq = 0, .flags = flags, .ops = {}};
}

TEST_CASE("ReplicationProtocol: resync BEGIN and END markers round trip",
          "[replication][protocol]") {
  for (uint32_t marker : {kGroupResyncBegin, kGroupResyncEnd}) {
    INFO("flags " << (kGroupResync | marker));
    Bytes frame = Encode(EncodeWriteGroup, Marker(kGroupResync | marker));
    CHECK(frame.size() == kFrameHeaderBytes + 20);
    WriteGroup got = DecodeAs<WriteGroup>(frame);
    CHECK(got.flags == (kGroupResync | marker));
    CHECK(got.link_seq == 3);
    CHECK(got.group_seq == 0);
    CHECK(got.ops.empty());
  }
}

TEST_CASE("ReplicationProtocol: a resync marker without the resync flag is "
          "refused",
          "[replication][protocol]") {
  Bytes payload = Concat({U64(1), U64(0), U32(0)});
  Status s = DecodeError(MakeFrame(FrameType::kWriteGroup, payload, kGroupResyncEnd));
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(),
             Equals("WRITE_GROUP: resync END marker without the resync flag"));
  Bytes out;
  CHECK_THROWS_AS(EncodeWriteGroup(Marker(kGroupResyncBegin), out),
                  std::invalid_argument);
  CHECK(out.empty());
}

TEST_CASE("ReplicationProtocol: BEGIN and END together are refused",
          "[replication][protocol]") {
  const uint32_t flags = kGroupResync | kGroupResyncBegin | kGroupResyncEnd;
  Bytes payload = Concat({U64(1), U64(0), U32(0)});
  Status s = DecodeError(MakeFrame(FrameType::kWriteGroup, payload, flags));
  CHECK_THAT(s.message(), Equals("WRITE_GROUP: resync BEGIN and END flags both set"));
  Bytes out;
  CHECK_THROWS_AS(EncodeWriteGroup(Marker(flags), out), std::invalid_argument);
}

TEST_CASE("ReplicationProtocol: a resync marker with ops or a group_seq is "
          "refused",
          "[replication][protocol]") {
  const uint32_t flags = kGroupResync | kGroupResyncBegin;
  SECTION("an op") {
    Bytes payload = Concat({U64(1), U64(0), U32(1), B({3}), U32(0), U64(0), U64(512)});
    Status s = DecodeError(MakeFrame(FrameType::kWriteGroup, payload, flags));
    CHECK(s.IsCorruption());
    CHECK_THAT(s.message(), Equals("WRITE_GROUP: resync BEGIN marker carries 1 "
                                   "op(s) and group_seq 0; it must carry none"));
    WriteGroup g = Marker(flags);
    g.ops = {{OpType::kZero, 0, 0, 512, {}}};
    Bytes out;
    CHECK_THROWS_AS(EncodeWriteGroup(g, out), std::invalid_argument);
  }
  SECTION("a group_seq") {
    Bytes payload = Concat({U64(1), U64(9), U32(0)});
    Status s = DecodeError(MakeFrame(FrameType::kWriteGroup, payload, flags));
    CHECK_THAT(s.message(), Contains("group_seq 9; it must carry none"));
    WriteGroup g = Marker(flags);
    g.group_seq = 9;
    Bytes out;
    CHECK_THROWS_AS(EncodeWriteGroup(g, out), std::invalid_argument);
  }
}

TEST_CASE("ReplicationProtocol: every truncation of a resync marker is refused",
          "[replication][protocol]") {
  for (uint32_t marker : {kGroupResyncBegin, kGroupResyncEnd}) {
    const Bytes frame = Encode(EncodeWriteGroup, Marker(kGroupResync | marker));
    const Bytes payload = PayloadOf(frame);
    for (size_t n = 0; n < payload.size(); ++n) {
      INFO("payload cut to " << n);
      Status s = DecodeError(Reframe(frame, Prefix(payload, n)));
      CHECK(s.IsCorruption());
      CHECK_THAT(s.message(), StartsWith("WRITE_GROUP"));
    }
    // A flipped bit anywhere fails the checksum.
    for (size_t i = 0; i < frame.size(); ++i) {
      if (i >= 16 && i < 24) continue;  // the checksum itself
      Bytes bad = frame;
      bad[i] ^= std::byte{0x01};
      INFO("byte " << i);
      auto r = Decode(bad);
      CHECK_FALSE(r.ok());
    }
  }
}

TEST_CASE("ReplicationProtocol: WRITE_GROUP round trips ops, flags and data "
          "as views into the payload",
          "[replication][protocol]") {
  WriteGroup sent = SampleGroup();
  sent.flags = kGroupDurable | kGroupResync;
  Bytes frame = Encode(EncodeWriteGroup, sent);
  WriteGroup got = DecodeAs<WriteGroup>(frame);
  CHECK(got.link_seq == sent.link_seq);
  CHECK(got.group_seq == sent.group_seq);
  CHECK(got.flags == sent.flags);
  REQUIRE(got.ops.size() == sent.ops.size());
  for (size_t i = 0; i < sent.ops.size(); ++i) {
    INFO("op " << i);
    CHECK(got.ops[i].type == sent.ops[i].type);
    CHECK(got.ops[i].volume == sent.ops[i].volume);
    CHECK(got.ops[i].offset == sent.ops[i].offset);
    CHECK(got.ops[i].length == sent.ops[i].length);
    CHECK(Bytes(got.ops[i].data.begin(), got.ops[i].data.end()) ==
          Bytes(sent.ops[i].data.begin(), sent.ops[i].data.end()));
    if (!got.ops[i].data.empty()) {
      CHECK(got.ops[i].data.data() >= frame.data() + kFrameHeaderBytes);
      CHECK(got.ops[i].data.data() + got.ops[i].data.size() <=
            frame.data() + frame.size());
    }
  }
}

TEST_CASE("ReplicationProtocol: WRITE_GROUP with no ops round trips",
          "[replication][protocol]") {
  WriteGroup sent{.link_seq = 1, .group_seq = 0, .flags = 0, .ops = {}};
  WriteGroup got = DecodeAs<WriteGroup>(Encode(EncodeWriteGroup, sent));
  CHECK(got.link_seq == 1);
  CHECK(got.group_seq == 0);
  CHECK(got.flags == 0);
  CHECK(got.ops.empty());
}

// Joins the pieces of a gathering encode into the bytes it would send.
Bytes JoinPieces(const Bytes& out, const std::vector<FramePiece>& pieces) {
  Bytes wire;
  for (const FramePiece& p : pieces) {
    if (p.data.empty()) {
      wire.insert(wire.end(), out.begin() + p.offset, out.begin() + p.offset + p.size);
    } else {
      wire.insert(wire.end(), p.data.begin(), p.data.end());
    }
  }
  return wire;
}

TEST_CASE("ReplicationProtocol: a gathering WRITE_GROUP encode sends exactly "
          "the copying encode's bytes without copying write data",
          "[replication][protocol]") {
  WriteGroup empty{.link_seq = 1, .group_seq = 2, .flags = 0, .ops = {}};
  WriteGroup no_data = SampleGroup();
  no_data.ops = {{OpType::kTrim, 1, 0, 1 << 20, {}}};
  for (const WriteGroup& g : {SampleGroup(), empty, no_data}) {
    // Two frames into one buffer, after bytes already there, as a link
    // batches them.
    Bytes out = Raw("prefix");
    std::vector<FramePiece> pieces{{0, out.size(), {}}};
    EncodeWriteGroupGather(g, out, pieces);
    WriteGroup second = g;
    second.link_seq = g.link_seq + 1;
    EncodeWriteGroupGather(second, out, pieces);

    Bytes want = Raw("prefix");
    EncodeWriteGroup(g, want);
    EncodeWriteGroup(second, want);
    CHECK(JoinPieces(out, pieces) == want);
    size_t data_in_out = out.size();
    for (const auto& op : g.ops) data_in_out += 2 * op.data.size();
    CHECK(data_in_out == want.size());  // the data was not copied into `out`
  }
}

TEST_CASE("ReplicationProtocol: a gathering encode refuses what the copying "
          "one refuses and leaves its buffers as they were",
          "[replication][protocol]") {
  WriteGroup bad = SampleGroup();
  bad.ops[1].data = kData3;  // a trim with data
  Bytes out = Raw("keep");
  std::vector<FramePiece> pieces;
  CHECK_THROWS_AS(EncodeWriteGroupGather(bad, out, pieces), std::invalid_argument);
  CHECK(out == Raw("keep"));
  CHECK(pieces.empty());
}

TEST_CASE("ReplicationProtocol: GROUP_ACK round trips",
          "[replication][protocol]") {
  GroupAck ack{.received_seq = kU64Max, .durable_seq = kU64Max - 1};
  CHECK(DecodeAs<GroupAck>(Encode(EncodeGroupAck, ack)) == ack);
  GroupAck zero;
  CHECK(DecodeAs<GroupAck>(Encode(EncodeGroupAck, zero)) == zero);
}

TEST_CASE("ReplicationProtocol: GENERATION round trips link_seq and the "
          "generations",
          "[replication][protocol]") {
  GenerationUpdate g{.link_seq = 99, .generation = "a:2,b:1"};
  CHECK(DecodeAs<GenerationUpdate>(Encode(EncodeGenerationUpdate, g)) == g);
  GenerationUpdate empty;
  CHECK(DecodeAs<GenerationUpdate>(Encode(EncodeGenerationUpdate, empty)) == empty);
}

TEST_CASE("ReplicationProtocol: PING and PONG round trip their nonce",
          "[replication][protocol]") {
  Ping ping{.nonce = 0x0102030405060708};
  Pong pong{.nonce = kU64Max};
  CHECK(DecodeAs<Ping>(Encode(EncodePing, ping)) == ping);
  CHECK(DecodeAs<Pong>(Encode(EncodePong, pong)) == pong);
}

TEST_CASE("ReplicationProtocol: ERROR round trips, also with an empty message",
          "[replication][protocol]") {
  ErrorFrame error{.code = 0xfffffffe, .message = "link_seq 9 after 7"};
  CHECK(DecodeAs<ErrorFrame>(Encode(EncodeError, error)) == error);
  ErrorFrame empty;
  CHECK(DecodeAs<ErrorFrame>(Encode(EncodeError, empty)) == empty);
}

TEST_CASE("ReplicationProtocol: encoders append whole frames after what the "
          "buffer holds",
          "[replication][protocol]") {
  Bytes out = B({0xee});
  EncodePing({.nonce = 1}, out);
  EncodeGroupAck({.received_seq = 3, .durable_seq = 2}, out);
  REQUIRE(out.size() == 1 + 2 * (kFrameHeaderBytes + 8) + 8);
  CHECK(out[0] == std::byte{0xee});
  Bytes first(out.begin() + 1, out.begin() + 1 + kFrameHeaderBytes + 8);
  Bytes second(out.begin() + 1 + kFrameHeaderBytes + 8, out.end());
  CHECK(DecodeAs<Ping>(first).nonce == 1);
  CHECK(DecodeAs<GroupAck>(second).received_seq == 3);
}

// --- Byte layouts ------------------------------------------------------------

TEST_CASE("ReplicationProtocol: header is magic, version, type, length, flags "
          "and XXH3-64 of header bytes 0-15 + payload",
          "[replication][protocol]") {
  Bytes frame = Encode(EncodePing, Ping{.nonce = 0x0102030405060708});
  Bytes first16 = B({'B', 'R', 'L', 'Y',  // magic
                     0, 1,                // version
                     0, 5,                // PING
                     0, 0, 0, 8,          // payload length
                     0, 0, 0, 0});        // flags
  Bytes payload = B({1, 2, 3, 4, 5, 6, 7, 8});
  Bytes covered = Concat({first16, payload});
  uint64_t checksum = XXH3_64bits(covered.data(), covered.size());
  CHECK(frame == Concat({first16, U64(checksum), payload}));

  auto h = DecodeFrameHeader(HeaderOf(frame));
  REQUIRE(h.ok());
  CHECK(h->version == kProtocolVersion);
  CHECK(h->type == FrameType::kPing);
  CHECK(h->length == 8);
  CHECK(h->flags == 0);
  CHECK(h->checksum == checksum);
}

TEST_CASE("ReplicationProtocol: HELLO payload layout",
          "[replication][protocol]") {
  Bytes frame = Encode(EncodeHello, SampleHello());
  CHECK(PayloadOf(frame) ==
        Concat({B({0, 4}), Raw("east"),               // site
                B({0, 2}), Raw("db"),                 // group
                B({0, 0, 0, 0, 0, 0x10, 0, 0}),       // region size
                B({0, 0, 0, 2}),                      // volume count
                B({0, 4}), Raw("data"),               // volume 0 name
                B({0, 0, 1, 0, 0, 0, 0, 0}),          //   size 2^40
                B({0, 3}), Raw("log"),                // volume 1 name
                B({0, 0, 0, 0, 0, 0, 0x10, 0}),       //   size 4096
                B({0, 5}), Raw("gen-7")}));           // generation
}

TEST_CASE("ReplicationProtocol: HELLO_REPLY payload layout",
          "[replication][protocol]") {
  Bytes frame = Encode(EncodeHelloReply,
                       HelloReply{HelloResult::kBusy, "w", "", "g", 0x0102});
  CHECK(PayloadOf(frame) == Concat({B({0, 0, 0, 5}),           // BUSY
                                    B({0, 1}), Raw("w"),       // site
                                    B({0, 0}),                 // message
                                    B({0, 1}), Raw("g"),       // generation
                                    B({0, 0, 0, 0, 0, 0, 1, 2})}));
}

TEST_CASE("ReplicationProtocol: WRITE_GROUP payload layout with flags in the "
          "header",
          "[replication][protocol]") {
  WriteGroup g;
  g.link_seq = 1;
  g.group_seq = 0x0102030405060708;
  g.flags = kGroupDurable;
  g.ops = {{OpType::kWrite, 2, 4096, 3, kData3},
           {OpType::kTrim, 0, 0x10, 0x2000, {}}};
  Bytes frame = Encode(EncodeWriteGroup, g);
  CHECK(Bytes(frame.begin() + 12, frame.begin() + 16) == B({0, 0, 0, 1}));
  CHECK(PayloadOf(frame) ==
        Concat({B({0, 0, 0, 0, 0, 0, 0, 1}),            // link_seq
                B({1, 2, 3, 4, 5, 6, 7, 8}),            // group_seq
                B({0, 0, 0, 2}),                        // op count
                B({1}),                                 // op 0: WRITE
                B({0, 0, 0, 2}),                        //   volume
                B({0, 0, 0, 0, 0, 0, 0x10, 0}),         //   offset
                B({0, 0, 0, 0, 0, 0, 0, 3}),            //   length
                Raw("xyz"),                             //   data
                B({2}),                                 // op 1: TRIM
                B({0, 0, 0, 0}),                        //   volume
                B({0, 0, 0, 0, 0, 0, 0, 0x10}),         //   offset
                B({0, 0, 0, 0, 0, 0, 0x20, 0})}));      //   length, no data
}

TEST_CASE("ReplicationProtocol: GROUP_ACK, PONG and ERROR payload layouts",
          "[replication][protocol]") {
  CHECK(PayloadOf(Encode(EncodeGroupAck, GroupAck{9, 8})) ==
        Concat({U64(9), U64(8)}));
  CHECK(PayloadOf(Encode(EncodePong, Pong{0xabcdef})) == U64(0xabcdef));
  CHECK(PayloadOf(Encode(EncodeError, ErrorFrame{102, "no"})) ==
        Concat({B({0, 0, 0, 102}), B({0, 2}), Raw("no")}));
}

// --- Header errors -----------------------------------------------------------

TEST_CASE("ReplicationProtocol: header with bad magic is refused",
          "[replication][protocol]") {
  Bytes frame = MakeFrame({.magic = 0x4E42444D, .type = 5}, U64(1));  // "NBDM"
  auto h = DecodeFrameHeader(HeaderOf(frame));
  REQUIRE_FALSE(h.ok());
  CHECK(h.status().IsCorruption());
  CHECK_THAT(h.status().message(), Contains("magic"));
}

TEST_CASE("ReplicationProtocol: header with another version is NotSupported "
          "and names both versions",
          "[replication][protocol]") {
  Bytes frame = MakeFrame({.version = 2, .type = 1}, {});
  auto h = DecodeFrameHeader(HeaderOf(frame));
  REQUIRE_FALSE(h.ok());
  CHECK(h.status().IsNotSupported());
  CHECK_THAT(h.status().message(),
             Equals("peer speaks replication protocol version 2; this site "
                    "speaks version 1"));
}

TEST_CASE("ReplicationProtocol: header with an unknown frame type is refused",
          "[replication][protocol]") {
  for (uint16_t type : {0, 12, 0xffff}) {
    INFO("type " << type);
    auto h = DecodeFrameHeader(HeaderOf(MakeFrame({.type = type}, {})));
    REQUIRE_FALSE(h.ok());
    CHECK(h.status().IsCorruption());
    CHECK_THAT(h.status().message(), Contains("unknown frame type"));
  }
}

TEST_CASE("ReplicationProtocol: header announcing more than "
          "kMaxFramePayloadBytes is refused",
          "[replication][protocol]") {
  Bytes header = HeaderOf(MakeFrame(FrameType::kWriteGroup, {}));
  auto with_length = [&](uint32_t length) {
    Bytes h = header;
    Bytes l = U32(length);
    std::copy(l.begin(), l.end(), h.begin() + 8);
    return DecodeFrameHeader(h);
  };
  CHECK(with_length(kMaxFramePayloadBytes).ok());
  for (uint32_t length : {kMaxFramePayloadBytes + 1, 0xffffffffu}) {
    auto h = with_length(length);
    REQUIRE_FALSE(h.ok());
    CHECK(h.status().IsCorruption());
    CHECK_THAT(h.status().message(), StartsWith("WRITE_GROUP"));
  }
}

TEST_CASE("ReplicationProtocol: header of the wrong size is refused at every "
          "length",
          "[replication][protocol]") {
  Bytes frame = Encode(EncodePing, Ping{});
  for (size_t n = 0; n <= frame.size(); ++n) {
    if (n == kFrameHeaderBytes) continue;
    INFO("length " << n);
    auto h = DecodeFrameHeader(Prefix(frame, n));
    REQUIRE_FALSE(h.ok());
    CHECK(h.status().IsCorruption());
  }
}

// --- Payload errors ----------------------------------------------------------

// Goal: a peer that stops mid-field, anywhere, gets a clean error naming the
// frame, never an out-of-bounds read (run under ASan to see the difference).
TEST_CASE("ReplicationProtocol: every truncation of every frame type is "
          "refused",
          "[replication][protocol]") {
  for (const Bytes& frame : SampleFrames()) {
    const Bytes payload = PayloadOf(frame);
    for (size_t n = 0; n < payload.size(); ++n) {
      INFO(TypeNameOf(frame) << " payload cut to " << n << " of "
                             << payload.size());
      Status s = DecodeError(Reframe(frame, Prefix(payload, n)));
      CHECK(s.IsCorruption());
      CHECK_THAT(s.message(), StartsWith(TypeNameOf(frame)));
    }
  }
}

TEST_CASE("ReplicationProtocol: trailing bytes after any payload are refused",
          "[replication][protocol]") {
  for (const Bytes& frame : SampleFrames()) {
    INFO(TypeNameOf(frame));
    Status s = DecodeError(Reframe(frame, Concat({PayloadOf(frame), B({0})})));
    CHECK(s.IsCorruption());
    CHECK_THAT(s.message(), StartsWith(TypeNameOf(frame)));
    CHECK_THAT(s.message(), Contains("1 trailing bytes"));
  }
}

TEST_CASE("ReplicationProtocol: payload shorter or longer than the header "
          "announces is refused",
          "[replication][protocol]") {
  Bytes frame = Encode(EncodePing, Ping{.nonce = 3});
  auto header = DecodeFrameHeader(HeaderOf(frame));
  REQUIRE(header.ok());
  Bytes payload = PayloadOf(frame);
  Bytes shorter = Prefix(payload, 7);
  Bytes longer = Concat({payload, B({0})});
  for (const Bytes& p : {shorter, longer}) {
    auto r = DecodeFrame(*header, HeaderOf(frame), p);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().IsCorruption());
    CHECK_THAT(r.status().message(), Contains("header announces 8"));
  }
}

// Goal: the checksum covers type, length and flags, not just the payload.
TEST_CASE("ReplicationProtocol: any flipped byte of header bytes 0 to 15 is refused",
          "[replication][protocol]") {
  Bytes frame = Encode(EncodeGroupAck, GroupAck{2, 1});
  auto header = DecodeFrameHeader(HeaderOf(frame));
  REQUIRE(header.ok());
  for (size_t i = 0; i < 16; ++i) {
    for (int mask : {0x01, 0x80}) {
      INFO("byte " << i << " ^ " << mask);
      Bytes bad = frame;
      bad[i] ^= std::byte(mask);
      // Whether the header check or the checksum catches it...
      CHECK_FALSE(Decode(bad).ok());
      // ...the checksum alone would have.
      auto r = DecodeFrame(*header, HeaderOf(bad), PayloadOf(bad));
      REQUIRE_FALSE(r.ok());
      CHECK(r.status().IsCorruption());
      CHECK_THAT(r.status().message(), Contains("checksum mismatch"));
    }
  }
}

TEST_CASE("ReplicationProtocol: any flipped byte of the payload or the "
          "checksum is refused",
          "[replication][protocol]") {
  Hello small;
  small.site = "a";
  small.volumes = {{"v", 1}};
  Bytes frame = Encode(EncodeHello, small);
  for (size_t i = 16; i < frame.size(); ++i) {
    INFO("byte " << i << " of " << frame.size());
    Bytes bad = frame;
    bad[i] ^= std::byte{0x01};
    Status s = DecodeError(bad);
    CHECK(s.IsCorruption());
    CHECK_THAT(s.message(), StartsWith("HELLO: checksum mismatch ("));
  }
}

TEST_CASE("ReplicationProtocol: DecodeCheckedFrame skips only the checksum",
          "[replication][protocol]") {
  const WriteGroup sent = SampleGroup();
  const Bytes frame = Encode(EncodeWriteGroup, sent);
  auto header = DecodeFrameHeader(HeaderOf(frame));
  REQUIRE(header.ok());
  // The same bytes decode to the same group either way.
  auto checked = DecodeCheckedFrame(*header, HeaderOf(frame), PayloadOf(frame));
  REQUIRE(checked.ok());
  const WriteGroup& got = std::get<WriteGroup>(*checked);
  CHECK(got.link_seq == sent.link_seq);
  REQUIRE(got.ops.size() == sent.ops.size());
  CHECK(Bytes(got.ops[0].data.begin(), got.ops[0].data.end()) ==
        Bytes(sent.ops[0].data.begin(), sent.ops[0].data.end()));
  // A changed data byte: only DecodeFrame notices.
  Bytes changed = frame;
  changed.back() ^= std::byte{0x01};
  CHECK_THAT(DecodeFrame(*header, HeaderOf(changed), PayloadOf(changed)).status().message(),
             Contains("checksum mismatch"));
  CHECK(DecodeCheckedFrame(*header, HeaderOf(changed), PayloadOf(changed)).ok());
  // Everything else is still checked.
  Bytes longer = Concat({PayloadOf(frame), B({0})});
  auto r = DecodeCheckedFrame(*header, HeaderOf(frame), longer);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().message(), Contains("header announces"));
}

TEST_CASE("ReplicationProtocol: WRITE_GROUP op with an unknown type is "
          "refused",
          "[replication][protocol]") {
  for (int type : {0, 4, 0xff}) {
    INFO("type " << type);
    Bytes payload = Concat({U64(1), U64(1), U32(2),
                            B({3}), U32(0), U64(0), U64(512),  // a valid zero
                            B({type}), U32(0), U64(0), U64(0)});
    Status s = DecodeError(MakeFrame(FrameType::kWriteGroup, payload));
    CHECK(s.IsCorruption());
    CHECK_THAT(s.message(), Equals("WRITE_GROUP op 1: unknown type " +
                                   std::to_string(type)));
  }
}

TEST_CASE("ReplicationProtocol: WRITE_GROUP with unknown flag bits is refused",
          "[replication][protocol]") {
  Bytes payload = Concat({U64(1), U64(1), U32(0)});
  CHECK(DecodeAs<WriteGroup>(MakeFrame(FrameType::kWriteGroup, payload,
                                       kGroupDurable | kGroupResync))
            .flags == (kGroupDurable | kGroupResync));
  for (uint32_t flags : {1u << 4, 1u << 31, ~kGroupFlagsKnown}) {
    INFO("flags " << flags);
    Status s = DecodeError(MakeFrame(FrameType::kWriteGroup, payload, flags));
    CHECK(s.IsCorruption());
    CHECK_THAT(s.message(), StartsWith("WRITE_GROUP: unknown flags"));
  }
}

TEST_CASE("ReplicationProtocol: flags on a frame type other than WRITE_GROUP "
          "are refused",
          "[replication][protocol]") {
  for (const Bytes& frame : SampleFrames()) {
    if (TypeNameOf(frame) == "WRITE_GROUP") continue;
    INFO(TypeNameOf(frame));
    // HELLO_REPLY defines bit 0 (kReplyFullResync) and HELLO bit 0
    // (kHelloLazyDurability), and nothing else.
    const bool reply =
        TypeNameOf(frame) == "HELLO_REPLY" || TypeNameOf(frame) == "HELLO";
    HeaderFields h{.type = static_cast<uint16_t>(ReadU64(frame, 0)),
                   .flags = reply ? 2u : kGroupDurable};
    Status s = DecodeError(MakeFrame(h, PayloadOf(frame)));
    CHECK(s.IsCorruption());
    CHECK_THAT(s.message(), StartsWith(TypeNameOf(frame) +
                                       (reply ? ": unknown flags 0x2" : ": flags 0x1")));
  }
}

TEST_CASE("ReplicationProtocol: WRITE_GROUP write op whose data is missing is "
          "refused",
          "[replication][protocol]") {
  Bytes payload = Concat({U64(1), U64(1), U32(4)});
  for (int i = 0; i < 3; ++i) {
    payload = Concat({payload, B({2}), U32(0), U64(0), U64(4096)});  // trims
  }
  payload = Concat({payload, B({1}), U32(0), U64(0), U64(4096),
                    Bytes(100, std::byte{0x5a})});
  Status s = DecodeError(MakeFrame(FrameType::kWriteGroup, payload));
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(),
             Equals("WRITE_GROUP op 3: data truncated (need 4096 bytes, 100 "
                    "left)"));
}

TEST_CASE("ReplicationProtocol: WRITE_GROUP write op longer than the frame "
          "can be is refused without wrapping",
          "[replication][protocol]") {
  Bytes payload =
      Concat({U64(1), U64(1), U32(1), B({1}), U32(0), U64(0), U64(kU64Max)});
  Status s = DecodeError(MakeFrame(FrameType::kWriteGroup, payload));
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), StartsWith("WRITE_GROUP op 0: data truncated"));
}

// Goal: a lying count must not make the decoder reserve memory for it.
TEST_CASE("ReplicationProtocol: WRITE_GROUP op count larger than the payload "
          "can hold is refused",
          "[replication][protocol]") {
  Bytes one_op = Concat({B({2}), U32(0), U64(0), U64(1)});
  SECTION("count within the limit but beyond the bytes") {
    Bytes payload = Concat({U64(1), U64(1), U32(kMaxOpsPerGroup), one_op});
    Status s = DecodeError(MakeFrame(FrameType::kWriteGroup, payload));
    CHECK(s.IsCorruption());
    CHECK_THAT(s.message(),
               Equals("WRITE_GROUP: op count 1048576 needs at least 22020096 "
                      "bytes, 21 left"));
  }
  SECTION("count one more than the ops sent") {
    Bytes payload = Concat({U64(1), U64(1), U32(2), one_op});
    CHECK(DecodeError(MakeFrame(FrameType::kWriteGroup, payload))
              .IsCorruption());
  }
  SECTION("count over kMaxOpsPerGroup") {
    for (uint32_t count : {kMaxOpsPerGroup + 1, 0xffffffffu}) {
      Bytes payload = Concat({U64(1), U64(1), U32(count), one_op});
      Status s = DecodeError(MakeFrame(FrameType::kWriteGroup, payload));
      CHECK(s.IsCorruption());
      CHECK_THAT(s.message(), Contains("exceeds the limit"));
    }
  }
}

TEST_CASE("ReplicationProtocol: HELLO volume count over the limit or beyond "
          "the payload is refused",
          "[replication][protocol]") {
  auto hello_with = [](uint32_t count, const Bytes& volumes) {
    return MakeFrame(FrameType::kHello,
                     Concat({S("a"), S("g"), U64(4096), U32(count), volumes,
                             S("gen")}));
  };
  Bytes volumes;
  for (uint32_t i = 0; i <= kMaxVolumesPerGroup; ++i) {
    volumes = Concat({volumes, S("v"), U64(i)});
  }
  Status over = DecodeError(hello_with(kMaxVolumesPerGroup + 1, volumes));
  CHECK(over.IsCorruption());
  CHECK_THAT(over.message(),
             Equals("HELLO: volume count 257 exceeds the limit of 256"));

  Status beyond = DecodeError(hello_with(200, Concat({S("v"), U64(1)})));
  CHECK(beyond.IsCorruption());
  CHECK_THAT(beyond.message(), StartsWith("HELLO: volume count 200 needs"));
}

TEST_CASE("ReplicationProtocol: WRITE_GROUP op whose offset + length "
          "overflows is refused",
          "[replication][protocol]") {
  for (int type : {1, 2, 3}) {
    INFO("op type " << type);
    Bytes payload = Concat({U64(1), U64(1), U32(1), B({type}), U32(0),
                            U64(kU64Max - 1), U64(2)});
    Status s = DecodeError(MakeFrame(FrameType::kWriteGroup, payload));
    CHECK(s.IsCorruption());
    CHECK_THAT(s.message(), StartsWith("WRITE_GROUP op 0: offset"));
    CHECK_THAT(s.message(), Contains("overflows"));
  }
  // Ending exactly at 2^64 - 1 does not overflow.
  Bytes edge = Concat({U64(1), U64(1), U32(1), B({2}), U32(0),
                       U64(kU64Max - 1), U64(1)});
  CHECK(DecodeAs<WriteGroup>(MakeFrame(FrameType::kWriteGroup, edge))
            .ops.at(0)
            .length == 1);
}

TEST_CASE("ReplicationProtocol: string longer than kMaxStringBytes is refused "
          "on decode",
          "[replication][protocol]") {
  const std::string too_long(kMaxStringBytes + 1, 'x');
  SECTION("HELLO site") {
    Status s = DecodeError(MakeFrame(
        FrameType::kHello,
        Concat({S(too_long), S("g"), U64(1), U32(0), S("gen")})));
    CHECK(s.IsCorruption());
    CHECK_THAT(s.message(),
               Equals("HELLO: site too long (1025 bytes, limit 1024)"));
  }
  SECTION("HELLO volume name") {
    Status s = DecodeError(MakeFrame(
        FrameType::kHello, Concat({S("a"), S("g"), U64(1), U32(1),
                                   S(too_long), U64(1), S("gen")})));
    CHECK_THAT(s.message(),
               Equals("HELLO volume 0: name too long (1025 bytes, limit "
                      "1024)"));
  }
  SECTION("ERROR message, even when the bytes are all there") {
    Status s = DecodeError(
        MakeFrame(FrameType::kError, Concat({U32(100), S(too_long)})));
    CHECK_THAT(s.message(), StartsWith("ERROR: message too long"));
  }
  SECTION("u16 length 0xffff with nothing behind it") {
    Status s = DecodeError(MakeFrame(FrameType::kHelloReply,
                                     Concat({U32(0), B({0xff, 0xff})})));
    CHECK_THAT(s.message(), StartsWith("HELLO_REPLY: site too long"));
  }
}

TEST_CASE("ReplicationProtocol: HELLO_REPLY with an unknown result is refused",
          "[replication][protocol]") {
  Status s = DecodeError(MakeFrame(
      FrameType::kHelloReply, Concat({U32(8), S("w"), S(""), S("g"), U64(0)})));
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Equals("HELLO_REPLY: unknown result 8"));
}

TEST_CASE("ReplicationProtocol: GROUP_ACK with durable_seq beyond "
          "received_seq is refused",
          "[replication][protocol]") {
  CHECK(DecodeAs<GroupAck>(MakeFrame(FrameType::kGroupAck,
                                     Concat({U64(4), U64(4)})))
            .durable_seq == 4);
  Status s =
      DecodeError(MakeFrame(FrameType::kGroupAck, Concat({U64(4), U64(5)})));
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(),
             Equals("GROUP_ACK: durable_seq 5 is beyond received_seq 4"));
}

// --- Link sequence -----------------------------------------------------------

TEST_CASE("ReplicationProtocol: CheckNextLinkSeq accepts last + 1",
          "[replication][protocol]") {
  CHECK(CheckNextLinkSeq(0, 1).ok());
  CHECK(CheckNextLinkSeq(41, 42).ok());
  CHECK(CheckNextLinkSeq(kU64Max - 1, kU64Max).ok());
}

TEST_CASE("ReplicationProtocol: CheckNextLinkSeq refuses a repeated link_seq",
          "[replication][protocol]") {
  Status s = CheckNextLinkSeq(41, 41);
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Contains("41 after 41"));
}

TEST_CASE("ReplicationProtocol: CheckNextLinkSeq refuses a lower link_seq",
          "[replication][protocol]") {
  Status s = CheckNextLinkSeq(41, 12);
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Contains("12") && Contains("41"));
  CHECK_FALSE(CheckNextLinkSeq(1, 0).ok());
}

TEST_CASE("ReplicationProtocol: CheckNextLinkSeq refuses a gap and names both "
          "numbers",
          "[replication][protocol]") {
  Status s = CheckNextLinkSeq(7, 9);
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(),
             Equals("WRITE_GROUP link_seq 9 after 7 skips groups: expected "
                    "8"));
  CHECK_FALSE(CheckNextLinkSeq(0, 2).ok());
  // No wrap to 0 after the largest link_seq.
  CHECK_FALSE(CheckNextLinkSeq(kU64Max, 0).ok());
}

// --- Encoder contract --------------------------------------------------------

TEST_CASE("ReplicationProtocol: encoders throw on a string over "
          "kMaxStringBytes and leave the buffer as it was",
          "[replication][protocol]") {
  const std::string too_long(kMaxStringBytes + 1, 'x');
  Bytes out = B({1, 2, 3});
  const Bytes before = out;
  Hello hello = SampleHello();
  SECTION("HELLO site") { hello.site = too_long; }
  SECTION("HELLO group") { hello.group = too_long; }
  SECTION("HELLO volume name") { hello.volumes[1].name = too_long; }
  SECTION("HELLO generation") { hello.generation = too_long; }
  CHECK_THROWS_AS(EncodeHello(hello, out), std::invalid_argument);
  CHECK(out == before);
  HelloReply reply;
  reply.message = too_long;
  CHECK_THROWS_AS(EncodeHelloReply(reply, out), std::invalid_argument);
  CHECK_THROWS_AS(EncodeError({.code = 1, .message = too_long}, out),
                  std::invalid_argument);
  CHECK(out == before);
}

TEST_CASE("ReplicationProtocol: EncodeWriteGroup throws when data size and "
          "length differ",
          "[replication][protocol]") {
  Bytes out;
  WriteGroup g = SampleGroup();
  SECTION("write with less data than length") { g.ops[0].length += 1; }
  SECTION("write with more data than length") { g.ops[3].length -= 1; }
  SECTION("trim carrying data") { g.ops[1].data = kData3; }
  SECTION("zero carrying data") { g.ops[2].data = kData8; }
  CHECK_THROWS_AS(EncodeWriteGroup(g, out), std::invalid_argument);
  CHECK(out.empty());
}

TEST_CASE("ReplicationProtocol: encoders throw on what the peer would refuse",
          "[replication][protocol]") {
  Bytes out;
  WriteGroup g = SampleGroup();
  SECTION("unknown group flags") {
    g.flags = 1u << 5;
    CHECK_THROWS_AS(EncodeWriteGroup(g, out), std::invalid_argument);
  }
  SECTION("unknown op type") {
    g.ops[1].type = static_cast<OpType>(9);
    CHECK_THROWS_AS(EncodeWriteGroup(g, out), std::invalid_argument);
  }
  SECTION("offset + length overflowing") {
    g.ops[1].offset = kU64Max;
    CHECK_THROWS_AS(EncodeWriteGroup(g, out), std::invalid_argument);
  }
  SECTION("more volumes than kMaxVolumesPerGroup") {
    Hello hello;
    hello.volumes.resize(kMaxVolumesPerGroup + 1);
    CHECK_THROWS_AS(EncodeHello(hello, out), std::invalid_argument);
  }
  SECTION("unknown HELLO_REPLY result") {
    HelloReply reply;
    reply.result = static_cast<HelloResult>(99);
    CHECK_THROWS_AS(EncodeHelloReply(reply, out), std::invalid_argument);
  }
  SECTION("durable_seq beyond received_seq") {
    CHECK_THROWS_AS(EncodeGroupAck({.received_seq = 1, .durable_seq = 2}, out),
                    std::invalid_argument);
  }
  CHECK(out.empty());
}

TEST_CASE("ReplicationProtocol: WriteGroupFrameBytes equals the encoded size",
          "[replication][protocol]") {
  std::vector<WriteGroup> groups(3);
  groups[0] = SampleGroup();
  groups[1].link_seq = 1;  // no ops
  const Bytes big(64 << 10, std::byte{7});
  groups[2].ops = {{OpType::kWrite, 0, 0, big.size(), big},
                   {OpType::kWrite, 3, 1 << 30, 0, {}},
                   {OpType::kZero, 1, 0, kU64Max, {}}};
  for (const WriteGroup& g : groups) {
    INFO(g.ops.size() << " ops");
    Bytes out = B({9, 9});
    EncodeWriteGroup(g, out);
    CHECK(WriteGroupFrameBytes(g) == out.size() - 2);
  }
}

TEST_CASE("ReplicationProtocol: names of frame types and hello results",
          "[replication][protocol]") {
  CHECK_THAT(FrameTypeName(FrameType::kHello), Equals("HELLO"));
  CHECK_THAT(FrameTypeName(FrameType::kWriteGroup), Equals("WRITE_GROUP"));
  CHECK_THAT(FrameTypeName(FrameType::kError), Equals("ERROR"));
  CHECK_THAT(FrameTypeName(FrameType::kGeneration), Equals("GENERATION"));
  CHECK_THAT(FrameTypeName(static_cast<FrameType>(99)), Equals("UNKNOWN"));
  CHECK_THAT(HelloResultName(HelloResult::kAccepted), Equals("ACCEPTED"));
  CHECK_THAT(HelloResultName(HelloResult::kSplitBrain), Equals("SPLIT_BRAIN"));
  CHECK_THAT(HelloResultName(static_cast<HelloResult>(99)), Equals("UNKNOWN"));
}

}  // namespace
}  // namespace blockrelay::replication
