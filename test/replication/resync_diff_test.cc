// Resync diffing (src/replication/resync_diff.h): the downstream saves and
// writes only the granules of a resync region that differ from what it
// holds.
#include "replication/resync_diff.h"

#include <cstdint>
#include <vector>

#include <catch2/catch.hpp>

namespace blockrelay::replication {
namespace {

using Bytes = std::vector<std::byte>;

Bytes Filled(size_t n, uint8_t value) { return Bytes(n, static_cast<std::byte>(value)); }

TEST_CASE("DifferingRuns: identical data changes nothing", "[replication][resync]") {
  const Bytes a = Filled(64 << 10, 7);
  CHECK(DifferingRuns(a, a).empty());
}

TEST_CASE("DifferingRuns: one changed byte marks exactly its granule",
          "[replication][resync]") {
  const Bytes current = Filled(64 << 10, 7);
  Bytes incoming = current;
  incoming[5 * 4096 + 100] = std::byte{8};
  CHECK(DifferingRuns(current, incoming) == std::vector<ByteRun>{{5 * 4096, 4096}});
}

TEST_CASE("DifferingRuns: adjacent changed granules merge into one run",
          "[replication][resync]") {
  const Bytes current = Filled(16 * 4096, 1);
  Bytes incoming = current;
  incoming[2 * 4096] = std::byte{2};
  incoming[3 * 4096 + 4095] = std::byte{2};
  incoming[9 * 4096 + 1] = std::byte{2};
  CHECK(DifferingRuns(current, incoming) ==
        std::vector<ByteRun>{{2 * 4096, 2 * 4096}, {9 * 4096, 4096}});
}

TEST_CASE("DifferingRuns: an empty current range stands for zeroes",
          "[replication][resync]") {
  Bytes incoming(3 * 4096);
  incoming[4096 + 7] = std::byte{1};
  CHECK(DifferingRuns({}, incoming) == std::vector<ByteRun>{{4096, 4096}});
  CHECK(DifferingRuns({}, Bytes(8192)).empty());
}

TEST_CASE("DifferingRuns: a short last granule is compared on its own",
          "[replication][resync]") {
  const Bytes current = Filled(4096 + 512, 3);
  Bytes incoming = current;
  incoming[4096 + 511] = std::byte{4};
  CHECK(DifferingRuns(current, incoming) == std::vector<ByteRun>{{4096, 512}});
}

TEST_CASE("NonZeroRuns: only granules holding data are zeroed", "[replication][resync]") {
  Bytes current(8 * 4096);
  current[0] = std::byte{1};
  current[6 * 4096 + 9] = std::byte{1};
  current[7 * 4096] = std::byte{1};
  CHECK(NonZeroRuns(current) == std::vector<ByteRun>{{0, 4096}, {6 * 4096, 2 * 4096}});
  CHECK(NonZeroRuns(Bytes(4096)).empty());
}

TEST_CASE("IsAllZero: tells zero-filled from not", "[replication][resync]") {
  CHECK(IsAllZero({}));
  CHECK(IsAllZero(Bytes(100)));
  Bytes b(100);
  b[99] = std::byte{1};
  CHECK_FALSE(IsAllZero(b));
}

}  // namespace
}  // namespace blockrelay::replication
