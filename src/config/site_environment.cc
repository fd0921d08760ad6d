// CheckSiteEnvironment(): compares a parsed SiteConfig with the machine
// before anything is created or opened for writing. Uses stat(2)/access(2)
// directly so that every failure has an errno and nothing throws.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "blockrelay/config/site_config.h"

namespace blockrelay::config {
namespace {

namespace fs = std::filesystem;

#define CONFIG_RETURN_IF_ERROR(expr) \
  do {                               \
    Status _st = (expr);             \
    if (!_st.ok()) return _st;       \
  } while (0)

Status Error(std::string_view json_path, std::string_view what) {
  return Status::InvalidArgument(fmt::format("{}: {}", json_path, what));
}

std::string SizeText(uint64_t bytes) {
  const std::string pretty = FormatSize(bytes);
  if (pretty == std::to_string(bytes)) return fmt::format("{} bytes", bytes);
  return fmt::format("{} bytes ({})", bytes, pretty);
}

const char* FileKind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISLNK(mode)) return "a symbolic link";
  if (S_ISREG(mode)) return "a regular file";
  if (S_ISBLK(mode)) return "a block device";
  return "an unknown kind of file";
}

// `dir` is missing; it can be created when its nearest existing ancestor is
// a writable directory. `target` is what the caller ultimately wants to
// create, for the message.
Status CheckCanCreateDir(std::string_view json_path, const fs::path& target,
                         const fs::path& dir) {
  fs::path p = dir;
  while (true) {
    struct stat st;
    if (::stat(p.c_str(), &st) == 0) {
      if (!S_ISDIR(st.st_mode)) {
        return Error(json_path,
                     fmt::format("cannot create {}: {} is {}, not a directory",
                                 target.native(), p.native(),
                                 FileKind(st.st_mode)));
      }
      if (::access(p.c_str(), W_OK | X_OK) != 0) {
        return Error(json_path,
                     fmt::format("cannot create {}: directory {} is not "
                                 "writable ({})",
                                 target.native(), p.native(),
                                 std::strerror(errno)));
      }
      return Status::OK();
    }
    // ENOTDIR: a component is a file; keep walking up to name it.
    if (errno != ENOENT && errno != ENOTDIR) {
      return Error(json_path, fmt::format("cannot create {}: stat {}: {}",
                                          target.native(), p.native(),
                                          std::strerror(errno)));
    }
    const fs::path parent = p.parent_path();
    if (parent.empty() || parent == p) {
      return Error(json_path, fmt::format("cannot create {}: no existing "
                                          "parent directory",
                                          target.native()));
    }
    p = parent;
  }
}

// `dir` must be a writable directory or be creatable.
Status CheckDirUsable(std::string_view json_path, const fs::path& dir,
                      const fs::path& target) {
  // Name what is being created when the directory is only its parent.
  const std::string prefix =
      target == dir ? ""
                    : fmt::format("cannot create {}: ", target.native());
  struct stat st;
  if (::stat(dir.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) {
      return Error(json_path,
                   fmt::format("{}{} is {}, expected a directory", prefix,
                               dir.native(), FileKind(st.st_mode)));
    }
    if (::access(dir.c_str(), W_OK | X_OK) != 0) {
      return Error(json_path,
                   fmt::format("{}directory {} is not writable ({})", prefix,
                               dir.native(), std::strerror(errno)));
    }
    return Status::OK();
  }
  if (errno != ENOENT && errno != ENOTDIR) {
    return Error(json_path, fmt::format("stat {}: {}", dir.native(),
                                        std::strerror(errno)));
  }
  return CheckCanCreateDir(json_path, target, dir);
}

Status CheckSocketPath(std::string_view json_path, const fs::path& socket) {
  struct stat st;
  if (::stat(socket.c_str(), &st) == 0) {
    // A stale socket is replaced at start-up; anything else is someone's data.
    if (!S_ISSOCK(st.st_mode)) {
      return Error(json_path,
                   fmt::format("{} exists and is {}, not a socket; remove it "
                               "or choose another path",
                               socket.native(), FileKind(st.st_mode)));
    }
    return Status::OK();
  }
  if (errno != ENOENT && errno != ENOTDIR) {
    return Error(json_path, fmt::format("stat {}: {}", socket.native(),
                                        std::strerror(errno)));
  }
  return CheckDirUsable(json_path, socket.parent_path(), socket);
}

