// Volume's replication hooks (include/blockrelay/core/volume.h): every write,
// trim and zeroing that reached the store is handed to the ReplicationSink
// once, while its range is still held; failed ones are not; FLUSH closes a
// group; read-only volumes take only upstream writes; ReadForResync holds
// its range while the caller uses the data. Volumes here have no metadata
// and an in-memory FaultInjectionBlockStore.
#include "blockrelay/core/volume.h"

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "testutil/fault_injection_block_store.h"

namespace blockrelay::core {
namespace {

using namespace std::chrono_literals;
using Bytes = std::vector<std::byte>;

constexpr uint64_t kVolumeBytes = 1 << 20;
constexpr uint32_t kIndex = 3;

Bytes Fill(size_t length, uint8_t value) {
  return Bytes(length, static_cast<std::byte>(value));
}

// Records what the volume hands it, together with what the store held and
// whether the volume still held the range at that moment.
class FakeSink final : public ReplicationSink {
 public:
  struct Call {
    uint32_t volume;
    CapturedOp op;
    uint64_t offset;
    uint64_t length;
    Bytes data;
    storage::WriteSeq wseq;
    bool fua;
    Bytes store_bytes;     // the range as the store had it at the call
    bool volume_idle;      // IfNoWriteInFlight() at the call
  };

  void Watch(testutil::FaultInjectionBlockStore* store, Volume* volume) {
    store_ = store;
    volume_ = volume;
  }

  Ticket Captured(uint32_t volume, CapturedOp op, uint64_t offset, uint64_t length,
                  std::span<const std::byte> data, storage::WriteSeq wseq,
                  bool fua) override {
    Call c{volume, op, offset, length, Bytes(data.begin(), data.end()), wseq, fua,
           {}, false};
    if (store_) {
      c.store_bytes.resize(length);
      if (!store_->Read(offset, c.store_bytes).ok()) c.store_bytes.clear();
    }
    if (volume_) c.volume_idle = volume_->IfNoWriteInFlight([](storage::WriteSeq) {});
    std::lock_guard lock(mu_);
    calls_.push_back(std::move(c));
    return ++next_ticket_;
  }
  Ticket Flushed() override {
    std::lock_guard lock(mu_);
    ++flushes_;
    return ++next_ticket_;
  }
  bool RepliesWait() const override { return false; }
  void WhenAcknowledged(Ticket, bool, std::function<void(Status)> done) override {
    done(Status::OK());
  }

  std::vector<Call> calls() const {
    std::lock_guard lock(mu_);
    return calls_;
  }
  int flushes() const {
    std::lock_guard lock(mu_);
    return flushes_;
  }
  Ticket last_ticket() const {
    std::lock_guard lock(mu_);
    return next_ticket_;
  }

 private:
  testutil::FaultInjectionBlockStore* store_ = nullptr;
  Volume* volume_ = nullptr;
  mutable std::mutex mu_;
  std::vector<Call> calls_;
  int flushes_ = 0;
  Ticket next_ticket_ = 100;
};

// A volume over a FaultInjectionBlockStore, attached to a FakeSink.
struct Fixture {
  explicit Fixture(bool read_only = false) {
    auto s = std::make_unique<testutil::FaultInjectionBlockStore>(kVolumeBytes);
    store = s.get();
    volume = std::make_unique<Volume>("g", "v", std::move(s), /*metadata=*/nullptr,
                                      read_only);
    volume->AttachReplication(&sink, kIndex);
    sink.Watch(store, volume.get());
  }
  Bytes StoreBytes(uint64_t offset, size_t length) {
    Bytes out(length);
    REQUIRE(store->Read(offset, out).ok());
    return out;
  }

