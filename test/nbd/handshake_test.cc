// The Negotiator state machine (src/nbd/handshake.h) over a test catalog:
// every option, byte for byte, with no sockets.
#include "nbd/handshake.h"

#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "testutil/nbd_raw_client.h"

namespace blockrelay::nbd {
namespace {

using testutil::InfoPayload;
using testutil::MetaContextPayload;
using testutil::ToBytes;

class TestCatalog final : public ExportCatalog {
 public:
  TestCatalog() {
    exports_.push_back({.name = "disk",
                        .description = "the main disk",
                        .size_bytes = 1 << 20});
    exports_.push_back({.name = "ro",
                        .description = "read-only copy",
                        .size_bytes = 4096,
                        .read_only = true});
    exports_.push_back({.name = "slow",
                        .description = "no trim, no fast zero",
                        .size_bytes = 8192,
                        .can_trim = false,
                        .can_fast_zero = false});
  }
  std::optional<ExportInfo> Find(const std::string& name) const override {
    if (name.empty()) return exports_.front();
    for (const auto& e : exports_) {
      if (e.name == name) return e;
    }
    return std::nullopt;
  }
  std::vector<ExportInfo> List() const override { return exports_; }

 private:
  std::vector<ExportInfo> exports_;
};

struct Reply {
  uint32_t option = 0;
  uint32_t type = 0;
  Bytes payload;
};

// Splits concatenated option replies; fails the test on malformed bytes.
std::vector<Reply> Parse(const Bytes& bytes) {
  std::vector<Reply> out;
  size_t pos = 0;
  while (pos < bytes.size()) {
    REQUIRE(bytes.size() - pos >= 20);
    REQUIRE(LoadBe64(bytes.data() + pos) == kOptReplyMagic);
    Reply r;
    r.option = LoadBe32(bytes.data() + pos + 8);
    r.type = LoadBe32(bytes.data() + pos + 12);
    uint32_t length = LoadBe32(bytes.data() + pos + 16);
    REQUIRE(bytes.size() - pos - 20 >= length);
    r.payload.assign(bytes.begin() + pos + 20, bytes.begin() + pos + 20 + length);
    pos += 20 + length;
    out.push_back(std::move(r));
  }
  return out;
}

std::string AsString(const Bytes& b, size_t from = 0) {
  return std::string(reinterpret_cast<const char*>(b.data()) + from,
                     b.size() - from);
}

// The REP_INFO replies of one INFO/GO, by info type.
std::vector<Reply> InfosOfType(const std::vector<Reply>& replies,
                               uint16_t info_type) {
  std::vector<Reply> out;
  for (const auto& r : replies) {
    if (r.type == kRepInfo && r.payload.size() >= 2 &&
        LoadBe16(r.payload.data()) == info_type) {
      out.push_back(r);
    }
  }
  return out;
}

class NegotiatorTest {
 protected:
  TestCatalog catalog_;
  Negotiator negotiator_{catalog_, /*no_zeroes=*/true};

