// RangeLock: byte ranges of a volume that a write is working on.
//
// A replicated write must reach the local disk and the replication stream in
// the same order as any other write to the same bytes, or the downstream
// could end with the older data. Two overlapping writes in flight at once
// are rare (a client that sends them has no defined result anyway), so
// overlapping ranges simply wait for each other here while disjoint ones go
// on in parallel, as DRBD's conflict detection does. Resync holds a region's
// range while it reads it, for the same reason.
//
// Thread safety: every method may be called from any thread. Lock() blocks
// (pool threads only); TryLock() never does (the network thread).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <vector>

namespace blockrelay::core {

class RangeLock {
 public:
  void Lock(uint64_t offset, uint64_t length) {
    std::unique_lock lock(mu_);
    released_.wait(lock, [&] { return !OverlapsLocked(offset, length); });
    held_.push_back({offset, length});
  }
  bool TryLock(uint64_t offset, uint64_t length) {
    std::lock_guard lock(mu_);
    if (OverlapsLocked(offset, length)) return false;
    held_.push_back({offset, length});
    return true;
  }
  void Unlock(uint64_t offset, uint64_t length) {
    {
      std::lock_guard lock(mu_);
      for (size_t i = 0; i < held_.size(); ++i) {
        if (held_[i].offset == offset && held_[i].length == length) {
          held_[i] = held_.back();
          held_.pop_back();
          break;
        }
      }
    }
    released_.notify_all();
  }
  // Runs fn() while no range is held; returns false (fn not run) otherwise.
  template <typename Fn>
  bool IfIdle(Fn&& fn) {
    std::lock_guard lock(mu_);
    if (!held_.empty()) return false;
    fn();
    return true;
  }

 private:
  struct Range {
    uint64_t offset, length;
  };
  bool OverlapsLocked(uint64_t offset, uint64_t length) const {
    // A zero-length request still orders against writes at its offset.
    const uint64_t end = offset + (length ? length : 1);
    for (const auto& r : held_) {
      if (offset < r.offset + (r.length ? r.length : 1) && r.offset < end) return true;
    }
    return false;
  }

  std::mutex mu_;
  std::condition_variable released_;
  std::vector<Range> held_;  // GUARDED_BY(mu_); a few entries (queue depth)
};

// Holds a range for a scope; no-op when `lock` is null.
class RangeGuard {
 public:
  RangeGuard(RangeLock* lock, uint64_t offset, uint64_t length)
      : lock_(lock), offset_(offset), length_(length) {
    if (lock_) lock_->Lock(offset_, length_);
  }
  // Adopts a range already taken with TryLock().
  struct Adopt {};
  RangeGuard(RangeLock* lock, uint64_t offset, uint64_t length, Adopt)
      : lock_(lock), offset_(offset), length_(length) {}
  ~RangeGuard() {
    if (lock_) lock_->Unlock(offset_, length_);
  }
  RangeGuard(const RangeGuard&) = delete;
  RangeGuard& operator=(const RangeGuard&) = delete;

 private:
  RangeLock* lock_;
  uint64_t offset_, length_;
};

}  // namespace blockrelay::core
