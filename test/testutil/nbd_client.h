// Deadline-bounded libnbd helpers for integration tests.
//
// libnbd's synchronous calls wait for the server without a timeout, so a
// server bug would hang the test. These helpers issue the aio variant and
// drive it with nbd_poll() until it completes or a deadline passes. Each
// returns 0 on success or the errno the command failed with (EPERM, EINVAL,
// ENOSPC... as mapped by libnbd from the NBD error), ETIMEDOUT on timeout.
// After a timeout the handle must not be polled again (a late reply could
// land in a buffer the caller has freed); close it.
//
// Thread safety: a handle is used from one thread.
#pragma once

#include <libnbd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace blockrelay::testutil {

struct NbdCloser {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};
using NbdHandle = std::unique_ptr<nbd_handle, NbdCloser>;

inline constexpr std::chrono::milliseconds kNbdTimeout{10000};

struct NbdOptions {
  std::string export_name;          // "" = the default export
  bool structured_replies = true;   // ask for them (libnbd's default)
  bool base_allocation = false;     // add_meta_context("base:allocation")
  std::optional<uint32_t> strict_mode;  // 0: let bad requests through
  bool opt_mode = false;            // stop in negotiation (nbd_opt_*)
};

// Creates a handle, applies `options`, connects and finishes the handshake
// (or, with opt_mode, reaches negotiation) within `timeout`. On failure
// returns nullptr and puts libnbd's message in *error.
NbdHandle ConnectUnix(const std::filesystem::path& socket,
                      const NbdOptions& options = {},
                      std::string* error = nullptr,
                      std::chrono::milliseconds timeout = kNbdTimeout);
NbdHandle ConnectTcp(uint16_t port, const NbdOptions& options = {},
                     std::string* error = nullptr,
                     std::chrono::milliseconds timeout = kNbdTimeout);

// Waits for the aio command `cookie` (or returns the submission errno when
// cookie is -1).
int Await(nbd_handle* h, int64_t cookie,
          std::chrono::milliseconds timeout = kNbdTimeout);
// Polls until no command is in flight; false on timeout or a dead handle.
bool DrainInFlight(nbd_handle* h,
                   std::chrono::milliseconds timeout = kNbdTimeout);

int Pread(nbd_handle* h, std::span<std::byte> out, uint64_t offset,
          uint32_t flags = 0);
int Pwrite(nbd_handle* h, std::span<const std::byte> data, uint64_t offset,
           uint32_t flags = 0);
int Flush(nbd_handle* h, uint32_t flags = 0);
int Trim(nbd_handle* h, uint64_t count, uint64_t offset, uint32_t flags = 0);
int Zero(nbd_handle* h, uint64_t count, uint64_t offset, uint32_t flags = 0);
int Cache(nbd_handle* h, uint64_t count, uint64_t offset, uint32_t flags = 0);

// One base:allocation extent as reported to the client.
struct Extent {
  uint32_t length = 0;
  uint32_t flags = 0;  // LIBNBD_STATE_HOLE (1) | LIBNBD_STATE_ZERO (2)
};
// NBD_CMD_BLOCK_STATUS; the base:allocation extents in *extents.
int BlockStatus(nbd_handle* h, uint64_t count, uint64_t offset,
                std::vector<Extent>* extents, uint32_t flags = 0);

// NBD_OPT_LIST in opt mode; the export names in *names.
int OptList(nbd_handle* h, std::vector<std::string>* names);

// `n` bytes that differ for each seed (and each 8-byte word).
std::vector<std::byte> Pattern(size_t n, uint64_t seed);

}  // namespace blockrelay::testutil
