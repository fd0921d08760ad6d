// The receiver's journal rotation (src/replication/receiver.cc,
// RotateJournal/RetireJournal): a full journal is moved aside to
// journal-<group>.log.old while the volumes are flushed, so appends never
// wait for that flush, and then kept as journal-<group>.log.spare for the
// next rotation to recycle. After a crash the retired journal's groups are
// replayed before the journal's, whatever point the rotation had reached;
// a spare's are never replayed.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <asio/io_context.hpp>
#include <catch2/catch.hpp>

#include "blockrelay/config/site_config.h"
#include "blockrelay/core/io_executor.h"
#include "blockrelay/core/volume.h"
#include "blockrelay/io/env.h"
#include "replication/journal.h"
#include "replication/protocol.h"
#include "replication/receiver.h"
#include "testutil/daemon.h"
#include "testutil/fault_injection_block_store.h"

namespace blockrelay::replication {
namespace {

constexpr uint64_t kVolumeBytes = 1 << 20;

// A WRITE_GROUP frame that fills [offset, offset + 4096) with `value`.
Bytes WriteFrame(uint64_t group_seq, uint64_t offset, uint8_t value) {
  static std::vector<std::vector<std::byte>> keep;  // data outlives the frame
  keep.emplace_back(4096, static_cast<std::byte>(value));
  WriteGroup g;
  g.link_seq = group_seq;
  g.group_seq = group_seq;
  Op op;
  op.type = OpType::kWrite;
  op.volume = 0;
  op.offset = offset;
  op.length = 4096;
  op.data = keep.back();
  g.ops.push_back(op);
  Bytes out;
  EncodeWriteGroup(g, out);
  return out;
}

void WriteJournal(const std::string& path, const std::vector<Bytes>& frames) {
  GroupJournal::Recovered ignored;
  auto j = GroupJournal::Open(*io::Env::Default(), path, &ignored);
  REQUIRE(j.ok());
  for (const auto& f : frames) REQUIRE((*j)->Append(f).ok());
  REQUIRE((*j)->Sync().ok());
}

uint8_t ByteAt(core::Volume& v, uint64_t offset) {
  std::vector<std::byte> b(1);
  REQUIRE(v.Read(offset, b).ok());
  return static_cast<uint8_t>(b[0]);
}

struct Site {
  Site() {
    config.name = "g";
    config.role = config::Role::kSecondary;
    config.upstream = config::UpstreamConfig{"a", std::nullopt};
    volume = std::make_shared<core::Volume>(
        "g", "v", std::make_unique<testutil::FaultInjectionBlockStore>(kVolumeBytes),
        /*metadata=*/nullptr, /*read_only=*/true);
  }
  std::string JournalPath() const { return (dir / "journal-g.log").string(); }
  std::string RetiredPath() const { return JournalPath() + ".old"; }
  std::string SparePath() const { return JournalPath() + ".spare"; }
  Result<std::unique_ptr<Receiver>> Open() {
    ReceiverTarget t;
    t.config = &config;
    t.volumes = {volume};
    return Receiver::Open(ctx, io, "b", dir.path().string(), {t});
  }

  testutil::TempDir dir;
  config::GroupConfig config;
  std::shared_ptr<core::Volume> volume;
  asio::io_context ctx;
  core::IoExecutor io{2};
};

TEST_CASE("Receiver: a retired journal is replayed before the journal at start-up",
          "[replication][journal]") {
  Site site;
  // Block 1 was written by group 10 (retired journal) and again by group 11.
  WriteJournal(site.RetiredPath(), {WriteFrame(9, 0, 0xAA), WriteFrame(10, 4096, 0xAA)});
  WriteJournal(site.JournalPath(), {WriteFrame(11, 4096, 0xBB)});
  auto r = site.Open();
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  CHECK(ByteAt(*site.volume, 0) == 0xAA);
  CHECK(ByteAt(*site.volume, 4096) == 0xBB);
  CHECK((*r)->UpstreamJson("g")["applied_group_seq"] == 11);
  // Both are applied and the volume flushed: nothing is left to replay;
  // the retired file is kept for reuse.
  CHECK_FALSE(io::Env::Default()->FileExists(site.RetiredPath()));
  CHECK(io::Env::Default()->FileExists(site.SparePath()));
  CHECK((*r)->UpstreamJson("g")["journal_bytes"] == 0);
}

// Goal: a spare holds groups that were applied and flushed long ago; under
// newer writes, replaying them would bring old bytes back.
TEST_CASE("Receiver: a spare journal is never replayed at start-up",
          "[replication][journal]") {
  Site site;
  WriteJournal(site.SparePath(), {WriteFrame(5, 0, 0xEE)});
  WriteJournal(site.JournalPath(), {WriteFrame(6, 4096, 0xBB)});
  auto r = site.Open();
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  CHECK(ByteAt(*site.volume, 0) == 0x00);
  CHECK(ByteAt(*site.volume, 4096) == 0xBB);
  CHECK((*r)->UpstreamJson("g")["applied_group_seq"] == 6);
  CHECK(io::Env::Default()->FileExists(site.SparePath()));
}

TEST_CASE("Receiver: a crash between moving the journal aside and creating the "
          "next one replays the retired journal",
          "[replication][journal]") {
  Site site;
  WriteJournal(site.RetiredPath(), {WriteFrame(20, 8192, 0xCC)});
  REQUIRE_FALSE(io::Env::Default()->FileExists(site.JournalPath()));
  auto r = site.Open();
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  CHECK(ByteAt(*site.volume, 8192) == 0xCC);
  CHECK((*r)->UpstreamJson("g")["applied_group_seq"] == 20);
  CHECK(io::Env::Default()->FileExists(site.JournalPath()));
  CHECK_FALSE(io::Env::Default()->FileExists(site.RetiredPath()));
}

TEST_CASE("Receiver: a damaged retired journal is refused naming the file",
          "[replication][journal]") {
  Site site;
  {
    auto f = io::Env::Default()->OpenFile(site.RetiredPath(), io::OpenMode::kCreateTruncate);
    REQUIRE(f.ok());
    std::vector<std::byte> junk(8192, std::byte{0x5A});
    REQUIRE((*f)->PWrite(0, junk).ok());
  }
  auto r = site.Open();
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().message(), Catch::Matchers::Contains("journal-g.log.old"));
}

}  // namespace
}  // namespace blockrelay::replication

