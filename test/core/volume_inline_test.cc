// Volume::TryWriteWithoutWaiting (include/blockrelay/core/volume.h): the
// network thread's write path. It declines what could block, and after a
// write that did block anyway (the kernel throttling dirty pages) it sends
// the volume's writes to the pool for a while; a write that was only slow
// because the thread was not run does not. The store here is in memory,
// claims to be buffered like a file, and can be told to take its time.
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

TEST_CASE("TryWriteWithoutWaiting: a write that was slow without sleeping "
          "(the thread was not run) pauses nothing", "[volume][inline]") {
  Fixture f;
  f.store->set_write_spin(Volume::kInlineStallLimit + 5ms);
  auto slow = f.volume->TryWriteWithoutWaiting(0, f.block);
  REQUIRE(slow.has_value());
  CHECK(slow->ok());
  f.store->set_write_spin(0ms);
  CHECK(f.volume->TryWriteWithoutWaiting(4096, f.block).has_value());
  CHECK(f.volume->counters().inline_preempted == 1);
  CHECK(f.volume->counters().inline_stalls == 0);
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
