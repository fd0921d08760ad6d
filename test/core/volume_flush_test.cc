// Volume::FlushShared (include/blockrelay/core/volume.h): the group commit
// of NBD FLUSH. Concurrent calls share one store flush, at most one store
// flush runs at a time, a call that arrives while one runs waits for the
// next, a failed store flush fails its whole batch and is sticky, tickets
// are taken after the store flush, and waiting calls hold no pool thread.
// Volumes here have no metadata; the store is an in-memory
// FaultInjectionBlockStore behind a gate that can hold store flushes.
#include "blockrelay/core/volume.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include <asio/post.hpp>
#include <catch2/catch.hpp>

#include "blockrelay/core/io_executor.h"
#include "testutil/fault_injection_block_store.h"
#include "testutil/forwarding_block_store.h"

namespace blockrelay::core {
namespace {

using namespace std::chrono_literals;
using Bytes = std::vector<std::byte>;

constexpr uint64_t kVolumeBytes = 1 << 20;
constexpr auto kTimeout = 10s;

Bytes Fill(size_t length, uint8_t value) {
  return Bytes(length, static_cast<std::byte>(value));
}

// A FaultInjectionBlockStore whose Flush() can be held after the data is
// made durable and before it returns, like an fdatasync that covers the
// writes returned before it began and then takes a while. Counts Flush()
// calls (failed ones too) and the most that ran at once. A flush counts as
// started once it has made the data durable and reached the gate.
class GatedStore final : public testutil::ForwardingBlockStore {
 public:
  explicit GatedStore(uint64_t size_bytes) : ForwardingBlockStore(size_bytes) {}

  std::string Describe() const override { return "gated store"; }

  Status Flush() override {
    {
      std::lock_guard lock(mu_);
      max_running_ = std::max(max_running_, ++running_);
    }
    Status s = ForwardingBlockStore::Flush();
    std::unique_lock lock(mu_);
    const int number = ++started_;
    cv_.notify_all();
    cv_.wait(lock, [&] { return number <= allowed_; });
    --running_;
    ++finished_;
    cv_.notify_all();
    return s;
  }

  // Flush() calls after the n-th are held until allowed.
  void AllowFlushes(int n) {
    std::lock_guard lock(mu_);
    allowed_ = n;
    cv_.notify_all();
  }
  bool WaitFlushesStarted(int n) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, kTimeout, [&] { return started_ >= n; });
  }
  int started() const {
    std::lock_guard lock(mu_);
    return started_;
  }
  int finished() const {
    std::lock_guard lock(mu_);
    return finished_;
  }
  int max_running() const {
    std::lock_guard lock(mu_);
    return max_running_;
  }


 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int allowed_ = INT_MAX;   // GUARDED_BY(mu_)
  int started_ = 0;         // GUARDED_BY(mu_)
  int finished_ = 0;        // GUARDED_BY(mu_)
  int running_ = 0;         // GUARDED_BY(mu_)
  int max_running_ = 0;     // GUARDED_BY(mu_)
};

// Records, for every Flushed() call, how many store flushes had returned
// and how many writes were still unsynced at that moment.
class RecordingSink final : public ReplicationSink {
 public:
  struct FlushedCall {
    Ticket ticket;
    int store_flushes_finished;
    size_t unsynced_writes;
  };

  explicit RecordingSink(GatedStore* store) : store_(store) {}

  Ticket Captured(uint32_t, CapturedOp, uint64_t, uint64_t, std::span<const std::byte>,
                  storage::WriteSeq, bool) override {
    std::lock_guard lock(mu_);
    return ++next_ticket_;
  }
  Ticket Flushed() override {
    FlushedCall c{0, store_->finished(), store_->inner().unsynced_write_count()};
    std::lock_guard lock(mu_);
    c.ticket = ++next_ticket_;
    flushed_.push_back(c);
    return c.ticket;
  }
  bool RepliesWait() const override { return false; }
  void WhenAcknowledged(Ticket, bool, std::function<void(Status)> done) override {
    done(Status::OK());
  }

  std::vector<FlushedCall> flushed() const {
    std::lock_guard lock(mu_);
    return flushed_;
  }

 private:
  GatedStore* const store_;
  mutable std::mutex mu_;
  std::vector<FlushedCall> flushed_;  // GUARDED_BY(mu_)
  Ticket next_ticket_ = 500;          // GUARDED_BY(mu_)
};

