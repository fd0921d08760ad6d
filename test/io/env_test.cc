// Env behaviour shared by PosixEnv and MemEnv, and the data_dir lock.

#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include "blockrelay/io/data_dir_lock.h"
#include "blockrelay/io/env.h"
#include "blockrelay/io/mem_env.h"
#include "testutil/daemon.h"

namespace blockrelay::io {
namespace {

std::vector<std::byte> Bytes(std::string_view s) {
  std::vector<std::byte> out(s.size());
  std::memcpy(out.data(), s.data(), s.size());
  return out;
}

std::string Text(std::span<const std::byte> b) {
  return std::string(reinterpret_cast<const char*>(b.data()), b.size());
}

// The same checks run against each Env; `dir` exists.
void CheckReadWriteAndShortRead(Env* env, const std::string& dir) {
  auto file = env->OpenFile(dir + "/f", OpenMode::kCreate);
  REQUIRE(file.ok());
  REQUIRE((*file)->PWrite(4, Bytes("world")).ok());
  REQUIRE((*file)->PWrite(0, Bytes("helo")).ok());
  REQUIRE((*file)->Sync().ok());
  std::vector<std::byte> buf(16);
  auto n = (*file)->PRead(0, buf);
  REQUIRE(n.ok());
  CHECK(*n == 9);
  CHECK(Text(std::span(buf).first(9)) == "heloworld");
  CHECK(*(*file)->Size() == 9);
  std::vector<std::byte> exact(10);
  Status s = ReadFully(**file, 0, exact);
  CHECK(s.IsCorruption());
  CHECK_THAT(s.message(), Catch::Contains("short read"));
}

void CheckTwoPieceWrite(Env* env, const std::string& dir) {
  auto file = env->OpenFile(dir + "/p", OpenMode::kCreate);
  REQUIRE(file.ok());
  REQUIRE((*file)->PWrite(0, Bytes("0123456789")).ok());
  REQUIRE((*file)->PWrite2(2, Bytes("ab"), Bytes("cdefghijkl")).ok());
  REQUIRE((*file)->PWrite2(14, Bytes(""), Bytes("XY")).ok());
  std::vector<std::byte> buf(16);
  REQUIRE(ReadFully(**file, 0, buf).ok());
  CHECK(Text(buf) == "01abcdefghijklXY");
  auto ro = env->OpenFile(dir + "/p", OpenMode::kReadOnly);
  REQUIRE(ro.ok());
  CHECK(!(*ro)->PWrite2(0, Bytes("a"), Bytes("b")).ok());
}

void CheckTruncate(Env* env, const std::string& dir) {
  auto file = env->OpenFile(dir + "/t", OpenMode::kCreate);
  REQUIRE(file.ok());
  REQUIRE((*file)->PWrite(0, Bytes("abcdefgh")).ok());
  REQUIRE((*file)->Truncate(3).ok());
  REQUIRE((*file)->Truncate(8192).ok());
  std::vector<std::byte> buf(8192);
  REQUIRE(ReadFully(**file, 0, buf).ok());
  CHECK(Text(std::span(buf).first(3)) == "abc");
  CHECK(std::all_of(buf.begin() + 3, buf.end(), [](std::byte b) { return b == std::byte{0}; }));
}

void CheckRenameRemoveExists(Env* env, const std::string& dir) {
  {
    auto a = env->OpenFile(dir + "/a", OpenMode::kCreate);
    REQUIRE(a.ok());
    REQUIRE((*a)->PWrite(0, Bytes("A")).ok());
    auto b = env->OpenFile(dir + "/b", OpenMode::kCreate);
    REQUIRE(b.ok());
    REQUIRE((*b)->PWrite(0, Bytes("B")).ok());
  }
  REQUIRE(env->RenameFile(dir + "/a", dir + "/b").ok());
  CHECK_FALSE(env->FileExists(dir + "/a"));
  auto b = env->OpenFile(dir + "/b", OpenMode::kReadOnly);
  REQUIRE(b.ok());
  std::vector<std::byte> buf(1);
  REQUIRE(ReadFully(**b, 0, buf).ok());
  CHECK(Text(buf) == "A");
  CHECK((*b)->PWrite(0, Bytes("x")).code() != Status::Code::kOk);
  REQUIRE(env->RemoveFile(dir + "/b").ok());
  CHECK_FALSE(env->FileExists(dir + "/b"));
  CHECK(env->OpenFile(dir + "/b", OpenMode::kReadWrite).status().code() ==
        Status::Code::kNotFound);
  CHECK(env->RemoveFile(dir + "/b").code() == Status::Code::kNotFound);
  REQUIRE(env->CreateDirs(dir + "/x/y/z").ok());
  CHECK(env->FileExists(dir + "/x/y"));
  CHECK(env->SyncDir(dir + "/x/y").ok());
}

void CheckStatIdentity(Env* env, const std::string& dir) {
  auto a = env->OpenFile(dir + "/s1", OpenMode::kCreate);
  auto b = env->OpenFile(dir + "/s2", OpenMode::kCreate);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  auto sa = env->Stat(dir + "/s1");
  auto sb = env->Stat(dir + "/s2");
  REQUIRE(sa.ok());
  REQUIRE(sb.ok());
  CHECK(sa->type == FileType::kRegular);
  CHECK(sa->inode != sb->inode);
  CHECK(env->Stat(dir).value().type == FileType::kDirectory);
  CHECK(env->Stat(dir + "/missing").status().code() == Status::Code::kNotFound);
}

void CheckLocks(Env* env, const std::string& dir) {
  auto first = env->LockFile(dir + "/L", LockMode::kExclusive);
  REQUIRE(first.ok());
  auto second = env->LockFile(dir + "/L", LockMode::kExclusive);
  CHECK(second.status().code() == Status::Code::kBusy);
  CHECK(env->LockFile(dir + "/L", LockMode::kShared).status().code() == Status::Code::kBusy);
  first->reset();
  auto shared1 = env->LockFile(dir + "/L", LockMode::kShared);
  auto shared2 = env->LockFile(dir + "/L", LockMode::kShared);
  CHECK(shared1.ok());
  CHECK(shared2.ok());
  CHECK(env->LockFile(dir + "/L", LockMode::kExclusive).status().code() == Status::Code::kBusy);
}

TEST_CASE("PosixEnv: writes read back, and a read past the end is short", "[storage][io]") {
  testutil::TempDir dir;
  CheckReadWriteAndShortRead(Env::Default(), dir.path().string());
}
TEST_CASE("MemEnv: writes read back, and a read past the end is short", "[storage][io]") {
  MemEnv env;
  REQUIRE(env.CreateDirs("/d").ok());
  CheckReadWriteAndShortRead(&env, "/d");
}
TEST_CASE("PosixEnv: a two-piece write lands both pieces back to back", "[storage][io]") {
  testutil::TempDir dir;
  CheckTwoPieceWrite(Env::Default(), dir.path().string());
}
TEST_CASE("MemEnv: a two-piece write lands both pieces back to back", "[storage][io]") {
  MemEnv env;
  REQUIRE(env.CreateDirs("/d").ok());
  CheckTwoPieceWrite(&env, "/d");
}
TEST_CASE("PosixEnv: Truncate shrinks and grows with zeroes", "[storage][io]") {
  testutil::TempDir dir;
  CheckTruncate(Env::Default(), dir.path().string());
}
TEST_CASE("MemEnv: Truncate shrinks and grows with zeroes", "[storage][io]") {
  MemEnv env;
  REQUIRE(env.CreateDirs("/d").ok());
  CheckTruncate(&env, "/d");
}
TEST_CASE("PosixEnv: rename replaces, remove removes, read-only refuses writes", "[storage][io]") {
  testutil::TempDir dir;
  CheckRenameRemoveExists(Env::Default(), dir.path().string());
}
TEST_CASE("MemEnv: rename replaces, remove removes, read-only refuses writes", "[storage][io]") {
  MemEnv env;
  REQUIRE(env.CreateDirs("/d").ok());
  CheckRenameRemoveExists(&env, "/d");
}
TEST_CASE("PosixEnv: Stat tells files apart by inode", "[storage][io]") {
  testutil::TempDir dir;
  CheckStatIdentity(Env::Default(), dir.path().string());
}
TEST_CASE("MemEnv: Stat tells files apart by inode", "[storage][io]") {
  MemEnv env;
  REQUIRE(env.CreateDirs("/d").ok());
  CheckStatIdentity(&env, "/d");
}
TEST_CASE("PosixEnv: flock locks conflict even within one process", "[storage][io]") {
  testutil::TempDir dir;
  CheckLocks(Env::Default(), dir.path().string());
}
TEST_CASE("MemEnv: locks follow flock semantics", "[storage][io]") {
  MemEnv env;
  REQUIRE(env.CreateDirs("/d").ok());
  CheckLocks(&env, "/d");
}

TEST_CASE("MemEnv: a file opened in a missing directory is NotFound", "[storage][io]") {
  MemEnv env;
  CHECK(env.OpenFile("/nodir/f", OpenMode::kCreate).status().code() == Status::Code::kNotFound);
}

TEST_CASE("MemEnv: files are sparse", "[storage][io]") {
  MemEnv env;
  REQUIRE(env.CreateDirs("/d").ok());
  auto f = env.OpenFile("/d/big", OpenMode::kCreate);
  REQUIRE(f.ok());
  REQUIRE((*f)->Truncate(1ull << 40).ok());
  REQUIRE((*f)->PWrite(1ull << 39, Bytes("x")).ok());
  CHECK(env.MemoryUsageBytes() == 4096);
}

TEST_CASE("LockDataDir: a second lock names the holder's pid", "[storage][io]") {
  testutil::TempDir dir;
  const std::string data_dir = (dir / "data").string();
  auto lock = LockDataDir(nullptr, data_dir);
  REQUIRE(lock.ok());
  auto again = LockDataDir(nullptr, data_dir);
  REQUIRE_FALSE(again.ok());
  CHECK(again.status().code() == Status::Code::kBusy);
  CHECK(again.status().message() ==
        fmt::format("data_dir {} is in use by another blockrelay process (pid {})", data_dir,
                    ::getpid()));
}

TEST_CASE("LockDataDir: the lock is released with the DataDirLock", "[storage][io]") {
  testutil::TempDir dir;
  const std::string data_dir = (dir / "data").string();
  {
    auto lock = LockDataDir(nullptr, data_dir);
    REQUIRE(lock.ok());
  }
  CHECK(LockDataDir(nullptr, data_dir).ok());
}

TEST_CASE("ProbeDataDirLock: reports the holder without taking the lock", "[storage][io]") {
  testutil::TempDir dir;
  const std::string data_dir = (dir / "data").string();
  auto before = ProbeDataDirLock(nullptr, data_dir);
  REQUIRE(before.ok());
  CHECK_FALSE(before->locked);
  CHECK_FALSE(Env::Default()->FileExists(data_dir));  // probing created nothing
  auto lock = LockDataDir(nullptr, data_dir);
  REQUIRE(lock.ok());
  auto during = ProbeDataDirLock(nullptr, data_dir);
  REQUIRE(during.ok());
  CHECK(during->locked);
  CHECK(during->holder_pid == ::getpid());
}

TEST_CASE("ProbeDataDirLock: a LOCK file left by a dead process is not locked",
          "[storage][io]") {
  MemEnv env;
  REQUIRE(env.CreateDirs("/data").ok());
  auto f = env.OpenFile("/data/LOCK", OpenMode::kCreate);
  REQUIRE(f.ok());
  REQUIRE((*f)->PWrite(0, Bytes("12345\n")).ok());
  auto probe = ProbeDataDirLock(&env, "/data");
  REQUIRE(probe.ok());
  CHECK_FALSE(probe->locked);
  CHECK(LockDataDir(&env, "/data").ok());
}

}  // namespace
}  // namespace blockrelay::io
