// Receiver races and resync data, through a real Receiver: a RetireJournal()
// task overtaken by ApplyMarker() (which drops the retired journal itself)
// must not remove the *next* retired journal, whose groups are acknowledged
// as durable but not yet flushed to the volumes; resync data interleaved
// with streamed groups is flushed per 32 MiB, not per frame; a trim in
// resync data is undone to the bytes it overwrote; a resync's BEGIN saves
// the volume's holes at once, and a rollback returns them to zeroes; a
// streamed group never overtakes resync data that arrived before it.
//
// Driven through a real Receiver with a raw upstream speaking the wire
// protocol; the volume's store blocks chosen Flush() calls so that the
// interleaving is deterministic.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/connect.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/read.hpp>
#include <asio/write.hpp>
#include <catch2/catch.hpp>

#include "blockrelay/config/site_config.h"
#include "blockrelay/core/io_executor.h"
#include "blockrelay/core/volume.h"
#include "blockrelay/io/env.h"
#include "blockrelay/storage/block_store.h"
#include "replication/journal.h"
#include "replication/protocol.h"
#include "replication/receiver.h"
#include "replication/undo_record.h"
#include "testutil/daemon.h"
#include "testutil/fault_injection_block_store.h"
#include "testutil/forwarding_block_store.h"

namespace blockrelay::replication {
namespace {

constexpr uint64_t kVolumeBytes = 1 << 20;

// Forwards to a FaultInjectionBlockStore; the flushes whose 1-based number
// is in `blocked` wait until Release(n).
class GateStore final : public testutil::ForwardingBlockStore {
 public:
  GateStore(testutil::FaultInjectionBlockStore* inner, std::set<int> blocked)
      : ForwardingBlockStore(inner), blocked_(std::move(blocked)) {}
  std::string Describe() const override { return "gate"; }
  // A blocked flush makes durable what was written when it was called (as
  // fdatasync does), then takes long to return: until Release(n).
  // Flush 3 (the second retire) is held before it starts.
  Status Flush() override {
    int n;
    {
      std::lock_guard lock(mu_);
      n = ++flushes_;
    }
    Status s = n == 3 ? Status::OK() : inner().Flush();
    std::unique_lock lock(mu_);
    if (blocked_.count(n)) {
      waiting_.insert(n);
      cv_.notify_all();
      cv_.wait(lock, [&] { return released_.count(n) > 0; });
      waiting_.erase(n);
    }
    lock.unlock();
    if (n == 3) s = inner().Flush();
    return s;
  }

  bool WaitBlocked(int n, std::chrono::seconds timeout) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return waiting_.count(n) > 0; });
  }
  void Release(int n) {
    std::lock_guard lock(mu_);
    released_.insert(n);
    cv_.notify_all();
  }
  void ReleaseAll() {
    std::lock_guard lock(mu_);
    for (int n : blocked_) released_.insert(n);
    cv_.notify_all();
  }

 private:
  std::set<int> blocked_;
  std::mutex mu_;
  std::condition_variable cv_;
  int flushes_ = 0;
  std::set<int> waiting_, released_;
};