// The outcomes of FlushShared() calls, by the caller's index. Callbacks run
// on pool threads, where Catch2 assertions are not allowed: they only record.
class Outcomes {
 public:
  struct Outcome {
    Status status;
    ReplicationSink::Ticket ticket = 0;
  };

  Volume::FlushDone Callback(size_t index) {
    return [this, index](Status s, ReplicationSink::Ticket ticket) {
      std::lock_guard lock(mu_);
      if (results_.size() <= index) results_.resize(index + 1);
      if (results_[index].has_value()) ++repeated_;
      results_[index] = Outcome{std::move(s), ticket};
      ++answered_;
      cv_.notify_all();
    };
  }
  bool WaitAnswered(size_t n) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, kTimeout, [&] { return answered_ >= n; });
  }
  bool answered(size_t index) const {
    std::lock_guard lock(mu_);
    return index < results_.size() && results_[index].has_value();
  }
  size_t answered_count() const {
    std::lock_guard lock(mu_);
    return answered_;
  }
  // Callbacks run more than once for the same call (must stay 0).
  size_t repeated() const {
    std::lock_guard lock(mu_);
    return repeated_;
  }
  Outcome at(size_t index) const {
    std::lock_guard lock(mu_);
    REQUIRE(index < results_.size());
    REQUIRE(results_[index].has_value());
    return *results_[index];
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::optional<Outcome>> results_;  // GUARDED_BY(mu_)
  size_t answered_ = 0;                          // GUARDED_BY(mu_)
  size_t repeated_ = 0;                          // GUARDED_BY(mu_)
};

// A volume over a GatedStore, optionally with a RecordingSink, and a pool.
struct Fixture {
  explicit Fixture(bool with_sink = true, size_t io_threads = 2) {
    auto s = std::make_unique<GatedStore>(kVolumeBytes);
    store = s.get();
    sink = std::make_unique<RecordingSink>(store);
    volume = std::make_unique<Volume>("g", "v", std::move(s), /*metadata=*/nullptr,
                                      /*read_only=*/false);
    if (with_sink) volume->AttachReplication(sink.get(), 0);
    io = std::make_unique<IoExecutor>(io_threads);
  }
  ~Fixture() {
    store->AllowFlushes(INT_MAX);  // a failed REQUIRE must not hang the join
    io->Stop();
  }

  void Flush(Outcomes& outcomes, size_t index) {
    volume->FlushShared(*io, outcomes.Callback(index));
  }
  bool Durable(uint64_t offset, const Bytes& data) {
    Bytes image = store->inner().DurableImage();
    return Bytes(image.begin() + offset, image.begin() + offset + data.size()) == data;
  }

  GatedStore* store = nullptr;  // owned by volume
  std::unique_ptr<RecordingSink> sink;
  std::unique_ptr<Volume> volume;
  std::unique_ptr<IoExecutor> io;  // stopped before the volume goes
};

// Goal: the calls that arrive while a store flush runs are answered by one
// store flush between them, not one each.
TEST_CASE("Volume: concurrent flushes share one store sync", "[volume][flush]") {
  Fixture f(/*with_sink=*/false);
  Outcomes outcomes;
  f.store->AllowFlushes(0);
  f.Flush(outcomes, 0);
  REQUIRE(f.store->WaitFlushesStarted(1));

  constexpr int kThreads = 4;
  constexpr int kPerThread = 8;
  std::vector<std::thread> callers;
  for (int t = 0; t < kThreads; ++t) {
    callers.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) f.Flush(outcomes, 1 + t * kPerThread + i);
    });
  }
  for (auto& c : callers) c.join();
  CHECK(outcomes.answered_count() == 0);
  CHECK(f.store->started() == 1);

  f.store->AllowFlushes(INT_MAX);
  constexpr size_t kCalls = 1 + kThreads * kPerThread;
  REQUIRE(outcomes.WaitAnswered(kCalls));
  CHECK(outcomes.repeated() == 0);
  for (size_t i = 0; i < kCalls; ++i) {
    INFO("call " << i);
    CHECK(outcomes.at(i).status.ok());
    CHECK(outcomes.at(i).ticket == 0);  // no sink
  }
  CHECK(f.store->started() == 2);
  CHECK(f.store->max_running() == 1);
  CHECK(f.volume->counters().flushes == kCalls);
  CHECK(f.volume->counters().errors == 0);
}

