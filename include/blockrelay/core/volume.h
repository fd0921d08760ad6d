// Volume: one replicated volume and the single write path every write takes.
//
// A write from a local NBD client and (later) a write applied from an
// upstream site both go through Volume, so a site in the middle of a chain
// forwards without special code. Every write, trim and zeroing first marks
// its regions dirty in the scoreboard (one slot per downstream link), and
// reaches the BlockStore only once those bits are durable (DESIGN.md,
// Invariant 1). The volume owns its BlockStore and metadata, counts traffic
// for status, and keeps a sticky error: once a flush of the backing
// store fails, the page cache may have dropped data we acknowledged, so every
// later write and flush fails with the same error until an operator restarts
// the site (LevelDB's background-error rule).
//
// Thread safety: the I/O methods block and are called from IoExecutor
// threads, several at once. Counters are atomic. Role changes come from the
// network thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "blockrelay/status.h"
#include "blockrelay/storage/block_store.h"
#include "blockrelay/storage/volume_metadata.h"

namespace blockrelay::core {

struct VolumeCounters {
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;  // write, and zeroed bytes
  uint64_t reads = 0;
  uint64_t writes = 0;
  uint64_t flushes = 0;
  uint64_t trims = 0;
  uint64_t errors = 0;
};

class Volume {
 public:
  // `metadata` may be null (no scoreboard: tests, or a volume without
  // metadata); otherwise every write is tracked in its scoreboard.
  Volume(std::string group, std::string name,
         std::unique_ptr<storage::BlockStore> store,
         std::unique_ptr<storage::VolumeMetadata> metadata, bool read_only);
  ~Volume();

  const std::string& name() const { return name_; }
  const std::string& group() const { return group_; }
  uint64_t size_bytes() const { return size_bytes_; }
  std::string backing() const { return store_->Describe(); }
  bool read_only() const { return read_only_.load(); }
  void set_read_only(bool ro) { read_only_.store(ro); }
  bool can_trim() const { return store_->CanTrim(); }
  bool can_fast_zero() const { return store_->CanFastZero(); }

  // REQUIRES (all I/O): the range lies within size_bytes(); the NBD session
  // validates requests before calling.
  Status Read(uint64_t offset, std::span<std::byte> out);
  Status Write(uint64_t offset, std::span<const std::byte> data, bool fua);
  Status Trim(uint64_t offset, uint64_t length, bool fua);
  Status WriteZeroes(uint64_t offset, uint64_t length, bool may_trim,
                     bool fast_only, bool fua);
  Status Flush();

  // For the network thread, which must not wait on the disk: carries out a
  // write without FUA only when that cannot block (buffered store, volume
  // writable, scoreboard bits already durable). nullopt: nothing was done,
  // use Write() on a pool thread.
  std::optional<Status> TryWriteWithoutWaiting(uint64_t offset,
                                               std::span<const std::byte> data);
  // Reads only from the page cache; false: nothing read, use Read().
  bool ReadIfCached(uint64_t offset, std::span<std::byte> out);
  Status Cache(uint64_t offset, uint64_t length);
  Result<std::vector<storage::Extent>> BlockStatus(uint64_t offset,
                                                   uint64_t length);

  // Persists the scoreboard's bitmaps (periodically, and when a link goes
  // down). OK without metadata.
  Status FlushScoreboard();
  // Clean shutdown of the metadata: flush the store, then mark the
  // scoreboard cleanly closed. REQUIRES: no other I/O in progress or after.
  Status Close();

  // The scoreboard, or nullptr without metadata.
  const storage::Scoreboard* scoreboard() const {
    return metadata_ ? &metadata_->scoreboard() : nullptr;
  }
  const storage::VolumeMetadata* metadata() const { return metadata_.get(); }

  VolumeCounters counters() const;
  // The sticky error, if a flush failed.
  std::optional<Status> sticky_error() const;

  // NBD connections currently attached, for status.
  void AddClient() { ++nbd_clients_; }
  void RemoveClient() { --nbd_clients_; }
  int nbd_clients() const { return nbd_clients_.load(); }

 private:
  Status CheckWritable() const;
  // Scoreboard bits for [offset, offset+length) durable in every slot.
  Status MarkDirty(uint64_t offset, uint64_t length);
  // The store write, once the scoreboard bits are durable.
  Status WriteMarked(uint64_t offset, std::span<const std::byte> data, bool fua);
  Status RecordFailure(Status s, bool sticky);

  const std::string group_;
  const std::string name_;
  const std::unique_ptr<storage::BlockStore> store_;
  const std::unique_ptr<storage::VolumeMetadata> metadata_;
  // Whether any downstream slot exists: without one there is nothing to mark.
  const bool tracks_writes_;
  const uint64_t size_bytes_;
  std::atomic<bool> read_only_;
  std::atomic<int> nbd_clients_{0};

  std::atomic<uint64_t> bytes_read_{0}, bytes_written_{0}, reads_{0},
      writes_{0}, flushes_{0}, trims_{0}, errors_{0};

  std::atomic<bool> failed_{false};
  mutable std::mutex failure_mu_;
  std::optional<Status> failure_;  // GUARDED_BY(failure_mu_)
};

}  // namespace blockrelay::core
