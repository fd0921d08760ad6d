// RangeLock (include/blockrelay/core/range_lock.h): overlapping byte ranges
// wait for each other, disjoint ones do not; a zero-length range still orders
// against writes at its offset. Blocking claims are checked with a thread,
// an atomic flag and bounded waits, so a regression fails instead of hanging.
#include "blockrelay/core/range_lock.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

#include <catch2/catch.hpp>

namespace blockrelay::core {
namespace {

using namespace std::chrono_literals;

// How long a thread that should not be blocked gets to finish, and how long
// one that should be blocked is watched.
constexpr auto kGenerous = 10s;
constexpr auto kWatch = 100ms;

// Polls `flag` until it is set or `timeout` passes; returns its value.
bool WaitFor(const std::atomic<bool>& flag, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!flag.load()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

// Another thread takes [offset, offset+length) with Lock() and sets `locked`.
// The destructor releases what it took and joins.
class Locker {
 public:
  Locker(RangeLock& lock, uint64_t offset, uint64_t length)
      : lock_(lock), offset_(offset), length_(length), thread_([this] {
          lock_.Lock(offset_, length_);
          locked_ = true;
          while (!release_.load()) std::this_thread::sleep_for(1ms);
          lock_.Unlock(offset_, length_);
        }) {}
  ~Locker() {
    release_ = true;
    thread_.join();
  }
  const std::atomic<bool>& locked() const { return locked_; }

 private:
  RangeLock& lock_;
  const uint64_t offset_, length_;
  std::atomic<bool> locked_{false};
  std::atomic<bool> release_{false};
  std::thread thread_;
};

TEST_CASE("RangeLock: disjoint ranges are held at once by two threads", "[core]") {
  RangeLock lock;
  lock.Lock(0, 4096);
  {
    Locker after(lock, 4096, 4096);  // starts where the held one ends
    CHECK(WaitFor(after.locked(), kGenerous));
    Locker before(lock, 1 << 20, 512);
    CHECK(WaitFor(before.locked(), kGenerous));
  }
  lock.Unlock(0, 4096);
}

TEST_CASE("RangeLock: an overlapping range waits until the holder unlocks", "[core]") {
  RangeLock lock;
  uint64_t offset = 0, length = 0;
  SECTION("overlapping the start") { offset = 0, length = 8192; }
  SECTION("inside") { offset = 5000, length = 10; }
  SECTION("overlapping the end") { offset = 8191, length = 4096; }
  SECTION("covering") { offset = 0, length = 1 << 20; }
  lock.Lock(4096, 4096);
  Locker waiter(lock, offset, length);
  std::this_thread::sleep_for(kWatch);
  CHECK_FALSE(waiter.locked().load());
  lock.Unlock(4096, 4096);
  CHECK(WaitFor(waiter.locked(), kGenerous));
}

TEST_CASE("RangeLock: a zero-length range orders against a range holding its offset",
          "[core]") {
  RangeLock lock;
  SECTION("a zero-length request waits for a write over its offset") {
    lock.Lock(4096, 4096);
    CHECK_FALSE(lock.TryLock(4096, 0));
    CHECK_FALSE(lock.TryLock(8191, 0));
    CHECK(lock.TryLock(8192, 0));  // just past the end
    lock.Unlock(8192, 0);
    {
      Locker waiter(lock, 6000, 0);
      std::this_thread::sleep_for(kWatch);
      CHECK_FALSE(waiter.locked().load());
      lock.Unlock(4096, 4096);
      CHECK(WaitFor(waiter.locked(), kGenerous));
    }
  }
  SECTION("a write waits for a held zero-length range at an offset it covers") {
    lock.Lock(4096, 0);
    CHECK_FALSE(lock.TryLock(0, 8192));
    CHECK_FALSE(lock.TryLock(4096, 1));
    CHECK_FALSE(lock.TryLock(4096, 0));
    CHECK(lock.TryLock(0, 4096));  // ends where it is
    lock.Unlock(0, 4096);
    {
      Locker waiter(lock, 4000, 200);
      std::this_thread::sleep_for(kWatch);
      CHECK_FALSE(waiter.locked().load());
      lock.Unlock(4096, 0);
      CHECK(WaitFor(waiter.locked(), kGenerous));
    }
  }
}

TEST_CASE("RangeLock: TryLock fails on an overlap and succeeds after Unlock", "[core]") {
  RangeLock lock;
  REQUIRE(lock.TryLock(0, 4096));
  CHECK_FALSE(lock.TryLock(0, 4096));
  CHECK_FALSE(lock.TryLock(4095, 2));
  CHECK(lock.TryLock(4096, 4096));  // disjoint: taken too
  lock.Unlock(0, 4096);
  CHECK(lock.TryLock(0, 4096));
  CHECK_FALSE(lock.TryLock(4095, 2));  // [4096, 8192) is still held
  lock.Unlock(4096, 4096);
  CHECK(lock.TryLock(4096, 1));  // only [0, 4096) is left
  lock.Unlock(4096, 1);
  lock.Unlock(0, 4096);
  CHECK(lock.TryLock(0, 1 << 20));
  lock.Unlock(0, 1 << 20);
}

TEST_CASE("RangeLock: IfIdle runs its function only while no range is held", "[core]") {
  RangeLock lock;
  int runs = 0;
  CHECK(lock.IfIdle([&] { ++runs; }));
  CHECK(runs == 1);

  lock.Lock(0, 4096);
  CHECK_FALSE(lock.IfIdle([&] { ++runs; }));
  lock.Lock(1 << 20, 0);
  lock.Unlock(0, 4096);
  CHECK_FALSE(lock.IfIdle([&] { ++runs; }));  // the zero-length one counts
  CHECK(runs == 1);
  lock.Unlock(1 << 20, 0);

  CHECK(lock.IfIdle([&] { ++runs; }));
  CHECK(runs == 2);
}

TEST_CASE("RangeGuard: holds its range for its scope; a null lock is a no-op", "[core]") {
  RangeLock lock;
  {
    RangeGuard g(&lock, 0, 4096);
    CHECK_FALSE(lock.TryLock(100, 1));
  }
  CHECK(lock.TryLock(100, 1));
  {
    // Adopts the range just taken; releases it at the end of the scope.
    RangeGuard g(&lock, 100, 1, RangeGuard::Adopt{});
    CHECK_FALSE(lock.TryLock(100, 1));
  }
  CHECK(lock.IfIdle([] {}));
  { RangeGuard g(nullptr, 0, 4096); }
  CHECK(lock.IfIdle([] {}));
}

}  // namespace
}  // namespace blockrelay::core