TEST_CASE("Volume: flushes from many threads never run two store syncs at once",
          "[volume][flush]") {
  Fixture f(/*with_sink=*/true, /*io_threads=*/4);
  Outcomes outcomes;
  constexpr int kThreads = 4;
  constexpr int kPerThread = 200;
  std::atomic<int> failed_writes{0};
  std::vector<std::thread> callers;
  for (int t = 0; t < kThreads; ++t) {
    callers.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const uint64_t offset = static_cast<uint64_t>(t * kPerThread + i) * 512;
        if (!f.volume->Write(offset, Fill(512, static_cast<uint8_t>(i)), false).ok()) {
          ++failed_writes;
        }
        f.Flush(outcomes, static_cast<size_t>(t * kPerThread + i));
      }
    });
  }
  for (auto& c : callers) c.join();
  CHECK(failed_writes.load() == 0);
  constexpr size_t kCalls = kThreads * kPerThread;
  REQUIRE(outcomes.WaitAnswered(kCalls));
  CHECK(outcomes.repeated() == 0);
  for (size_t i = 0; i < kCalls; ++i) {
    INFO("call " << i);
    CHECK(outcomes.at(i).status.ok());
    CHECK(outcomes.at(i).ticket != 0);
  }
  CHECK(f.store->max_running() == 1);
  CHECK(f.store->started() >= 1);
  CHECK(f.store->started() <= static_cast<int>(kCalls));
  CHECK(static_cast<int>(f.sink->flushed().size()) == f.store->started());
  CHECK(f.volume->counters().flushes == kCalls);
  CHECK(f.store->inner().unsynced_write_count() == 0);
}

// Goal: a store flush that began before a write returned must not answer a
// FLUSH sent after that write; the FLUSH waits for the next store flush.
TEST_CASE("Volume: a flush arriving during a running sync waits for the next one",
          "[volume][flush]") {
  Fixture f;
  Outcomes outcomes;
  const Bytes a = Fill(4096, 0xa1);
  const Bytes b = Fill(4096, 0xb2);
  REQUIRE(f.volume->Write(0, a, false).ok());
  f.store->AllowFlushes(0);
  f.Flush(outcomes, 0);
  REQUIRE(f.store->WaitFlushesStarted(1));  // has made `a` durable, not returned
  REQUIRE(f.volume->Write(8192, b, false).ok());
  f.Flush(outcomes, 1);
  CHECK(f.Durable(0, a));
  CHECK_FALSE(f.Durable(8192, b));

  f.store->AllowFlushes(1);
  REQUIRE(outcomes.WaitAnswered(1));
  CHECK(outcomes.answered(0));
  REQUIRE(f.store->WaitFlushesStarted(2));
  CHECK_FALSE(outcomes.answered(1));  // store flush 2 has not returned

  f.store->AllowFlushes(2);
  REQUIRE(outcomes.WaitAnswered(2));
  CHECK(outcomes.repeated() == 0);
  CHECK(outcomes.at(0).status.ok());
  CHECK(outcomes.at(1).status.ok());
  CHECK(f.Durable(8192, b));
  CHECK(f.store->started() == 2);
  CHECK(f.volume->counters().flushes == 2);
}

TEST_CASE("Volume: a failed store sync fails its whole batch of flushes and is sticky",
          "[volume][flush]") {
  Fixture f;
  Outcomes outcomes;
  REQUIRE(f.volume->Write(0, Fill(4096, 1), false).ok());
  f.store->AllowFlushes(0);
  f.Flush(outcomes, 0);  // store flush 1: succeeds
  REQUIRE(f.store->WaitFlushesStarted(1));
  f.store->inner().FailNth(testutil::FaultOp::kSync, 1, EIO);
  for (size_t i = 1; i <= 3; ++i) f.Flush(outcomes, i);  // store flush 2: fails

  f.store->AllowFlushes(1);
  REQUIRE(f.store->WaitFlushesStarted(2));
  for (size_t i = 4; i <= 5; ++i) f.Flush(outcomes, i);  // wait for a third
  f.store->AllowFlushes(INT_MAX);
  REQUIRE(outcomes.WaitAnswered(6));
  CHECK(outcomes.repeated() == 0);

  CHECK(outcomes.at(0).status.ok());
  CHECK(outcomes.at(0).ticket != 0);
  for (size_t i = 1; i <= 3; ++i) {
    INFO("call " << i << ": " << outcomes.at(i).status.ToString());
    CHECK(outcomes.at(i).status.IsIOError());
    CHECK(outcomes.at(i).status.errno_value() == EIO);
    CHECK_THAT(outcomes.at(i).status.message(), Catch::Contains("injected"));
    CHECK(outcomes.at(i).ticket == 0);
  }
  for (size_t i = 4; i <= 5; ++i) {
    INFO("call " << i << ": " << outcomes.at(i).status.ToString());
    CHECK(outcomes.at(i).status.IsIOError());
    CHECK_THAT(outcomes.at(i).status.message(), Catch::Contains("stopped accepting writes"));
    CHECK(outcomes.at(i).ticket == 0);
  }
  CHECK(f.store->started() == 2);  // the third batch never reached the store
  CHECK(f.sink->flushed().size() == 1);
  REQUIRE(f.volume->sticky_error().has_value());

  // Later flushes are answered at once, before FlushShared returns.
  f.Flush(outcomes, 6);
  CHECK(outcomes.answered(6));
  CHECK_FALSE(outcomes.at(6).status.ok());
  CHECK_FALSE(f.volume->Write(4096, Fill(512, 2), false).ok());
  CHECK_FALSE(f.volume->Flush().ok());
  CHECK(f.store->started() == 2);

  auto c = f.volume->counters();
  CHECK(c.flushes == 1);
  CHECK(c.errors == 3);  // the failed batch; sticky refusals are not counted
}

