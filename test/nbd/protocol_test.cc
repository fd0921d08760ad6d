// Byte layouts and decoder error paths of the pure NBD codec
// (src/nbd/protocol.h). Expected bytes are written out by hand from
// doc/proto.md, not produced by the encoders under test.
#include "nbd/protocol.h"

#include <cstring>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "testutil/nbd_raw_client.h"

namespace blockrelay::nbd {
namespace {

using testutil::InfoPayload;
using testutil::MetaContextPayload;

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

Bytes Str(std::string_view s) { return testutil::ToBytes(s); }

Bytes Prefix(const Bytes& b, size_t n) { return Bytes(b.begin(), b.begin() + n); }

// --- Byte order helpers ------------------------------------------------------

TEST_CASE("Codec: big-endian helpers write and read most significant first",
          "[nbd-codec]") {
  Bytes out;
  AppendBe16(out, 0x0102);
  AppendBe32(out, 0x03040506);
  AppendBe64(out, 0x0708090a0b0c0d0eull);
  CHECK(out == B({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14}));
  CHECK(LoadBe16(out.data()) == 0x0102);
  CHECK(LoadBe32(out.data() + 2) == 0x03040506);
  CHECK(LoadBe64(out.data() + 6) == 0x0708090a0b0c0d0eull);
  Bytes high = B({0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe});
  CHECK(LoadBe64(high.data()) == 0xfffffffffffffffeull);
  CHECK(LoadBe32(high.data()) == 0xffffffffu);
}

// --- Handshake messages -------------------------------------------------------

TEST_CASE("Codec: greeting is NBDMAGIC, IHAVEOPT and the u16 handshake flags",
          "[nbd-codec]") {
  Bytes g = EncodeGreeting(kFlagFixedNewstyle | kFlagNoZeroes);
  CHECK(g == Concat({Str("NBDMAGIC"), Str("IHAVEOPT"), B({0x00, 0x03})}));
  CHECK(g.size() == 18);
}

TEST_CASE("Codec: option header decodes option and length",
          "[nbd-codec]") {
  Bytes h = Concat({Str("IHAVEOPT"), B({0, 0, 0, 7}), B({0, 1, 0, 2})});
  auto r = DecodeOptionHeader(h);
  REQUIRE(r.ok());
  CHECK(r->option == kOptGo);
  CHECK(r->length == 0x00010002);
}

TEST_CASE("Codec: truncated option header is refused at every length",
          "[nbd-codec]") {
  Bytes h = Concat({Str("IHAVEOPT"), B({0, 0, 0, 7}), B({0, 0, 0, 0})});
  for (size_t n = 0; n < kOptionHeaderBytes; ++n) {
    INFO("length " << n);
    auto r = DecodeOptionHeader(Prefix(h, n));
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().IsCorruption());
  }
}

TEST_CASE("Codec: option header with bad magic is refused", "[nbd-codec]") {
  Bytes h = Concat({Str("IHAVEOPS"), B({0, 0, 0, 7}), B({0, 0, 0, 0})});
  auto r = DecodeOptionHeader(h);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().IsCorruption());
  // NBDMAGIC (a client replaying the greeting) is not IHAVEOPT either.
  Bytes g = Concat({Str("NBDMAGIC"), B({0, 0, 0, 7}), B({0, 0, 0, 0})});
  CHECK_FALSE(DecodeOptionHeader(g).ok());
}

TEST_CASE("Codec: option reply is magic, option, type, length, payload",
          "[nbd-codec]") {
  Bytes payload = B({0xaa, 0xbb});
  Bytes r = EncodeOptionReply(kOptList, kRepServer, payload);
  CHECK(r == B({0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9,  // magic
                0, 0, 0, 3,                                        // LIST
                0, 0, 0, 2,                                        // SERVER
                0, 0, 0, 2,                                        // length
                0xaa, 0xbb}));
  Bytes ack = EncodeOptionReply(kOptGo, kRepAck);
  CHECK(ack.size() == 20);
  CHECK(LoadBe32(ack.data() + 12) == kRepAck);
  CHECK(LoadBe32(ack.data() + 16) == 0);
}

TEST_CASE("Codec: option error sets bit 31 and carries the message",
          "[nbd-codec]") {
  Bytes r = EncodeOptionError(kOptInfo, kRepErrUnknown, "no");
  CHECK(r == Concat({B({0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9}),
                     B({0, 0, 0, 6}), B({0x80, 0, 0, 6}), B({0, 0, 0, 2}),
                     Str("no")}));
  CHECK(kRepErrUnsup == 0x80000001u);
  CHECK(kRepErrPolicy == 0x80000002u);
  CHECK(kRepErrInvalid == 0x80000003u);
  CHECK(kRepErrUnknown == 0x80000006u);
  CHECK(kRepErrShutdown == 0x80000007u);
  CHECK(kRepErrTooBig == 0x80000009u);
}

