// ValidateRequest() and ToNbdError() (src/nbd/request_validation.h): one
// TEST_CASE per rule of doc/proto.md's "Request types" and "Error values".
#include "nbd/request_validation.h"

#include <catch2/catch.hpp>

namespace blockrelay::nbd {
namespace {

constexpr uint64_t kSize = 1 << 20;

TransmissionState Writable() {
  return {.size_bytes = kSize, .read_only = false, .structured_replies = false};
}
TransmissionState Structured() {
  return {.size_bytes = kSize,
          .read_only = false,
          .structured_replies = true,
          .base_allocation = true};
}
TransmissionState ReadOnly() {
  return {.size_bytes = kSize, .read_only = true, .structured_replies = true,
          .base_allocation = true};
}

Request Req(Command c, uint64_t offset, uint32_t length, uint16_t flags = 0) {
  return {.flags = flags,
          .type = static_cast<uint16_t>(c),
          .cookie = 1,
          .offset = offset,
          .length = length};
}

// The error ValidateRequest() gives, 0 when the request is accepted.
uint32_t ErrorOf(const Request& r, const TransmissionState& s) {
  auto rejection = ValidateRequest(r, s);
  if (!rejection) return 0;
  CHECK_FALSE(rejection->reason.empty());
  return rejection->error;
}

TEST_CASE("Validation: in-range requests of every command are accepted",
          "[nbd-codec]") {
  auto s = Structured();
  CHECK(ErrorOf(Req(Command::kRead, 0, 4096), s) == 0);
  CHECK(ErrorOf(Req(Command::kWrite, kSize - 512, 512), s) == 0);
  CHECK(ErrorOf(Req(Command::kDisc, 0, 0), s) == 0);
  CHECK(ErrorOf(Req(Command::kFlush, 0, 0), s) == 0);
  CHECK(ErrorOf(Req(Command::kTrim, 0, kSize), s) == 0);
  CHECK(ErrorOf(Req(Command::kCache, 4096, 4096), s) == 0);
  CHECK(ErrorOf(Req(Command::kWriteZeroes, 0, kSize), s) == 0);
  CHECK(ErrorOf(Req(Command::kBlockStatus, 0, kSize), s) == 0);
}

TEST_CASE("Validation: unknown command is EINVAL", "[nbd-codec]") {
  CHECK(ErrorOf(Request{.type = 8, .length = 512}, Structured()) == kEINVAL);
  CHECK(ErrorOf(Request{.type = 0x42, .length = 512}, Structured()) == kEINVAL);
  CHECK(ErrorOf(Request{.type = 0xffff}, Structured()) == kEINVAL);
}

TEST_CASE("Validation: flags not defined by the spec are EINVAL on every "
          "command",
          "[nbd-codec]") {
  for (uint16_t type = 0; type <= 7; ++type) {
    for (uint16_t bit = 5; bit < 16; ++bit) {
      INFO("command " << type << " flag bit " << bit);
      Request r = Req(static_cast<Command>(type), 0, 512, 1u << bit);
      CHECK(ErrorOf(r, Structured()) == kEINVAL);
    }
  }
}

TEST_CASE("Validation: FUA is accepted on every command", "[nbd-codec]") {
  for (uint16_t type = 0; type <= 7; ++type) {
    INFO("command " << type);
    Request r = Req(static_cast<Command>(type), 0, 512, kCmdFlagFua);
    CHECK(ErrorOf(r, Structured()) == 0);
  }
}

TEST_CASE("Validation: NO_HOLE is EINVAL except on WRITE_ZEROES",
          "[nbd-codec]") {
  auto s = Structured();
  CHECK(ErrorOf(Req(Command::kWrite, 0, 512, kCmdFlagNoHole), s) == kEINVAL);
  CHECK(ErrorOf(Req(Command::kRead, 0, 512, kCmdFlagNoHole), s) == kEINVAL);
  CHECK(ErrorOf(Req(Command::kTrim, 0, 512, kCmdFlagNoHole), s) == kEINVAL);
  CHECK(ErrorOf(Req(Command::kWriteZeroes, 0, 512, kCmdFlagNoHole), s) == 0);
}

TEST_CASE("Validation: FAST_ZERO is EINVAL except on WRITE_ZEROES",
          "[nbd-codec]") {
  auto s = Structured();
  CHECK(ErrorOf(Req(Command::kWrite, 0, 512, kCmdFlagFastZero), s) == kEINVAL);
  CHECK(ErrorOf(Req(Command::kTrim, 0, 512, kCmdFlagFastZero), s) == kEINVAL);
  CHECK(ErrorOf(Req(Command::kWriteZeroes, 0, 512,
                    kCmdFlagFastZero | kCmdFlagNoHole),
                s) == 0);
}

TEST_CASE("Validation: REQ_ONE is EINVAL except on BLOCK_STATUS",
          "[nbd-codec]") {
  auto s = Structured();
  CHECK(ErrorOf(Req(Command::kRead, 0, 512, kCmdFlagReqOne), s) == kEINVAL);
  CHECK(ErrorOf(Req(Command::kWrite, 0, 512, kCmdFlagReqOne), s) == kEINVAL);
  CHECK(ErrorOf(Req(Command::kBlockStatus, 0, 512, kCmdFlagReqOne), s) == 0);
}

TEST_CASE("Validation: DF is accepted on READ with structured replies only",
          "[nbd-codec]") {
  CHECK(ErrorOf(Req(Command::kRead, 0, 512, kCmdFlagDf), Structured()) == 0);
  CHECK(ErrorOf(Req(Command::kRead, 0, 512, kCmdFlagDf), Writable()) ==
        kEINVAL);
  CHECK(ErrorOf(Req(Command::kWrite, 0, 512, kCmdFlagDf), Structured()) ==
        kEINVAL);
}

TEST_CASE("Validation: write commands on a read-only export are EPERM",
          "[nbd-codec]") {
  auto s = ReadOnly();
  CHECK(ErrorOf(Req(Command::kWrite, 0, 512), s) == kEPERM);
  CHECK(ErrorOf(Req(Command::kTrim, 0, 512), s) == kEPERM);
  CHECK(ErrorOf(Req(Command::kWriteZeroes, 0, 512), s) == kEPERM);
}

TEST_CASE("Validation: reads, flush, cache and block status work on a "
          "read-only export",
          "[nbd-codec]") {
  auto s = ReadOnly();
  CHECK(ErrorOf(Req(Command::kRead, 0, 512), s) == 0);
  CHECK(ErrorOf(Req(Command::kFlush, 0, 0), s) == 0);
  CHECK(ErrorOf(Req(Command::kCache, 0, 512), s) == 0);
  CHECK(ErrorOf(Req(Command::kBlockStatus, 0, 512), s) == 0);
}

TEST_CASE("Validation: WRITE and WRITE_ZEROES past the end are ENOSPC",
          "[nbd-codec]") {
  auto s = Writable();
  CHECK(ErrorOf(Req(Command::kWrite, kSize - 511, 512), s) == kENOSPC);
  CHECK(ErrorOf(Req(Command::kWrite, kSize, 1), s) == kENOSPC);
  CHECK(ErrorOf(Req(Command::kWriteZeroes, kSize - 512, 1024), s) == kENOSPC);
  CHECK(ErrorOf(Req(Command::kWriteZeroes, kSize * 2, 512), s) == kENOSPC);
}

TEST_CASE("Validation: READ, TRIM, CACHE and BLOCK_STATUS past the end are "
          "EINVAL",
          "[nbd-codec]") {
  auto s = Structured();
  CHECK(ErrorOf(Req(Command::kRead, kSize - 511, 512), s) == kEINVAL);
  CHECK(ErrorOf(Req(Command::kRead, kSize, 1), s) == kEINVAL);
  CHECK(ErrorOf(Req(Command::kTrim, kSize - 512, 1024), s) == kEINVAL);
  CHECK(ErrorOf(Req(Command::kCache, kSize, 512), s) == kEINVAL);
  CHECK(ErrorOf(Req(Command::kBlockStatus, kSize, 512), s) == kEINVAL);
}

TEST_CASE("Validation: a request ending exactly at the end is accepted",
          "[nbd-codec]") {
  auto s = Structured();
  CHECK(ErrorOf(Req(Command::kRead, kSize - 512, 512), s) == 0);
  CHECK(ErrorOf(Req(Command::kWrite, kSize - 1, 1), s) == 0);
}

TEST_CASE("Validation: offset plus length wrapping past 2^64 is EINVAL",
          "[nbd-codec]") {
  auto s = Structured();
  constexpr uint64_t kTop = ~0ull;
  CHECK(ErrorOf(Req(Command::kRead, kTop - 100, 512), s) == kEINVAL);
  // Wrapping is a bad request, not "no space", even for writes.
  CHECK(ErrorOf(Req(Command::kWrite, kTop - 100, 512), s) == kEINVAL);
  CHECK(ErrorOf(Req(Command::kWriteZeroes, kTop, 2), s) == kEINVAL);
  CHECK(ErrorOf(Req(Command::kTrim, kTop - 1, 0xffffffff), s) == kEINVAL);
}

TEST_CASE("Validation: READ larger than the payload limit is EOVERFLOW",
          "[nbd-codec]") {
  CHECK(ErrorOf(Req(Command::kRead, 0, kMaxRequestPayloadBytes + 1),
                Structured()) == kEOVERFLOW);
  TransmissionState big = Structured();
  big.size_bytes = 1ull << 40;
  CHECK(ErrorOf(Req(Command::kRead, 0, kMaxRequestPayloadBytes), big) == 0);
  CHECK(ErrorOf(Req(Command::kRead, 0, kMaxRequestPayloadBytes + 1), big) ==
        kEOVERFLOW);
}

TEST_CASE("Validation: WRITE larger than the payload limit is EINVAL",
          "[nbd-codec]") {
  TransmissionState big = Writable();
  big.size_bytes = 1ull << 40;
  CHECK(ErrorOf(Req(Command::kWrite, 0, kMaxRequestPayloadBytes + 1), big) ==
        kEINVAL);
  CHECK(ErrorOf(Req(Command::kWrite, 0, kMaxRequestPayloadBytes), big) == 0);
}

TEST_CASE("Validation: TRIM and WRITE_ZEROES may exceed the payload limit",
          "[nbd-codec]") {
  TransmissionState big = Writable();
  big.size_bytes = 1ull << 40;
  CHECK(ErrorOf(Req(Command::kTrim, 0, 0xffffffff), big) == 0);
  CHECK(ErrorOf(Req(Command::kWriteZeroes, 0, 0xffffffff), big) == 0);
}

TEST_CASE("Validation: BLOCK_STATUS without a negotiated context is EINVAL",
          "[nbd-codec]") {
  auto no_context = Structured();
  no_context.base_allocation = false;
  CHECK(ErrorOf(Req(Command::kBlockStatus, 0, 512), no_context) == kEINVAL);
  auto no_structured = Writable();
  no_structured.base_allocation = true;
  CHECK(ErrorOf(Req(Command::kBlockStatus, 0, 512), no_structured) == kEINVAL);
}

TEST_CASE("Validation: zero-length READ, WRITE, TRIM, WRITE_ZEROES and CACHE "
          "are accepted",
          "[nbd-codec]") {
  auto s = Structured();
  for (auto c : {Command::kRead, Command::kWrite, Command::kTrim,
                 Command::kWriteZeroes, Command::kCache}) {
    INFO("command " << static_cast<int>(c));
    CHECK(ErrorOf(Req(c, 0, 0), s) == 0);
    CHECK(ErrorOf(Req(c, kSize, 0), s) == 0);  // at the very end
  }
}

TEST_CASE("Validation: zero-length BLOCK_STATUS is EINVAL", "[nbd-codec]") {
  CHECK(ErrorOf(Req(Command::kBlockStatus, 0, 0), Structured()) == kEINVAL);
}

TEST_CASE("Validation: FLUSH ignores offset and length", "[nbd-codec]") {
  CHECK(ErrorOf(Req(Command::kFlush, kSize * 4, 512), Writable()) == 0);
}

// --- ToNbdError ---------------------------------------------------------------

TEST_CASE("ToNbdError: each Status code maps to one NBD error", "[nbd-codec]") {
  CHECK(ToNbdError(Status::OK()) == 0);
  CHECK(ToNbdError(Status::NoSpace("full", ENOSPC)) == kENOSPC);
  CHECK(ToNbdError(Status::PermissionDenied("ro")) == kEPERM);
  CHECK(ToNbdError(Status::InvalidArgument("bad")) == kEINVAL);
  CHECK(ToNbdError(Status::NotSupported("slow zero")) == kENOTSUP);
  CHECK(ToNbdError(Status::Aborted("stopping")) == kESHUTDOWN);
  CHECK(ToNbdError(Status::IOError("disk", EIO)) == kEIO);
  CHECK(ToNbdError(Status::Corruption("bits")) == kEIO);
  CHECK(ToNbdError(Status::NotFound("gone")) == kEIO);
  CHECK(ToNbdError(Status::Busy("busy")) == kEIO);
}

TEST_CASE("ToNbdError: errno-based statuses map like nbdkit's nbd_errno()",
          "[nbd-codec]") {
  CHECK(ToNbdError(PosixError("pwrite", ENOSPC)) == kENOSPC);
  CHECK(ToNbdError(PosixError("pwrite", EDQUOT)) == kENOSPC);
  CHECK(ToNbdError(PosixError("pwrite", EFBIG)) == kENOSPC);
  CHECK(ToNbdError(PosixError("pwrite", EROFS)) == kEPERM);
  CHECK(ToNbdError(PosixError("fallocate", EOPNOTSUPP)) == kENOTSUP);
  CHECK(ToNbdError(PosixError("pread", EIO)) == kEIO);
}

}  // namespace
}  // namespace blockrelay::nbd
