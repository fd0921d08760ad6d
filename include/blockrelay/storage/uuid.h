// Uuid: a random 128-bit identifier (volume and generation identifiers).
//
// Thread safety: a value type; Uuid::Random() may be called from any thread.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace blockrelay::storage {

struct Uuid {
  std::array<uint8_t, 16> bytes{};

  // A random (version 4) UUID from std::random_device.
  static Uuid Random();
  // "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"; nullopt for anything else.
  static std::optional<Uuid> Parse(std::string_view text);

  bool IsNil() const;
  // Lower-case canonical form.
  std::string ToString() const;
  // The first 8 bytes, little-endian: a per-volume salt for on-disk records.
  uint64_t Low64() const;

  friend bool operator==(const Uuid&, const Uuid&) = default;
};

}  // namespace blockrelay::storage
