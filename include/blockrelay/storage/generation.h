// Generation identifiers: which history of writes a volume's data belongs to.
//
// A volume starts with a random generation uuid and counter 1. A role change
// (promote/demote, later) moves the current generation into a short history
// and starts a new one, so two sites can tell from their generations whether
// one's data descends from the other's or they have split (DRBD's UUID
// scheme, simplified). Stored in the volume's metadata superblock.
//
// Thread safety: value types.
#pragma once

#include <cstdint>

#include "blockrelay/storage/uuid.h"

namespace blockrelay::storage {

struct Generation {
  Uuid uuid;
  uint64_t counter = 0;
  friend bool operator==(const Generation&, const Generation&) = default;
};

}  // namespace blockrelay::storage