// A minimal upstream over a blocking socket.
class RawUpstream {
 public:
  explicit RawUpstream(uint16_t port) : socket_(ctx_) {
    asio::ip::tcp::endpoint ep(asio::ip::make_address("127.0.0.1"), port);
    for (int i = 0; i < 100; ++i) {
      std::error_code ec;
      socket_.connect(ep, ec);
      if (!ec) return;
      socket_.close();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    FAIL("cannot connect to the receiver");
  }
  void Send(const Bytes& frame) { asio::write(socket_, asio::buffer(frame)); }
  Frame Read() {
    Bytes header(kFrameHeaderBytes);
    asio::read(socket_, asio::buffer(header));
    auto h = DecodeFrameHeader(header);
    REQUIRE(h.ok());
    Bytes payload(h->length);
    if (h->length) asio::read(socket_, asio::buffer(payload));
    auto f = DecodeFrame(*h, header, payload);
    REQUIRE(f.ok());
    return *f;
  }
  // Reads until a GROUP_ACK with durable_seq >= seq.
  void WaitDurable(uint64_t seq) {
    for (;;) {
      Frame f = Read();
      if (auto* a = std::get_if<GroupAck>(&f); a && a->durable_seq >= seq) return;
    }
  }

 private:
  asio::io_context ctx_;
  asio::ip::tcp::socket socket_;
};

Bytes WriteFrame(uint64_t link_seq, uint64_t group_seq, uint64_t offset, uint8_t value,
                 std::vector<std::byte>& keep) {
  keep.assign(4096, static_cast<std::byte>(value));
  WriteGroup g;
  g.link_seq = link_seq;
  g.group_seq = group_seq;
  g.ops.push_back(Op{OpType::kWrite, 0, offset, 4096, keep});
  Bytes out;
  EncodeWriteGroup(g, out);
  return out;
}

Bytes MarkerFrame(uint64_t link_seq, uint32_t marker) {
  WriteGroup g;
  g.link_seq = link_seq;
  g.flags = kGroupResync | marker;
  Bytes out;
  EncodeWriteGroup(g, out);
  return out;
}

bool WaitFor(const std::function<bool()>& pred, std::chrono::seconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return pred();
}

// Stops `receiver` on its network thread, then that thread.
void StopReceiver(asio::io_context& ctx, Receiver& receiver, std::thread& net) {
  std::atomic<bool> stopped{false};
  Receiver* rp = &receiver;
  asio::co_spawn(ctx, [rp, &stopped]() -> asio::awaitable<void> {
    co_await rp->Stop();
    stopped = true;
  }, asio::detached);
  WaitFor([&] { return stopped.load(); }, std::chrono::seconds(10));
  ctx.stop();
  net.join();
}

TEST_CASE("Receiver: a retire overtaken by a marker must not remove the next "
          "retired journal before its groups are flushed",
          "[replication][journal]") {
  testutil::TempDir dir;
  config::GroupConfig config;
  config.name = "g";
  config.role = config::Role::kSecondary;
  config.upstream = config::UpstreamConfig{"a", std::nullopt};
  testutil::FaultInjectionBlockStore inner(kVolumeBytes);
  // Flush 1: the first retire (T1). Flush 2: the END marker (passes).
  // Flush 3: the second retire (T2).
  auto* gate = new GateStore(&inner, {1, 3});
  auto volume = std::make_shared<core::Volume>(
      "g", "v", std::unique_ptr<storage::BlockStore>(gate), nullptr, /*read_only=*/true);
  asio::io_context ctx;
  core::IoExecutor io{3};
  ReceiverTarget t;
  t.config = &config;
  t.volumes = {volume};
  auto r = Receiver::Open(ctx, io, "b", dir.path().string(), {t});
  REQUIRE(r.ok());
  const uint16_t port = testutil::PickFreeTcpPort();
  REQUIRE((*r)->Listen(config::Endpoint{"127.0.0.1", port}).ok());
  (*r)->Start();
  std::thread net([&] { ctx.run(); });
  const std::string journal = (dir.path() / "journal-g.log").string();
  const std::string retired = journal + ".old";
  auto* env = io::Env::Default();

  {
    RawUpstream up(port);
    Hello hello;
    hello.site = "a";
    hello.group = "g";
    hello.region_size_bytes = config.region_size_bytes;
    hello.volumes = {{"v", kVolumeBytes}};
    Bytes out;
    EncodeHello(hello, out);
    up.Send(out);
    Frame reply = up.Read();
    REQUIRE(std::get<HelloReply>(reply).result == HelloResult::kAccepted);
    REQUIRE(std::holds_alternative<DirtyRanges>(up.Read()));
    out.clear();
    EncodePing(Ping{0}, out);
    up.Send(out);

    std::vector<std::byte> k1, k2;
    // Group 1, then 1 s idle: the journal is rotated and T1 flushes (blocked).
    up.Send(WriteFrame(1, 1, 0, 0x11, k1));
    up.WaitDurable(1);
    REQUIRE(gate->WaitBlocked(1, std::chrono::seconds(10)));
    REQUIRE(env->FileExists(retired));
    // A marker (END: nothing to resync) drops the retired journal itself.
    up.Send(MarkerFrame(2, kGroupResyncEnd));
    up.WaitDurable(2);
    REQUIRE_FALSE(env->FileExists(retired));
    // Group 2, acknowledged durable, then idle: rotated again (T2 blocked).
    up.Send(WriteFrame(3, 2, 4096, 0x22, k2));
    up.WaitDurable(3);
    REQUIRE(gate->WaitBlocked(3, std::chrono::seconds(10)));
    REQUIRE(env->FileExists(retired));  // holds group 2 only

    // T1 finishes its (old) flush and removes the retired journal of T2.
    gate->Release(1);
    const bool removed = WaitFor([&] { return !env->FileExists(retired); },
                                 std::chrono::seconds(2));
    // Group 2 is acknowledged durable upstream. While it is not durable in
    // the volume, some journal must still hold it.
    const auto durable = inner.DurableImage();
    const bool group2_durable_in_volume = durable[4096] == std::byte{0x22};
    GroupJournal::Recovered rec;
    bool in_journal = false;
    if (auto j = GroupJournal::Open(*env, journal, &rec); j.ok()) {
      in_journal = !rec.frames.empty();
    }
    INFO("retired journal removed by the stale retire: " << removed
         << "; group 2 durable in the volume: " << group2_durable_in_volume
         << "; group 2 in the journal: " << in_journal);
    CHECK((group2_durable_in_volume || (!removed || in_journal)));
    gate->ReleaseAll();
  }
  gate->ReleaseAll();
  StopReceiver(ctx, **r, net);
}

}  // namespace
}  // namespace blockrelay::replication

