// The scoreboard invariant with the real daemon: kill -9 in the middle of a
// fio write stream, and the recovered dirty set still covers every region
// that differs from the downstream's last known state.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "blockrelay/storage/volume_metadata.h"
#include "testutil/daemon.h"

extern char** environ;

namespace blockrelay {
namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kVolumeBytes = 256 * kMiB;
constexpr uint64_t kRegionBytes = 64 * 1024;
// fio writes only the first kWrittenBytes, so regions past it (and past the
// intent extent holding its end) must stay clean: resync stays proportional.
constexpr uint64_t kWrittenBytes = 32 * kMiB;
constexpr uint64_t kIntentExtentBytes = 4 * kMiB;

pid_t Spawn(const std::vector<std::string>& args, const std::string& log) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  pid_t pid = -1;
  int rc = posix_spawnp(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  return rc == 0 ? pid : -1;
}

void KillAndReap(pid_t pid) {
  if (pid <= 0) return;
  ::kill(pid, SIGKILL);
  int status;
  for (int i = 0; i < 500; ++i) {
    if (::waitpid(pid, &status, WNOHANG) == pid) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

// Goal: Invariant 1 across a real process kill. The downstream link is
// declared identical at creation ("initial_sync": "none") while the volume
// is all zeroes, so every region holding a non-zero byte after the crash
// differs from the downstream and must be dirty after recovery.
TEST_CASE("Daemon crash: kill -9 during fio writes leaves every written "
          "region dirty",
          "[crash][daemon]") {
  testutil::TempDir dir("blockrelay-crash");
  auto config = testutil::SingleSiteConfig(dir.path(), "a", kVolumeBytes,
                                           /*tcp=*/false);
  config["groups"][0]["downstream"] = nlohmann::json::array(
      {{{"site", "b"},
        {"address", "127.0.0.1:9"},
        {"mode", "async"},
        {"initial_sync", "none"}}});
  testutil::TestDaemon daemon(dir.path(), config);
  REQUIRE(daemon.Start().ok());

  pid_t fio = Spawn(
      {"fio", "--name=crash", "--ioengine=nbd",
       "--uri=" + daemon.NbdUnixUri("data"), "--rw=randwrite", "--bs=4k",
       "--size=" + std::to_string(kWrittenBytes), "--iodepth=16",
       "--time_based", "--runtime=60", "--refill_buffers", "--randrepeat=0"},
      (dir.path() / "fio.log").string());
  REQUIRE(fio > 0);
  // Kill while writes stream in: after a few MiB went through.
  bool writing = testutil::WaitUntil(
      [&] {
        auto status = daemon.Control({{"command", "status"}});
        if (!status.ok()) return false;
        return (*status)["groups"][0]["volumes"][0]["bytes_written"]
                   .get<uint64_t>() > 8 * kMiB;
      },
      std::chrono::seconds(30));
  REQUIRE(daemon.Signal(SIGKILL));
  REQUIRE(daemon.WaitForExit(std::chrono::seconds(10)).has_value());
  KillAndReap(fio);
  REQUIRE(writing);

  // Recover the metadata as a restart would.
  storage::VolumeMetadataOptions options;
  options.data_dir = (dir.path() / "data").string();
  options.group = "g";
  options.volume = "data";
  options.size_bytes = kVolumeBytes;
  options.region_size_bytes = kRegionBytes;
  options.backing_path = (dir.path() / "data.img").string();
  options.downstream = {{"b", true}};
  auto metadata = storage::VolumeMetadata::Open(options);
  REQUIRE(metadata.ok());
  CHECK((*metadata)->recovered_unclean_shutdown());
  auto slot = (*metadata)->SlotForSite("b");
  REQUIRE(slot.has_value());
  const auto& scoreboard = (*metadata)->scoreboard();

  std::ifstream image(dir.path() / "data.img", std::ios::binary);
  std::vector<char> region(kRegionBytes);
  uint64_t written_regions = 0, missed = 0, dirty_beyond = 0;
  for (uint64_t r = 0; r < kVolumeBytes / kRegionBytes; ++r) {
    image.read(region.data(), region.size());
    REQUIRE(image.good());
    bool nonzero = std::any_of(region.begin(), region.end(),
                               [](char c) { return c != 0; });
    bool dirty = scoreboard.IsDirty(*slot, r);
    if (nonzero) ++written_regions;
    if (nonzero && !dirty) ++missed;
    if (dirty && r * kRegionBytes >= kWrittenBytes + kIntentExtentBytes) {
      ++dirty_beyond;
    }
  }
  INFO("regions with data: " << written_regions);
  CHECK(written_regions > 0);
  CHECK(missed == 0);
  CHECK(dirty_beyond == 0);
}

}  // namespace
}  // namespace blockrelay