Status BlockDeviceSize(std::string_view json_path, const fs::path& path,
                       uint64_t* size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return Error(json_path, fmt::format("cannot open block device {}: {}",
                                        path.native(), std::strerror(errno)));
  }
  Status s;
  if (::ioctl(fd, BLKGETSIZE64, size) != 0) {
    s = Error(json_path, fmt::format("BLKGETSIZE64 on {}: {}", path.native(),
                                     std::strerror(errno)));
  }
  ::close(fd);
  return s;
}

Status CheckVolume(std::string_view json_path, const VolumeConfig& vol) {
  const std::string size_path = fmt::format(
      "{}.size", json_path.substr(0, json_path.rfind('.')));
  struct stat st;
  if (::stat(vol.path.c_str(), &st) != 0) {
    if (errno != ENOENT && errno != ENOTDIR) {
      return Error(json_path, fmt::format("stat {}: {}", vol.path.native(),
                                          std::strerror(errno)));
    }
    if (!vol.size_bytes) {
      return Error(json_path,
                   fmt::format("{} does not exist and {} is not set; \"size\" "
                               "is required to create a backing file",
                               vol.path.native(), size_path));
    }
    return CheckDirUsable(json_path, vol.path.parent_path(), vol.path);
  }
  if (S_ISREG(st.st_mode)) {
    if (!vol.size_bytes) {
      return Error(json_path,
                   fmt::format("{} is a regular file and {} is not set; "
                               "\"size\" is required for files (the file is "
                               "{})",
                               vol.path.native(), size_path,
                               SizeText(static_cast<uint64_t>(st.st_size))));
    }
    const uint64_t actual = static_cast<uint64_t>(st.st_size);
    if (actual != *vol.size_bytes) {
      return Error(json_path,
                   fmt::format("{} is {} but {} is {}; fix \"size\" or resize "
                               "the file",
                               vol.path.native(), SizeText(actual), size_path,
                               SizeText(*vol.size_bytes)));
    }
    if (::access(vol.path.c_str(), R_OK | W_OK) != 0) {
      return Error(json_path, fmt::format("{} is not readable and writable "
                                          "({})",
                                          vol.path.native(),
                                          std::strerror(errno)));
    }
    return Status::OK();
  }
  if (S_ISBLK(st.st_mode)) {
    uint64_t actual = 0;
    CONFIG_RETURN_IF_ERROR(BlockDeviceSize(json_path, vol.path, &actual));
    if (vol.size_bytes && actual != *vol.size_bytes) {
      return Error(json_path,
                   fmt::format("block device {} is {} but {} is {}; fix "
                               "\"size\" or leave it out to use the device's "
                               "size",
                               vol.path.native(), SizeText(actual), size_path,
                               SizeText(*vol.size_bytes)));
    }
    return Status::OK();
  }
  return Error(json_path,
               fmt::format("{} is {}, expected a regular file or a block "
                           "device",
                           vol.path.native(), FileKind(st.st_mode)));
}

}  // namespace

Status CheckSiteEnvironment(const SiteConfig& config) {
  CONFIG_RETURN_IF_ERROR(
      CheckDirUsable("data_dir", config.data_dir, config.data_dir));
  CONFIG_RETURN_IF_ERROR(
      CheckSocketPath("control_socket", config.control_socket));
  if (config.nbd.unix_socket) {
    CONFIG_RETURN_IF_ERROR(
        CheckSocketPath("nbd.unix_socket", *config.nbd.unix_socket));
  }
  for (size_t g = 0; g < config.groups.size(); ++g) {
    const GroupConfig& group = config.groups[g];
    for (size_t v = 0; v < group.volumes.size(); ++v) {
      CONFIG_RETURN_IF_ERROR(CheckVolume(
          fmt::format("groups[{}].volumes[{}].path", g, v), group.volumes[v]));
    }
  }
  return Status::OK();
}

}  // namespace blockrelay::config
