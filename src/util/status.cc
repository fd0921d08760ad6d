#include "blockrelay/status.h"

#include <cerrno>
#include <cstring>
#include <string>

namespace blockrelay {

std::string Status::ToString() const {
  const char* prefix = "";
  switch (code_) {
    case Code::kOk:
      return "OK";
    case Code::kIOError:
      prefix = "IO error: ";
      break;
    case Code::kCorruption:
      prefix = "Corruption: ";
      break;
    case Code::kInvalidArgument:
      prefix = "Invalid argument: ";
      break;
    case Code::kNoSpace:
      prefix = "No space: ";
      break;
    case Code::kNotSupported:
      prefix = "Not supported: ";
      break;
    case Code::kAborted:
      prefix = "Aborted: ";
      break;
    case Code::kNotFound:
      prefix = "Not found: ";
      break;
    case Code::kPermissionDenied:
      prefix = "Permission denied: ";
      break;
    case Code::kBusy:
      prefix = "Busy: ";
      break;
  }
  return prefix + message_;
}

Status PosixError(std::string_view context, int errno_value) {
  std::string msg = std::string(context) + ": " + std::strerror(errno_value);
  Status::Code code = Status::Code::kIOError;
  switch (errno_value) {
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      code = Status::Code::kNoSpace;
      break;
    case EOPNOTSUPP:
      code = Status::Code::kNotSupported;
      break;
    case EACCES:
    case EPERM:
    case EROFS:
      code = Status::Code::kPermissionDenied;
      break;
    case ENOENT:
      code = Status::Code::kNotFound;
      break;
    case EINVAL:
      code = Status::Code::kInvalidArgument;
      break;
    default:
      break;
  }
  return Status::FromCode(code, std::move(msg), errno_value);
}

Status PosixSyncError(std::string_view context, int errno_value) {
  return Status::IOError(std::string(context) + ": " + std::strerror(errno_value),
                         errno_value);
}

}  // namespace blockrelay
