// Logging: one line per event on stderr, "2026-11-25T10:00:00.123Z level
// [module] message". Log once, where an error is handled; lower layers put
// context into the Status instead.
//
// Thread safety: Log() may be called from any thread; each line is written
// with a single write(2) so lines from threads do not interleave.
#pragma once

#include <string_view>

#include <fmt/format.h>

namespace blockrelay::util {

enum class LogLevel { kDebug = 0, kInfo, kWarning, kError };

void SetLogLevel(LogLevel level);
LogLevel GetLogLevel();
void WriteLogLine(LogLevel level, std::string_view module, std::string_view msg);

template <typename... Args>
void Log(LogLevel level, std::string_view module,
         fmt::format_string<Args...> format, Args&&... args) {
  if (level < GetLogLevel()) return;
  WriteLogLine(level, module, fmt::format(format, std::forward<Args>(args)...));
}

#define BR_LOG_INFO(module, ...) \
  ::blockrelay::util::Log(::blockrelay::util::LogLevel::kInfo, module, __VA_ARGS__)
#define BR_LOG_WARN(module, ...) \
  ::blockrelay::util::Log(::blockrelay::util::LogLevel::kWarning, module, __VA_ARGS__)
#define BR_LOG_ERROR(module, ...) \
  ::blockrelay::util::Log(::blockrelay::util::LogLevel::kError, module, __VA_ARGS__)
#define BR_LOG_DEBUG(module, ...) \
  ::blockrelay::util::Log(::blockrelay::util::LogLevel::kDebug, module, __VA_ARGS__)

}  // namespace blockrelay::util
