// A connected downstream learns a new generation in sequence with the
// stream (GENERATION frame, protocol.h) instead of being disconnected: when
// another downstream link of the group goes down and the primary writes, it
// starts a new generation (generations.h), and a healthy downstream must
// neither reconnect nor resync for it.
#include <chrono>
#include <string>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "testutil/daemon.h"
#include "testutil/nbd_client.h"
#include "testutil/sites.h"

namespace blockrelay {
namespace {

using nlohmann::json;
using testutil::SitePair;

std::string GenerationOf(const testutil::TestDaemon& d) {
  auto st = testutil::StatusOf(d);
  if (!st) return "";
  for (const auto& g : (*st)["groups"]) {
    if (g.value("name", "") == "g") return g.value("generation", "");
  }
  return "";
}

TEST_CASE("Generations: a connected downstream takes a new generation without "
          "reconnecting when another link of the group is down",
          "[replication][generations]") {
  SitePair pair;
  // A second downstream, c, that never answers: the primary's first write
  // finds it down and starts a new generation.
  json& c = testutil::AddDownstream(pair.a().config(), "c",
                                    testutil::PickFreeTcpPort(), "async");
  c["initial_sync"] = "none";
  {
    Status s = pair.Start();
    INFO(s.ToString());
    REQUIRE(s.ok());
  }
  json last;
  REQUIRE(testutil::WaitCaughtUp(pair.a(), "g", "b", std::chrono::seconds(20), &last));
  const std::string before = GenerationOf(pair.a());
  REQUIRE_FALSE(before.empty());
  REQUIRE(GenerationOf(pair.b()) == before);

  {
    testutil::NbdOptions options;
    options.export_name = "data";
    std::string error;
    auto h = testutil::ConnectUnix(*pair.a().nbd_unix_socket(), options, &error);
    INFO(error);
    REQUIRE(h != nullptr);
    std::vector<std::byte> block(4096, std::byte{0x5c});
    REQUIRE(nbd_pwrite(h.get(), block.data(), block.size(), 8192, 0) == 0);
    REQUIRE(nbd_flush(h.get(), 0) == 0);
  }
  // The new generation reaches b over the live connection.
  REQUIRE(testutil::WaitUntil([&] { return GenerationOf(pair.a()) != before; },
                              std::chrono::seconds(10)));
  const std::string after = GenerationOf(pair.a());
  INFO("a's log:\n" << pair.a().ReadLog() << "\nb's log:\n" << pair.b().ReadLog());
  CHECK(testutil::WaitUntil([&] { return GenerationOf(pair.b()) == after; },
                            std::chrono::seconds(10)));
  REQUIRE(testutil::WaitCaughtUp(pair.a(), "g", "b", std::chrono::seconds(20), &last));
  auto link = testutil::LinkStatus(pair.a(), "g", "b");
  REQUIRE(link.has_value());
  CHECK(link->value("connects", 0) == 1);
  CHECK(link->value("state", "") == "replicating");
  CHECK(link->value("resync_bytes_sent", uint64_t{1}) == 0);
  CHECK(pair.CompareVolumes() == "");
}

}  // namespace
}  // namespace blockrelay
