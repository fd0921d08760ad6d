// PosixEnv: Env over pread/pwrite/fdatasync (leveldb util/env_posix.cc).

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <system_error>
#include <filesystem>

#include <fmt/format.h>

#include "blockrelay/io/env.h"

namespace blockrelay::io {
namespace {

class PosixRandomRWFile final : public RandomRWFile {
 public:
  PosixRandomRWFile(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  ~PosixRandomRWFile() override { ::close(fd_); }

  Result<size_t> PRead(uint64_t offset, std::span<std::byte> out) override {
    size_t done = 0;
    while (done < out.size()) {
      ssize_t n = ::pread(fd_, out.data() + done, out.size() - done,
                          static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return PosixError(fmt::format("pread {} at {}", path_, offset + done),
                          errno);
      }
      if (n == 0) break;  // end of file
      done += static_cast<size_t>(n);
    }
    return done;
  }

  Status PWrite(uint64_t offset, std::span<const std::byte> data) override {
    return WriteAll("pwrite", offset, {}, data);
  }

  Status PWrite2(uint64_t offset, std::span<const std::byte> first,
                 std::span<const std::byte> second) override {
    return WriteAll("pwritev", offset, first, second);
  }

  Status Sync() override {
    if (::fdatasync(fd_) != 0) {
      return PosixSyncError(fmt::format("fdatasync {}", path_), errno);
    }
    return Status::OK();
  }

  Result<uint64_t> Size() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) {
      return PosixError(fmt::format("fstat {}", path_), errno);
    }
    return static_cast<uint64_t>(st.st_size);
  }

  Status Truncate(uint64_t size_bytes) override {
    if (::ftruncate(fd_, static_cast<off_t>(size_bytes)) != 0) {
      return PosixError(fmt::format("ftruncate {} to {}", path_, size_bytes),
                        errno);
    }
    return Status::OK();
  }

  const std::string& path() const override { return path_; }

 private:
  // Writes `first` then `second` from `offset` on, retrying short writes
  // and EINTR; `call` names the system call in errors.
  Status WriteAll(const char* call, uint64_t offset, std::span<const std::byte> first,
                  std::span<const std::byte> second) {
    const size_t total = first.size() + second.size();
    size_t done = 0;
    while (done < total) {
      // Rebuilt after a short write: it may end inside either piece.
      iovec iov[2];
      int count = 0;
      if (done < first.size()) {
        iov[count++] = {const_cast<std::byte*>(first.data()) + done, first.size() - done};
      }
      const size_t into_second = done > first.size() ? done - first.size() : 0;
      iov[count++] = {const_cast<std::byte*>(second.data()) + into_second,
                      second.size() - into_second};
      ssize_t n = ::pwritev(fd_, iov, count, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return PosixError(fmt::format("{} {} at {}", call, path_, offset + done), errno);
      }
      if (n == 0) {
        // Not seen on a regular file; looping on it would hang the caller.
        return Status::IOError(
            fmt::format("{} {} at {}: wrote nothing", call, path_, offset + done));
      }
      done += static_cast<size_t>(n);
    }
    return Status::OK();
  }

  const std::string path_;
  const int fd_;
};

class PosixFileLock final : public FileLock {
 public:
  explicit PosixFileLock(int fd) : fd_(fd) {}
  // Closing the descriptor drops the flock.
  ~PosixFileLock() override { ::close(fd_); }

 private:
  const int fd_;
};

class PosixEnv final : public Env {
 public:
  Result<std::unique_ptr<RandomRWFile>> OpenFile(const std::string& path,
                                                 OpenMode mode) override {
    int flags = O_CLOEXEC;
    switch (mode) {
      case OpenMode::kReadOnly:
        flags |= O_RDONLY;
        break;
      case OpenMode::kReadWrite:
        flags |= O_RDWR;
        break;
      case OpenMode::kCreate:
        flags |= O_RDWR | O_CREAT;
        break;
      case OpenMode::kCreateTruncate:
        flags |= O_RDWR | O_CREAT | O_TRUNC;
        break;
    }
    int fd = ::open(path.c_str(), flags, 0644);
    if (fd < 0) return PosixError(fmt::format("open {}", path), errno);
    return std::unique_ptr<RandomRWFile>(new PosixRandomRWFile(path, fd));
  }

  Status RenameFile(const std::string& from, const std::string& to) override {
    if (::rename(from.c_str(), to.c_str()) != 0) {
      return PosixError(fmt::format("rename {} to {}", from, to), errno);
    }
    return Status::OK();
  }

  Status RemoveFile(const std::string& path) override {
    if (::unlink(path.c_str()) != 0) {
      return PosixError(fmt::format("unlink {}", path), errno);
    }
    return Status::OK();
  }

  bool FileExists(const std::string& path) override {
    return ::access(path.c_str(), F_OK) == 0;
  }

  Result<FileInfo> Stat(const std::string& path) override {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
      return PosixError(fmt::format("stat {}", path), errno);
    }
    FileInfo info;
    if (S_ISREG(st.st_mode)) {
      info.type = FileType::kRegular;
    } else if (S_ISBLK(st.st_mode)) {
      info.type = FileType::kBlockDevice;
    } else if (S_ISDIR(st.st_mode)) {
      info.type = FileType::kDirectory;
    }
    info.size_bytes = static_cast<uint64_t>(st.st_size);
    info.device = static_cast<uint64_t>(st.st_dev);
    info.inode = static_cast<uint64_t>(st.st_ino);
    info.rdev = static_cast<uint64_t>(st.st_rdev);
    return info;
  }

  Status CreateDirs(const std::string& path) override {
    std::error_code ec;
    std::filesystem::create_directories(path, ec);
    if (ec) {
      return PosixError(fmt::format("mkdir -p {}", path), ec.value());
    }
    return Status::OK();
  }

  Status SyncDir(const std::string& dir) override {
    int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return PosixError(fmt::format("open directory {}", dir), errno);
    Status s;
    if (::fsync(fd) != 0) s = PosixSyncError(fmt::format("fsync {}", dir), errno);
    ::close(fd);
    return s;
  }

  Result<std::unique_ptr<FileLock>> LockFile(const std::string& path,
                                             LockMode mode) override {
    const bool exclusive = mode == LockMode::kExclusive;
    int fd = ::open(path.c_str(),
                    exclusive ? (O_RDWR | O_CREAT | O_CLOEXEC)
                              : (O_RDONLY | O_CLOEXEC),
                    0644);
    if (fd < 0) return PosixError(fmt::format("open {}", path), errno);
    // flock locks belong to the open file description, so a second LockFile
    // in this process conflicts just like one in another process would.
    if (::flock(fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) != 0) {
      int err = errno;
      ::close(fd);
      if (err == EWOULDBLOCK) {
        return Status::Busy(fmt::format("{} is locked", path));
      }
      return PosixError(fmt::format("flock {}", path), err);
    }
    return std::unique_ptr<FileLock>(new PosixFileLock(fd));
  }
};

}  // namespace

Env* Env::Default() {
  static PosixEnv* env = new PosixEnv();  // never destroyed: used until exit
  return env;
}

}  // namespace blockrelay::io