  Negotiator::Outcome Option(uint32_t option, const Bytes& payload = {}) {
    return negotiator_.HandleOption(option, payload);
  }
  // Sends `option` and expects exactly one error reply of `type`.
  void ExpectError(uint32_t option, const Bytes& payload, uint32_t type) {
    auto out = Option(option, payload);
    CHECK(out.next == Negotiator::Next::kContinue);
    auto replies = Parse(out.reply);
    REQUIRE(replies.size() == 1);
    CHECK(replies[0].option == option);
    CHECK(replies[0].type == type);
    CHECK_FALSE(out.log.empty());
  }
  void NegotiateStructuredReplies() {
    auto out = Option(kOptStructuredReply);
    auto replies = Parse(out.reply);
    REQUIRE(replies.size() == 1);
    REQUIRE(replies[0].type == kRepAck);
  }
  // SET_META_CONTEXT; returns the REP_META_CONTEXT replies' names.
  std::vector<std::string> SetMeta(const std::string& name,
                                   const std::vector<std::string>& queries) {
    auto out = Option(kOptSetMetaContext, MetaContextPayload(name, queries));
    auto replies = Parse(out.reply);
    REQUIRE_FALSE(replies.empty());
    REQUIRE(replies.back().type == kRepAck);
    std::vector<std::string> names;
    for (size_t i = 0; i + 1 < replies.size(); ++i) {
      REQUIRE(replies[i].type == kRepMetaContext);
      names.push_back(AsString(replies[i].payload, 4));
    }
    return names;
  }
  void Go(const std::string& name) {
    auto out = Option(kOptGo, InfoPayload(name));
    REQUIRE(out.next == Negotiator::Next::kEnterTransmission);
  }
};

// --- CheckClientFlags ------------------------------------------------------

TEST_CASE("Handshake: client flags FIXED_NEWSTYLE alone means zeroes are sent",
          "[nbd-handshake]") {
  auto r = CheckClientFlags(kClientFlagFixedNewstyle);
  REQUIRE(r.ok());
  CHECK_FALSE(*r);
}

TEST_CASE("Handshake: client flag NO_ZEROES is reported", "[nbd-handshake]") {
  auto r = CheckClientFlags(kClientFlagFixedNewstyle | kClientFlagNoZeroes);
  REQUIRE(r.ok());
  CHECK(*r);
}

TEST_CASE("Handshake: unknown client flags are refused", "[nbd-handshake]") {
  for (uint32_t bit = 2; bit < 32; ++bit) {
    INFO("bit " << bit);
    CHECK_FALSE(CheckClientFlags(kClientFlagFixedNewstyle | (1u << bit)).ok());
  }
}

TEST_CASE("Handshake: a client without FIXED_NEWSTYLE is refused",
          "[nbd-handshake]") {
  CHECK_FALSE(CheckClientFlags(0).ok());
  CHECK_FALSE(CheckClientFlags(kClientFlagNoZeroes).ok());
}

// --- Transmission flags ------------------------------------------------------

TEST_CASE("Handshake: a writable export advertises flush, FUA, trim, write "
          "zeroes, fast zero, cache and multi-conn",
          "[nbd-handshake]") {
  ExportInfo e{.name = "d", .size_bytes = 4096};
  uint16_t f = TransmissionFlags(e, /*structured_replies=*/false);
  CHECK(f == (kTxHasFlags | kTxSendFlush | kTxSendFua | kTxSendTrim |
              kTxSendWriteZeroes | kTxSendFastZero | kTxCanMultiConn |
              kTxSendCache));
  CHECK_FALSE(f & kTxReadOnly);
  CHECK_FALSE(f & kTxSendDf);
  CHECK_FALSE(f & kTxRotational);
}

TEST_CASE("Handshake: SEND_DF is set only with structured replies",
          "[nbd-handshake]") {
  ExportInfo e{.name = "d", .size_bytes = 4096};
  CHECK_FALSE(TransmissionFlags(e, false) & kTxSendDf);
  CHECK(TransmissionFlags(e, true) & kTxSendDf);
}

TEST_CASE("Handshake: a read-only export sets READ_ONLY and advertises no "
          "write commands",
          "[nbd-handshake]") {
  ExportInfo e{.name = "d", .size_bytes = 4096, .read_only = true};
  uint16_t f = TransmissionFlags(e, false);
  CHECK(f & kTxHasFlags);
  CHECK(f & kTxReadOnly);
  CHECK_FALSE(f & kTxSendTrim);
  CHECK_FALSE(f & kTxSendWriteZeroes);
  CHECK_FALSE(f & kTxSendFastZero);
  CHECK(f & kTxCanMultiConn);
}

TEST_CASE("Handshake: FAST_ZERO is never advertised without WRITE_ZEROES",
          "[nbd-handshake]") {
  for (bool ro : {false, true}) {
    for (bool trim : {false, true}) {
      for (bool fast : {false, true}) {
        for (bool sr : {false, true}) {
          ExportInfo e{.name = "d",
                       .size_bytes = 4096,
                       .read_only = ro,
                       .can_trim = trim,
                       .can_fast_zero = fast};
          uint16_t f = TransmissionFlags(e, sr);
          INFO("ro " << ro << " trim " << trim << " fast " << fast << " sr "
                     << sr << " flags " << f);
          if (f & kTxSendFastZero) CHECK((f & kTxSendWriteZeroes));
          CHECK(((f & kTxSendFastZero) != 0) == (!ro && fast));
          CHECK(((f & kTxSendTrim) != 0) == (!ro && trim));
        }
      }
    }
  }
}

// --- EXPORT_NAME --------------------------------------------------------------

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: EXPORT_NAME of a known export enters transmission "
                 "with size and flags",
                 "[nbd-handshake]") {
  auto out = Option(kOptExportName, ToBytes("ro"));
  CHECK(out.next == Negotiator::Next::kEnterTransmission);
  CHECK(out.reply == EncodeExportNameReply(
                         4096, kTxHasFlags | kTxReadOnly | kTxSendFlush |
                                   kTxSendFua | kTxCanMultiConn | kTxSendCache,
                         /*no_zeroes=*/true));
  CHECK(negotiator_.selected_export().name == "ro");
}

TEST_CASE("Handshake: EXPORT_NAME reply has 124 zero bytes when the client "
          "did not set NO_ZEROES",
          "[nbd-handshake]") {
  TestCatalog catalog;
  Negotiator negotiator(catalog, /*no_zeroes=*/false);
  auto out = negotiator.HandleOption(kOptExportName, ToBytes("disk"));
  CHECK(out.next == Negotiator::Next::kEnterTransmission);
  CHECK(out.reply.size() == 134);
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: EXPORT_NAME of an unknown export closes without "
                 "a reply",
                 "[nbd-handshake]") {
  auto out = Option(kOptExportName, ToBytes("nope"));
  CHECK(out.next == Negotiator::Next::kClose);
  CHECK(out.reply.empty());
  CHECK_FALSE(out.log.empty());
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: EXPORT_NAME \"\" selects the default export",
                 "[nbd-handshake]") {
  auto out = Option(kOptExportName, {});
  CHECK(out.next == Negotiator::Next::kEnterTransmission);
  CHECK(negotiator_.selected_export().name == "disk");
  CHECK(LoadBe64(out.reply.data()) == 1 << 20);
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: EXPORT_NAME after STRUCTURED_REPLY advertises DF",
                 "[nbd-handshake]") {
  NegotiateStructuredReplies();
  auto out = Option(kOptExportName, ToBytes("disk"));
  REQUIRE(out.next == Negotiator::Next::kEnterTransmission);
  CHECK(LoadBe16(out.reply.data() + 8) & kTxSendDf);
  CHECK(negotiator_.structured_replies());
}

// --- ABORT, LIST, STARTTLS --------------------------------------------------

TEST_CASE_METHOD(NegotiatorTest, "Handshake: ABORT is acknowledged and closes",
                 "[nbd-handshake]") {
  auto out = Option(kOptAbort);
  CHECK(out.next == Negotiator::Next::kClose);
  auto replies = Parse(out.reply);
  REQUIRE(replies.size() == 1);
  CHECK(replies[0].option == kOptAbort);
  CHECK(replies[0].type == kRepAck);
}

TEST_CASE_METHOD(NegotiatorTest, "Handshake: ABORT with data is still "
                 "acknowledged",
                 "[nbd-handshake]") {
  auto out = Option(kOptAbort, ToBytes("junk"));
  CHECK(out.next == Negotiator::Next::kClose);
  auto replies = Parse(out.reply);
  REQUIRE(replies.size() == 1);
  CHECK(replies[0].type == kRepAck);
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: LIST sends one REP_SERVER per export then ACK",
                 "[nbd-handshake]") {
  auto out = Option(kOptList);
  CHECK(out.next == Negotiator::Next::kContinue);
  auto replies = Parse(out.reply);
  REQUIRE(replies.size() == 4);
  std::vector<std::string> names;
  for (size_t i = 0; i < 3; ++i) {
    CHECK(replies[i].option == kOptList);
    REQUIRE(replies[i].type == kRepServer);
    uint32_t length = LoadBe32(replies[i].payload.data());
    names.push_back(AsString(replies[i].payload, 4).substr(0, length));
  }
  CHECK(names == std::vector<std::string>{"disk", "ro", "slow"});
  CHECK(replies[0].payload ==
        EncodeRepServer("disk", "the main disk"));
  CHECK(replies[3].type == kRepAck);
}

TEST_CASE_METHOD(NegotiatorTest, "Handshake: LIST with data is ERR_INVALID",
                 "[nbd-handshake]") {
  ExpectError(kOptList, ToBytes("x"), kRepErrInvalid);
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: STARTTLS is refused with ERR_POLICY",
                 "[nbd-handshake]") {
  ExpectError(kOptStartTls, {}, kRepErrPolicy);
  // The connection goes on in plain text.
  auto out = Option(kOptList);
  CHECK(Parse(out.reply).back().type == kRepAck);
}

// --- INFO / GO ---------------------------------------------------------------

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: INFO always sends NBD_INFO_EXPORT and does not "
                 "enter transmission",
                 "[nbd-handshake]") {
  auto out = Option(kOptInfo, InfoPayload("disk"));
  CHECK(out.next == Negotiator::Next::kContinue);
  auto replies = Parse(out.reply);
  REQUIRE_FALSE(replies.empty());
  CHECK(replies.back().type == kRepAck);
  for (const auto& r : replies) CHECK(r.option == kOptInfo);
  auto exports = InfosOfType(replies, kInfoExport);
  REQUIRE(exports.size() == 1);
  CHECK(exports[0].payload ==
        EncodeInfoExport(1 << 20, TransmissionFlags(*catalog_.Find("disk"),
                                                    false)));
  CHECK(InfosOfType(replies, kInfoName).empty());
  CHECK(InfosOfType(replies, kInfoDescription).empty());
}

