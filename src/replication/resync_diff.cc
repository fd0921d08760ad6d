#include "replication/resync_diff.h"

#include <algorithm>
#include <cassert>
#include <cstring>

namespace blockrelay::replication {

namespace {
void AddGranule(std::vector<ByteRun>& runs, uint64_t offset, uint64_t length) {
  if (!runs.empty() && runs.back().offset + runs.back().length == offset) {
    runs.back().length += length;
  } else {
    runs.push_back(ByteRun{offset, length});
  }
}
}  // namespace

bool IsAllZero(std::span<const std::byte> bytes) {
  if (bytes.empty()) return true;
  // memcmp against itself shifted by one: every byte equals the first.
  return bytes[0] == std::byte{0} &&
         std::memcmp(bytes.data(), bytes.data() + 1, bytes.size() - 1) == 0;
}

std::vector<ByteRun> DifferingRuns(std::span<const std::byte> current,
                                   std::span<const std::byte> incoming,
                                   uint64_t granule) {
  assert(granule > 0);
  assert(current.empty() || current.size() == incoming.size());
  std::vector<ByteRun> runs;
  for (uint64_t pos = 0; pos < incoming.size(); pos += granule) {
    const uint64_t n = std::min<uint64_t>(granule, incoming.size() - pos);
    const auto in = incoming.subspan(pos, n);
    const bool same = current.empty()
                          ? IsAllZero(in)
                          : std::memcmp(current.data() + pos, in.data(), n) == 0;
    if (!same) AddGranule(runs, pos, n);
  }
  return runs;
}

std::vector<ByteRun> NonZeroRuns(std::span<const std::byte> current, uint64_t granule) {
  assert(granule > 0);
  std::vector<ByteRun> runs;
  for (uint64_t pos = 0; pos < current.size(); pos += granule) {
    const uint64_t n = std::min<uint64_t>(granule, current.size() - pos);
    if (!IsAllZero(current.subspan(pos, n))) AddGranule(runs, pos, n);
  }
  return runs;
}

}  // namespace blockrelay::replication
