// FaultInjectionEnv and FaultInjectionBlockStore: the crash models the
// scoreboard's crash tests rely on.

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "blockrelay/io/mem_env.h"
#include "testutil/fault_injection_block_store.h"
#include "testutil/fault_injection_env.h"

namespace blockrelay::testutil {
namespace {

std::vector<std::byte> Fill(size_t n, char c) { return std::vector<std::byte>(n, std::byte(c)); }

std::string ReadAll(io::Env* env, const std::string& path, size_t n) {
  auto f = env->OpenFile(path, io::OpenMode::kReadOnly);
  REQUIRE(f.ok());
  std::vector<std::byte> buf(n);
  auto got = (*f)->PRead(0, buf);
  REQUIRE(got.ok());
  return std::string(reinterpret_cast<const char*>(buf.data()), *got);
}

struct EnvFixture {
  EnvFixture() : env(&mem) { REQUIRE(mem.CreateDirs("/d").ok()); }
  std::unique_ptr<io::RandomRWFile> Open() {
    auto f = env.OpenFile("/d/f", io::OpenMode::kCreate);
    REQUIRE(f.ok());
    return std::move(*f);
  }
  io::MemEnv mem;
  FaultInjectionEnv env;
};

TEST_CASE("FaultInjectionEnv: unsynced writes are visible but not on the disk",
          "[storage][io]") {
  EnvFixture fx;
  auto f = fx.Open();
  REQUIRE(f->PWrite(0, Fill(4, 'a')).ok());
  CHECK(ReadAll(&fx.env, "/d/f", 8) == "aaaa");
  CHECK(ReadAll(&fx.mem, "/d/f", 8).empty());
  CHECK(fx.env.unsynced_write_count() == 1);
  REQUIRE(f->Sync().ok());
  CHECK(ReadAll(&fx.mem, "/d/f", 8) == "aaaa");
  CHECK(fx.env.sync_count() == 1);
}

TEST_CASE("FaultInjectionEnv: DropUnsyncedWrites keeps exactly the synced state",
          "[storage][io]") {
  EnvFixture fx;
  auto f = fx.Open();
  REQUIRE(f->PWrite(0, Fill(4, 'a')).ok());
  REQUIRE(f->Sync().ok());
  REQUIRE(f->PWrite(2, Fill(4, 'b')).ok());
  fx.env.DropUnsyncedWrites();
  CHECK(ReadAll(&fx.env, "/d/f", 8) == "aaaa");
}

TEST_CASE("FaultInjectionEnv: ApplyUnsyncedWrites keeps them (process crash)",
          "[storage][io]") {
  EnvFixture fx;
  auto f = fx.Open();
  REQUIRE(f->PWrite(0, Fill(4, 'a')).ok());
  REQUIRE(f->PWrite(2, Fill(4, 'b')).ok());
  fx.env.ApplyUnsyncedWrites();
  CHECK(ReadAll(&fx.mem, "/d/f", 8) == "aabbbb");
}

TEST_CASE("FaultInjectionEnv: TearUnsyncedWrites keeps whole sectors only", "[storage][io]") {
  EnvFixture fx;
  auto f = fx.Open();
  REQUIRE(f->PWrite(0, Fill(4096, 'o')).ok());
  REQUIRE(f->Sync().ok());
  REQUIRE(f->PWrite(0, Fill(4096, 'n')).ok());
  std::mt19937_64 rng(7);
  fx.env.TearUnsyncedWrites(512, rng);
  std::string after = ReadAll(&fx.env, "/d/f", 4096);
  REQUIRE(after.size() == 4096);
  int mixed_sectors = 0;
  for (size_t s = 0; s < 8; ++s) {
    std::string sector = after.substr(s * 512, 512);
    bool old_sector = sector == std::string(512, 'o');
    bool new_sector = sector == std::string(512, 'n');
    CHECK((old_sector || new_sector));
    mixed_sectors += new_sector;
  }
  CHECK(mixed_sectors > 0);  // with seed 7 some, not all, sectors survive
  CHECK(mixed_sectors < 8);
  CHECK_FALSE(fx.env.InjectionLog().empty());
}

TEST_CASE("FaultInjectionEnv: DropRandomUnsyncedWrites keeps a subset of whole writes",
          "[storage][io]") {
  EnvFixture fx;
  auto f = fx.Open();
  for (int i = 0; i < 16; ++i) REQUIRE(f->PWrite(i, Fill(1, 'x')).ok());
  std::mt19937_64 rng(1);
  fx.env.DropRandomUnsyncedWrites(rng);
  std::string after = ReadAll(&fx.mem, "/d/f", 16);
  size_t kept = static_cast<size_t>(std::count(after.begin(), after.end(), 'x'));
  CHECK(kept > 0);
  CHECK(kept < 16);
}

TEST_CASE("FaultInjectionEnv: FailNth fails exactly the nth call of that operation",
          "[storage][io]") {
  EnvFixture fx;
  auto f = fx.Open();
  fx.env.FailNth(FaultOp::kSync, 2, EIO);
  CHECK(f->Sync().ok());
  Status s = f->Sync();
  CHECK(s.IsIOError());
  CHECK(s.errno_value() == EIO);
  CHECK(f->Sync().ok());
}

TEST_CASE("FaultInjectionEnv: FailWhileFileExists fails while the trigger exists",
          "[storage][io]") {
  EnvFixture fx;
  auto f = fx.Open();
  fx.env.FailWhileFileExists(FaultOp::kWrite, "/d/trigger", ENOSPC);
  CHECK(f->PWrite(0, Fill(1, 'a')).ok());
  REQUIRE(fx.mem.OpenFile("/d/trigger", io::OpenMode::kCreate).ok());
  CHECK(f->PWrite(0, Fill(1, 'a')).IsNoSpace());
  REQUIRE(fx.mem.RemoveFile("/d/trigger").ok());
  CHECK(f->PWrite(0, Fill(1, 'a')).ok());
}

TEST_CASE("FaultInjectionEnv: an inactive disk drops writes and syncs silently",
          "[storage][io]") {
  EnvFixture fx;
  auto f = fx.Open();
  fx.env.SetActive(false);
  CHECK(f->PWrite(0, Fill(4, 'a')).ok());
  CHECK(f->Sync().ok());
  fx.env.SetActive(true);
  CHECK(ReadAll(&fx.env, "/d/f", 8).empty());
}

TEST_CASE("PowerSwitch: cuts the env and the store at the same operation", "[storage][io]") {
  io::MemEnv mem;
  REQUIRE(mem.CreateDirs("/d").ok());
  PowerSwitch power;
  FaultInjectionEnv env(&mem, &power);
  FaultInjectionBlockStore store(4096, &power);
  auto f = env.OpenFile("/d/f", io::OpenMode::kCreate);
  REQUIRE(f.ok());
  power.CutAfter(2);
  CHECK((*f)->PWrite(0, Fill(1, 'a')).ok());      // op 1
  CHECK(store.Write(0, Fill(512, 'b'), true).ok());  // op 2
  CHECK((*f)->Sync().ok());                       // dropped
  CHECK(store.Write(512, Fill(512, 'c'), true).ok());  // dropped
  CHECK_FALSE(power.on());
  std::vector<std::byte> image = store.DurableImage();
  CHECK(image[0] == std::byte('b'));
  CHECK(image[512] == std::byte{0});
  CHECK(env.unsynced_write_count() == 1);
}

TEST_CASE("FaultInjectionBlockStore: Flush makes writes durable", "[storage]") {
  FaultInjectionBlockStore store(8192);
  REQUIRE(store.Write(0, Fill(512, 'a'), false).ok());
  CHECK(store.DurableImage()[0] == std::byte{0});
  std::vector<std::byte> buf(512);
  REQUIRE(store.Read(0, buf).ok());
  CHECK(buf[0] == std::byte('a'));
  REQUIRE(store.Flush().ok());
  CHECK(store.DurableImage()[0] == std::byte('a'));
}

TEST_CASE("FaultInjectionBlockStore: fua is durable, and an older cached write cannot undo it",
          "[storage]") {
  FaultInjectionBlockStore store(8192);
  REQUIRE(store.Write(0, Fill(1024, 'o'), false).ok());
  REQUIRE(store.Write(512, Fill(512, 'f'), true).ok());
  CHECK(store.DurableImage()[512] == std::byte('f'));
  store.ProcessCrash();  // the older cached write reaches the disk after all
  std::vector<std::byte> image = store.DurableImage();
  CHECK(image[0] == std::byte('o'));
  CHECK(image[512] == std::byte('f'));
}

TEST_CASE("FaultInjectionBlockStore: process crash keeps cached writes, power loss drops them",
          "[storage]") {
  std::mt19937_64 rng(3);
  FaultInjectionBlockStore kept(4096);
  REQUIRE(kept.Write(0, Fill(512, 'a'), false).ok());
  kept.ProcessCrash();
  CHECK(kept.DurableImage()[0] == std::byte('a'));
  FaultInjectionBlockStore lost(4096);
  REQUIRE(lost.Write(0, Fill(512, 'a'), false).ok());
  lost.PowerLoss(FaultInjectionBlockStore::PowerLossMode::kDropAll, rng);
  CHECK(lost.DurableImage()[0] == std::byte{0});
  std::vector<std::byte> buf(512);
  REQUIRE(lost.Read(0, buf).ok());
  CHECK(buf[0] == std::byte{0});
}

TEST_CASE("FaultInjectionBlockStore: a torn write keeps whole 512-byte sectors", "[storage]") {
  std::mt19937_64 rng(11);
  FaultInjectionBlockStore store(8192);
  REQUIRE(store.Write(0, Fill(8192, 'n'), false).ok());
  store.PowerLoss(FaultInjectionBlockStore::PowerLossMode::kTear, rng);
  std::vector<std::byte> image = store.DurableImage();
  int kept = 0;
  for (size_t s = 0; s < 16; ++s) {
    bool all_new = std::all_of(image.begin() + s * 512, image.begin() + (s + 1) * 512,
                               [](std::byte b) { return b == std::byte('n'); });
    bool all_zero = std::all_of(image.begin() + s * 512, image.begin() + (s + 1) * 512,
                                [](std::byte b) { return b == std::byte{0}; });
    CHECK((all_new || all_zero));
    kept += all_new;
  }
  CHECK(kept > 0);
  CHECK(kept < 16);
}

TEST_CASE("FaultInjectionBlockStore: FailNth fails the nth write", "[storage]") {
  FaultInjectionBlockStore store(4096);
  store.FailNth(FaultOp::kWrite, 1, ENOSPC);
  CHECK(store.Trim(0, 512, false).IsNoSpace());
  CHECK(store.Write(0, Fill(512, 'a'), false).ok());
}

}  // namespace
}  // namespace blockrelay::testutil
