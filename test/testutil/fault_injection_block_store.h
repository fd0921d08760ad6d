// FaultInjectionBlockStore: an in-memory volume that knows what is durable.
//
// Implements storage::BlockStore over two images: the durable one ("the
// platters") and, on top of it, the writes not yet made durable ("the disk
// cache"), which reads see. Flush() and fua writes make writes durable. A
// test then simulates a crash:
//   - ProcessCrash(): the blockrelay process dies, the kernel keeps its page
//     cache, so every unsynced write survives;
//   - PowerLoss(kDropAll | kDropRandom | kTear, rng): unsynced writes are
//     lost, all of them, a random subset, or a random subset of their
//     512-byte sectors.
// Trim and WriteZeroes are modelled as writes of zeroes (Trim is advisory, so
// zeroes are one of the contents it may leave).
//
// Faults: FailNth(op, n, errno) (op kWrite covers Write/Trim/WriteZeroes,
// kSync covers Flush, kRead Read), SetActive(false) and a PowerSwitch freeze
// the device (mutating calls return OK and change nothing). Injections are
// logged.
//
// Thread safety: safe for concurrent use; the crash calls require that no
// other thread uses the store at that moment.
#pragma once

#include <cstdint>
#include <deque>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "blockrelay/storage/block_store.h"
#include "testutil/crash_model.h"
#include "testutil/fault_injection_env.h"
#include "testutil/power_switch.h"

namespace blockrelay::testutil {

class FaultInjectionBlockStore final : public storage::BlockStore {
 public:
  enum class PowerLossMode { kDropAll, kDropRandom, kTear };

  // A zero-filled volume of `size_bytes`. `power` (optional) must outlive it.
  explicit FaultInjectionBlockStore(uint64_t size_bytes, PowerSwitch* power = nullptr);

  uint64_t size_bytes() const override { return size_bytes_; }
  std::string Describe() const override { return "fault-injection store"; }
  Status Read(uint64_t offset, std::span<std::byte> out) override;
  Status Write(uint64_t offset, std::span<const std::byte> data, bool fua) override;
  Status Trim(uint64_t offset, uint64_t length, bool fua) override;
  Status WriteZeroes(uint64_t offset, uint64_t length, bool may_trim, bool fast_only,
                     bool fua) override;
  Status Flush() override;
  Status Cache(uint64_t offset, uint64_t length) override;
  Result<std::vector<storage::Extent>> BlockStatus(uint64_t offset, uint64_t length) override;
  bool CanTrim() const override { return true; }
  bool CanFastZero() const override { return true; }

  // --- crash simulation ---
  void SetActive(bool active);
  void ProcessCrash();
  void PowerLoss(PowerLossMode mode, std::mt19937_64& rng, uint32_t sector_bytes = 512);

  // --- error injection ---
  void FailNth(FaultOp op, int n, int errno_value);
  void ClearFaults();

  // --- observation ---
  // What is on the platters now (unsynced writes excluded).
  std::vector<std::byte> DurableImage() const;
  size_t unsynced_write_count() const;
  uint64_t flush_count() const;
  std::vector<std::string> InjectionLog() const;

 private:
  struct PendingWrite {
    uint64_t offset;
    std::vector<std::byte> data;
    uint64_t end() const { return offset + data.size(); }
  };

  // Non-OK when a fault fires; *frozen when the device is off.
  Status CheckFaultLocked(FaultOp op, uint64_t offset, uint64_t length, bool* frozen);
  Status CheckRange(uint64_t offset, uint64_t length) const;
  Status WriteLocked(uint64_t offset, std::vector<std::byte> data, bool fua);
  void ApplyDurableLocked(uint64_t offset, std::span<const std::byte> data);
  void CrashLocked(Survival survival, uint32_t sector_bytes, std::mt19937_64* rng);
  void LogLocked(std::string line);

  const uint64_t size_bytes_;
  PowerSwitch* const power_;
  mutable std::mutex mu_;
  std::vector<std::byte> durable_;     // GUARDED_BY(mu_)
  std::vector<PendingWrite> pending_;  // GUARDED_BY(mu_), oldest first
  bool active_ = true;                 // GUARDED_BY(mu_)
  struct Countdown {
    FaultOp op;
    int remaining;
    int errno_value;
  };
  std::vector<Countdown> countdowns_;  // GUARDED_BY(mu_)
  std::deque<std::string> log_;        // GUARDED_BY(mu_)
  uint64_t flush_count_ = 0;           // GUARDED_BY(mu_)
};

}  // namespace blockrelay::testutil
