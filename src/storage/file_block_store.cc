// FileBlockStore: a BlockStore over a regular file or a block device.
//
// Regular files are opened buffered (the page cache is the write-back cache
// that FLUSH empties with fdatasync); FUA writes use pwritev2(RWF_DSYNC), so a
// FUA write costs one synchronous write instead of write + flush. Trim and
// zeroing use fallocate on files and BLKDISCARD/BLKZEROOUT on devices (as
// nbdkit's file plugin does).
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <vector>

#include <fmt/format.h>

#include "blockrelay/storage/block_store.h"

namespace blockrelay::storage {
namespace {

class FileBlockStore final : public BlockStore {
 public:
  FileBlockStore(std::string path, int fd, uint64_t size_bytes, bool is_block)
      : path_(std::move(path)), fd_(fd), size_bytes_(size_bytes),
        is_block_(is_block) {}
  ~FileBlockStore() override { ::close(fd_); }

  uint64_t size_bytes() const override { return size_bytes_; }
  std::string Describe() const override { return path_; }

  Status Read(uint64_t offset, std::span<std::byte> out) override {
    size_t done = 0;
    while (done < out.size()) {
      ssize_t n = ::pread(fd_, out.data() + done, out.size() - done,
                          static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return PosixError(fmt::format("pread {} at {}", path_, offset + done),
                          errno);
      }
      if (n == 0) {
        // A file shrunk behind our back reads as zeroes rather than failing
        // the whole read; the size is checked at start-up.
        std::fill(out.begin() + done, out.end(), std::byte{0});
        break;
      }
      done += static_cast<size_t>(n);
    }
    return Status::OK();
  }

  Status Write(uint64_t offset, std::span<const std::byte> data,
               bool fua) override {
    size_t done = 0;
    while (done < data.size()) {
      iovec iov{const_cast<std::byte*>(data.data() + done), data.size() - done};
      ssize_t n = ::pwritev2(fd_, &iov, 1, static_cast<off_t>(offset + done),
                             fua && dsync_supported_ ? RWF_DSYNC : 0);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EOPNOTSUPP && fua && dsync_supported_) {
          dsync_supported_ = false;
          continue;
        }
        return PosixError(fmt::format("pwrite {} at {}", path_, offset + done),
                          errno);
      }
      done += static_cast<size_t>(n);
    }
    if (fua && !dsync_supported_) return Flush();
    return Status::OK();
  }

