// Helpers shared by every Env.

#include <string>

#include <fmt/format.h>

#include "blockrelay/io/env.h"

namespace blockrelay::io {

Status ReadFully(RandomRWFile& file, uint64_t offset,
                 std::span<std::byte> out) {
  Result<size_t> n = file.PRead(offset, out);
  if (!n.ok()) return n.status();
  if (*n != out.size()) {
    return Status::Corruption(
        fmt::format("{}: short read at {}: wanted {} bytes, got {}",
                    file.path(), offset, out.size(), *n));
  }
  return Status::OK();
}

std::string DirName(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace blockrelay::io
