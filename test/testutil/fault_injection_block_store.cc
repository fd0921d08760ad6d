// FaultInjectionBlockStore: see fault_injection_block_store.h.

#include "testutil/fault_injection_block_store.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

namespace blockrelay::testutil {

namespace {
constexpr size_t kMaxLogLines = 4096;
}

FaultInjectionBlockStore::FaultInjectionBlockStore(uint64_t size_bytes, PowerSwitch* power)
    : size_bytes_(size_bytes), power_(power), durable_(size_bytes, std::byte{0}) {}

void FaultInjectionBlockStore::LogLocked(std::string line) {
  log_.push_back(std::move(line));
  while (log_.size() > kMaxLogLines) log_.pop_front();
}

Status FaultInjectionBlockStore::CheckFaultLocked(FaultOp op, uint64_t offset, uint64_t length,
                                                  bool* frozen) {
  if (op != FaultOp::kRead) {
    if (!active_ || (power_ != nullptr && !power_->Tick())) {
      *frozen = true;
      return Status::OK();
    }
  }
  for (auto it = countdowns_.begin(); it != countdowns_.end(); ++it) {
    if (it->op != op && it->op != FaultOp::kAny) continue;
    if (--it->remaining > 0) continue;
    int err = it->errno_value;
    countdowns_.erase(it);
    LogLocked(fmt::format("injected {} failure at {}+{} (errno {})", ToString(op), offset, length,
                          err));
    return PosixError(fmt::format("{} fault-injection store at {} (injected)", ToString(op), offset),
                      err);
  }
  return Status::OK();
}

Status FaultInjectionBlockStore::CheckRange(uint64_t offset, uint64_t length) const {
  if (offset > size_bytes_ || length > size_bytes_ - offset) {
    return Status::InvalidArgument(fmt::format(
        "fault-injection store: range {}+{} beyond size {}", offset, length, size_bytes_));
  }
  return Status::OK();
}

Status FaultInjectionBlockStore::Read(uint64_t offset, std::span<std::byte> out) {
  Status s = CheckRange(offset, out.size());
  if (!s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  bool frozen = false;
  s = CheckFaultLocked(FaultOp::kRead, offset, out.size(), &frozen);
  if (!s.ok()) return s;
  std::memcpy(out.data(), durable_.data() + offset, out.size());
  for (const PendingWrite& w : pending_) {
    uint64_t lo = std::max(offset, w.offset);
    uint64_t hi = std::min<uint64_t>(offset + out.size(), w.end());
    if (lo >= hi) continue;
    std::memcpy(out.data() + (lo - offset), w.data.data() + (lo - w.offset), hi - lo);
  }
  return Status::OK();
}

void FaultInjectionBlockStore::ApplyDurableLocked(uint64_t offset,
                                                  std::span<const std::byte> data) {
  std::memcpy(durable_.data() + offset, data.data(), data.size());
}

Status FaultInjectionBlockStore::WriteLocked(uint64_t offset, std::vector<std::byte> data,
                                             bool fua) {
  bool frozen = false;
  Status s = CheckFaultLocked(FaultOp::kWrite, offset, data.size(), &frozen);
  if (!s.ok()) return s;
  if (frozen) {
    LogLocked(fmt::format("frozen: discarded write at {}+{}", offset, data.size()));
    return Status::OK();
  }
  if (fua) {
    ApplyDurableLocked(offset, data);
    // An older cached write to the same sectors must not bring back old
    // bytes if it reaches the platters later: the drive would have replaced
    // it in its cache.
    for (PendingWrite& w : pending_) {
      uint64_t lo = std::max(offset, w.offset);
      uint64_t hi = std::min<uint64_t>(offset + data.size(), w.end());
      if (lo >= hi) continue;
      std::memcpy(w.data.data() + (lo - w.offset), data.data() + (lo - offset), hi - lo);
    }
    return Status::OK();
  }
  pending_.push_back(PendingWrite{offset, std::move(data)});
  return Status::OK();
}

Status FaultInjectionBlockStore::Write(uint64_t offset, std::span<const std::byte> data,
                                       bool fua) {
  Status s = CheckRange(offset, data.size());
  if (!s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  return WriteLocked(offset, std::vector<std::byte>(data.begin(), data.end()), fua);
}

Status FaultInjectionBlockStore::Trim(uint64_t offset, uint64_t length, bool fua) {
  Status s = CheckRange(offset, length);
  if (!s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  return WriteLocked(offset, std::vector<std::byte>(length, std::byte{0}), fua);
}

Status FaultInjectionBlockStore::WriteZeroes(uint64_t offset, uint64_t length, bool may_trim,
                                             bool fast_only, bool fua) {
  Status s = CheckRange(offset, length);
  if (!s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  return WriteLocked(offset, std::vector<std::byte>(length, std::byte{0}), fua);
}

Status FaultInjectionBlockStore::Flush() {
  std::lock_guard<std::mutex> lock(mu_);
  bool frozen = false;
  Status s = CheckFaultLocked(FaultOp::kSync, 0, 0, &frozen);
  if (!s.ok()) return s;
  if (frozen) {
    LogLocked("frozen: discarded flush");
    return Status::OK();
  }
  for (const PendingWrite& w : pending_) ApplyDurableLocked(w.offset, w.data);
  pending_.clear();
  ++flush_count_;
  return Status::OK();
}

Status FaultInjectionBlockStore::Cache(uint64_t offset, uint64_t length) {
  return CheckRange(offset, length);
}

Result<std::vector<storage::Extent>> FaultInjectionBlockStore::BlockStatus(uint64_t offset,
                                                                            uint64_t length) {
  Status s = CheckRange(offset, length);
  if (!s.ok()) return s;
  return std::vector<storage::Extent>{storage::Extent{length, false, false}};
}

void FaultInjectionBlockStore::SetActive(bool active) {
  std::lock_guard<std::mutex> lock(mu_);
  active_ = active;
  LogLocked(active ? "device active" : "device frozen");
}

void FaultInjectionBlockStore::CrashLocked(Survival survival, uint32_t sector_bytes,
                                           std::mt19937_64* rng) {
  for (const PendingWrite& w : pending_) {
    std::string what = ApplySurvivors(
        w.offset, w.data.size(), survival, sector_bytes, rng, [&](uint64_t lo, uint64_t hi) {
          ApplyDurableLocked(lo, std::span<const std::byte>(w.data).subspan(lo - w.offset, hi - lo));
        });
    if (survival != Survival::kAll) {
      LogLocked(fmt::format("power loss: write at {}+{}: {}", w.offset, w.data.size(), what));
    }
  }
  pending_.clear();
}

void FaultInjectionBlockStore::ProcessCrash() {
  std::lock_guard<std::mutex> lock(mu_);
  LogLocked(fmt::format("process crash: {} cached writes kept", pending_.size()));
  CrashLocked(Survival::kAll, 0, nullptr);
}

void FaultInjectionBlockStore::PowerLoss(PowerLossMode mode, std::mt19937_64& rng,
                                         uint32_t sector_bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  switch (mode) {
    case PowerLossMode::kDropAll:
      return CrashLocked(Survival::kNone, sector_bytes, &rng);
    case PowerLossMode::kDropRandom:
      return CrashLocked(Survival::kCoinFlip, sector_bytes, &rng);
    case PowerLossMode::kTear:
      return CrashLocked(Survival::kTornSectors, sector_bytes, &rng);
  }
}

void FaultInjectionBlockStore::FailNth(FaultOp op, int n, int errno_value) {
  std::lock_guard<std::mutex> lock(mu_);
  countdowns_.push_back(Countdown{op, n, errno_value});
}

void FaultInjectionBlockStore::ClearFaults() {
  std::lock_guard<std::mutex> lock(mu_);
  countdowns_.clear();
}

std::vector<std::byte> FaultInjectionBlockStore::DurableImage() const {
  std::lock_guard<std::mutex> lock(mu_);
  return durable_;
}

size_t FaultInjectionBlockStore::unsynced_write_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pending_.size();
}

uint64_t FaultInjectionBlockStore::flush_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return flush_count_;
}

std::vector<std::string> FaultInjectionBlockStore::InjectionLog() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {log_.begin(), log_.end()};
}

}  // namespace blockrelay::testutil
