// FaultInjectionEnv: see fault_injection_env.h.

#include "testutil/fault_injection_env.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

namespace blockrelay::testutil {

namespace {
constexpr size_t kMaxLogLines = 4096;

bool IsMutating(FaultOp op) {
  switch (op) {
    case FaultOp::kWrite:
    case FaultOp::kSync:
    case FaultOp::kTruncate:
    case FaultOp::kRename:
    case FaultOp::kRemove:
    case FaultOp::kSyncDir:
      return true;
    default:
      return false;
  }
}
}  // namespace

const char* ToString(FaultOp op) {
  switch (op) {
    case FaultOp::kAny: return "any";
    case FaultOp::kOpen: return "open";
    case FaultOp::kRead: return "read";
    case FaultOp::kWrite: return "write";
    case FaultOp::kSync: return "sync";
    case FaultOp::kTruncate: return "truncate";
    case FaultOp::kRename: return "rename";
    case FaultOp::kRemove: return "remove";
    case FaultOp::kSyncDir: return "syncdir";
    case FaultOp::kLock: return "lock";
  }
  return "?";
}

struct PendingWrite {
  uint64_t offset;
  std::vector<std::byte> data;
  uint64_t end() const { return offset + data.size(); }
};

struct FaultInjectionEnv::FileState {
  std::mutex mu;
  std::string path;                             // GUARDED_BY(mu), for logs
  std::shared_ptr<io::RandomRWFile> target_rw;  // GUARDED_BY(mu)
  std::vector<PendingWrite> pending;            // GUARDED_BY(mu), oldest first
};

namespace {

class FaultFile final : public io::RandomRWFile {
 public:
  FaultFile(FaultInjectionEnv* env, std::string path,
            std::shared_ptr<FaultInjectionEnv::FileState> state,
            std::shared_ptr<io::RandomRWFile> target)
      : env_(env), path_(std::move(path)), state_(std::move(state)),
        target_(std::move(target)) {}

  Result<size_t> PRead(uint64_t offset, std::span<std::byte> out) override {
    bool frozen = false;
    Status s = env_->CheckFault(FaultOp::kRead, path_, &frozen);
    if (!s.ok()) return s;
    std::lock_guard<std::mutex> lock(state_->mu);
    Result<uint64_t> target_size = target_->Size();
    if (!target_size.ok()) return target_size.status();
    uint64_t logical_size = *target_size;
    for (const PendingWrite& w : state_->pending) {
      logical_size = std::max(logical_size, w.end());
    }
    if (offset >= logical_size) return size_t{0};
    size_t n = static_cast<size_t>(std::min<uint64_t>(out.size(), logical_size - offset));
    std::memset(out.data(), 0, n);
    if (offset < *target_size) {
      Result<size_t> got = target_->PRead(offset, out.subspan(0, n));
      if (!got.ok()) return got.status();
    }
    // The page cache: unsynced writes shadow the disk, newest last.
    for (const PendingWrite& w : state_->pending) {
      uint64_t lo = std::max(offset, w.offset);
      uint64_t hi = std::min(offset + n, w.end());
      if (lo >= hi) continue;
      std::memcpy(out.data() + (lo - offset), w.data.data() + (lo - w.offset), hi - lo);
    }
    return n;
  }

  Status PWrite(uint64_t offset, std::span<const std::byte> data) override {
    bool frozen = false;
    Status s = env_->CheckFault(FaultOp::kWrite, path_, &frozen);
    if (!s.ok()) return s;
    if (frozen) {
      env_->Log(fmt::format("frozen: discarded write {} at {}+{}", path_, offset, data.size()));
      return Status::OK();
    }
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->pending.push_back(PendingWrite{offset, {data.begin(), data.end()}});
    return Status::OK();
  }

  Status Sync() override {
    bool frozen = false;
    Status s = env_->CheckFault(FaultOp::kSync, path_, &frozen);
    if (!s.ok()) return s;
    if (frozen) {
      env_->Log(fmt::format("frozen: discarded sync of {}", path_));
      return Status::OK();
    }
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      for (const PendingWrite& w : state_->pending) {
        s = state_->target_rw->PWrite(w.offset, w.data);
        if (!s.ok()) return s;
      }
      state_->pending.clear();
    }
    // Lock order: the env's mutex before a file's, never the other way.
    env_->CountSync();
    return target_->Sync();
  }

  Result<uint64_t> Size() override {
    std::lock_guard<std::mutex> lock(state_->mu);
    Result<uint64_t> size = target_->Size();
    if (!size.ok()) return size;
    uint64_t logical = *size;
    for (const PendingWrite& w : state_->pending) logical = std::max(logical, w.end());
    return logical;
  }