namespace blockrelay::replication {
namespace {

// A secondary site "b" with group "g" of one volume "v", its Receiver
// listening on a free loopback port, the network thread running; stopped
// and joined when it goes.
class ReceiverSite {
 public:
  ReceiverSite(const std::filesystem::path& dir, std::shared_ptr<core::Volume> volume,
               size_t io_threads = 2)
      : volume_(std::move(volume)), io_(io_threads) {
    config_.name = "g";
    config_.role = config::Role::kSecondary;
    config_.upstream = config::UpstreamConfig{"a", std::nullopt};
    ReceiverTarget t;
    t.config = &config_;
    t.volumes = {volume_};
    auto r = Receiver::Open(ctx_, io_, "b", dir.string(), {t});
    REQUIRE(r.ok());
    receiver_ = std::move(r).value();
    port_ = testutil::PickFreeTcpPort();
    REQUIRE(receiver_->Listen(config::Endpoint{"127.0.0.1", port_}).ok());
    receiver_->Start();
    net_ = std::thread([this] { ctx_.run(); });
  }
  ~ReceiverSite() { StopReceiver(ctx_, *receiver_, net_); }

  uint16_t port() const { return port_; }

  // HELLO as site a, accepted, and the DIRTY_RANGES that follows.
  void Handshake(RawUpstream& up) {
    Hello hello;
    hello.site = "a";
    hello.group = "g";
    hello.region_size_bytes = config_.region_size_bytes;
    hello.volumes = {{"v", volume_->size_bytes()}};
    Bytes out;
    EncodeHello(hello, out);
    up.Send(out);
    REQUIRE(std::get<HelloReply>(up.Read()).result == HelloResult::kAccepted);
    REQUIRE(std::holds_alternative<DirtyRanges>(up.Read()));
  }

