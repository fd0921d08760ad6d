// The data_dir lock: one blockrelay process per data_dir.
//
// The daemon holds an exclusive flock(2) on data_dir/LOCK for its whole life
// and writes its pid into the file, so a second daemon and tools that must
// not run beside it (`blockrelay inspect`) can say who holds it. The kernel
// drops the lock when the process dies, however it dies, so a stale LOCK file
// never blocks a restart.
//
// Thread safety: free functions; a DataDirLock is a move-only value.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "blockrelay/io/env.h"
#include "blockrelay/status.h"

namespace blockrelay::io {

// Held while the process owns data_dir; the destructor releases the lock.
class DataDirLock {
 public:
  DataDirLock(DataDirLock&&) = default;
  DataDirLock& operator=(DataDirLock&&) = default;

  const std::string& data_dir() const { return data_dir_; }

 private:
  friend Result<DataDirLock> LockDataDir(Env* env, const std::string& data_dir);
  DataDirLock(std::string data_dir, std::unique_ptr<FileLock> lock)
      : data_dir_(std::move(data_dir)), lock_(std::move(lock)) {}

  std::string data_dir_;
  std::unique_ptr<FileLock> lock_;
};

// Takes the lock, creating data_dir and data_dir/LOCK if missing, and writes
// this process's pid into LOCK. Fails with Status::Busy and the message
// "data_dir X is in use by another blockrelay process (pid N)" when another
// process (or another DataDirLock in this one) holds it. Waits up to ~200 ms
// before giving up, so a concurrent ProbeDataDirLock() (which holds a shared
// lock for a moment) never makes a daemon's start fail.
// `env` may be nullptr for Env::Default().
Result<DataDirLock> LockDataDir(Env* env, const std::string& data_dir);

struct DataDirLockState {
  bool locked = false;
  // The pid written by the holder, when locked and readable.
  std::optional<int64_t> holder_pid;
};

// Whether a process holds data_dir's lock, without keeping any lock: it takes
// a shared lock for the moment of the test and drops it at once. A missing
// data_dir or LOCK file means "not locked". Creates nothing.
Result<DataDirLockState> ProbeDataDirLock(Env* env, const std::string& data_dir);

// data_dir + "/LOCK".
std::string DataDirLockPath(const std::string& data_dir);

}  // namespace blockrelay::io
