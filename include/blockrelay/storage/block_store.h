// BlockStore: the bytes of one volume, as a file or a block device.
//
// Every method blocks (pread/pwrite/fallocate/fdatasync) and is safe to call
// from several threads at once; callers keep them off the network thread by
// running them on the storage executor (core::IoExecutor). Errors come back as
// Status values with the path and offset in the message; nothing throws.
//
// Tests substitute a fault-injecting store (see test/testutil/).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "blockrelay/status.h"

namespace blockrelay::storage {

// One run of bytes of the same allocation state, for NBD_CMD_BLOCK_STATUS.
struct Extent {
  uint64_t length_bytes = 0;
  bool hole = false;  // not allocated
  bool zero = false;  // reads as zeroes
};

class BlockStore {
 public:
  virtual ~BlockStore() = default;

  virtual uint64_t size_bytes() const = 0;
  // A description for logs and status, e.g. the path.
  virtual std::string Describe() const = 0;

  // REQUIRES: offset + out.size() <= size_bytes() (callers check ranges).
  virtual Status Read(uint64_t offset, std::span<std::byte> out) = 0;
  // With `fua`, the data is durable when this returns OK.
  virtual Status Write(uint64_t offset, std::span<const std::byte> data,
                       bool fua) = 0;
  // Advisory: releases the range where the store can (punches a hole).
  virtual Status Trim(uint64_t offset, uint64_t length, bool fua) = 0;
  // The range reads back as zeroes. `may_trim`: holes are allowed.
  // `fast_only`: return NotSupported instead of writing zero bytes by hand.
  virtual Status WriteZeroes(uint64_t offset, uint64_t length, bool may_trim,
                             bool fast_only, bool fua) = 0;
  // Every write that returned before this call is durable when it returns.
  virtual Status Flush() = 0;
  // Advisory read-ahead.
  virtual Status Cache(uint64_t offset, uint64_t length) = 0;
  // Advisory: starts writing back what is cached for the whole store
  // without waiting for it, so that a later Flush() has less to wait for.
  // Durability is still only what Flush() promises.
  virtual void StartWriteback() {}
  // Allocation map of [offset, offset+length): consecutive extents starting at
  // offset, covering at least one byte and at most the range.
  virtual Result<std::vector<Extent>> BlockStatus(uint64_t offset,
                                                  uint64_t length) = 0;

  // Reads `out` only if that needs no disk access (page-cache hit): true
  // with `out` filled, false with nothing promised. Never blocks on I/O.
  // Errors also return false; the caller then does a normal Read().
  virtual bool ReadIfCached(uint64_t offset, std::span<std::byte> out) {
    return false;
  }

  // Whether a Write() without FUA only copies into a cache (a buffered
  // file) rather than waiting for the device.
  virtual bool WritesAreBuffered() const { return false; }

  // Whether Trim releases space (false for stores that ignore it).
  virtual bool CanTrim() const = 0;
  // Whether WriteZeroes(fast_only=true) can ever succeed.
  virtual bool CanFastZero() const = 0;
};

struct FileBlockStoreOptions {
  std::filesystem::path path;
  // For regular files: the size to create a missing file with, and the size
  // an existing file must have. For block devices: optional, must match.
  std::optional<uint64_t> size_bytes;
  bool read_only = false;
  bool create_if_missing = true;
};

// Opens (or creates sparse) the backing file or block device.
Result<std::unique_ptr<BlockStore>> OpenFileBlockStore(
    const FileBlockStoreOptions& options);

}  // namespace blockrelay::storage
