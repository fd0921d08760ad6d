// data_dir/LOCK: see data_dir_lock.h.

#include "blockrelay/io/data_dir_lock.h"

#include <unistd.h>

#include <chrono>
#include <charconv>
#include <thread>
#include <vector>

#include <fmt/format.h>

namespace blockrelay::io {
namespace {

constexpr int kLockAttempts = 40;
constexpr auto kLockRetryDelay = std::chrono::milliseconds(5);

// The pid the holder wrote, if the file holds one.
std::optional<int64_t> ReadHolderPid(Env* env, const std::string& path) {
  Result<std::unique_ptr<RandomRWFile>> file = env->OpenFile(path, OpenMode::kReadOnly);
  if (!file.ok()) return std::nullopt;
  std::vector<std::byte> buf(32);
  Result<size_t> n = (*file)->PRead(0, buf);
  if (!n.ok() || *n == 0) return std::nullopt;
  const char* begin = reinterpret_cast<const char*>(buf.data());
  int64_t pid = 0;
  auto [end, ec] = std::from_chars(begin, begin + *n, pid);
  if (ec != std::errc() || end == begin || pid <= 0) return std::nullopt;
  return pid;
}

std::string InUseMessage(const std::string& data_dir, std::optional<int64_t> pid) {
  return fmt::format("data_dir {} is in use by another blockrelay process ({})",
                     data_dir,
                     pid ? fmt::format("pid {}", *pid) : std::string("pid unknown"));
}

}  // namespace

std::string DataDirLockPath(const std::string& data_dir) {
  return data_dir + "/LOCK";
}

Result<DataDirLock> LockDataDir(Env* env, const std::string& data_dir) {
  if (env == nullptr) env = Env::Default();
  Status s = env->CreateDirs(data_dir);
  if (!s.ok()) return s;
  const std::string path = DataDirLockPath(data_dir);
  Result<std::unique_ptr<FileLock>> lock = Status::Busy("not tried");
  for (int attempt = 0; attempt < kLockAttempts; ++attempt) {
    lock = env->LockFile(path, LockMode::kExclusive);
    if (lock.ok() || lock.status().code() != Status::Code::kBusy) break;
    std::this_thread::sleep_for(kLockRetryDelay);
  }
  if (!lock.ok()) {
    if (lock.status().code() == Status::Code::kBusy) {
      return Status::Busy(InUseMessage(data_dir, ReadHolderPid(env, path)));
    }
    return lock.status();
  }
  // The pid is for messages only; the flock is what excludes.
  Result<std::unique_ptr<RandomRWFile>> file = env->OpenFile(path, OpenMode::kReadWrite);
  if (!file.ok()) return file.status();
  std::string text = fmt::format("{}\n", static_cast<int64_t>(::getpid()));
  s = (*file)->Truncate(0);
  if (s.ok()) {
    s = (*file)->PWrite(0, std::as_bytes(std::span<const char>(text.data(), text.size())));
  }
  if (!s.ok()) return s;
  return DataDirLock(data_dir, std::move(*lock));
}

Result<DataDirLockState> ProbeDataDirLock(Env* env, const std::string& data_dir) {
  if (env == nullptr) env = Env::Default();
  const std::string path = DataDirLockPath(data_dir);
  DataDirLockState state;
  if (!env->FileExists(path)) return state;
  Result<std::unique_ptr<FileLock>> lock = env->LockFile(path, LockMode::kShared);
  if (lock.ok()) return state;  // released here: nobody held it exclusively
  if (lock.status().code() == Status::Code::kNotFound) return state;
  if (lock.status().code() != Status::Code::kBusy) return lock.status();
  state.locked = true;
  state.holder_pid = ReadHolderPid(env, path);
  return state;
}

}  // namespace blockrelay::io