  Status Truncate(uint64_t size_bytes) override {
    bool frozen = false;
    Status s = env_->CheckFault(FaultOp::kTruncate, path_, &frozen);
    if (!s.ok()) return s;
    if (frozen) return Status::OK();
    std::lock_guard<std::mutex> lock(state_->mu);
    // Size changes are durable at once (a documented simplification); cut
    // the unsynced writes that now lie past the end.
    for (PendingWrite& w : state_->pending) {
      if (w.end() > size_bytes) {
        w.data.resize(w.offset >= size_bytes ? 0 : size_bytes - w.offset);
      }
    }
    std::erase_if(state_->pending, [](const PendingWrite& w) { return w.data.empty(); });
    return target_->Truncate(size_bytes);
  }

  const std::string& path() const override { return path_; }

 private:
  FaultInjectionEnv* const env_;
  const std::string path_;
  const std::shared_ptr<FaultInjectionEnv::FileState> state_;
  const std::shared_ptr<io::RandomRWFile> target_;
};

}  // namespace

FaultInjectionEnv::FaultInjectionEnv(io::Env* target, PowerSwitch* power)
    : EnvWrapper(target), power_(power) {}

FaultInjectionEnv::~FaultInjectionEnv() = default;

Status FaultInjectionEnv::CheckFault(FaultOp op, const std::string& path, bool* frozen,
                                     bool creates) {
  std::lock_guard<std::mutex> lock(mu_);
  if (creates || IsMutating(op)) {
    if (!active_ || (power_ != nullptr && !power_->Tick())) {
      *frozen = true;
      return Status::OK();
    }
  }
  for (auto it = countdowns_.begin(); it != countdowns_.end(); ++it) {
    if (it->op != op && it->op != FaultOp::kAny) continue;
    if (--it->remaining > 0) continue;
    int err = it->errno_value;
    countdowns_.erase(it);
    LogLocked(fmt::format("injected {} failure on {} (errno {})", ToString(op), path, err));
    return PosixError(fmt::format("{} {} (injected)", ToString(op), path), err);
  }
  for (const Trigger& t : triggers_) {
    if (t.op != op && t.op != FaultOp::kAny) continue;
    if (!target()->FileExists(t.path)) continue;
    LogLocked(fmt::format("injected {} failure on {} while {} exists", ToString(op), path, t.path));
    return PosixError(fmt::format("{} {} (injected)", ToString(op), path), t.errno_value);
  }
  return Status::OK();
}

void FaultInjectionEnv::Log(std::string line) {
  std::lock_guard<std::mutex> lock(mu_);
  LogLocked(std::move(line));
}

void FaultInjectionEnv::LogLocked(std::string line) {
  log_.push_back(std::move(line));
  while (log_.size() > kMaxLogLines) log_.pop_front();
}

void FaultInjectionEnv::CountSync() {
  std::lock_guard<std::mutex> lock(mu_);
  ++sync_count_;
}

Result<std::unique_ptr<io::RandomRWFile>> FaultInjectionEnv::OpenFile(
    const std::string& path, io::OpenMode mode) {
  bool creates = mode == io::OpenMode::kCreate || mode == io::OpenMode::kCreateTruncate;
  bool frozen = false;
  Status s = CheckFault(FaultOp::kOpen, path, &frozen, creates);
  if (!s.ok()) return s;
  if (frozen) {
    return Status::IOError(fmt::format("open {}: disk frozen by the test", path), EIO);
  }
  Result<std::unique_ptr<io::RandomRWFile>> opened = target()->OpenFile(path, mode);
  if (!opened.ok()) return opened.status();
  std::shared_ptr<io::RandomRWFile> shared(std::move(*opened));
  std::lock_guard<std::mutex> lock(mu_);
  std::shared_ptr<FileState>& state = files_[path];
  if (!state) {
    state = std::make_shared<FileState>();
    state->path = path;
  }
  {
    std::lock_guard<std::mutex> state_lock(state->mu);
    if (mode != io::OpenMode::kReadOnly && !state->target_rw) state->target_rw = shared;
    if (mode == io::OpenMode::kCreateTruncate) state->pending.clear();
  }
  return std::unique_ptr<io::RandomRWFile>(new FaultFile(this, path, state, shared));
}