  // `blockrelay rollback g`, once the upstream is gone: whether it rolled back.
  bool Rollback() {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    std::atomic<int> done{0};
    bool rolled_back = false;
    Receiver* rp = receiver_.get();
    asio::co_spawn(ctx_, [rp, &done, &rolled_back]() -> asio::awaitable<void> {
      auto out = co_await rp->Rollback("g");
      rolled_back = out.ok() && out->rolled_back;
      done = 1;
    }, asio::detached);
    REQUIRE(WaitFor([&] { return done.load() == 1; }, std::chrono::seconds(10)));
    return rolled_back;
  }

 private:
  config::GroupConfig config_;
  std::shared_ptr<core::Volume> volume_;
  asio::io_context ctx_;
  core::IoExecutor io_;
  std::unique_ptr<Receiver> receiver_;
  uint16_t port_ = 0;
  std::thread net_;
};

// Resync data is flushed (and acknowledged as
// durable) once 32 MiB wait, when the resync pauses, or at a barrier. A
// resync frame that follows a streamed (journaled) group goes to the pool
// (QueueResyncInline refuses while the journal has pending frames), and
// ApplyResyncData applies those with SyncAndApply: with kAlways that would
// flush the volumes once per resync frame.
TEST_CASE("Receiver: interleaved streamed groups do not make every resync frame "
          "flush the volumes", "[replication]") {
  testutil::TempDir dir;
  config::GroupConfig config;
  config.name = "g";
  config.role = config::Role::kSecondary;
  config.upstream = config::UpstreamConfig{"a", std::nullopt};
  auto* inner = new testutil::FaultInjectionBlockStore(kVolumeBytes);
  auto volume = std::make_shared<core::Volume>(
      "g", "v", std::unique_ptr<storage::BlockStore>(inner), nullptr, /*read_only=*/true);
  asio::io_context ctx;
  core::IoExecutor io{2};
  ReceiverTarget t;
  t.config = &config;
  t.volumes = {volume};
  auto r = Receiver::Open(ctx, io, "b", dir.path().string(), {t});
  REQUIRE(r.ok());
  const uint16_t port = testutil::PickFreeTcpPort();
  REQUIRE((*r)->Listen(config::Endpoint{"127.0.0.1", port}).ok());
  (*r)->Start();
  std::thread net([&] { ctx.run(); });
  uint64_t flushes = 0;
  constexpr int kFrames = 40;
  {
    RawUpstream up(port);
    Hello hello;
    hello.site = "a";
    hello.group = "g";
    hello.region_size_bytes = config.region_size_bytes;
    hello.volumes = {{"v", kVolumeBytes}};
    Bytes out;
    EncodeHello(hello, out);
    up.Send(out);
    REQUIRE(std::get<HelloReply>(up.Read()).result == HelloResult::kAccepted);
    REQUIRE(std::holds_alternative<DirtyRanges>(up.Read()));
    out.clear();
    EncodePing(Ping{0}, out);
    up.Send(out);
    up.Send(MarkerFrame(1, kGroupResyncBegin));
    up.WaitDurable(1);
    const uint64_t before = inner->flush_count();
    std::vector<std::vector<std::byte>> keep(2 * kFrames);
    uint64_t seq = 2;
    for (int i = 0; i < kFrames; ++i) {
      // A streamed 4 KiB write, then 16 KiB of resync data elsewhere.
      up.Send(WriteFrame(seq++, 10 + i, 512 * 1024 + 4096 * i, 0x33, keep[2 * i]));
      keep[2 * i + 1].assign(16384, std::byte{0x44});
      WriteGroup g;
      g.link_seq = seq++;
      g.flags = kGroupResync;
      g.ops.push_back(Op{OpType::kWrite, 0, static_cast<uint64_t>(16384) * i, 16384,
                         keep[2 * i + 1]});
      Bytes f;
      EncodeWriteGroup(g, f);
      up.Send(f);
    }
    up.WaitDurable(seq - 1);
    flushes = inner->flush_count() - before;
  }
  INFO("volume flushes for " << kFrames << " resync frames of 16 KiB: " << flushes);
  CHECK(flushes <= 5);
  StopReceiver(ctx, **r, net);
}

}  // namespace
}  // namespace blockrelay::replication

