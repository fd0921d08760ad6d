// Env: the file-system seam for blockrelay's own files (metadata, locks).
//
// In LevelDB's spirit (include/leveldb/env.h): everything that touches the
// file system for metadata goes through an Env, so one simulated crash hits
// every file together. Env::Default() is the POSIX implementation; MemEnv
// (mem_env.h) keeps files in memory for fast tests; testutil's
// FaultInjectionEnv wraps either one and loses unsynced writes on demand.
//
// Errors come back as Status values carrying the path, the offset and errno
// ("pwrite /var/lib/blockrelay/a/db/wal.meta at 8192: No space left on
// device"); nothing throws.
//
// Thread safety: an Env and the files it opens are safe to use from several
// threads at once. Calls block (pread, pwrite, fdatasync); callers keep them
// on the storage threads, never on the network thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "blockrelay/status.h"

namespace blockrelay::io {

// A file opened for reads and writes at arbitrary offsets.
class RandomRWFile {
 public:
  virtual ~RandomRWFile() = default;

  // Reads up to out.size() bytes at `offset`. Returns the number of bytes
  // read, which is smaller than out.size() only at end of file.
  virtual Result<size_t> PRead(uint64_t offset, std::span<std::byte> out) = 0;
  // Writes all of `data` at `offset`, extending the file if needed. The data
  // is visible to later reads at once but durable only after Sync().
  virtual Status PWrite(uint64_t offset, std::span<const std::byte> data) = 0;
  // Writes `first` at `offset` and `second` right after it, as PWrite does
  // each: one system call where the file allows (a journal record's prefix
  // and its frame; each call is a microsecond on a sync link's path). The
  // default writes them one after the other.
  virtual Status PWrite2(uint64_t offset, std::span<const std::byte> first,
                         std::span<const std::byte> second) {
    if (Status s = PWrite(offset, first); !s.ok()) return s;
    return PWrite(offset + first.size(), second);
  }
  // Makes every write that returned before this call durable (fdatasync).
  virtual Status Sync() = 0;
  virtual Result<uint64_t> Size() = 0;
  // Sets the file's size; new bytes read as zeroes (sparse where possible).
  virtual Status Truncate(uint64_t size_bytes) = 0;
  // The path the file was opened with, for messages.
  virtual const std::string& path() const = 0;
};

enum class OpenMode {
  kReadOnly,         // must exist; PWrite/Truncate fail
  kReadWrite,        // must exist
  kCreate,           // read-write, created empty if missing
  kCreateTruncate,   // read-write, created or emptied
};

enum class FileType { kRegular, kBlockDevice, kDirectory, kOther };

// What stat(2) says about a path (follows symlinks).
struct FileInfo {
  FileType type = FileType::kOther;
  uint64_t size_bytes = 0;
  uint64_t device = 0;  // st_dev: the file system holding the file
  uint64_t inode = 0;   // st_ino
  uint64_t rdev = 0;    // st_rdev: the device number of a block device
};

// Held while a lock taken by Env::LockFile is held; destroying it releases
// the lock.
class FileLock {
 public:
  virtual ~FileLock() = default;
};

enum class LockMode {
  kExclusive,  // creates the file if missing
  kShared,     // the file must exist (NotFound otherwise)
};

class Env {
 public:
  virtual ~Env() = default;

  // The POSIX Env. Never deleted; safe to share.
  static Env* Default();

  virtual Result<std::unique_ptr<RandomRWFile>> OpenFile(
      const std::string& path, OpenMode mode) = 0;
  // Atomically replaces `to` with `from` (rename(2)). Durable once the
  // directory is synced with SyncDir().
  virtual Status RenameFile(const std::string& from, const std::string& to) = 0;
  virtual Status RemoveFile(const std::string& path) = 0;
  // True for files and directories.
  virtual bool FileExists(const std::string& path) = 0;
  virtual Result<FileInfo> Stat(const std::string& path) = 0;
  // mkdir -p. OK if the directory exists.
  virtual Status CreateDirs(const std::string& path) = 0;
  // Makes creations, renames and removals inside `dir` durable (fsync of the
  // directory).
  virtual Status SyncDir(const std::string& dir) = 0;
  // Takes an advisory lock (flock(2) semantics: a second lock on the same file
  // conflicts even inside one process). Never blocks: a conflicting lock
  // gives Status::Busy.
  virtual Result<std::unique_ptr<FileLock>> LockFile(const std::string& path,
                                                     LockMode mode) = 0;
};

// Forwards every call to another Env; subclasses override what they change
// (leveldb EnvWrapper). `target` must outlive the wrapper.
class EnvWrapper : public Env {
 public:
  explicit EnvWrapper(Env* target) : target_(target) {}
  Env* target() const { return target_; }

  Result<std::unique_ptr<RandomRWFile>> OpenFile(const std::string& path,
                                                 OpenMode mode) override {
    return target_->OpenFile(path, mode);
  }
  Status RenameFile(const std::string& from, const std::string& to) override {
    return target_->RenameFile(from, to);
  }
  Status RemoveFile(const std::string& path) override {
    return target_->RemoveFile(path);
  }
  bool FileExists(const std::string& path) override {
    return target_->FileExists(path);
  }
  Result<FileInfo> Stat(const std::string& path) override {
    return target_->Stat(path);
  }
  Status CreateDirs(const std::string& path) override {
    return target_->CreateDirs(path);
  }
  Status SyncDir(const std::string& dir) override {
    return target_->SyncDir(dir);
  }
  Result<std::unique_ptr<FileLock>> LockFile(const std::string& path,
                                             LockMode mode) override {
    return target_->LockFile(path, mode);
  }

 private:
  Env* target_;
};

// Reads exactly out.size() bytes at `offset`; a short file is Corruption
// ("<path>: short read at <offset>: wanted N bytes, file has M").
Status ReadFully(RandomRWFile& file, uint64_t offset, std::span<std::byte> out);

// The directory part of `path` ("a/b/c" -> "a/b", "c" -> ".").
std::string DirName(const std::string& path);

}  // namespace blockrelay::io