TEST_CASE("Codec: option error message is capped at 4096 bytes",
          "[nbd-codec]") {
  std::string long_message(5000, 'x');
  Bytes r = EncodeOptionError(kOptInfo, kRepErrInvalid, long_message);
  CHECK(LoadBe32(r.data() + 16) == kMaxStringBytes);
  CHECK(r.size() == 20 + kMaxStringBytes);
}

TEST_CASE("Codec: NBD_INFO_EXPORT is type 0, u64 size, u16 flags",
          "[nbd-codec]") {
  Bytes info = EncodeInfoExport(0x0102030405060708ull, 0x0d6d);
  CHECK(info == B({0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x0d, 0x6d}));
}

TEST_CASE("Codec: NBD_INFO_NAME and NBD_INFO_DESCRIPTION carry the string "
          "without a length",
          "[nbd-codec]") {
  CHECK(EncodeInfoName("disk") == Concat({B({0, 1}), Str("disk")}));
  CHECK(EncodeInfoDescription("a b") == Concat({B({0, 2}), Str("a b")}));
  CHECK(EncodeInfoName("") == B({0, 1}));
}

TEST_CASE("Codec: NBD_INFO_BLOCK_SIZE is type 3 and three u32 sizes",
          "[nbd-codec]") {
  Bytes info = EncodeInfoBlockSize(1, 4096, 32 << 20);
  CHECK(info == B({0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0}));
  CHECK(info.size() == 14);
}

TEST_CASE("Codec: NBD_REP_SERVER is u32 name length, name, description",
          "[nbd-codec]") {
  CHECK(EncodeRepServer("ab", "desc") ==
        Concat({B({0, 0, 0, 2}), Str("ab"), Str("desc")}));
  CHECK(EncodeRepServer("", "") == B({0, 0, 0, 0}));
}

TEST_CASE("Codec: NBD_REP_META_CONTEXT is u32 id then the name",
          "[nbd-codec]") {
  CHECK(EncodeRepMetaContext(1, "base:allocation") ==
        Concat({B({0, 0, 0, 1}), Str("base:allocation")}));
}

TEST_CASE("Codec: EXPORT_NAME reply has 124 zero bytes unless NO_ZEROES",
          "[nbd-codec]") {
  Bytes with = EncodeExportNameReply(0x1000, 0x0003, /*no_zeroes=*/false);
  REQUIRE(with.size() == 8 + 2 + 124);
  CHECK(Prefix(with, 10) == B({0, 0, 0, 0, 0, 0, 0x10, 0, 0, 3}));
  for (size_t i = 10; i < with.size(); ++i) {
    INFO("byte " << i);
    CHECK(with[i] == std::byte{0});
  }
  Bytes without = EncodeExportNameReply(0x1000, 0x0003, /*no_zeroes=*/true);
  CHECK(without == B({0, 0, 0, 0, 0, 0, 0x10, 0, 0, 3}));
}

// --- INFO / GO payloads ---------------------------------------------------------

TEST_CASE("Codec: INFO request round trip with info types", "[nbd-codec]") {
  auto r = DecodeInfoRequest(InfoPayload("disk", {kInfoName, kInfoBlockSize}));
  REQUIRE(r.ok());
  CHECK(r->export_name == "disk");
  CHECK(r->info_types == std::vector<uint16_t>{kInfoName, kInfoBlockSize});
}

TEST_CASE("Codec: INFO request layout is u32 namelen, name, u16 n, n x u16",
          "[nbd-codec]") {
  Bytes p = Concat({B({0, 0, 0, 1}), Str("x"), B({0, 2}), B({0, 3}),
                    B({0x12, 0x34})});
  auto r = DecodeInfoRequest(p);
  REQUIRE(r.ok());
  CHECK(r->export_name == "x");
  CHECK(r->info_types == std::vector<uint16_t>{3, 0x1234});
}

TEST_CASE("Codec: INFO request with an empty name and no info types",
          "[nbd-codec]") {
  auto r = DecodeInfoRequest(B({0, 0, 0, 0, 0, 0}));
  REQUIRE(r.ok());
  CHECK(r->export_name.empty());
  CHECK(r->info_types.empty());
}

TEST_CASE("Codec: truncated INFO request is refused at every length",
          "[nbd-codec]") {
  Bytes p = InfoPayload("disk", {kInfoName, kInfoDescription});
  for (size_t n = 0; n < p.size(); ++n) {
    INFO("length " << n << " of " << p.size());
    auto r = DecodeInfoRequest(Prefix(p, n));
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().IsInvalidArgument());
  }
}