  FakeSink sink;
  testutil::FaultInjectionBlockStore* store = nullptr;  // owned by volume
  std::unique_ptr<Volume> volume;
};

TEST_CASE("Volume: a write is handed to the sink once, after the store has it",
          "[core]") {
  Fixture f;
  CHECK(f.volume->replication() == &f.sink);
  const Bytes data = Fill(4096, 0x5a);
  bool fua = false;
  SECTION("without FUA") { fua = false; }
  SECTION("with FUA") { fua = true; }
  WriteContext ctx;
  REQUIRE(f.volume->Write(8192, data, fua, &ctx).ok());

  auto calls = f.sink.calls();
  REQUIRE(calls.size() == 1);
  const auto& c = calls[0];
  CHECK(c.volume == kIndex);
  CHECK(c.op == CapturedOp::kWrite);
  CHECK(c.offset == 8192);
  CHECK(c.length == 4096);
  CHECK(c.data == data);
  CHECK(c.wseq == 0);  // no metadata, no scoreboard
  CHECK(c.fua == fua);
  CHECK(c.store_bytes == data);
  CHECK_FALSE(c.volume_idle);  // the range is still held
  CHECK(ctx.ticket == f.sink.last_ticket());
  CHECK(ctx.ticket != 0);
  CHECK(f.volume->IfNoWriteInFlight([](storage::WriteSeq) {}));
}

TEST_CASE("Volume: a write without a WriteContext is still handed to the sink",
          "[core]") {
  Fixture f;
  REQUIRE(f.volume->Write(0, Fill(512, 1), false).ok());
  REQUIRE(f.volume->Write(512, Fill(512, 2), true).ok());
  auto calls = f.sink.calls();
  REQUIRE(calls.size() == 2);
  CHECK(calls[0].offset == 0);
  CHECK(calls[0].data == Fill(512, 1));
  CHECK_FALSE(calls[0].fua);
  CHECK(calls[1].offset == 512);
  CHECK(calls[1].data == Fill(512, 2));
  CHECK(calls[1].fua);
}

TEST_CASE("Volume: a trim is handed to the sink once with its range and no data",
          "[core]") {
  Fixture f;
  REQUIRE(f.volume->Write(0, Fill(16384, 0xff), false).ok());
  bool fua = GENERATE(false, true);
  WriteContext ctx;
  REQUIRE(f.volume->Trim(4096, 8192, fua, &ctx).ok());

  auto calls = f.sink.calls();
  REQUIRE(calls.size() == 2);
  const auto& c = calls[1];
  CHECK(c.volume == kIndex);
  CHECK(c.op == CapturedOp::kTrim);
  CHECK(c.offset == 4096);
  CHECK(c.length == 8192);
  CHECK(c.data.empty());
  CHECK(c.fua == fua);
  CHECK(c.store_bytes == Fill(8192, 0));  // this store trims to zeroes
  CHECK_FALSE(c.volume_idle);
  CHECK(ctx.ticket == f.sink.last_ticket());
}

TEST_CASE("Volume: a zeroing is handed to the sink once with its range and no data",
          "[core]") {
  Fixture f;
  REQUIRE(f.volume->Write(0, Fill(16384, 0xff), false).ok());
  bool fua = GENERATE(false, true);
  WriteContext ctx;
  REQUIRE(f.volume->WriteZeroes(1024, 2048, /*may_trim=*/false, /*fast_only=*/false,
                                fua, &ctx)
              .ok());

  auto calls = f.sink.calls();
  REQUIRE(calls.size() == 2);
  const auto& c = calls[1];
  CHECK(c.volume == kIndex);
  CHECK(c.op == CapturedOp::kZero);
  CHECK(c.offset == 1024);
  CHECK(c.length == 2048);
  CHECK(c.data.empty());
  CHECK(c.fua == fua);
  CHECK(c.store_bytes == Fill(2048, 0));
  CHECK_FALSE(c.volume_idle);
  CHECK(ctx.ticket == f.sink.last_ticket());
}

TEST_CASE("Volume: writes, trims and zeroings reach the sink in the order they completed",
          "[core]") {
  Fixture f;
  REQUIRE(f.volume->Write(0, Fill(512, 1), false).ok());
  REQUIRE(f.volume->Trim(4096, 512, false).ok());
  REQUIRE(f.volume->WriteZeroes(8192, 512, true, false, false).ok());
  REQUIRE(f.volume->Write(0, Fill(512, 2), false).ok());
  auto calls = f.sink.calls();
  REQUIRE(calls.size() == 4);
  CHECK(calls[0].op == CapturedOp::kWrite);
  CHECK(calls[1].op == CapturedOp::kTrim);
  CHECK(calls[2].op == CapturedOp::kZero);
  CHECK(calls[3].op == CapturedOp::kWrite);
  CHECK(calls[3].data == Fill(512, 2));
}

TEST_CASE("Volume: a failed store write, trim or zeroing is not handed to the sink",
          "[core]") {
  Fixture f;
  f.store->FailNth(testutil::FaultOp::kWrite, 1, EIO);
  WriteContext ctx;
  Status s;
  SECTION("write") { s = f.volume->Write(0, Fill(512, 1), false, &ctx); }
  SECTION("FUA write") { s = f.volume->Write(0, Fill(512, 1), true, &ctx); }
  SECTION("trim") { s = f.volume->Trim(0, 512, false, &ctx); }
  SECTION("zeroing") { s = f.volume->WriteZeroes(0, 512, false, false, false, &ctx); }
  CHECK_FALSE(s.ok());
  CHECK(f.sink.calls().empty());
  CHECK(ctx.ticket == 0);
  CHECK(f.volume->IfNoWriteInFlight([](storage::WriteSeq) {}));  // range released
}

TEST_CASE("Volume: a flush with a WriteContext closes the group and returns its ticket",
          "[core]") {
  Fixture f;
  REQUIRE(f.volume->Write(0, Fill(512, 1), false).ok());
  WriteContext ctx;
  REQUIRE(f.volume->Flush(&ctx).ok());
  CHECK(f.sink.flushes() == 1);
  CHECK(ctx.ticket == f.sink.last_ticket());
  CHECK(ctx.ticket != 0);
  CHECK(f.sink.calls().size() == 1);  // a flush is not a captured op
}

TEST_CASE("Volume: a failed flush does not close a group", "[core]") {
  Fixture f;
  f.store->FailNth(testutil::FaultOp::kSync, 1, EIO);
  WriteContext ctx;
  CHECK_FALSE(f.volume->Flush(&ctx).ok());
  CHECK(f.sink.flushes() == 0);
  CHECK(ctx.ticket == 0);
}

TEST_CASE("Volume: a read-only volume refuses local writes but applies upstream ones",
          "[core]") {
  Fixture f(/*read_only=*/true);
  REQUIRE(f.volume->read_only());
  WriteContext local;
  WriteContext upstream;
  upstream.from_upstream = true;
  SECTION("write") {
    Status s = f.volume->Write(0, Fill(512, 7), false, &local);
    CHECK(s.code() == Status::Code::kPermissionDenied);
    CHECK(f.volume->Write(0, Fill(512, 7), false).code() ==
          Status::Code::kPermissionDenied);
    CHECK(f.StoreBytes(0, 512) == Fill(512, 0));
    CHECK(f.sink.calls().empty());

    REQUIRE(f.volume->Write(0, Fill(512, 7), false, &upstream).ok());
    CHECK(f.StoreBytes(0, 512) == Fill(512, 7));
    REQUIRE(f.sink.calls().size() == 1);
    CHECK(f.sink.calls()[0].op == CapturedOp::kWrite);
  }
  SECTION("trim") {
    CHECK(f.volume->Trim(0, 512, false, &local).code() ==
          Status::Code::kPermissionDenied);
    CHECK(f.sink.calls().empty());
    REQUIRE(f.volume->Trim(0, 512, false, &upstream).ok());
    REQUIRE(f.sink.calls().size() == 1);
    CHECK(f.sink.calls()[0].op == CapturedOp::kTrim);
  }
  SECTION("zeroing") {
    CHECK(f.volume->WriteZeroes(0, 512, false, false, false, &local).code() ==
          Status::Code::kPermissionDenied);
    CHECK(f.sink.calls().empty());
    REQUIRE(f.volume->WriteZeroes(0, 512, false, false, false, &upstream).ok());
    REQUIRE(f.sink.calls().size() == 1);
    CHECK(f.sink.calls()[0].op == CapturedOp::kZero);
  }
  CHECK(local.ticket == 0);
  CHECK(upstream.ticket == f.sink.last_ticket());
}

// Goal: resync data must enter the stream before any later write to the same
// bytes, so a write waits while the resync callback runs.
TEST_CASE("Volume: ReadForResync hands over the data while the range is held",
          "[core]") {
  Fixture f;
  REQUIRE(f.volume->Write(4096, Fill(4096, 0x42), false).ok());

  Bytes out;
  std::atomic<bool> write_done{false};
  Status write_status = Status::IOError("not run");
  std::thread writer;
  int callbacks = 0;
  bool idle_inside = true;
  bool write_done_inside = true;
  Bytes seen;
  storage::WriteSeq as_of = 99;
  Status s = f.volume->ReadForResync(0, 8192, out, [&](storage::WriteSeq seq) {
    ++callbacks;
    as_of = seq;
    seen = out;
    idle_inside = f.volume->IfNoWriteInFlight([](storage::WriteSeq) {});
    // An overlapping write from another thread waits for the callback.
    writer = std::thread([&] {
      // Catch2 assertions are not thread-safe: checked after join().
      write_status = f.volume->Write(6000, Fill(100, 0x77), false);
      write_done = true;
    });
    std::this_thread::sleep_for(100ms);
    write_done_inside = write_done.load();
  });
  REQUIRE(s.ok());
  writer.join();

  CHECK(callbacks == 1);
  CHECK(as_of == 0);  // no metadata
  Bytes expected = Fill(4096, 0);
  Bytes written = Fill(4096, 0x42);
  expected.insert(expected.end(), written.begin(), written.end());
  CHECK(seen == expected);
  CHECK_FALSE(idle_inside);
  CHECK_FALSE(write_done_inside);
  CHECK(write_done.load());
  CHECK(write_status.ok());
  // The resync read came first, then the write.
  auto calls = f.sink.calls();
  REQUIRE(calls.size() == 2);
  CHECK(calls[1].offset == 6000);
}

TEST_CASE("Volume: a failed ReadForResync read does not call back", "[core]") {
  Fixture f;
  f.store->FailNth(testutil::FaultOp::kRead, 1, EIO);
  Bytes out;
  int callbacks = 0;
  Status s = f.volume->ReadForResync(0, 512, out, [&](storage::WriteSeq) { ++callbacks; });
  CHECK_FALSE(s.ok());
  CHECK(callbacks == 0);
  CHECK(f.volume->IfNoWriteInFlight([](storage::WriteSeq) {}));
}

}  // namespace
}  // namespace blockrelay::core