Status FaultInjectionEnv::RenameFile(const std::string& from, const std::string& to) {
  bool frozen = false;
  Status s = CheckFault(FaultOp::kRename, from, &frozen);
  if (!s.ok()) return s;
  if (frozen) {
    Log(fmt::format("frozen: discarded rename {} -> {}", from, to));
    return Status::OK();
  }
  s = target()->RenameFile(from, to);
  if (!s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = files_.find(from);
  if (it == files_.end()) {
    files_.erase(to);
  } else {
    std::shared_ptr<FileState> state = it->second;
    files_.erase(it);
    {
      std::lock_guard<std::mutex> state_lock(state->mu);
      state->path = to;
    }
    files_[to] = std::move(state);
  }
  return Status::OK();
}

Status FaultInjectionEnv::RemoveFile(const std::string& path) {
  bool frozen = false;
  Status s = CheckFault(FaultOp::kRemove, path, &frozen);
  if (!s.ok()) return s;
  if (frozen) return Status::OK();
  s = target()->RemoveFile(path);
  if (!s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  files_.erase(path);
  return Status::OK();
}

Status FaultInjectionEnv::SyncDir(const std::string& dir) {
  bool frozen = false;
  Status s = CheckFault(FaultOp::kSyncDir, dir, &frozen);
  if (!s.ok() || frozen) return s;
  return target()->SyncDir(dir);
}

Result<std::unique_ptr<io::FileLock>> FaultInjectionEnv::LockFile(const std::string& path,
                                                                  io::LockMode mode) {
  bool frozen = false;
  Status s = CheckFault(FaultOp::kLock, path, &frozen);
  if (!s.ok()) return s;
  return target()->LockFile(path, mode);
}

void FaultInjectionEnv::SetActive(bool active) {
  std::lock_guard<std::mutex> lock(mu_);
  active_ = active;
  LogLocked(active ? "disk active" : "disk frozen");
}

bool FaultInjectionEnv::active() const {
  std::lock_guard<std::mutex> lock(mu_);
  return active_;
}

void FaultInjectionEnv::Crash(Survival survival, uint32_t sector_bytes, std::mt19937_64* rng) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [path, state] : files_) {
    std::lock_guard<std::mutex> state_lock(state->mu);
    for (const PendingWrite& w : state->pending) {
      std::string what = ApplySurvivors(
          w.offset, w.data.size(), survival, sector_bytes, rng, [&](uint64_t lo, uint64_t hi) {
            // Pending writes imply a writable handle. MemEnv and tmpfs
            // writes do not fail in tests.
            state->target_rw
                ->PWrite(lo, std::span<const std::byte>(w.data).subspan(lo - w.offset, hi - lo))
                .IgnoreError();
          });
      if (survival != Survival::kAll) {
        LogLocked(fmt::format("crash: unsynced write {} at {}+{}: {}", path, w.offset,
                              w.data.size(), what));
      }
    }
    state->pending.clear();
  }
}

void FaultInjectionEnv::ApplyUnsyncedWrites() { Crash(Survival::kAll, 0, nullptr); }
void FaultInjectionEnv::DropUnsyncedWrites() { Crash(Survival::kNone, 0, nullptr); }
void FaultInjectionEnv::DropRandomUnsyncedWrites(std::mt19937_64& rng) {
  Crash(Survival::kCoinFlip, 0, &rng);
}
void FaultInjectionEnv::TearUnsyncedWrites(uint32_t sector_bytes, std::mt19937_64& rng) {
  Crash(Survival::kTornSectors, sector_bytes, &rng);
}

void FaultInjectionEnv::FailNth(FaultOp op, int n, int errno_value) {
  std::lock_guard<std::mutex> lock(mu_);
  countdowns_.push_back(Countdown{op, n, errno_value});
}

void FaultInjectionEnv::FailWhileFileExists(FaultOp op, const std::string& trigger_path,
                                            int errno_value) {
  std::lock_guard<std::mutex> lock(mu_);
  triggers_.push_back(Trigger{op, trigger_path, errno_value});
}

void FaultInjectionEnv::ClearFaults() {
  std::lock_guard<std::mutex> lock(mu_);
  countdowns_.clear();
  triggers_.clear();
}

uint64_t FaultInjectionEnv::sync_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return sync_count_;
}

size_t FaultInjectionEnv::unsynced_write_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (const auto& [path, state] : files_) {
    std::lock_guard<std::mutex> state_lock(state->mu);
    n += state->pending.size();
  }
  return n;
}

std::vector<std::string> FaultInjectionEnv::InjectionLog() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {log_.begin(), log_.end()};
}

}  // namespace blockrelay::testutil