TEST_CASE("Codec: INFO request whose name length runs past the data is "
          "refused",
          "[nbd-codec]") {
  // Claims 100 bytes of name, carries 4 plus a count.
  Bytes p = Concat({B({0, 0, 0, 100}), Str("disk"), B({0, 0})});
  CHECK_FALSE(DecodeInfoRequest(p).ok());
  // The largest u32 must not wrap any bounds arithmetic.
  Bytes q = Concat({B({0xff, 0xff, 0xff, 0xff}), Str("disk"), B({0, 0})});
  CHECK_FALSE(DecodeInfoRequest(q).ok());
}

TEST_CASE("Codec: INFO request with more info types announced than sent is "
          "refused",
          "[nbd-codec]") {
  Bytes p = Concat({B({0, 0, 0, 1}), Str("x"), B({0, 3}), B({0, 1}),
                    B({0, 2})});
  CHECK_FALSE(DecodeInfoRequest(p).ok());
  Bytes huge = Concat({B({0, 0, 0, 1}), Str("x"), B({0xff, 0xff})});
  CHECK_FALSE(DecodeInfoRequest(huge).ok());
}

TEST_CASE("Codec: INFO request with trailing bytes is refused",
          "[nbd-codec]") {
  Bytes p = InfoPayload("x", {kInfoName});
  p.push_back(std::byte{0});
  CHECK_FALSE(DecodeInfoRequest(p).ok());
  p.push_back(std::byte{1});  // a whole extra u16 the count does not cover
  CHECK_FALSE(DecodeInfoRequest(p).ok());
}

TEST_CASE("Codec: INFO request name of 4096 bytes is accepted, 4097 refused",
          "[nbd-codec]") {
  auto ok = DecodeInfoRequest(InfoPayload(std::string(4096, 'n')));
  REQUIRE(ok.ok());
  CHECK(ok->export_name.size() == 4096);
  auto too_long = DecodeInfoRequest(InfoPayload(std::string(4097, 'n')));
  REQUIRE_FALSE(too_long.ok());
  CHECK(too_long.status().IsInvalidArgument());
}

// --- META_CONTEXT payloads -------------------------------------------------------

TEST_CASE("Codec: meta context request round trip", "[nbd-codec]") {
  auto r = DecodeMetaContextRequest(
      MetaContextPayload("disk", {"base:allocation", "qemu:dirty-bitmap:b"}));
  REQUIRE(r.ok());
  CHECK(r->export_name == "disk");
  CHECK(r->queries ==
        std::vector<std::string>{"base:allocation", "qemu:dirty-bitmap:b"});
}

TEST_CASE("Codec: meta context request layout is u32 namelen, name, u32 n, "
          "{u32 len, query}",
          "[nbd-codec]") {
  Bytes p = Concat({B({0, 0, 0, 1}), Str("x"), B({0, 0, 0, 1}),
                    B({0, 0, 0, 5}), Str("base:")});
  auto r = DecodeMetaContextRequest(p);
  REQUIRE(r.ok());
  CHECK(r->export_name == "x");
  CHECK(r->queries == std::vector<std::string>{"base:"});
}

TEST_CASE("Codec: meta context request with zero queries", "[nbd-codec]") {
  auto r = DecodeMetaContextRequest(MetaContextPayload("", {}));
  REQUIRE(r.ok());
  CHECK(r->export_name.empty());
  CHECK(r->queries.empty());
}

TEST_CASE("Codec: truncated meta context request is refused at every length",
          "[nbd-codec]") {
  Bytes p = MetaContextPayload("disk", {"base:allocation", "x:y"});
  for (size_t n = 0; n < p.size(); ++n) {
    INFO("length " << n << " of " << p.size());
    auto r = DecodeMetaContextRequest(Prefix(p, n));
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().IsInvalidArgument());
  }
}

TEST_CASE("Codec: meta context request whose name length runs past the data "
          "is refused",
          "[nbd-codec]") {
  Bytes p = Concat({B({0, 0, 0, 50}), Str("disk"), B({0, 0, 0, 0})});
  CHECK_FALSE(DecodeMetaContextRequest(p).ok());
  Bytes q = Concat({B({0xff, 0xff, 0xff, 0xff}), Str("disk"), B({0, 0, 0, 0})});
  CHECK_FALSE(DecodeMetaContextRequest(q).ok());
}

