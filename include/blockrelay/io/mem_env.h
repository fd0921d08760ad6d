// MemEnv: an Env whose files live in memory (leveldb helpers/memenv).
//
// For fast unit tests and for running two sites in one process. Files are
// sparse (4 KiB blocks allocated on first write), so a metadata file sized
// for a 16 TiB volume costs only what is written. Every write is "durable" at
// once: MemEnv has no crash model of its own; wrap it in
// testutil::FaultInjectionEnv for one. Locks follow flock(2) semantics.
//
// Thread safety: safe for concurrent use, like every Env.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include "blockrelay/io/env.h"

namespace blockrelay::io {

class MemEnv final : public Env {
 public:
  MemEnv();
  ~MemEnv() override;

  Result<std::unique_ptr<RandomRWFile>> OpenFile(const std::string& path,
                                                 OpenMode mode) override;
  Status RenameFile(const std::string& from, const std::string& to) override;
  Status RemoveFile(const std::string& path) override;
  bool FileExists(const std::string& path) override;
  Result<FileInfo> Stat(const std::string& path) override;
  Status CreateDirs(const std::string& path) override;
  Status SyncDir(const std::string& dir) override;
  Result<std::unique_ptr<FileLock>> LockFile(const std::string& path,
                                             LockMode mode) override;

  // Test hook: Stat(path) reports `info` from now on (e.g. a block device, or
  // another st_dev after a "reboot"). The path must exist.
  Status SetStatOverride(const std::string& path, const FileInfo& info);

  // Bytes of file data held in memory, over all files.
  uint64_t MemoryUsageBytes() const;

  struct File;  // implementation detail, public for the .cc's helpers

 private:
  struct LockState {
    bool exclusive = false;
    int shared = 0;
  };
  class MemFileLock;

  bool ParentExistsLocked(const std::string& path) const;
  void Unlock(const std::string& path, bool exclusive);

  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<File>> files_;  // GUARDED_BY(mu_)
  std::set<std::string> dirs_;                          // GUARDED_BY(mu_)
  std::map<std::string, LockState> locks_;              // GUARDED_BY(mu_)
  uint64_t next_inode_ = 1;                             // GUARDED_BY(mu_)
};

}  // namespace blockrelay::io
