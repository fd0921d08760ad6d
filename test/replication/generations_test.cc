// The generation decision at HELLO (src/replication/generations.h): what an
// upstream may do to a downstream, from both sides' generations, and the
// wire form of a generation set.
#include <string>

#include <catch2/catch.hpp>

#include "replication/generations.h"

namespace blockrelay::replication {
namespace {

using Catch::Matchers::Contains;
using storage::Generation;
using storage::Uuid;

Generation Gen(uint64_t counter) { return Generation{Uuid::Random(), counter}; }

GenerationDecision Decide(const GenerationSet& up, const GenerationSet& down,
                          bool fresh = false, bool follows = false,
                          bool discard = false) {
  return DecideGenerations("db", {"paris", up}, {"berlin", down}, fresh, follows,
                           discard);
}

TEST_CASE("DecideGenerations: the same current generation streams", "[generations]") {
  const Generation g = Gen(3);
  auto d = Decide({g, {Gen(2)}}, {g, {}});
  CHECK(d.accepted);
  CHECK(d.verdict == GenerationVerdict::kSame);
}

TEST_CASE("DecideGenerations: a downstream whose generation the upstream left behind is "
          "accepted as behind (failback)", "[generations]") {
  const Generation old = Gen(1);
  auto d = Decide({Gen(2), {old}}, {old, {}});
  CHECK(d.accepted);
  CHECK(d.verdict == GenerationVerdict::kDownstreamBehind);
  CHECK_THAT(d.message, Contains("berlin") && Contains("behind") && Contains("paris"));
}

TEST_CASE("DecideGenerations: an upstream whose generation the downstream left behind is "
          "refused as stale", "[generations]") {
  const Generation old = Gen(1);
  auto d = Decide({old, {}}, {Gen(2), {old}});
  CHECK_FALSE(d.accepted);
  CHECK(d.verdict == GenerationVerdict::kUpstreamStale);
  CHECK_THAT(d.message, Contains(GenerationName(old)) && Contains("not demoted") &&
                            Contains("nothing written"));
}

TEST_CASE("DecideGenerations: unrelated generations are a split brain naming both",
          "[generations]") {
  const Generation base = Gen(1), ours = Gen(2), theirs = Gen(2);
  auto d = Decide({theirs, {base}}, {ours, {base}});
  CHECK_FALSE(d.accepted);
  CHECK(d.verdict == GenerationVerdict::kSplitBrain);
  CHECK_THAT(d.message, Contains("split brain") && Contains(GenerationName(theirs)) &&
                            Contains(GenerationName(ours)) && Contains("paris") &&
                            Contains("berlin") &&
                            Contains("resync db --link paris --discard-local"));
}

TEST_CASE("DecideGenerations: discard_local accepts a split brain and a stale upstream",
          "[generations]") {
  const Generation base = Gen(1);
  SECTION("split brain") {
    auto d = Decide({Gen(2), {base}}, {Gen(2), {base}}, false, false, true);
    CHECK(d.accepted);
    CHECK(d.verdict == GenerationVerdict::kDiscardLocal);
    CHECK_THAT(d.message, Contains("discard"));
  }
  SECTION("stale upstream") {
    auto d = Decide({base, {}}, {Gen(2), {base}}, false, false, true);
    CHECK(d.accepted);
    CHECK(d.verdict == GenerationVerdict::kDiscardLocal);
  }
}

TEST_CASE("DecideGenerations: a fresh downstream takes any upstream (initial sync)",
          "[generations]") {
  auto d = Decide({Gen(5), {Gen(4)}}, {Gen(1), {}}, /*fresh=*/true);
  CHECK(d.accepted);
  CHECK(d.verdict == GenerationVerdict::kInitial);
}

TEST_CASE("DecideGenerations: a downstream that only followed this upstream accepts its "
          "newer generations, however many", "[generations]") {
  auto d = Decide({Gen(9), {Gen(8), Gen(7), Gen(6), Gen(5)}}, {Gen(2), {Gen(1)}},
                  false, /*follows=*/true);
  CHECK(d.accepted);
  CHECK(d.verdict == GenerationVerdict::kFollower);
}

TEST_CASE("ParseGenerations: the wire form round-trips current and history",
          "[generations]") {
  GenerationSet set{Gen(4), {Gen(3), Gen(1)}};
  auto parsed = ParseGenerations(EncodeGenerations(set));
  REQUIRE(parsed.ok());
  CHECK(*parsed == set);
  CHECK_THAT(EncodeGenerations(set), Contains(set.current.uuid.ToString() + ":4,"));
}

TEST_CASE("ParseGenerations: malformed input is refused naming the part", "[generations]") {
  const std::string u = Uuid::Random().ToString();
  SECTION("empty") {
    auto r = ParseGenerations("");
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().message(), Contains("no generation"));
  }
  SECTION("no counter") {
    auto r = ParseGenerations(u);
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().message(), Contains("<uuid>:<counter>"));
  }
  SECTION("bad uuid") {
    auto r = ParseGenerations("gen-1:1");
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().message(), Contains("uuid"));
  }
  SECTION("counter zero or not a number") {
    for (const char* c : {":0", ":x", ":", ":1x"}) {
      auto r = ParseGenerations(u + c);
      REQUIRE_FALSE(r.ok());
      CHECK_THAT(r.status().message(), Contains("counter"));
    }
  }
  SECTION("an empty history entry") {
    auto r = ParseGenerations(u + ":2,");
    REQUIRE_FALSE(r.ok());
  }
  SECTION("too many") {
    std::string text = u + ":1";
    for (size_t i = 0; i < kMaxGenerations; ++i) text += "," + u + ":1";
    auto r = ParseGenerations(text);
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().message(), Contains("more than"));
  }
}

}  // namespace
}  // namespace blockrelay::replication
