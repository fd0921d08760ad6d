// ForwardingBlockStore: a BlockStore that passes every call on to a
// FaultInjectionBlockStore, its own or one the test holds. Tests derive from
// it to change one or two calls (hold a flush, slow a write) and keep the
// rest, as RocksDB's FileSystemWrapper serves its fault-injecting file
// systems.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "blockrelay/storage/block_store.h"
#include "testutil/fault_injection_block_store.h"

namespace blockrelay::testutil {

class ForwardingBlockStore : public storage::BlockStore {
 public:
  // Forwards to a zero-filled store of its own.
  explicit ForwardingBlockStore(uint64_t size_bytes)
      : owned_(std::make_unique<FaultInjectionBlockStore>(size_bytes)),
        inner_(owned_.get()) {}
  // Forwards to `inner`, which must outlive this store.
  explicit ForwardingBlockStore(FaultInjectionBlockStore* inner) : inner_(inner) {}

  uint64_t size_bytes() const override { return inner_->size_bytes(); }
  std::string Describe() const override { return inner_->Describe(); }
  Status Read(uint64_t offset, std::span<std::byte> out) override {
    return inner_->Read(offset, out);
  }
  Status Write(uint64_t offset, std::span<const std::byte> data, bool fua) override {
    return inner_->Write(offset, data, fua);
  }
  Status Trim(uint64_t offset, uint64_t length, bool fua) override {
    return inner_->Trim(offset, length, fua);
  }
  Status WriteZeroes(uint64_t offset, uint64_t length, bool may_trim, bool fast_only,
                     bool fua) override {
    return inner_->WriteZeroes(offset, length, may_trim, fast_only, fua);
  }
  Status Flush() override { return inner_->Flush(); }
  Status Cache(uint64_t offset, uint64_t length) override {
    return inner_->Cache(offset, length);
  }
  Result<std::vector<storage::Extent>> BlockStatus(uint64_t offset,
                                                   uint64_t length) override {
    return inner_->BlockStatus(offset, length);
  }
  bool CanTrim() const override { return inner_->CanTrim(); }
  bool CanFastZero() const override { return inner_->CanFastZero(); }

  FaultInjectionBlockStore& inner() { return *inner_; }

 private:
  std::unique_ptr<FaultInjectionBlockStore> owned_;
  FaultInjectionBlockStore* const inner_;
};

}  // namespace blockrelay::testutil
