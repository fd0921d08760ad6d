// Status and Result<T>: how errors cross module boundaries.
//
// A Status is OK or carries a code, the errno that caused it (0 if none), a
// message with context ("pwrite /srv/a.img at 4096: No space left on device")
// and a retryable bit. Result<T> holds either a T or a non-OK Status; C++20 has
// no std::expected. Both are cheap to move and must be checked: an ignored
// error is a bug, and IgnoreError() says on purpose that it is not one.
//
// Thread safety: values, no shared state.
#pragma once

#include <cassert>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace blockrelay {

class [[nodiscard]] Status {
 public:
  enum class Code {
    kOk = 0,
    kIOError,
    kCorruption,
    kInvalidArgument,
    kNoSpace,
    kNotSupported,
    kAborted,
    kNotFound,
    kPermissionDenied,
    kBusy,
  };

  Status() = default;

  static Status OK() { return Status(); }
  static Status IOError(std::string msg, int errno_value = 0) {
    return Status(Code::kIOError, std::move(msg), errno_value);
  }
  static Status Corruption(std::string msg) {
    return Status(Code::kCorruption, std::move(msg), 0);
  }
  static Status InvalidArgument(std::string msg) {
    return Status(Code::kInvalidArgument, std::move(msg), 0);
  }
  static Status NoSpace(std::string msg, int errno_value = 0) {
    return Status(Code::kNoSpace, std::move(msg), errno_value);
  }
  static Status NotSupported(std::string msg) {
    return Status(Code::kNotSupported, std::move(msg), 0);
  }
  static Status Aborted(std::string msg) {
    return Status(Code::kAborted, std::move(msg), 0);
  }
  static Status NotFound(std::string msg) {
    return Status(Code::kNotFound, std::move(msg), 0);
  }
  static Status PermissionDenied(std::string msg) {
    return Status(Code::kPermissionDenied, std::move(msg), 0);
  }
  static Status Busy(std::string msg) {
    return Status(Code::kBusy, std::move(msg), 0);
  }
  static Status FromCode(Code code, std::string msg, int errno_value = 0) {
    return Status(code, std::move(msg), errno_value);
  }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  // The errno behind the error, or 0 when it did not come from a system call.
  int errno_value() const { return errno_; }
  const std::string& message() const { return message_; }
  bool retryable() const { return retryable_; }
  Status& SetRetryable(bool r) {
    retryable_ = r;
    return *this;
  }

  bool IsIOError() const { return code_ == Code::kIOError; }
  bool IsCorruption() const { return code_ == Code::kCorruption; }
  bool IsInvalidArgument() const { return code_ == Code::kInvalidArgument; }
  bool IsNoSpace() const { return code_ == Code::kNoSpace; }
  bool IsNotSupported() const { return code_ == Code::kNotSupported; }

  // Returns a copy whose message is "context: message".
  Status WithContext(std::string_view context) const {
    Status s = *this;
    s.message_ = std::string(context) + ": " + message_;
    return s;
  }

  // "IO error: pwrite ...: No space left on device" style, for logs.
  std::string ToString() const;

  // Marks an error as deliberately dropped.
  void IgnoreError() const {}

 private:
  Status(Code code, std::string msg, int errno_value)
      : code_(code), errno_(errno_value), message_(std::move(msg)) {}

  Code code_ = Code::kOk;
  int errno_ = 0;
  bool retryable_ = false;
  std::string message_;
};

// Status from a failed system call: the code follows errno (ENOSPC, EDQUOT
// and EFBIG are kNoSpace, EOPNOTSUPP kNotSupported, EACCES/EPERM/EROFS
// kPermissionDenied), the message is "context: strerror(errno)".
Status PosixError(std::string_view context, int errno_value);

// Status from a failed fsync or fdatasync: kIOError whatever errno says,
// with the same message. Even after ENOSPC the pages it was to write may be
// lost and marked clean, so a caller must not treat it as a full disk that
// making room fixes (kNoSpace is retried that way).
Status PosixSyncError(std::string_view context, int errno_value);

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT: implicit on purpose
  Result(Status status) : status_(std::move(status)) {  // NOLINT
    assert(!status_.ok() && "Result needs a value or an error");
  }

  bool ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }

  T& value() & {
    assert(ok());
    return *value_;
  }
  const T& value() const& {
    assert(ok());
    return *value_;
  }
  T&& value() && {
    assert(ok());
    return std::move(*value_);
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::optional<T> value_;
  Status status_;
};

}  // namespace blockrelay
