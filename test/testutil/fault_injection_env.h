// FaultInjectionEnv: an Env that forgets what was not synced.
//
// Wraps another Env (MemEnv or the POSIX one). Writes do not reach the
// wrapped file until Sync(): they wait in a per-file overlay that reads see,
// as the page cache would. A test then simulates a crash:
//   - ApplyUnsyncedWrites(): process crash (the kernel keeps the page cache);
//   - DropUnsyncedWrites(): power loss, nothing unsynced survives;
//   - DropRandomUnsyncedWrites(rng): power loss, a random subset survives;
//   - TearUnsyncedWrites(512, rng): power loss, a random subset of the
//     512-byte sectors of every unsynced write survives (torn pages).
// Sources: leveldb db/fault_injection_test.cc, rocksdb
// utilities/fault_injection_fs.{h,cc}.
//
// Errors: FailNth(op, n, errno) makes the n-th next call of `op` fail with
// that errno; FailWhileFileExists(op, path) fails every `op` while `path`
// exists in the wrapped Env (nbdkit's error filter trigger file).
// SetActive(false) or a PowerSwitch that is off freeze the disk: mutating
// calls return OK and change nothing. Every injection is logged
// (InjectionLog()). Randomness comes only from the rng the caller passes, so
// a seed reproduces a run.
//
// Simplifications (documented, tested against): file creation, Truncate,
// RenameFile and RemoveFile take effect durably at once.
//
// Thread safety: safe for concurrent use; the crash calls require that no
// other thread is using the Env at that moment.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "blockrelay/io/env.h"
#include "testutil/crash_model.h"
#include "testutil/power_switch.h"

namespace blockrelay::testutil {

enum class FaultOp {
  kAny,
  kOpen,
  kRead,
  kWrite,
  kSync,
  kTruncate,
  kRename,
  kRemove,
  kSyncDir,
  kLock,
};

const char* ToString(FaultOp op);

class FaultInjectionEnv final : public io::EnvWrapper {
 public:
  // `target` and `power` (optional) must outlive this Env.
  explicit FaultInjectionEnv(io::Env* target, PowerSwitch* power = nullptr);
  ~FaultInjectionEnv() override;

  Result<std::unique_ptr<io::RandomRWFile>> OpenFile(const std::string& path,
                                                     io::OpenMode mode) override;
  Status RenameFile(const std::string& from, const std::string& to) override;
  Status RemoveFile(const std::string& path) override;
  Status SyncDir(const std::string& dir) override;
  Result<std::unique_ptr<io::FileLock>> LockFile(const std::string& path,
                                                 io::LockMode mode) override;

  // --- crash simulation ---
  void SetActive(bool active);
  bool active() const;
  void ApplyUnsyncedWrites();
  void DropUnsyncedWrites();
  void DropRandomUnsyncedWrites(std::mt19937_64& rng);
  void TearUnsyncedWrites(uint32_t sector_bytes, std::mt19937_64& rng);

  // --- error injection ---
  void FailNth(FaultOp op, int n, int errno_value);
  void FailWhileFileExists(FaultOp op, const std::string& trigger_path,
                           int errno_value = EIO);
  void ClearFaults();

  // --- observation ---
  uint64_t sync_count() const;
  size_t unsynced_write_count() const;
  std::vector<std::string> InjectionLog() const;

  // Per-path overlay, shared by the open handles. Lock order: mu_ before a
  // FileState's mutex.
  struct FileState;

  // Internal: consulted by open files before each operation. Returns a
  // non-OK Status when a fault fires; sets *frozen when the disk is frozen.
  // `creates`: the call creates a file, which counts as mutating.
  Status CheckFault(FaultOp op, const std::string& path, bool* frozen,
                    bool creates = false);
  void Log(std::string line);
  void CountSync();

 private:
  void Crash(Survival survival, uint32_t sector_bytes, std::mt19937_64* rng);
  void LogLocked(std::string line);

  PowerSwitch* const power_;
  mutable std::mutex mu_;
  bool active_ = true;                                        // GUARDED_BY(mu_)
  std::map<std::string, std::shared_ptr<FileState>> files_;  // GUARDED_BY(mu_)
  struct Countdown {
    FaultOp op;
    int remaining;
    int errno_value;
  };
  std::vector<Countdown> countdowns_;  // GUARDED_BY(mu_)
  struct Trigger {
    FaultOp op;
    std::string path;
    int errno_value;
  };
  std::vector<Trigger> triggers_;  // GUARDED_BY(mu_)
  std::deque<std::string> log_;    // GUARDED_BY(mu_)
  uint64_t sync_count_ = 0;        // GUARDED_BY(mu_)
};

}  // namespace blockrelay::testutil
