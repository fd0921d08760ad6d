// Site: behaviour of the running daemon that belongs to no single module:
// the periodic scoreboard flush and its per-group interval, and the intent
// readahead of a sequential writer.

#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "storage/metadata_format.h"
#include "testutil/daemon.h"
#include "testutil/nbd_client.h"

namespace blockrelay {
namespace {

namespace fs = std::filesystem;
namespace format = storage::format;

std::vector<std::byte> ReadBlock(const fs::path& path, uint64_t offset) {
  std::vector<std::byte> block(format::kBlockBytes);
  std::ifstream in(path, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  in.read(reinterpret_cast<char*>(block.data()), static_cast<std::streamsize>(block.size()));
  if (!in) block.clear();
  return block;
}

// Where the first bitmap page of `site`'s slot lies in a metadata file, from
// its newest valid superblock copy; nullopt if there is none.
std::optional<uint64_t> FirstPageOffset(const fs::path& meta, const std::string& site) {
  std::optional<format::Superblock> newest;
  for (uint32_t copy = 0; copy < 2; ++copy) {
    auto sb = format::DecodeSuperblock(ReadBlock(meta, copy * format::kBlockBytes));
    if (sb.ok() && (!newest || sb->sequence > newest->sequence)) newest = *sb;
  }
  if (!newest) return std::nullopt;
  auto g = format::MakeGeometry(newest->size_bytes, newest->region_size_bytes,
                                newest->intent_extent_bytes, newest->max_intent_extents);
  if (!g.ok()) return std::nullopt;
  for (uint32_t slot = 0; slot < format::kMaxSlots; ++slot) {
    if (newest->slots[slot].in_use && newest->slots[slot].site == site) {
      return g->PageOffset(slot, 0);
    }
  }
  return std::nullopt;
}

// Whether region 0's bit is set in the bitmap page at `offset` on disk.
bool Region0DirtyOnDisk(const fs::path& meta, uint64_t offset) {
  std::vector<std::byte> block = ReadBlock(meta, offset);
  return !block.empty() && (format::GetU64(block, format::kBitmapPageHeaderBytes) & 1) != 0;
}

// A site whose group "g" has one unreachable downstream "b" (so its slot is
// in logging mode), clean at creation: every write dirties the scoreboard.
nlohmann::json LoggingLinkConfig(const fs::path& dir, uint64_t volume_bytes) {
  auto config = testutil::SingleSiteConfig(dir, "a", volume_bytes, /*tcp=*/false);
  config["groups"][0]["downstream"] = nlohmann::json::array(
      {{{"site", "b"}, {"address", "127.0.0.1:9"}, {"mode", "async"}, {"initial_sync", "none"}}});
  return config;
}

// The same, flushing every `interval` (nothing but the periodic flush and
// shutdown writes its bitmap pages).
nlohmann::json FlushTestConfig(const fs::path& dir, const std::string& interval) {
  auto config = LoggingLinkConfig(dir, 16ull << 20);
  config["groups"][0]["bitmap_flush_interval"] = interval;
  return config;
}

// A libnbd connection to export "data".
testutil::NbdHandle ConnectData(const testutil::TestDaemon& daemon) {
  testutil::NbdOptions options;
  options.export_name = "data";
  std::string error;
  testutil::NbdHandle h = testutil::ConnectUnix(*daemon.nbd_unix_socket(), options, &error);
  INFO(error);
  REQUIRE(h != nullptr);
  return h;
}

// Writes 4 KiB at offset 0 of export "data": region 0 becomes dirty, in
// memory and through a hot intent extent, not yet in the bitmap page.
void WriteRegion0(const testutil::TestDaemon& daemon) {
  testutil::NbdHandle h = ConnectData(daemon);
  REQUIRE(testutil::Pwrite(h.get(), testutil::Pattern(4096, 1), 0) == 0);
}

TEST_CASE("Site: with bitmap_flush_interval 100ms a dirty bit reaches the metadata file in time",
          "[site][daemon]") {
  testutil::TempDir dir("blockrelay-flush");
  testutil::TestDaemon daemon(dir.path(), FlushTestConfig(dir.path(), "100ms"));
  REQUIRE(daemon.Start().ok());
  const fs::path meta = dir.path() / "data" / "g" / "data.meta";
  std::optional<uint64_t> offset = FirstPageOffset(meta, "b");
  REQUIRE(offset.has_value());
  REQUIRE_FALSE(Region0DirtyOnDisk(meta, *offset));
  WriteRegion0(daemon);
  // Well before the 5 s the site used to wait (and the 1h case below shows
  // nothing else writes the page).
  CHECK(testutil::WaitUntil([&] { return Region0DirtyOnDisk(meta, *offset); },
                            std::chrono::seconds(3)));
  CHECK(daemon.Stop() == 0);
}

TEST_CASE("Site: with bitmap_flush_interval 1h a dirty bit waits for shutdown",
          "[site][daemon]") {
  testutil::TempDir dir("blockrelay-flush");
  testutil::TestDaemon daemon(dir.path(), FlushTestConfig(dir.path(), "1h"));
  REQUIRE(daemon.Start().ok());
  const fs::path meta = dir.path() / "data" / "g" / "data.meta";
  std::optional<uint64_t> offset = FirstPageOffset(meta, "b");
  REQUIRE(offset.has_value());
  WriteRegion0(daemon);
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  CHECK_FALSE(Region0DirtyOnDisk(meta, *offset));  // durable via the intent log only
  REQUIRE(daemon.Stop() == 0);
  CHECK(Region0DirtyOnDisk(meta, *offset));  // a clean shutdown writes it
}

TEST_CASE("Site: a sequential writer's intent extents are declared ahead of it in the "
          "background", "[site][daemon]") {
  // 1 MiB writes at QD8 through 256 MiB (64 intent extents) with a link in
  // logging mode: after the first commits spot the stream, the NBD session
  // runs the scoreboard's readahead on a pool thread, and the whole volume
  // is dirty for the link.
  constexpr uint64_t kVolume = 256ull << 20;
  constexpr uint64_t kWrite = 1ull << 20;
  testutil::TempDir dir("blockrelay-readahead");
  testutil::TestDaemon daemon(dir.path(), LoggingLinkConfig(dir.path(), kVolume));
  REQUIRE(daemon.Start().ok());
  {
    testutil::NbdHandle h = ConnectData(daemon);
    const std::vector<std::byte> data = testutil::Pattern(kWrite, 3);
    std::vector<int64_t> cookies;
    for (uint64_t off = 0; off < kVolume; off += kWrite) {
      if (cookies.size() == 8) {
        REQUIRE(testutil::Await(h.get(), cookies.front()) == 0);
        cookies.erase(cookies.begin());
      }
      const int64_t cookie = nbd_aio_pwrite(h.get(), data.data(), data.size(), off,
                                            NBD_NULL_COMPLETION, 0);
      INFO(nbd_get_error());
      REQUIRE(cookie > 0);
      cookies.push_back(cookie);
    }
    for (int64_t c : cookies) REQUIRE(testutil::Await(h.get(), c) == 0);
  }
  auto status = daemon.Control({{"command", "status"}});
  REQUIRE(status.ok());
  const nlohmann::json& vol = (*status)["groups"][0]["volumes"][0];
  INFO(vol.dump());
  CHECK(vol["metadata"]["readahead_commits"].get<uint64_t>() > 0);
  CHECK(vol["links"][0]["dirty_bytes"].get<uint64_t>() == kVolume);
  CHECK(daemon.Stop() == 0);
}

}  // namespace
}  // namespace blockrelay
