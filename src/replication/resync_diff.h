// Resync diffing: which parts of a region a resync actually changes.
//
// A resync sends whole dirty regions (64 KiB by default), but after an
// outage most of a dirty region is usually what the downstream already has
// (one 4 KiB write dirties its whole region). The downstream compares what
// arrives with what it holds, granule by granule, and saves (undo record)
// and writes only the granules that differ: the undo record and the disk
// writes shrink to the bytes that changed.
//
// Pure functions over byte spans; no I/O.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace blockrelay::replication {

// Granules are compared at this size (a page: the unit the page cache and
// most writers work in).
inline constexpr uint64_t kResyncGranuleBytes = 4096;

// [offset, offset + length), relative to the start of the compared range.
struct ByteRun {
  uint64_t offset = 0;
  uint64_t length = 0;
  bool operator==(const ByteRun&) const = default;
};

// The granules of `incoming` that differ from `current`, merged into runs.
// An empty `current` stands for zeroes (a hole). Granule boundaries are
// multiples of `granule` from the start; the last granule may be short.
// REQUIRES: current is empty or current.size() == incoming.size();
// granule > 0.
std::vector<ByteRun> DifferingRuns(std::span<const std::byte> current,
                                   std::span<const std::byte> incoming,
                                   uint64_t granule = kResyncGranuleBytes);

// The granules of `current` that hold a non-zero byte, merged into runs:
// what zeroing the range changes.
std::vector<ByteRun> NonZeroRuns(std::span<const std::byte> current,
                                 uint64_t granule = kResyncGranuleBytes);

// Whether every byte of `bytes` is zero.
bool IsAllZero(std::span<const std::byte> bytes);

}  // namespace blockrelay::replication