namespace blockrelay::replication {
namespace {

// The link never sends a trim as resync data, but CheckWriteGroup() accepts
// one: the undo record must then keep the bytes it overwrites (not zeroes),
// so that a rollback restores them.
TEST_CASE("Receiver: a trim in resync data is undone to the bytes it overwrote",
          "[replication][undo]") {
  testutil::TempDir dir;
  auto* inner = new testutil::FaultInjectionBlockStore(kVolumeBytes);
  auto volume = std::make_shared<core::Volume>(
      "g", "v", std::unique_ptr<storage::BlockStore>(inner), nullptr, /*read_only=*/true);
  ReceiverSite site(dir.path(), volume);
  {
    RawUpstream up(site.port());
    site.Handshake(up);
    Bytes out;
    EncodePing(Ping{0}, out);
    up.Send(out);
    std::vector<std::byte> k;
    up.Send(WriteFrame(1, 1, 0, 0x55, k));  // the state before the epoch
    up.Send(MarkerFrame(2, kGroupResyncBegin));
    up.WaitDurable(2);
    WriteGroup g;
    g.link_seq = 3;
    g.flags = kGroupResync;
    g.ops.push_back(Op{OpType::kTrim, 0, 0, 4096, {}});
    Bytes f;
    EncodeWriteGroup(g, f);
    up.Send(f);
    up.WaitDurable(3);
  }
  // The upstream is gone: roll back.
  CHECK(site.Rollback());
  std::vector<std::byte> b(1);
  REQUIRE(volume->Read(0, b).ok());
  CHECK(static_cast<int>(b[0]) == 0x55);
}

}  // namespace
}  // namespace blockrelay::replication

namespace blockrelay::replication {
namespace {

// A fresh sparse downstream's initial sync writes nothing but holes: BEGIN
// saves them in the undo record at once (one sync), so the batches that
// fill them have nothing left to save; a rollback still returns them to
// zeroes.
TEST_CASE("Receiver: a resync's BEGIN saves the volume's holes in the undo "
          "record, and a rollback returns them to zeroes",
          "[replication][undo]") {
  testutil::TempDir dir;
  storage::FileBlockStoreOptions options;
  options.path = (dir.path() / "v.img").string();
  options.size_bytes = kVolumeBytes;
  auto store = storage::OpenFileBlockStore(options);
  REQUIRE(store.ok());
  auto volume = std::make_shared<core::Volume>("g", "v", std::move(store).value(), nullptr,
                                               /*read_only=*/true);
  ReceiverSite site(dir.path(), volume);
  const auto undo_path = dir.path() / "undo-g.log";
  uint64_t undo_after_begin = 0;
  std::vector<std::byte> resync_data(256 * 1024, std::byte{0x66});
  {
    RawUpstream up(site.port());
    site.Handshake(up);
    // Data in the first 4 KiB; the rest of the file stays a hole.
    std::vector<std::byte> k;
    up.Send(WriteFrame(1, 1, 0, 0x55, k));
    up.Send(MarkerFrame(2, kGroupResyncBegin));
    up.WaitDurable(2);
    REQUIRE(std::filesystem::exists(undo_path));
    // The header (4096 bytes) and at least one record: the hole.
    undo_after_begin = std::filesystem::file_size(undo_path);
    CHECK(undo_after_begin > UndoRecord::kHeaderBytes);
    WriteGroup g;
    g.link_seq = 3;
    g.flags = kGroupResync;
    g.ops.push_back(Op{OpType::kWrite, 0, 512 * 1024, resync_data.size(), resync_data});
    Bytes f;
    EncodeWriteGroup(g, f);
    up.Send(f);
    up.WaitDurable(3);
  }
  // Written into the hole, and nothing more saved for it.
  std::vector<std::byte> b(1);
  REQUIRE(volume->Read(512 * 1024, b).ok());
  CHECK(static_cast<int>(b[0]) == 0x66);
  CHECK(std::filesystem::file_size(undo_path) == undo_after_begin);
  // The upstream is gone: roll back.
  CHECK(site.Rollback());
  std::vector<std::byte> back(resync_data.size(), std::byte{1});
  REQUIRE(volume->Read(512 * 1024, back).ok());
  CHECK(std::all_of(back.begin(), back.end(), [](std::byte x) { return x == std::byte{0}; }));
  REQUIRE(volume->Read(0, b).ok());
  CHECK(static_cast<int>(b[0]) == 0x55);  // the data before the epoch stays
}

}  // namespace
}  // namespace blockrelay::replication

