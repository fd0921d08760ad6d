// MemEnv: sparse in-memory files (see mem_env.h).

#include "blockrelay/io/mem_env.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <optional>

#include <fmt/format.h>

namespace blockrelay::io {

namespace {
constexpr uint64_t kMemBlockBytes = 4096;
using Block = std::array<std::byte, kMemBlockBytes>;

Status NotFoundError(std::string_view op, const std::string& path) {
  return PosixError(fmt::format("{} {}", op, path), ENOENT);
}
}  // namespace

struct MemEnv::File {
  explicit File(uint64_t inode_number) : inode(inode_number) {}

  const uint64_t inode;
  std::mutex mu;
  uint64_t size = 0;                                  // GUARDED_BY(mu)
  std::map<uint64_t, std::unique_ptr<Block>> blocks;  // GUARDED_BY(mu)
  std::optional<FileInfo> stat_override;              // GUARDED_BY(mu)

  size_t Read(uint64_t offset, std::span<std::byte> out) {
    std::lock_guard<std::mutex> lock(mu);
    if (offset >= size) return 0;
    size_t n = static_cast<size_t>(std::min<uint64_t>(out.size(), size - offset));
    size_t done = 0;
    while (done < n) {
      uint64_t pos = offset + done;
      uint64_t index = pos / kMemBlockBytes;
      size_t in_block = static_cast<size_t>(pos % kMemBlockBytes);
      size_t chunk = std::min(n - done, static_cast<size_t>(kMemBlockBytes - in_block));
      auto it = blocks.find(index);
      if (it == blocks.end()) {
        std::memset(out.data() + done, 0, chunk);  // a hole reads as zeroes
      } else {
        std::memcpy(out.data() + done, it->second->data() + in_block, chunk);
      }
      done += chunk;
    }
    return n;
  }

  void Write(uint64_t offset, std::span<const std::byte> data) {
    std::lock_guard<std::mutex> lock(mu);
    size_t done = 0;
    while (done < data.size()) {
      uint64_t pos = offset + done;
      uint64_t index = pos / kMemBlockBytes;
      size_t in_block = static_cast<size_t>(pos % kMemBlockBytes);
      size_t chunk = std::min(data.size() - done,
                              static_cast<size_t>(kMemBlockBytes - in_block));
      std::unique_ptr<Block>& block = blocks[index];
      if (!block) {
        block = std::make_unique<Block>();
        block->fill(std::byte{0});
      }
      std::memcpy(block->data() + in_block, data.data() + done, chunk);
      done += chunk;
    }
    size = std::max<uint64_t>(size, offset + data.size());
  }

  void Truncate(uint64_t new_size) {
    std::lock_guard<std::mutex> lock(mu);
    if (new_size < size) {
      // Drop whole blocks past the end and zero the tail of the last one, so
      // growing the file again reads zeroes as POSIX promises.
      uint64_t first_dead = (new_size + kMemBlockBytes - 1) / kMemBlockBytes;
      blocks.erase(blocks.lower_bound(first_dead), blocks.end());
      if (new_size % kMemBlockBytes != 0) {
        auto it = blocks.find(new_size / kMemBlockBytes);
        if (it != blocks.end()) {
          size_t keep = static_cast<size_t>(new_size % kMemBlockBytes);
          std::memset(it->second->data() + keep, 0, kMemBlockBytes - keep);
        }
      }
    }
    size = new_size;
  }
};

namespace {

class MemRandomRWFile final : public RandomRWFile {
 public:
  MemRandomRWFile(std::string path, std::shared_ptr<MemEnv::File> file,
                  bool writable)
      : path_(std::move(path)), file_(std::move(file)), writable_(writable) {}

  Result<size_t> PRead(uint64_t offset, std::span<std::byte> out) override {
    return file_->Read(offset, out);
  }
  Status PWrite(uint64_t offset, std::span<const std::byte> data) override {
    if (!writable_) {
      return PosixError(fmt::format("pwrite {} at {}", path_, offset), EBADF);
    }
    file_->Write(offset, data);
    return Status::OK();
  }
  Status Sync() override { return Status::OK(); }
  Result<uint64_t> Size() override {
    std::lock_guard<std::mutex> lock(file_->mu);
    return file_->size;
  }
  Status Truncate(uint64_t size_bytes) override {
    if (!writable_) {
      return PosixError(fmt::format("ftruncate {}", path_), EBADF);
    }
    file_->Truncate(size_bytes);
    return Status::OK();
  }
  const std::string& path() const override { return path_; }

 private:
  const std::string path_;
  const std::shared_ptr<MemEnv::File> file_;
  const bool writable_;
};

}  // namespace

class MemEnv::MemFileLock final : public FileLock {
 public:
  MemFileLock(MemEnv* env, std::string path, bool exclusive)
      : env_(env), path_(std::move(path)), exclusive_(exclusive) {}
  ~MemFileLock() override { env_->Unlock(path_, exclusive_); }

