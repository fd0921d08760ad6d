#include <cerrno>

#include <catch2/catch.hpp>

#include "blockrelay/status.h"

using blockrelay::PosixError;
using blockrelay::PosixSyncError;
using blockrelay::Result;
using blockrelay::Status;

TEST_CASE("Status: PosixError maps ENOSPC to NoSpace and keeps errno", "[status]") {
  Status s = PosixError("pwrite /x at 4096", ENOSPC);
  CHECK(s.IsNoSpace());
  CHECK(s.errno_value() == ENOSPC);
  CHECK(s.ToString() == "No space: pwrite /x at 4096: No space left on device");
}

TEST_CASE("Status: a failed sync is an I/O error even when errno says ENOSPC",
          "[status]") {
  // The pages a failed fsync was to write may be lost: not a full disk that
  // making room fixes (the receiver retries only kNoSpace).
  Status s = PosixSyncError("fdatasync /x", ENOSPC);
  CHECK(s.IsIOError());
  CHECK_FALSE(s.IsNoSpace());
  CHECK(s.errno_value() == ENOSPC);
  CHECK(s.message() == "fdatasync /x: No space left on device");
}

TEST_CASE("Status: WithContext prefixes the message", "[status]") {
  Status s = Status::Corruption("bad crc").WithContext("superblock");
  CHECK(s.IsCorruption());
  CHECK(s.message() == "superblock: bad crc");
}

TEST_CASE("Result: holds a value or an error", "[status]") {
  Result<int> good = 7;
  REQUIRE(good.ok());
  CHECK(*good == 7);
  Result<int> bad = Status::InvalidArgument("nope");
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().IsInvalidArgument());
}