  Status Trim(uint64_t offset, uint64_t length, bool fua) override {
    if (!can_trim_) return Status::OK();  // advisory
    int rc;
    if (is_block_) {
      uint64_t range[2] = {offset, length};
      rc = ::ioctl(fd_, BLKDISCARD, range);
    } else {
      rc = ::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                       static_cast<off_t>(offset), static_cast<off_t>(length));
    }
    if (rc != 0) {
      if (errno == EOPNOTSUPP || errno == ENOTTY) {
        can_trim_ = false;
        return Status::OK();
      }
      return PosixError(fmt::format("trim {} at {}+{}", path_, offset, length),
                        errno);
    }
    return fua ? Flush() : Status::OK();
  }

  Status WriteZeroes(uint64_t offset, uint64_t length, bool may_trim,
                     bool fast_only, bool fua) override {
    Status s = TryFastZero(offset, length, may_trim);
    if (s.IsNotSupported()) {
      if (fast_only) return s;
      s = WriteZeroBytes(offset, length);
    }
    if (!s.ok()) return s;
    return fua ? Flush() : Status::OK();
  }

  Status Flush() override {
    if (::fdatasync(fd_) != 0) {
      return PosixSyncError(fmt::format("fdatasync {}", path_), errno);
    }
    return Status::OK();
  }

  void StartWriteback() override {
    // Whole file, SYNC_FILE_RANGE_WRITE: queue the dirty pages for writeback
    // and return (it may wait for a congested queue, not for the writes).
    ::sync_file_range(fd_, 0, 0, SYNC_FILE_RANGE_WRITE);
  }

  Status Cache(uint64_t offset, uint64_t length) override {
    int rc = ::posix_fadvise(fd_, static_cast<off_t>(offset),
                             static_cast<off_t>(length), POSIX_FADV_WILLNEED);
    if (rc != 0) {
      return PosixError(fmt::format("fadvise {} at {}", path_, offset), rc);
    }
    return Status::OK();
  }

  Result<std::vector<Extent>> BlockStatus(uint64_t offset,
                                          uint64_t length) override {
    std::vector<Extent> extents;
    uint64_t end = std::min(size_bytes_, offset + length);
    if (is_block_ || !seek_supported_) {
      extents.push_back({end - offset, false, false});
      return extents;
    }
    uint64_t pos = offset;
    // Bound the work per request: the client asks again for the rest.
    constexpr size_t kMaxExtents = 1024;
    while (pos < end && extents.size() < kMaxExtents) {
      off_t data = ::lseek(fd_, static_cast<off_t>(pos), SEEK_DATA);
      if (data < 0) {
        if (errno == ENXIO) {  // no data from pos to the end of file
          extents.push_back({end - pos, true, true});
          break;
        }
        if (errno == EINVAL || errno == EOPNOTSUPP) {
          seek_supported_ = false;
          extents.push_back({end - pos, false, false});
          break;
        }
        return PosixError(fmt::format("lseek SEEK_DATA {} at {}", path_, pos),
                          errno);
      }
      if (static_cast<uint64_t>(data) > pos) {
        uint64_t hole_end = std::min<uint64_t>(data, end);
        extents.push_back({hole_end - pos, true, true});
        pos = hole_end;
        continue;
      }
      off_t hole = ::lseek(fd_, static_cast<off_t>(pos), SEEK_HOLE);
      if (hole < 0) {
        return PosixError(fmt::format("lseek SEEK_HOLE {} at {}", path_, pos),
                          errno);
      }
      uint64_t data_end = std::min<uint64_t>(
          std::max<uint64_t>(static_cast<uint64_t>(hole), pos + 1), end);
      extents.push_back({data_end - pos, false, false});
      pos = data_end;
    }
    return extents;
  }

  bool ReadIfCached(uint64_t offset, std::span<std::byte> out) override {
    iovec iov{out.data(), out.size()};
    ssize_t n = ::preadv2(fd_, &iov, 1, static_cast<off_t>(offset), RWF_NOWAIT);
    return n == static_cast<ssize_t>(out.size());
  }

  bool WritesAreBuffered() const override { return !is_block_; }

  bool CanTrim() const override { return can_trim_; }
  bool CanFastZero() const override { return true; }

 private:
  Status TryFastZero(uint64_t offset, uint64_t length, bool may_trim) {
    int rc;
    if (is_block_) {
      // BLKZEROOUT may write zero bytes itself, which is not "fast"; only
      // trusting discard-zeroes would be. Report it as not fast.
      return Status::NotSupported("block device zeroing is not fast");
    }
    int mode = may_trim ? (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
                        : FALLOC_FL_ZERO_RANGE;
    rc = ::fallocate(fd_, mode, static_cast<off_t>(offset),
                     static_cast<off_t>(length));
    if (rc == 0) return Status::OK();
    if (errno == EOPNOTSUPP && may_trim) {
      // Some file systems punch but do not zero-range, or the reverse.
      rc = ::fallocate(fd_, FALLOC_FL_ZERO_RANGE, static_cast<off_t>(offset),
                       static_cast<off_t>(length));
      if (rc == 0) return Status::OK();
    }
    if (errno == EOPNOTSUPP || errno == ENODEV) {
      return Status::NotSupported(fmt::format(
          "fallocate zero {} at {}+{} not supported", path_, offset, length));
    }
    return PosixError(
        fmt::format("fallocate zero {} at {}+{}", path_, offset, length), errno);
  }

  Status WriteZeroBytes(uint64_t offset, uint64_t length) {
    if (is_block_) {
      uint64_t range[2] = {offset, length};
      if (::ioctl(fd_, BLKZEROOUT, range) == 0) return Status::OK();
    }
    static const std::vector<std::byte> zeroes(1 << 20);
    while (length > 0) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(length, zeroes.size()));
      Status s = Write(offset, std::span(zeroes.data(), n), false);
      if (!s.ok()) return s;
      offset += n;
      length -= n;
    }
    return Status::OK();
  }

  const std::string path_;
  const int fd_;
  const uint64_t size_bytes_;
  const bool is_block_;
  // Capabilities found missing at run time; races only repeat a probe.
  std::atomic<bool> can_trim_{true};
  std::atomic<bool> dsync_supported_{true};
  std::atomic<bool> seek_supported_{true};
};

}  // namespace

Result<std::unique_ptr<BlockStore>> OpenFileBlockStore(
    const FileBlockStoreOptions& options) {
  const std::string path = options.path.string();
  int flags = (options.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  int fd = ::open(path.c_str(), flags);
  if (fd < 0 && errno == ENOENT && options.create_if_missing &&
      !options.read_only) {
    if (!options.size_bytes) {
      return Status::InvalidArgument(fmt::format(
          "backing file {} does not exist and no size is configured", path));
    }
    fd = ::open(path.c_str(), flags | O_CREAT | O_EXCL, 0600);
    if (fd >= 0 && ::ftruncate(fd, static_cast<off_t>(*options.size_bytes)) != 0) {
      Status s = PosixError(fmt::format("ftruncate {}", path), errno);
      ::close(fd);
      ::unlink(path.c_str());
      return s;
    }
  }
  if (fd < 0) return PosixError(fmt::format("open {}", path), errno);

  struct stat st;
  if (::fstat(fd, &st) != 0) {
    Status s = PosixError(fmt::format("fstat {}", path), errno);
    ::close(fd);
    return s;
  }
  uint64_t size_bytes = 0;
  bool is_block = S_ISBLK(st.st_mode);
  if (is_block) {
    if (::ioctl(fd, BLKGETSIZE64, &size_bytes) != 0) {
      Status s = PosixError(fmt::format("BLKGETSIZE64 {}", path), errno);
      ::close(fd);
      return s;
    }
  } else if (S_ISREG(st.st_mode)) {
    size_bytes = static_cast<uint64_t>(st.st_size);
  } else {
    ::close(fd);
    return Status::InvalidArgument(
        fmt::format("{} is neither a regular file nor a block device", path));
  }
  if (options.size_bytes && *options.size_bytes != size_bytes) {
    ::close(fd);
    return Status::InvalidArgument(fmt::format(
        "{} is {} bytes but the configured size is {} bytes; fix \"size\" or "
        "resize the file",
        path, size_bytes, *options.size_bytes));
  }
  return std::unique_ptr<BlockStore>(
      std::make_unique<FileBlockStore>(path, fd, size_bytes, is_block));
}

}  // namespace blockrelay::storage
