// Site: behaviour of the running daemon that belongs to no single module:
// the periodic scoreboard flush and its per-group interval.

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
// in logging mode and nothing but the periodic flush and shutdown writes
// its bitmap pages), clean at creation, flushing every `interval`.
nlohmann::json FlushTestConfig(const fs::path& dir, const std::string& interval) {
  auto config = testutil::SingleSiteConfig(dir, "a", 16ull << 20, /*tcp=*/false);
  config["groups"][0]["downstream"] = nlohmann::json::array(
      {{{"site", "b"}, {"address", "127.0.0.1:9"}, {"mode", "async"}, {"initial_sync", "none"}}});
  config["groups"][0]["bitmap_flush_interval"] = interval;
  return config;
}

// Writes 4 KiB at offset 0 of export "data": region 0 becomes dirty, in
// memory and through a hot intent extent, not yet in the bitmap page.
void WriteRegion0(const testutil::TestDaemon& daemon) {
  testutil::NbdOptions options;
  options.export_name = "data";
  std::string error;
  testutil::NbdHandle h = testutil::ConnectUnix(*daemon.nbd_unix_socket(), options, &error);
  INFO(error);
  REQUIRE(h != nullptr);
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

}  // namespace
}  // namespace blockrelay
