// Volume::TryWriteWithoutWaiting (include/blockrelay/core/volume.h): the
// network thread's write path. It declines what could block, and after a
// write that did block anyway (the kernel throttling dirty pages) it sends
// the volume's writes to the pool for a while; a write that was only slow
// because another thread had the CPU does not. The store here is in memory,
// claims to be buffered like a file, and can be told to take its time.
#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "blockrelay/core/volume.h"
#include "testutil/forwarding_block_store.h"

namespace blockrelay::core {
namespace {

using namespace std::chrono_literals;
using Bytes = std::vector<std::byte>;

constexpr uint64_t kVolumeBytes = 1 << 20;

// An in-memory store that says its writes are buffered (so the
// network thread may write to it) and sleeps in Write() when told to.
class SlowBufferedStore final : public testutil::ForwardingBlockStore {
 public:
  explicit SlowBufferedStore(uint64_t size_bytes) : ForwardingBlockStore(size_bytes) {}

  void set_write_delay(std::chrono::milliseconds d) { delay_ = d; }
  // Busy for that long instead of sleeping: what a write looks like from
  // the thread when the host runs other threads meanwhile.
  void set_write_spin(std::chrono::milliseconds d) { spin_ = d; }

  std::string Describe() const override { return "slow buffered store"; }
  bool WritesAreBuffered() const override { return true; }
  Status Write(uint64_t offset, std::span<const std::byte> data, bool fua) override {
    if (const auto d = delay_.load(); d.count() > 0) std::this_thread::sleep_for(d);
    if (const auto d = spin_.load(); d.count() > 0) {
      const auto until = std::chrono::steady_clock::now() + d;
      while (std::chrono::steady_clock::now() < until) {
      }
    }
    return ForwardingBlockStore::Write(offset, data, fua);
  }

 private:
  std::atomic<std::chrono::milliseconds> delay_{0ms};
  std::atomic<std::chrono::milliseconds> spin_{0ms};
};

struct Fixture {
  Fixture() {
    auto owned = std::make_unique<SlowBufferedStore>(kVolumeBytes);
    store = owned.get();
    volume = std::make_unique<Volume>("g", "v", std::move(owned), nullptr,
                                      /*read_only=*/false);
  }
  SlowBufferedStore* store;
  std::unique_ptr<Volume> volume;
  Bytes block = Bytes(4096, std::byte{0x5a});
};

TEST_CASE("TryWriteWithoutWaiting: a buffered store's write is carried out "
          "at once", "[volume][inline]") {
  Fixture f;
  auto s = f.volume->TryWriteWithoutWaiting(0, f.block);
  REQUIRE(s.has_value());
  CHECK(s->ok());
  Bytes back(f.block.size());
  REQUIRE(f.volume->Read(0, back).ok());
  CHECK(back == f.block);
}

TEST_CASE("TryWriteWithoutWaiting: after a write that stalled, the next "
          "ones go to the pool", "[volume][inline]") {
  Fixture f;
  f.store->set_write_delay(Volume::kInlineStallLimit + 5ms);
  auto stalled = f.volume->TryWriteWithoutWaiting(0, f.block);
  REQUIRE(stalled.has_value());
  CHECK(stalled->ok());  // the slow write itself was done, and succeeded
  f.store->set_write_delay(0ms);
  CHECK_FALSE(f.volume->TryWriteWithoutWaiting(4096, f.block).has_value());
  CHECK_FALSE(f.volume->TryWriteWithoutWaiting(8192, f.block).has_value());
  // The pool's path is not affected.
  CHECK(f.volume->Write(4096, f.block, /*fua=*/false).ok());
}

// Runs `fn` with the calling thread and a busy competitor pinned to one
// CPU, so that the scheduler takes the CPU from the caller now and then
// (involuntary context switches) while it never sleeps.
template <typename Fn>
void WithCompetitorOnSameCpu(Fn fn) {
  cpu_set_t allowed;
  REQUIRE(sched_getaffinity(0, sizeof(allowed), &allowed) == 0);
  int cpu = 0;
  while (!CPU_ISSET(cpu, &allowed)) ++cpu;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(cpu, &one);
  REQUIRE(sched_setaffinity(0, sizeof(one), &one) == 0);
  std::atomic<bool> stop{false};
  std::thread competitor([&] {
    sched_setaffinity(0, sizeof(one), &one);
    while (!stop.load()) {
    }
  });
  // Older than the volume's sampling interval: the write samples afresh.
  std::this_thread::sleep_for(5ms);
  fn();
  stop.store(true);
  competitor.join();
  sched_setaffinity(0, sizeof(allowed), &allowed);
}

TEST_CASE("TryWriteWithoutWaiting: a write that was slow because another "
          "thread had the CPU pauses nothing", "[volume][inline]") {
  Fixture f;
  // Long enough for the scheduler to switch to the competitor several times.
  f.store->set_write_spin(50ms);
  WithCompetitorOnSameCpu([&] {
    auto slow = f.volume->TryWriteWithoutWaiting(0, f.block);
    REQUIRE(slow.has_value());
    CHECK(slow->ok());
  });
  f.store->set_write_spin(0ms);
  CHECK(f.volume->TryWriteWithoutWaiting(4096, f.block).has_value());
  CHECK(f.volume->counters().inline_preempted == 1);
  CHECK(f.volume->counters().inline_stalls == 0);
}

TEST_CASE("TryWriteWithoutWaiting: a write that was slow without sleeping or "
          "losing the CPU still pauses (the kernel worked for the thread)",
          "[volume][inline]") {
  Fixture f;
  std::this_thread::sleep_for(5ms);  // the write samples afresh
  f.store->set_write_spin(Volume::kInlineStallLimit + 3ms);
  auto slow = f.volume->TryWriteWithoutWaiting(0, f.block);
  REQUIRE(slow.has_value());
  f.store->set_write_spin(0ms);
  const auto c = f.volume->counters();
  // An idle core usually lets the spin run unswitched; on a busy machine
  // the scheduler may take the CPU meanwhile, which is the case above.
  CHECK(c.inline_stalls + c.inline_preempted == 1);
  if (c.inline_stalls == 1) {
    CHECK_FALSE(f.volume->TryWriteWithoutWaiting(4096, f.block).has_value());
  }
}

TEST_CASE("TryWriteWithoutWaiting: a stall that slept is counted",
          "[volume][inline]") {
  Fixture f;
  f.store->set_write_delay(Volume::kInlineStallLimit + 5ms);
  REQUIRE(f.volume->TryWriteWithoutWaiting(0, f.block).has_value());
  CHECK(f.volume->counters().inline_stalls == 1);
  CHECK(f.volume->counters().inline_preempted == 0);
}

TEST_CASE("TryWriteWithoutWaiting: writes come back inline once the pause "
          "after a stall is over", "[volume][inline]") {
  Fixture f;
  f.store->set_write_delay(Volume::kInlineStallLimit + 5ms);
  REQUIRE(f.volume->TryWriteWithoutWaiting(0, f.block).has_value());
  f.store->set_write_delay(0ms);
  REQUIRE_FALSE(f.volume->TryWriteWithoutWaiting(4096, f.block).has_value());
  std::this_thread::sleep_for(Volume::kInlinePauseAfterStall + 100ms);
  CHECK(f.volume->TryWriteWithoutWaiting(4096, f.block).has_value());
}

}  // namespace
}  // namespace blockrelay::core