 private:
  MemEnv* const env_;
  const std::string path_;
  const bool exclusive_;
};

MemEnv::MemEnv() {
  dirs_.insert("/");
  dirs_.insert(".");
}

MemEnv::~MemEnv() = default;

bool MemEnv::ParentExistsLocked(const std::string& path) const {
  std::string dir = DirName(path);
  return dirs_.count(dir) != 0;
}

Result<std::unique_ptr<RandomRWFile>> MemEnv::OpenFile(const std::string& path,
                                                       OpenMode mode) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = files_.find(path);
  std::shared_ptr<File> file;
  if (it != files_.end()) {
    file = it->second;
    if (mode == OpenMode::kCreateTruncate) file->Truncate(0);
  } else {
    if (mode == OpenMode::kReadOnly || mode == OpenMode::kReadWrite) {
      return NotFoundError("open", path);
    }
    if (dirs_.count(path) != 0) {
      return PosixError(fmt::format("open {}", path), EISDIR);
    }
    if (!ParentExistsLocked(path)) return NotFoundError("open", path);
    file = std::make_shared<File>(next_inode_++);
    files_[path] = file;
  }
  return std::unique_ptr<RandomRWFile>(
      new MemRandomRWFile(path, file, mode != OpenMode::kReadOnly));
}

Status MemEnv::RenameFile(const std::string& from, const std::string& to) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = files_.find(from);
  if (it == files_.end()) return NotFoundError("rename", from);
  if (!ParentExistsLocked(to)) return NotFoundError("rename to", to);
  std::shared_ptr<File> file = it->second;
  files_.erase(it);
  files_[to] = std::move(file);
  return Status::OK();
}

Status MemEnv::RemoveFile(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  if (files_.erase(path) == 0) return NotFoundError("unlink", path);
  return Status::OK();
}

bool MemEnv::FileExists(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  return files_.count(path) != 0 || dirs_.count(path) != 0;
}

Result<FileInfo> MemEnv::Stat(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = files_.find(path);
  if (it == files_.end()) {
    if (dirs_.count(path) != 0) {
      FileInfo info;
      info.type = FileType::kDirectory;
      info.device = 1;
      return info;
    }
    return NotFoundError("stat", path);
  }
  File& file = *it->second;
  std::lock_guard<std::mutex> file_lock(file.mu);
  if (file.stat_override) return *file.stat_override;
  FileInfo info;
  info.type = FileType::kRegular;
  info.size_bytes = file.size;
  info.device = 1;
  info.inode = file.inode;
  return info;
}

Status MemEnv::CreateDirs(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  std::string prefix;
  size_t pos = 0;
  while (pos != std::string::npos) {
    size_t next = path.find('/', pos + 1);
    prefix = path.substr(0, next);
    if (!prefix.empty()) {
      if (files_.count(prefix) != 0) {
        return PosixError(fmt::format("mkdir -p {}", path), ENOTDIR);
      }
      dirs_.insert(prefix);
    }
    pos = next;
  }
  return Status::OK();
}

Status MemEnv::SyncDir(const std::string& dir) {
  std::lock_guard<std::mutex> lock(mu_);
  if (dirs_.count(dir) == 0) return NotFoundError("open directory", dir);
  return Status::OK();
}

Result<std::unique_ptr<FileLock>> MemEnv::LockFile(const std::string& path,
                                                   LockMode mode) {
  std::lock_guard<std::mutex> lock(mu_);
  const bool exclusive = mode == LockMode::kExclusive;
  if (files_.count(path) == 0) {
    if (!exclusive) return NotFoundError("open", path);
    if (!ParentExistsLocked(path)) return NotFoundError("open", path);
    files_[path] = std::make_shared<File>(next_inode_++);
  }
  LockState& state = locks_[path];
  if (state.exclusive || (exclusive && state.shared > 0)) {
    return Status::Busy(fmt::format("{} is locked", path));
  }
  if (exclusive) {
    state.exclusive = true;
  } else {
    ++state.shared;
  }
  return std::unique_ptr<FileLock>(new MemFileLock(this, path, exclusive));
}

void MemEnv::Unlock(const std::string& path, bool exclusive) {
  std::lock_guard<std::mutex> lock(mu_);
  LockState& state = locks_[path];
  if (exclusive) {
    state.exclusive = false;
  } else {
    --state.shared;
  }
}

Status MemEnv::SetStatOverride(const std::string& path, const FileInfo& info) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = files_.find(path);
  if (it == files_.end()) return NotFoundError("stat", path);
  std::lock_guard<std::mutex> file_lock(it->second->mu);
  it->second->stat_override = info;
  return Status::OK();
}

uint64_t MemEnv::MemoryUsageBytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t total = 0;
  for (const auto& [path, file] : files_) {
    std::lock_guard<std::mutex> file_lock(file->mu);
    total += file->blocks.size() * kMemBlockBytes;
  }
  return total;
}

}  // namespace blockrelay::io