TEST_CASE("Codec: meta context request with more queries announced than "
          "sent is refused",
          "[nbd-codec]") {
  Bytes p = Concat({B({0, 0, 0, 0}), B({0, 0, 0, 2}), B({0, 0, 0, 3}),
                    Str("a:b")});
  CHECK_FALSE(DecodeMetaContextRequest(p).ok());
}

TEST_CASE("Codec: meta context request with a huge query count is refused "
          "without allocating",
          "[nbd-codec]") {
  // Goal: a count of 2^32-1 with 8 bytes of data must fail fast, not try to
  // reserve 4 billion strings.
  Bytes p = Concat({B({0, 0, 0, 0}), B({0xff, 0xff, 0xff, 0xff}),
                    B({0, 0, 0, 0}), B({0, 0, 0, 0})});
  auto r = DecodeMetaContextRequest(p);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().IsInvalidArgument());
}

TEST_CASE("Codec: meta context request with fewer queries announced than "
          "sent is refused as trailing bytes",
          "[nbd-codec]") {
  Bytes p = Concat({B({0, 0, 0, 0}), B({0, 0, 0, 1}), B({0, 0, 0, 3}),
                    Str("a:b"), B({0, 0, 0, 3}), Str("c:d")});
  CHECK_FALSE(DecodeMetaContextRequest(p).ok());
}

TEST_CASE("Codec: meta context request with trailing bytes is refused",
          "[nbd-codec]") {
  Bytes p = MetaContextPayload("x", {"base:allocation"});
  p.push_back(std::byte{0});
  CHECK_FALSE(DecodeMetaContextRequest(p).ok());
}

TEST_CASE("Codec: meta context query length past the data is refused",
          "[nbd-codec]") {
  Bytes p = Concat({B({0, 0, 0, 0}), B({0, 0, 0, 1}), B({0, 0, 0, 200}),
                    Str("base:allocation")});
  CHECK_FALSE(DecodeMetaContextRequest(p).ok());
  Bytes q = Concat({B({0, 0, 0, 0}), B({0, 0, 0, 1}),
                    B({0xff, 0xff, 0xff, 0xff}), Str("base:allocation")});
  CHECK_FALSE(DecodeMetaContextRequest(q).ok());
}

TEST_CASE("Codec: meta context strings of 4096 bytes are accepted, 4097 "
          "refused",
          "[nbd-codec]") {
  std::string max(4096, 'q'), over(4097, 'q');
  CHECK(DecodeMetaContextRequest(MetaContextPayload(max, {max})).ok());
  CHECK_FALSE(DecodeMetaContextRequest(MetaContextPayload(over, {})).ok());
  CHECK_FALSE(DecodeMetaContextRequest(MetaContextPayload("x", {over})).ok());
  CHECK_FALSE(
      DecodeMetaContextRequest(MetaContextPayload("x", {"a", over})).ok());
}

// --- Transmission ------------------------------------------------------------

TEST_CASE("Codec: request layout is magic, flags, type, cookie, offset, "
          "length",
          "[nbd-codec]") {
  Request r{.flags = 0x0102,
            .type = 1,
            .cookie = 0x1112131415161718ull,
            .offset = 0x2122232425262728ull,
            .length = 0x31323334};
  Bytes wire = EncodeRequest(r);
  CHECK(wire == B({0x25, 0x60, 0x95, 0x13, 0x01, 0x02, 0x00, 0x01,
                   0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18,
                   0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28,
                   0x31, 0x32, 0x33, 0x34}));
  CHECK(wire.size() == kRequestHeaderBytes);
}

TEST_CASE("Codec: request decode round trip keeps unknown types and flags",
          "[nbd-codec]") {
  Request r{.flags = 0xffff,
            .type = 0x42,
            .cookie = ~0ull,
            .offset = 0xfffffffffffffe00ull,
            .length = 0xffffffff};
  auto d = DecodeRequest(EncodeRequest(r));
  REQUIRE(d.ok());
  CHECK(d->flags == r.flags);
  CHECK(d->type == r.type);
  CHECK(d->cookie == r.cookie);
  CHECK(d->offset == r.offset);
  CHECK(d->length == r.length);
}

TEST_CASE("Codec: truncated request header is refused at every length",
          "[nbd-codec]") {
  Bytes wire = EncodeRequest(Request{.type = 0, .length = 512});
  for (size_t n = 0; n < kRequestHeaderBytes; ++n) {
    INFO("length " << n);
    auto r = DecodeRequest(Prefix(wire, n));
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().IsCorruption());
  }
}