// Goal: a batch's ticket closes the replication group only after the store
// flush returned, so a sync downstream never acknowledges a FLUSH whose data
// is not durable here; one Flushed() per store flush, shared by its batch.
TEST_CASE("Volume: shared flushes take one ticket per store sync, after it",
          "[volume][flush]") {
  Fixture f;
  Outcomes outcomes;
  REQUIRE(f.volume->Write(0, Fill(4096, 1), false).ok());
  f.store->AllowFlushes(0);
  f.Flush(outcomes, 0);
  REQUIRE(f.store->WaitFlushesStarted(1));
  REQUIRE(f.volume->Write(4096, Fill(4096, 2), false).ok());
  for (size_t i = 1; i <= 4; ++i) f.Flush(outcomes, i);
  CHECK(f.sink->flushed().empty());  // store flush 1 has not returned
  f.store->AllowFlushes(INT_MAX);
  REQUIRE(outcomes.WaitAnswered(5));
  CHECK(outcomes.repeated() == 0);

  auto flushed = f.sink->flushed();
  REQUIRE(flushed.size() == 2);
  CHECK(flushed[0].store_flushes_finished == 1);
  CHECK(flushed[1].store_flushes_finished == 2);
  CHECK(flushed[1].unsynced_writes == 0);
  CHECK(outcomes.at(0).ticket == flushed[0].ticket);
  for (size_t i = 1; i <= 4; ++i) {
    INFO("call " << i);
    CHECK(outcomes.at(i).status.ok());
    CHECK(outcomes.at(i).ticket == flushed[1].ticket);
  }
  CHECK(flushed[0].ticket != flushed[1].ticket);
}

// Goal: the regression behind the QD32 flush row: FLUSHes waiting for a
// store flush must leave the pool threads to the writes.
TEST_CASE("Volume: flushes waiting for a store sync hold no pool thread",
          "[volume][flush]") {
  Fixture f(/*with_sink=*/true, /*io_threads=*/2);
  Outcomes outcomes;
  f.store->AllowFlushes(0);
  constexpr size_t kFlushes = 16;
  for (size_t i = 0; i < kFlushes; ++i) f.Flush(outcomes, i);
  REQUIRE(f.store->WaitFlushesStarted(1));

  // Store flush 1 holds one of the two threads; writes still run.
  constexpr int kWrites = 8;
  std::atomic<int> written{0};
  for (int i = 0; i < kWrites; ++i) {
    Volume* v = f.volume.get();
    f.io->Post([v, i, &written] {
      if (v->Write(static_cast<uint64_t>(i) * 4096, Fill(4096, 7), false).ok()) ++written;
    });
  }
  const auto deadline = std::chrono::steady_clock::now() + kTimeout;
  while (written.load() < kWrites && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);
  }
  CHECK(written.load() == kWrites);
  CHECK(f.store->started() == 1);
  CHECK(outcomes.answered_count() == 0);

  f.store->AllowFlushes(INT_MAX);
  REQUIRE(outcomes.WaitAnswered(kFlushes));
  CHECK(outcomes.repeated() == 0);
  CHECK(f.store->started() <= 2);
  CHECK(f.volume->counters().flushes == kFlushes);
}

}  // namespace
}  // namespace blockrelay::core