namespace blockrelay::replication {
namespace {

// Blocks the first write at offset 0 until Release().
class WriteGate final : public testutil::ForwardingBlockStore {
 public:
  explicit WriteGate(testutil::FaultInjectionBlockStore* inner) : ForwardingBlockStore(inner) {}
  Status Write(uint64_t offset, std::span<const std::byte> data, bool fua) override {
    if (offset == 0) {
      std::unique_lock lock(mu_);
      blocked_ = true;
      cv_.notify_all();
      cv_.wait(lock, [&] { return released_; });
    }
    return ForwardingBlockStore::Write(offset, data, fua);
  }
  bool WaitBlocked() {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(10), [&] { return blocked_; });
  }
  void Release() {
    std::lock_guard lock(mu_);
    released_ = true;
    cv_.notify_all();
  }
 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool blocked_ = false, released_ = false;
};

Bytes ResyncFrame(uint64_t link_seq, uint64_t offset, uint8_t value, std::vector<std::byte>& keep) {
  keep.assign(4096, static_cast<std::byte>(value));
  WriteGroup g;
  g.link_seq = link_seq;
  g.flags = kGroupResync;
  g.ops.push_back(Op{OpType::kWrite, 0, offset, 4096, keep});
  Bytes out;
  EncodeWriteGroup(g, out);
  return out;
}

// A resync frame queued while SyncAndApply applies an earlier resync batch,
// then a streamed group to the same bytes: the streamed group came later
// and must land last.
TEST_CASE("Receiver: a streamed group does not overtake resync data queued "
          "before it", "[replication]") {
  testutil::TempDir dir;
  testutil::FaultInjectionBlockStore inner(kVolumeBytes);
  auto* gate = new WriteGate(&inner);
  auto volume = std::make_shared<core::Volume>(
      "g", "v", std::unique_ptr<storage::BlockStore>(gate), nullptr, /*read_only=*/true);
  ReceiverSite site(dir.path(), volume, /*io_threads=*/3);
  {
    RawUpstream up(site.port());
    site.Handshake(up);
    std::vector<std::byte> k0, k1, k2;
    // Q0: resync data at 0; the ticker's SyncAndApply drains it and blocks
    // in its write.
    up.Send(ResyncFrame(1, 0, 0xAA, k0));
    REQUIRE(gate->WaitBlocked());
    // R: resync data at 64 KiB (queued inline: nothing pending), then S: a
    // streamed group to the same bytes (appended inline).
    up.Send(ResyncFrame(2, 65536, 0x11, k1));
    up.Send(WriteFrame(3, 1, 65536, 0x22, k2));
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    gate->Release();
    up.WaitDurable(3);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }
  std::vector<std::byte> b(1);
  REQUIRE(volume->Read(65536, b).ok());
  CHECK(static_cast<int>(b[0]) == 0x22);  // S came after R
}

}  // namespace
}  // namespace blockrelay::replication