TEST_CASE_METHOD(NegotiatorTest, "Handshake: INFO sends NAME when asked",
                 "[nbd-handshake]") {
  auto replies = Parse(Option(kOptInfo, InfoPayload("", {kInfoName})).reply);
  auto names = InfosOfType(replies, kInfoName);
  REQUIRE(names.size() == 1);
  // The default export's canonical name.
  CHECK(AsString(names[0].payload, 2) == "disk");
}

TEST_CASE_METHOD(NegotiatorTest, "Handshake: INFO sends DESCRIPTION when asked",
                 "[nbd-handshake]") {
  auto replies =
      Parse(Option(kOptInfo, InfoPayload("ro", {kInfoDescription})).reply);
  auto d = InfosOfType(replies, kInfoDescription);
  REQUIRE(d.size() == 1);
  CHECK(AsString(d[0].payload, 2) == "read-only copy");
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: INFO sends BLOCK_SIZE when asked",
                 "[nbd-handshake]") {
  auto replies =
      Parse(Option(kOptInfo, InfoPayload("disk", {kInfoBlockSize})).reply);
  auto bs = InfosOfType(replies, kInfoBlockSize);
  REQUIRE(bs.size() == 1);
  REQUIRE(bs[0].payload.size() == 14);
  uint32_t min = LoadBe32(bs[0].payload.data() + 2);
  uint32_t pref = LoadBe32(bs[0].payload.data() + 6);
  uint32_t max = LoadBe32(bs[0].payload.data() + 10);
  // The spec's rules for advertised constraints.
  CHECK(min == 1);
  CHECK(pref == 4096);
  CHECK(max == 32u << 20);
  CHECK((pref & (pref - 1)) == 0);
  CHECK(max >= pref);
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: INFO asking for a type twice gets it once",
                 "[nbd-handshake]") {
  auto replies = Parse(
      Option(kOptInfo, InfoPayload("disk", {kInfoName, kInfoName,
                                            kInfoBlockSize, kInfoBlockSize}))
          .reply);
  CHECK(InfosOfType(replies, kInfoName).size() == 1);
  CHECK(InfosOfType(replies, kInfoBlockSize).size() == 1);
  CHECK(InfosOfType(replies, kInfoExport).size() == 1);
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: INFO ignores unknown info types",
                 "[nbd-handshake]") {
  auto out = Option(kOptInfo, InfoPayload("disk", {0x7fff, 4, 0xffff}));
  auto replies = Parse(out.reply);
  REQUIRE_FALSE(replies.empty());
  CHECK(replies.back().type == kRepAck);
  for (const auto& r : replies) {
    if (r.type != kRepInfo) continue;
    uint16_t t = LoadBe16(r.payload.data());
    CHECK((t == kInfoExport || t == kInfoBlockSize));
  }
  CHECK(InfosOfType(replies, kInfoExport).size() == 1);
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: INFO for an unknown export is ERR_UNKNOWN",
                 "[nbd-handshake]") {
  ExpectError(kOptInfo, InfoPayload("nope"), kRepErrUnknown);
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: GO for an unknown export is ERR_UNKNOWN and "
                 "negotiation continues",
                 "[nbd-handshake]") {
  ExpectError(kOptGo, InfoPayload("nope"), kRepErrUnknown);
  Go("disk");
  CHECK(negotiator_.selected_export().name == "disk");
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: malformed INFO and GO are ERR_INVALID",
                 "[nbd-handshake]") {
  Bytes lying = InfoPayload("disk", {kInfoName});
  lying[3] = std::byte{200};  // name length past the end
  ExpectError(kOptInfo, lying, kRepErrInvalid);
  ExpectError(kOptGo, lying, kRepErrInvalid);
  ExpectError(kOptGo, Bytes{}, kRepErrInvalid);
  Bytes odd = InfoPayload("disk", {kInfoName});
  odd.push_back(std::byte{0});
  ExpectError(kOptGo, odd, kRepErrInvalid);
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: GO enters transmission with the chosen export",
                 "[nbd-handshake]") {
  auto out = Option(kOptGo, InfoPayload("slow"));
  CHECK(out.next == Negotiator::Next::kEnterTransmission);
  auto replies = Parse(out.reply);
  CHECK(replies.back().type == kRepAck);
  auto exports = InfosOfType(replies, kInfoExport);
  REQUIRE(exports.size() == 1);
  CHECK(LoadBe64(exports[0].payload.data() + 2) == 8192);
  CHECK(negotiator_.selected_export().name == "slow");
  CHECK(negotiator_.transmission_flags() ==
        LoadBe16(exports[0].payload.data() + 10));
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: GO with an empty name selects the default export",
                 "[nbd-handshake]") {
  Go("");
  CHECK(negotiator_.selected_export().name == "disk");
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: INFO then GO with equal parameters report the "
                 "same export info",
                 "[nbd-handshake]") {
  NegotiateStructuredReplies();
  auto info = Parse(Option(kOptInfo, InfoPayload("disk", {kInfoName})).reply);
  auto go = Parse(Option(kOptGo, InfoPayload("disk", {kInfoName})).reply);
  REQUIRE(info.size() == go.size());
  for (size_t i = 0; i < info.size(); ++i) {
    CHECK(info[i].type == go[i].type);
    CHECK(info[i].payload == go[i].payload);
  }
  CHECK(LoadBe16(InfosOfType(go, kInfoExport)[0].payload.data() + 10) &
        kTxSendDf);
}