TEST_CASE("Codec: request with bad magic is refused", "[nbd-codec]") {
  Bytes wire = EncodeRequest(Request{.type = 0, .length = 512});
  for (int i = 0; i < 4; ++i) {
    Bytes bad = wire;
    bad[i] ^= std::byte{0x01};
    INFO("flipped magic byte " << i);
    auto r = DecodeRequest(bad);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().IsCorruption());
  }
  // The extended-header magic is not accepted either.
  Bytes ext = wire;
  ext[0] = std::byte{0x21}, ext[1] = std::byte{0xe4};
  ext[2] = std::byte{0x1c}, ext[3] = std::byte{0x71};
  CHECK_FALSE(DecodeRequest(ext).ok());
}

TEST_CASE("Codec: simple reply is magic, u32 error, u64 cookie",
          "[nbd-codec]") {
  Bytes out;
  AppendSimpleReply(out, kENOSPC, 0x0102030405060708ull);
  CHECK(out == B({0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 1, 2, 3, 4, 5, 6, 7,
                  8}));
  CHECK(out.size() == kSimpleReplyBytes);
}

TEST_CASE("Codec: structured chunk header is magic, flags, type, cookie, "
          "length",
          "[nbd-codec]") {
  Bytes out;
  AppendStructuredHeader(out, kReplyFlagDone, kReplyTypeOffsetData, 9, 0x208);
  CHECK(out == B({0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9,
                  0, 0, 0x02, 0x08}));
  CHECK(out.size() == kStructuredHeaderBytes);
}

TEST_CASE("Codec: NONE chunk carries DONE and no payload", "[nbd-codec]") {
  Bytes out;
  AppendStructuredDone(out, 5);
  CHECK(out == B({0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5,
                  0, 0, 0, 0}));
}

TEST_CASE("Codec: error chunk is type 0x8001 with u32 error, u16 message "
          "length and message",
          "[nbd-codec]") {
  Bytes out;
  AppendStructuredError(out, 7, kEINVAL, "bad");
  CHECK(out == Concat({B({0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 0x01}),
                       B({0, 0, 0, 0, 0, 0, 0, 7}), B({0, 0, 0, 9}),
                       B({0, 0, 0, 22}), B({0, 3}), Str("bad")}));
}

TEST_CASE("Codec: error chunk message is capped at 4096 bytes",
          "[nbd-codec]") {
  Bytes out;
  AppendStructuredError(out, 7, kEIO, std::string(70000, 'm'));
  // Must fit the u16 length field and the spec's string limit.
  CHECK(LoadBe32(out.data() + 16) == 6 + kMaxStringBytes);
  CHECK(LoadBe16(out.data() + 24) == kMaxStringBytes);
  CHECK(out.size() == kStructuredHeaderBytes + 6 + kMaxStringBytes);
}

TEST_CASE("Codec: block status chunk is context id then {length, flags} "
          "per extent",
          "[nbd-codec]") {
  Bytes out;
  std::vector<StatusExtent> extents = {{4096, 0}, {8192, kStateHole | kStateZero}};
  AppendBlockStatusChunk(out, 3, kBaseAllocationId, extents);
  CHECK(out == Concat({B({0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 5}),
                       B({0, 0, 0, 0, 0, 0, 0, 3}), B({0, 0, 0, 20}),
                       B({0, 0, 0, 1}), B({0, 0, 0x10, 0}), B({0, 0, 0, 0}),
                       B({0, 0, 0x20, 0}), B({0, 0, 0, 3})}));
}

TEST_CASE("Codec: wire constants match the spec", "[nbd-codec]") {
  CHECK(kOptReplyMagic == 0x0003e889045565a9ull);
  CHECK(kRequestMagic == 0x25609513u);
  CHECK(kSimpleReplyMagic == 0x67446698u);
  CHECK(kStructuredReplyMagic == 0x668e33efu);
  CHECK(kTxSendFastZero == 1 << 11);
  CHECK(kTxCanMultiConn == 1 << 8);
  CHECK(kTxSendCache == 1 << 10);
  CHECK(kCmdFlagFastZero == 1 << 4);
  CHECK(kEOVERFLOW == 75);
  CHECK(kESHUTDOWN == 108);
}

TEST_CASE("Codec: command and option names for logs", "[nbd-codec]") {
  CHECK(CommandName(0) == "READ");
  CHECK(CommandName(6) == "WRITE_ZEROES");
  CHECK(CommandName(7) == "BLOCK_STATUS");
  CHECK(CommandName(0x42) == "UNKNOWN");
  CHECK(OptionName(kOptGo) == "GO");
  CHECK(OptionName(kOptSetMetaContext) == "SET_META_CONTEXT");
  CHECK(OptionName(42) == "UNKNOWN");
}

}  // namespace
}  // namespace blockrelay::nbd
