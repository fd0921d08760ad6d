// Which bytes of an unsynced write survive a crash: shared by
// FaultInjectionEnv and FaultInjectionBlockStore so both devices model a
// crash the same way.
//
// Thread safety: a pure function over the caller's rng.
#pragma once

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>

namespace blockrelay::testutil {

enum class Survival {
  kAll,          // process crash: the page cache reaches the disk
  kNone,         // power loss: nothing unsynced survives
  kCoinFlip,     // power loss: each write survives whole or not at all
  kTornSectors,  // power loss: each sector of each write survives or not
};

// Calls keep(lo, hi) for each surviving byte range of the unsynced write
// [offset, offset + length), in order, and returns what happened for the
// injection log ("kept", "dropped", "sectors kept 0110...").
// REQUIRES: rng for kCoinFlip and kTornSectors, sector_bytes for the latter.
template <typename Keep>
std::string ApplySurvivors(uint64_t offset, uint64_t length, Survival survival,
                           uint32_t sector_bytes, std::mt19937_64* rng, Keep&& keep) {
  const uint64_t end = offset + length;
  switch (survival) {
    case Survival::kAll:
      keep(offset, end);
      return "kept";
    case Survival::kNone:
      return "dropped";
    case Survival::kCoinFlip:
      if (((*rng)() & 1) == 0) return "dropped";
      keep(offset, end);
      return "kept";
    case Survival::kTornSectors: {
      std::string kept = "sectors kept ";
      for (uint64_t lo = offset; lo < end;) {
        uint64_t hi = std::min(end, (lo / sector_bytes + 1) * sector_bytes);
        bool survives = ((*rng)() & 1) != 0;
        if (survives) keep(lo, hi);
        kept += survives ? '1' : '0';
        lo = hi;
      }
      return kept;
    }
  }
  return "?";
}

}  // namespace blockrelay::testutil