// --- STRUCTURED_REPLY ----------------------------------------------------------

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: STRUCTURED_REPLY is acknowledged",
                 "[nbd-handshake]") {
  CHECK_FALSE(negotiator_.structured_replies());
  NegotiateStructuredReplies();
  CHECK(negotiator_.structured_replies());
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: STRUCTURED_REPLY with data is ERR_INVALID and "
                 "not negotiated",
                 "[nbd-handshake]") {
  ExpectError(kOptStructuredReply, ToBytes("x"), kRepErrInvalid);
  CHECK_FALSE(negotiator_.structured_replies());
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: a second STRUCTURED_REPLY is ERR_INVALID",
                 "[nbd-handshake]") {
  NegotiateStructuredReplies();
  ExpectError(kOptStructuredReply, {}, kRepErrInvalid);
  CHECK(negotiator_.structured_replies());
}

// --- LIST_META_CONTEXT -----------------------------------------------------------

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: LIST_META_CONTEXT base:allocation replies with "
                 "id 0",
                 "[nbd-handshake]") {
  auto out = Option(kOptListMetaContext,
                    MetaContextPayload("disk", {"base:allocation"}));
  auto replies = Parse(out.reply);
  REQUIRE(replies.size() == 2);
  CHECK(replies[0].type == kRepMetaContext);
  CHECK(replies[0].payload == EncodeRepMetaContext(0, "base:allocation"));
  CHECK(replies[1].type == kRepAck);
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: LIST_META_CONTEXT works without structured "
                 "replies",
                 "[nbd-handshake]") {
  REQUIRE_FALSE(negotiator_.structured_replies());
  auto replies = Parse(
      Option(kOptListMetaContext, MetaContextPayload("", {"base:allocation"}))
          .reply);
  CHECK(replies.size() == 2);
  CHECK(replies.back().type == kRepAck);
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: LIST_META_CONTEXT \"base:\" is a wildcard",
                 "[nbd-handshake]") {
  auto replies = Parse(
      Option(kOptListMetaContext, MetaContextPayload("disk", {"base:"})).reply);
  REQUIRE(replies.size() == 2);
  CHECK(AsString(replies[0].payload, 4) == "base:allocation");
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: LIST_META_CONTEXT with no queries lists every "
                 "context",
                 "[nbd-handshake]") {
  auto replies =
      Parse(Option(kOptListMetaContext, MetaContextPayload("disk", {})).reply);
  REQUIRE(replies.size() == 2);
  CHECK(AsString(replies[0].payload, 4) == "base:allocation");
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: LIST_META_CONTEXT ignores unknown namespaces",
                 "[nbd-handshake]") {
  auto replies = Parse(Option(kOptListMetaContext,
                              MetaContextPayload("disk", {"qemu:dirty-bitmap:a",
                                                          "base:nonsense"}))
                           .reply);
  REQUIRE(replies.size() == 1);
  CHECK(replies[0].type == kRepAck);
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: LIST_META_CONTEXT for an unknown export is "
                 "ERR_UNKNOWN",
                 "[nbd-handshake]") {
  ExpectError(kOptListMetaContext,
              MetaContextPayload("nope", {"base:allocation"}), kRepErrUnknown);
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: malformed LIST_META_CONTEXT is ERR_INVALID",
                 "[nbd-handshake]") {
  Bytes p = MetaContextPayload("disk", {"base:allocation"});
  p.pop_back();
  ExpectError(kOptListMetaContext, p, kRepErrInvalid);
}

// --- SET_META_CONTEXT -------------------------------------------------------------

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: SET_META_CONTEXT before structured replies is "
                 "ERR_INVALID",
                 "[nbd-handshake]") {
  ExpectError(kOptSetMetaContext,
              MetaContextPayload("disk", {"base:allocation"}), kRepErrInvalid);
  Go("disk");
  CHECK_FALSE(negotiator_.base_allocation_selected());
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: SET_META_CONTEXT base:allocation is used after "
                 "GO on the same export",
                 "[nbd-handshake]") {
  NegotiateStructuredReplies();
  auto out = Option(kOptSetMetaContext,
                    MetaContextPayload("disk", {"base:allocation"}));
  auto replies = Parse(out.reply);
  REQUIRE(replies.size() == 2);
  CHECK(replies[0].type == kRepMetaContext);
  CHECK(replies[0].payload ==
        EncodeRepMetaContext(kBaseAllocationId, "base:allocation"));
  CHECK(replies[1].type == kRepAck);
  Go("disk");
  CHECK(negotiator_.base_allocation_selected());
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: SET_META_CONTEXT on \"\" applies to GO on the "
                 "default export by name",
                 "[nbd-handshake]") {
  NegotiateStructuredReplies();
  CHECK(SetMeta("", {"base:allocation"}) ==
        std::vector<std::string>{"base:allocation"});
  Go("disk");
  CHECK(negotiator_.base_allocation_selected());
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: SET_META_CONTEXT \"base:\" selects nothing",
                 "[nbd-handshake]") {
  NegotiateStructuredReplies();
  CHECK(SetMeta("disk", {"base:"}).empty());
  Go("disk");
  CHECK_FALSE(negotiator_.base_allocation_selected());
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: SET_META_CONTEXT ignores unknown namespaces",
                 "[nbd-handshake]") {
  NegotiateStructuredReplies();
  CHECK(SetMeta("disk", {"qemu:dirty-bitmap:x", "base:allocation"}) ==
        std::vector<std::string>{"base:allocation"});
  CHECK(SetMeta("disk", {"qemu:dirty-bitmap:x"}).empty());
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: SET_META_CONTEXT with zero queries selects none",
                 "[nbd-handshake]") {
  NegotiateStructuredReplies();
  REQUIRE(SetMeta("disk", {"base:allocation"}).size() == 1);
  CHECK(SetMeta("disk", {}).empty());
  Go("disk");
  CHECK_FALSE(negotiator_.base_allocation_selected());
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: a failed SET_META_CONTEXT still clears the "
                 "selection",
                 "[nbd-handshake]") {
  NegotiateStructuredReplies();
  REQUIRE(SetMeta("disk", {"base:allocation"}).size() == 1);
  ExpectError(kOptSetMetaContext,
              MetaContextPayload("nope", {"base:allocation"}), kRepErrUnknown);
  Go("disk");
  CHECK_FALSE(negotiator_.base_allocation_selected());
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: SET_META_CONTEXT for another export does not "
                 "apply after GO on a different export",
                 "[nbd-handshake]") {
  NegotiateStructuredReplies();
  REQUIRE(SetMeta("ro", {"base:allocation"}).size() == 1);
  Go("disk");
  CHECK_FALSE(negotiator_.base_allocation_selected());
}

// --- Unknown and oversized options -------------------------------------------

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: unknown option is ERR_UNSUP and the next option "
                 "is still handled",
                 "[nbd-handshake]") {
  ExpectError(42, ToBytes("some data"), kRepErrUnsup);
  ExpectError(4, {}, kRepErrUnsup);    // NBD_OPT_PEEK_EXPORT, withdrawn
  ExpectError(11, {}, kRepErrUnsup);   // EXTENDED_HEADERS, not implemented
  auto replies = Parse(Option(kOptList).reply);
  CHECK(replies.back().type == kRepAck);
  Go("disk");
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: oversized option is ERR_TOO_BIG and negotiation "
                 "continues",
                 "[nbd-handshake]") {
  auto out = negotiator_.HandleOversizedOption(kOptGo, kMaxOptionBytes + 1);
  CHECK(out.next == Negotiator::Next::kContinue);
  auto replies = Parse(out.reply);
  REQUIRE(replies.size() == 1);
  CHECK(replies[0].option == kOptGo);
  CHECK(replies[0].type == kRepErrTooBig);
  Go("disk");
}

TEST_CASE_METHOD(NegotiatorTest,
                 "Handshake: oversized EXPORT_NAME closes without a reply",
                 "[nbd-handshake]") {
  auto out = negotiator_.HandleOversizedOption(kOptExportName, 1u << 20);
  CHECK(out.next == Negotiator::Next::kClose);
  CHECK(out.reply.empty());
}

}  // namespace
}  // namespace blockrelay::nbd
